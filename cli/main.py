"""The `osd` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pydantic import ValidationError

from cli.models import add_model_args, model_configs
from osd.config import SamplingParams


def cmd_generate(args) -> int:
    from osd.data.workloads import chat_prompt_ids
    from osd.decoding.engine import build_engine

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop=args.stop or [], seed=args.seed)
    models, engine_cfg = model_configs(args)
    engine = build_engine(models, engine_cfg)
    if args.raw:
        prompt_ids = engine.tokenizer(args.prompt).input_ids
    else:
        prompt_ids = chat_prompt_ids(engine.tokenizer, args.prompt)
    out = engine.generate(prompt_ids, params)
    dtype = str(engine.target.dtype).removeprefix("torch.")
    if args.json:
        print(json.dumps({"text": out.text, "finish_reason": out.finish_reason, "output_ids": out.output_ids,
                          "dtype": dtype, "stats": out.stats.as_dict()}, indent=2))
        return 0
    print(out.text)
    s = out.stats
    alpha = f"{s.alpha_hat:.3f}" if s.alpha_hat is not None else "n/a"
    print(f"\n[{s.output_tokens} tokens in {s.elapsed_s:.2f}s = {s.tokens_per_second:.1f} tok/s | {dtype} | "
          f"finish={out.finish_reason} | "
          f"rounds={s.rounds} proposed={s.proposed} accepted={s.accepted} per-position={s.accepted_per_position} | "
          f"target forwards={s.target_forwards} | mean acceptance length={s.mean_acceptance_length:.2f} | α̂={alpha}]",
          file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    if args.max_tokens is None:
        args.max_tokens = {"serve": 48, "trees": 64, "suffix": 64, "overhead": 64, "faults": 16,
                           "eagle": 64}.get(args.which, 96)
    if args.which == "spec":
        from bench.spec import run_spec_bench

        run_spec_bench(args)
    elif args.which == "distill":
        from bench.distill import run_distill_bench_command

        run_distill_bench_command(args)
    elif args.which == "serve":
        from bench.serve import run_serve_bench

        run_serve_bench(args)
    elif args.which == "drift":
        from bench.drift import run_drift_bench

        run_drift_bench(args)
    elif args.which == "clusters":
        from bench.clusters import run_clusters_bench_command

        run_clusters_bench_command(args)
    elif args.which == "suffix":
        from bench.suffix import run_suffix_bench

        run_suffix_bench(args)
    elif args.which == "overhead":
        from bench.overhead import run_overhead_bench

        run_overhead_bench(args)
    elif args.which == "trees":
        from bench.trees import run_trees_bench_command

        run_trees_bench_command(args)
    elif args.which == "faults":
        from bench.faults import run_faults_bench

        run_faults_bench(args)
    elif args.which == "eagle":
        from bench.eagle_curve import run_eagle_curve_command

        run_eagle_curve_command(args)
    elif args.which == "load":
        from bench.load import run_load_bench

        run_load_bench(args)
    return 0


def cmd_config_doc(args) -> int:
    from cli.config_doc import all_config_models, config_reference

    print(config_reference(all_config_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osd", description="Online speculative decoding with draft distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run one prompt through the speculative engine and print text and stats")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    add_model_args(gen)
    gen.set_defaults(func=cmd_generate)

    from cli.distill import add_distill_args, run_distill_command

    distill = sub.add_parser("distill", help="replay prompts through the engine and distil the draft online")
    add_distill_args(distill)
    distill.set_defaults(func=run_distill_command)

    from osd.serving.client import add_replay_args

    add_replay_args(sub.add_parser("replay", help="send Spec-Bench questions to a running endpoint and print stats"))

    doc = sub.add_parser("config-doc", help="print the configuration reference (docs/configuration.md) as markdown")
    doc.set_defaults(func=cmd_config_doc)

    bench = sub.add_parser("bench", help="benchmarks (results under bench/results/, tables in docs/benchmarks.md)")
    bench.add_argument("which", choices=["spec", "distill", "serve", "drift", "clusters", "trees", "suffix", "overhead",
                                         "faults", "eagle", "load"],
                       help="spec: does speculation pay here (per dtype: verification curve, HF generate and assisted generation, osd with no, an untrained and a distilled draft, speculation always vs auto); distill: online distillation on one "
                            "Spec-Bench category (draft constructions, held-out before/after, learning curve); serve: "
                            "closed-loop load on the Ray Serve endpoint, static vs online draft, trainer training vs "
                            "paused; drift: a stream whose category shifts in phases, online vs static draft, "
                            "through the endpoint; clusters: a mixed-category stream, per-cluster drafts (router) vs "
                            "one global draft, held-out α̂ per category; trees: one distilled draft as chains (fixed "
                            "and adaptive length), static and dynamic trees, and an early-exit self-draft; suffix: suffix speculation "
                            "(request + traffic index) alone, the draft alone, and both fused in one tree, per Spec-Bench "
                            "category and on a repeated stream; overhead: one request stream through the Ray Serve "
                            "endpoint against the same engine in-process, with the service's speculation and with "
                            "the target alone; faults: steady traffic through the Ray Serve endpoint while a "
                            "replica, the trainer and Redis are SIGKILLed, a corrupt draft is published and the "
                            "record backlog overflows, one at a time: requests and records counted; eagle: the eagle head's "
                            "learning curve against first2_frozen on GSM8K and a GSM8K + Spec-Bench mix (held-out "
                            "top-1, α̂, acceptance length, c, tok/s); load: guidellm at concurrency 1, 4, 8, 16 against "
                            "the endpoint, continuous batching (speculation on and off) vs one request at a time")
    bench.add_argument("--questions", type=int, default=20, help="Spec-Bench questions, spread across categories")
    bench.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 96; serve: 48)")
    bench.add_argument("--data", default=None, help="Spec-Bench questions JSONL (default: the vendored copy in osd/data/questions)")
    bench.add_argument("--out", default="bench/results", help="directory for the JSON results")
    bench.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update with the table")
    add_model_args(bench)
    from bench.spec import add_bench_spec_args

    add_bench_spec_args(bench)
    from bench.distill import add_bench_distill_args

    add_bench_distill_args(bench)
    from bench.serve import add_bench_serve_args

    add_bench_serve_args(bench)
    from bench.drift import add_bench_drift_args

    add_bench_drift_args(bench)
    from bench.clusters import add_bench_clusters_args

    add_bench_clusters_args(bench)
    from bench.trees import add_bench_trees_args

    add_bench_trees_args(bench)
    from bench.suffix import add_bench_suffix_args

    add_bench_suffix_args(bench)
    from bench.overhead import add_bench_overhead_args

    add_bench_overhead_args(bench)
    from bench.faults import add_bench_faults_args

    add_bench_faults_args(bench)
    from bench.eagle_curve import add_bench_eagle_args

    add_bench_eagle_args(bench)
    from bench.load import add_bench_load_args

    add_bench_load_args(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the replay output
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as e:
        for err in e.errors():
            print(f"osd: invalid {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"osd: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
