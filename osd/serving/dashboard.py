"""The drift dashboard's history, kept in Redis so every replica shows the same one.

Writers post small JSON points — a finished request (replicas), a trainer update and a
draft going live (the trainer, the admin rollback route, a replica's automatic rollback), a
buffer backlog sample (the trainer) — and ``DashboardStore.data()`` turns the retained history into the
:class:`~osd.serving.dashboard_schema.DashboardData` that ``GET /dashboard/data`` returns.

Layout: one Redis stream per kind (``<prefix>requests``, ``swaps``, ``backlog``, ``trainer``),
each entry one field ``j`` holding the point as JSON (never pickle). Retention is bounded
twice: ``XADD MAXLEN ~ max_points`` and, after every write batch, ``XTRIM MINID`` at the
newest entry's id − ``retention_s`` (stream ids are the server's millisecond timestamps). Trainer counters for
/metrics live in one hash per cluster (``<prefix>counters:<cluster>``), so any replica can
render them.

Posting never blocks and never raises: points go to a bounded queue drained by one daemon
thread that writes them in a pipeline. While Redis is down the queue holds them; when it
is full the oldest are dropped and counted (``dropped``): this is telemetry, and serving
must not wait for it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping

import redis
from pydantic import BaseModel, ConfigDict, Field

from osd.serving.dashboard_schema import (
    BacklogPoint,
    ClusterRow,
    DashboardData,
    RequestPoint,
    SourceShare,
    SwapEvent,
    TrainerPoint,
)

log = logging.getLogger(__name__)

HOUR_S = 3600.0


class DashboardConfig(BaseModel):
    """What the dashboard keeps and how it averages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Record dashboard history in Redis and serve /dashboard.")
    key_prefix: str = Field("osd:dash:", min_length=1, description="Prefix of the dashboard's Redis keys.")
    window: int = Field(50, ge=1, le=10_000, description="Requests per moving window on the acceptance-rate chart.")
    retention_s: float = Field(7 * 24 * 3600.0, gt=0, description="History older than this is trimmed (XTRIM MINID).")
    max_points: int = Field(20_000, ge=10, le=1_000_000, description="Approximate cap on points kept per kind (XADD MAXLEN ~).")
    max_read: int = Field(5_000, ge=10, le=1_000_000, description="Newest points per kind that /dashboard/data reads and returns.")
    queue_size: int = Field(10_000, ge=1, description="Points waiting for Redis before the oldest are dropped.")
    backlog_interval_s: float = Field(5.0, gt=0, description="How often the trainer samples the buffer backlog.")


class DashboardStore:
    """Post points (any thread, non-blocking) and read the dashboard's data; see the module docstring."""

    def __init__(self, client: redis.Redis, config: DashboardConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or DashboardConfig()
        self.redis, self.clock = client, clock
        self._queue: deque[tuple[str, dict]] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self.dropped = self.written = 0
        self._failing = False
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="osd-dashboard", daemon=True)
        self._thread.start()

    @classmethod
    def from_url(cls, url: str, config: DashboardConfig | None = None) -> DashboardStore:
        # Short timeouts: a dead Redis must cost the drain thread and /dashboard/data little.
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0)
        return cls(client, config)

    def _key(self, kind: str) -> str:
        return f"{self.config.key_prefix}{kind}"

    # -- writing ---------------------------------------------------------------------------------

    def post_request(self, cluster: str, version: int, alpha: float | None, tokens: int, forwards: int,
                     seconds: float, accepted: Mapping[str, int] | None = None, prefill_s: float | None = None,
                     target_step_s: float | None = None) -> None:
        """A finished request: its α̂ (None without a draft), tokens generated, target decode
        forwards, generation time, its accepted tokens by source ({draft, suffix, both}), the
        prefill's share of the generation time, and the target's single-token decode step as
        the replica measured it (None: not measured; see :func:`target_step_s`)."""
        self._post("requests", dict(t=self.clock(), cluster=cluster, version=version, alpha=alpha, tokens=tokens,
                                    forwards=forwards, seconds=seconds,
                                    accepted=dict(accepted) if accepted is not None else None,
                                    prefill_s=prefill_s, target_step_s=target_step_s))

    def post_swap(self, cluster: str, version: int, kind: str) -> None:
        """``version`` went live for ``cluster``: 'promoted' by the trainer, an admin 'rollback', or an
        'auto_rollback' by a replica that found the version it replaced serving clearly worse."""
        self._post("swaps", SwapEvent(t=self.clock(), cluster=cluster, version=version, kind=kind).model_dump())

    def post_backlog(self, cluster: str, length: int, pending: int, lag: int | None) -> None:
        self._post("backlog", BacklogPoint(t=self.clock(), cluster=cluster, length=length, pending=pending,
                                           lag=lag).model_dump())

    def post_trainer(self, cluster: str, update: int, loss: float, alpha_candidate: float, alpha_live: float,
                     promoted: bool, version: int | None) -> None:
        self._post("trainer", TrainerPoint(t=self.clock(), cluster=cluster, update=update, loss=loss,
                                           alpha_candidate=alpha_candidate, alpha_live=alpha_live,
                                           promoted=promoted, version=version).model_dump())

    def _post(self, kind: str, point: dict) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._queue) >= self.config.queue_size:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append((kind, point))
            self._cond.notify()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every posted point is written (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (bounded by ``timeout_s``), then stop the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _drain(self) -> None:
        backoff = 0.1
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._in_flight = len(batch)
            try:
                self._write(batch)
                backoff = 0.1
                if self._failing:
                    log.info("dashboard: Redis is back; history writes resumed")
                self._failing = False
                with self._cond:
                    self.written += len(batch)
            except (redis.RedisError, OSError) as e:
                if not self._failing:
                    log.warning("dashboard: Redis unavailable (%s); holding points, dropping the oldest past %d",
                                e, self.config.queue_size)
                self._failing = True
                with self._cond:  # put the batch back in front, oldest first, within the bound
                    self._queue.extendleft(reversed(batch))
                    while len(self._queue) > self.config.queue_size:
                        self._queue.popleft()
                        self.dropped += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def _write(self, batch: list[tuple[str, dict]]) -> None:
        cfg = self.config
        pipe = self.redis.pipeline(transaction=False)
        for kind, point in batch:
            pipe.xadd(self._key(kind), {"j": json.dumps(point, separators=(",", ":"))},
                      maxlen=cfg.max_points, approximate=True)
            if kind == "trainer":
                self._count_update(pipe, point)
        replies = pipe.execute()
        # Entry ids are the server's milliseconds: trim by the newest id, so our clock does not matter.
        newest_ms = max(int(r.split(b"-")[0]) for r in replies if isinstance(r, bytes) and b"-" in r)
        oldest_ms = max(newest_ms - int(cfg.retention_s * 1000), 0)
        pipe = self.redis.pipeline(transaction=False)
        for kind in {k for k, _ in batch}:
            pipe.xtrim(self._key(kind), minid=oldest_ms, approximate=False)  # exact: old points must go
        pipe.execute()

    def _count_update(self, pipe, point: dict) -> None:
        key = f"{self.config.key_prefix}counters:{point['cluster']}"
        pipe.hincrby(key, "updates", 1)
        pipe.hincrby(key, "promotions" if point["promoted"] else "rejections", 1)
        pipe.hset(key, mapping={"loss": point["loss"], "alpha_candidate": point["alpha_candidate"],
                                "alpha_live": point["alpha_live"]})

    def count_rollback(self, cluster: str, auto: bool = False) -> None:
        """Rollbacks are rare (an admin's, or ``auto`` a replica's swap watch): counted synchronously
        (raises if Redis is down)."""
        self.redis.hincrby(f"{self.config.key_prefix}counters:{cluster}", "auto_rollbacks" if auto else "rollbacks", 1)

    # -- reading ---------------------------------------------------------------------------------

    def trainer_counters(self) -> dict[str, dict[str, float]]:
        """cluster -> {updates, promotions, rejections, rollbacks, auto_rollbacks, loss, alpha_candidate,
        alpha_live}."""
        prefix = f"{self.config.key_prefix}counters:"
        out = {}
        for key in self.redis.scan_iter(match=f"{prefix}*", count=100):
            cluster = key.decode()[len(prefix):]
            out[cluster] = {k.decode(): float(v) for k, v in self.redis.hgetall(key).items()}
        return out

    def _read(self, kind: str) -> list[dict]:
        entries = self.redis.xrevrange(self._key(kind), "+", "-", count=self.config.max_read)
        points = []
        for _, fields in reversed(entries):
            try:
                points.append(json.loads(fields[b"j"]))
            except (KeyError, ValueError) as e:  # a foreign or damaged entry must not break the page
                log.warning("dashboard: skipping an unreadable %s point: %s", kind, e)
        return points

    def data(self, live_versions: Mapping[str, int | None] | None = None,
             window: int | None = None) -> DashboardData:
        """The dashboard's JSON from the retained history; ``live_versions`` (cluster -> registry
        live version) fills the table's live column. Raises redis errors when Redis is down."""
        window = window or self.config.window
        requests, swaps = self._read("requests"), [SwapEvent(**p) for p in self._read("swaps")]
        trainer = [TrainerPoint(**p) for p in self._read("trainer")]
        series = request_series(requests, window)
        now = self.clock()
        return DashboardData(
            generated_at=now, window=window, retention_s=self.config.retention_s,
            clusters=cluster_rows(series, swaps, trainer, live_versions or {}, now),
            series=series, swaps=swaps, backlog=[BacklogPoint(**p) for p in self._read("backlog")],
            trainer=trainer)


# --------------------------------------------------------------------------- pure helpers


def _speedup_terms(p: Mapping) -> tuple[float, float] | None:
    """(seconds the target alone would take for the request's tokens, seconds its decoding took), or None
    when the point lacks the measured single-token step or the prefill time (older points, or not measured)."""
    step, prefill = p.get("target_step_s"), p.get("prefill_s")
    if step is None or prefill is None:
        return None
    decode_s = p["seconds"] - prefill
    return (p["tokens"] * step, decode_s) if decode_s > 0 else None


def request_series(points: Iterable[dict], window: int) -> dict[str, list[RequestPoint]]:
    """Raw request points (oldest first) -> per-cluster series with moving averages over the
    last ``window`` requests of that cluster. α̂ averages skip requests without a draft; the
    throughput averages are ratios of sums (tokens / forwards, tokens / seconds), so long and
    short requests weigh by their tokens as they do in wall-clock terms; so do the shares of
    accepted tokens by source (points posted without ``accepted`` are skipped).

    The speedup against the target alone is a ratio of sums too: Σ tokens × target_step_s (what
    the target alone would have spent decoding them, one single-token step per token) over
    Σ (seconds − prefill_s) (what decoding them took), over the window's requests that carry
    both; every request counts, those decoded plainly (≈ 1×) included, as the user saw them."""
    recent: dict[str, deque[dict]] = defaultdict(lambda: deque(maxlen=window))
    series: dict[str, list[RequestPoint]] = defaultdict(list)
    for p in points:
        win = recent[p["cluster"]]
        win.append(p)
        alphas = [q["alpha"] for q in win if q["alpha"] is not None]
        tokens = sum(q["tokens"] for q in win)
        forwards = sum(q["forwards"] for q in win)
        seconds = sum(q["seconds"] for q in win)
        by_source = {k: sum((q.get("accepted") or {}).get(k, 0) for q in win) for k in ("draft", "suffix", "both")}
        accepted = sum(by_source.values())
        own = _speedup_terms(p)
        measured = [terms for q in win if (terms := _speedup_terms(q)) is not None]
        alone, spent = sum(a for a, _ in measured), sum(d for _, d in measured)
        series[p["cluster"]].append(RequestPoint(
            t=p["t"], version=p["version"], alpha=p["alpha"],
            alpha_ma=sum(alphas) / len(alphas) if alphas else None,
            tokens_per_forward_ma=tokens / forwards if forwards else 0.0,
            tokens_per_s_ma=tokens / seconds if seconds > 0 else 0.0,
            latency_s=p["seconds"],
            source_share_ma=SourceShare(**{k: n / accepted for k, n in by_source.items()}) if accepted else None,
            speedup=own[0] / own[1] if own else None,
            speedup_ma=alone / spent if measured else None,
            target_step_s=p.get("target_step_s")))
    return dict(series)


def cluster_rows(series: Mapping[str, list[RequestPoint]], swaps: list[SwapEvent], trainer: list[TrainerPoint],
                 live_versions: Mapping[str, int | None], now: float) -> list[ClusterRow]:
    """The clusters table: one row per cluster seen in requests, swaps, trainer points or the registry."""
    names = sorted(set(series) | {s.cluster for s in swaps} | {t.cluster for t in trainer} | set(live_versions))
    rows = []
    for c in names:
        points = series.get(c, [])
        hour_ago = [p for p in points if p.t <= now - HOUR_S]
        events = [s.t for s in swaps if s.cluster == c] + [t.t for t in trainer if t.cluster == c]
        steps = [p.target_step_s for p in points if p.target_step_s is not None]
        rows.append(ClusterRow(
            cluster=c, live_version=live_versions.get(c),
            alpha_now=points[-1].alpha_ma if points else None,
            alpha_hour_ago=hour_ago[-1].alpha_ma if hour_ago else None,
            requests=len(points), last_update=max(events) if events else None,
            speedup_now=points[-1].speedup_ma if points else None,
            target_step_s=steps[-1] if steps else None))
    return rows


def target_step_s(engine, draft) -> float | None:
    """Seconds of the target's single-token decode step as this replica measured it: the yardstick
    of the dashboard's speedup ("the target alone" decodes one token per such step).

    A tree engine (suffix speculation, token trees) measured its verification cost curve T(k) at
    start-up on the serving model, dtype and cache: T(1) is one token. A chain engine with
    ``speculation='auto'`` times its plain rounds while serving (the governor of ``draft``, the
    request's; a moving average). None where neither measured it: a chain with 'always', or a
    request served without a draft by a chain. Reads the same public estimates as /health."""
    curve = getattr(engine, "cost_curve", None)  # TreeSpeculativeEngine: ms by new tokens, None if not measured
    if curve and 1 in curve:
        return float(curve[1]) / 1000
    if hasattr(engine, "cost_curve") or draft is None or engine.config.speculation != "auto":
        return None  # a tree engine does not time plain rounds; a chain's governor exists only in 'auto'
    ms = engine.governor(draft).describe()["verify_ms"].get(1)
    return ms / 1000 if ms else None
