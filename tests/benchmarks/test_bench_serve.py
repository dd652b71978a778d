"""`osd bench serve`'s load generator and summary against a tiny ServingCore under uvicorn (no Ray)."""

from __future__ import annotations

import socket
import time

import pytest
from support.http_server import serving
from support.tiny import tiny_engine

from bench.serve import (
    ENDPOINT_MODE,
    ServeBenchError,
    phase_plan,
    render_markdown,
    requests_for,
    run_closed_loop,
    run_load,
    slowdowns,
    summarize,
)
from cli.main import build_parser
from osd.serving.core import ServingCore
from osd.serving.http import build_app

QUESTIONS = [{"question_id": i, "category": c, "turns": [f"{c} question {i}: why is the sky blue?"]}
             for i, c in enumerate(["writing", "math", "coding", "qa", "rag"])]


@pytest.fixture(scope="module")
def endpoint():
    with serving(build_app(ServingCore(tiny_engine(noise=0.3, gamma=4), "tiny"))) as base:
        yield base


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("clients", [1, 2])
def test_closed_loop_summary(endpoint, clients):
    count = requests_for(clients, per_client=1, extra=2)
    results, wall = run_closed_loop(endpoint, QUESTIONS, clients, count, max_tokens=12, time_limit_s=30)
    s = summarize(results, wall, clients)
    assert [r.index for r in results] == list(range(count))
    assert [r.question_id for r in results] == [QUESTIONS[i % len(QUESTIONS)]["question_id"] for i in range(count)]
    assert {r.client for r in results} == set(range(clients))  # every client sent
    assert (s["clients"], s["requests"], s["ok"], s["errors"]) == (clients, count, count, 0), s["error_messages"]
    assert 0 < s["latency_p50_s"] <= s["latency_p95_s"] <= s["latency_max_s"] <= wall
    assert s["output_tokens"] == sum(r.completion_tokens for r in results) > 0
    assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] == pytest.approx(count / wall)
    assert s["mean_acceptance_length"] >= 1 and 0 <= s["alpha_hat"] <= 1 and s["draft_versions"] == [0]
    if clients == 2:  # the clients overlapped: some request started before an earlier one returned
        assert any(b.start_s < a.start_s + a.latency_s for a, b in zip(results, results[1:]))


@pytest.mark.timeout(60)
def test_run_load_phases_and_markdown(endpoint):
    lines: list[str] = []
    phases = run_load(endpoint, QUESTIONS, concurrency=(1, 2), requests=3, max_tokens=8, progress=lines.append)
    assert [(p["mode"], p["clients"]) for p in phases] == [(ENDPOINT_MODE, 1), (ENDPOINT_MODE, 2)]
    assert all(p["summary"]["ok"] == 3 and p["trainer"] is None for p in phases)
    # greedy and lossless: the same requests give the same tokens at any concurrency
    assert phases[0]["summary"]["output_tokens"] == phases[1]["summary"]["output_tokens"]
    assert sum("N=1" in line and "req/s" in line for line in lines) == 1
    result = {"config": {"url": endpoint, "max_tokens": 8, "questions": len(QUESTIONS), "requests_per_n": {"1": 3, "2": 3},
                         "target": "tiny", "draft": "noisy", "draft_layers": 2, "gamma": 4},
              "environment": {"date": "now", "torch": "x", "cpu_count": 2}, "phases": phases, "slowdown": []}
    assert "| endpoint | 2 | 3/3 |" in render_markdown(result)


def test_bad_url_fails_fast_and_clearly():
    url = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(ServeBenchError, match="cannot reach the osd endpoint"):
        run_load(url, QUESTIONS, concurrency=(1,), requests=1, progress=None)
    assert time.monotonic() - start < 5
    # the loop itself never raises: failures are counted
    results, wall = run_closed_loop(url, QUESTIONS, 2, 3, time_limit_s=10, request_timeout_s=2)
    s = summarize(results, wall, 2)
    assert (s["requests"], s["ok"], s["errors"]) == (3, 0, 3) and s["latency_p50_s"] is None
    assert "ConnectError" in s["error_messages"][0]


def test_phase_plan_slowdowns_and_cli():
    assert phase_plan(["static", "training", "paused"], (1, 4)) == [
        ("static", 1), ("static", 4), ("training", 1), ("paused", 1), ("training", 4), ("paused", 4)]
    with pytest.raises(ValueError, match="unknown modes"):
        phase_plan(["trained"], (1,))
    with pytest.raises(ServeBenchError, match="switch the trainer"):
        run_load("http://127.0.0.1:1", QUESTIONS, modes=("training",), concurrency=(1,), progress=None)
    assert requests_for(8) == 20 and requests_for(8, 3) == 3

    def phase(mode, tps, p50):
        return {"mode": mode, "clients": 4, "summary": {"output_tokens_per_s": tps, "requests_per_s": tps / 10,
                                                        "latency_p50_s": p50, "latency_p95_s": 2 * p50}}
    (row,) = slowdowns([phase("static", 10.0, 1.0), phase("training", 15.0, 2.0), phase("paused", 30.0, 1.0)])
    assert row["tokens_per_s_paused_over_training"] == 2.0 and row["p50_latency_training_over_paused"] == 2.0
    assert row["tokens_per_s_online_paused_over_static"] == 3.0

    args = build_parser().parse_args(["bench", "serve", "--concurrency", "1,2", "--url", "http://x:1"])
    assert (args.which, args.concurrency, args.url, args.max_tokens, args.replica_threads) == (
        "serve", (1, 2), "http://x:1", None, 1)  # cmd_bench makes max_tokens 48 for serve, 96 otherwise
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "serve", "--concurrency", "0"])
