"""Workload data: the Spec-Bench questions shipped in ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_QUESTIONS = REPO_ROOT.parent / "shared" / "data" / "spec_bench_questions.jsonl"


def questions_path(path: str | os.PathLike | None = None) -> Path:
    """An explicit path, else $OSD_QUESTIONS, else ../shared/data/spec_bench_questions.jsonl."""
    chosen = Path(path or os.environ.get("OSD_QUESTIONS") or DEFAULT_QUESTIONS)
    if not chosen.exists():
        raise FileNotFoundError(
            f"Spec-Bench questions not found at {chosen}; pass --data PATH or set OSD_QUESTIONS"
        )
    return chosen


def load_questions(path: str | os.PathLike | None = None, categories: list[str] | None = None) -> list[dict]:
    """Rows of {"question_id", "category", "turns"}; optionally only some categories."""
    rows = [json.loads(line) for line in questions_path(path).read_text().splitlines() if line.strip()]
    if categories:
        unknown = set(categories) - {r["category"] for r in rows}
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; known: {sorted({r['category'] for r in rows})}")
        rows = [r for r in rows if r["category"] in categories]
    return rows


def spread_across_categories(rows: list[dict], n: int) -> list[dict]:
    """Take n questions round-robin over categories, so every kind of traffic is represented."""
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    picked, i = [], 0
    while len(picked) < n and any(i < len(v) for v in by_cat.values()):
        picked += [v[i] for v in by_cat.values() if i < len(v)][: n - len(picked)]
        i += 1
    return picked


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a single user turn with the chat template and the assistant prefix."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
