"""`osd bench trees`: ways of using one distilled draft, side by side.

Chains (fixed γ), chains with an adaptive length (HF's +2/-1 schedule, a confidence stop,
SpecDec++'s acceptance head), a static tree, a dynamic tree, and a Kangaroo early-exit
self-draft. `bench_trees` runs every method on the same target object, prompt by prompt in
turn (so machine noise hits all alike), and reports tokens per target forward, end-to-end
tokens/s against the target alone, α̂ (Σ min(p, q) at verified positions) and, for trees,
the achieved per-node acceptance next to the multi-draft bound α*. Under greedy decoding
every method must reproduce the target's output (losslessness), so tokens/s compare like
for like.

The command distils its drafts from the records `osd bench distill` leaves behind (the
stream part), and measures on that category's held-out prompts.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from bench.report import environment, table, update_doc_section, write_json
from osd.config import SamplingParams
from osd.decoding.cost import measure_verification_cost
from osd.decoding.engine import Generation, SpeculativeEngine
from osd.decoding.tree_engine import TreeConfig, TreeSpeculativeEngine
from osd.models.drafts import DraftModel

DEFAULT_STATIC = TreeConfig(shape="static", branching=[4, 2, 2, 1])
DEFAULT_DYNAMIC = TreeConfig(shape="dynamic", top_k=4, max_depth=6, max_nodes=32)


def bench_trees(engine: SpeculativeEngine, prompts: Sequence[list[int]], params: SamplingParams | None = None,
                gamma: int | None = None, static: TreeConfig | None = None, dynamic: TreeConfig | None = None,
                cost_curve: Mapping[int, float] | None = None, alpha_star: bool = True,
                progress: bool = True, extra: Mapping[str, SpeculativeEngine] | None = None) -> dict:
    """Target alone, chain (γ), static tree and dynamic tree, all with `engine`'s target and draft.

    extra: more methods by name (adaptive chains, early exit), run in the same interleaving.

    cost_curve: target forward ms by new tokens, for the dynamic tree's budget; measured on
    the target when None. α* costs time to compute; trees exclude it from their elapsed time.
    """
    if engine.draft is None:
        raise ValueError("bench_trees compares ways of using a draft; build the engine with one")
    params = params or SamplingParams(max_tokens=64)
    static = (static or DEFAULT_STATIC).model_copy(update={"alpha_star": alpha_star})
    dynamic = (dynamic or DEFAULT_DYNAMIC).model_copy(update={"alpha_star": alpha_star})
    if cost_curve is None:
        cost_curve = measure_verification_cost(engine.target, max(dynamic.max_nodes, sum(_level_sizes(static))) + 1)
    chain_config = engine.config.model_copy(update={"gamma": gamma or engine.config.gamma})
    args = (engine.target, engine.tokenizer)
    methods: dict[str, SpeculativeEngine] = {
        "target": SpeculativeEngine(*args, None, engine.config),
        f"chain_g{chain_config.gamma}": SpeculativeEngine(*args, engine.draft, chain_config),
        "static_tree": TreeSpeculativeEngine(*args, engine.draft, engine.config, static, cost_curve),
        "dynamic_tree": TreeSpeculativeEngine(*args, engine.draft, engine.config, dynamic, cost_curve),
        **(extra or {}),
    }
    warm = params.model_copy(update={"max_tokens": min(8, params.max_tokens)})
    for method in methods.values():  # first calls pay one-off kernel and allocator setup
        method.generate(prompts[0][-32:], warm)
    # The dynamic tree's acceptance calibration keeps what it learnt in warm-up: serving would too.

    rows: dict[str, list[dict]] = {name: [] for name in methods}
    for i, prompt in enumerate(tqdm(prompts, desc="bench trees", unit="prompt", disable=not progress)):
        outputs = {}
        for name, method in methods.items():
            out = method.generate(prompt, params)
            outputs[name] = out.output_ids
            rows[name].append({"prompt": i, **_row(out)})
        for name in methods:
            rows[name][-1]["matches_target"] = outputs[name] == outputs["target"]

    summary = {name: _summarise(r) for name, r in rows.items()}
    base = summary["target"]["tokens_per_s"]
    for s in summary.values():
        s["speedup_vs_target"] = s["tokens_per_s"] / base if base else None
    return {
        "benchmark": "trees", "environment": environment(),
        "config": {"prompts": len(prompts), "max_tokens": params.max_tokens, "temperature": params.temperature,
                   "top_p": params.top_p, "top_k": params.top_k, "gamma": chain_config.gamma,
                   "static": static.model_dump(), "dynamic": dynamic.model_dump()},
        "target_forward_ms_by_new_tokens": {int(k): float(v) for k, v in cost_curve.items()},
        "summary": summary, "per_prompt": rows,
    }


def _level_sizes(config: TreeConfig) -> list[int]:
    sizes, level = [], 1
    for b in config.branching:
        level *= b
        sizes.append(level)
    return sizes


def _row(out: Generation) -> dict:
    s = out.stats
    row = {"output_ids": out.output_ids, "tokens": s.output_tokens, "seconds": s.elapsed_s,
           "target_forwards": s.target_forwards, "rounds": s.rounds, "proposed": s.proposed, "accepted": s.accepted,
           "beta_sum": s.beta_sum, "beta_count": s.beta_count}
    for key in ("node_trials", "node_accepts", "alpha_star_sum", "alpha_star_low_sum", "alpha_star_count", "draft_s",
                "verify_s"):
        if hasattr(s, key):
            row[key] = getattr(s, key)
    if hasattr(s, "budgets"):
        row["tree_nodes"] = list(s.budgets)
    return row


def _ratio(rows: list[dict], num: str, den: str) -> float | None:
    total = sum(r.get(den, 0) for r in rows)
    return sum(r.get(num, 0) for r in rows) / total if total else None


def _summarise(rows: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    nodes = [n for r in rows for n in r.get("tree_nodes", [])]
    return {
        "tokens": tokens, "tokens_per_s": tokens / seconds if seconds else 0.0,
        "median_tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in rows if r["seconds"]),
        "tokens_per_target_forward": _ratio(rows, "tokens", "target_forwards"),
        "mean_acceptance_length": 1 + (_ratio(rows, "accepted", "rounds") or 0.0),
        "alpha_hat": _ratio(rows, "beta_sum", "beta_count"),
        "node_acceptance": _ratio(rows, "node_accepts", "node_trials"),
        "alpha_star": _ratio(rows, "alpha_star_sum", "alpha_star_count"),
        "alpha_star_low": _ratio(rows, "alpha_star_low_sum", "alpha_star_count"),
        "mean_tree_nodes": sum(nodes) / len(nodes) if nodes else None,
        "drafted_per_round": _ratio(rows, "proposed", "rounds"),
        "draft_share": _ratio(rows, "draft_s", "seconds"),
        "all_match_target": all(r["matches_target"] for r in rows),
    }


def render_markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]

    def f(v):
        return "–" if v is None else v

    def bound(s):
        if s["alpha_star"] is None:
            return "–"
        exact = s["alpha_star"] - s["alpha_star_low"] < 5e-4
        return f"{s['alpha_star']:.3g}" if exact else f"{s['alpha_star_low']:.3g}–{s['alpha_star']:.3g}"

    def same(s):  # sampled outputs differ by design (each method draws differently), only greedy ones must match
        return "yes" if s["all_match_target"] else "NO" if cfg["temperature"] == 0 else "–"

    rows = [[name, s["tokens_per_target_forward"] or 1.0, s["tokens_per_s"], s["speedup_vs_target"],
             f(s.get("drafted_per_round")), f(s["alpha_hat"]), f(s["node_acceptance"]), bound(s),
             same(s)]
            for name, s in result["summary"].items()]
    trained = (f" Drafts: {cfg['draft']} for chains and trees, {cfg['early_exit_draft']} for early exit, distilled on "
               f"{cfg['train_records']} {cfg['category']} records; the prompts are that category's held-out ones. "
               f"Confidence / early-exit stop below top-1 q {cfg['exit_threshold']}; the acceptance head stops past "
               f"P(reject) {cfg['head_threshold']}" if "train_records" in cfg else "")
    head = result.get("acceptance_head")
    calibration = (f" Acceptance head on the held-out rows: mean p̂ {head['mean_predicted']:.3f} vs mean label "
                   f"{head['mean_label']:.3f}, Brier {head['brier']:.3f} (a constant guess: {head['brier_constant']:.3f})."
                   if head else "")
    curve = result["target_forward_ms_by_new_tokens"]
    decoding = "greedy" if cfg["temperature"] == 0 else f"temperature {cfg['temperature']}, top-p {cfg['top_p']}, top-k {cfg['top_k']}"
    return "\n".join([
        f"## Token trees and adaptive drafting (`osd bench trees`, {env['date']})",
        "",
        f"{cfg['prompts']} prompts × {cfg['max_tokens']} tokens, {decoding}; chain γ={cfg['gamma']}, static branching "
        f"{cfg['static']['branching']}, dynamic top-k {cfg['dynamic']['top_k']} / depth ≤ {cfg['dynamic']['max_depth']} / "
        f"≤ {cfg['dynamic']['max_nodes']} nodes; torch {env['torch']}, {env['threads']} threads on {env['cpu_count']} cores."
        + trained + "." * bool(trained) + calibration,
        "",
        table(["method", "tokens / target fwd", "tok/s", "× target", "drafted / round", "α̂", "node accept", "α*",
               "same output"],
              rows),
        "",
        "drafted / round: draft tokens (tree nodes for trees) per target forward. "
        "α̂: Σ min(p, q) at verified positions (p at temperature 1 under greedy). node accept: share of verified tree "
        "nodes that accepted a child; α*: the best any lossless rule could do with the same children (Hu et al.; "
        "for top-k children the target's mass on them, which point-mass verification reaches; a range where q's "
        "tail was cut from the enumeration).",
        "",
        "Target forward cost (ms) by new tokens: "
        + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(curve.items())) + ".",
    ])


# --------------------------------------------------------------------------- the command

DEFAULT_RECORDS = "bench/results/distill_records-math_reasoning-60+20x96.osdr"


def add_bench_trees_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench trees (uses --max-tokens (64 here), --gamma, the model args)")
    g.add_argument("--trees-records", default=DEFAULT_RECORDS,
                   help=f"records from `osd bench distill` (default {DEFAULT_RECORDS}); its stream part trains the "
                        "drafts, its held-out prompts are measured")
    g.add_argument("--trees-heldout", type=int, default=20, help="held-out prompts at the end of the records (20)")
    g.add_argument("--trees-lr", type=float, default=3e-3, help="distillation learning rate (bench distill's best)")
    g.add_argument("--exit-threshold", type=float, default=0.3,
                   help="confidence stop and early exit: stop drafting below this top-1 probability")
    g.add_argument("--head-threshold", type=float, default=0.7,
                   help="acceptance head: stop once P(some token of the round is rejected) exceeds this")


def distil(target, construction: str, records: Sequence, lr: float) -> DraftModel:
    """A draft cut from `target` as bench distill's `construction`, trained online on `records` in order."""
    from bench.distill import (
        CONSTRUCTIONS,
        DistillBenchSettings,
        distill_config,
        make_draft,
        train_on_stream,
    )

    cons = CONSTRUCTIONS[construction]
    distiller = train_on_stream(make_draft(target, cons), records, distill_config(cons, lr, DistillBenchSettings()))
    return distiller.candidate()


def run_trees_bench_command(args: argparse.Namespace) -> dict:
    from bench.distill import load_records
    from osd.config import EngineConfig, ModelConfig
    from osd.data.workloads import chat_prompt_ids, load_questions
    from osd.decoding.early_exit import EarlyExitEngine
    from osd.decoding.engine import build_engine
    from trainers.acceptance_head import (
        head_calibration,
        head_examples,
        train_acceptance_head,
    )

    path = Path(args.trees_records)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make bench-distill` first (it leaves the records there), "
                                "or point --trees-records at another records file from `osd bench distill`")
    records, meta = load_records(path)
    n_held = args.trees_heldout
    if not 1 <= n_held < len(records):
        raise ValueError(f"--trees-heldout must be in [1, {len(records) - 1}] for {path} ({len(records)} records)")
    stream, held = records[:-n_held], records[-n_held:]
    gamma = args.gamma
    engine = build_engine(ModelConfig(target=args.target, draft="none", device=args.device, dtype=args.dtype,
                                      torch_threads=args.threads), EngineConfig(speculation="always", gamma=gamma, record=False))
    questions = {q["question_id"]: q for q in load_questions(args.data)}
    prompts = [chat_prompt_ids(engine.tokenizer, questions[i]["turns"][0]) for i in meta["question_ids"][-n_held:]]

    print(f"[trees] distilling the chain/tree draft (first2_frozen) and the early-exit draft (kangaroo) on "
          f"{len(stream)} records of {meta.get('category', '?')}")
    engine.draft = distil(engine.target, "first2_frozen", stream, args.trees_lr)
    kangaroo = distil(engine.target, "kangaroo", stream, args.trees_lr)
    print("[trees] training the acceptance head on the same records")
    engine.draft.acceptance_head = train_acceptance_head(engine.draft, stream, greedy=True)
    calibration = head_calibration(engine.draft.acceptance_head, head_examples(engine.draft, held, greedy=True))

    def chain(**update) -> SpeculativeEngine:
        config = engine.config.model_copy(update=update)
        return SpeculativeEngine(engine.target, engine.tokenizer, engine.draft, config)

    other_gamma = 2 if gamma != 2 else 4  # a second fixed length: "the best chain" is the better of the two
    adaptive = dict(max_gamma=8, confidence_threshold=args.exit_threshold, head_threshold=args.head_threshold)
    extra = {
        f"chain_g{other_gamma}": chain(gamma=other_gamma),
        "chain_schedule": chain(length_policy="schedule", **adaptive),
        "chain_confidence": chain(length_policy="confidence", **adaptive),
        "chain_head": chain(length_policy="head", **adaptive),
        "early_exit": EarlyExitEngine.from_engine(
            SpeculativeEngine(engine.target, engine.tokenizer, None, engine.config.model_copy(update={"gamma": 8})),
            shared_layers=2, exit_threshold=args.exit_threshold, draft=kangaroo),
    }
    result = bench_trees(engine, prompts, SamplingParams(max_tokens=args.max_tokens), gamma=gamma, extra=extra)
    result["config"].update({"records": str(path), "category": meta.get("category"), "train_records": len(stream),
                             "exit_threshold": args.exit_threshold, "head_threshold": args.head_threshold,
                             "draft": "first2_frozen (distilled)", "early_exit_draft": "kangaroo (distilled)"})
    result["acceptance_head"] = calibration
    out = write_json(args.out, "trees", {**result, "per_prompt": result["per_prompt"]})
    markdown = render_markdown(result)
    doc = update_doc_section(args.doc, "trees", markdown)
    print(markdown)
    print(f"\nresults: {out}\ntable:   {doc}")
    return result
