"""Trees against chains: the same draft as a chain (fixed γ), a static tree and a dynamic tree.

`bench_trees` runs every method on the same target object, prompt by prompt in turn (so
machine noise hits all alike), and reports tokens per target forward, end-to-end tokens/s
against the target alone, α̂ (Σ min(p, q) at verified positions) and, for trees, the
achieved per-node acceptance next to the multi-draft bound α*. Under greedy decoding every
method must reproduce the target's output (losslessness), so tokens/s compare like for like.
Not wired into the CLI; `render_markdown` gives the docs/benchmarks.md section.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from tqdm.auto import tqdm

from osd.bench.report import environment, table
from osd.config import SamplingParams
from osd.engine import Generation, SpeculativeEngine
from osd.tree_engine import TreeConfig, TreeSpeculativeEngine, measure_verification_cost

DEFAULT_STATIC = TreeConfig(shape="static", branching=[4, 2, 2, 1])
DEFAULT_DYNAMIC = TreeConfig(shape="dynamic", top_k=4, max_depth=6, max_nodes=32)


def bench_trees(engine: SpeculativeEngine, prompts: Sequence[list[int]], params: SamplingParams | None = None,
                gamma: int | None = None, static: TreeConfig | None = None, dynamic: TreeConfig | None = None,
                cost_curve: Mapping[int, float] | None = None, alpha_star: bool = True,
                progress: bool = True) -> dict:
    """Target alone, chain (γ), static tree and dynamic tree, all with `engine`'s target and draft.

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
           "target_forwards": s.target_forwards, "rounds": s.rounds, "accepted": s.accepted,
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
             f(s["mean_tree_nodes"]), f(s["alpha_hat"]), f(s["node_acceptance"]), bound(s),
             same(s)]
            for name, s in result["summary"].items()]
    curve = result["target_forward_ms_by_new_tokens"]
    decoding = "greedy" if cfg["temperature"] == 0 else f"temperature {cfg['temperature']}, top-p {cfg['top_p']}, top-k {cfg['top_k']}"
    return "\n".join([
        f"## Token trees (`bench_trees`, {env['date']})",
        "",
        f"{cfg['prompts']} prompts × {cfg['max_tokens']} tokens, {decoding}; chain γ={cfg['gamma']}, static branching "
        f"{cfg['static']['branching']}, dynamic top-k {cfg['dynamic']['top_k']} / depth ≤ {cfg['dynamic']['max_depth']} / "
        f"≤ {cfg['dynamic']['max_nodes']} nodes; torch {env['torch']}, {env['threads']} threads on {env['cpu_count']} cores.",
        "",
        table(["method", "tokens / target fwd", "tok/s", "× target", "tree nodes", "α̂", "node accept", "α*", "same output"],
              rows),
        "",
        "α̂: Σ min(p, q) at verified positions (p at temperature 1 under greedy). node accept: share of verified tree "
        "nodes that accepted a child; α*: the best any lossless rule could do with the same children (Hu et al.; "
        "for top-k children the target's mass on them, which point-mass verification reaches; a range where q's "
        "tail was cut from the enumeration).",
        "",
        "Target forward cost (ms) by new tokens: "
        + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(curve.items())) + ".",
    ])
