"""`osd bench drift`'s stream, replay and analysis, against a tiny ServingCore under uvicorn (no Ray)."""

from __future__ import annotations

import pytest
from support.http_server import serving
from support.tiny import tiny_engine

from bench.drift import (
    Served,
    analytic_speedup,
    moving_average,
    phase_table,
    phased_stream,
    plot,
    render_markdown,
    replay,
    swap_points,
)
from osd.serving.core import ServingCore
from osd.serving.http import build_app

QUESTIONS = [{"question_id": i, "category": c, "turns": [f"{c} {i}: tell me more"]}
             for i, c in enumerate(["math", "code"] * 6)]


def test_phased_stream_keeps_phase_order_and_refuses_short_categories():
    stream = phased_stream(QUESTIONS, ["code", "math"], per_phase=4)
    assert [q["category"] for q in stream] == ["code"] * 4 + ["math"] * 4
    assert [q["phase"] for q in stream] == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="needs more"):
        phased_stream(QUESTIONS, ["code"], per_phase=7)


def test_moving_average_skips_missing_values():
    assert moving_average([None, 1.0, 3.0, None, 5.0], 2) == [None, 1.0, 2.0, 3.0, 5.0]


def test_analytic_speedup_matches_the_formula():
    assert analytic_speedup(0.0, 4, 0.0) == pytest.approx(1.0)
    assert analytic_speedup(0.5, 2, 0.1) == pytest.approx((1 + 0.5 + 0.25) / 1.2)
    assert analytic_speedup(1.0, 3, 0.0) == pytest.approx(4.0)
    assert analytic_speedup(None, 3, 0.1) is None


def rows_from(alphas: list[float], per_phase: int, versions: list[int] | None = None) -> list[Served]:
    return [Served(index=i, phase=i // per_phase, category=f"c{i // per_phase}", question_id=i, ok=True,
                   latency_s=1.0, completion_tokens=10, alpha_hat=a,
                   draft_version=versions[i] if versions else 0) for i, a in enumerate(alphas)]


def test_phase_table_measures_the_dip_and_the_recovery():
    # Phase 0 climbs to 0.6; the switch drops α̂ to 0.1, which climbs back to 0.6 by the phase's end.
    per = 60
    alphas = [0.6] * per + [0.1] * 10 + [0.6] * (per - 10)
    table = phase_table(rows_from(alphas, per), ["a", "b"])
    assert table[0]["alpha_start"] == table[0]["alpha_end"] == pytest.approx(0.6)
    assert table[1]["alpha_start"] == pytest.approx(0.1) and table[1]["alpha_end"] == pytest.approx(0.6)
    assert table[1]["dip"] == pytest.approx(0.6 - (10 * 0.1 + 10 * 0.6) / 20)  # lowest MA20: 10 low + 10 high
    # MA20 is back to 0.9 × 0.6 = 0.54 once at most 2 of its 20 values are low: request 27 of the phase.
    assert table[1]["recovery_requests"] == 27
    never = phase_table(rows_from([0.6] * per + [0.1] * per, per), ["a", "b"])
    assert never[1]["recovery_requests"] is not None  # flat at its (low) end level: "recovered" at once
    assert never[1]["alpha_end"] == pytest.approx(0.1)


def test_swap_points_mark_each_new_version():
    rows = rows_from([0.5] * 6, 3, versions=[0, 0, 1, 1, 3, 3])
    assert swap_points(rows) == [(2, 1), (4, 3)]


@pytest.fixture(scope="module")
def endpoint():
    with serving(build_app(ServingCore(tiny_engine(noise=0.3, gamma=3), "tiny"))) as base:
        yield base


@pytest.mark.timeout(120)
def test_replay_through_the_endpoint_then_report(endpoint, tmp_path):
    stream = phased_stream(QUESTIONS, ["math", "code"], per_phase=3)
    lines = []
    rows = replay(endpoint, stream, max_tokens=12, label="online", say=lines.append)
    assert [r.ok for r in rows] == [True] * 6 and len(lines) == 6
    assert all(0 <= r.alpha_hat <= 1 and r.completion_tokens == 12 and r.target_forwards > 0 for r in rows)
    assert [r.category for r in rows] == ["math"] * 3 + ["code"] * 3
    from dataclasses import asdict

    result = {
        "environment": {"date": "today"},
        "config": {"phases": ["math", "code"], "per_phase": 3, "max_tokens": 12, "gamma": 3, "where": "tiny",
                   "c": 0.2, "draft_step_ms": 1.0, "target_step_ms": 5.0},
        "runs": {name: [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in rows] for name in ("online", "static")},
        "phase_table": {name: phase_table(rows, ["math", "code"]) for name in ("online", "static")},
        "speed": {"online": {"tokens_per_s": 10.0, "vs_target": 0.9, "alpha_hat": 0.4, "analytic_speedup": 1.1},
                  "target alone": {"tokens_per_s": 11.0, "vs_target": 1.0, "alpha_hat": None,
                                   "analytic_speedup": None}},
        "target_alone_tokens_per_s": 11.0, "trainer_summary": None,
    }
    markdown = render_markdown(result)
    assert "| math |" in markdown and "| code |" in markdown and "0.90×" in markdown
    plot(result, str(tmp_path / "drift.png"))
    assert (tmp_path / "drift.png").stat().st_size > 10_000


def test_a_dead_endpoint_is_reported_per_request_not_raised():
    rows = replay("http://127.0.0.1:9", phased_stream(QUESTIONS, ["math"], per_phase=2), max_tokens=4,
                  label="x", timeout_s=2, say=lambda _: None)
    assert [r.ok for r in rows] == [False, False] and "ConnectError" in rows[0].error
