"""`osd bench suffix` end to end on SmolLM2 at toy sizes, in float32 so every method must reproduce the
target alone token for token (suffix-only and fused trees included), with the JSON and the docs section."""

from __future__ import annotations

import json

import pytest

from cli.main import main

pytestmark = pytest.mark.smollm2

METHODS = {"target_alone", "draft_chain", "draft_tree", "suffix_only", "fused"}


def test_bench_suffix_command(smollm2, tmp_path):
    code = main(["bench", "suffix", "--dtype", "float32", "--distill-records", "0", "--per-category", "1",
                 "--warm-traffic", "1", "--suffix-categories", "summarization", "--repeats", "2",
                 "--stream-prompts", "1", "--max-tokens", "12", "--out", str(tmp_path),
                 "--doc", str(tmp_path / "benchmarks.md")])
    assert code == 0
    result = json.loads((tmp_path / "suffix.json").read_text())
    summary = result["per_category"]["summarization"]
    assert set(summary) == METHODS and set(result["repeated_stream"]) == METHODS
    for part in (summary, result["repeated_stream"]):
        assert all(s["share_matching_target"] == 1.0 for s in part.values())  # float32 greedy: lossless
        assert part["target_alone"]["x_target_alone"] == pytest.approx(1.0)
        assert part["target_alone"]["tokens_per_target_forward"] == pytest.approx(1.0)
    # A repeat of a request the index has seen is proposed whole: many tokens per target forward.
    assert result["repeated_stream"]["suffix_only"]["tokens_per_target_forward"] > 3
    fused = result["repeated_stream"]["fused"]["accepted_by_source"]
    assert fused["suffix_only"] + fused["both"] > 0
    assert result["traffic_index"]["summarization"]["requests"] >= 2
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "Suffix speculation fused with the draft" in doc and "repeated stream" in doc
