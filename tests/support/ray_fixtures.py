"""One Ray session (with Serve's HTTP proxy on a free loopback port) for the whole test session.

A Ray session costs ~5-13 s on 2 cores, so every Ray test shares this one; tests deploy
their Serve applications into it and delete them when done. tests/conftest.py imports the fixture
once: a module importing it itself would get a second session-scoped fixture, and a second ray.init.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Callable

import pytest

__all__ = ["free_port", "ray_session", "wait_for"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            if result := predicate():
                return result
        except Exception as e:  # transient (e.g. an actor restarting): keep polling
            last_error = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


@pytest.fixture(scope="session")
def ray_session():
    """``ray.init`` (2 CPUs, no dashboard, a temp dir) + ``serve.start`` on 127.0.0.1:<free port>.

    Yields the HTTP base URL. Teardown: serve.shutdown, ray.shutdown.
    """
    import ray
    from ray import serve

    # A short path: Ray's unix sockets live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="osd-ray-", dir="/tmp")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, namespace="osd-tests")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
