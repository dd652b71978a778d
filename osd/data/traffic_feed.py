"""Every replica's traffic into every replica's suffix index, through the record buffer.

Suffix speculation (osd/decoding/suffix.py) proposes continuations seen in recent traffic of
the request's cluster. A replica's engine adds its own requests to its ``TrafficIndex`` as
they finish; a ``TrafficFeed`` adds everyone else's, read from the training-record buffer
every serving replica already pushes to (osd/data/buffer.py):

- It tails the per-cluster streams with plain ``XRANGE`` from the last id it saw, not through
  the trainers' consumer group, so the trainers' deliveries, pending lists and lag are
  untouched, and every replica reads every record.
- It starts (``rebuild``) from the newest ``SuffixConfig.rebuild_records`` entries of each
  cluster: that is how the index survives a replica restart, or how a new replica starts warm.
  Streams are trimmed (``BufferConfig.maxlen``, approximate MAXLEN), which bounds how far back
  a rebuild, or a replica that fell behind, can reach; the index is bounded anyway.
- The replica's own requests arrive twice, directly from the engine and through the buffer;
  ``TrafficIndex.add`` dedupes them by the record's ``request_id`` (as it does a push that
  landed twice).
- A cluster first seen after the rebuild is read from the start of its stream (all of it is
  new). Undecodable entries are skipped (the trainers dead-letter them).

One daemon thread per replica: ``rebuild`` once (retried until it succeeds), then ``poll``
every ``poll_s``. It never raises out of the thread and never touches a request: with Redis
down it logs one warning per outage, counts the failed ticks and tries again next tick.
Plain Python, no Ray.
"""

from __future__ import annotations

import logging
import threading

from osd.config import SuffixConfig
from osd.data.buffer import BufferUnavailable, Entry, RecordBuffer
from osd.decoding.suffix import TrafficIndex

log = logging.getLogger(__name__)

START = "0-0"  # read_after this id reads a stream from its start


class TrafficFeed:
    """Folds the buffer's records, from every replica, into one replica's ``TrafficIndex``."""

    def __init__(self, buffer: RecordBuffer, traffic: TrafficIndex, config: SuffixConfig, page: int = 256):
        if page < 1:
            raise ValueError(f"page must be >= 1, got {page}")
        self.buffer = buffer
        self.traffic = traffic
        self.config = config
        self.page = page
        self.folded = 0  # records folded into the index (repeats by request id not counted)
        self.errors = 0  # rebuilds / polls that failed
        self.last_error: str | None = None
        self._last: dict[str, str] = {}  # cluster → id of the last entry read
        self._rebuilt = False
        self._down = False  # in a Redis outage (warned once)
        self._lock = threading.Lock()  # one rebuild / poll at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reads -----------------------------------------------------------------------------

    def rebuild(self) -> int:
        """Fold in the newest ``rebuild_records`` records of every cluster; returns how many were folded."""
        with self._lock:
            n = 0
            for cluster in self.buffer.clusters():
                entries, last = self.buffer.newest(cluster, self.config.rebuild_records)
                n += self._fold(entries)
                if last is not None:
                    self._last[cluster] = last
            self._rebuilt = True
            return n

    def poll(self) -> int:
        """Fold in every record pushed since the last read, all clusters; returns how many were folded."""
        with self._lock:
            n = 0
            for cluster in self.buffer.clusters():  # re-listed: clusters appear over time
                while True:  # page until nothing is left after the last id
                    entries, last = self.buffer.read_after(cluster, self._last.get(cluster, START), self.page)
                    if last is None:
                        break
                    n += self._fold(entries)
                    self._last[cluster] = last
            return n

    def _fold(self, entries: list[Entry]) -> int:
        n = 0
        for _, rec in entries:
            n += self.traffic.add(rec.prompt_ids, rec.output_ids, rec.cluster, rec.request_id)
        self.folded += n
        return n

    # -- background thread -----------------------------------------------------------------

    def start(self) -> TrafficFeed:
        """Start the daemon thread: rebuild, then poll every ``poll_s``."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="osd-traffic-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.config.poll_s)

    def tick(self) -> int:
        """One step of the thread: rebuild until that succeeds, then poll. Never raises."""
        try:
            n = self.poll() if self._rebuilt else self.rebuild()
        except BufferUnavailable as e:
            self._failed(e)
            if not self._down:
                log.warning("traffic feed: record buffer unreachable, suffix index not learning from other "
                            "replicas until it is back (retrying every %.1f s): %s", self.config.poll_s, e)
            self._down = True
            return 0
        except Exception as e:  # a bug or a surprise from Redis: log it (once per distinct error), keep going
            message = f"{type(e).__name__}: {e}"
            if message != self.last_error:
                log.exception("traffic feed: %s failed", "poll" if self._rebuilt else "rebuild")
            self._failed(e)
            return 0
        if self._down:
            log.info("traffic feed: record buffer reachable again")
            self._down = False
        return n

    def _failed(self, error: Exception) -> None:
        self.errors += 1
        self.last_error = f"{type(error).__name__}: {error}"

    def stats(self) -> dict:
        return {"folded": self.folded, "errors": self.errors, "last_error": self.last_error,
                "rebuilt": self._rebuilt, "clusters": len(self._last), "alive": self.alive}
