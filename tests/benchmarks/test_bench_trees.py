"""`osd bench trees` end to end on SmolLM2, at toy sizes: drafts distilled from a records file,
every drafting method lossless against the target, the JSON and the docs section."""

from __future__ import annotations

import json

import pytest

from bench.distill import collect_records, save_records
from cli.main import main
from osd.data.workloads import chat_prompt_ids, load_questions

pytestmark = pytest.mark.smollm2

METHODS = {"target", "chain_g4", "chain_g2", "chain_schedule", "chain_confidence", "chain_head", "static_tree",
           "dynamic_tree", "early_exit"}


def test_bench_trees_command(smollm2, tmp_path, capsys):
    target, tokenizer, _ = smollm2
    questions = load_questions(None, ["math_reasoning"])[:5]
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in questions]
    records, _ = collect_records(target, tokenizer, prompts, max_tokens=8, progress=False)
    path = save_records(tmp_path / "records.osdr", records, {
        "target": "smollm2", "category": "math_reasoning", "max_tokens": 8, "top_k": 64,
        "question_ids": [q["question_id"] for q in questions]})

    code = main(["bench", "trees", "--trees-records", str(path), "--trees-heldout", "2", "--max-tokens", "6",
                 "--out", str(tmp_path), "--doc", str(tmp_path / "benchmarks.md")])
    assert code == 0
    result = json.loads((tmp_path / "trees.json").read_text())
    summary = result["summary"]
    assert set(summary) == METHODS
    assert all(s["all_match_target"] for s in summary.values())  # greedy: every method is the target's output
    assert all(s["tokens_per_target_forward"] >= 1.0 for name, s in summary.items() if name != "target")
    assert summary["chain_g2"]["drafted_per_round"] <= 2 and summary["static_tree"]["drafted_per_round"] > 4
    assert result["config"]["train_records"] == 3 and result["config"]["prompts"] == 2
    assert 0.0 <= result["acceptance_head"]["mean_predicted"] <= 1.0
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- trees:begin -->" in doc and "| early_exit |" in doc and "| chain_head |" in doc


def test_bench_trees_without_records_says_how_to_make_them(tmp_path, capsys):
    assert main(["bench", "trees", "--trees-records", str(tmp_path / "missing.osdr"), "--out", str(tmp_path)]) == 2
    assert "make bench-distill" in capsys.readouterr().err
