"""`osd bench suffix`: suffix speculation, the draft, and both fused in one tree, per Spec-Bench category.

On one target (dtype from the model args; `auto` is bfloat16 on these CPUs) and the same
held-out prompts, prompt by prompt in turn so machine noise hits every method alike:

- ``target_alone``: osd with no draft (plain decoding, the 1.0 of every ratio);
- ``draft_chain``: the distilled draft as a chain with speculation 'auto' (the service's
  draft-only default before suffix speculation);
- ``draft_tree``: the distilled draft as a dynamic tree (no suffix candidates);
- ``suffix_only``: suffix candidates only (the request's prompt and output, and the traffic
  index of earlier requests), no draft;
- ``fused``: suffix candidates and the distilled draft in one tree.

Before the timed prompts, each category's first ``--warm-traffic`` questions run through the
suffix engines untimed (traffic the index has seen). Then a *repeated stream*: a few prompts
sent ``--repeats`` times each, as templated or retried requests are; its ratio is over the
repeats. All greedy; "= target" is the share of prompts whose output equals the target
alone's token for token (bfloat16 can round a near-tie differently in a k-token forward).
"""

from __future__ import annotations

import statistics
import time

from tqdm.auto import tqdm

from bench.report import environment, table, update_doc_section, write_json
from bench.spec import distilled_draft
from osd.config import (
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SuffixConfig,
    TreeConfig,
)
from osd.data.workloads import chat_prompt_ids, load_gsm8k_train, load_questions
from osd.decoding.cost import forward_cost_curve, measure_verification_cost
from osd.decoding.engine import SpeculativeEngine, build_engine
from osd.decoding.tree_engine import TreeSpeculativeEngine

CATEGORIES = ("summarization", "rag", "translation", "math_reasoning", "coding", "qa")
METHODS = ("target_alone", "draft_chain", "draft_tree", "suffix_only", "fused")


def add_bench_suffix_args(parser) -> None:
    g = parser.add_argument_group("bench suffix (uses --max-tokens (64), --distill-records, the model args)")
    g.add_argument("--per-category", type=int, default=4, help="timed held-out questions per category")
    g.add_argument("--warm-traffic", type=int, default=2,
                   help="questions per category served untimed through the suffix engines first (seen traffic)")
    g.add_argument("--suffix-categories", default=",".join(CATEGORIES), help="Spec-Bench categories, comma-separated")
    g.add_argument("--repeats", type=int, default=3, help="times each prompt of the repeated stream is sent")
    g.add_argument("--stream-prompts", type=int, default=3, help="distinct prompts in the repeated stream")


def _engines(target, tokenizer, draft, curve) -> dict[str, SpeculativeEngine]:
    suffix = SuffixConfig()
    tree = TreeConfig()
    return {
        "target_alone": SpeculativeEngine(target, tokenizer, None, EngineConfig(record=False)),
        "draft_chain": SpeculativeEngine(target, tokenizer, draft, EngineConfig(record=False, speculation="auto")),
        "draft_tree": TreeSpeculativeEngine(target, tokenizer, draft, EngineConfig(record=False), tree, curve),
        "suffix_only": TreeSpeculativeEngine(target, tokenizer, None, EngineConfig(record=False, suffix=suffix), tree, curve),
        "fused": TreeSpeculativeEngine(target, tokenizer, draft, EngineConfig(record=False, suffix=suffix), tree, curve),
    }


def _run(engine: SpeculativeEngine, prompt: list[int], params: SamplingParams, cluster: str) -> dict:
    out = engine.generate(prompt, params, cluster=cluster)
    s = out.stats
    row = {"output_ids": out.output_ids, "tokens": s.output_tokens, "seconds": s.elapsed_s, "prefill_s": s.prefill_s,
           "target_forwards": s.target_forwards, "rounds": s.rounds, "accepted": s.accepted}
    split = s.accepted_by_source()
    # A chain's draft runs in every speculative round; a tree counts the rounds its draft ran in.
    return row | {"accepted_draft_only": split["draft"], "accepted_suffix_only": split["suffix"],
                  "accepted_both": split["both"], "draft_rounds": getattr(s, "draft_rounds", s.rounds)}


def _summarise(rows: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    decoding = seconds - sum(r["prefill_s"] for r in rows)
    forwards, rounds = sum(r["target_forwards"] for r in rows), sum(r["rounds"] for r in rows)
    return {"tokens_per_s": tokens / seconds, "decode_tokens_per_s": tokens / decoding,
            "tokens_per_target_forward": tokens / forwards,
            "mean_acceptance_length": 1 + sum(r["accepted"] for r in rows) / rounds if rounds else 1.0,
            "accepted_by_source": {k: sum(r[f"accepted_{k}"] for r in rows)
                                   for k in ("draft_only", "suffix_only", "both")},
            "draft_round_share": sum(r["draft_rounds"] for r in rows) / forwards,
            "share_matching_target": statistics.mean(r["matches_target"] for r in rows), "tokens": tokens}


def _ratios(summary: dict) -> None:
    """Speed-ups against the target alone: decoding only (the prefill is the same work for every method), and
    end to end."""
    alone = summary["target_alone"]
    for s in summary.values():
        s["x_target_alone"] = s["decode_tokens_per_s"] / alone["decode_tokens_per_s"]
        s["x_target_alone_end_to_end"] = s["tokens_per_s"] / alone["tokens_per_s"]


def _time_prompts(engines, prompts: list[tuple[str, list[int]]], params, rows: dict, desc: str) -> None:
    for label, prompt in tqdm(prompts, desc=desc, unit="prompt"):
        outputs = {}
        for name, engine in engines.items():
            row = _run(engine, prompt, params, cluster=label.split(":")[0])
            outputs[name] = row["output_ids"]
            rows[name].append({"label": label, **row})
        for name in engines:
            rows[name][-1]["matches_target"] = outputs[name] == outputs["target_alone"]


def run_suffix_bench(args, log=print) -> dict:
    models = ModelConfig(target=args.target, draft="self", draft_layers=args.draft_layers, shortlist=args.shortlist,
                         device=args.device, dtype=args.dtype, torch_threads=args.threads)
    base = build_engine(models, EngineConfig(record=False))
    target, tokenizer = base.target, base.tokenizer
    train = load_gsm8k_train(args.distill_records) if args.distill_records else []
    draft, recipe = distilled_draft(base, train, args.max_tokens, log) if train else (base.draft, None)
    start = time.perf_counter()
    curve = measure_verification_cost(target, TreeConfig().max_nodes + 1)
    log(f"[suffix] verification cost curve measured in {time.perf_counter() - start:.0f} s: "
        f"T(1) {curve[1]:.1f} ms, T(8)/T(1) {curve[8] / curve[1]:.2f}, T(33)/T(1) {curve[max(curve)] / curve[1]:.2f}")
    engines = _engines(target, tokenizer, draft, curve)
    for engine in engines.values():
        engine.warm_up()
    params = SamplingParams(max_tokens=args.max_tokens)

    categories = [c.strip() for c in args.suffix_categories.split(",") if c.strip()]
    by_category = {c: load_questions(args.data, [c]) for c in categories}
    warm, timed = [], []
    for c, qs in by_category.items():
        ids = [(f"{c}:{q['question_id']}", chat_prompt_ids(tokenizer, q["turns"][0])) for q in qs]
        warm += ids[: args.warm_traffic]
        timed += ids[args.warm_traffic : args.warm_traffic + args.per_category]
    for label, prompt in tqdm(warm, desc="bench suffix: traffic", unit="prompt"):
        for name in ("suffix_only", "fused"):
            engines[name].generate(prompt, params, cluster=label.split(":")[0])

    rows = {name: [] for name in engines}
    _time_prompts(engines, timed, params, rows, "bench suffix: categories")
    per_category = {}
    for c in categories:
        summary = {name: _summarise([r for r in rows[name] if r["label"].startswith(c + ":")]) for name in engines}
        _ratios(summary)
        per_category[c] = summary

    stream_rows = {name: [] for name in engines}
    stream = [(f"stream:{label}", prompt) for label, prompt in timed[:: max(1, len(timed) // args.stream_prompts)]]
    stream = stream[: args.stream_prompts]
    for rep in range(args.repeats):
        _time_prompts(engines, stream, params, stream_rows, f"bench suffix: repeated stream {rep + 1}/{args.repeats}")
    n = len(stream)
    repeated = {name: _summarise(r[n:]) for name, r in stream_rows.items()}  # the repeats, not the first sends
    _ratios(repeated)

    draft_step = forward_cost_curve(draft, ks=(1,), reps=30)[1]
    result = {"benchmark": "suffix", "environment": environment(), "config": {
        "target": args.target, "dtype": str(target.dtype).removeprefix("torch."), "max_tokens": args.max_tokens,
        "per_category": args.per_category, "warm_traffic": args.warm_traffic, "repeats": args.repeats,
        "stream_prompts": n, "draft_layers": args.draft_layers, "distillation": recipe,
        "suffix": SuffixConfig().model_dump(), "tree": TreeConfig().model_dump()},
        "verification_ms": curve, "draft_step_ms": draft_step, "c": draft_step / curve[1],
        "per_category": per_category, "repeated_stream": repeated,
        "traffic_index": engines["fused"].traffic.stats(),
        "rows": {"categories": rows, "stream": stream_rows}}
    for part in result["rows"].values():
        for method_rows in part.values():
            for r in method_rows:
                r.pop("output_ids")
    path = write_json(args.out, "suffix", result)
    doc = update_doc_section(args.doc, "suffix", render_markdown(result))
    print(render_markdown(result))
    print(f"\nresults: {path}\ntable:   {doc}")
    return result


def render_markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    methods = list(next(iter(result["per_category"].values())))
    header = ["category"] + [f"{m} tok/fwd · ×" for m in methods]
    rows = []
    for c, summary in [*result["per_category"].items(), ("repeated stream", result["repeated_stream"])]:
        rows.append([c] + [f"{summary[m]['tokens_per_target_forward']:.2f} · {summary[m]['x_target_alone']:.2f}×"
                           for m in methods])
    fused = {c: s["fused"] for c, s in result["per_category"].items()}
    sources = {c: s["accepted_by_source"] for c, s in fused.items()}
    matching = min(s[m]["share_matching_target"] for s in result["per_category"].values() for m in methods)
    return "\n".join([
        "## Suffix speculation fused with the draft (`osd bench suffix`)", "",
        (f"{cfg['target']} in {cfg['dtype']}, {cfg['max_tokens']} new tokens, {cfg['per_category']} held-out prompts "
        f"per category after {cfg['warm_traffic']} seen ones, greedy; draft: first {cfg['draft_layers']} layers "
        f"distilled on {cfg['distillation']['records'] if cfg['distillation'] else 0} GSM8K records "
        f"(c = {result['c']:.2f}); {env['threads']} threads, {env['date']}. Each cell: tokens per target forward · "
        f"decoding tok/s against the target alone in the same run (the prompt's prefill, the same work for every "
        f"method, left out; end-to-end ratios in the JSON)."), "",
        table(header, rows), "",
        f"Repeated stream: {cfg['stream_prompts']} prompts sent {cfg['repeats']}×, ratio over the repeats. "
        f"Fused accepted tokens by source (draft only / suffix only / both): "
        + "; ".join(f"{c} {s['draft_only']}/{s['suffix_only']}/{s['both']}" for c, s in sources.items())
        + f". Lowest share of outputs equal to the target alone's: {matching:.2f}.",
    ])
