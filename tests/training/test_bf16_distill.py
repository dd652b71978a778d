"""Distilling a bf16 draft (ModelConfig.dtype "auto" on bf16 hardware): fp32 master weights, bf16 exports.

Measured on the tiny task below (160 records, 8 steps per update): at the default lr 1e-4 a
bf16 draft stepped directly in bf16 reached held-out forward KL 0.241 / gate α̂ 0.742 against
fp32's 0.205 / 0.764, because most AdamW steps are below half a bf16 ulp and vanish; through
fp32 master copies it reached 0.204 / 0.764, the fp32 result.
"""

from __future__ import annotations

import torch
from support.tiny import CharTokenizer, tiny_llama

from osd.config import EngineConfig, SamplingParams
from osd.decoding.engine import SpeculativeEngine
from osd.models.drafts import DraftModel, load_published_state, published_specs
from osd.registry import (
    DraftRegistry,
    FileStore,
    normalize_specs,
    spec_diff,
    tensor_specs,
)
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller
from trainers.gate import PromotionGate

V, SHARP = 32, 10.0


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(3, 8, (), generator=g)),), generator=g).tolist() for _ in range(n)]


def records(n: int, seed: int) -> list:
    target = tiny_llama(V, 2, seed=0, sharpness=SHARP).to(torch.bfloat16)
    engine = SpeculativeEngine(target, CharTokenizer(), DraftModel(tiny_llama(V, 1, seed=1, sharpness=SHARP).to(torch.bfloat16)),
                               EngineConfig(speculation="always", gamma=4))
    return [engine.generate(p, SamplingParams(max_tokens=16, temperature=1.0, seed=seed + i)).record
            for i, p in enumerate(prompts(n, seed))]


def bf16_draft() -> DraftModel:
    return DraftModel(tiny_llama(V, 1, seed=1, sharpness=SHARP).to(torch.bfloat16))


def test_bf16_draft_steps_through_fp32_masters_and_stays_bf16():
    live = bf16_draft()
    distiller = OnlineDistiller(live, DistillConfig(lr=1e-4, steps_per_update=4, update_interval=8, holdout_fraction=0.0))
    assert distiller._masters and all(m.dtype == torch.float32 for _, m in distiller._masters)
    assert {g["params"][0].dtype for g in distiller.optimizer.param_groups} == {torch.float32}
    start = [m.detach().clone() for _, m in distiller._masters]
    results = distiller.add(records(16, seed=100))
    assert len(results) == 2 and all(r.steps == 4 for r in results)
    for p, master in distiller._masters:
        assert p.dtype == torch.bfloat16 and torch.equal(p, master.to(torch.bfloat16))  # the draft is the masters, rounded
    moved = sum(int((m != m0).sum()) for (_, m), m0 in zip(distiller._masters, start))
    assert moved > 0.9 * sum(m.numel() for _, m in distiller._masters)  # small steps are kept, not rounded away
    assert all(v.dtype == torch.bfloat16 for v in distiller.export_state_dict().values())
    assert next(distiller.candidate().parameters()).dtype == torch.bfloat16


def test_fp32_draft_has_no_masters():
    distiller = OnlineDistiller(DraftModel(tiny_llama(V, 1, seed=1)), DistillConfig())
    assert distiller._masters == []


def test_bf16_training_matches_fp32_and_publishes_into_a_bf16_replica(tmp_path):
    train, held = records(48, seed=100), records(16, seed=900)
    gate = PromotionGate()
    cfg = DistillConfig(lr=1e-3, steps_per_update=8, update_interval=8, holdout_fraction=0.0)
    fp32 = OnlineDistiller(DraftModel(tiny_llama(V, 1, seed=1, sharpness=SHARP)), cfg)
    bf16 = OnlineDistiller(bf16_draft(), cfg)
    fp32.add(train)
    bf16.add(train)
    a32, a16 = gate.evaluate(fp32.candidate(), held), gate.evaluate(bf16.candidate(), held)
    assert a16 > gate.evaluate(bf16_draft(), held) + 0.1
    assert abs(a16 - a32) < 0.02, (a16, a32)

    template = bf16_draft()  # the replica's draft, built the same way
    state = bf16.export_state_dict()
    assert not spec_diff(tensor_specs(state), normalize_specs(published_specs(template, state)))
    registry = DraftRegistry(FileStore(tmp_path / "registry"))
    version = registry.publish("global", state).version
    loaded = registry.load_validated("global", version, tensor_specs(template.model.state_dict()))
    served = load_published_state(template, loaded)
    assert all(torch.equal(served.model.state_dict()[k], v) for k, v in state.items())
