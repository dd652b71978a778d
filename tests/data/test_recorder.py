"""The Recorder against a real redis-server that is stopped and restarted under it."""

from __future__ import annotations

import time

import pytest
import torch

from osd.data.buffer import BufferConfig, BufferUnavailable, RecordBuffer
from osd.data.recorder import Recorder
from osd.data.records import TrainingRecord

FAST = dict(backoff_initial_s=0.02, backoff_max_s=0.2)


def record(i: int, cluster: str = "global", T: int = 3, k: int = 4) -> TrainingRecord:
    return TrainingRecord(prompt_ids=[1, 2, i % 50], output_ids=list(range(T)),
                          teacher_token_ids=torch.zeros(T, k, dtype=torch.int32),  # [T, k] int32
                          teacher_logprobs=torch.zeros(T, k, dtype=torch.float16),  # [T, k] float16
                          teacher_logsumexp=torch.zeros(T), cluster=cluster, request_id=f"r{i:04d}")


@pytest.fixture
def buffer(redis_url):
    # Short socket bounds: a push against a dead server must fail fast, never hang a test.
    buf = RecordBuffer(BufferConfig(redis_url=redis_url, socket_timeout_s=1.0, socket_connect_timeout_s=0.5))
    yield buf
    buf.close()


@pytest.fixture
def server(redis_server):
    yield redis_server
    if not redis_server.running:  # a failed test must not leave Redis down for the next
        redis_server.start()


def stream_ids(buf: RecordBuffer, cluster: str = "global") -> list[str]:
    return [rec.request_id for _, rec in buf.read("checker", count=1000, clusters=[cluster])]


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def timed_submits(recorder: Recorder, records) -> float:
    worst = 0.0
    for rec in records:
        t = time.perf_counter()
        assert recorder.submit(rec)
        worst = max(worst, time.perf_counter() - t)
    return worst


def test_submitted_records_reach_the_stream_in_order(buffer):
    with Recorder(buffer, **FAST) as rec:
        timed_submits(rec, [record(i) for i in range(5)] + [record(9, cluster="math")])
        assert rec.flush(5)
        stats = rec.stats()
    assert stats.submitted == stats.pushed == 6 and stats.dropped == stats.spooled == stats.queued == 0
    assert stream_ids(buffer) == [f"r{i:04d}" for i in range(5)]
    assert stream_ids(buffer, "math") == ["r0009"]


def test_redis_down_mid_traffic_spools_then_flushes_in_order(buffer, server):
    with Recorder(buffer, **FAST) as rec:
        timed_submits(rec, [record(i) for i in range(3)])
        assert rec.flush(5)
        server.stop()
        worst = timed_submits(rec, [record(i) for i in range(3, 10)])
        assert worst < 0.05, f"submit blocked for {worst:.3f}s while Redis was down"
        wait_for(lambda: rec.stats().push_failures >= 2)  # retried with backoff, still down
        stats = rec.stats()
        assert not stats.buffer_available and stats.spooled == 7 and stats.pushed == 3 and stats.dropped == 0
        assert not rec.flush(0.2), "nothing can be flushed while Redis is down"
        server.start()  # same port and data dir: the AOF brings back the first three
        assert rec.flush(10)
        stats = rec.stats()
    assert stats.pushed == 10 and stats.spooled == 0 and stats.dropped == 0 and stats.buffer_available
    assert stream_ids(buffer) == [f"r{i:04d}" for i in range(10)]


def test_spool_overflow_drops_the_oldest_and_counts_it(buffer, server):
    with Recorder(buffer, capacity=4, **FAST) as rec:
        server.stop()
        timed_submits(rec, [record(i) for i in range(10)])
        wait_for(lambda: rec.stats().push_failures >= 1)
        stats = rec.stats()
        assert stats.dropped == 6 and stats.spooled == 4
        server.start()
        assert rec.flush(10)
    assert stream_ids(buffer) == [f"r{i:04d}" for i in range(6, 10)]


def test_spool_dir_survives_a_replica_restart(buffer, server, tmp_path):
    server.stop()
    first = Recorder(buffer, spool_dir=tmp_path, **FAST)
    timed_submits(first, [record(i) for i in range(4)])
    wait_for(lambda: len(list(tmp_path.glob("*.osdr"))) == 4)
    with pytest.raises(RuntimeError, match="in use"):
        Recorder(buffer, spool_dir=tmp_path)
    first.close(timeout_s=0.2)  # the replica goes away during the outage
    assert first.stats().dropped == 0
    server.start()
    with Recorder(buffer, spool_dir=tmp_path, **FAST) as second:
        timed_submits(second, [record(4)])
        assert second.flush(10)
        assert second.stats().pushed == 5
    assert stream_ids(buffer) == [f"r{i:04d}" for i in range(5)]
    assert not list(tmp_path.glob("*.osdr"))


class FlakySink:
    """Unavailable for the first ``down`` pushes, then rejects malformed records like a real buffer."""

    def __init__(self, down: int = 0):
        self.down = down
        self.pushed = []

    def push(self, rec):
        if self.down:
            self.down -= 1
            raise BufferUnavailable("down for a moment")
        if rec.request_id == "bad":
            raise ValueError("cannot encode")
        self.pushed.append(rec.request_id)
        return "1-0"


def test_malformed_records_are_counted_not_retried_and_closed_recorder_counts_drops():
    sink = FlakySink(down=2)
    rec = Recorder(sink, **FAST)
    bad = record(1)
    bad.request_id = "bad"
    timed_submits(rec, [record(0), bad, record(2)])
    assert rec.flush(5)
    assert sink.pushed == ["r0000", "r0002"]
    stats = rec.stats()
    assert stats.dropped == 1 and stats.push_failures == 2 and stats.pushed == 2
    rec.close()
    assert rec.submit(record(3)) is False and rec.stats().dropped == 2
