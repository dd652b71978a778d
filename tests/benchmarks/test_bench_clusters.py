"""`osd bench clusters`' pure parts on tiny random models: the mixed stream, per-cluster training and
routed scoring with a fake router, the JSON and the markdown."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from support.tiny import CharTokenizer, tiny_llama

from bench.clusters import (
    ClustersBenchSettings,
    generate_records,
    mixed_stream,
    render_markdown,
    routed_alpha,
    run_clusters_bench,
    train_online,
)
from osd.models.drafts import DraftModel, build_self_draft
from trainers.gate import PromotionGate

V = 64
CATS = ("low", "high")


def questions(per_category: int = 10) -> list[dict]:
    return [{"question_id": 100 * c + i, "category": cat, "turns": [f"{cat} {i}"]}
            for c, cat in enumerate(("a", "b", "c")) for i in range(per_category)]


def test_mixed_stream_is_deterministic_balanced_and_disjoint():
    qs = questions()
    stream, held = mixed_stream(qs, ["a", "c"], 4, 3, seed=0)
    assert mixed_stream(qs, ["a", "c"], 4, 3, seed=0) == (stream, held)  # same seed, same stream
    assert [q["question_id"] for q in mixed_stream(qs, ["a", "c"], 4, 3, seed=1)[0]] != [q["question_id"] for q in stream]
    assert Counter(q["category"] for q in stream) == {"a": 4, "c": 4}
    assert Counter(q["category"] for q in held) == {"a": 3, "c": 3}
    ids = [q["question_id"] for q in stream]
    assert sorted(ids) == [0, 1, 2, 3, 200, 201, 202, 203]  # each category's first N
    assert [q["question_id"] for q in held] == [7, 8, 9, 207, 208, 209]  # its last M, never in the stream
    assert ids != sorted(ids)  # actually mixed
    with pytest.raises(ValueError, match="must not exceed"):
        mixed_stream(qs, ["a"], 8, 3)
    with pytest.raises(ValueError, match="distinct"):
        mixed_stream(qs, ["a", "a"], 1, 1)


def prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(lo, hi, (int(torch.randint(3, 7, (), generator=g)),), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def bench():
    """Two 'categories' in disjoint token ranges; the fake router files 'low' prompts under c1, 'high' under c0,
    except one low stream prompt it misroutes (purity < 1)."""
    target = tiny_llama(V, layers=4, seed=0, sharpness=10.0)
    base = DraftModel(build_self_draft(target, 2)).eval()
    s = ClustersBenchSettings(categories=CATS, stream_per_category=4, heldout_per_category=2, max_tokens=6,
                              update_interval=2, steps_per_update=1, batch_size=4, lr=1e-2)
    stream_p = prompts(4, 0, 32, 1) + prompts(4, 32, V, 2)
    held_p = prompts(2, 0, 32, 3) + prompts(2, 32, V, 4)
    order = [0, 4, 5, 1, 2, 6, 7, 3]  # a mixed stream
    stream_p = [stream_p[i] for i in order]
    stream_labels = [CATS[i >= 4] for i in order]
    records, _ = generate_records(target, CharTokenizer(), base, stream_p + held_p, s, progress=False)
    misrouted = tuple(stream_p[0])  # a 'low' prompt
    route = lambda ids: "c0" if tuple(ids) == misrouted or ids[0] >= 32 else "c1"  # noqa: E731
    result = run_clusters_bench(base, records[:8], stream_labels, records[8:], ["low"] * 2 + ["high"] * 2, route, s,
                                progress=False, log=lambda line: None)
    return base, records, stream_labels, route, s, result


def test_result_is_plain_json_with_every_arm(bench):
    base, records, stream_labels, route, s, result = bench
    json.dumps(result, allow_nan=False)
    assert [c["category"] for c in result["categories"]] == list(CATS)
    for c in result["categories"]:
        assert c["heldout_records"] == 2 and c["stream_records"] == 4 and c["rows"] == 2 * 6
        for arm in ("untrained", "global", "per_cluster", "oracle"):
            assert 0.0 <= c[arm] <= 1.0
        assert c["gain"] == pytest.approx(c["per_cluster"] - c["global"])
    assert result["mean"]["gain"] == pytest.approx(sum(c["gain"] for c in result["categories"]) / 2)
    assert result["aim"]["met"] == (result["mean"]["gain"] >= 0.05)
    # (b), (c) and (d) train on the same 8 records, none held back
    assert result["records_trained"] == {"global": 8, "per_cluster": 8, "oracle": 8}
    r = result["router"]
    assert r["stream_assignments"] == [route(rec.prompt_ids) for rec in records[:8]]
    assert r["purity_stream"] == pytest.approx(7 / 8) and r["purity_heldout"] == 1.0
    by_id = {c["cluster"]: c for c in result["clusters"]}
    assert list(by_id) == ["c0", "c1"]
    assert by_id["c0"]["stream_composition"] == {"high": 4, "low": 1}
    assert by_id["c1"]["stream_composition"] == {"low": 3} and by_id["c1"]["heldout_composition"] == {"low": 2}
    assert by_id["c0"]["training"]["records"] == 5 and by_id["c0"]["training"]["updates"] == 3  # 2 + 2 + flushed 1


def test_per_cluster_scores_use_the_routed_drafts(bench):
    base, records, stream_labels, route, s, result = bench
    stream, held = records[:8], records[8:]
    keys = [route(r.prompt_ids) for r in stream]
    trained = train_online(base, stream, keys, s.distill_config(), progress=False)
    # each cluster's distiller saw exactly its records, in stream order
    for cid, t in trained.items():
        assert t.request_ids == [r.request_id for r, k in zip(stream, keys) if k == cid]
    gate = PromotionGate(batch_size=s.batch_size)
    # training is deterministic: the bench's numbers are reproduced by scoring each group by hand
    c1 = result["categories"][0]  # 'low': both held-out prompts go to c1
    assert c1["per_cluster"] == pytest.approx(gate.evaluate(trained["c1"].draft, held[:2]), abs=1e-6)
    assert c1["untrained"] == pytest.approx(gate.evaluate(base, held[:2]), abs=1e-6)
    assert result["categories"][1]["per_cluster"] == pytest.approx(gate.evaluate(trained["c0"].draft, held[2:]), abs=1e-6)
    assert trained["c1"].draft is not base and not trained["c1"].draft.training


def test_routed_alpha_pools_rows_and_falls_back_to_the_untrained_draft(bench):
    base, records, *_ = bench
    gate = PromotionGate()
    other = DraftModel(tiny_llama(V, layers=1, seed=5)).eval()
    held = records[8:]
    labels = ["x", "x", "y", "y"]
    out = routed_alpha(held, labels, ["other", "untrained", "nowhere", "nowhere"], {"untrained": base, "other": other},
                       gate)
    a0, n0 = gate.score(other, held[:1])
    a1, n1 = gate.score(base, held[1:2])
    assert out["x"]["alpha_hat"] == pytest.approx((a0 * n0 + a1 * n1) / (n0 + n1))
    assert out["x"]["rows"] == n0 + n1 and out["x"]["records"] == 2
    assert out["y"]["alpha_hat"] == pytest.approx(gate.evaluate(base, held[2:]))  # unknown cluster: untrained draft
    with pytest.raises(ValueError, match="must match"):
        routed_alpha(held, labels[:2], labels, {"untrained": base}, gate)


def test_markdown(bench):
    *_, result = bench
    md = render_markdown({**result, "environment": {"date": "today"}, "records": {"cached": True}})
    assert "| **mean** |" in md and "α̂ per-cluster" in md and "gain (per-cluster − global)" in md
    assert "Router purity against the true categories: stream 0.875" in md
    assert "| c0 | 5 | high 4, low 1 |" in md
    assert ("**met**" in md) == result["aim"]["met"] and ("**not met**" in md) != result["aim"]["met"]
    assert "records cached" in md


def test_cli_registers_clusters():
    from cli.main import build_parser

    args = build_parser().parse_args(["bench", "clusters", "--quick", "--clusters-stream", "5",
                                      "--clusters-categories", "qa,translation"])
    assert args.which == "clusters" and args.clusters_stream == 5 and args.quick
    from bench.clusters import settings_from_args

    args.max_tokens = 96
    assert settings_from_args(args).categories == ClustersBenchSettings.quick().categories
    args.quick = False
    assert settings_from_args(args).categories == ("qa", "translation")
    args.clusters_categories = "qa"
    with pytest.raises(ValueError, match="at least 2"):
        settings_from_args(args)
