"""Real-Redis fixtures: one embedded redis-server per test session, flushed per test.

Import into conftest.py with ``from redis_fixtures import *``.
"""

from __future__ import annotations

import pytest
import redis

from osd.data.buffer import BufferConfig, RecordBuffer
from osd.data.redis_server import EmbeddedRedis

__all__ = ["make_buffer", "redis_server", "redis_url"]


@pytest.fixture(scope="session")
def redis_server():
    """An :class:`EmbeddedRedis` (AOF on, loopback, free port) for the whole session.

    Tests may ``stop()``/``restart()`` it; ``redis_url`` brings it back if one left it down.
    """
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """URL of the session server, emptied (FLUSHALL) for this test."""
    if not redis_server.running:  # an earlier test stopped it and failed before restarting
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def make_buffer(redis_url):
    """RecordBuffer(BufferConfig(redis_url=<this test's Redis>, **overrides)) factory; closes them after the test."""
    made = []

    def make(**overrides) -> RecordBuffer:
        buf = RecordBuffer(BufferConfig(redis_url=redis_url, **overrides))
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.close()
