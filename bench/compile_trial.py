"""`python -m bench.compile_trial`: where a target forward's time goes, and whether torch.compile pays.

1. torch.profiler over target forwards of 1 and 8 new tokens on a 200-token preallocated cache
   (the engine's decode and verify shapes) and one draft step: the share of self CPU time in
   matrix arithmetic (linear/matmul/attention) against everything else (norms, rotary, casts,
   cache writes, Python-side op dispatch).
2. torch.compile (inductor, CPU, dynamic shapes) of the same target against eager: compile
   time (the replica-start warm-up it would need) and T(k) for k = 1, 4, 8, 16, measured
   interleaved. The engine would keep it only if it pays; this measures whether it does.

Results go to bench/results/compile_trial.json and the `compile` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.report import environment, table, update_doc_section, write_json
from osd.config import EngineConfig, ModelConfig
from osd.decoding.cost import forward_cost_curve
from osd.decoding.drafting import crop_cache
from osd.decoding.engine import build_engine
from osd.decoding.kv_cache import make_cache

ARITHMETIC = ("linear", "mm", "matmul", "addmm", "bmm", "scaled_dot_product", "_weight_int", "baddbmm")
KS = (1, 4, 8, 16)


def profile_forward(model, k: int, context: int = 200, reps: int = 5) -> dict:
    """Self CPU time by op over `reps` forwards of k new tokens: arithmetic share and the top ops."""
    vocab, device = model.config.vocab_size, next(model.parameters()).device
    cache = make_cache(model.config, "preallocated", context + k)
    with torch.inference_mode():
        model(torch.randint(0, vocab, (1, context), device=device), past_key_values=cache, logits_to_keep=1)
        for _ in range(2):  # one-off setup out of the profile
            model(torch.randint(0, vocab, (1, k), device=device), past_key_values=cache, logits_to_keep=k)
            crop_cache(cache, context)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(reps):
                model(torch.randint(0, vocab, (1, k), device=device), past_key_values=cache, logits_to_keep=k)
                crop_cache(cache, context)
            wall = (time.perf_counter() - start) / reps * 1000
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    leaf_total = sum(e.self_cpu_time_total for e in events)
    arithmetic = sum(e.self_cpu_time_total for e in events if any(a in e.key for a in ARITHMETIC))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"k": k, "wall_ms": wall, "aten_self_ms": leaf_total / 1000 / reps,
            "arithmetic_share_of_aten": arithmetic / leaf_total if leaf_total else 0.0,
            "aten_share_of_wall": leaf_total / 1000 / reps / wall,
            "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000 / reps, "calls": e.count // reps}
                        for e in top]}


def compile_trial(target, reps: int) -> dict:
    """Compile time and the interleaved eager/compiled cost curves (None if compiling failed)."""
    compiled = torch.compile(target, dynamic=True)
    start = time.perf_counter()
    try:
        forward_cost_curve(compiled, ks=KS, reps=2)  # every shape: what a replica's warm-up would pay
    except Exception as e:  # report, don't hide: the trial's answer is then "it does not run here"
        return {"compiled": False, "error": f"{type(e).__name__}: {str(e)[:500]}",
                "compile_s": time.perf_counter() - start}
    compile_s = time.perf_counter() - start
    eager, fast = {k: [] for k in KS}, {k: [] for k in KS}
    for _ in range(3):  # interleaved, so machine noise hits both alike
        for k, ms in forward_cost_curve(target, ks=KS, reps=reps).items():
            eager[k].append(ms)
        for k, ms in forward_cost_curve(compiled, ks=KS, reps=reps).items():
            fast[k].append(ms)
    eager_ms = {k: statistics.median(v) for k, v in eager.items()}
    compiled_ms = {k: statistics.median(v) for k, v in fast.items()}
    return {"compiled": True, "compile_s": compile_s, "eager_ms": eager_ms, "compiled_ms": compiled_ms,
            "speedup": {k: eager_ms[k] / compiled_ms[k] for k in KS}}


def render_markdown(result: dict) -> str:
    prof, trial = result["profile"], result["compile"]
    rows = [[p["name"], p["k"], p["wall_ms"], p["aten_share_of_wall"], p["arithmetic_share_of_aten"],
             ", ".join(f"{o['op'].removeprefix('aten::')} {o['self_ms']:.1f}" for o in p["top_ops"][:4])]
            for p in prof]
    lines = [f"## Profile and torch.compile trial (`python -m bench.compile_trial`, {result['environment']['date']})", "",
             (f"{result['config']['target']} in {result['config']['dtype']}, {result['environment']['threads']} threads, "
              "200-token preallocated cache. Profile: self CPU time of aten ops over a forward (the rest of the wall "
              "time is Python and dispatch outside aten ops)."), "",
             table(["forward", "k", "wall ms", "aten share of wall", "arithmetic share of aten", "top ops (self ms)"],
                   rows), ""]
    if trial["compiled"]:
        lines += [f"torch.compile (inductor, dynamic shapes): compiling every shape took {trial['compile_s']:.0f} s.", "",
                  table(["k", "eager ms", "compiled ms", "speed-up"],
                        [[k, trial["eager_ms"][k], trial["compiled_ms"][k], trial["speedup"][k]] for k in trial["eager_ms"]])]
    else:
        lines += [f"torch.compile did not run here: {trial['error']} (after {trial['compile_s']:.0f} s)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true", help="profile only")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--doc", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    engine = build_engine(ModelConfig(dtype=args.dtype, torch_threads=args.threads), EngineConfig(record=False))
    target, draft = engine.target, engine.draft
    profile = [{"name": "target", **profile_forward(target, k)} for k in (1, 8)]
    profile.append({"name": "draft (2 layers, full head)", **profile_forward(draft, 1)})
    trial = {"compiled": False, "error": "skipped (--no-compile)", "compile_s": 0.0} if args.no_compile \
        else compile_trial(target, args.reps)
    result = {"benchmark": "compile_trial", "environment": environment(),
              "config": {"target": "smollm2", "dtype": str(target.dtype).removeprefix("torch."), "reps": args.reps},
              "profile": profile, "compile": trial}
    path = write_json(args.out, "compile_trial", result)
    doc = update_doc_section(args.doc, "compile", render_markdown(result))
    print(render_markdown(result))
    print(f"\nresults: {path}\ntable:   {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
