"""A real Prometheus for tests: find (or apt-install) Debian's ``prometheus``, run it on a loopback
port with a temp config and storage, and query it through its HTTP API.

Usage in a test module::

    from support.prometheus import prometheus_binary, run_prometheus  # noqa: F401  (prometheus_binary is a fixture)

    def test_queries(prometheus_binary, tmp_path):
        with run_prometheus(prometheus_binary, ["127.0.0.1:8080"], tmp_path) as prom:
            prom.wait_for_targets_up(30)
            assert prom.query("up") != []

Like support/browser.py's chromium: nothing beyond the Debian package is needed, which is all
CI (root, Debian, package registries only) can get. Debian's package would start a system
service on :9090 where services may start (not in containers with a policy-rc.d that says no,
as Docker's Debian images have); ours runs on a free port of its own either way.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from support.debian import DebianBinary
from support.ray_fixtures import free_port

PROMETHEUS = DebianBinary("prometheus", ("/usr/bin/prometheus",), ("prometheus",), install_timeout_s=600)


def find_or_install_prometheus() -> str:
    """Path of a prometheus binary; apt-installs Debian's package when missing and we are root.
    RuntimeError (saying how to get one) when neither works."""
    return PROMETHEUS.path()


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Path of a prometheus binary (apt-installed on first use when root); skips the test if there is none."""
    try:
        return find_or_install_prometheus()
    except RuntimeError as e:
        pytest.skip(str(e))


class PrometheusError(RuntimeError):
    """Prometheus refused a query (bad PromQL, unknown function...): never to be read as 'no data'."""


class Prometheus:
    """A running Prometheus server: its base URL and its HTTP API."""

    def __init__(self, url: str, process: subprocess.Popen, log_path: Path) -> None:
        self.url, self.process, self.log_path = url, process, log_path
        self.http = httpx.Client(base_url=url, timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def query(self, expr: str) -> list[dict]:
        """``/api/v1/query`` at the current time: the result's series ({"metric": labels, "value": [t, "v"]}),
        [] when the expression selects nothing. PrometheusError when Prometheus rejects it."""
        resp = self.http.get("/api/v1/query", params={"query": expr})
        body = resp.json()
        if resp.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"{expr!r}: {body.get('errorType')}: {body.get('error')} (HTTP {resp.status_code})")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):  # one [t, "v"] pair, not a list of series
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets(self) -> list[dict]:
        return self.http.get("/api/v1/targets").json()["data"]["activeTargets"]

    def wait_for_targets_up(self, timeout_s: float) -> None:
        """Until every scrape target's last scrape succeeded (the first scrape comes within an interval)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                targets = self.targets()
                if targets and all(t["health"] == "up" for t in targets):
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.2)
        raise AssertionError(f"prometheus targets not up after {timeout_s:.0f}s: "
                             f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in self.targets()]}")


@contextmanager
def run_prometheus(binary: str, targets: list[str], workdir: Path, scrape_interval_s: float = 1.0,
                   timeout_s: float = 30.0) -> Iterator[Prometheus]:
    """Prometheus on 127.0.0.1:<free port>, scraping ``targets`` ("host:port", path /metrics) every
    ``scrape_interval_s``, with its config, TSDB and log under ``workdir``; stopped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    interval = f"{int(scrape_interval_s * 1000)}ms"
    config.write_text(
        f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
        f"scrape_configs:\n  - job_name: osd\n    scrape_timeout: {interval}\n"
        f"    static_configs:\n      - targets: [{', '.join(repr(t) for t in targets)}]\n"
    )
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while True:  # /-/ready: TSDB open, scraping started
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode} at start:\n{prom.log_tail()}")
            try:
                if prom.http.get("/-/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout_s:.0f}s:\n{prom.log_tail()}")
            time.sleep(0.1)
        yield prom
    finally:
        prom.http.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


__all__ = ["Prometheus", "PrometheusError", "find_or_install_prometheus", "prometheus_binary", "run_prometheus"]
