"""Writing benchmark results: JSON under bench/results/, a table section in docs/benchmarks.md."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "cpu_count": __import__("os").cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(out_dir: str | Path, name: str, payload: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure (its folder made if missing) at the benchmarks' resolution, then free it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_doc_section(doc: str | Path, section: str, markdown: str) -> Path:
    """Replace (or append) the part of `doc` between `<!-- section:begin -->` and `<!-- section:end -->`."""
    path = Path(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
