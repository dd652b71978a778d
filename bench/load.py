"""`osd bench load`: guidellm (the vLLM project's load generator) against the real endpoint, batched vs one at a time.

The load and its measurements are guidellm's, not ours: for each concurrency N (default 1, 4, 8, 16) it keeps N
streaming chat completions in flight (profile ``concurrent``) over Spec-Bench questions until ``requests(N)`` finished,
and reports requests/s, output tok/s, time to first token and inter-token latency (p50 and p95) from the SSE chunks it
received. Greedy (temperature 0), ``max_tokens`` new tokens per request.

Server configurations, deployed side by side as Serve applications on one local Ray (one replica each, behind the same
proxy, at route prefix ``/<mode>``), so a run measures them on the same machine at the same time:

- ``sequential``: one request at a time (``engine.max_batch`` 1), the service default engine (suffix speculation fused
  with the self-draft in one token tree). The code path before continuous batching, kept selectable.
- ``batched``: continuous batching (``engine.max_batch``, default 16) with the service's suffix speculation and the
  self-draft, as chains: per request its suffix chain or the draft's, whichever is expected to give more, chain
  depth and draft length from the measured cost of batched forwards at the current batch size (speculation 'auto').
- ``batched_off``: continuous batching with no speculation at all (no draft, no suffix).
- ``batched_draft`` (on request): continuous batching with chains of the self-draft only (no suffix).
- ``sequential_chain`` (on request): one request at a time with chains of the self-draft only, so batching and
  drafting style can be told apart.

Phases run concurrency by concurrency; within one N every mode runs in turn, the order rotated per N so drift of a
shared machine does not favour one. Only one mode has traffic at a time; the idle apps' replicas sleep.

The trainer is off in every app: this measures serving, with the draft a fresh service starts with (the untrained
self-draft). A distilled draft accepts more, so speculation gains more than here.

Ratios, all within the run: output tok/s of each mode over ``sequential`` at the same N, ``batched`` over
``batched_off`` (speculation on vs off), and inter-token latency at N = 1 of ``batched`` over ``sequential``.
Issue 16's aims: ≥ 3× output tok/s at 8 concurrent; inter-token latency at 1 client not worse than one at a time;
speculation on ≥ 1.0× off at every N.

guidellm runs from its own virtualenv (``make bench-load`` creates ``.venv-guidellm``): it pins its own click and
datasets, which the service's environment need not share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.report import environment, table, update_doc_section, write_json

MODES = ("sequential", "batched", "batched_off", "batched_draft", "sequential_chain")
DEFAULT_MODES = MODES[:3]
DEFAULT_LEVELS = (1, 4, 8, 16)
DEFAULT_GUIDELLM = ".venv-guidellm/bin/guidellm"
RAY_CPUS = 2
AIM_THROUGHPUT_AT, AIM_THROUGHPUT = 8, 3.0


class LoadBenchError(RuntimeError):
    """The load benchmark cannot run (guidellm missing, an app not deployed, guidellm failing)."""


def requests_for(concurrency: int, per_stream: int = 2, extra: int = 4) -> int:
    """Requests guidellm completes at concurrency N: enough that every stream runs several back to back."""
    return per_stream * concurrency + extra


# --------------------------------------------------------------------------- server configurations


def mode_config(mode: str, base, max_batch: int):
    """The OsdAppConfig of ``mode`` from ``base`` (the service defaults with the bench's models and threads)."""
    from osd.config import EngineConfig

    chain = EngineConfig(gamma=base.engine.gamma, speculation="auto", suffix=None, tree=None)
    models = base.models
    if mode == "sequential":
        engine = base.engine.model_copy(update={"max_batch": 1})
    elif mode == "sequential_chain":
        engine = chain
    elif mode == "batched":
        engine = chain.model_copy(update={"max_batch": max_batch, "suffix": base.engine.suffix})
    elif mode == "batched_draft":
        engine = chain.model_copy(update={"max_batch": max_batch})
    elif mode == "batched_off":
        engine = chain.model_copy(update={"max_batch": max_batch})
        models = base.models.model_copy(update={"draft": "none"})
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    # model_validate re-runs the validators on the combined config (model_copy does not)
    return type(base).model_validate({**base.model_dump(), "engine": engine.model_dump(),
                                      "models": models.model_dump()})


def base_config(args: argparse.Namespace, redis_url: str, max_clients: int):
    """Service defaults (engine included) with the bench's models, one replica, no trainer."""
    from actors.config import OsdAppConfig
    from cli.models import model_configs
    from trainers.config import TrainerSettings

    models, _ = model_configs(args, torch_threads=0)
    return OsdAppConfig(models=models, redis_url=redis_url, num_replicas=1,
                        replica_num_cpus=RAY_CPUS / len(MODES),  # every app fits Ray's CPUs; one at a time is busy
                        replica_torch_threads=args.replica_threads, max_ongoing_requests=min(32, max(16, max_clients)),
                        trainer=TrainerSettings(enabled=False))


@contextmanager
def deployed_modes(args: argparse.Namespace, modes: Sequence[str], max_clients: int,
                   say: Callable[[str], None] = print) -> Iterator[tuple[dict[str, str], dict]]:
    """Embedded Redis (one database per mode, so records and registries stay apart), a local Ray and one Serve app per
    mode behind one proxy; yields ({mode: base URL}, deployment info). Everything is stopped on the way out."""
    from actors.serve_app import deploy
    from bench.serve import free_port, local_ray
    from osd.data.redis_server import EmbeddedRedis

    redis = EmbeddedRedis().start()
    try:
        with local_ray("osd-bench-load"):
            port = free_port()
            urls, info = {}, {"deploy_s": {}, "apps": {}}
            for i, mode in enumerate(modes):
                db_url = redis.url.rsplit("/", 1)[0] + f"/{i}"
                config = mode_config(mode, base_config(args, db_url, max_clients), args.max_batch)
                say(f"[load] deploying {mode} (max_batch {config.engine.max_batch}, draft {config.models.draft}, "
                    f"suffix {'on' if config.engine.suffix else 'off'}) at 127.0.0.1:{port}/{mode} ...")
                t0 = time.perf_counter()
                deploy(config, name=f"load-{mode}", host="127.0.0.1", port=port, timeout_s=args.deploy_timeout,
                       route_prefix=f"/{mode}")
                info["deploy_s"][mode] = time.perf_counter() - t0
                info["apps"][mode] = config.model_dump(mode="json", exclude={"redis_url", "buffer", "registry"})
                urls[mode] = f"http://127.0.0.1:{port}/{mode}"
            yield urls, info
    finally:
        redis.close()


def warm_up(url: str, model: str, timeout_s: float = 300.0) -> None:
    """Two short greedy requests (one streamed) so one-off setup is not in the first phase."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=url, timeout=timeout_s) as http:
        for stream in (False, True):
            resp = http.post("/v1/chat/completions", json={**body, "stream": stream})
            if resp.status_code != 200:
                raise LoadBenchError(f"warm-up request to {url} answered {resp.status_code}: {resp.text[:300]}")


# --------------------------------------------------------------------------- guidellm


def write_prompts(questions: Sequence[dict], path: Path) -> Path:
    """One JSON line per question, {"prompt": first turn}: guidellm's json_file data, sent as the user message."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": q["turns"][0]}) + "\n" for q in questions)
    return path


def guidellm_command(exe: str, url: str, model: str, concurrency: int, requests: int, max_tokens: int,
                     prompts: Path, tokenizer: str, out: Path, seed: int = 0) -> list[str]:
    """One guidellm run: ``concurrency`` streams of greedy streaming chat completions until ``requests`` finished.
    JSON arguments (guidellm's own schema), so nothing depends on its key=value parsing."""
    arg = json.dumps
    return [
        exe, "run",
        "--backend", arg({"kind": "openai_http", "target": url, "model": model, "max_tokens": max_tokens,
                          "request_format": "/v1/chat/completions", "stream": True, "http2": False,
                          "timeout": 600.0, "extras": {"body": {"temperature": 0}}}),
        "--profile", arg({"kind": "concurrent", "streams": [concurrency]}),
        "--constraint", arg({"kind": "max_requests", "count": requests}),
        "--data", arg({"kind": "json_file", "path": str(prompts)}),
        "--tokenizer", arg({"kind": "huggingface_auto", "model": tokenizer}),
        "--seed", arg({"kind": "static", "value": seed}),
        "--output", arg({"kind": "json", "path": str(out)}),
        "--disable-console-interactive",
    ]


def run_guidellm(command: list[str], log: Path, timeout_s: float) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # the tokenizer is a local directory
    with open(log, "w") as f:
        try:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise LoadBenchError(f"guidellm ran past {timeout_s:.0f}s; its output: {log}") from None
    if done.returncode != 0:
        raise LoadBenchError(f"guidellm exited {done.returncode}; last lines of {log}:\n"
                             + "\n".join(log.read_text().splitlines()[-15:]))


def _dist(metric: dict) -> dict:
    """guidellm's distribution of a metric over successful requests → mean, p50, p95."""
    s = metric["successful"]
    return {"mean": s["mean"], "p50": s["percentiles"]["p50"], "p95": s["percentiles"]["p95"], "count": s["count"]}


def parse_guidellm(path: Path) -> dict:
    """The one benchmark of a guidellm JSON report, in the numbers this bench reports.

    Throughput is completed work over the benchmark's duration (output tokens of successful requests / seconds);
    guidellm's own output-tok/s distribution (a mean over time) is kept beside it."""
    report = json.loads(Path(path).read_text())
    if len(report.get("benchmarks", [])) != 1:
        raise LoadBenchError(f"{path}: expected one benchmark, found {len(report.get('benchmarks', []))}")
    b = report["benchmarks"][0]
    m = b["metrics"]
    totals = m["request_totals"]
    duration = float(b["duration"])
    output_tokens = m["output_token_count"]["successful"]["total_sum"]
    return {
        "concurrency": b["config"]["strategy"].get("streams"),
        "duration_s": duration,
        "requests": {"successful": totals["successful"], "errored": totals["errored"],
                     "incomplete": totals["incomplete"]},
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / duration if duration > 0 else None,
        "requests_per_s": totals["successful"] / duration if duration > 0 else None,
        "guidellm_output_tok_s_mean": m["output_tokens_per_second"]["successful"]["mean"],
        "ttft_ms": _dist(m["time_to_first_token_ms"]),
        "itl_ms": _dist(m["inter_token_latency_ms"]),
        "request_latency_s": _dist(m["request_latency"]),
        "warnings": [w if isinstance(w, str) else w.get("message", str(w)) for w in (b.get("warnings") or [])][:5],
    }


# --------------------------------------------------------------------------- the run


def rotated(modes: Sequence[str], k: int) -> list[str]:
    k %= len(modes)
    return list(modes[k:]) + list(modes[:k])


def ratios(phases: Sequence[dict]) -> list[dict]:
    """Per N: every mode's output tok/s over sequential's, batched over batched_off, and ITL over sequential's."""
    by = {(p["mode"], p["concurrency"]): p for p in phases}
    out = []
    for n in sorted({p["concurrency"] for p in phases}):
        row = {"concurrency": n}
        base = by.get(("sequential", n))
        for mode in MODES:
            p = by.get((mode, n))
            if p is None or base is None or mode == "sequential":
                continue
            row[f"{mode}_vs_sequential"] = _div(p["output_tok_s"], base["output_tok_s"])
            row[f"{mode}_itl_p50_vs_sequential"] = _div(p["itl_ms"]["p50"], base["itl_ms"]["p50"])
        on, off = by.get(("batched", n)), by.get(("batched_off", n))
        if on and off:
            row["speculation_on_vs_off"] = _div(on["output_tok_s"], off["output_tok_s"])
        out.append(row)
    return out


def _div(a, b):
    return a / b if a is not None and b else None


def aims(rows: Sequence[dict]) -> dict:
    by_n = {r["concurrency"]: r for r in rows}
    out = {}
    at = by_n.get(AIM_THROUGHPUT_AT, {}).get("batched_vs_sequential")
    if at is not None:
        out["throughput_at_8"] = {"aim": AIM_THROUGHPUT, "value": at, "met": at >= AIM_THROUGHPUT}
    itl = by_n.get(1, {}).get("batched_itl_p50_vs_sequential")
    if itl is not None:  # a ratio of latencies: ≤ 1 is "not worse"
        out["itl_at_1"] = {"aim": 1.0, "value": itl, "met": itl <= 1.0}
    spec = {r["concurrency"]: r["speculation_on_vs_off"] for r in rows if r.get("speculation_on_vs_off") is not None}
    if spec:
        out["speculation_on_vs_off"] = {"aim": 1.0, "by_concurrency": spec, "met": min(spec.values()) >= 1.0}
    return out


def phase_questions(questions: Sequence[dict], levels: Sequence[int], requests: Callable[[int], int]) -> list[list[dict]]:
    """Each N its own questions (the next ``requests(N)`` of the list): a question answered in an earlier phase would
    be in the suffix index of the ``sequential`` app's traffic, and a repeat is what suffix speculation does best
    (bench suffix: 4.6×), which would flatter it here."""
    need = sum(requests(n) for n in levels)
    if len(questions) < need:
        raise LoadBenchError(f"{len(questions)} questions for {need} requests; lower --load-requests or the levels")
    out, start = [], 0
    for n in levels:
        out.append(list(questions[start: start + requests(n)]))
        start += requests(n)
    return out


def run_load(urls: dict[str, str], levels: Sequence[int], args: argparse.Namespace, questions: Sequence[dict],
             tokenizer: str, work: Path, say: Callable[[str], None] = print) -> list[dict]:
    phases = []
    per_n = lambda n: args.load_requests or requests_for(n)
    for k, (n, asked) in enumerate(zip(levels, phase_questions(questions, levels, per_n), strict=True)):
        prompts = write_prompts(asked, work / f"prompts-{n}.jsonl")
        for mode in rotated(list(urls), k):
            out, log = work / f"{mode}-{n}.json", work / f"{mode}-{n}.log"
            requests = per_n(n)
            t0 = time.perf_counter()
            run_guidellm(guidellm_command(args.guidellm, urls[mode], "osd", n, requests, args.load_max_tokens, prompts,
                                          tokenizer, out), log, args.phase_timeout)
            p = {"mode": mode, **parse_guidellm(out), "wall_s": time.perf_counter() - t0, "requests_asked": requests}
            p["concurrency"] = n
            phases.append(p)
            say(f"[load] N={n:<2} {mode:<16} {p['output_tok_s']:6.1f} out tok/s  {p['requests_per_s']:.3f} req/s  "
                f"TTFT p50 {p['ttft_ms']['p50']:7.0f} ms  ITL p50 {p['itl_ms']['p50']:6.1f} ms  "
                f"({p['requests']['successful']} ok, {p['requests']['errored']} errors, {p['duration_s']:.0f}s)")
    return phases


def add_bench_load_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench load (uses --replica-threads, --deploy-timeout, --data and the model args)")
    g.add_argument("--load-levels", default=",".join(map(str, DEFAULT_LEVELS)),
                   help="comma-separated concurrencies guidellm holds (default 1,4,8,16)")
    g.add_argument("--load-modes", default=",".join(DEFAULT_MODES), help=f"subset of {','.join(MODES)}")
    g.add_argument("--load-requests", type=int, default=None, help="requests per (mode, N) (default 2·N+4)")
    g.add_argument("--load-max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    g.add_argument("--max-batch", type=int, default=16, help="engine.max_batch of the batched modes (default 16)")
    g.add_argument("--guidellm", default=DEFAULT_GUIDELLM,
                   help=f"the guidellm executable (default {DEFAULT_GUIDELLM}, which `make bench-load` installs)")


def _levels(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise LoadBenchError(f"--load-levels: expected comma-separated concurrencies, got {text!r}") from None
    if not values or min(values) < 1:
        raise LoadBenchError("--load-levels: concurrencies must be >= 1")
    return values


def run_load_bench(args: argparse.Namespace) -> dict:
    from osd.data.workloads import load_questions, spread_across_categories
    from osd.models.loading import resolve_model_path

    if not shutil.which(args.guidellm) and not Path(args.guidellm).exists():
        raise LoadBenchError(f"guidellm not found at {args.guidellm!r}: run `make bench-load` (it installs guidellm in "
                             ".venv-guidellm) or pass --guidellm")
    levels = _levels(args.load_levels)
    modes = [m for m in args.load_modes.split(",") if m]
    if unknown := [m for m in modes if m not in MODES]:
        raise LoadBenchError(f"--load-modes: unknown {unknown}; choose from {', '.join(MODES)}")
    per_n = lambda n: args.load_requests or requests_for(n)
    # every phase its own questions, spread across Spec-Bench's categories
    questions = spread_across_categories(load_questions(args.data), sum(per_n(n) for n in levels))
    tokenizer = resolve_model_path(args.target)  # guidellm counts prompt tokens with the target's own tokenizer
    say = lambda text: print(text, flush=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="osd-load-"))
    with deployed_modes(args, modes, max(levels), say) as (urls, info):
        for url in urls.values():
            warm_up(url, "osd")
        phases = run_load(urls, levels, args, questions, tokenizer, work, say)
    rows = ratios(phases)
    version = subprocess.run([args.guidellm, "--version"], capture_output=True, text=True, check=False).stdout
    guidellm_version = "guidellm " + version.strip().removeprefix("guidellm version:").strip()
    result = {
        "benchmark": "load", "environment": environment(),
        "config": {"modes": modes, "levels": list(levels), "requests": {str(n): args.load_requests or requests_for(n)
                                                                         for n in levels},
                   "max_tokens": args.load_max_tokens, "max_batch": args.max_batch, "questions": len(questions),
                   "question_ids": [q["question_id"] for q in questions], "target": args.target,
                   "replica_threads": args.replica_threads, "ray_cpus": RAY_CPUS, "guidellm": guidellm_version},
        "deployment": info, "total_s": time.perf_counter() - started, "phases": phases, "ratios": rows,
        "aims": aims(rows), "guidellm_reports": str(work),
    }
    path = write_json(args.out, "load", result)
    markdown = render_markdown(result)
    print("\n" + markdown)
    print(f"\nresults: {path}\ntable:   {update_doc_section(args.doc, 'load', markdown)}\nguidellm reports: {work}")
    return result


# --------------------------------------------------------------------------- report


def render_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"## Load: continuous batching vs one request at a time (`osd bench load`, guidellm, {result['environment']['date']})",
        "",
        (f"{cfg['guidellm'] or 'guidellm'} held N streaming greedy chat completions in flight (profile concurrent) "
        f"against one replica ({cfg['replica_threads']} torch threads, {result['environment']['cpu_count']} cores), "
        f"{cfg['max_tokens']} new tokens each, 2·N+4 requests per N, each N its own Spec-Bench questions "
        f"({cfg['questions']} in all, spread over the categories; none repeats, which would favour suffix speculation). Every "
        "mode is its own Serve app behind one proxy, run in turn per N (order rotated). No trainer: the draft is the "
        "fresh service's untrained self-draft. Throughput: output tokens of successful requests / the phase's "
        "duration; TTFT and inter-token latency (ITL): guidellm's, over requests."),
        "",
        table(["N", "mode", "out tok/s", "× sequential", "req/s", "TTFT p50 / p95 ms", "ITL p50 / p95 ms", "ok / errors"],
              [[p["concurrency"], p["mode"], p["output_tok_s"],
                next((r.get(f"{p['mode']}_vs_sequential", 1.0 if p["mode"] == "sequential" else None)
                      for r in result["ratios"] if r["concurrency"] == p["concurrency"]), None) or "–",
                p["requests_per_s"], f"{p['ttft_ms']['p50']:.0f} / {p['ttft_ms']['p95']:.0f}",
                f"{p['itl_ms']['p50']:.1f} / {p['itl_ms']['p95']:.1f}",
                f"{p['requests']['successful']} / {p['requests']['errored']}"]
               for p in sorted(result["phases"], key=lambda p: (p["concurrency"], MODES.index(p["mode"])))]),
        "",
    ]
    spec = [f"N={r['concurrency']}: ×{r['speculation_on_vs_off']:.2f}" for r in result["ratios"]
            if r.get("speculation_on_vs_off") is not None]
    if spec:
        lines += ["Speculation on vs off (batched over batched_off output tok/s): " + ", ".join(spec) + ".", ""]
    lines += ["Aims (issue 16): " + aims_sentence(result["aims"]), ""]
    return "\n".join(lines)


def aims_sentence(a: dict) -> str:
    parts = []
    if "throughput_at_8" in a:
        x = a["throughput_at_8"]
        parts.append(f"≥ {x['aim']:.0f}× output tok/s at 8 concurrent: **{'met' if x['met'] else 'not met'}** "
                     f"(×{x['value']:.2f}).")
    if "itl_at_1" in a:
        x = a["itl_at_1"]
        parts.append(f"ITL at 1 client not worse than one at a time: **{'met' if x['met'] else 'not met'}** "
                     f"(p50 ×{x['value']:.2f} of sequential's).")
    if "speculation_on_vs_off" in a:
        x = a["speculation_on_vs_off"]
        parts.append(f"Speculation on ≥ 1.0× off at every N: **{'met' if x['met'] else 'not met'}** (min "
                     f"×{min(x['by_concurrency'].values()):.2f}).")
    return " ".join(parts) or "not measured (a mode is missing)."
