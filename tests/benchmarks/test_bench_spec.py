"""`osd bench spec` end to end on SmolLM2 at toy sizes: both dtypes, every method lossless against
HF generate, the distilled draft built, the JSON and the docs section."""

from __future__ import annotations

import json

import pytest

from cli.main import main

pytestmark = pytest.mark.smollm2

METHODS = {"hf_generate", "hf_assisted", "osd_no_draft", "osd_untrained_always", "osd_untrained_auto",
           "osd_distilled_always", "osd_distilled_auto"}


def test_bench_spec_command(smollm2, tmp_path):
    code = main(["bench", "spec", "--questions", "2", "--max-tokens", "6", "--distill-records", "3",
                 "--dtypes", "float32,bfloat16", "--no-layouts", "--out", str(tmp_path),
                 "--doc", str(tmp_path / "benchmarks.md")])
    assert code == 0
    result = json.loads((tmp_path / "spec.json").read_text())
    assert set(result["by_dtype"]) == {"float32", "bfloat16"}
    for dtype, part in result["by_dtype"].items():
        assert part["dtype"] == dtype
        assert set(part["summary"]) == METHODS
        if dtype == "float32":  # greedy: lossless, token for token (bf16 near-ties: see bench/spec.py)
            assert all(s["all_match_hf_generate"] for s in part["summary"].values())
        assert all(0.0 <= s["share_matching_hf_generate"] <= 1.0 for s in part["summary"].values())
        assert part["summary"]["osd_no_draft"]["x_target_alone"] == pytest.approx(1.0)
        assert part["verification_ratio"]["1"] == pytest.approx(1.0) and set(part["verification_ratio"]) == {
            "1", "2", "4", "8", "16", "32"}
        assert part["distillation"]["records"] == 3 and part["c"] > 0 and part["c_distilled"] > 0
        assert 0.0 <= part["distillation"]["shortlist_heldout_coverage"] <= 1.0
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "Does speculation pay here?" in doc and "osd_distilled_auto" in doc
