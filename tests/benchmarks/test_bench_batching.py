"""bench/batching.py's closed-loop clients on a tiny engine: both servers answer every request of every client, with
the same greedy outputs, and the latency accounting adds up. The whole benchmark (SmolLM2) runs by hand."""

from __future__ import annotations

from support.tiny import random_prompts, tiny_engine

from bench.batching import render, run_batched, run_sequential, summarize
from osd.decoding.batch_engine import BatchEngine


def test_clients_get_the_same_answers_one_at_a_time_and_batched():
    engine = tiny_engine(noise=0.3, gamma=3)
    prompts = random_prompts(6, 64, seed=3)
    work = [prompts[0:2], prompts[2:4], prompts[4:6]]  # three clients, two requests each
    sequential = run_sequential(engine, work, max_tokens=6, draft=True)
    batched = run_batched(BatchEngine(engine, max_batch=3), work, max_tokens=6, draft=True)
    key = lambda r: (r["client"], r["index"])
    assert sorted(map(key, sequential)) == sorted(map(key, batched)) == [(c, i) for c in range(3) for i in range(2)]
    assert {key(r): r["output_ids"] for r in sequential} == {key(r): r["output_ids"] for r in batched}
    for rows in (sequential, batched):
        firsts = {r["client"]: r for r in rows if r["index"] == 0}
        for r in rows:  # a client's second request arrives when its first finished
            assert r["latency_s"] > 0 and (r["index"] == 0 or r["arrival_s"] == firsts[r["client"]]["finish_s"])
    s = summarize(batched)
    assert s["requests"] == 6 and s["tokens"] == 36 and s["tokens_per_s"] > 0
    result = {"results": {3: {"sequential": summarize(sequential) | {"throughput_vs_sequential": 1.0,
                                                                     "per_token_latency_vs_sequential": 1.0}}}}
    assert "| 3 | sequential |" in render(result)
