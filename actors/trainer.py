"""The trainer: the online distiller fed from the Redis buffer, as a restartable Ray actor.

``TrainerLoop`` is plain Python (no Ray; tested without a Ray session): it reads training
records through the buffer's consumer group, feeds ``trainers.distiller.OnlineDistiller``,
asks ``trainers.gate.PromotionGate`` after every update and publishes promoted drafts to
the registry (parent = the live version), exactly as ``trainers.replay`` does in one
process. ``TrainerActor`` is the thin Ray wrapper that runs the loop on a thread.

Delivery and restarts (DESIGN.md § Redis buffer):

- An entry is acked only once it is *settled*: trained on, or set aside as held-out.
  Records waiting for the next update stay pending in Redis, so a crash loses none of them.
- The consumer name is stable (``trainer-<cluster>``): a restarted actor first re-reads its
  own pending entries (XREADGROUP from ID 0), then reads new ones. Entries another consumer
  left pending longer than ``buffer.claim_idle_ms`` are taken over with XAUTOCLAIM.
- Delivery is at least once; the distiller drops redelivered request ids it has seen.

Spare capacity: with ``pause_when_busy`` the loop asks ``load()`` (in Ray: every replica's
running + waiting requests, via the Serve handle) before each read and sleeps while serving
is busy. Training then competes with serving only when serving is idle. After publishing a
promoted draft it broadcasts ``sync_drafts`` to the replicas; one that misses the broadcast
(starting, restarting) loads the draft at its next registry poll or in its constructor.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import ray
import torch
from ray import serve

from actors.config import OsdAppConfig, TrainerSettings
from actors.ray_metrics import RayTrainerMetrics
from osd.adapters import AdapterSpec, load_adapter_state_dict
from osd.buffer import BufferUnavailable, Entry, RecordBuffer
from osd.dashboard import DashboardStore
from osd.models import DraftModel, build_draft, load_causal_lm, load_shortlist, parse_dtype
from osd.registry import DraftRegistry, tensor_specs
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller, UpdateResult
from trainers.gate import GateDecision, PromotionGate
from trainers.scheduler import BacklogScheduler
from trainers.replay import _Live, _promote, load_live_draft

log = logging.getLogger(__name__)

TRAINER_NAMESPACE = "osd"
DEFAULT_CLUSTER = "global"


def trainer_actor_name(app_name: str) -> str:
    """The trainer actor's name (namespace TRAINER_NAMESPACE) for a Serve application."""
    return f"osd-trainer-{app_name}"


class SimulatedCrash(BaseException):
    """Raised by the default crash hook: a BaseException, so the loop does not catch it as an error."""


def _raise_crash() -> None:
    raise SimulatedCrash("crash_after_next_read: simulated trainer death before acking")


# --------------------------------------------------------------------------- buffer helpers


def read_own_pending(buffer: RecordBuffer, consumer: str, cluster: str, count: int,
                     after: str = "0") -> tuple[list[Entry], str | None]:
    """Entries already delivered to ``consumer`` and not yet acked, with ids after ``after``
    (XREADGROUP from an ID, not ``>``): what a restarted consumer must redo first.

    Returns (decoded entries, the last id returned — the next call's ``after`` — or None when
    none are left). Trimmed and undecodable entries are acked / dead-lettered as in ``read``.

    Belongs in RecordBuffer (as ``read(..., pending=True)``); it uses its internals meanwhile.
    """
    key = buffer._key(cluster)
    with buffer._available("read pending"):
        buffer._ensure_group(key)
        reply = buffer._redis.xreadgroup(buffer.config.group, consumer, {key: after}, count=count) or []
        out: list[Entry] = []
        last = None
        for stream_key, entries in reply:
            if entries:
                last = entries[-1][0]
                out += buffer._decode_entries(stream_key, entries, consumer)
    return out, (last.decode() if isinstance(last, bytes) else last)


def build_draft_template(models) -> DraftModel:
    """The draft as a replica builds it (same construction, so registry drafts fit), without keeping the target."""
    if models.draft == "none":
        raise ValueError("the trainer needs a draft to distil: set models.draft to 'self' or a model, not 'none'")
    target = load_causal_lm(models.target, device=models.device, dtype=parse_dtype(models.dtype))
    shortlist = load_shortlist(models.shortlist) if models.shortlist else None
    draft = build_draft(target, models.draft, models.draft_layers, shortlist)
    del target
    return draft


@dataclass
class _DraftHolder:
    """What trainers.replay's load_live_draft / _promote read and replace: ``.draft``, the live draft."""

    draft: DraftModel


# --------------------------------------------------------------------------- the loop


def run_until_stopped(step: Callable[[], int], stop: threading.Event,
                      on_error: Callable[[Exception, float], None]) -> None:
    """Call ``step`` until ``stop`` is set. A failing step (Redis down, registry unreadable...) is
    reported to ``on_error(error, backoff_s)`` and retried after an exponential backoff (0.1 s to
    5 s): outages never end the loop. SimulatedCrash (a BaseException) does."""
    backoff = 0.1
    while not stop.is_set():
        try:
            step()
            backoff = 0.1
        except Exception as e:
            on_error(e, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)


class TrainerLoop:
    """Buffer → distiller → gate → registry, with pause-while-busy; see the module docstring.

    ``load`` returns running + waiting requests over all replicas (None if unknown: then
    serving counts as idle); ``on_publish(version)`` runs after each promotion. ``crash`` is
    what ``arm_crash`` fires after the next read that returned entries, once they are fed (an
    update may have run) and before they are acked.
    """

    def __init__(self, draft: DraftModel, buffer: RecordBuffer, registry: DraftRegistry,
                 distill: DistillConfig | None = None, settings: TrainerSettings | None = None, *,
                 cluster: str = "global", consumer: str | None = None,
                 load: Callable[[], int | None] | None = None, on_publish: Callable[[int], None] | None = None,
                 crash: Callable[[], None] = _raise_crash, clock: Callable[[], float] = time.monotonic,
                 dashboard: DashboardStore | None = None, metrics: RayTrainerMetrics | None = None,
                 publish_adapters: bool = False) -> None:
        self.settings = settings or TrainerSettings()
        self.distill = distill or DistillConfig()
        self.buffer, self.registry, self.cluster = buffer, registry, cluster
        self.consumer = consumer or f"trainer-{cluster}"
        self.load, self.on_publish, self.crash, self.clock = load, on_publish, crash, clock
        self.dashboard = dashboard  # trainer updates, swaps and backlog samples for /dashboard
        self.metrics = metrics  # Ray metrics of updates and backlog (None outside Ray)
        self._last_backlog = float("-inf")
        self.holder = _DraftHolder(draft)
        self.base_version = 0  # the global version a cluster without a lineage of its own starts from
        # Shared-base mode: publish LoRA adapters, a delta on the initial draft every replica holds
        # as its base, so the distiller trains on that base and live versions load as adapters.
        self.publish_adapters = publish_adapters
        if publish_adapters:
            if self.distill.mode != "lora":
                raise ValueError("publishing adapters (cluster_drafts='lora') needs distill.mode='lora'")
            self.distiller = OnlineDistiller(draft, self.distill)
            self.live = _Live(self._load_adapter(cluster))
        else:
            self.live = _Live(load_live_draft(self.holder, registry, cluster))  # start from what replicas serve
        if self.live.version == 0:
            self._start_from_global()
        if not publish_adapters:
            self.distiller = OnlineDistiller(self.holder.draft, self.distill)
        self.gate = PromotionGate.from_config(self.distill)
        sock_ms = int(buffer.config.socket_timeout_s * 1000)
        self.block_ms = max(1, min(int(self.settings.poll_interval_s * 1000), sock_ms - 100))
        self._unacked: list[tuple[str, str]] = []  # (entry id, request id), oldest first
        self._unacked_ids: set[str] = set()
        self._recovering, self._cursor = True, "0"
        self._last_reclaim = float("-inf")
        self._last_record_at = clock()
        self._paused_since: float | None = None
        self._operator_paused = False
        self._crash_armed = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # counters are read by status() from another thread
        self._step_lock = threading.Lock()  # held for one step: pause() waits for the step in flight
        self.counters = dict(records_read=0, records_recovered=0, records_reclaimed=0, records_trained=0, acked=0,
                             updates=0, promotions=0, rejections=0, errors=0)
        self.paused_s = 0.0
        self.last_load: int | None = None
        self.last_gate: dict | None = None
        self.last_error: str | None = None

    # -- control (any thread) ------------------------------------------------------------------

    def pause(self, wait_s: float = 60.0) -> bool:
        """Stop training; returns once the step in flight (a read, maybe an update) is done, so no
        read starts after this returns. False if that step outlasted ``wait_s``."""
        self._operator_paused = True
        if not self._step_lock.acquire(timeout=wait_s):
            return False
        self._step_lock.release()
        return True

    def resume(self) -> None:
        self._operator_paused = False

    def arm_crash(self) -> None:
        self._crash_armed = True

    def stop(self) -> None:
        self._stop.set()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Step until ``stop()``; buffer or registry outages back off and retry, never end the loop."""
        run_until_stopped(self.step, self._stop, self.note_error)

    def note_error(self, error: Exception, backoff_s: float) -> None:
        """Count and log a failed step (Redis down, registry unreadable, a bad record...)."""
        with self._lock:
            self.counters["errors"] += 1
            self.last_error = f"{type(error).__name__}: {error}"
        if isinstance(error, (BufferUnavailable, OSError)) or type(error).__module__.startswith("redis"):
            log.warning("trainer: %s; retrying in %.1fs", error, backoff_s)
        else:
            log.exception("trainer step failed; retrying in %.1fs", backoff_s)

    def step(self) -> int:
        """One iteration: maybe pause, read, train, gate, ack. Returns the records read."""
        with self._step_lock:
            return self._step()

    def _step(self) -> int:
        now = self.clock()
        self._sample_backlog(now)
        if self._operator_paused or self._busy(now):
            self._stop.wait(self.settings.poll_interval_s)
            return 0
        entries = self._next_entries(now)
        if entries:
            with self._lock:
                self.counters["records_read"] += len(entries)
            self._unacked += [(eid, rec.request_id) for eid, rec in entries]
            self._unacked_ids.update(eid for eid, _ in entries)
            for result in self.distiller.add([rec for _, rec in entries]):
                self._on_update(result)
            if self._crash_armed:
                self._crash_armed = False
                log.warning("trainer: simulated crash with %d record(s) unacked", len(self._unacked))
                self.crash()
            self._ack_settled()
            self._last_record_at = self.clock()
            return len(entries)
        idle = self.settings.flush_idle_s
        if idle is not None and self.distiller.pending_records and now - self._last_record_at >= idle:
            if (result := self.distiller.maybe_update(force=True)) is not None:
                self._on_update(result)
            self._ack_settled()
        return 0

    def _sample_backlog(self, now: float) -> None:
        """A backlog sample for the dashboard and the metrics every ``dashboard.backlog_interval_s``
        (default 5 s without a dashboard), paused or not."""
        interval = self.dashboard.config.backlog_interval_s if self.dashboard is not None else 5.0
        if (self.dashboard is None and self.metrics is None) or now - self._last_backlog < interval:
            return
        self._last_backlog = now
        stats = self.buffer.stats(self.cluster)  # raises if Redis is down: the loop backs off and retries
        if self.dashboard is not None:
            self.dashboard.post_backlog(self.cluster, stats.length, stats.pending, stats.lag)
        if self.metrics is not None:
            self.metrics.observe_backlog(stats)

    def _busy(self, now: float) -> bool:
        s = self.settings
        if not s.pause_when_busy or self.load is None:
            return False
        load = self.load()
        self.last_load = load
        busy = load is not None and load >= s.busy_threshold
        if busy and self._paused_since is None:
            self._paused_since = now
        if busy and s.max_pause_s is not None and now - self._paused_since >= s.max_pause_s:
            busy = False  # starvation guard: one step, then the pause starts over
        if not busy and self._paused_since is not None:
            with self._lock:
                self.paused_s += now - self._paused_since
            self._paused_since = None
        return busy

    def _next_entries(self, now: float) -> list[Entry]:
        count = self.settings.read_count
        if self._recovering:  # our own entries from before a restart come first
            entries, last = read_own_pending(self.buffer, self.consumer, self.cluster, count, self._cursor)
            if last is None:
                self._recovering = False
            else:
                self._cursor = last
                entries = [e for e in entries if e[0] not in self._unacked_ids]
                with self._lock:
                    self.counters["records_recovered"] += len(entries)
                if entries:
                    log.info("trainer: re-read %d pending record(s) left by an earlier run of %s", len(entries),
                             self.consumer)
                return entries
        if now - self._last_reclaim >= self.settings.reclaim_interval_s:
            self._last_reclaim = now
            # XAUTOCLAIM also hands back our own unsettled entries once they idle long enough: skip those.
            entries = [e for e in self.buffer.reclaim(self.consumer, count, clusters=[self.cluster])
                       if e[0] not in self._unacked_ids]
            if entries:
                with self._lock:
                    self.counters["records_reclaimed"] += len(entries)
                log.info("trainer: reclaimed %d record(s) another consumer left pending", len(entries))
                return entries
        return self.buffer.read(self.consumer, count, self.block_ms, clusters=[self.cluster])

    def _on_update(self, result: UpdateResult) -> None:
        self._follow_registry()
        decision = self.gate.decide(self.distiller.draft, self.holder.draft, self.distiller.holdout,
                                    self.distiller.holdout_ages())
        if decision.promote:
            if self.publish_adapters:
                self._promote_adapter(result, decision)
            else:
                _promote(self.holder, self.distiller, self.registry, self.cluster, self.live, result, decision)
            if self.on_publish is not None:
                self.on_publish(self.live.version)  # broadcast; replicas that miss it find it at their next poll
        if self.dashboard is not None:
            version = self.live.version if decision.promote else None
            self.dashboard.post_trainer(self.cluster, result.update, result.loss, decision.candidate_alpha,
                                        decision.live_alpha, decision.promote, version)
            if decision.promote:
                self.dashboard.post_swap(self.cluster, self.live.version, "promoted")
        if self.metrics is not None:
            self.metrics.observe_update(self.cluster, result, decision)
        with self._lock:
            self.counters["updates"] += 1
            self.counters["records_trained"] += result.records
            self.counters["promotions" if decision.promote else "rejections"] += 1
            self.last_gate = {**asdict(decision), "update": result.update, "loss": result.loss,
                              "version": self.live.version if decision.promote else None}
        log.info("trainer update %d: loss %.4f, %s%s", result.update, result.loss, decision.reason,
                 f" -> published v{self.live.version}" if decision.promote else "")

    def _follow_registry(self) -> None:
        """Judge against, and publish on top of, the registry's live version, even if someone else
        (an admin rollback) moved it since our last promotion. A cluster without a lineage of its
        own is served the global draft, so that is what its candidates must beat."""
        manifest = self.registry.live(self.cluster)
        version = manifest.version if manifest else 0
        if version == self.live.version:
            if version == 0:
                self._start_from_global()
            return
        if manifest is None:  # the registry lost its lineage (e.g. a flushed Redis): start one afresh
            log.warning("trainer: the registry has no live draft for %r any more; next promotion starts its lineage",
                        self.cluster)
        else:
            log.info("trainer: registry live moved v%d -> v%d; gating against it", self.live.version, version)
            if self.publish_adapters:
                self._load_adapter(self.cluster)
            else:
                load_live_draft(self.holder, self.registry, self.cluster)
        self.live.version = version

    def _start_from_global(self) -> None:
        """A new cluster's draft starts from (and is judged against) the global draft replicas
        serve it until the cluster has versions of its own."""
        if self.cluster == DEFAULT_CLUSTER:
            return
        manifest = self.registry.live(DEFAULT_CLUSTER)
        if manifest is None or manifest.version == self.base_version:
            return
        if self.publish_adapters:
            self._load_adapter(DEFAULT_CLUSTER)
        else:
            load_live_draft(self.holder, self.registry, DEFAULT_CLUSTER)
        self.base_version = manifest.version
        log.info("trainer: cluster %r has no draft of its own yet; starting from global v%d", self.cluster,
                 manifest.version)

    def _load_adapter(self, lineage: str) -> int:
        """Shared-base mode: train on from ``lineage``'s live adapter and judge against it (merged);
        returns its version (0, and nothing loaded, when it has none)."""
        manifest = self.registry.live(lineage)
        if manifest is None:
            return 0
        specs = tensor_specs(self.distiller.export_adapter_state_dict())
        load_adapter_state_dict(self.distiller._peft, self.registry.load_validated(lineage, manifest.version, specs))
        self.holder.draft = self.distiller.candidate()
        return manifest.version

    def _promote_adapter(self, result: UpdateResult, decision: GateDecision) -> None:
        """Shared-base mode's publish: the adapter tensors, with the rank and alpha replicas need."""
        cfg = self.distill
        manifest = self.registry.publish(
            self.cluster, self.distiller.export_adapter_state_dict(), parent=self.live.version, loss=result.loss,
            gate_alpha=decision.candidate_alpha,
            meta={"loss_name": cfg.loss, "mode": cfg.mode, "records_seen": result.records_seen,
                  **AdapterSpec.from_distill_config(cfg).to_meta()})
        self.holder.draft = self.distiller.candidate()
        self.live.version = manifest.version

    def _ack_settled(self) -> None:
        # Ack only what the distiller no longer holds as pending: trained on, or held out.
        waiting = {r.request_id for r in self.distiller.pending_records}
        done = [eid for eid, rid in self._unacked if rid not in waiting]
        if not done:
            return
        acked = self.buffer.ack(self.cluster, done)  # raises if Redis is down: the list stays, retried next step
        self._unacked = [(eid, rid) for eid, rid in self._unacked if rid in waiting]
        self._unacked_ids.difference_update(done)
        with self._lock:
            self.counters["acked"] += acked

    # -- introspection -------------------------------------------------------------------------

    def status(self) -> dict:
        with self._lock:
            counters = dict(self.counters)
            paused_s = self.paused_s + (self.clock() - self._paused_since if self._paused_since is not None else 0.0)
            last_gate, last_error = self.last_gate, self.last_error
        pending = len(self.distiller.pending_records)
        return {
            **counters,
            "cluster": self.cluster, "consumer": self.consumer, "live_version": self.live.version,
            "records_held_out": max(0, self.distiller.records_seen - counters["records_trained"] - pending),
            "records_pending": pending, "unacked": len(self._unacked), "duplicates": self.distiller.duplicates,
            "paused": self._operator_paused or self._paused_since is not None,
            "pause_reason": ("operator" if self._operator_paused
                             else "busy" if self._paused_since is not None else None),
            "paused_s": paused_s, "last_load": self.last_load, "recovering": self._recovering,
            "last_gate": last_gate, "last_error": last_error,
        }

    def close(self) -> None:
        """Stop and close the buffer connection (the dashboard store may be shared: its owner closes it)."""
        self.stop()
        self.buffer.close()


class ClusterTrainers:
    """One TrainerLoop per query cluster behind a single ``step()``; a BacklogScheduler picks whose
    turn it is (fair by backlog).

    Clusters are discovered from the buffer's streams (``clusters`` None) or fixed. At most
    ``max_clusters`` loops live at once (each holds a draft copy and optimizer state); past the
    cap the least recently stepped one is closed. Nothing is lost by that: its unacked entries
    stay pending in Redis under its stable consumer name, and a new loop for the cluster
    re-reads them first, exactly as after a crash.
    """

    def __init__(self, make_loop: Callable[[str], TrainerLoop], buffer: RecordBuffer,
                 settings: TrainerSettings | None = None, clusters: list[str] | None = None,
                 scheduler: BacklogScheduler | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.make_loop, self.buffer = make_loop, buffer
        self.settings = settings or TrainerSettings()
        self.fixed = clusters
        self.scheduler = scheduler or BacklogScheduler()
        self.clock = clock
        self.dashboard: DashboardStore | None = None  # shared by the loops; closed here
        self.loops: dict[str, TrainerLoop] = {}
        self.last_stepped: dict[str, float] = {}
        self.evictions = 0
        self.known: list[str] = []  # clusters to train, from the last discovery
        self.scheduler_choice: str | None = None  # the cluster being stepped (errors are charged to it)
        self._last_discovery = float("-inf")
        self._stop = threading.Event()
        self._paused = False
        self._crash_armed = False
        self._lock = threading.Lock()  # loops dict: status() reads it from another thread

    @classmethod
    def from_config(cls, config: OsdAppConfig, **loop_kwargs) -> ClusterTrainers:
        """A loop per cluster from the app config (one draft template, copied per cluster), one
        dashboard store shared by all; ``trainer.consumer`` names the consumer of a single fixed cluster."""
        template = build_draft_template(config.models)
        registry = DraftRegistry.from_config(config.registry_config())
        dashboard = config.dashboard_store()
        settings = config.trainer
        clusters = settings.clusters

        def make_loop(cluster: str) -> TrainerLoop:
            consumer = settings.consumer if settings.consumer and clusters == [cluster] else f"trainer-{cluster}"
            return TrainerLoop(copy.deepcopy(template), RecordBuffer(config.buffer_config()), registry,
                               config.distill, settings, cluster=cluster, consumer=consumer, dashboard=dashboard,
                               publish_adapters=config.cluster_drafts == "lora", **loop_kwargs)

        trainers = cls(make_loop, RecordBuffer(config.buffer_config()), settings, clusters)
        trainers.dashboard = dashboard
        return trainers

    def discover(self) -> list[str]:
        """Clusters to train: the fixed list, else every cluster with a buffer stream (global first)."""
        if self.fixed is not None:
            return list(self.fixed)
        return sorted(set(self.buffer.clusters()), key=lambda c: (c != DEFAULT_CLUSTER, c))

    def _refresh(self) -> None:
        now = self.clock()
        if now - self._last_discovery >= self.settings.discovery_interval_s:
            self._last_discovery = now
            self.known = self.discover()

    def _open(self, cluster: str) -> TrainerLoop:
        while len(self.loops) >= self.settings.max_clusters:
            coldest = min(self.loops, key=lambda c: self.last_stepped.get(c, float("-inf")))
            log.info("trainer: %d cluster trainers live (max_clusters); closing the coldest, %r", len(self.loops),
                     coldest)
            with self._lock:
                loop = self.loops.pop(coldest)
            loop.close()
            self.evictions += 1
        loop = self.make_loop(cluster)
        if self._paused:
            loop.pause(wait_s=0)
        if self._crash_armed:
            loop.arm_crash()
        with self._lock:
            self.loops[cluster] = loop
        log.info("trainer: training cluster %r (live v%d)", cluster, loop.live.version)
        return loop

    def backlog(self, cluster: str) -> int:
        """Records waiting for ``cluster``: undelivered, pending (its loop's or an earlier one's, to
        redo), and held for its loop's next update. A live loop recovering or holding records
        counts at least 1, so it gets stepped."""
        stats = self.buffer.stats(cluster)
        loop = self.loops.get(cluster)
        if loop is None:
            return (stats.lag or 0) + stats.pending
        return (stats.lag or 0) + len(loop.distiller.pending_records) + int(loop._recovering)

    def step(self) -> int:
        """Step the cluster the scheduler picks (opening its loop if needed); with no backlog
        anywhere, wait one poll interval."""
        self._refresh()
        full = len(self.loops) >= self.settings.max_clusters
        backlogs = {}
        for cluster in self.known:
            b = self.backlog(cluster)
            # At the cap, opening a loop closes another: ask twice the backlog before switching (no thrash).
            backlogs[cluster] = b // 2 if full and cluster not in self.loops else b
        self.scheduler_choice = None
        chosen = self.scheduler.pick(backlogs)
        if chosen is None:
            self._stop.wait(self.settings.poll_interval_s)
            return 0
        self.scheduler_choice = chosen
        loop = self.loops.get(chosen) or self._open(chosen)
        self.last_stepped[chosen] = self.clock()
        return loop.step()

    def run(self) -> None:
        """Step until ``stop()``; like TrainerLoop.run, outages back off and never end the loop."""
        def note_error(error: Exception, backoff_s: float) -> None:
            loop = self.loops.get(self.scheduler_choice or "")
            if loop is not None:  # the step that failed was (mostly) that loop's
                loop.note_error(error, backoff_s)
            else:
                log.warning("trainer: %s: %s; retrying in %.1fs", type(error).__name__, error, backoff_s)

        run_until_stopped(self.step, self._stop, note_error)

    # -- control and introspection (any thread) --------------------------------------------------

    def pause(self, wait_s: float = 60.0) -> bool:
        self._paused = True
        return all([loop.pause(wait_s) for loop in self._snapshot()])

    def resume(self) -> None:
        self._paused = False
        for loop in self._snapshot():
            loop.resume()

    def arm_crash(self) -> None:
        """Test hook: the next loop to read records crashes (loops opened later included)."""
        self._crash_armed = True
        for loop in self._snapshot():
            loop.arm_crash()

    def stop(self) -> None:
        self._stop.set()
        for loop in self._snapshot():
            loop.stop()

    def close(self) -> None:
        self.stop()
        for loop in self._snapshot():
            loop.close()
        self.buffer.close()
        if self.dashboard is not None:
            self.dashboard.close()

    def _snapshot(self) -> list[TrainerLoop]:
        with self._lock:
            return list(self.loops.values())

    def status(self) -> dict:
        """Counters summed over clusters (the single-cluster shape), plus ``clusters``: each loop's status."""
        with self._lock:
            per = {c: loop.status() for c, loop in self.loops.items()}
        summed = {k: sum(s[k] for s in per.values()) for k in
                  ("records_read", "records_recovered", "records_reclaimed", "records_trained", "acked", "updates",
                   "promotions", "rejections", "errors", "records_held_out", "records_pending", "unacked",
                   "duplicates")}
        main = per.get(DEFAULT_CLUSTER) or next(iter(per.values()), {})
        return {**summed, "clusters": per, "evictions": self.evictions,
                "live_version": main.get("live_version", 0), "last_gate": main.get("last_gate"),
                "paused": self._paused or any(s["paused"] for s in per.values()),
                "recovering": any(s["recovering"] for s in per.values()),
                "last_error": next((s["last_error"] for s in per.values() if s["last_error"]), None)}


# --------------------------------------------------------------------------- Ray


class ServingReplicas:
    """The Serve deployment as the trainer sees it (through ``DeploymentHandle.broadcast``): its
    load, for pause-while-busy, and a nudge to load a draft just published. Failures are logged
    once per streak and never raised: the replicas' own registry poll is the safety net."""

    def __init__(self, app_name: str, deployment: str, timeout_s: float) -> None:
        self.app_name, self.deployment, self.timeout_s = app_name, deployment, timeout_s
        self._handle = None
        self._failing: set[str] = set()

    def _broadcast(self, method: str) -> list | None:
        try:
            if self._handle is None:
                self._handle = serve.get_deployment_handle(self.deployment, self.app_name)
            results = self._handle.broadcast(method).results(timeout_s=self.timeout_s, return_exceptions=True)
        except Exception as e:  # Serve restarting, app gone...
            if method not in self._failing:
                log.warning("trainer: %s on the replicas failed (%s: %s)", method, type(e).__name__, e)
            self._failing.add(method)
            return None
        self._failing.discard(method)
        return [r for r in results if not isinstance(r, BaseException)]

    def load(self) -> int | None:
        """Running + waiting requests summed over the replicas; None (serving counts as idle) if none answered."""
        loads = [r for r in self._broadcast("load") or [] if isinstance(r, dict)]
        return sum(int(r["running"]) + int(r["waiting"]) for r in loads) if loads else None

    def sync_drafts(self, version: int) -> None:
        """Ask every live replica to load the registry's live drafts now rather than at its next poll."""
        self._broadcast("sync_drafts")


def _die() -> None:
    # A hard exit, like an OOM kill: no cleanup, no acks; Ray restarts the actor (max_restarts=-1).
    os._exit(1)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class TrainerActor:
    """Runs a TrainerLoop on a thread. ``config`` is an OsdAppConfig dict; ``app_name`` and
    ``server_deployment`` name the Serve deployment whose load pauses training (None: never pause)."""

    def __init__(self, config: dict, app_name: str | None = None, server_deployment: str | None = None) -> None:
        cfg = OsdAppConfig.model_validate(config)
        torch.set_num_threads(cfg.trainer.torch_threads)  # Ray set OMP_NUM_THREADS from num_cpus; be deliberate
        with warnings.catch_warnings():  # Ray's own property trips its deprecated actor_id accessor
            warnings.simplefilter("ignore")
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        replicas = (ServingReplicas(app_name, server_deployment, cfg.trainer.load_timeout_s)
                    if app_name and server_deployment else None)
        self.loop = ClusterTrainers.from_config(cfg, load=replicas and replicas.load,
                                                on_publish=replicas and replicas.sync_drafts, crash=_die,
                                                metrics=RayTrainerMetrics())
        self._thread = threading.Thread(target=self.loop.run, name="osd-trainer", daemon=True)
        self._thread.start()
        log.info("trainer started (%s) for clusters %s", "restarted" if self.restarted else "first start",
                 cfg.trainer.clusters or "as they appear")

    def status(self) -> dict:
        return {**self.loop.status(), "restarted": self.restarted, "pid": os.getpid(),
                "running": self._thread.is_alive()}

    def pause(self) -> dict:
        """Stop training until resume() (an operator pause; a restarted actor starts unpaused)."""
        self.loop.pause()
        return self.status()

    def resume(self) -> dict:
        self.loop.resume()
        return self.status()

    def crash_after_next_read(self) -> None:
        """Test hook: exit the process after the next read that returns records, before acking them."""
        self.loop.arm_crash()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.loop.stop()
        self._thread.join(timeout_s)
        self.loop.close()


def start_trainer(config: dict, app_name: str | None = None, server_deployment: str | None = None,
                  wait_for_name_s: float = 30.0):
    """Create the TrainerActor with the resources ``config['trainer']`` asks for; returns its handle.

    Named ``trainer_actor_name(app_name)`` in namespace TRAINER_NAMESPACE when ``app_name`` is
    given; if a previous owner's actor still holds the name (it dies with its owner), wait.
    """
    settings = OsdAppConfig.model_validate(config).trainer
    options = dict(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus)
    if app_name is not None:
        options |= dict(name=trainer_actor_name(app_name), namespace=TRAINER_NAMESPACE)
    deadline = time.monotonic() + wait_for_name_s
    while True:
        try:
            return TrainerActor.options(**options).remote(config, app_name, server_deployment)
        except ValueError as e:  # "actor name already taken"
            if "name" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
