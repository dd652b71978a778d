"""Online distiller, promotion gate and the replay loop, on tiny random models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from support.tiny import CharTokenizer, noisy_copy, tiny_llama

from osd.config import EngineConfig, SamplingParams
from osd.data.buffer import BufferConfig, RecordBuffer
from osd.decoding.engine import SpeculativeEngine
from osd.models.drafts import DraftModel
from osd.registry import DraftRegistry, FileStore
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller, collate, student_logits
from trainers.gate import PromotionGate
from trainers.losses import forward_kl
from trainers.replay import distill_replay

V = 32
SHARP = 10.0  # peaky enough that a random draft disagrees with the target (α̂ ≈ 0.4)


def prompts(n: int, seed: int) -> list[list[int]]:
    """A fixed synthetic task: random prompts of 3-7 tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(3, 8, (), generator=g)),), generator=g).tolist() for _ in range(n)]


def make_engine(draft: DraftModel | None) -> SpeculativeEngine:
    return SpeculativeEngine(tiny_llama(V, 2, seed=0, sharpness=SHARP), CharTokenizer(), draft, EngineConfig(speculation="always", gamma=4))


def random_draft(seed: int = 1) -> DraftModel:
    return DraftModel(tiny_llama(V, 1, seed=seed, sharpness=SHARP))


def sampling(seed: int, max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)


def records(engine: SpeculativeEngine, n: int, seed: int) -> list:
    return [engine.generate(p, sampling(seed + i)).record for i, p in enumerate(prompts(n, seed))]


def engine_alpha(engine: SpeculativeEngine, draft: DraftModel, ps: list[list[int]]) -> float:
    """α̂ as the engine measures it while serving, pooled over every verified position."""
    engine.draft = draft
    beta = count = 0
    for i, p in enumerate(ps):
        s = engine.generate(p, sampling(1000 + i)).stats
        beta, count = beta + s.beta_sum, count + s.beta_count
    return beta / count


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_online_distillation_raises_acceptance():
    live = random_draft()
    before_live = weights(live)
    engine = make_engine(live)
    cfg = DistillConfig(lr=1e-2, steps_per_update=8, update_interval=8, holdout_fraction=0.2)
    distiller = OnlineDistiller(live, cfg)
    results = []
    for i, p in enumerate(prompts(40, seed=1)):  # served by the untrained draft, as online traffic would be
        results += distiller.add(engine.generate(p, sampling(100 + i)).record)
    assert [r.update for r in results] == [1, 2, 3, 4] and len(distiller.holdout) == 8
    assert all(r.steps == 8 and r.records == 8 and math.isfinite(r.loss) for r in results)
    assert results[-1].loss < results[0].loss

    gate = PromotionGate()
    held_before, held_after = gate.evaluate(live, distiller.holdout), gate.evaluate(distiller.draft, distiller.holdout)
    fresh = prompts(10, seed=2)
    served_before, served_after = engine_alpha(engine, live, fresh), engine_alpha(engine, distiller.candidate(), fresh)
    assert held_after > held_before + 0.15, (held_before, held_after)
    assert served_after > served_before + 0.15, (served_before, served_after)
    # The live draft was never touched while the distiller trained its copy.
    assert all(torch.equal(v, live.state_dict()[k]) for k, v in before_live.items())


def test_student_rows_line_up_with_teacher_rows():
    """A draft identical to the target scores α̂ = 1 on every row: the positions are right."""
    engine = make_engine(random_draft())
    recs = records(engine, 4, seed=3)
    same = DraftModel(copy.deepcopy(engine.target))
    assert PromotionGate(batch_size=3).evaluate(same, recs) == pytest.approx(1.0, abs=1e-3)
    # Gate logits are exactly what the draft serves, shortlist head included (-inf outside it);
    # training logits use the full head, so forward KL stays finite outside the shortlist.
    short = DraftModel(tiny_llama(V, 1, seed=1, sharpness=SHARP), shortlist=torch.arange(0, V, 2))
    batch = collate(recs, max_seq_len=1024)
    with torch.no_grad():
        served = torch.cat([short(torch.tensor([r.prompt_ids + r.output_ids[:-1]]))[0, len(r.prompt_ids) - 1:]
                            for r in recs])
        assert torch.allclose(student_logits(short, batch), served, atol=1e-5)
        full = torch.cat([short.model(torch.tensor([r.prompt_ids + r.output_ids[:-1]])).logits[0, len(r.prompt_ids) - 1:]
                          for r in recs])
        assert torch.allclose(student_logits(short, batch, use_shortlist=False), full, atol=1e-5)
    # Truncation keeps the first rows and as much prompt as still fits (here one token).
    batch = collate(recs, max_seq_len=6)
    assert batch.input_ids.shape[1] == 6 and batch.num_rows == 6 * len(recs)
    assert batch.input_ids[0].tolist() == [recs[0].prompt_ids[-1], *recs[0].output_ids[:5]]
    assert batch.row_pos[:6].tolist() == list(range(6))


def test_gate_refuses_a_worse_candidate_and_promotes_a_better_one():
    target = tiny_llama(V, 2, seed=0, sharpness=SHARP)
    live = noisy_copy(target, noise=0.5)
    engine = SpeculativeEngine(target, CharTokenizer(), live, EngineConfig(speculation="always", gamma=4))
    holdout = records(engine, 6, seed=4)
    scrambled = copy.deepcopy(live)
    with torch.no_grad():
        head = scrambled.model.lm_head.weight
        head.copy_(head[torch.randperm(V, generator=torch.Generator().manual_seed(0))])
    better = noisy_copy(target, noise=0.1)
    gate = PromotionGate(margin=0.0)

    worse = gate.decide(scrambled, live, holdout)
    assert not worse.promote and worse.candidate_alpha < worse.live_alpha
    good = gate.decide(better, live, holdout)
    assert good.promote and good.candidate_alpha > good.live_alpha
    assert good.rows == sum(r.num_positions for r in holdout)
    assert gate.decide(copy.deepcopy(live), live, holdout).promote  # "not worse" includes equal
    # A margin tolerates a small loss, not a large one; no held-out rows means no decision.
    slack = worse.live_alpha - worse.candidate_alpha
    assert PromotionGate(margin=slack + 1e-3).decide(scrambled, live, holdout).promote
    assert not gate.decide(better, live, []).promote


def test_gate_judges_recent_traffic_after_a_shift():
    """Old traffic came from one target, the recent records from another: a gate weighing
    records alike keeps the draft of the old traffic; a short half-life follows the shift."""
    old_target, new_target = tiny_llama(V, 2, seed=0, sharpness=SHARP), tiny_llama(V, 2, seed=5, sharpness=SHARP)
    live, candidate = noisy_copy(old_target, noise=0.1), noisy_copy(new_target, noise=0.1)
    old = records(SpeculativeEngine(old_target, CharTokenizer(), live, EngineConfig(speculation="always", gamma=4)), 6, seed=8)
    new = records(SpeculativeEngine(new_target, CharTokenizer(), live, EngineConfig(speculation="always", gamma=4)), 2, seed=9)
    holdout, ages = old + new, [40, 35, 30, 25, 20, 15, 5, 0]  # oldest first, as the distiller keeps them

    alike = PromotionGate().decide(candidate, live, holdout, ages)
    assert not alike.promote and alike.candidate_alpha < alike.live_alpha
    recent = PromotionGate(half_life=4).decide(candidate, live, holdout, ages)
    assert recent.promote and recent.candidate_alpha > recent.live_alpha
    assert recent.rows == alike.rows == sum(r.num_positions for r in holdout)  # every row still scored
    assert PromotionGate(half_life=4).weights([0, 4, 8]) == [1.0, 0.5, 0.25]
    # Equal weights are the unweighted score; one weight per record.
    gate = PromotionGate(batch_size=3)
    assert gate.score(live, holdout, [2.0] * 8)[0] == pytest.approx(gate.score(live, holdout)[0], abs=1e-6)
    with pytest.raises(ValueError, match="one per record"):
        gate.score(live, holdout, [1.0])


def test_holdout_ages_count_records_taken_in_since_arrival():
    engine = make_engine(random_draft())
    distiller = OnlineDistiller(random_draft(), DistillConfig(holdout_fraction=0.5, holdout_size=2,
                                                              update_interval=100))
    distiller.add(records(engine, 5, seed=10))  # records 1, 3 and 5 are held out; the deque keeps 3 and 5
    assert len(distiller.holdout) == 2 and distiller.holdout_ages() == [2, 0]
    distiller.add(records(engine, 1, seed=11))  # a training record: everything held out ages by one
    assert distiller.holdout_ages() == [3, 1]


def test_lora_trains_only_adapters_and_exports_merged_live_layout():
    live = random_draft()
    before = weights(live.model)
    engine = make_engine(live)
    distiller = OnlineDistiller(live, DistillConfig(mode="lora", lora_rank=4, lr=1e-2, update_interval=4,
                                                    steps_per_update=3, holdout_fraction=0.0))
    trainable = [n for n, p in distiller.draft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in distiller.draft.named_parameters() if not p.requires_grad}

    (result,) = distiller.add(records(engine, 4, seed=5))
    assert result.steps == 3 and math.isfinite(result.loss)
    assert all(torch.equal(p, base[n]) for n, p in distiller.draft.named_parameters() if n in base)
    exported = distiller.export_state_dict()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in before.items()}
    assert any(not torch.equal(exported[k], before[k]) for k in before), "merged adapters should change the weights"
    assert all(torch.equal(v, live.model.state_dict()[k]) for k, v in before.items())  # live untouched
    # The plain candidate serves exactly what the adapted draft computes.
    fresh = records(engine, 2, seed=6)
    gate = PromotionGate()
    assert gate.evaluate(distiller.candidate(), fresh) == pytest.approx(gate.evaluate(distiller.draft, fresh), abs=1e-5)

def test_a_forced_partial_update_takes_its_share_of_the_steps():
    engine = make_engine(random_draft())
    distiller = OnlineDistiller(random_draft(), DistillConfig(update_interval=8, steps_per_update=4,
                                                              holdout_fraction=0.0))
    assert distiller.add(records(engine, 3, seed=12)) == []  # fewer than update_interval: waits
    assert distiller.maybe_update(force=True).steps == 2  # 3 of 8 records: ceil(4 * 3 / 8)
    distiller.add(records(engine, 1, seed=13))
    assert distiller.maybe_update(force=True).steps == 1  # never fewer than one
    assert [r.steps for r in distiller.add(records(engine, 8, seed=14))] == [4]  # a full update: all of them


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "tvd"])
def test_on_policy_ratio_one_without_on_policy_rows_is_a_finite_no_op(loss):
    plain = make_engine(None)  # no draft: no proposals, so no on-policy rows
    recs = records(plain, 4, seed=7)
    assert all(not r.on_policy_mask().any() for r in recs)
    live = random_draft()
    only_on_policy = OnlineDistiller(live, DistillConfig(loss=loss, on_policy_ratio=1.0, update_interval=4,
                                                         holdout_fraction=0.0, lr=1e-2, weight_decay=0.1, steps_per_update=1))
    before = weights(only_on_policy.draft)
    (result,) = only_on_policy.add(recs)
    assert result.loss == 0.0 and result.steps == 0 and result.skipped_steps == 1 and result.on_policy_rows == 0
    assert all(torch.equal(v, only_on_policy.draft.state_dict()[k]) for k, v in before.items())
    # Half on-policy: the all-rows half still trains, finitely.
    mixed = OnlineDistiller(live, DistillConfig(loss=loss, on_policy_ratio=0.5, update_interval=4,
                                                holdout_fraction=0.0, lr=1e-2, steps_per_update=1))
    (result,) = mixed.add(recs)
    assert result.steps == 1 and 0.0 < result.loss < math.inf
    assert all(torch.isfinite(p).all() for p in mixed.draft.parameters())
    assert any(not torch.equal(v, mixed.draft.state_dict()[k]) for k, v in before.items())


def test_on_policy_ratio_weights_the_on_policy_rows():
    engine = make_engine(random_draft())
    recs = records(engine, 3, seed=8)
    distiller = OnlineDistiller(random_draft(), DistillConfig(update_interval=100, holdout_fraction=0.0))
    batch = collate(recs, 1024)
    assert 0 < int(batch.on_policy.sum()) < batch.num_rows  # bonus positions are not on-policy

    with torch.no_grad():
        logits = student_logits(distiller.draft, batch)
        teacher = (batch.teacher_ids, batch.teacher_logprobs, batch.teacher_logsumexp)
        on, every = forward_kl(logits, *teacher, batch.on_policy), forward_kl(logits, *teacher)
    for r in (0.0, 0.3, 1.0):
        d = OnlineDistiller(random_draft(), DistillConfig(on_policy_ratio=r, lr=1e-9, update_interval=3,
                                                          holdout_fraction=0.0, batch_size=3))
        (result,) = d.add(recs)
        assert result.loss == pytest.approx((1 - r) * float(every) + r * float(on), rel=1e-4)


def test_distill_replay_through_redis_and_registry(redis_url, tmp_path):
    live = random_draft()
    engine = make_engine(live)
    registry = DraftRegistry(FileStore(tmp_path / "registry"))
    cfg = DistillConfig(lr=1e-2, steps_per_update=8, update_interval=4, holdout_fraction=0.25)
    lines = []
    with RecordBuffer(BufferConfig(redis_url=redis_url)) as buffer:
        summary = distill_replay(engine, prompts(12, seed=9), sampling(0), OnlineDistiller(live, cfg),
                                 PromotionGate.from_config(cfg), buffer, registry, cluster="tiny", window=5,
                                 log_line=lines.append)
        stats = buffer.stats("tiny")
    assert stats.length == 12 and stats.pending == 0 and stats.lag == 0
    assert summary["requests"] == 12 and summary["updates"] == 3 and summary["promotions"] >= 1
    assert [w["requests"] for w in summary["windows"]] == [5, 5, 2] and len(lines) == 3
    manifest = registry.live("tiny")
    assert manifest is not None and summary["live_version"] == manifest.version
    assert manifest.gate_alpha is not None and manifest.meta["loss_name"] == "fkl"
    _, published = registry.get("tiny", manifest.version)
    served = engine.draft.model.state_dict()
    assert engine.draft is not live and not engine.draft.training
    assert published.keys() == served.keys() and all(torch.equal(published[k], served[k]) for k in served)
    assert any(not torch.equal(v, served[k]) for k, v in live.model.state_dict().items())


def test_shortlist_draft_trains_with_a_finite_loss():
    engine = make_engine(random_draft())
    recs = records(engine, 8, seed=5)
    short = DraftModel(tiny_llama(V, 1, seed=1, sharpness=SHARP), shortlist=torch.arange(0, V, 2))
    distiller = OnlineDistiller(short, DistillConfig(update_interval=8, holdout_fraction=0.0, lr=1e-3))
    results = distiller.add(recs)
    assert results and all(math.isfinite(r.loss) for r in results)
