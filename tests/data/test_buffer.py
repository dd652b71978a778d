"""RecordBuffer against a real redis-server (the embedded one, AOF on)."""

from __future__ import annotations

import socket
import time

import pytest
import redis
import torch
from pydantic import ValidationError

from osd.data.buffer import BufferConfig, BufferUnavailable, RecordBuffer
from osd.data.codec import decode_record, encode_record
from osd.data.records import DraftRound, TrainingRecord
from osd.data.redis_server import EmbeddedRedis


def make_record(cluster: str = "global", T: int = 4, k: int = 8, seed: int = 0) -> TrainingRecord:
    g = torch.Generator().manual_seed(seed)
    return TrainingRecord(
        prompt_ids=torch.randint(0, 512, (6,), generator=g).tolist(),
        output_ids=torch.randint(0, 512, (T,), generator=g).tolist(),
        teacher_token_ids=torch.randint(0, 512, (T, k), generator=g, dtype=torch.int32),  # [T, k] int32
        teacher_logprobs=torch.randn(T, k, generator=g).half(),  # [T, k] float16
        teacher_logsumexp=torch.randn(T, generator=g),  # [T] float32
        rounds=[DraftRound(start=0, proposed=[1, 2, 3], num_accepted=1)],
        cluster=cluster,
        request_id=f"{cluster}-{seed}",
    )


def ids_of(entries) -> list[str]:
    return [rec.request_id for _, rec in entries]


def test_produce_consume_ack(make_buffer):
    buf = make_buffer()
    sent = [make_record("math", seed=i) for i in range(3)] + [make_record("chat", seed=9)]
    for rec in sent:
        buf.push(rec)
    assert buf.clusters() == ["chat", "math"]

    got = buf.read("t0", count=10)
    assert sorted(ids_of(got)) == sorted(r.request_id for r in sent)
    by_id = {r.request_id: r for r in sent}
    for _, rec in got:  # the records come back intact, not just their ids
        assert encode_record(rec) == encode_record(by_id[rec.request_id])
    assert buf.read("t0", count=10) == []  # delivered once per group

    math_ids = [eid for eid, rec in got if rec.cluster == "math"]
    assert buf.ack("math", math_ids) == 3
    assert buf.ack("math", math_ids) == 0  # idempotent
    assert buf.stats("math").pending == 0 and buf.stats("chat").pending == 1


def test_read_filters_clusters_and_blocks_boundedly(make_buffer):
    buf = make_buffer()
    buf.push(make_record("a"))
    buf.push(make_record("b"))
    assert ids_of(buf.read("t", clusters=["b"])) == ["b-0"]
    t0 = time.monotonic()
    assert buf.read("t", clusters=["b"], block_ms=200) == []
    assert 0.15 < time.monotonic() - t0 < 5.0
    with pytest.raises(ValueError, match="block_ms"):
        buf.read("t", block_ms=0)  # Redis's "block forever" would outlive the socket timeout


def test_dead_consumer_entries_are_reclaimed(make_buffer):
    buf = make_buffer(claim_idle_ms=50)
    for i in range(4):
        buf.push(make_record(seed=i))
    taken = buf.read("doomed", count=3)  # ... and the trainer dies without acking
    assert len(taken) == 3
    # Not idle long enough yet (a separate, patient config: no race with a loaded machine).
    assert make_buffer(claim_idle_ms=60_000).reclaim("rescuer") == []

    time.sleep(0.1)
    rescued = buf.reclaim("rescuer", count=10)
    assert ids_of(rescued) == ids_of(taken)
    assert [eid for eid, _ in rescued] == [eid for eid, _ in taken]
    assert buf.ack("global", [eid for eid, _ in rescued]) == 3
    assert ids_of(buf.read("rescuer")) == ["global-3"]  # the never-delivered one is still new
    assert buf.stats("global").pending == 1


def test_reclaim_respects_count_and_acks_trimmed_entries(make_buffer):
    buf = make_buffer(claim_idle_ms=0, maxlen=1)
    for i in range(5):
        buf.push(make_record(seed=i))
    n = buf.stats("global").length
    taken = buf.read("doomed", count=100)
    assert len(taken) == n
    assert len(buf.reclaim("r", count=1)) == 1
    # Trim everything the dead consumer held: reclaim must ack the vanished ids, not loop.
    for i in range(300):
        buf.push(make_record(seed=100 + i))
    before = buf.trimmed_before_ack
    got = buf.reclaim("r2", count=100)
    assert buf.trimmed_before_ack > before  # the path under test was taken
    assert len(got) + (buf.trimmed_before_ack - before) == n
    buf.ack("global", [eid for eid, _ in got])
    assert buf.stats("global").pending == 0


def test_read_recreates_a_vanished_group(make_buffer, redis_url):
    buf = make_buffer()
    buf.push(make_record(seed=0))
    assert len(buf.read("t")) == 1
    redis.Redis.from_url(redis_url).flushall()  # as if a Redis without persistence restarted
    buf.push(make_record(seed=1))
    assert ids_of(buf.read("t")) == ["global-1"]


def test_maxlen_trims_approximately(make_buffer):
    buf = make_buffer(maxlen=20)
    for i in range(400):
        buf.push(make_record(seed=i))
    length = buf.stats("global").length
    # MAXLEN ~ frees whole radix-tree nodes (<= 100 entries each by default).
    assert 20 <= length <= 20 + 100
    got = buf.read("t", count=1000)
    assert ids_of(got)[-1] == "global-399"  # the newest survive


def test_undecodable_entries_go_to_dead_letter(make_buffer, redis_url):
    buf = make_buffer()
    raw = redis.Redis.from_url(redis_url)
    key = buf.config.stream_prefix + "global"
    buf.push(make_record(seed=0))
    raw.xadd(key, {"rec": b"not a record"})
    raw.xadd(key, {"other": b"no rec field"})
    raw.xadd(key, {"rec": encode_record(make_record("elsewhere"))})  # wrong stream
    buf.push(make_record(seed=1))

    got = buf.read("t", count=10)
    assert ids_of(got) == ["global-0", "global-1"]
    s = buf.stats("global")
    assert (s.dead_letter, s.pending) == (3, 2)  # the bad ones are acked at the source

    dead = raw.xrange(buf.config.dead_letter_key)
    assert [f[b"rec"] for _, f in dead][:2] == [b"not a record", b""]
    assert b"magic" in dead[0][1][b"error"] and dead[0][1][b"source"] == key.encode()
    assert decode_record(dead[2][1][b"rec"]).cluster == "elsewhere"  # original bytes kept
    raw.close()


def test_stats_move(make_buffer):
    buf = make_buffer()
    assert buf.stats("global") == buf.stats("global").__class__("global", 0, 0, 0, 0, None, 0)
    for i in range(3):
        buf.push(make_record(seed=i))
    s = buf.stats("global")
    assert (s.length, s.pending, s.lag, s.last_delivered_id) == (3, 0, 3, None)  # no group yet

    first = buf.read("t", count=2)
    s = buf.stats("global")
    assert (s.length, s.pending, s.lag, s.consumers) == (3, 2, 1, 1)
    assert s.last_delivered_id == first[-1][0]
    buf.ack("global", [first[0][0]])
    assert (buf.stats("global").pending, buf.stats("global").lag) == (1, 1)

    buf.read("t2", count=10)
    for i in range(2):
        buf.push(make_record(seed=10 + i))
    s = buf.stats("global")
    assert (s.length, s.pending, s.lag, s.consumers) == (5, 2, 2, 2)


def test_lag_after_trimming_past_the_group(make_buffer):
    buf = make_buffer(maxlen=5)
    buf.push(make_record(seed=0))
    buf.read("t")
    for i in range(300):  # far more than maxlen: the group falls behind the trimmed head
        buf.push(make_record(seed=1 + i))
    s = buf.stats("global")
    assert s.lag == s.length  # all that survived is undelivered
    assert len(buf.read("t", count=1000)) == s.length
    assert buf.stats("global").lag == 0


@pytest.mark.parametrize("graceful", [True, False], ids=["shutdown", "sigkill"])
def test_redis_restart_loses_nothing(make_buffer, redis_server, graceful):
    buf = make_buffer(claim_idle_ms=0)
    sent = [f"global-{i}" for i in range(6)]
    for i in range(6):
        buf.push(make_record(seed=i))
    acked = buf.read("t", count=2)
    buf.ack("global", [eid for eid, _ in acked])
    held = buf.read("t", count=1)  # delivered, not acked, when Redis goes away

    try:
        # SIGKILL too: with appendfsync everysec the AOF write() happens before Redis
        # replies, so a process crash (not a power cut) loses no acknowledged push.
        redis_server.stop(graceful=graceful)
        t0 = time.monotonic()
        with pytest.raises(BufferUnavailable, match="unavailable during push"):
            buf.push(make_record(seed=6))
        assert time.monotonic() - t0 < 3.0  # fails fast, no hang
    finally:
        redis_server.start()  # same port and dir: the AOF is replayed

    buf.push(make_record(seed=7))  # the same client reconnects on its own
    s = buf.stats("global")
    assert (s.length, s.pending, s.lag) == (7, 1, 4)  # acked stay acked
    rest = buf.reclaim("t2", count=100) + buf.read("t2", count=100)  # reclaim first: idle 0
    assert sorted(ids_of(rest)) == sorted(sent[3:] + ["global-7"] + ids_of(held))
    assert not set(ids_of(rest)) & set(ids_of(acked))


def test_unavailable_is_fast_and_clear():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    buf = RecordBuffer(BufferConfig(redis_url=f"redis://127.0.0.1:{port}/0", socket_connect_timeout_s=0.5))
    t0 = time.monotonic()
    for call in (lambda: buf.push(make_record()), lambda: buf.read("t"), lambda: buf.stats("global"),
                 buf.clusters, lambda: buf.reclaim("t"), lambda: buf.ack("global", ["1-0"])):
        with pytest.raises(BufferUnavailable, match=f"127.0.0.1:{port}"):
            call()
    assert time.monotonic() - t0 < 3.0
    buf.close()


def test_embedded_default_and_config_validation():
    with RecordBuffer(BufferConfig()) as buf:  # no URL: starts its own redis-server
        assert buf.embedded is not None and buf.embedded.running
        assert not buf.url.endswith(":6379/0")
        buf.push(make_record())
        assert ids_of(buf.read("t")) == ["global-0"]
        server = buf.embedded
    assert not server.running and not server.data_dir.exists()

    with pytest.raises(ValueError, match="Ray"):
        EmbeddedRedis(port=6379)
    with pytest.raises(ValidationError):
        BufferConfig(maxlen=0)
    with pytest.raises(ValidationError):
        BufferConfig(dead_letter_key="osd:records:dead")  # would pose as a cluster
    with pytest.raises(ValidationError):
        BufferConfig(socket_timeout=1)  # typo'd field names are refused, not ignored
