"""TrafficFeed: every replica's suffix index learns from every replica's records, through a real Redis."""

from __future__ import annotations

import logging
import socket
import time
import uuid

import pytest
import redis
import torch
from support.tiny import CharTokenizer, hf_greedy, tiny_llama

from osd.config import EngineConfig, SamplingParams, SuffixConfig, TreeConfig
from osd.data.buffer import BufferConfig, RecordBuffer
from osd.data.records import TrainingRecord
from osd.data.traffic_feed import TrafficFeed
from osd.decoding.suffix import TrafficIndex
from osd.decoding.tree_engine import TreeSpeculativeEngine


def make_record(cluster: str, i: int) -> TrainingRecord:
    """Record i: a prompt ending in [1000 + i] and the output [10i, 10i+1, ..., 10i+7] (distinct per i)."""
    output = [10 * i + j for j in range(8)]
    T, k = len(output), 4
    return TrainingRecord(
        prompt_ids=[7, 7, 1000 + i], output_ids=output,
        teacher_token_ids=torch.zeros(T, k, dtype=torch.int32),  # [T, k] int32
        teacher_logprobs=torch.zeros(T, k, dtype=torch.float16),  # [T, k] float16
        teacher_logsumexp=torch.zeros(T),  # [T] float32
        cluster=cluster, request_id=f"{cluster}-{i}",
    )


@pytest.fixture
def make_buffer(make_buffer):
    """The shared factory (tests/support/redis_fixtures.py), on streams no other test sees."""
    prefix = f"test-feed-{uuid.uuid4().hex[:8]}:"
    return lambda **overrides: make_buffer(stream_prefix=prefix, **overrides)


def request_ids(entries) -> list[str]:
    return [rec.request_id for _, rec in entries]


def proposes(traffic: TrafficIndex, cluster: str, context: list[int], expected: list[int]) -> bool:
    index = traffic.get(cluster)
    return index is not None and expected in index.match(context, len(expected)).continuations


# -- buffer reads ------------------------------------------------------------------------------


def test_newest_returns_the_newest_oldest_first(make_buffer):
    buf = make_buffer()
    ids = [buf.push(make_record("a", i)) for i in range(5)]
    entries, last = buf.newest("a", 3)
    assert request_ids(entries) == ["a-2", "a-3", "a-4"]
    assert [eid for eid, _ in entries] == ids[2:] and last == ids[-1]
    assert request_ids(buf.newest("a", 50)[0]) == [f"a-{i}" for i in range(5)]
    assert buf.newest("a", 0) == ([], ids[-1])  # nothing to fold, but where to resume
    assert buf.newest("absent", 3) == ([], None)
    assert buf.stats("a").pending == 0 and buf.stats("a").last_delivered_id is None  # the trainers' group untouched


def test_read_after_pages_exclusively(make_buffer):
    buf = make_buffer()
    ids = [buf.push(make_record("a", i)) for i in range(7)]
    seen, after = [], "0-0"
    while True:
        entries, last = buf.read_after("a", after, count=3)
        if last is None:
            break
        assert len(entries) <= 3 and [eid for eid, _ in entries][-1] == last
        seen += request_ids(entries)
        after = last
    assert seen == [f"a-{i}" for i in range(7)]
    assert request_ids(buf.read_after("a", ids[2], 2)[0]) == ["a-3", "a-4"]  # strictly after
    assert buf.read_after("a", ids[-1]) == ([], None)


def test_corrupt_entries_are_skipped_not_raised(make_buffer, redis_url, caplog):
    buf = make_buffer()
    key = buf.config.stream_prefix + "a"
    buf.push(make_record("a", 0))
    client = redis.Redis.from_url(redis_url)
    try:
        client.xadd(key, {"seq": 2, "rec": b"\x00garbage"})
        client.xadd(key, {"seq": 3})  # no rec field at all
        bad_tail = client.xadd(key, {"seq": 4, "rec": b"more garbage"}).decode()
    finally:
        client.close()
    buf.push(make_record("a", 1))
    with caplog.at_level(logging.WARNING, logger="osd.data.buffer"):
        entries, last = buf.read_after("a", "0-0", 4)
        assert request_ids(entries) == ["a-0"] and last == bad_tail  # paging moves past the bad entries
        assert request_ids(buf.newest("a", 10)[0]) == ["a-0", "a-1"]
    assert sum("skipping entry" in r.getMessage() for r in caplog.records) == 6
    assert buf.stats("a").dead_letter == 0  # dead-lettering is the trainers' job


# -- rebuild and poll ---------------------------------------------------------------------------


def test_rebuild_after_restart_folds_the_newest_records(make_buffer):
    buf = make_buffer()
    for i in range(5):
        buf.push(make_record("code", i))
    buf.push(make_record("chat", 9))
    config = SuffixConfig(rebuild_records=2)
    traffic = TrafficIndex(config)  # a restarted replica: empty index
    feed = TrafficFeed(buf, traffic, config)
    assert feed.rebuild() == 3 and feed.folded == 3
    assert traffic.stats()["code"]["requests"] == 2 and traffic.stats()["chat"]["requests"] == 1
    for i in (3, 4):  # the newest two: the prompt's tail and the output's start propose the rest
        assert proposes(traffic, "code", [1000 + i, 10 * i, 10 * i + 1], [10 * i + j for j in range(2, 8)])
    assert not proposes(traffic, "code", [1000 + 2, 20, 21], [22, 23])  # older than rebuild_records
    assert proposes(traffic, "chat", [1009, 90], [91, 92])

    assert feed.poll() == 0  # nothing new
    buf.push(make_record("code", 5))
    buf.push(make_record("new", 6))  # a cluster that appeared after the rebuild: read from its start
    buf.push(make_record("new", 7))
    assert feed.poll() == 3 and feed.folded == 6
    assert proposes(traffic, "code", [1005, 50], [51, 52]) and proposes(traffic, "new", [1006, 60], [61, 62])
    buf.push(make_record("code", 4))  # a repeat (same request id), as a retried push would land
    assert feed.poll() == 0  # read, and deduped by the index
    assert feed.stats() == {"folded": 6, "errors": 0, "last_error": None, "rebuilt": True, "clusters": 3,
                            "alive": False}


def test_poll_pages_through_a_backlog(make_buffer):
    buf = make_buffer()
    config = SuffixConfig(rebuild_records=0)
    buf.push(make_record("a", 0))
    feed = TrafficFeed(buf, TrafficIndex(config), config, page=2)
    assert feed.rebuild() == 0  # rebuild_records=0: start from the stream's end
    for i in range(1, 8):
        buf.push(make_record("a", i))
    assert feed.poll() == 7
    assert feed.traffic.stats()["a"]["requests"] == 7


# -- two replicas, one buffer -------------------------------------------------------------------

PROMPT = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(2)).tolist()
GREEDY = SamplingParams(max_tokens=40)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(vocab=64)


def replica(target) -> TreeSpeculativeEngine:
    """A suffix-only replica (no draft) with its own TrafficIndex; a flat cost curve, so no timing enters."""
    return TreeSpeculativeEngine(target, CharTokenizer(), None, EngineConfig(suffix=SuffixConfig()), TreeConfig(),
                                 cost_curve={1: 1.0, 64: 1.0})


def test_a_replica_learns_from_another_replicas_traffic(make_buffer, target):
    buf = make_buffer()
    a, b, control = replica(target), replica(target), replica(target)
    assert a.traffic is not b.traffic
    feed_b = TrafficFeed(buf, b.traffic, b.config.suffix)
    assert feed_b.rebuild() == 0  # empty buffer

    gen_a = a.generate(PROMPT, GREEDY, cluster="code")  # replica A serves the request...
    buf.push(gen_a.record)  # ...and its recorder pushes the record
    assert feed_b.poll() == 1  # B folds A's request in

    gen_b = b.generate(PROMPT, GREEDY, cluster="code")
    base = control.generate(PROMPT, GREEDY, cluster="code")  # a replica that never read the buffer
    truth = hf_greedy(target, PROMPT, 40)
    assert gen_a.output_ids == gen_b.output_ids == base.output_ids == truth  # lossless
    learnt, alone = (s.accepted_suffix_only + s.accepted_both for s in (gen_b.stats, base.stats))
    assert learnt >= 30 and learnt >= alone + 10  # tokens only a suffix index proposed, or both did
    assert gen_b.stats.target_forwards <= base.stats.target_forwards // 3

    buf.push(gen_b.record)  # B's own request comes back through the buffer: already in its index
    assert feed_b.poll() == 0
    assert feed_b.stats()["folded"] == 1 and b.traffic.stats()["code"]["requests"] == 2  # A's and B's


# -- Redis down ---------------------------------------------------------------------------------


def test_the_feed_survives_an_unreachable_buffer(caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    buf = RecordBuffer(BufferConfig(redis_url=f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.2,
                                    socket_connect_timeout_s=0.2, retries=0))
    config = SuffixConfig(poll_s=0.01)
    feed = TrafficFeed(buf, TrafficIndex(config), config)
    try:
        with caplog.at_level(logging.WARNING, logger="osd.data.traffic_feed"):
            feed.start()
            deadline = time.monotonic() + 5.0
            while feed.errors < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert feed.alive and feed.errors >= 3 and "BufferUnavailable" in feed.last_error
            assert not feed.stats()["rebuilt"]  # retried every tick
            t0 = time.monotonic()
            feed.stop()
            assert time.monotonic() - t0 < 1.0 and not feed.alive
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1  # one per outage, not one per tick
    finally:
        feed.stop()
        buf.close()
