"""`osd bench spec` (`make bench`): does speculation pay on this machine? Side by side, per dtype.

For each dtype (float32, bfloat16 by default), on the same target object and the same
prompts, question by question in turn so machine noise hits every method alike:

- the verification curve T(k)/T(1) (the engine's cache and weight layout, and the other layout),
  and the draft step c = T_draft(1) / T_target(1);
- HF `generate` and HF assisted generation (the untrained self-draft as assistant);
- osd with no draft (the target alone), with the untrained default draft (speculation
  'always' and 'auto'), and with the same draft after a short online distillation on GSM8K
  training questions (the service's recipe: first 2 layers, embeddings and head frozen,
  lr 3e-3, 4 steps an update), 'always' and 'auto'.

In float32 greedy outputs must all agree (lossless), so tokens/s compare like for like. In
bfloat16 logits are spaced 0.125 apart near 26, so a forward over k tokens and HF's forward
over one can round a near-tie differently: "= HF" gives the share of prompts whose output is
HF generate's token for token. Speed-ups are ratios within one dtype and one run: the target
alone (osd_no_draft) is 1.0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from tqdm.auto import tqdm

from bench.distill import collect_records, train_on_stream
from bench.report import environment, table, update_doc_section, write_json
from osd.config import EngineConfig, ModelConfig, SamplingParams
from osd.data.workloads import (
    chat_prompt_ids,
    load_gsm8k_train,
    load_questions,
    spread_across_categories,
)
from osd.decoding.cost import forward_cost_curve
from osd.decoding.engine import SpeculativeEngine, build_engine
from osd.models.loading import transpose_linear_weights
from trainers.config import DistillConfig
from trainers.shortlist import coverage

CURVE_KS = (1, 2, 4, 8, 16, 32)
# The measured recipe (docs/benchmarks.md, bench distill): frozen embeddings and head, lr 3e-3, 4 steps an update.
# The service's recipe (trainers.config.DistillConfig's defaults), held-out share included: the
# held-out records are what a grown shortlist's coverage is measured on.
RECIPE = dict(lr=3e-3, steps_per_update=4, update_interval=8, batch_size=8, freeze_embeddings=True, freeze_head=True,
              holdout_fraction=0.2, shortlist_size=4096, shortlist_coverage=0.9)


def _hf_generate(target, prompt, max_tokens, assistant=None):
    ids = torch.tensor([prompt], device=target.device)
    kwargs = {"assistant_model": assistant} if assistant is not None else {}
    start = time.perf_counter()
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, **kwargs)
    elapsed = time.perf_counter() - start
    output = out[0, len(prompt):].tolist()
    return {"output_ids": output, "tokens": len(output), "seconds": elapsed, "tokens_per_s": len(output) / elapsed}


def _osd(engine: SpeculativeEngine, prompt, params) -> dict:
    out = engine.generate(prompt, params)
    s = out.stats
    return {"output_ids": out.output_ids, "tokens": s.output_tokens, "seconds": s.elapsed_s,
            "tokens_per_s": s.tokens_per_second, "mean_acceptance_length": s.mean_acceptance_length,
            "alpha_hat": s.alpha_hat, "target_forwards": s.target_forwards, "rounds": s.rounds}


def _layout_curve(target, transposed: bool) -> dict[int, float]:
    """The cost curve of a copy of ``target`` in the other weight layout (the one the engine did not pick)."""
    other = copy.deepcopy(target)
    if not transposed:
        transpose_linear_weights(other)
    else:  # undo: a fresh standard-layout copy
        for module in other.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.is_contiguous():
                module.weight = torch.nn.Parameter(module.weight.contiguous(), requires_grad=False)
    curve = forward_cost_curve(other, ks=CURVE_KS)
    del other
    return curve


def distilled_draft(engine: SpeculativeEngine, questions: list[dict], max_tokens: int, log) -> tuple[object, dict]:
    """The engine's draft after online distillation on the target's answers to ``questions``."""
    prompts = [chat_prompt_ids(engine.tokenizer, q["turns"][0]) for q in questions]
    start = time.perf_counter()
    records, _ = collect_records(engine.target, engine.tokenizer, prompts, max_tokens)
    collected = time.perf_counter()
    distiller = train_on_stream(copy.deepcopy(engine.draft), records, DistillConfig(**RECIPE))
    log(f"[spec] distilled the draft on {len(records)} GSM8K-train records ({distiller.updates} updates) in "
        f"{time.perf_counter() - collected:.0f} s (records {collected - start:.0f} s)")
    trained = distiller.candidate()
    grown = trained.shortlist
    covered = coverage(grown, list(distiller.holdout))
    log(f"[spec] shortlist head: {'full' if grown is None else f'{grown.numel()} ids grown from traffic'}, "
        f"held-out coverage {covered:.3f}")
    return trained, {"records": len(records), "updates": distiller.updates, **RECIPE,
                     "shortlist_ids": None if grown is None else grown.numel(), "shortlist_heldout_coverage": covered}


def bench_dtype(args, dtype: str, questions: list[dict], train_questions: list[dict], log=print) -> dict:
    """Every method on one dtype; returns its part of the result."""
    models = ModelConfig(target=args.target, draft="self", draft_layers=args.draft_layers, shortlist=args.shortlist,
                         device=args.device, dtype=dtype, torch_threads=args.threads)
    engine = build_engine(models, EngineConfig(gamma=args.gamma, speculation="always", record=False))
    target, tokenizer, draft = engine.target, engine.tokenizer, engine.draft
    transposed = any(isinstance(m, torch.nn.Linear) and not m.weight.is_contiguous() for m in target.modules())
    trained, recipe = (distilled_draft(engine, train_questions, args.max_tokens, log) if train_questions
                       else (None, None))

    def osd(draft_model, speculation):
        return SpeculativeEngine(target, tokenizer, draft_model,
                                 EngineConfig(gamma=args.gamma, speculation=speculation, record=False))

    params = SamplingParams(max_tokens=args.max_tokens)
    engines = {"osd_no_draft": osd(None, "always"), "osd_untrained_always": osd(draft, "always"),
               "osd_untrained_auto": osd(draft, "auto")}
    if trained is not None:
        engines |= {"osd_distilled_always": osd(trained, "always"), "osd_distilled_auto": osd(trained, "auto")}
    methods = {"hf_generate": lambda p: _hf_generate(target, p, args.max_tokens),
               "hf_assisted": lambda p: _hf_generate(target, p, args.max_tokens, assistant=draft.model)}
    methods |= {name: (lambda p, e=e: _osd(e, p, params)) for name, e in engines.items()}
    for e in engines.values():
        e.warm_up()
    for name in ("hf_generate", "hf_assisted"):  # their one-off setup too
        methods[name](list(range(3, 19)))

    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in questions]
    rows = {name: [] for name in methods}
    for q, prompt in zip(tqdm(questions, desc=f"bench spec {dtype}", unit="question"), prompts):
        outputs = {}
        for name, run in methods.items():
            result = run(prompt)
            outputs[name] = result["output_ids"]
            rows[name].append({"question_id": q["question_id"], "category": q["category"], **result})
        for name, ids in outputs.items():
            rows[name][-1]["matches_hf_generate"] = ids == outputs["hf_generate"]

    summary = {name: _summarise(r) for name, r in rows.items()}
    alone, hf = summary["osd_no_draft"]["tokens_per_s"], summary["hf_generate"]["tokens_per_s"]
    for s in summary.values():
        s["x_target_alone"] = s["tokens_per_s"] / alone
        s["x_hf_generate"] = s["tokens_per_s"] / hf
    curve = forward_cost_curve(target, ks=CURVE_KS)
    draft_step = forward_cost_curve(draft, ks=(1,), reps=40)[1]
    trained_step = forward_cost_curve(trained, ks=(1,), reps=40)[1] if trained is not None else None
    governors = {name: e.governor(e.draft).describe() for name, e in engines.items() if e.draft is not None
                 and e.config.speculation == "auto"}
    return {"dtype": str(target.dtype).removeprefix("torch."), "layout": "[in, out]" if transposed else "standard",
            "summary": summary, "target_forward_ms": curve,
            "verification_ratio": {k: curve[k] / curve[1] for k in curve},
            "other_layout_forward_ms": _layout_curve(target, transposed) if args.layouts else None,
            "draft_step_ms": draft_step, "c": draft_step / curve[1],
            "distilled_draft_step_ms": trained_step, "c_distilled": trained_step / curve[1] if trained_step else None,
            "distillation": recipe, "governors": governors,
            "per_question": rows}


def add_bench_spec_args(parser) -> None:
    g = parser.add_argument_group("bench spec (uses --questions, --max-tokens (96), --gamma, the model args)")
    g.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes to compare (float32,bfloat16)")
    g.add_argument("--categories", default="math_reasoning",
                   help="Spec-Bench categories of the timed questions, comma-separated ('' = all); math_reasoning "
                        "matches the GSM8K distillation")
    g.add_argument("--distill-records", type=int, default=48,
                   help="GSM8K training questions the 'distilled' draft learns from (0: skip the distilled rows)")
    g.add_argument("--layouts", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the weight layout the engine did not pick")
    g.add_argument("--brief", action="store_true", help="leave per-question rows out of the JSON")


def run_spec_bench(args) -> dict:
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    questions = spread_across_categories(load_questions(args.data, categories), args.questions)
    train_questions = load_gsm8k_train(args.distill_records) if args.distill_records else []
    parts = {}
    for dtype in dtypes:
        parts[dtype] = bench_dtype(args, dtype, questions, train_questions)
        parts[dtype].pop("per_question") if args.brief else None
    result = {"benchmark": "spec", "environment": environment(), "config": {
        "questions": len(questions), "categories": categories or "all", "max_tokens": args.max_tokens,
        "gamma": args.gamma, "target": args.target, "draft_layers": args.draft_layers,
        "distill_records": len(train_questions), "dtypes": dtypes}, "by_dtype": parts}
    path = write_json(args.out, "spec", result)
    doc = update_doc_section(args.doc, "spec", render_markdown(result))
    print(render_markdown(result))
    print(f"\nresults: {path}\ntable:   {doc}")
    return result


def _summarise(rows: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    out = {"tokens_per_s": tokens / seconds, "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
           "total_tokens": tokens, "all_match_hf_generate": all(r.get("matches_hf_generate", True) for r in rows),
           "share_matching_hf_generate": sum(r.get("matches_hf_generate", True) for r in rows) / len(rows)}
    if "target_forwards" in rows[0]:
        out["tokens_per_target_forward"] = tokens / sum(r["target_forwards"] for r in rows)
        out["speculative_round_share"] = sum(r["rounds"] for r in rows) / sum(r["target_forwards"] for r in rows)
        alphas = [r["alpha_hat"] for r in rows if r["alpha_hat"] is not None]
        out["alpha_hat"] = statistics.mean(alphas) if alphas else None
    return out


def _distilled_cost(p: dict) -> str:
    """', distilled draft ...': its step and c through the shortlist it grew (results before that lack it)."""
    if not p.get("c_distilled"):
        return ""
    d = p["distillation"]
    head = "full head" if d.get("shortlist_ids") is None else (
        f"{d['shortlist_ids']}-id shortlist grown from traffic, held-out coverage {d['shortlist_heldout_coverage']:.3f}")
    return f"; distilled draft ({head}) {p['distilled_draft_step_ms']:.1f} ms: c = {p['c_distilled']:.3f}"


def render_markdown(result: dict) -> str:
    cfg, env, parts = result["config"], result["environment"], result["by_dtype"]
    dtypes = list(parts)
    methods = list(next(iter(parts.values()))["summary"])
    rows = []
    for name in methods:
        row = [name]
        for d in dtypes:
            s = parts[d]["summary"][name]
            row += [s["tokens_per_s"], s["x_target_alone"], s.get("tokens_per_target_forward", "–"),
                    "all" if s["all_match_hf_generate"] else f"{s['share_matching_hf_generate']:.0%}"]
        rows.append(row)
    header = ["method"] + [f"{h} ({d})" for d in dtypes for h in ("tok/s", "× target alone", "tok/fwd", "= HF")]
    curve_rows = [[f"T(k)/T(1), {d} ({parts[d]['layout']})"] + [parts[d]["verification_ratio"][k] for k in CURVE_KS]
                  for d in dtypes]
    curve_rows += [[f"T(k) ms, {d}"] + [parts[d]["target_forward_ms"][k] for k in CURVE_KS] for d in dtypes]
    curve_rows += [[f"T(k) ms, {d}, other layout"] + [parts[d]["other_layout_forward_ms"][k] for k in CURVE_KS]
                   for d in dtypes if parts[d]["other_layout_forward_ms"]]
    lines = [
        f"## Does speculation pay here? (`osd bench spec`, {env['date']})",
        "",
        f"{cfg['questions']} Spec-Bench questions ({cfg['categories']}), greedy, max_tokens={cfg['max_tokens']}, "
        f"γ={cfg['gamma']}, target `{cfg['target']}`, self-draft of {cfg['draft_layers']} layers; 'distilled' = "
        f"after online distillation on {cfg['distill_records']} GSM8K-train answers of the target; "
        f"torch {env['torch']}, {env['threads']} threads on {env['cpu_count']} cores. tok/s = total tokens / total "
        "seconds; × target alone = against osd_no_draft in the same dtype and run.",
        "",
        table(header, rows),
        "",
        table(["curve"] + [f"k={k}" for k in CURVE_KS], curve_rows),
        "",
    ]
    for d in dtypes:
        p = parts[d]
        lines.append(f"- {d}: draft step {p['draft_step_ms']:.1f} ms, target step {p['target_forward_ms'][1]:.1f} ms: "
                     f"c = {p['c']:.3f}" + _distilled_cost(p) + "; governors: " + "; ".join(
                         f"{n}: α {g['alpha']}, best γ {g['best_gamma']}, rounds {g['rounds']}"
                         for n, g in p["governors"].items()))
    return "\n".join(lines)
