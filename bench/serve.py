"""`osd bench serve`: closed-loop load against the osd endpoint, static vs online draft.

N concurrent clients (default N = 1, 4, 8) each send the next greedy chat completion as soon
as the previous one returned, over a fixed list of Spec-Bench questions spread across
categories (request i asks question i mod len), until a bounded number of requests per N
(default 2·N + 4) is sent or a time bound passes. Every mode therefore sends the same
requests for a given N, and greedy decoding is lossless, so every mode generates the same
tokens and tokens/s compare like for like.

Modes, side by side in one run against one deployment:

- ``static``: the initial draft (v0), the trainer paused since the deploy — the static-draft
  baseline. Run first, before the trainer has ever trained, so no promoted draft exists yet.
- ``training``: the online draft with the trainer *training* under load (``pause_when_busy``
  is off, so it does not step aside while requests run).
- ``paused``: the online draft (whatever the trainer promoted so far) with the trainer paused
  by an operator pause (``TrainerSupervisor.pause`` through a Serve handle).

Phases run as: static for every N, then for each N training then paused (adjacent, so machine
drift hits both alike). The serving slowdown while the trainer trains is the ratio of
``training`` to ``paused`` at the same N. Records served in the static phases reach the buffer,
so the trainer starts its first training phase with a backlog: it really trains under load.

Without ``--url`` the command starts everything itself (an embedded Redis, a local Ray with
2 CPUs, the osd Serve app on a free loopback port: 1 replica + the trainer) and shuts it all
down afterwards, even on an error or Ctrl-C. With ``--url`` only the load part runs, once per
N, in mode ``endpoint`` (the trainer, if any, is left as it is; its counters are read from
``GET /admin/trainer`` when available).

The core — :func:`run_closed_loop`, :func:`summarize`, :func:`run_load` — is plain HTTP
(httpx) against any base URL, so the tests drive it against a uvicorn server without Ray.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import httpx
import numpy as np

from bench.report import environment, table, update_doc_section, write_json

DEFAULT_CONCURRENCY = (1, 4, 8)
MODES = ("static", "training", "paused")
ENDPOINT_MODE = "endpoint"
APP_NAME = "osd-bench"
RAY_CPUS = 2
TRAINER_DELTA_KEYS = ("records_read", "records_trained", "updates", "promotions", "rejections", "errors")


class ServeBenchError(RuntimeError):
    """The endpoint cannot be benchmarked (unreachable, unhealthy, or a mode it cannot switch to)."""


def requests_for(clients: int, requests: int | None = None, per_client: int = 2, extra: int = 4) -> int:
    """Requests sent at concurrency ``clients``: ``requests`` if given, else per_client·N + extra (2·N + 4)."""
    return requests if requests is not None else per_client * clients + extra


# --------------------------------------------------------------------------- the load generator


@dataclass
class RequestResult:
    """One request as a client saw it."""

    index: int  # issue order within the phase (question = questions[index % len])
    client: int
    question_id: str | int | None
    category: str | None
    start_s: float  # since the phase started
    latency_s: float
    ok: bool
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_version: int | None = None
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    mean_acceptance_length: float | None = None
    alpha_hat: float | None = None
    error: str | None = None


def check_endpoint(url: str, timeout_s: float = 5.0) -> dict:
    """GET /health; returns its JSON. Raises ServeBenchError, quickly, when nothing healthy answers."""
    base = url.rstrip("/")
    try:
        resp = httpx.get(f"{base}/health", timeout=timeout_s)
    except httpx.HTTPError as e:
        raise ServeBenchError(f"cannot reach the osd endpoint at {base} ({type(e).__name__}: {e}); is it running? "
                              "(without --url, `osd bench serve` deploys its own)") from None
    if resp.status_code != 200:
        raise ServeBenchError(f"{base}/health answered {resp.status_code}: {resp.text[:200]!r}; "
                              "is this an osd endpoint (the base URL, without /v1)?")
    try:
        return resp.json()
    except ValueError:
        raise ServeBenchError(f"{base}/health did not answer JSON ({resp.text[:200]!r}); is this an osd endpoint?") from None


def chat_body(question: dict, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": question["turns"][0]}], "max_tokens": max_tokens,
            "temperature": 0}


def _one_request(http: httpx.Client, question: dict, max_tokens: int) -> dict:
    """POST one greedy chat completion; the RequestResult fields it fills (raises nothing)."""
    try:
        resp = http.post("/v1/chat/completions", json=chat_body(question, max_tokens))
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if resp.status_code != 200:
        return {"ok": False, "status": resp.status_code, "error": f"HTTP {resp.status_code}: {resp.text[:200]}"}
    try:
        data = resp.json()
        usage, osd = data["usage"], data.get("osd") or {}
        return {"ok": True, "status": 200, "prompt_tokens": int(usage["prompt_tokens"]),
                "completion_tokens": int(usage["completion_tokens"]), "draft_version": osd.get("draft_version"),
                "proposed": int(osd.get("proposed", 0)), "accepted": int(osd.get("accepted", 0)),
                "rounds": int(osd.get("rounds", 0)), "mean_acceptance_length": osd.get("mean_acceptance_length"),
                "alpha_hat": osd.get("alpha_hat")}
    except (ValueError, KeyError, TypeError) as e:
        return {"ok": False, "status": resp.status_code, "error": f"unexpected response ({e!r}): {resp.text[:200]}"}


def run_closed_loop(url: str, questions: Sequence[dict], clients: int, requests: int, max_tokens: int = 48,
                    time_limit_s: float | None = 300.0, request_timeout_s: float = 300.0,
                    stop: threading.Event | None = None) -> tuple[list[RequestResult], float]:
    """Closed loop: ``clients`` threads, each sending its next request as soon as the previous returned,
    until ``requests`` were issued or ``time_limit_s`` passed (requests in flight then still finish).

    Returns (results in issue order, wall seconds from the first send to the last answer).
    Failed requests are results with ``ok`` False, never exceptions.
    """
    if clients < 1 or requests < 0 or not questions:
        raise ValueError("need clients >= 1, requests >= 0 and at least one question")
    stop = stop or threading.Event()
    lock = threading.Lock()
    issued = 0
    results: list[RequestResult] = []
    start = time.perf_counter()
    deadline = start + time_limit_s if time_limit_s is not None else None
    last_end = [start]
    base = url.rstrip("/")

    def next_index() -> int | None:
        nonlocal issued
        with lock:
            if issued >= requests or stop.is_set() or (deadline is not None and time.perf_counter() >= deadline):
                return None
            issued += 1
            return issued - 1

    def worker(client: int) -> None:
        with httpx.Client(base_url=base, timeout=request_timeout_s) as http:
            while (index := next_index()) is not None:
                q = questions[index % len(questions)]
                sent = time.perf_counter()
                fields = _one_request(http, q, max_tokens)
                done = time.perf_counter()
                result = RequestResult(index=index, client=client, question_id=q.get("question_id"),
                                       category=q.get("category"), start_s=sent - start, latency_s=done - sent,
                                       **fields)
                with lock:
                    results.append(result)
                    last_end[0] = max(last_end[0], done)

    threads = [threading.Thread(target=worker, args=(c,), name=f"bench-client-{c}", daemon=True)
               for c in range(clients)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():  # a timed join, so Ctrl-C reaches this thread
                t.join(0.2)
    except BaseException:
        stop.set()  # no new requests; daemon threads end with their request in flight
        raise
    return sorted(results, key=lambda r: r.index), last_end[0] - start


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(results: Sequence[RequestResult], wall_s: float, clients: int) -> dict:
    """Per-phase numbers: throughput over the phase's wall time; latency, acceptance over successful requests.

    ``mean_acceptance_length`` pools the rounds of all requests (1 + Σ accepted / Σ rounds);
    ``alpha_hat`` is the mean of the requests' α̂ (each a mean over that request's positions).
    """
    ok = [r for r in results if r.ok]
    latencies = [r.latency_s for r in ok]
    p50, p95 = (float(v) for v in np.percentile(latencies, [50, 95])) if latencies else (None, None)
    tokens = sum(r.completion_tokens for r in ok)
    rounds, accepted = sum(r.rounds for r in ok), sum(r.accepted for r in ok)
    errors = [r.error for r in results if not r.ok]
    return {
        "clients": clients, "requests": len(results), "ok": len(ok), "errors": len(errors),
        "error_messages": sorted(set(errors))[:5],
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "latency_p50_s": p50, "latency_p95_s": p95, "latency_mean_s": _mean(latencies),
        "latency_max_s": max(latencies) if latencies else None,
        "output_tokens": tokens, "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "mean_acceptance_length": 1 + accepted / rounds if rounds else None,
        "alpha_hat": _mean([r.alpha_hat for r in ok if r.alpha_hat is not None]),
        "proposed": sum(r.proposed for r in ok), "accepted": accepted, "rounds": rounds,
        "draft_versions": sorted({r.draft_version for r in ok if r.draft_version is not None}),
    }


# --------------------------------------------------------------------------- modes and phases


class TrainerControl:
    """How the load part reads (and, if it can, switches) the trainer. The base class can do neither."""

    can_switch = False

    def status(self) -> dict | None:
        return None

    def set_mode(self, mode: str) -> None:
        raise ServeBenchError(f"mode {mode!r} needs control of the trainer; this endpoint offers none")


class HttpTrainerStatus(TrainerControl):
    """A running endpoint (``--url``): the trainer's counters from GET /admin/trainer, when it has one."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def status(self) -> dict | None:
        try:
            resp = httpx.get(f"{self.url}/admin/trainer", timeout=self.timeout_s)
            return resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None


class ServeTrainerControl(TrainerControl):
    """The trainer of a deployment we started: pause / resume / status through its Serve handle."""

    can_switch = True

    def __init__(self, supervisor, timeout_s: float = 120.0) -> None:
        self.supervisor, self.timeout_s = supervisor, timeout_s

    def status(self) -> dict | None:
        return self.supervisor.status.remote().result(timeout_s=self.timeout_s)

    def set_mode(self, mode: str) -> None:
        # pause() returns once the trainer's step in flight (maybe an update) is done: no training after it.
        call = self.supervisor.resume if mode == "training" else self.supervisor.pause
        call.remote().result(timeout_s=self.timeout_s)


def phase_plan(modes: Sequence[str], concurrency: Sequence[int]) -> list[tuple[str, int]]:
    """(mode, N) in run order: every static phase first (the trainer has not trained yet), then per N
    training followed by paused; ``endpoint`` alone runs once per N."""
    unknown = set(modes) - {*MODES, ENDPOINT_MODE}
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)} (or {ENDPOINT_MODE} with --url)")
    if ENDPOINT_MODE in modes:
        if len(set(modes)) > 1:
            raise ValueError(f"mode {ENDPOINT_MODE!r} cannot be combined with other modes")
        return [(ENDPOINT_MODE, n) for n in concurrency]
    plan = [("static", n) for n in concurrency] if "static" in modes else []
    for n in concurrency:
        plan += [(m, n) for m in ("training", "paused") if m in modes]
    return plan


def _trainer_delta(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None
    delta = {k: after[k] - before[k] for k in TRAINER_DELTA_KEYS if k in before and k in after}
    return {**delta, "live_version": after.get("live_version"), "paused_after": after.get("paused")}


def _fmt(v, spec: str = ".2f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def progress_line(mode: str, s: dict, trainer: dict | None) -> str:
    line = (f"{mode:<9} N={s['clients']:<2} {s['ok']:3d}/{s['requests']:<3d} ok  {s['requests_per_s']:6.3f} req/s  "
            f"p50 {_fmt(s['latency_p50_s'])}s  p95 {_fmt(s['latency_p95_s'])}s  "
            f"{s['output_tokens_per_s']:6.2f} tok/s  accept len {_fmt(s['mean_acceptance_length'])}  "
            f"α̂ {_fmt(s['alpha_hat'], '.3f')}  drafts {s['draft_versions']}  errors {s['errors']}")
    if trainer:
        line += (f"  | trainer +{trainer.get('records_trained', 0)} records, +{trainer.get('updates', 0)} updates, "
                 f"+{trainer.get('promotions', 0)} promotions")
    return line


def run_load(url: str, questions: Sequence[dict], modes: Sequence[str] = (ENDPOINT_MODE,),
             concurrency: Sequence[int] = DEFAULT_CONCURRENCY, requests: int | None = None, max_tokens: int = 48,
             phase_timeout_s: float = 300.0, request_timeout_s: float = 300.0,
             control: TrainerControl | None = None, warmup: bool = True,
             progress: Callable[[str], None] | None = print, per_client: int = 2, extra: int = 4) -> list[dict]:
    """Every (mode, N) phase of ``phase_plan`` against ``url``; one dict per phase (summary, trainer
    counters before/after, per-request rows). Requests per phase: ``requests_for(N, requests, per_client,
    extra)``. Checks the endpoint first (ServeBenchError, quickly, if unreachable)."""
    control = control or TrainerControl()
    plan = phase_plan(modes, concurrency)
    if not control.can_switch and any(m in MODES for m, _ in plan):
        raise ServeBenchError(f"modes {', '.join(MODES)} switch the trainer, which only works on a deployment "
                              f"`osd bench serve` starts itself; against --url use mode {ENDPOINT_MODE!r}")
    check_endpoint(url)
    say = progress or (lambda _: None)
    if warmup:  # the first requests pay one-off setup (allocator, kernels, connection pools): not measured
        if plan and control.can_switch:
            control.set_mode(plan[0][0])
        results, _ = run_closed_loop(url, questions[:1], 1, 1, max_tokens, None, request_timeout_s)
        if not results[0].ok:
            raise ServeBenchError(f"the warm-up request failed: {results[0].error}")
    phases = []
    for i, (mode, n) in enumerate(plan):
        count = requests_for(n, requests, per_client, extra)
        say(f"[{i + 1}/{len(plan)}] {mode} N={n}: {count} requests ...")
        if control.can_switch:
            control.set_mode(mode)
        before = control.status()
        results, wall = run_closed_loop(url, questions, n, count, max_tokens, phase_timeout_s, request_timeout_s)
        after = control.status()
        summary = summarize(results, wall, n)
        trainer = _trainer_delta(before, after)
        say(progress_line(mode, summary, trainer))
        phases.append({"mode": mode, "clients": n, "summary": summary, "trainer": trainer,
                       "trainer_after": after, "requests": [asdict(r) for r in results]})
    if control.can_switch and plan:
        control.set_mode("paused")  # leave the trainer quiet for the shutdown
    return phases


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def slowdowns(phases: Sequence[dict]) -> list[dict]:
    """Per N: the serving slowdown while the trainer trains vs while it is paused (>1 = slower while
    training), and what the online draft buys over the static one (both with the trainer paused)."""
    by = {(p["mode"], p["clients"]): p["summary"] for p in phases}
    out = []
    for n in sorted({p["clients"] for p in phases}):
        train, paused, static = by.get(("training", n)), by.get(("paused", n)), by.get(("static", n))
        row: dict = {"clients": n}
        if train and paused:
            row |= {"tokens_per_s_paused_over_training": _ratio(paused["output_tokens_per_s"], train["output_tokens_per_s"]),
                    "requests_per_s_paused_over_training": _ratio(paused["requests_per_s"], train["requests_per_s"]),
                    "p50_latency_training_over_paused": _ratio(train["latency_p50_s"], paused["latency_p50_s"]),
                    "p95_latency_training_over_paused": _ratio(train["latency_p95_s"], paused["latency_p95_s"])}
        if paused and static:
            row["tokens_per_s_online_paused_over_static"] = _ratio(paused["output_tokens_per_s"],
                                                                   static["output_tokens_per_s"])
        if len(row) > 1:
            out.append(row)
    return out


# --------------------------------------------------------------------------- the deployment


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(args: argparse.Namespace, redis_url: str, max_clients: int):
    """The OsdAppConfig the bench deploys: 1 replica (1 CPU), the trainer (0.5 CPU) training under load."""
    from actors.config import OsdAppConfig, TrainerSettings
    from cli.models import model_configs
    from trainers.config import DistillConfig

    models, engine = model_configs(args, torch_threads=0)  # replicas and trainer set their own threads
    engine = engine.model_copy(update={"speculation": "always"})  # α is measured on every round, not on probes
    distill = {"update_interval": args.update_interval}
    if args.steps_per_update is not None:
        distill["steps_per_update"] = args.steps_per_update
    return OsdAppConfig(
        model_name="osd",
        models=models,
        engine=engine,
        redis_url=redis_url,
        distill=DistillConfig(**distill),
        num_replicas=1, replica_num_cpus=1.0, replica_torch_threads=args.replica_threads,
        max_ongoing_requests=min(32, max(16, max_clients)),
        trainer=TrainerSettings(num_cpus=0.5, torch_threads=args.trainer_threads, pause_when_busy=False,
                                poll_interval_s=0.2),
    )


@contextmanager
def local_ray(namespace: str) -> Iterator[None]:
    """A local Ray (RAY_CPUS CPUs, no dashboard, a temp dir of its own) for Serve apps; on the way out, error or Ctrl-C
    included, Serve and Ray are shut down and the temp dir removed, or kept (with the replica logs) after an error."""
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="osd-ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    ray_started, clean = False, False
    try:
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, _temp_dir=temp_dir,
                 namespace=namespace, log_to_driver=False)
        ray_started = True
        yield
        clean = True
    finally:
        if ray_started:
            try:
                serve.shutdown()
            except Exception as e:  # keep going: Ray must still stop
                print(f"serve.shutdown failed: {e}", file=sys.stderr)
            ray.shutdown()
        if clean:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            print(f"Ray session files (replica logs under session_*/logs/serve) kept in {temp_dir}", file=sys.stderr)


@contextmanager
def deployed_endpoint(args: argparse.Namespace, max_clients: int, say: Callable[[str], None] = print,
                      config_builder: Callable = app_config) -> Iterator[tuple[str, ServeTrainerControl | None, dict]]:
    """Embedded Redis (unless --redis-url) + a local Ray (2 CPUs, no dashboard, temp dir) + the osd
    app on a free loopback port; yields (url, trainer control (None without a trainer), info). Everything it started is
    stopped on the way out, error or Ctrl-C included; on an error the Ray logs are kept."""
    from ray import serve

    from actors.serve_app import TRAINER_DEPLOYMENT, deploy
    from osd.data.redis_server import EmbeddedRedis

    redis = None
    try:
        if args.redis_url:
            redis_url = args.redis_url
        else:
            redis = EmbeddedRedis().start()
            redis_url = redis.url
        config = config_builder(args, redis_url, max_clients)
        t0 = time.perf_counter()
        with local_ray("osd-bench"):
            port = free_port()
            say(f"Ray started ({RAY_CPUS} CPUs); deploying the osd app (target {args.target}, draft {args.draft}) "
                f"on 127.0.0.1:{port} ...")
            t1 = time.perf_counter()
            deploy(config, name=APP_NAME, host="127.0.0.1", port=port, timeout_s=args.deploy_timeout)
            control = None  # a deployment without a trainer has nothing to control
            if config.trainer.enabled:
                control = ServeTrainerControl(serve.get_deployment_handle(TRAINER_DEPLOYMENT, APP_NAME))
                control.set_mode("paused")  # no training before the static phases
            info = {"ray_start_s": t1 - t0, "deploy_s": time.perf_counter() - t1,
                    "redis": "external" if args.redis_url else "embedded", "redis_url": redis_url,
                    "app": config.model_dump(mode="json", exclude={"redis_url", "buffer", "registry"})}
            say(f"deployed in {info['deploy_s']:.0f}s")
            yield f"http://127.0.0.1:{port}", control, info
    finally:
        if redis is not None:
            redis.close()


# --------------------------------------------------------------------------- the command


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated client counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("client counts must be >= 1")
    return values


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "bench serve (uses --questions as the question pool, --max-tokens (default 48), --redis-url, "
        "--steps-per-update, the model args but --threads; --quick: N=1,2, N+1 requests, 16 tokens, "
        "4 questions, writes serve_quick.json and leaves docs/ alone)")
    g.add_argument("--url", default=None,
                   help="benchmark this running endpoint (mode 'endpoint' only) instead of deploying one")
    g.add_argument("--concurrency", type=_concurrency, default=DEFAULT_CONCURRENCY,
                   help="comma-separated concurrent client counts N (default 1,4,8)")
    g.add_argument("--requests", type=int, default=None, help="requests per (mode, N) (default 2·N+4)")
    g.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)} (ignored with --url)")
    g.add_argument("--phase-timeout", type=float, default=300.0,
                   help="seconds after which a (mode, N) phase sends no new request")
    g.add_argument("--request-timeout", type=float, default=300.0, help="HTTP timeout of one request")
    g.add_argument("--replica-threads", type=int, default=1,
                   help="torch threads of the serving replica (default 1: with the trainer's 1, exactly 2 cores)")
    g.add_argument("--trainer-threads", type=int, default=1, help="torch threads of the trainer actor")
    g.add_argument("--update-interval", type=int, default=4,
                   help="training records per trainer update (default 4, so it trains within short phases)")
    g.add_argument("--deploy-timeout", type=float, default=600.0, help="bound on the deploy (model loads)")


def run_serve_bench(args: argparse.Namespace) -> dict:
    from osd.data.workloads import load_questions, spread_across_categories

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    quick = bool(getattr(args, "quick", False))
    concurrency = (1, 2) if quick else tuple(args.concurrency)
    max_tokens = 16 if quick else args.max_tokens
    n_questions = 4 if quick else args.questions
    per_client, extra = (1, 1) if quick else (2, 4)
    questions = spread_across_categories(load_questions(args.data), n_questions)
    if not questions:
        raise ValueError("no questions to send")
    say = lambda text: print(text, flush=True)  # noqa: E731
    modes = (ENDPOINT_MODE,) if args.url else tuple(m for m in args.modes.split(",") if m)

    def load(url: str, control: TrainerControl) -> list[dict]:
        return run_load(url, questions, modes, concurrency, args.requests, max_tokens, args.phase_timeout,
                        args.request_timeout, control, progress=say, per_client=per_client, extra=extra)

    started = time.perf_counter()
    if args.url:
        url, info = args.url.rstrip("/"), {"endpoint": "external"}
        phases = load(url, HttpTrainerStatus(url))
    else:
        with deployed_endpoint(args, max(concurrency), say) as (url, control, info):
            phases = load(url, control)
    result = {
        "benchmark": "serve", "environment": environment(),
        "config": {"url": args.url, "modes": list(modes), "concurrency": list(concurrency),
                   "requests_per_n": {str(n): requests_for(n, args.requests, per_client, extra)
                                      for n in concurrency},
                   "max_tokens": max_tokens, "questions": len(questions),
                   "question_ids": [q["question_id"] for q in questions],
                   "phase_timeout_s": args.phase_timeout, "target": args.target, "draft": args.draft,
                   "draft_layers": args.draft_layers, "gamma": args.gamma,
                   "replica_threads": args.replica_threads, "trainer_threads": args.trainer_threads,
                   "update_interval": args.update_interval, "quick": quick, "ray_cpus": RAY_CPUS},
        "deployment": info, "total_s": time.perf_counter() - started,
        "phases": phases, "slowdown": slowdowns(phases),
    }
    path = write_json(args.out, "serve_quick" if quick else "serve", result)
    markdown = render_markdown(result)
    print("\n" + markdown)
    if quick:
        print(f"\nresults: {path} (quick: docs left alone)")
    else:
        print(f"\nresults: {path}\ntable:   {update_doc_section(args.doc, 'serve', markdown)}")
    return result


def render_markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    rows = []
    for p in result["phases"]:
        s, t = p["summary"], p["trainer"] or {}
        rows.append([p["mode"], p["clients"], f"{s['ok']}/{s['requests']}", s["requests_per_s"],
                     _fmt(s["latency_p50_s"]), _fmt(s["latency_p95_s"]), s["output_tokens_per_s"],
                     _fmt(s["mean_acceptance_length"]), _fmt(s["alpha_hat"], ".3f", "–"),
                     ",".join(map(str, s["draft_versions"])) or "–",
                     t.get("updates", "–") if p["trainer"] else "–", s["errors"]])
    where = (f"against `{cfg['url']}`" if cfg["url"] else
             f"against a deployment it started: local Ray ({cfg['ray_cpus']} CPUs), 1 replica "
             f"({cfg['replica_threads']} torch thread(s)) + the trainer ({cfg['trainer_threads']} thread(s), "
             f"update every {cfg['update_interval']} records, `pause_when_busy` off)")
    lines = [
        f"## Serving under load (`osd bench serve`, {env['date']})",
        "",
        f"Closed loop: N clients each send the next greedy chat completion (max_tokens={cfg['max_tokens']}) as "
        f"soon as the previous one returns, over {cfg['questions']} Spec-Bench questions across categories, "
        f"{', '.join(f'N={n}: {c}' for n, c in cfg['requests_per_n'].items())} requests; {where}. "
        f"Target `{cfg['target']}`, draft `{cfg['draft']}` ({cfg['draft_layers']} layers), γ={cfg['gamma']}; "
        f"torch {env['torch']} on {env['cpu_count']} cores. Modes: **static** = the initial draft v0, trainer paused "
        "(run first, before any training); **training** = online draft, trainer training under load; "
        "**paused** = online draft, trainer paused (run right after training at the same N). One replica serves "
        "one generation at a time, so latency at N > 1 includes queueing.",
        "",
        table(["mode", "N", "ok", "req/s", "p50 s", "p95 s", "out tok/s", "accept len", "α̂", "drafts",
               "trainer updates", "errors"], rows),
    ]
    if result["slowdown"]:
        srows = [[r["clients"], r.get("tokens_per_s_paused_over_training", "–"),
                  r.get("p50_latency_training_over_paused", "–"), r.get("p95_latency_training_over_paused", "–"),
                  r.get("tokens_per_s_online_paused_over_static", "–")] for r in result["slowdown"]]
        lines += ["", "Serving slowdown while the trainer trains (ratios > 1 = slower while training), and the "
                      "online draft (trainer paused) against the static one:", "",
                  table(["N", "tok/s paused ÷ training", "p50 training ÷ paused", "p95 training ÷ paused",
                         "tok/s online ÷ static"], srows)]
    return "\n".join(lines)
