"""`osd bench overhead`: what the Ray Serve + HTTP path costs over the engine in-process.

One request stream (one client, greedy, the same Spec-Bench questions) under the service's own
configuration, two ways, interleaved question by question (alternating which goes first) so
machine noise hits both alike:

- ``in_process``: ``build_engine`` in this process with the replica's torch threads; per
  question the chat template, ``engine.generate`` and the decode, timed end to end;
- ``endpoint``: the osd app on a local Ray (1 replica, no trainer, an embedded Redis taking the
  records), ``POST /v1/chat/completions`` timed by the client.

Two variants, one deployment each: ``speculative`` (the service default: suffix speculation
fused with the self-draft) and ``target_alone`` (no draft, no suffix index). The issue's aim:
the endpoint within 10% of in-process (ratio >= 0.9) in both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import httpx
import torch

from bench.report import environment, table, update_doc_section, write_json
from bench.serve import chat_body, deployed_endpoint

VARIANTS = ("speculative", "target_alone")


def variant_configs(args: argparse.Namespace, variant: str):
    """(ModelConfig, EngineConfig) of a variant: the service's defaults, or the target alone."""
    from actors.config import OsdAppConfig
    from cli.models import model_configs

    models, _ = model_configs(args, torch_threads=args.replica_threads)
    engine = OsdAppConfig().engine  # the service default (suffix speculation fused with the draft)
    if variant == "target_alone":
        return models.model_copy(update={"draft": "none"}), engine.model_copy(update={"suffix": None})
    return models, engine


def _app_config(models, engine, threads: int):
    """The deployment: one replica with ``threads`` torch threads, no trainer (it is not on the request path)."""
    from actors.config import OsdAppConfig, TrainerSettings

    def build(args, redis_url: str, max_clients: int) -> OsdAppConfig:
        return OsdAppConfig(models=models, engine=engine, redis_url=redis_url, num_replicas=1,
                            replica_num_cpus=1.0, replica_torch_threads=threads,
                            trainer=TrainerSettings(enabled=False))
    return build


def _in_process(engine, question: dict, max_tokens: int) -> dict:
    from osd.config import SamplingParams
    from osd.data.workloads import chat_prompt_ids

    start = time.perf_counter()
    prompt = chat_prompt_ids(engine.tokenizer, question["turns"][0])
    out = engine.generate(prompt, SamplingParams(max_tokens=max_tokens))
    text = engine.tokenizer.decode(out.output_ids, skip_special_tokens=True)
    return {"tokens": len(out.output_ids), "seconds": time.perf_counter() - start, "text": text}


def _endpoint(http: httpx.Client, question: dict, max_tokens: int) -> dict:
    start = time.perf_counter()
    resp = http.post("/v1/chat/completions", json=chat_body(question, max_tokens))
    seconds = time.perf_counter() - start
    resp.raise_for_status()
    data = resp.json()
    return {"tokens": int(data["usage"]["completion_tokens"]), "seconds": seconds,
            "text": data["choices"][0]["message"]["content"]}


def measure_variant(args: argparse.Namespace, variant: str, questions: Sequence[dict], say=print) -> dict:
    """Both paths over ``questions`` for one variant; per-question rows and the summary."""
    from osd.decoding.engine import build_engine

    models, engine_config = variant_configs(args, variant)
    torch.set_num_threads(args.replica_threads)
    engine = build_engine(models, engine_config)
    engine.warm_up()
    rows = []
    with deployed_endpoint(args, 1, say, config_builder=_app_config(models, engine_config, args.replica_threads)) \
            as (url, _, info), httpx.Client(base_url=url, timeout=args.request_timeout) as http:
        _endpoint(http, {"turns": ["Hello."]}, 4)  # one unmeasured request: connection and route setup
        for i, q in enumerate(questions):
            order = ("in_process", "endpoint") if i % 2 == 0 else ("endpoint", "in_process")
            row = {"question_id": q.get("question_id"), "category": q.get("category")}
            for path in order:
                row[path] = (_in_process(engine, q, args.max_tokens) if path == "in_process"
                             else _endpoint(http, q, args.max_tokens))
            row["same_text"] = row["in_process"]["text"] == row["endpoint"]["text"]
            say(f"[overhead {variant}] {i + 1}/{len(questions)}: in-process "
                f"{row['in_process']['tokens'] / row['in_process']['seconds']:.1f} tok/s, endpoint "
                f"{row['endpoint']['tokens'] / row['endpoint']['seconds']:.1f} tok/s")
            rows.append(row)
    return {"summary": summarize(rows), "deploy_s": info["deploy_s"], "rows": rows}


def summarize(rows: Sequence[dict]) -> dict:
    """tok/s of each path (total tokens / total seconds), the endpoint/in-process ratio, and the per-question
    median of that ratio (robust to one slow request)."""
    out = {}
    for path in ("in_process", "endpoint"):
        tokens, seconds = sum(r[path]["tokens"] for r in rows), sum(r[path]["seconds"] for r in rows)
        out[path] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None}
    a, b = out["endpoint"]["tokens_per_s"], out["in_process"]["tokens_per_s"]
    out["ratio"] = a / b if a and b else None
    per_question = [(r["endpoint"]["tokens"] / r["endpoint"]["seconds"]) / (r["in_process"]["tokens"] / r["in_process"]["seconds"])
                    for r in rows if r["endpoint"]["tokens"] and r["in_process"]["tokens"]]
    out["median_ratio"] = statistics.median(per_question) if per_question else None
    out["same_text_share"] = sum(r["same_text"] for r in rows) / len(rows) if rows else None
    return out


def run_overhead_bench(args: argparse.Namespace) -> dict:
    from osd.data.workloads import load_questions, spread_across_categories

    questions = spread_across_categories(load_questions(args.data), args.questions)
    if not questions:
        raise ValueError("no questions to send")
    say = lambda text: print(text, flush=True)
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    started = time.perf_counter()
    parts = {v: measure_variant(args, v, questions, say) for v in variants}
    result = {"benchmark": "overhead", "environment": environment(),
              "config": {"questions": len(questions), "max_tokens": args.max_tokens, "target": args.target,
                         "draft": args.draft, "replica_threads": args.replica_threads, "variants": variants},
              "total_s": time.perf_counter() - started, "variants": parts}
    path = write_json(args.out, "overhead", result)
    markdown = render_markdown(result)
    print("\n" + markdown + f"\n\nresults: {path}\ntable:   {update_doc_section(args.doc, 'overhead', markdown)}")
    return result


def render_markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    rows = []
    for name, part in result["variants"].items():
        s = part["summary"]
        rows.append([name, s["in_process"]["tokens_per_s"], s["endpoint"]["tokens_per_s"], s["ratio"],
                     s["median_ratio"], f"{s['same_text_share']:.0%}"])
    return "\n".join([
        f"## The Ray/HTTP path against the engine in-process (`osd bench overhead`, {env['date']})",
        "",
        (f"{cfg['questions']} Spec-Bench questions, one client, greedy, max_tokens={cfg['max_tokens']}, interleaved "
         f"question by question; the service's engine config; {cfg['replica_threads']} torch threads in both the "
         f"replica and the in-process engine; torch {env['torch']} on {env['cpu_count']} cores. Endpoint time is the "
         "client's (HTTP, Serve routing, the replica, recording to Redis); in-process time is the chat template, "
         "generate and decode. Aim: ratio >= 0.9."),
        "",
        table(["variant", "in-process tok/s", "endpoint tok/s", "endpoint / in-process", "median per question",
               "same text"], rows),
    ])


def add_bench_overhead_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench overhead (uses --questions, --max-tokens (64), --replica-threads, "
                                  "--request-timeout, --deploy-timeout, --redis-url, the model args)")
    g.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
