"""Adaptive candidate length (osd/decoding/stopping.py) and SpecDec++'s acceptance head, on tiny models."""

from __future__ import annotations

import pytest
import torch
from support.lossless import assert_distributed_as_target, sample_outputs
from pydantic import ValidationError
from support.tiny import CharTokenizer, hf_greedy, noisy_copy, tiny_llama

from osd.config import EngineConfig, SamplingParams
from osd.decoding.engine import SpeculativeEngine
from osd.decoding.stopping import (
    AcceptanceHead,
    LengthPolicy,
    ScheduleLength,
    make_length_policy,
)
from osd.models.drafts import DraftModel
from trainers.acceptance_head import (
    head_calibration,
    head_examples,
    train_acceptance_head,
)

V = 32


def engine_with(policy: str, draft_noise: float = 0.6, **config) -> SpeculativeEngine:
    target = tiny_llama(V, 2, seed=0, sharpness=4.0)
    return SpeculativeEngine(target, CharTokenizer(), noisy_copy(target, noise=draft_noise),
                             EngineConfig(speculation="always", gamma=3, length_policy=policy, max_gamma=8, **config))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(2, 7, (), generator=g)),), generator=g).tolist() for _ in range(n)]


def round_lengths(out) -> list[int]:
    return [len(r.proposed) for r in out.record.rounds]


@pytest.mark.parametrize("policy, extra", [("schedule", {}),
                                           ("confidence", {"confidence_threshold": 0.09}),  # ~ the median top-1 q
                                           ("head", {})])
def test_adaptive_greedy_equals_the_target(policy, extra):
    engine = engine_with(policy, **extra)
    if policy == "head":
        engine.draft.acceptance_head = train_acceptance_head(engine.draft, records(engine, 12), steps=50)
    lengths = set()
    for p in prompts(6):
        out = engine.generate(p, SamplingParams(max_tokens=20))
        assert out.output_ids == hf_greedy(engine.target, p, 20)
        lengths |= set(round_lengths(out))
    assert len(lengths) > 1, "an adaptive policy should vary the round length"
    assert max(lengths) <= 8


def records(engine: SpeculativeEngine, n: int) -> list:
    return [engine.generate(p, SamplingParams(max_tokens=24, temperature=1.0, seed=i)).record
            for i, p in enumerate(prompts(n, seed=1))]


def test_schedule_is_plus_two_minus_one():
    s = ScheduleLength(gamma=3)
    lengths = []
    for proposed_accepted in [(3, 3), (5, 5), (7, 2), (6, 0), (5, 5)]:
        lengths.append(s.begin_round(cap=8))
        s.observe(*proposed_accepted)
    assert lengths == [3, 5, 7, 6, 5]
    assert s.begin_round(cap=8) == 7 and s.begin_round(cap=4) == 4  # the cap binds
    for _ in range(10):
        s.observe(5, 0)
    assert s.begin_round(cap=8) == 1  # never below one


def test_confidence_threshold_sets_the_round_length():
    always_stop = engine_with("confidence", confidence_threshold=0.999)
    out = always_stop.generate([1, 2, 3], SamplingParams(max_tokens=20))
    assert set(round_lengths(out)) == {1}
    never_stop = engine_with("confidence", confidence_threshold=1e-6)
    lengths = round_lengths(never_stop.generate([1, 2, 3], SamplingParams(max_tokens=60)))
    assert set(lengths[: len(lengths) // 2]) == {8}  # the last rounds are cut by max_tokens


@pytest.mark.parametrize("policy", ["schedule", "confidence", "head"])
def test_stopping_never_sees_the_target(policy):
    """The same draft and prompt under two different targets: the first round (nothing verified
    yet) proposes the same tokens, as many of them. Only the draft's own state decides; the
    target's verdicts reach a policy only through observe, after verifying."""
    draft = noisy_copy(tiny_llama(V, 2, seed=0, sharpness=4.0), noise=0.6)
    draft.acceptance_head = AcceptanceHead(draft.config.hidden_size)
    config = EngineConfig(speculation="always", gamma=3, length_policy=policy, max_gamma=8, confidence_threshold=0.09, head_threshold=0.5)
    first_rounds = []
    for target_seed in (0, 5):
        engine = SpeculativeEngine(tiny_llama(V, 2, seed=target_seed, sharpness=4.0), CharTokenizer(), draft, config)
        out = engine.generate([3, 1, 4, 1, 5], SamplingParams(max_tokens=12))
        first_rounds.append(out.record.rounds[0].proposed)
    assert first_rounds[0] == first_rounds[1]
    assert 1 <= len(first_rounds[0]) <= 8


def test_sampled_output_follows_the_target_under_confidence_stopping():
    target = tiny_llama(vocab=8, sharpness=4.0)
    draft = noisy_copy(target, noise=2.0)
    params = dict(max_tokens=4, temperature=0.7, top_p=0.9, top_k=0)
    engine = SpeculativeEngine(target, CharTokenizer(), draft,
                               EngineConfig(speculation="always", gamma=2, length_policy="confidence", confidence_threshold=0.34,
                                            max_gamma=2))
    counts, outs = sample_outputs(engine, [1, 2], params, 1200)
    lengths = {len(r.proposed) for o in outs for r in o.record.rounds}
    assert_distributed_as_target(counts, 1200, target, draft.model, [1, 2], SamplingParams(**params))
    assert lengths == {1, 2}  # stopping really varied the rounds


def test_acceptance_head_learns_from_records():
    engine = engine_with("fixed")
    train, held = records(engine, 16), [engine.generate(p, SamplingParams(max_tokens=24)).record
                                        for p in prompts(8, seed=2)]
    head = train_acceptance_head(engine.draft, train, greedy=True, steps=300)
    calib = head_calibration(head, head_examples(engine.draft, held, greedy=True))
    assert 0.2 < calib["mean_label"] < 0.95  # the draft is right sometimes, wrong sometimes
    assert calib["brier"] < calib["brier_constant"] - 0.01, calib
    # Labels are the target's greedy agreement: a draft equal to the target gets all ones.
    same = DraftModel(engine.target)
    assert bool((head_examples(same, held, greedy=True).labels == 1).all())
    sampled = head_examples(engine.draft, held, greedy=False)
    assert 0 < float(sampled.labels.mean()) < 1 and float(sampled.labels.max()) <= 1.0


def test_head_policy_stops_earlier_as_the_threshold_drops():
    engine = engine_with("head")
    head = train_acceptance_head(engine.draft, records(engine, 12), steps=100)
    engine.draft.acceptance_head = head
    mean_len = {}
    for threshold in (0.2, 0.95):
        engine.config = engine.config.model_copy(update={"head_threshold": threshold})
        outs = [engine.generate(p, SamplingParams(max_tokens=20)) for p in prompts(4)]
        mean_len[threshold] = sum(o.stats.proposed for o in outs) / sum(o.stats.rounds for o in outs)
    assert mean_len[0.2] < mean_len[0.95]


def test_head_policy_without_a_head_drafts_fixed_gamma():
    assert type(make_length_policy("head", 3, 0.5, head=None)) is LengthPolicy
    engine = engine_with("head")  # no head trained yet: a fresh service
    out = engine.generate([1, 2, 3], SamplingParams(max_tokens=30))
    assert set(round_lengths(out)[:-1]) == {3}


def test_return_hidden_gives_the_same_logits():
    draft = noisy_copy(tiny_llama(V, 2, seed=0), noise=0.3)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = draft(ids, logits_to_keep=2)
        logits, hidden = draft(ids, logits_to_keep=2, return_hidden=True)
    assert torch.allclose(plain, logits, atol=1e-5) and hidden.shape == (1, 2, draft.config.hidden_size)


def test_adaptive_policy_needs_a_cap_that_covers_gamma():
    with pytest.raises(ValidationError, match="max_gamma"):
        EngineConfig(speculation="always", gamma=6, max_gamma=4, length_policy="schedule")
    assert EngineConfig(speculation="always", gamma=6, max_gamma=4).round_cap == 6  # fixed ignores max_gamma
    with pytest.raises(ValidationError, match="chains only"):
        EngineConfig(speculation="always", length_policy="confidence", tree={"shape": "static"})


def test_the_head_trains_online_and_ships_with_the_draft(tmp_path):
    """DistillConfig(acceptance_head=...) refits the head on every update; it is published with the
    weights, and a replica syncing from the registry serves 'head' stopping with it."""
    from osd.registry import DraftMismatchError, DraftRegistry, FileStore
    from osd.serving.core import ServingCore
    from trainers.config import DistillConfig
    from trainers.distiller import OnlineDistiller

    engine = engine_with("head")
    distiller = OnlineDistiller(engine.draft, DistillConfig(acceptance_head="greedy", acceptance_head_steps=20,
                                                            update_interval=4, holdout_fraction=0.0))
    assert distiller.add(records(engine, 4)) and distiller.acceptance_head is not None
    state = distiller.export_state_dict()
    assert any(k.startswith("acceptance_head.") for k in state)

    registry = DraftRegistry(FileStore(tmp_path))
    registry.publish("global", state)
    core = ServingCore(engine, "tiny", registry=registry)
    assert engine.draft.acceptance_head is None  # a fresh replica: no head, so fixed γ
    core.sync_from_registry()
    live = core.live_draft().draft
    assert live.acceptance_head is not None
    assert all(torch.equal(v, distiller.acceptance_head.state_dict()[k])
               for k, v in live.acceptance_head.state_dict().items())
    engine.config = engine.config.model_copy(update={"head_threshold": 0.3})
    out = engine.generate([1, 2, 3], SamplingParams(max_tokens=30), draft=live)
    assert set(round_lengths(out)[:-1]) != {3}  # the head, not the fixed-γ fallback, sized the rounds

    # A later version without a head drops it; a head of the wrong shape is refused.
    registry.publish("global", engine.draft.model.state_dict())
    core.sync_from_registry()
    assert core.live_draft().draft.acceptance_head is None
    bad = dict(state) | {"acceptance_head.net.0.weight": torch.zeros(4, 4)}
    with pytest.raises(DraftMismatchError, match="acceptance_head"):
        core.swap_draft(99, bad)
