"""The eagle head learning online: features recorded from serving, the eagle distiller, the gate,
the registry and a replica's hot-swap (issue 15)."""

from __future__ import annotations

import time

import pytest
import torch
from support.tiny import CharTokenizer, hf_greedy, tiny_llama

from osd.config import EngineConfig, SamplingParams
from osd.data.buffer import BufferConfig, RecordBuffer
from osd.data.codec import decode_record, encode_record
from osd.decoding.eagle import EagleHead
from osd.decoding.engine import SpeculativeEngine
from osd.models.drafts import load_published_state, published_specs
from osd.registry import DraftMismatchError, DraftRegistry, FileStore
from osd.serving.core import ServingCore
from trainers.config import DistillConfig, TrainerSettings
from trainers.eagle import EagleDistiller
from trainers.gate import PromotionGate
from trainers.loop import TrainerLoop

VOCAB = 48


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(4, 9, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def fresh_features(target, ids: list[int], layers: list[int]) -> torch.Tensor:
    """[len(ids), F]: the target's outputs at ``layers`` from one uncached forward."""
    with torch.no_grad():
        hs = target(torch.tensor([ids]), output_hidden_states=True).hidden_states  # [0] = embeddings
    return torch.cat([hs[i + 1][0] for i in layers], dim=-1)


def serve(target, head, ps, **config) -> list:
    engine = SpeculativeEngine(target, CharTokenizer(), head,
                               EngineConfig(speculation="always", gamma=3, record=True, **config))
    return [engine.generate(p, SamplingParams(max_tokens=24, temperature=0.0)) for p in ps]


@pytest.fixture(scope="module")
def served():
    """Records of 60 requests served by an untrained eagle head: the traffic the trainer learns from."""
    target = tiny_llama(VOCAB, layers=4, seed=0, sharpness=4.0)
    head = EagleHead(target)
    return target, head, [g.record for g in serve(target, head, prompts(60, 0))]


def test_records_carry_the_verification_forwards_features(served):
    target, head, records = served
    for rec in records[:6]:
        tokens = rec.prompt_ids + rec.output_ids
        want = fresh_features(target, tokens, head.feature_layers)[rec.feature_start : len(tokens) - 1]
        assert rec.feature_start == 0 and rec.target_features.dtype == torch.float16
        torch.testing.assert_close(rec.target_features.float(), want.half().float(), atol=2e-3, rtol=1e-2)
        assert torch.equal(decode_record(encode_record(rec)).target_features, rec.target_features)  # round trip


def test_a_record_keeps_a_bounded_prompt_and_only_the_sampled_share_carries_features(served):
    target, head, _ = served
    long_prompt = list(range(20))
    gens = serve(target, head, [long_prompt] * 4, feature_context=5, record_features=0.5)
    carried = [g.record.target_features is not None for g in gens]
    assert carried == [True, False, True, False]
    rec = gens[0].record
    assert rec.feature_start == 20 - 1 - 5
    assert rec.target_features.shape == (5 + len(rec.output_ids), head.feature_size)


def test_the_eagle_distiller_learns_from_stored_features_and_the_gate_sees_it(served):
    _, head, records = served
    config = DistillConfig(update_interval=8, steps_per_update=16, batch_size=8, lr=3e-3, holdout_fraction=0.2)
    live_weights = {k: v.clone() for k, v in head.state_dict().items()}
    distiller = EagleDistiller(head, config)
    results = distiller.add(records)
    assert len(results) >= 5 and results[-1].loss < results[0].loss
    gate = PromotionGate()
    decision = gate.decide(distiller.candidate(), head, distiller.holdout)
    print(f"eagle distiller: loss {results[0].loss:.3f} -> {results[-1].loss:.3f}; held-out α̂ "
          f"{decision.live_alpha:.3f} -> {decision.candidate_alpha:.3f} over {decision.rows} rows")
    assert decision.promote and decision.rows >= 100
    assert decision.candidate_alpha > decision.live_alpha + 0.1
    # borrowed target parts never train, and the live head was not touched
    assert not any(p.requires_grad for m in head._target for p in m.parameters())
    assert all(torch.equal(v, live_weights[k]) for k, v in head.state_dict().items())


def test_a_published_version_hot_swaps_into_a_replica_and_stays_lossless(served, tmp_path):
    target, head, records = served
    distiller = EagleDistiller(head, DistillConfig(update_interval=8, steps_per_update=16, lr=3e-3))
    distiller.add(records)
    registry = DraftRegistry(FileStore(tmp_path))
    engine = SpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always", gamma=3))
    core = ServingCore(engine, "tiny", registry=registry)
    registry.publish("global", distiller.export_state_dict())
    live = core.sync_from_registry()
    assert live.version == 1 and isinstance(live.draft, EagleHead) and live.draft is not head
    assert live.draft._target[0] is head._target[0]  # the copy borrows the replica's target, not a copy of it
    held_out = prompts(8, 1)
    before = after = 0
    for p in held_out:
        out = core.complete({"prompt": p, "max_tokens": 16, "temperature": 0})
        assert out["osd"]["draft_version"] == 1
        assert out["choices"][0]["text"] == CharTokenizer().decode(hf_greedy(target, p, 16))
        after += out["osd"]["accepted"]
        before += engine.generate(p, SamplingParams(max_tokens=16, temperature=0.0), draft=head).stats.accepted
    assert after > before


def test_a_version_of_another_shape_or_other_layers_is_refused_and_the_live_head_stays(served, tmp_path):
    target, head, _ = served
    registry = DraftRegistry(FileStore(tmp_path))
    engine = SpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always", gamma=3))
    core = ServingCore(engine, "tiny", registry=registry)
    registry.publish("global", EagleDistiller(head, DistillConfig()).export_state_dict())
    assert core.sync_from_registry().version == 1
    assert head.feature_layers == [0, 1]  # EAGLE-3's choice, deduplicated on a 4-layer target
    three_layers = EagleHead(target, feature_layers=[0, 1, 2])  # a fuse of another shape
    registry.publish("global", EagleDistiller(three_layers, DistillConfig()).export_state_dict())
    with pytest.raises(DraftMismatchError):
        core.sync_from_registry()
    other_layers = EagleHead(target, feature_layers=[1, 2])  # same shapes, other target layers
    state = EagleDistiller(other_layers, DistillConfig()).export_state_dict()
    with pytest.raises(ValueError, match="target layers"):
        load_published_state(head, state)
    registry.publish("global", state)
    with pytest.raises(DraftMismatchError, match="target layers"):
        core.sync_from_registry()
    assert core.live_draft("global").version == 1
    assert published_specs(head, state).keys() == state.keys()


def test_the_trainer_loop_distils_an_eagle_head_from_the_redis_buffer(served, redis_url, tmp_path):
    """Records with features → the real Redis buffer → TrainerLoop (EagleDistiller, gate) → registry → a replica."""
    target, head, records = served
    bconf = BufferConfig(redis_url=redis_url)
    with RecordBuffer(bconf) as producer:
        for rec in records:
            producer.push(rec)
    registry = DraftRegistry(FileStore(tmp_path))
    settings = TrainerSettings(poll_interval_s=0.05, read_count=16, flush_idle_s=0.01, pause_when_busy=False)
    distill = DistillConfig(update_interval=8, steps_per_update=16, lr=3e-3, holdout_fraction=0.2)
    loop = TrainerLoop(head, RecordBuffer(bconf), registry, distill, settings)
    assert isinstance(loop.distiller, EagleDistiller)
    deadline = time.monotonic() + 120
    while loop.status()["acked"] < len(records):
        assert time.monotonic() < deadline, loop.status()
        loop.step()
    assert loop.counters["promotions"] >= 1 and registry.live("global") is not None
    engine = SpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always", gamma=3))
    live = ServingCore(engine, "tiny", registry=registry).sync_from_registry()
    assert isinstance(live.draft, EagleHead) and live.version == registry.live("global").version
