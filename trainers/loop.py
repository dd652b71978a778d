"""The one training loop: buffer → distiller → gate → registry → the live draft.

``TrainerLoop`` reads training records through the buffer's consumer group, feeds
``trainers.distiller.OnlineDistiller``, asks ``trainers.gate.PromotionGate`` after every
update and publishes promoted drafts to the registry (parent = the live version). The Ray
trainer actor (``actors/trainer.py``) runs it on a thread; ``osd distill``
(``trainers/replay.py``) runs it in one process beside the engine, which it hands as the
``holder`` so promotions swap straight into the engine. Plain Python: tested without Ray.

Delivery and restarts (DESIGN.md § Redis buffer):

- An entry is acked only once it is *settled*: trained on, or set aside as held-out.
  Records waiting for the next update stay pending in Redis, so a crash loses none of them.
- The consumer name is stable (``trainer-<cluster>``): a restarted loop first re-reads its
  own pending entries (XREADGROUP from ID 0), then reads new ones. Entries another consumer
  left pending longer than ``buffer.claim_idle_ms`` are taken over with XAUTOCLAIM.
- Delivery is at least once; the distiller drops redelivered request ids it has seen.

Spare capacity: with ``pause_when_busy`` the loop asks ``load()`` (in Ray: every replica's
running + waiting requests) before each read and sleeps while serving is busy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from osd.data.buffer import BufferStats, BufferUnavailable, Entry, RecordBuffer
from osd.decoding.eagle import EagleHead
from osd.models.adapters import AdapterSpec
from osd.models.drafts import DraftModel, load_published_state, published_specs
from osd.registry import (
    CorruptDraftError,
    DraftMismatchError,
    DraftRegistry,
    RegistryError,
    tensor_specs,
)
from osd.serving.dashboard import DashboardStore
from trainers.config import DistillConfig, TrainerSettings
from trainers.distiller import OnlineDistiller, UpdateResult
from trainers.eagle import make_distiller
from trainers.gate import GateDecision, PromotionGate

log = logging.getLogger(__name__)

DEFAULT_CLUSTER = "global"


class DraftHolder(Protocol):
    """Whatever holds the live draft the gate judges against and promotions replace: the
    engine in ``osd distill``, a small box in the trainer actor."""

    draft: DraftModel | None


class TrainerMetrics(Protocol):
    """Where a loop reports updates and backlog samples (Ray metrics in the actor)."""

    def observe_update(self, cluster: str, result: UpdateResult, decision: GateDecision) -> None: ...

    def observe_backlog(self, stats: BufferStats) -> None: ...


@dataclass
class _Box:
    draft: DraftModel | None


@dataclass
class Live:
    """A lineage's live version as the trainer sees it, and the gate decisions taken so far."""

    version: int
    decisions: list[dict] = field(default_factory=list)


def load_live_draft(holder: DraftHolder, registry: DraftRegistry, cluster: str = "global") -> int:
    """Start from the registry's live draft for ``cluster``, as a new replica would; returns its version.

    0 (and ``holder.draft`` untouched) when the cluster has no live version yet.
    """
    if holder.draft is None:
        raise ValueError("distillation needs a draft: build the engine with a draft (e.g. --draft self), not 'none'")
    manifest = registry.live(cluster)
    if manifest is None:
        return 0
    live = holder.draft
    state = registry.load_validated(cluster, manifest.version, published_specs(live, manifest.tensors))
    holder.draft = load_published_state(live, state)  # beside the live one
    return manifest.version



def promote(holder: DraftHolder, distiller: OnlineDistiller, registry: DraftRegistry | None, cluster: str,
             live: Live, result: UpdateResult, decision: GateDecision) -> None:
    """Publish the candidate, then swap it into ``holder``: the swap is one reference assignment."""
    state = distiller.export_state_dict()
    if registry is None:
        live.version += 1
        holder.draft = load_published_state(holder.draft, state)
        return
    cfg = distiller.config
    manifest = registry.publish(cluster, state, parent=live.version, loss=result.loss,
                                gate_alpha=decision.candidate_alpha,
                                meta={"loss_name": cfg.loss, "mode": cfg.mode, "records_seen": result.records_seen})
    # Load it back the way a serving replica does (checksum + names/shapes/dtypes), beside the live draft.
    specs = published_specs(holder.draft, state)
    holder.draft = load_published_state(holder.draft, registry.load_validated(cluster, manifest.version, specs))
    live.version = manifest.version


class SimulatedCrash(BaseException):
    """Raised by the default crash hook: a BaseException, so the loop does not catch it as an error."""


def _raise_crash() -> None:
    raise SimulatedCrash("crash_after_next_read: simulated trainer death before acking")



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
    update may have run) and before they are acked. ``holder`` (default: a box around
    ``draft``) holds the live draft that promotions replace; ``distiller`` and ``gate``
    default to ones built from ``distill``.
    """

    def __init__(self, draft: DraftModel, buffer: RecordBuffer, registry: DraftRegistry,
                 distill: DistillConfig | None = None, settings: TrainerSettings | None = None, *,
                 cluster: str = "global", consumer: str | None = None,
                 load: Callable[[], int | None] | None = None, on_publish: Callable[[int], None] | None = None,
                 crash: Callable[[], None] = _raise_crash, clock: Callable[[], float] = time.monotonic,
                 dashboard: DashboardStore | None = None, metrics: TrainerMetrics | None = None,
                 publish_adapters: bool = False, holder: DraftHolder | None = None,
                 distiller: OnlineDistiller | None = None, gate: PromotionGate | None = None) -> None:
        self.settings = settings or TrainerSettings()
        self.distill = distill or DistillConfig()
        self.buffer, self.registry, self.cluster = buffer, registry, cluster
        self.consumer = consumer or f"trainer-{cluster}"
        self.load, self.on_publish, self.crash, self.clock = load, on_publish, crash, clock
        self.dashboard = dashboard  # trainer updates, swaps and backlog samples for /dashboard
        self.metrics = metrics  # Ray metrics of updates and backlog (None outside Ray)
        self._last_backlog = float("-inf")
        self.holder = holder if holder is not None else _Box(draft)
        self.base_version = 0  # the global version a cluster without a lineage of its own starts from
        # Shared-base mode: publish LoRA adapters, a delta on the initial draft every replica holds
        # as its base, so the distiller trains on that base and live versions load as adapters.
        self.publish_adapters = publish_adapters
        if publish_adapters:
            if self.distill.mode != "lora":
                raise ValueError("publishing adapters (cluster_drafts='lora') needs distill.mode='lora'")
            if isinstance(draft, EagleHead):
                raise ValueError("shared-base LoRA drafts (cluster_drafts='lora') adapt a self-draft; an eagle head is "
                                 "one layer and trains whole: use cluster_drafts='full' with models.draft='eagle'")
            # Replicas serve adapters over their own base's head: a grown shortlist would not reach them.
            self.distiller = distiller or OnlineDistiller(draft, self.distill.model_copy(update={"shortlist_size": 0}))
            self.live = Live(self._load_adapter(cluster))
        else:
            self.live = Live(load_live_draft(self.holder, registry, cluster))  # start from what replicas serve
        if self.live.version == 0:
            self._start_from_global()
        if not publish_adapters:
            self.distiller = distiller or make_distiller(self.holder.draft, self.distill)
        self.gate = gate or PromotionGate.from_config(self.distill)
        sock_ms = int(buffer.config.socket_timeout_s * 1000)
        self.block_ms = max(1, min(int(self.settings.poll_interval_s * 1000), sock_ms - 100))
        self._unacked: list[tuple[str, str]] = []  # (entry id, request id), oldest first
        self._unacked_ids: set[str] = set()
        self.recovering, self._cursor = True, "0"
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

    def flush(self) -> UpdateResult | None:
        """Train on the records waiting for the next update now (fewer than ``update_interval``),
        gate the result and ack what is settled: nothing read stays unused."""
        with self._step_lock:
            result = self.distiller.maybe_update(force=True)
            if result is not None:
                self._on_update(result)
            self._ack_settled()
            return result

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
        if self.recovering:  # our own entries from before a restart come first
            entries, last = self.buffer.read_pending(self.consumer, self.cluster, count, self._cursor)
            if last is None:
                self.recovering = False
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
                promote(self.holder, self.distiller, self.registry, self.cluster, self.live, result, decision)
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
        (an admin rollback, or a replica's automatic one: osd/serving/swap_watch.py) moved it since
        our last promotion. A cluster without a lineage of its own is served the global draft, so
        that is what its candidates must beat. The trainer never makes an existing version live
        again, and the registry refuses to promote one marked bad, so a rolled-back bad version
        stays out; the next candidate must beat the version rolled back to."""
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
            bad = self.registry.bad_versions(self.cluster)
            if version in bad:  # refused already (by us, a replica or an admin): nobody serves it; keep ours
                return
            if (reason := bad.get(self.live.version)) is not None:
                log.warning("trainer: serving marked v%d bad (%s); the live draft is v%d again", self.live.version,
                            reason, version)
            log.info("trainer: registry live moved v%d -> v%d; gating against it", self.live.version, version)
            try:
                if self.publish_adapters:
                    self._load_adapter(self.cluster)
                else:
                    load_live_draft(self.holder, self.registry, self.cluster)
            except (CorruptDraftError, DraftMismatchError) as e:
                self._refuse_live(version, e)
                return
        self.live.version = version

    def _refuse_live(self, version: int, error: Exception) -> None:
        """The registry's live version cannot be loaded (bytes that fail their checksum, tensors that fit
        no draft of this construction), so no replica can serve it either. Without this, every update
        raised here until an operator moved the pointer. Mark it bad and put the pointer back on the
        version we hold (compare-and-set), so replicas and the lineage go on by themselves; holding v0,
        which is not stored, it is only marked, and our next promotion replaces it."""
        reason = f"the trainer could not load it ({type(error).__name__}: {error})"
        log.error("trainer: live draft %r v%d is unusable, rejecting it: %s", self.cluster, version, error)
        try:
            if not self.live.version:
                raise RegistryError("v0 is not stored")
            self.registry.reject(self.cluster, version, reason, to_version=self.live.version)
        except RegistryError:  # nothing to go back to (v0, pruned, or damaged too): mark it only
            self.registry.mark_bad(self.cluster, version, reason)

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
        self.distiller.load_adapter_state_dict(self.registry.load_validated(lineage, manifest.version, specs))
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
            "paused_s": paused_s, "last_load": self.last_load, "recovering": self.recovering,
            "last_gate": last_gate, "last_error": last_error,
        }

    def close(self) -> None:
        """Stop and close the buffer connection (the dashboard store may be shared: its owner closes it)."""
        self.stop()
        self.buffer.close()
