"""Workload data, vendored in the package (osd/data/questions/, licences in its README.md).

- Spec-Bench's 480 questions (Apache-2.0): 13 categories, for replays, routing and benchmarks.
- GSM8K's 7473 training questions (MIT): long single-domain streams to learn from.

Both load through here, so a clone needs nothing outside the repository; an explicit path
(or $OSD_QUESTIONS) replaces the Spec-Bench file with another in the same format.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "questions"
DEFAULT_QUESTIONS = DATA_DIR / "spec_bench_questions.jsonl.gz"
GSM8K_TRAIN = DATA_DIR / "gsm8k_train.jsonl.gz"


def questions_path(path: str | os.PathLike | None = None) -> Path:
    """An explicit path, else $OSD_QUESTIONS, else the vendored Spec-Bench questions."""
    chosen = Path(path or os.environ.get("OSD_QUESTIONS") or DEFAULT_QUESTIONS)
    if not chosen.exists():
        raise FileNotFoundError(f"questions file not found at {chosen}; pass --data PATH (Spec-Bench JSONL, "
                                "optionally gzipped) or unset OSD_QUESTIONS to use the vendored questions")
    return chosen


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-empty line; ``.gz`` files are decompressed."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    rows = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n} is not a JSON object per line: {e}") from None
    return rows


def load_questions(path: str | os.PathLike | None = None, categories: list[str] | None = None) -> list[dict]:
    """Rows of {"question_id", "category", "turns"}; optionally only some categories."""
    rows = read_jsonl(questions_path(path))
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


def load_gsm8k_train(limit: int | None = None) -> list[dict]:
    """GSM8K's training questions as Spec-Bench-style rows ({"question_id", "category":
    "gsm8k_train", "turns": [question]}), file order; the reference answer rides along as
    ``reference``. Spec-Bench's math_reasoning questions are GSM8K *test* questions: no overlap."""
    rows = read_jsonl(GSM8K_TRAIN)[:limit]
    return [{"question_id": i, "category": "gsm8k_train", "turns": [r["question"]], "reference": r["answer"]}
            for i, r in enumerate(rows)]
