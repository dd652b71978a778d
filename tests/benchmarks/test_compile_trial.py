"""bench/compile_trial.py's parts on a tiny model (the SmolLM2 run itself is `python -m bench.compile_trial`)."""

from support.tiny import tiny_llama

from bench.compile_trial import profile_forward, render_markdown


def test_profile_splits_a_forward_into_arithmetic_and_the_rest():
    p = profile_forward(tiny_llama(vocab=64), k=4, context=16, reps=2)
    assert p["k"] == 4 and p["wall_ms"] > 0 and p["aten_self_ms"] > 0
    assert 0 < p["arithmetic_share_of_aten"] <= 1 and 0 < p["aten_share_of_wall"]
    assert p["top_ops"] and all(o["op"].startswith("aten::") and o["calls"] >= 1 for o in p["top_ops"])
    result = {"environment": {"date": "d", "threads": 1}, "config": {"target": "tiny", "dtype": "float32"},
              "profile": [{"name": "target", **p}],
              "compile": {"compiled": False, "error": "RuntimeError: no compiler", "compile_s": 3.0}}
    text = render_markdown(result)
    assert "| target | 4 |" in text and "torch.compile did not run here: RuntimeError: no compiler" in text
