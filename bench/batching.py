"""Continuous batching against one request at a time, in-process (`python -m bench.batching`).

c closed-loop clients (each sends its next request as soon as its last one finished; the same Spec-Bench prompts,
chat template, greedy) against the same target and draft, three ways:

- ``sequential``: SpeculativeEngine.generate, one request at a time in arrival order (the serving path today: the
  replica's engine thread runs one generate at a time and the rest queue);
- ``sequential_plain``: the same without the draft (what its speculation governor converges to with a draft that
  does not pay; on a shared machine its wall-clock timings are noisy, this yardstick is not);
- ``batch_plain``: BatchEngine, every request without a draft (plain batched decoding);
- ``batch_spec``: BatchEngine with the draft, speculation='auto': the round's draft length from the measured cost of
  batched forwards at the current batch size (osd/decoding/batch_cost.py);
- ``batch_always`` (on request): BatchEngine drafting γ every round, whatever it costs.

Per variant and concurrency: output tok/s (all clients' tokens / elapsed time), requests/s, latency (arrival to
finish: queueing, prefill and decoding) and per-token latency (a request's latency / its tokens, averaged over
requests). Ratios are against ``sequential`` at the same concurrency, measured in the same run, variants rotated
per concurrency so machine drift does not favour one.

``--clock cpu`` times everything with this process's CPU time instead of the wall clock. With one torch thread
that is the wall time the run would take on a core of its own: on a machine shared with other work (whose load
stretches wall time by whatever the neighbours do) it measures the engine, not the neighbours. It cannot see
waiting for memory bandwidth the neighbours take, and with more threads it sums them, so use it with --threads 1.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque

import torch

from bench.report import environment, write_json

VARIANTS = ("sequential", "sequential_plain", "batch_plain", "batch_spec", "batch_always")


def _questions(tokenizer, n: int, data: str | None) -> list[list[int]]:
    from osd.data.workloads import (
        chat_prompt_ids,
        load_questions,
        spread_across_categories,
    )

    return [chat_prompt_ids(tokenizer, q["turns"][0]) for q in spread_across_categories(load_questions(data), n)]


def run_sequential(engine, work: list[list[list[int]]], max_tokens: int, draft: bool, clock=time.perf_counter
                   ) -> list[dict]:
    """work[client] = that client's prompts, sent one after another. One server, first come first served."""
    from osd.config import SamplingParams

    start = clock()
    queue = deque((0.0, client, 0) for client in range(len(work)))  # (arrival, client, index): arrival order
    rows = []
    while queue:
        arrival, client, index = queue.popleft()
        gen = engine.generate(work[client][index], SamplingParams(max_tokens=max_tokens),
                              **({} if draft else {"draft": None}))
        finish = clock() - start
        rows.append(_row(client, index, arrival, finish, gen))
        if index + 1 < len(work[client]):
            queue.append((finish, client, index + 1))
    return rows


def run_batched(batch, work: list[list[list[int]]], max_tokens: int, draft: bool, clock=time.perf_counter
                ) -> list[dict]:
    """The same clients against a BatchEngine: a client's next request joins the batch when its last finishes."""
    from osd.config import SamplingParams
    from osd.decoding.engine import LIVE_DRAFT

    start = clock()
    state: dict[str, tuple[int, int, float]] = {}  # request id → (client, index, arrival)

    def send(client: int, index: int, arrival: float) -> None:
        rid = batch.add(work[client][index], SamplingParams(max_tokens=max_tokens),
                        draft=LIVE_DRAFT if draft else None, request_id=f"{client}-{index}")
        state[rid] = (client, index, arrival)

    for client in range(len(work)):
        send(client, 0, 0.0)
    rows = []
    while batch.active:
        for rid, gen in batch.step().finished.items():
            client, index, arrival = state.pop(rid)
            finish = clock() - start
            rows.append(_row(client, index, arrival, finish, gen))
            if index + 1 < len(work[client]):
                send(client, index + 1, finish)
    return rows


def _row(client: int, index: int, arrival: float, finish: float, gen) -> dict:
    s = gen.stats
    return {"client": client, "index": index, "arrival_s": arrival, "finish_s": finish, "latency_s": finish - arrival,
            "tokens": len(gen.output_ids), "rounds": s.rounds, "accepted": s.accepted,
            "target_forwards": s.target_forwards, "output_ids": gen.output_ids}


def summarize(rows: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    wall = max(r["finish_s"] for r in rows)
    latencies = [r["latency_s"] for r in rows]
    forwards = sum(r["target_forwards"] for r in rows)
    return {"requests": len(rows), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "requests_per_s": len(rows) / wall, "mean_latency_s": statistics.fmean(latencies),
            "p50_latency_s": statistics.median(latencies),
            "mean_per_token_latency_ms": 1000 * statistics.fmean(r["latency_s"] / max(r["tokens"], 1) for r in rows),
            "speculative_round_share": sum(r["rounds"] for r in rows) / forwards if forwards else 0.0,
            "tokens_per_target_forward": tokens / forwards if forwards else 0.0}


def run(args: argparse.Namespace) -> dict:
    from cli.models import model_configs
    from osd.decoding.batch_engine import BatchEngine
    from osd.decoding.engine import SpeculativeEngine, build_engine

    variants = tuple(v for v in args.variants.split(",") if v)
    if "sequential" not in variants or set(variants) - set(VARIANTS):
        raise ValueError(f"--variants: 'sequential' (the yardstick) plus any of {', '.join(VARIANTS[1:])}")

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    models, engine_config = model_configs(args, torch_threads=args.threads)
    engine = build_engine(models, engine_config)
    engine.warm_up()
    say = lambda text: print(text, flush=True)
    max_c = max(args.concurrency)
    started = time.perf_counter()
    batch = BatchEngine(engine, max_batch=max_c, measure=False)
    batch.costs = batch.measure_costs(timer=clock)  # the batched cost table speculation='auto' decides with
    say(f"cost table measured in {time.perf_counter() - started:.1f} s: {batch.costs.as_dict() if batch.costs else None}")
    prompts = _questions(engine.tokenizer, max_c * args.requests_per_client, args.data)
    batch.generate_many([{"prompt_ids": prompts[0], "params": _params(8)}])  # one-off setup of the batched shapes
    always = BatchEngine(SpeculativeEngine(engine.target, engine.tokenizer, engine.draft,
                                           engine.config.model_copy(update={"speculation": "always"})), max_batch=max_c)
    results = {}
    for turn, c in enumerate(args.concurrency):
        work = [prompts[k * args.requests_per_client : (k + 1) * args.requests_per_client] for k in range(c)]
        results[c] = {}
        for rep in range(args.repeats):  # rotated, then reversed: drift on a shared machine hits every variant
            order = variants[turn % len(variants):] + variants[: turn % len(variants)]
            for variant in order if rep % 2 == 0 else order[::-1]:
                if variant.startswith("sequential"):
                    rows = run_sequential(engine, work, args.max_tokens, variant == "sequential", clock)
                else:
                    rows = run_batched(always if variant == "batch_always" else batch, work, args.max_tokens,
                                       draft=variant != "batch_plain", clock=clock)
                s = summarize(rows)
                say(f"[c={c} run {rep + 1}] {variant}: {s['tokens_per_s']:.2f} tok/s, p50 latency "
                    f"{s['p50_latency_s']:.1f} s, {s['mean_per_token_latency_ms']:.0f} ms/token, speculative rounds "
                    f"{s['speculative_round_share']:.0%}")
                kept = results[c].get(variant)
                runs = ([] if kept is None else kept["summary"]["tokens_per_s_runs"]) + [s["tokens_per_s"]]
                if kept is None or s["tokens_per_s"] > kept["summary"]["tokens_per_s"]:  # noise only slows a run
                    kept = {"summary": s, "rows": rows}
                kept["summary"]["tokens_per_s_runs"] = runs
                results[c][variant] = kept
        base = results[c]["sequential"]["summary"]
        for variant in variants:
            s = results[c][variant]["summary"]
            s["throughput_vs_sequential"] = s["tokens_per_s"] / base["tokens_per_s"]
            s["per_token_latency_vs_sequential"] = s["mean_per_token_latency_ms"] / base["mean_per_token_latency_ms"]
            s["same_outputs_as_sequential"] = _same_share(results[c][variant]["rows"], results[c]["sequential"]["rows"])
    result = {"benchmark": "batching", "environment": environment(),
              "config": {"concurrency": args.concurrency, "requests_per_client": args.requests_per_client,
                         "max_tokens": args.max_tokens, "threads": args.threads, "dtype": str(engine.target.dtype),
                         "draft": args.draft, "variants": list(variants), "repeats": args.repeats, "clock": args.clock,
                         "gamma": engine_config.gamma, "speculation": engine_config.speculation,
                         "note": "in-process; the machine was shared with other work, so compare ratios within a "
                                 "concurrency (same run, variants rotated; each variant's fastest of `repeats` runs), "
                                 "not absolute numbers across runs"},
              "cost_table_ms": batch.costs.as_dict() if batch.costs else None,
              "total_s": time.perf_counter() - started,
              "results": {c: {v: part["summary"] for v, part in parts.items()} for c, parts in results.items()}}
    path = write_json(args.out, "batching", result)
    say("\n" + render(result) + f"\n\nresults: {path}")
    return result


def _params(max_tokens: int):
    from osd.config import SamplingParams

    return SamplingParams(max_tokens=max_tokens)


def _same_share(rows: list[dict], reference: list[dict]) -> float:
    """Share of requests whose output ids equal the sequential engine's for the same client and prompt (bf16 rows
    batched with others round differently, so a near-tie can go the other way)."""
    ref = {(r["client"], r["index"]): r["output_ids"] for r in reference}
    return sum(r["output_ids"] == ref[r["client"], r["index"]] for r in rows) / len(rows)


def render(result: dict) -> str:
    lines = ["| clients | variant | tok/s | × sequential | p50 latency s | ms/token | × sequential | spec rounds |",
             "|---|---|---|---|---|---|---|---|"]
    for c, parts in result["results"].items():
        for v, s in parts.items():
            lines.append(f"| {c} | {v} | {s['tokens_per_s']:.2f} | {s['throughput_vs_sequential']:.2f} | "
                         f"{s['p50_latency_s']:.1f} | {s['mean_per_token_latency_ms']:.0f} | "
                         f"{s['per_token_latency_vs_sequential']:.2f} | {s['speculative_round_share']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from cli.models import add_model_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.set_defaults(threads=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time with the wall clock, or this process's CPU time (see the module docstring)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant and concurrency; the fastest is kept")
    parser.add_argument("--data", default=None, help="Spec-Bench questions JSONL (default: the vendored copy)")
    parser.add_argument("--variants", default=",".join(VARIANTS[:4]), help=f"'sequential' plus any of "
                        f"{', '.join(VARIANTS[1:])}")
    parser.add_argument("--out", default="bench/results")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
