"""`osd bench distill` end to end on tiny random models: every phase, the JSON, the report, the plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.tiny import CharTokenizer, tiny_llama

from bench.distill import (
    CONSTRUCTIONS,
    DistillBenchSettings,
    build_shortlist,
    collect_records,
    load_records,
    make_draft,
    plot_learning_curve,
    predicted_speedup,
    render_markdown,
    run_distill_bench,
    save_records,
    score_draft,
)
from osd.models.drafts import DraftModel, build_self_draft
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller
from trainers.gate import PromotionGate

V = 64


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(3, 8, (), generator=g)),), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def result(redis_server):
    target = tiny_llama(V, layers=4, seed=0, sharpness=10.0)
    settings = DistillBenchSettings(
        max_tokens=8, constructions=("first2", "kangaroo", "first2_lora"), shortlist_size=16, update_interval=2,
        steps_per_update=1, batch_size=4, lr_grid=(1e-2, 3e-2), lora_lr_grid=(1e-2, 3e-2), sweep_records=4,
        sweep_val_records=2, e2e_prompts=2, e2e_max=3, window=2, timing_context=32, timing_reps=3)
    return run_distill_bench(target, CharTokenizer(), prompts(6, 1), prompts(3, 2), settings,
                             redis_url=redis_server.url, progress=False, log=lambda line: None)


def test_result_has_every_phase_with_sane_values(result):
    json.dumps(result, allow_nan=False)  # plain JSON, no tensors, no inf/NaN
    rec = result["records"]
    assert rec["records"] == 9 and rec["positions"] == 9 * 8
    assert rec["bytes_per_position"] > rec["teacher_row_bytes"] > 0  # prompt + header on top of the rows

    b = result["constructions"]
    assert [v["name"] for v in b["variants"]] == [f"{c}+{h}" for c in ("first2", "kangaroo", "first2_lora")
                                                  for h in ("full", "shortlist")]
    assert {sw["family"] for sw in b["lr_sweeps"]} == {"full", "lora"}
    for v in b["variants"]:
        for key in ("untrained", "heldout", "trained_on"):
            assert 0.0 <= v[key]["alpha_hat"] <= 1.0 and 0.0 <= v[key]["top1"] <= v[key]["top4"] <= 1.0
        assert v["draft_step_ms"] > 0 and v["c"] > 0 and v["gamma"] in (2, 3, 4) and v["predicted_speedup"] > 0
        assert v["records_trained"] == 4  # 6 stream records, 2 held for the gate
    measured = [v for v in b["variants"] if v["e2e"]]
    assert len(measured) == 3 and all(v["e2e"]["same_output"] for v in measured)  # greedy stays lossless
    assert all(v.get("e2e_skipped") for v in b["variants"] if not v["e2e"])
    assert b["winner"] == max(measured, key=lambda v: v["e2e"]["tokens_per_s"])["name"]
    kangaroo = next(v for v in b["variants"] if v["construction"] == "kangaroo")
    first2 = next(v for v in b["variants"] if v["construction"] == "first2")
    assert kangaroo["trainable_params"] < first2["trainable_params"]

    on = result["online"]
    assert on["variant"] == b["winner"] and on["requests"] == 6
    assert on["updates"] == len(on["learning_curve"]) - 1 >= 1  # a point per update, plus the untrained start
    assert [p["records_trained"] for p in on["learning_curve"]] == sorted(p["records_trained"] for p in on["learning_curve"])
    assert on["learning_curve"][-1]["records_trained"] == on["records_trained"]
    assert sum(w["requests"] for w in on["windows"]) == 6 and len(on["windows"]) >= math.ceil(6 / 2)
    for phase in ("before", "after"):
        assert on[phase]["engine"]["same_output"] and on[phase]["engine"]["tokens_per_s"] > 0
        assert on[phase]["engine"]["alpha_hat"] is not None
    assert on["trainer_s_per_update"] > 0 and on["stream_bytes_per_position"] > 0


def test_report_and_plot(result, tmp_path):
    md = render_markdown(result)
    assert "### Draft constructions" in md and "### Online run" in md and "### What limits α̂" in md
    assert "Lead:" in md  # the placeholder the lead edits
    path = plot_learning_curve(result, tmp_path / "curve.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_records_cache_roundtrip_and_shortlist(tmp_path):
    target = tiny_llama(V, layers=2, seed=0)
    records, timing = collect_records(target, CharTokenizer(), prompts(3, 5), max_tokens=6, progress=False)
    assert len(timing) == 3 and all(t["tokens"] == 6 for t in timing)
    path = save_records(tmp_path / "r.osdr", records, {"k": 1})
    back, meta = load_records(path)
    assert meta == {"k": 1} and [r.output_ids for r in back] == [r.output_ids for r in records]
    assert torch.equal(back[0].teacher_token_ids, records[0].teacher_token_ids)
    shortlist = build_shortlist(records, 20, V)
    assert shortlist.numel() == 20 and set(t for r in records for t in r.output_ids) <= set(shortlist.tolist())


def test_score_draft_alpha_is_the_gates(tmp_path):
    target = tiny_llama(V, layers=4, seed=0, sharpness=10.0)
    records, _ = collect_records(target, CharTokenizer(), prompts(3, 6), max_tokens=6, progress=False)
    draft = make_draft(target, CONSTRUCTIONS["first2"])
    assert score_draft(draft, records)["alpha_hat"] == pytest.approx(PromotionGate().evaluate(draft, records), abs=1e-6)
    assert predicted_speedup(0.0, 4, 0.1, 1.5) == pytest.approx(1 / 1.9)
    assert predicted_speedup(0.5, 2, 0.0, 1.0) == pytest.approx(1.75)


def test_freeze_layers_trains_only_the_layers_above():
    target = tiny_llama(V, layers=4, seed=0, sharpness=10.0)
    records, _ = collect_records(target, CharTokenizer(), prompts(4, 7), max_tokens=6, progress=False)
    draft = DraftModel(build_self_draft(target, [0, 1, 3]))
    cfg = DistillConfig(lr=1e-2, update_interval=4, holdout_fraction=0.0, freeze_layers=[0, 1],
                        freeze_embeddings=True, freeze_head=True)
    distiller = OnlineDistiller(draft, cfg)
    before = {k: v.clone() for k, v in distiller.draft.model.state_dict().items()}
    assert len(distiller.add(records)) == 1
    after = distiller.draft.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.2.") or k == "model.norm.weight" for k in changed)
    with pytest.raises(ValueError, match="names a layer the draft lacks"):
        OnlineDistiller(draft, DistillConfig(freeze_layers=[3]))
