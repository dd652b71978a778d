"""A binary from a Debian package for tests: found on disk, or apt-installed once per process when we
are root (as CI is: root, Debian, package registries only). support/browser.py (chromium) and
support/prometheus.py use it."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence


def _apt(*args: str, timeout_s: float) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`apt-get {' '.join(args)}` failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")


class DebianBinary:
    """``package``'s binary: the first executable of ``paths``, else ``names`` on PATH, else apt-installed."""

    def __init__(self, package: str, paths: Sequence[str], names: Sequence[str], install_timeout_s: float):
        self.package, self.paths, self.names = package, tuple(paths), tuple(names)
        self.install_timeout_s = install_timeout_s
        self.hint = (f"install it with: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
                     f"--no-install-recommends {package} (as root), or put a {names[0]} binary on PATH")
        self.install_seconds: float | None = None  # how long this process's apt install took, for reports
        self._lock = threading.Lock()  # one install attempt per process, even if several threads ask
        self._error: str | None = None

    def _find(self) -> str | None:
        for path in self.paths:
            if os.access(path, os.X_OK):
                return path
        return next((found for name in self.names if (found := shutil.which(name))), None)

    def path(self) -> str:
        """The binary's path; RuntimeError saying how to get one when it is missing and cannot be installed."""
        with self._lock:
            if path := self._find():
                return path
            if self._error is not None:  # already failed in this process: don't retry apt
                raise RuntimeError(self._error)
            if os.geteuid() != 0 or shutil.which("apt-get") is None:
                self._error = f"{self.package} not found and cannot be installed here (needs root + apt-get); {self.hint}"
                raise RuntimeError(self._error)
            start = time.monotonic()
            try:
                _apt("update", timeout_s=300)
                _apt("install", "-y", "--no-install-recommends", self.package, timeout_s=self.install_timeout_s)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                self._error = f"installing {self.package} failed: {exc}\n{self.hint}"
                raise RuntimeError(self._error) from exc
            self.install_seconds = time.monotonic() - start
            if path := self._find():
                return path
            self._error = f"apt-get installed {self.package} but no binary was found at {self.paths}; {self.hint}"
            raise RuntimeError(self._error)
