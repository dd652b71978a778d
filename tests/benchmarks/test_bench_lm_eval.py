"""`make bench-lm-eval`'s parts without lm-eval itself (the whole command deploys the app and runs the
harness twice: tens of minutes): the vendored task data, the distractors and the comparison."""

from __future__ import annotations

import json

from bench.lm_eval_compare import (
    DATA_DIR,
    TASKS,
    build_task_data,
    compare,
    distractors,
    final_answer,
    render_markdown,
)


def test_the_vendored_task_data_is_what_build_task_data_writes(tmp_path):
    build_task_data(out=tmp_path)
    for name in ("gsm8k_test_slice", "gsm8k_fewshot", "gsm8k_mc"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (DATA_DIR / f"{name}.jsonl").read_text()
    rows = [json.loads(line) for line in (DATA_DIR / "gsm8k_mc.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (DATA_DIR / "gsm8k_test_slice.jsonl").read_text().splitlines()]
    assert len(rows) == len(test) == 20
    for row, q in zip(rows, test):
        assert row["question"] == q["question"] and len(set(row["choices"])) == 4
        assert row["choices"][row["label"]] == final_answer(q["answer"])


def test_distractors_are_other_numbers_then_near_misses():
    assert distractors("Tom has 3 apples and buys 1,200 more for $5.50.", "1203") == ["3", "1200", "5.5"]
    assert distractors("No numbers here.", "7") == ["14", "17", "6"]
    assert "7" not in distractors("7 cats and 7 dogs", "7")


def _side(texts, lls, seconds=2.0):
    gen = [{"doc_id": i, "resps": [[t]], "filtered": [t]} for i, t in enumerate(texts)]
    mc = [{"doc_id": i, "resps": [[(ll, False)] for ll in row], "filtered": row} for i, row in enumerate(lls)]
    return {"tasks": {
        "osd_gsm8k_slice": {"seconds": seconds, "metrics": {"exact_match,strict-match": 0.5}, "samples": gen},
        "osd_gsm8k_mc": {"seconds": seconds, "metrics": {"acc,none": 0.5, "acc_norm,none": 0.5}, "samples": mc}}}


def test_compare_wants_equal_scores_texts_and_loglikelihoods():
    hf = _side(["a", "b"], [[-1.0, -2.0], [-3.0, -4.0]])
    same = compare(hf, _side(["a", "b"], [[-1.0, -2.0], [-3.0, -4.0 + 1e-5]]), tolerance=1e-3)
    assert all(c["agree"] for c in same.values())
    assert same["osd_gsm8k_slice"]["same_generations"] == 2
    assert same["osd_gsm8k_mc"]["max_abs_diff"] < 1e-4
    other = compare(hf, _side(["a", "c"], [[-1.0, -2.1], [-3.0, -4.0]]), tolerance=1e-3)
    assert other["osd_gsm8k_slice"]["differing_docs"] == [1] and not other["osd_gsm8k_slice"]["agree"]
    assert not other["osd_gsm8k_mc"]["within_tolerance"] and not other["osd_gsm8k_mc"]["agree"]


def test_render_markdown_reports_both_sides():
    hf, osd = _side(["a", "b"], [[-1.0, -2.0]] * 2, 4.0), _side(["a", "b"], [[-1.0, -2.0]] * 2, 2.0)
    osd["tasks"]["osd_gsm8k_slice"]["server"] = {"mean_acceptance_length": 1.8}
    result = {"config": {"lm_eval": "0.4.13", "threads": 2, "endpoint": "Ray Serve, one replica"}, "environment": {"date": "today", "cpu_count": 2,
                                                                             "torch": "2.13"},
              "hf": hf, "osd": osd, "comparison": compare(hf, osd, 1e-3), "generated_tokens": {"hf": 40, "osd": 40}}
    text = render_markdown(result)
    assert all(task in text for task in TASKS) and "2.00x" in text and "1.80" in text and "10.0 tok/s" in text
