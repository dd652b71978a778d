"""Ship finished requests' training records to the buffer, off the response path.

Serving must never fail, or wait, because the buffer is slow or down (DESIGN.md § Redis
buffer). So ``submit`` only appends to an in-memory backlog and returns; one background
thread pushes the backlog's head to the buffer, oldest first.

One ordered backlog serves as both the queue and the spool: while the buffer answers, it
is a queue the thread drains; once a push fails with the buffer unavailable, everything
in it (and everything submitted after) is *spooled*: kept in order and retried with
exponential backoff until a push succeeds, then flushed in order. One structure means
order across an outage comes for free. The backlog is bounded (``capacity``): on
overflow the OLDEST record is dropped and counted, never silently.

With ``spool_dir``, spooled records are also written there as codec files while the
buffer is down (and whatever is left at ``close()``), and read back first by the next
Recorder on that directory, so a replica restart during an outage loses nothing. Give
each replica its own directory (an flock refuses a second user).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis

from osd.data.buffer import BufferUnavailable
from osd.data.codec import decode_record, encode_record
from osd.data.records import TrainingRecord

log = logging.getLogger(__name__)

# Worth retrying: the buffer is down or refusing writes for now (OOM, LOADING, READONLY).
_RETRYABLE = (BufferUnavailable, redis.RedisError, OSError)


class RecordSink(Protocol):
    def push(self, record: TrainingRecord) -> str: ...


@dataclass(eq=False)  # identity: `entry in backlog` must never compare records' tensors
class _Entry:
    record: TrainingRecord
    path: Path | None = None  # its spool file, once written
    unwritable: bool = False  # writing its spool file failed: memory only, don't retry the write


@dataclass(frozen=True)
class RecorderStats:
    submitted: int  # records handed to submit()
    pushed: int  # records the buffer accepted
    queued: int  # records not yet pushed (backlog + the one in flight)
    spooled: int  # of those, records held because the buffer is unavailable
    dropped: int  # records lost: backlog overflow (oldest first), malformed records, or close() without spool_dir
    push_failures: int  # failed push attempts (each retry counts)
    buffer_available: bool  # the last push attempt succeeded (True before any)


class Recorder:
    """Background, bounded, order-preserving shipping of records to a RecordBuffer; thread-safe."""

    def __init__(self, buffer: RecordSink, capacity: int = 10_000, spool_dir: str | os.PathLike | None = None,
                 backoff_initial_s: float = 0.05, backoff_max_s: float = 5.0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        self.buffer = buffer
        self.capacity = capacity
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._cond = threading.Condition()  # guards everything below; no I/O is done while holding it
        self._backlog: deque[_Entry] = deque()
        self._inflight = 0
        self._down = False
        self._retry_at = 0.0
        self._delay = backoff_initial_s
        self._closed = False
        self._stop = False
        self._doomed_files: list[Path] = []  # spool files of dropped/pushed records, unlinked by the worker
        self.submitted = self.pushed = self.dropped = self.push_failures = 0
        self._spool_dir = Path(spool_dir) if spool_dir is not None else None
        self._lock_file = None
        self._file_seq = 0
        if self._spool_dir is not None:
            self._open_spool_dir()
        self._thread = threading.Thread(target=self._run, name="osd-recorder", daemon=True)
        self._thread.start()

    # -- producer side (request threads) -----------------------------------------------------

    def submit(self, record: TrainingRecord) -> bool:
        """Queue ``record`` for the buffer; never blocks on I/O, never raises. False if it was not kept."""
        try:
            with self._cond:
                self.submitted += 1
                if self._closed:
                    self.dropped += 1
                    log.warning("recorder is closed: dropped record %s", record.request_id)
                    return False
                self._backlog.append(_Entry(record))
                self._trim_locked()
                self._cond.notify_all()
            return True
        except Exception:  # the response path must not fail because of bookkeeping
            log.exception("recorder.submit failed; record dropped")
            with contextlib.suppress(Exception):
                self.dropped += 1
            return False

    @property
    def spooled(self) -> int:
        return self.stats().spooled

    def stats(self) -> RecorderStats:
        with self._cond:
            queued = len(self._backlog) + self._inflight
            return RecorderStats(self.submitted, self.pushed, queued, queued if self._down else 0, self.dropped,
                                 self.push_failures, not self._down)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every submitted record is pushed (or dropped); True if so within ``timeout_s``.

        Also cuts short the current backoff, so a flush after Redis returns retries at once.
        """
        with self._cond:
            self._retry_at = 0.0
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._backlog and not self._inflight, timeout=timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush for up to ``timeout_s``, stop the thread; what is left goes to spool_dir, or counts as dropped."""
        with self._cond:
            if self._closed:
                return
        self.flush(timeout_s)
        with self._cond:
            self._closed = self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=max(timeout_s, 1.0) + self._push_timeout_s())
        with self._cond:
            left = list(self._backlog)
        if left and self._spool_dir is not None:
            self._persist(left)
            log.info("recorder closed with %d record(s) kept in %s for the next start", len(left), self._spool_dir)
        elif left:
            with self._cond:
                self.dropped += len(left)
                self._backlog.clear()
            log.warning("recorder closed with %d unpushed record(s) and no spool_dir: dropped", len(left))
        self._unlink_doomed()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _push_timeout_s(self) -> float:
        """Upper bound of one push (the buffer's socket timeout), so close() waits out a push in flight."""
        config = getattr(self.buffer, "config", None)
        return float(getattr(config, "socket_timeout_s", 5.0))

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the worker --------------------------------------------------------------------------

    def _trim_locked(self) -> None:
        while len(self._backlog) > self.capacity:
            oldest = self._backlog.popleft()
            self.dropped += 1
            if oldest.path is not None:
                self._doomed_files.append(oldest.path)
            if self.dropped & (self.dropped - 1) == 0:  # 1st, 2nd, 4th, 8th...: visible, but no log flood
                log.warning("record backlog full (%d): dropping the oldest records (%s, cluster %s); %d dropped so far",
                            self.capacity, oldest.record.request_id, oldest.record.cluster, self.dropped)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    unsaved = self._unsaved_locked()
                    wait = self._retry_at - time.monotonic()
                    if unsaved or self._doomed_files or (self._backlog and wait <= 0):
                        break
                    self._cond.wait(wait if self._backlog else None)
                if self._stop:
                    return
                entry = None
                if self._backlog and self._retry_at - time.monotonic() <= 0:
                    entry = self._backlog.popleft()
                    self._inflight = 1
            if unsaved:
                self._persist(unsaved)
            self._unlink_doomed()
            if entry is not None:
                self._push(entry)

    def _push(self, entry: _Entry) -> None:
        try:
            self.buffer.push(entry.record)
            outcome = "ok"
        except _RETRYABLE as e:
            outcome = "retry"
            error = e
        except Exception:
            outcome = "bad"
            log.exception("the buffer refused record %s as malformed; dropped", entry.record.request_id)
        with self._cond:
            self._inflight = 0
            if outcome == "retry":
                self.push_failures += 1
                if not self._down:
                    log.warning("record buffer unavailable (%s); spooling records and retrying with backoff", error)
                self._down = True
                self._backlog.appendleft(entry)  # keep order: it is still the oldest
                self._trim_locked()
                self._retry_at = time.monotonic() + self._delay
                self._delay = min(self._delay * 2, self.backoff_max_s)
            else:
                if outcome == "ok":
                    self.pushed += 1
                    if self._down:
                        log.info("record buffer is back; flushing %d spooled record(s)", len(self._backlog))
                    self._down = False
                    self._delay = self.backoff_initial_s
                else:
                    self.dropped += 1
                if entry.path is not None:
                    self._doomed_files.append(entry.path)
            self._cond.notify_all()

    # -- the optional disk spool ---------------------------------------------------------------

    def _unsaved_locked(self) -> list[_Entry]:
        # Disk writes only while the buffer is down: the healthy path stays in memory.
        if self._spool_dir is None or not self._down:
            return []
        return [e for e in self._backlog if e.path is None and not e.unwritable]

    def _persist(self, entries: list[_Entry]) -> None:
        """Write spool files for ``entries``. Runs on the worker thread (or in close() once it has
        stopped), so no entry is being pushed meanwhile; submit() may only drop some."""
        written = []
        for entry in entries:
            if entry.path is not None:
                continue
            self._file_seq += 1
            path = self._spool_dir / f"{self._file_seq:016d}.osdr"
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_bytes(encode_record(entry.record))
                os.replace(tmp, path)  # a crash never leaves a half file under the real name
            except Exception:
                log.exception("could not write spool file %s; the record stays in memory only", path)
                entry.unwritable = True
                continue
            written.append((entry, path))
        with self._cond:
            alive = {id(e) for e in self._backlog}
            for entry, path in written:
                entry.path = path
                if id(entry) not in alive:  # dropped on overflow while we wrote it
                    self._doomed_files.append(path)

    def _unlink_doomed(self) -> None:
        with self._cond:
            doomed, self._doomed_files = self._doomed_files, []
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _open_spool_dir(self) -> None:
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self._spool_dir / ".lock", "a+b")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"spool dir {self._spool_dir} is in use by another recorder; give each replica "
                               "its own spool_dir") from None
        files = sorted(p for p in self._spool_dir.glob("*.osdr") if p.stem.isdigit())
        for path in files:
            try:
                self._backlog.append(_Entry(decode_record(path.read_bytes()), path))
            except (OSError, ValueError) as e:  # RecordDecodeError is a ValueError
                log.error("spool file %s is unreadable (%s); moved aside as .bad", path, e)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
        if files:
            self._file_seq = int(files[-1].stem)
            self._down = True  # they failed before: treat them as spooled until a push succeeds
            self._trim_locked()
            log.info("recorder: %d spooled record(s) from %s will be pushed first", len(self._backlog), self._spool_dir)
