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


# --------------------------------------------------------------------------- `osd bench eagle` (bench/eagle_curve.py)


def test_sparse_ttt_loss_is_trainers_ttt_loss():
    """Steps ≥ 2 skip the positions no loss reaches and logits are taken only at teacher rows: same loss, also
    for prompts much longer than the output (where the steps start late)."""
    from bench.eagle_curve import ttt_loss_sparse
    from osd.decoding.eagle import EagleHead, FeatureCapture
    from trainers.eagle import record_features, ttt_loss

    target = tiny_llama(V, layers=4, seed=0, sharpness=4.0)
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(0, V, (n,), generator=g).tolist() for n in (1, 2, 5, 14, 20)]
    records, _ = collect_records(target, CharTokenizer(), ps, max_tokens=5, progress=False)
    torch.manual_seed(0)
    head = EagleHead(target)
    capture = FeatureCapture(target, head.feature_layers)
    for rec in records:
        features = record_features(target, capture, rec)
        for steps in (1, 3, 4):
            want, got = ttt_loss(head, rec, features, steps=steps), ttt_loss_sparse(head, rec, features, steps)
            assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5), (len(rec.prompt_ids), steps)


def test_greedy_records_are_the_engines_with_their_features():
    from bench.eagle_curve import greedy_records
    from osd.decoding.eagle import FeatureCapture
    from trainers.eagle import record_features

    target = tiny_llama(V, layers=4, seed=0, sharpness=10.0)
    ps = prompts(5, 8)
    want, _ = collect_records(target, CharTokenizer(), ps, max_tokens=7, progress=False)
    eos = {want[0].output_ids[2]}  # cut one record early
    got, feats = greedy_records(target, ps, 7, 64, eos, batch_size=3, feature_layers=[1, 2])
    capture = FeatureCapture(target, [1, 2])
    for a, b, f in zip(got, want, feats, strict=True):
        cut = next((i + 1 for i, t in enumerate(b.output_ids) if t in eos), len(b.output_ids))
        assert a.output_ids == b.output_ids[:cut]
        torch.testing.assert_close(a.teacher_logsumexp, b.teacher_logsumexp[:cut], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f, record_features(target, capture, a), atol=1e-5, rtol=1e-4)


def test_replayed_rounds_count_like_the_engine():
    from bench.eagle_curve import simulate_rounds

    # one record of 7 rows; ranks[0][s-1][row]: step s's rank of the target's token (row 0 is the prefill's)
    ranks = [[[0, 1, 0, 0, 0, 0, 0], [0, 0, 3, 0, 0, 0, 0]]]
    # γ=2 chain: row 1 rejected (0 accepted); from row 2 both (2); from row 5 room for one draft (1) → 1 + 3/3
    assert simulate_rounds(ranks, [1, 1]) == pytest.approx(2.0)
    # widths [2, 1]: from row 1 the rank-1 token is in the tree, step 2 misses (1); from row 3 both (2); row 6 has
    # no room to draft: plain decoding, not a round → 1 + 3/2
    assert simulate_rounds(ranks, [2, 1]) == pytest.approx(2.5)
    # a self-draft: one list serves every step; from row 2, four drafts fit (rows 2-5) → 1 + 4/2
    assert simulate_rounds([ranks[0][:1]], [1, 1, 1, 1]) == pytest.approx(3.0)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_eagle_curve_end_to_end(tmp_path, one_thread):
    from bench.eagle_curve import (
        EagleCurveSettings,
        HeldOut,
        plot_curves,
        render_markdown,
        run_eagle_curve,
    )

    target = tiny_llama(V, layers=4, seed=0, sharpness=10.0)
    stream, _ = collect_records(target, CharTokenizer(), prompts(10, 11), max_tokens=8, progress=False)
    held_prompts = {"a": prompts(3, 12), "b": prompts(3, 13)}
    heldout = {k: HeldOut(collect_records(target, CharTokenizer(), p, max_tokens=8, progress=False)[0], p)
               for k, p in held_prompts.items()}
    s = EagleCurveSettings(max_tokens=8, points={"domain": (4, 8), "mixed": (10,)}, eagle_lr=3e-3, offline_epochs=1,
                           first2_lr=3e-3, update_interval=2, steps_per_update=1, batch_size=4, chain_prompts=1,
                           e2e_prompts=1, shortlist_size=16, timing_context=32, timing_reps=4)
    result = run_eagle_curve(target, CharTokenizer(), {"domain": stream, "mixed": stream}, heldout,
                             {"domain": ["a"], "mixed": ["a", "b"]}, s, progress=False, log=lambda line: None)
    json.dumps(result, allow_nan=False)
    for name, n in (("domain", [4, 8]), ("mixed", [10])):
        c = result["curves"][name]
        assert [p["records"] for p in c["points"]] == n
        for p in c["points"]:
            for draft in ("eagle", "first2_frozen"):
                for k, h in p[draft]["heldout"].items():
                    assert 0 <= h["top1"] <= h["top4"] <= 1 and 0 <= h["alpha_hat"] <= 1
                    assert all(1 <= h["simulated"][m] <= 5 for m in ("chain", "tree"))
                    assert ("engine" in h) == (k in c["heldout_sets"])
            assert len(p["eagle"]["heldout"]["a"]["top1_by_step"]) == 4
        assert {"eagle", "first2_frozen", "eagle+shortlist", "first2_frozen+shortlist"} <= set(c["cost"]["variants"])
        assert all(v["c"] > 0 for v in c["cost"]["variants"].values()), c["cost"]
        e2e = c["e2e"]
        assert e2e["target"]["speedup_vs_target"] == pytest.approx(1.0)
        assert {"eagle+static_tree", "eagle+dynamic_tree", "first2_frozen+dynamic_tree"} <= set(e2e)
        assert all(v["same_output"] and v["identical_prompts"] == v["prompts"] for v in e2e.values())  # greedy, fp32
        replay = c["replay_epochs"]["rows"]
        assert [x["epoch"] for x in replay] == [1] and set(replay[0]["heldout"]) == {"a", "b"}
        assert ("val_top1" in replay[0]) == (name == "domain")  # the domain stream has records past its last N
    assert {"top1", "tree_acceptance", "chain_acceptance", "speedup"} <= set(result["aims"])
    md = render_markdown(result)
    assert "### domain stream" in md and "### Aims (issue 15)" in md
    assert plot_curves(result, tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
