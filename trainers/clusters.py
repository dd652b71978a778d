"""Training many query clusters from one process: a TrainerLoop per cluster, fair by backlog."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from osd.data.buffer import RecordBuffer
from osd.serving.dashboard import DashboardStore
from trainers.config import TrainerSettings
from trainers.loop import DEFAULT_CLUSTER, TrainerLoop, run_until_stopped
from trainers.scheduler import BacklogScheduler

log = logging.getLogger(__name__)


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
        return (stats.lag or 0) + len(loop.distiller.pending_records) + int(loop.recovering)

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
