"""Headless Chromium for tests: find (or apt-install) Debian's chromium, dump a page's DOM
after its scripts ran, take screenshots.

Usage in a test module::

    from support.browser import artifact_path, chromium, render  # noqa: F401  (chromium is a fixture)

    def test_page(chromium):
        dom = render(url, artifact_path("page.png"))

We drive the ``chromium`` binary directly (``--dump-dom``, ``--screenshot``) rather than
through a WebDriver/CDP client: nothing beyond the Debian package is needed, which is all CI
(root, clean Debian, package registries only) can get.
"""

from __future__ import annotations

import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from support.debian import DebianBinary

ARTIFACTS_DIR = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = DebianBinary("chromium", ("/usr/bin/chromium", "/usr/bin/chromium-browser"), ("chromium", "chromium-browser"),
                        install_timeout_s=900)


def find_or_install_chromium() -> str:
    """Path of Debian's chromium; installs it with apt-get when missing and we are root."""
    return CHROMIUM.path()


def artifact_path(name: str) -> Path:
    """Where a test writes an artifact (screenshot, ...): tests/artifacts/<name>."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR / name


def _run_chromium(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    binary = find_or_install_chromium()
    # A fresh profile per run: no state leaks between tests, and parallel runs don't fight
    # over the profile lock.
    with tempfile.TemporaryDirectory(prefix="osd-chromium-") as profile:
        cmd = [
            binary,
            "--headless",
            "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise RuntimeError(
                f"chromium did not finish within {timeout_s:.0f} s: {' '.join(cmd)}\nstderr tail:\n{err[-3000:]}"
            ) from exc
    # Chromium writes a lot of harmless noise to stderr (dbus, GPU, ...): only the exit code counts.
    if proc.returncode != 0:
        raise RuntimeError(
            f"chromium exited with {proc.returncode}: {' '.join(cmd)}\nstderr tail:\n{proc.stderr[-3000:]}"
        )
    return proc


def render(
    url: str,
    screenshot: Path | None = None,
    *,
    window: tuple[int, int] = (1400, 1000),
    budget_ms: int = 5000,
    timeout_s: float = 90.0,
) -> str:
    """The page's serialized DOM after its scripts ran; also saves a PNG when ``screenshot`` is given.

    ``budget_ms`` is Chromium's *virtual* time budget: timers and network waits fast-forward,
    so the page's fetch + render completes without real sleeping, and a page that polls with
    setInterval sees a few ticks within that budget. Each call starts a fresh browser; the
    screenshot is a second, separate page load, so a server that answers differently per call
    (e.g. fails after the first fetch) shows the screenshot a later state than the DOM.
    """
    common = [f"--virtual-time-budget={budget_ms}", f"--window-size={window[0]},{window[1]}"]
    dom = _run_chromium([*common, "--dump-dom", url], timeout_s).stdout
    if not dom.strip():
        raise RuntimeError(f"chromium dumped an empty DOM for {url}")
    if screenshot is not None:
        screenshot = Path(screenshot)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.unlink(missing_ok=True)  # so a stale file can't pass for a fresh screenshot
        _run_chromium([*common, f"--screenshot={screenshot}", url], timeout_s)
        if not screenshot.is_file():
            raise RuntimeError(f"chromium exited 0 but wrote no screenshot at {screenshot}")
    return dom


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless-capable chromium (installed with apt-get on first use when root)."""
    return find_or_install_chromium()


class Dom(HTMLParser):
    """Every element's attributes and text, in document order (enough for data-* assertions)."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "col", "source", "wbr"}

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[dict[str, str]] = []
        self._open: list[dict[str, str]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        # "within": ids of the enclosing elements, to find e.g. a panel's empty-state message.
        within = " ".join(e["id"] for e in self._open if e.get("id"))
        element = {"tag": tag, "text": "", "within": within, **{k: v or "" for k, v in attrs}}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open and self._open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def by_id(self, id_: str) -> dict[str, str]:
        return next(e for e in self.elements if e.get("id") == id_)

    def empty_state(self, panel_id: str) -> dict[str, str]:
        return next(e for e in self.elements if e.get("class") == "empty" and panel_id in e["within"].split())

    def all(self, **attrs: str) -> list[dict[str, str]]:
        return [e for e in self.elements if all(e.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def body(self) -> dict[str, str]:
        return next(e for e in self.elements if e["tag"] == "body")
