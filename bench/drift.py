"""`osd bench drift`: OSD's distribution-shift experiment, end to end through the osd endpoint.

A stream of Spec-Bench questions whose category changes in phases (default math_reasoning →
translation → summarization → qa, 40 requests each, 96 tokens, greedy) is replayed one
request at a time through ``POST /v1/chat/completions`` twice, in one run:

1. ``static``: the initial draft (v0) with the trainer paused: what a static draft gives.
2. ``online``: the same stream with the trainer on (``pause_when_busy`` off: a closed-loop
   client leaves no idle time on 2 cores), starting from the same v0. The static run's
   records are trimmed from the buffer first, so the online draft only learns from what it
   has seen so far in its own stream — never from a later phase.

Then, in the same process while the deployment idles: the target alone (no draft) on every
4th question of the stream, for the end-to-end baseline, and the draft/target step-time
ratio c, for the analytic speedup (1 − α^(γ+1)) / ((1 − α)(γc + 1)).

Outputs: ``bench/results/drift.json`` (every request's stats), ``docs/drift.png`` (α̂ per
request, moving average 20, both runs, phase boundaries, hot-swap markers; and tokens/s),
and a markdown summary in ``docs/benchmarks.md`` (section ``drift``).

Without ``--url`` the command deploys everything itself (embedded Redis, local Ray with 2
CPUs, the osd app: 1 replica + the trainer) and stops it afterwards. With ``--url`` it
replays the stream once through that endpoint (whatever its trainer does) and skips the
static run, which needs a deployment it controls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from bench.report import environment, save_figure, table, update_doc_section, write_json
from trainers.config import DistillConfig

DEFAULT_PHASES = ("math_reasoning", "translation", "summarization", "qa")
PLOT_WINDOW = 20  # the moving average
EDGE = 10  # requests averaged for "start of phase" / "end of phase"
RECOVERED = 0.9  # recovered = moving average back to this share of the phase's end level


# --------------------------------------------------------------------------- the stream


def phased_stream(questions: Sequence[dict], phases: Sequence[str], per_phase: int) -> list[dict]:
    """``per_phase`` questions of each category in ``phases`` order (file order within a phase),
    each tagged with its ``phase`` index."""
    stream = []
    for i, category in enumerate(phases):
        rows = [q for q in questions if q["category"] == category][:per_phase]
        if len(rows) < per_phase:
            raise ValueError(f"category {category!r} has {len(rows)} questions; --per-phase {per_phase} needs more")
        stream += [{**q, "phase": i} for q in rows]
    return stream


@dataclass
class Served:
    """One request of a replay, as the endpoint reported it."""

    index: int
    phase: int
    category: str
    question_id: int
    ok: bool
    latency_s: float
    completion_tokens: int = 0
    draft_version: int | None = None
    alpha_hat: float | None = None
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    target_forwards: int = 0
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.latency_s if self.ok and self.latency_s > 0 else 0.0


def serve_one(http: httpx.Client, index: int, question: dict, max_tokens: int) -> Served:
    """One greedy chat completion; failures come back as ``ok=False`` with the reason."""
    body = {"messages": [{"role": "user", "content": question["turns"][0]}], "max_tokens": max_tokens,
            "temperature": 0}
    base = dict(index=index, phase=question["phase"], category=question["category"],
                question_id=question["question_id"])
    start = time.perf_counter()
    try:
        resp = http.post("/v1/chat/completions", json=body)
        latency = time.perf_counter() - start
        resp.raise_for_status()
        data = resp.json()
        osd = data.get("osd") or {}
        return Served(**base, ok=True, latency_s=latency, completion_tokens=int(data["usage"]["completion_tokens"]),
                      draft_version=osd.get("draft_version"), alpha_hat=osd.get("alpha_hat"),
                      proposed=int(osd.get("proposed", 0)), accepted=int(osd.get("accepted", 0)),
                      rounds=int(osd.get("rounds", 0)), target_forwards=int(osd.get("target_forwards", 0)))
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return Served(**base, ok=False, latency_s=time.perf_counter() - start, error=f"{type(e).__name__}: {e}")


def replay(url: str, stream: Sequence[dict], max_tokens: int, label: str, timeout_s: float = 600.0,
           say: Callable[[str], None] = print) -> list[Served]:
    """The stream, one request at a time, with a progress line per request."""
    rows: list[Served] = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) as http:
        for i, q in enumerate(stream):
            rows.append(r := serve_one(http, i, q, max_tokens))
            ma = moving_average([x.alpha_hat for x in rows], PLOT_WINDOW)[-1]
            say(f"[{label}] {i + 1}/{len(stream)} {r.category:<15} v{r.draft_version} "
                f"α̂ {_f(r.alpha_hat)} (ma{PLOT_WINDOW} {_f(ma)}) {r.tokens_per_s:5.1f} tok/s"
                + ("" if r.ok else f"  FAILED: {r.error}"))
    return rows


# --------------------------------------------------------------------------- analysis


def moving_average(values: Sequence[float | None], window: int) -> list[float | None]:
    """Trailing mean over the last ``window`` entries, skipping None (None until one value is seen)."""
    out = []
    for i in range(len(values)):
        seen = [v for v in values[max(0, i - window + 1): i + 1] if v is not None]
        out.append(sum(seen) / len(seen) if seen else None)
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    seen = [v for v in values if v is not None]
    return sum(seen) / len(seen) if seen else None


def phase_table(rows: Sequence[Served], phases: Sequence[str]) -> list[dict]:
    """Per phase: α̂ over its first and last EDGE requests, tokens/s, and — for every phase after
    the first — the dip at its start and the requests until the moving average recovers.

    dip = MA20 just before the switch − the lowest MA20 in the new phase's first half (the
    trough); recovery = requests after the switch until, from the trough on, MA20 is back to
    RECOVERED × the new phase's end level (None if it never is). MA20 spans the boundary, as in
    the plot.
    """
    ma = moving_average([r.alpha_hat for r in rows], PLOT_WINDOW)
    out = []
    for p, category in enumerate(phases):
        idx = [r.index for r in rows if r.phase == p]
        if not idx:
            continue
        alphas = [rows[i].alpha_hat for i in idx]
        entry = {"phase": p, "category": category, "requests": len(idx),
                 "alpha_start": _mean(alphas[:EDGE]), "alpha_end": _mean(alphas[-EDGE:]),
                 "tokens_per_s": _mean([rows[i].tokens_per_s for i in idx if rows[i].ok]),
                 "versions": sorted({rows[i].draft_version for i in idx if rows[i].draft_version is not None})}
        first = idx[0]
        if first > 0 and ma[first - 1] is not None:
            early = [(m, k) for k, m in enumerate(ma[first: first + max(1, len(idx) // 2)]) if m is not None]
            trough, at = min(early) if early else (None, 0)
            entry["dip"] = ma[first - 1] - trough if trough is not None else None
            end_level = ma[idx[-1]]
            entry["recovery_requests"] = next(
                (k for k in range(at, len(idx)) if ma[idx[k]] is not None and end_level is not None
                 and ma[idx[k]] >= RECOVERED * end_level), None)
        out.append(entry)
    return out


def analytic_speedup(alpha: float | None, gamma: int, c: float) -> float | None:
    """Expected tokens per target forward over the cost of a round, relative to plain decoding."""
    if alpha is None:
        return None
    tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


def swap_points(rows: Sequence[Served]) -> list[tuple[int, int]]:
    """(request index, version) wherever the serving draft version changed."""
    out, last = [], None
    for r in rows:
        if r.draft_version is not None and r.draft_version != last:
            if last is not None:
                out.append((r.index, r.draft_version))
            last = r.draft_version
    return out


# --------------------------------------------------------------------------- report


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases, runs = result["config"]["phases"], result["runs"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colors = {"online": "#d9480f", "static": "#1c7ed6"}
    for name, rows in runs.items():
        ma = moving_average([r["alpha_hat"] for r in rows], PLOT_WINDOW)
        ax.plot(range(len(rows)), [m if m is not None else float("nan") for m in ma], color=colors.get(name),
                label=f"{name} draft", lw=2)
        tps = moving_average([r["tokens_per_s"] if r["ok"] else None for r in rows], PLOT_WINDOW)
        ax2.plot(range(len(rows)), [m if m is not None else float("nan") for m in tps], color=colors.get(name),
                 label=f"{name} draft", lw=2)
    if result.get("target_alone_tokens_per_s"):
        ax2.axhline(result["target_alone_tokens_per_s"], color="#495057", ls="--", lw=1.2, label="target alone")
    per_phase = result["config"]["per_phase"]
    for p, category in enumerate(phases):
        for a in (ax, ax2):
            if p:
                a.axvline(p * per_phase - 0.5, color="#868e96", lw=1)
        ax.text(p * per_phase + 1, 0.97, category, va="top", fontsize=9, color="#343a40")
    for index, version in result.get("swaps") or []:
        ax.plot([index], [0.02], marker="^", color=colors["online"], ms=6)
        ax.text(index, 0.06, f"v{version}", fontsize=7, ha="center", color=colors["online"])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"α̂ (moving avg of {PLOT_WINDOW})")
    ax.set_title("Acceptance under distribution shift: online distillation vs a static draft")
    ax.legend(loc="upper right")
    ax2.set_ylabel("tokens/s (moving avg)")
    ax2.set_xlabel("request (phases of the stream; ▲ = a new draft version served)")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _f(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def render_markdown(result: dict) -> str:
    cfg = result["config"]
    online, static = result["phase_table"].get("online", []), result["phase_table"].get("static", [])
    rows = []
    for i, o in enumerate(online):
        s = static[i] if i < len(static) else {}
        gap = o["alpha_end"] - s["alpha_end"] if s.get("alpha_end") is not None and o["alpha_end"] is not None else None
        rows.append([o["category"], _f(s.get("alpha_start")), _f(s.get("alpha_end")), _f(o["alpha_start"]),
                     _f(o["alpha_end"]), _f(gap, "+.3f"), _f(o.get("dip")),
                     "–" if i == 0 else ("never" if o.get("recovery_requests") is None else o["recovery_requests"]),
                     ",".join(f"v{v}" for v in o["versions"])])
    speed = result["speed"]
    srows = [[name, _f(v["tokens_per_s"], ".1f"), _f(v["vs_target"], ".2f") + "×", _f(v["alpha_hat"]),
              _f(v["analytic_speedup"], ".2f") + "×" if v["analytic_speedup"] is not None else "–"]
             for name, v in speed.items()]
    lines = [
        f"`osd bench drift` ({result['environment']['date']}; {len(cfg['phases'])} phases × {cfg['per_phase']} "
        f"requests, {cfg['max_tokens']} tokens, greedy, γ={cfg['gamma']}, one request at a time; "
        f"{cfg['where']}). Plot: [drift.png](drift.png).",
        "",
        table(["phase", "static α̂ start", "static α̂ end", "online α̂ start", "online α̂ end", "online − static (end)",
               "dip at switch", "requests to recover", "versions served"], rows),
        "",
        f"α̂ start/end: mean over the phase's first/last {EDGE} requests. Dip: MA{PLOT_WINDOW} just before the "
        f"switch minus its lowest value in the new phase's first half; recovery: requests until MA{PLOT_WINDOW} is "
        f"back to {RECOVERED:.0%} of the phase's end level.",
        "",
        table(["run", "tokens/s", "vs target alone", "α̂ (whole run)", "analytic speedup from α̂ and c"], srows),
        "",
        f"c = draft step / target step = {cfg['c']:.3f} (draft {cfg['draft_step_ms']:.1f} ms, target "
        f"{cfg['target_step_ms']:.1f} ms, 1 thread); analytic speedup = (1 − α^(γ+1)) / ((1 − α)(γc + 1)). "
        f"Trainer: {result.get('trainer_summary') or 'n/a'}.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def add_bench_drift_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench drift (uses --max-tokens (96), --gamma, the model args, --redis-url, "
                                  "--url, --replica-threads, --trainer-threads, --deploy-timeout, --plot (default docs/drift.png))")
    g.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                   help="comma-separated Spec-Bench categories, in stream order")
    g.add_argument("--per-phase", type=int, default=40, help="requests per phase (default 40)")
    g.add_argument("--drift-lr", type=float, default=3e-3,
                   help="trainer learning rate (default 3e-3, bench distill's best for this draft)")
    g.add_argument("--drift-steps", type=int, default=4, help="optimizer steps per trainer update (default 4)")
    g.add_argument("--drift-update-interval", type=int, default=8,
                   help="training records per trainer update (default 8, as OSD)")


def drift_app_config(args: argparse.Namespace, redis_url: str, max_clients: int):
    """The deployment: 1 replica + the trainer training under load, distilling the first-2-layer
    self-draft with embeddings and head frozen (bench distill's best construction)."""
    from actors.config import OsdAppConfig, TrainerSettings
    from cli.models import model_configs

    models, engine = model_configs(args, torch_threads=0)  # replicas and trainer set their own threads
    engine = engine.model_copy(update={"speculation": "always"})  # α is measured on every round, not on probes
    return OsdAppConfig(
        model_name="osd",
        models=models,
        engine=engine,
        redis_url=redis_url,
        distill=DistillConfig(lr=args.drift_lr, steps_per_update=args.drift_steps,
                              update_interval=args.drift_update_interval, freeze_embeddings=True, freeze_head=True),
        num_replicas=1, replica_num_cpus=1.0, replica_torch_threads=args.replica_threads,
        trainer=TrainerSettings(num_cpus=0.5, torch_threads=args.trainer_threads, pause_when_busy=False,
                                poll_interval_s=0.2, flush_idle_s=60.0),  # full updates of 8 at ~4 requests a minute
    )


def forget_static_run(redis_url: str) -> None:
    """Drop the static run's records (and dashboard history): the online run must learn only
    from its own stream so far, never from a later phase."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match="osd:records:*", _type="stream"):
            client.xtrim(key, maxlen=0, approximate=False)
        for key in client.scan_iter(match="osd:dash:*"):
            client.delete(key)
    finally:
        client.close()


def measure_baselines(args: argparse.Namespace, stream: Sequence[dict], say: Callable[[str], None]) -> dict:
    """Target alone on every 4th question, and the step times for c, in this process (1 thread,
    like the replica) while the deployment idles."""
    import torch

    from cli.models import model_configs
    from osd.config import SamplingParams
    from osd.data.workloads import chat_prompt_ids
    from osd.decoding.cost import forward_cost_curve
    from osd.decoding.engine import SpeculativeEngine, build_engine

    torch.set_num_threads(args.replica_threads)
    engine = build_engine(*model_configs(args, torch_threads=args.replica_threads))
    plain = SpeculativeEngine(engine.target, engine.tokenizer, None, engine.config)
    params = SamplingParams(max_tokens=args.max_tokens)
    plain.generate(chat_prompt_ids(engine.tokenizer, "warm up"), SamplingParams(max_tokens=8))
    tokens = seconds = 0.0
    sample = list(stream)[::4]
    for i, q in enumerate(sample):
        gen = plain.generate(chat_prompt_ids(engine.tokenizer, q["turns"][0]), params)
        tokens, seconds = tokens + gen.stats.output_tokens, seconds + gen.stats.elapsed_s
        say(f"[target alone] {i + 1}/{len(sample)} {gen.stats.tokens_per_second:5.1f} tok/s")
    draft_ms = forward_cost_curve(engine.draft, ks=(1,), reps=30)[1]
    target_ms = forward_cost_curve(engine.target, ks=(1,), reps=30)[1]
    return {"target_alone_tokens_per_s": tokens / seconds, "target_alone_requests": len(sample),
            "draft_step_ms": draft_ms, "target_step_ms": target_ms, "c": draft_ms / target_ms}


def _run_summary(rows: Sequence[Served], target_tps: float, gamma: int, c: float) -> dict:
    ok = [r for r in rows if r.ok]
    tps = sum(r.completion_tokens for r in ok) / sum(r.latency_s for r in ok) if ok else 0.0
    alpha = _mean([r.alpha_hat for r in ok])
    return {"tokens_per_s": tps, "vs_target": tps / target_tps if target_tps else None, "alpha_hat": alpha,
            "analytic_speedup": analytic_speedup(alpha, gamma, c), "ok": len(ok), "requests": len(rows)}


def run_drift_bench(args: argparse.Namespace) -> dict:
    import logging
    from dataclasses import asdict

    from bench.serve import HttpTrainerStatus, check_endpoint, deployed_endpoint
    from osd.data.workloads import load_questions

    logging.getLogger("httpx").setLevel(logging.WARNING)
    say = lambda text: print(text, flush=True)  # noqa: E731
    phases = tuple(p for p in args.phases.split(",") if p)
    stream = phased_stream(load_questions(args.data, list(phases)), phases, args.per_phase)
    started = time.perf_counter()
    runs: dict[str, list[Served]] = {}
    trainer_summary = None
    if args.url:
        check_endpoint(args.url)
        where = f"against `{args.url}` (online only: the static run needs a deployment it controls)"
        runs["online"] = replay(args.url, stream, args.max_tokens, "online", say=say)
        trainer_summary = HttpTrainerStatus(args.url).status()
        info = {"endpoint": "external"}
    else:
        if args.redis_url:
            raise ValueError("bench drift trims the buffer between its two runs, so it only deploys with its own "
                             "embedded Redis; drop --redis-url (or benchmark a running service with --url)")
        where = ("local Ray (2 CPUs): 1 replica (1 thread) + the trainer (1 thread, training while serving, "
                 f"lr {args.drift_lr}, {args.drift_steps} steps per update of {args.drift_update_interval} records, "
                 f"first {args.draft_layers} layers with embeddings and head frozen, gate half-life "
                 f"{DistillConfig().gate_half_life:g} records)")
        with deployed_endpoint(args, 1, say, config_builder=drift_app_config) as (url, control, info):
            runs["static"] = replay(url, stream, args.max_tokens, "static", say=say)  # trainer paused since deploy
            forget_static_run(info["redis_url"])
            control.set_mode("training")
            runs["online"] = replay(url, stream, args.max_tokens, "online", say=say)
            control.set_mode("paused")
            status = control.status() or {}
            trainer_summary = {k: status.get(k) for k in ("updates", "promotions", "rejections", "records_trained",
                                                          "live_version", "errors")}
    baselines = measure_baselines(args, stream, say)
    target_tps = baselines["target_alone_tokens_per_s"]
    result = {
        "benchmark": "drift", "environment": environment(),
        "config": {"phases": list(phases), "per_phase": args.per_phase, "max_tokens": args.max_tokens,
                   "gamma": args.gamma, "target": args.target, "draft": args.draft, "draft_layers": args.draft_layers,
                   "where": where, **{k: baselines[k] for k in ("c", "draft_step_ms", "target_step_ms")}},
        "deployment": {k: v for k, v in info.items() if k != "redis_url"}, "total_s": time.perf_counter() - started,
        "target_alone_tokens_per_s": target_tps, "target_alone_requests": baselines["target_alone_requests"],
        "trainer_summary": trainer_summary,
        "runs": {name: [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in rows] for name, rows in runs.items()},
        "phase_table": {name: phase_table(rows, phases) for name, rows in runs.items()},
        "speed": {**{name: _run_summary(rows, target_tps, args.gamma, baselines["c"]) for name, rows in runs.items()},
                  "target alone": {"tokens_per_s": target_tps, "vs_target": 1.0, "alpha_hat": None,
                                   "analytic_speedup": None}},
        "swaps": swap_points(runs["online"]),
    }
    path = write_json(args.out, "drift", result)
    plot_path = args.plot or "docs/drift.png"
    plot(result, plot_path)
    markdown = render_markdown(result)
    print("\n" + markdown)
    print(f"\nresults: {path}\nplot:    {plot_path}\ntable:   {update_doc_section(args.doc, 'drift', markdown)}")
    return result
