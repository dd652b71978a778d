"""bench/load.py: guidellm's report read right, ratios and aims, the server configurations, the phases' questions.

guidellm itself runs in its own virtualenv (make bench-load), not in the test environment: its report is read from a
real one, trimmed to the fields the bench reads (tests/benchmarks/data/guidellm_report.json)."""

import json
from pathlib import Path

import pytest

from bench.load import (
    MODES,
    LoadBenchError,
    aims,
    guidellm_command,
    mode_config,
    parse_guidellm,
    phase_questions,
    ratios,
    render_markdown,
    rotated,
)

REPORT = Path(__file__).parent / "data" / "guidellm_report.json"


def test_parse_reads_throughput_and_latencies_from_a_real_guidellm_report():
    p = parse_guidellm(REPORT)
    raw = json.loads(REPORT.read_text())["benchmarks"][0]
    assert p["concurrency"] == 2
    assert p["requests"] == {"successful": 3, "errored": 0, "incomplete": 0}
    assert p["output_tokens"] == 48
    assert p["output_tok_s"] == pytest.approx(48 / raw["duration"])
    assert p["requests_per_s"] == pytest.approx(3 / raw["duration"])
    assert p["ttft_ms"]["p50"] == raw["metrics"]["time_to_first_token_ms"]["successful"]["percentiles"]["p50"]
    assert p["itl_ms"]["p95"] == raw["metrics"]["inter_token_latency_ms"]["successful"]["percentiles"]["p95"]
    assert 0 < p["itl_ms"]["p50"] <= p["itl_ms"]["p95"]


def test_parse_refuses_a_report_without_exactly_one_benchmark(tmp_path):
    report = json.loads(REPORT.read_text())
    for benchmarks in ([], report["benchmarks"] * 2):
        path = tmp_path / "r.json"
        path.write_text(json.dumps({"benchmarks": benchmarks}))
        with pytest.raises(LoadBenchError, match="expected one benchmark"):
            parse_guidellm(path)


def _phase(mode, n, tok_s, itl):
    return {"mode": mode, "concurrency": n, "output_tok_s": tok_s, "itl_ms": {"p50": itl, "p95": itl}}


def test_ratios_and_aims_compare_modes_at_the_same_concurrency():
    phases = [_phase("sequential", 1, 20.0, 40.0), _phase("batched", 1, 19.0, 44.0), _phase("batched_off", 1, 20.0, 42.0),
              _phase("sequential", 8, 20.0, 40.0), _phase("batched", 8, 70.0, 90.0), _phase("batched_off", 8, 60.0, 99.0)]
    rows = {r["concurrency"]: r for r in ratios(phases)}
    assert rows[8]["batched_vs_sequential"] == pytest.approx(3.5)
    assert rows[8]["speculation_on_vs_off"] == pytest.approx(70 / 60)
    assert rows[1]["batched_itl_p50_vs_sequential"] == pytest.approx(1.1)
    a = aims(list(rows.values()))
    assert a["throughput_at_8"]["met"] and a["throughput_at_8"]["value"] == pytest.approx(3.5)
    assert not a["itl_at_1"]["met"]  # 10% slower per token at one client
    assert not a["speculation_on_vs_off"]["met"]  # 0.95 at N = 1
    assert a["speculation_on_vs_off"]["by_concurrency"][1] == pytest.approx(0.95)
    text = render_markdown({"environment": {"date": "d", "cpu_count": 2}, "ratios": list(rows.values()), "aims": a,
                            "config": {"guidellm": "guidellm 0.8.1", "replica_threads": 2, "max_tokens": 64,
                                       "questions": 30},
                            "phases": [{**p, "requests_per_s": 1.0, "ttft_ms": {"p50": 1, "p95": 2},
                                        "requests": {"successful": 4, "errored": 0}} for p in phases]})
    assert "**met** (×3.50)" in text and "| 8 | batched | 70 | 3.5 |" in text


def test_aims_are_absent_when_their_modes_did_not_run():
    assert aims(ratios([_phase("batched", 8, 70.0, 90.0)])) == {}


def test_every_mode_is_a_valid_app_config_of_its_kind():
    from actors.config import OsdAppConfig

    base = OsdAppConfig(redis_url="redis://127.0.0.1:6379/0")
    configs = {m: mode_config(m, base, 16) for m in MODES}
    assert configs["sequential"].engine.max_batch == 1 and configs["sequential"].engine.suffix is not None
    assert configs["sequential_chain"].engine.max_batch == 1 and configs["sequential_chain"].engine.suffix is None
    batched = configs["batched"]
    assert batched.engine.max_batch == 16 and batched.models.draft == "self" and batched.engine.suffix is not None
    assert configs["batched_draft"].engine.suffix is None and configs["batched_draft"].models.draft == "self"
    off = configs["batched_off"]
    assert off.engine.max_batch == 16 and off.models.draft == "none" and off.engine.suffix is None
    assert all(c.redis_url == base.redis_url for c in configs.values())
    with pytest.raises(ValueError, match="unknown mode"):
        mode_config("turbo", base, 16)


def test_each_phase_gets_its_own_questions():
    questions = [{"question_id": i, "turns": [f"q{i}"]} for i in range(40)]
    per_n = lambda n: 2 * n + 4
    phases = phase_questions(questions, (1, 4, 8), per_n)
    assert [len(p) for p in phases] == [6, 12, 20]
    ids = [q["question_id"] for p in phases for q in p]
    assert len(ids) == len(set(ids))  # no question answered twice (the suffix index would have it)
    with pytest.raises(LoadBenchError, match="questions for"):
        phase_questions(questions, (1, 4, 8, 16), per_n)


def test_the_guidellm_command_holds_n_streams_until_the_requests_finished(tmp_path):
    cmd = guidellm_command("guidellm", "http://127.0.0.1:1/batched", "osd", 8, 20, 64, tmp_path / "p.jsonl",
                           "/models/smollm2", tmp_path / "out.json")
    args = dict(zip(cmd[2::2], (json.loads(v) for v in cmd[3::2]), strict=False))
    assert cmd[:2] == ["guidellm", "run"] and cmd[-1] == "--disable-console-interactive"
    assert args["--profile"] == {"kind": "concurrent", "streams": [8]}
    assert args["--constraint"] == {"kind": "max_requests", "count": 20}
    backend = args["--backend"]
    assert backend["target"] == "http://127.0.0.1:1/batched" and backend["max_tokens"] == 64 and backend["stream"]
    assert backend["extras"]["body"]["temperature"] == 0  # greedy: every mode generates the same tokens


def test_modes_take_turns_in_a_rotated_order():
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
