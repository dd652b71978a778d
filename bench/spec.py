"""`osd bench spec`: the engine against HF generate and HF assisted generation, same prompts, greedy.

Every method runs on the same target object, question by question in turn, so machine
noise hits all of them alike; greedy outputs must agree (losslessness), so every method
produces the same tokens and tokens/s compare like for like.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from bench.report import environment, table, update_doc_section, write_json
from osd.config import EngineConfig, ModelConfig, SamplingParams
from osd.data.workloads import chat_prompt_ids, load_questions, spread_across_categories
from osd.decoding.cost import forward_cost_curve
from osd.decoding.engine import SpeculativeEngine, build_engine
from osd.models.loading import load_causal_lm, parse_dtype


def _hf_generate(target, prompt, max_tokens, assistant=None):
    ids = torch.tensor([prompt], device=target.device)
    kwargs = {"assistant_model": assistant} if assistant is not None else {}
    start = time.perf_counter()
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, **kwargs)
    elapsed = time.perf_counter() - start
    output = out[0, len(prompt):].tolist()
    return {"output_ids": output, "tokens": len(output), "seconds": elapsed, "tokens_per_s": len(output) / elapsed}


def run_spec_bench(args) -> dict:
    models = ModelConfig(target=args.target, draft=args.draft if args.draft != "none" else "self",
                         draft_layers=args.draft_layers, shortlist=args.shortlist, device=args.device,
                         dtype=args.dtype, torch_threads=args.threads)
    engine = build_engine(models, EngineConfig(gamma=args.gamma))
    target, tokenizer, draft = engine.target, engine.tokenizer, engine.draft
    plain = SpeculativeEngine(target, tokenizer, None, engine.config)
    questions = spread_across_categories(load_questions(args.data), args.questions)
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in questions]
    params = SamplingParams(max_tokens=args.max_tokens)

    methods = {
        "hf_generate": lambda p: _hf_generate(target, p, args.max_tokens),
        "hf_assisted": lambda p: _hf_generate(target, p, args.max_tokens, assistant=draft.model),
        "osd_no_draft": lambda p: _osd(plain, p, params),
        "osd_draft": lambda p: _osd(engine, p, params),
    }
    for run in methods.values():  # warm-up: first calls pay one-off kernel and allocator setup
        run(prompts[0][:32])

    rows = {name: [] for name in methods}
    for q, prompt in zip(tqdm(questions, desc="bench spec", unit="question"), prompts):
        outputs = {}
        for name, run in methods.items():
            result = run(prompt)
            outputs[name] = result["output_ids"]
            rows[name].append({"question_id": q["question_id"], "category": q["category"], **result})
        reference = outputs["hf_generate"]
        for name, ids in outputs.items():
            rows[name][-1]["matches_hf_generate"] = ids == reference

    summary = {name: _summarise(r) for name, r in rows.items()}
    base = summary["hf_generate"]["median_tokens_per_s"]
    for s in summary.values():
        s["speedup_vs_hf_generate"] = s["median_tokens_per_s"] / base if base else None

    draft_step = forward_cost_curve(draft, ks=(1,), reps=40)[1]
    target_curve = forward_cost_curve(target)
    standard = load_causal_lm(models.target, device=models.device, dtype=parse_dtype(models.dtype))
    standard_curve = forward_cost_curve(standard)  # the untransposed layout, for the kernel-choice comparison
    del standard
    result = {
        "benchmark": "spec", "environment": environment(), "config": {
            "questions": len(questions), "max_tokens": args.max_tokens, "gamma": args.gamma,
            "target": args.target, "draft": models.draft, "draft_layers": args.draft_layers},
        "summary": summary,
        "draft_step_ms": draft_step, "target_step_ms": target_curve[1], "c": draft_step / target_curve[1],
        "target_forward_ms_by_new_tokens": target_curve,
        "target_forward_ms_by_new_tokens_standard_layout": standard_curve,
        "per_question": rows,
    }
    path = write_json(args.out, "spec", result)
    doc = update_doc_section(args.doc, "spec", render_markdown(result))
    print(render_markdown(result))
    print(f"\nresults: {path}\ntable:   {doc}")
    return result


def _osd(engine: SpeculativeEngine, prompt, params) -> dict:
    out = engine.generate(prompt, params)
    s = out.stats
    return {"output_ids": out.output_ids, "tokens": s.output_tokens, "seconds": s.elapsed_s,
            "tokens_per_s": s.tokens_per_second, "mean_acceptance_length": s.mean_acceptance_length,
            "alpha_hat": s.alpha_hat, "target_forwards": s.target_forwards}


def _summarise(rows: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    out = {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
           "total_tokens": tokens, "all_match_hf_generate": all(r.get("matches_hf_generate", True) for r in rows)}
    if "target_forwards" in rows[0]:
        out["target_forwards_per_token"] = sum(r["target_forwards"] for r in rows) / tokens
        out["mean_acceptance_length"] = statistics.mean(r["mean_acceptance_length"] for r in rows)
        alphas = [r["alpha_hat"] for r in rows if r["alpha_hat"] is not None]
        out["alpha_hat"] = statistics.mean(alphas) if alphas else None
    return out


def render_markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    rows = []
    for name, s in result["summary"].items():
        rows.append([name, s["median_tokens_per_s"], s["speedup_vs_hf_generate"],
                     s.get("mean_acceptance_length", "–"), s.get("alpha_hat") if s.get("alpha_hat") is not None else "–",
                     s.get("target_forwards_per_token", "–"), "yes" if s["all_match_hf_generate"] else "NO"])
    curve, standard = result["target_forward_ms_by_new_tokens"], result["target_forward_ms_by_new_tokens_standard_layout"]
    ks = list(curve)
    return "\n".join([
        f"## Speculative decoding (`osd bench spec`, {env['date']})",
        "",
        f"{cfg['questions']} Spec-Bench questions across categories, greedy, max_tokens={cfg['max_tokens']}, "
        f"γ={cfg['gamma']}, target `{cfg['target']}`, draft `{cfg['draft']}` ({cfg['draft_layers']} layers, untrained); "
        f"torch {env['torch']}, {env['threads']} threads on {env['cpu_count']} cores.",
        "",
        table(["method", "median tok/s", "× hf_generate", "mean accept len", "α̂", "target fwd / token", "same output"], rows),
        "",
        f"Draft step {result['draft_step_ms']:.1f} ms, target step {result['target_step_ms']:.1f} ms: c = {result['c']:.3f}.",
        "",
        "Target forward cost (ms, lower quartile) over k new tokens on a 200-token cache, with the engine's "
        "[in, out] weight layout and with the standard [out, in] layout:",
        "",
        table(["k"] + [str(k) for k in ks],
              [["[in, out] layout"] + [curve[k] for k in ks], ["standard layout"] + [standard[k] for k in ks]]),
    ])
