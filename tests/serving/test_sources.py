"""Which source served: the response's osd object, /metrics, /health and the dashboard history
split accepted tokens by who proposed them (draft, suffix, both). A real uvicorn server around a
ServingCore over tiny models, a real Redis behind the dashboard."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.http_server import serving
from support.tiny import noisy_copy, tiny_engine, tiny_llama
from support.tiny_tokenizer import char_tokenizer

from osd.config import EngineConfig, SamplingParams, SuffixConfig, TreeConfig
from osd.decoding.engine import SpeculativeEngine
from osd.decoding.tree_engine import TreeSpeculativeEngine
from osd.serving.core import ServingCore
from osd.serving.dashboard import DashboardConfig, DashboardStore
from osd.serving.http import build_app

MODEL = "tiny"
SOURCES = ("draft", "suffix", "both")
PROMPT = "abcdefg abcdefg abcdefg abc"  # repeats itself
MAX_TOKENS = 32


def metric(text: str, family: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return sum(s.value for s in fam.samples
                       if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created"))
    raise AssertionError(f"metric {family} not exported")


def families(text: str) -> set[str]:
    return {fam.name for fam in text_string_to_metric_families(text)}


def test_suffix_engine_reports_who_served_in_response_metrics_health_and_dashboard(redis_url):
    tokenizer = char_tokenizer(64)
    target = tiny_llama(vocab=64, sharpness=3.0)
    engine = TreeSpeculativeEngine(target, tokenizer, noisy_copy(target, noise=0.3),
                                   EngineConfig(speculation="always", suffix=SuffixConfig()), TreeConfig())
    reference = SpeculativeEngine(target, tokenizer, None)  # target-only: the greedy truth
    dashboard = DashboardStore.from_url(redis_url, DashboardConfig(window=10))
    core = ServingCore(engine, MODEL, dashboard=dashboard)
    prompt_ids = core.encode_prompt(PROMPT)
    want = reference.generate(prompt_ids, SamplingParams(max_tokens=MAX_TOKENS)).text
    try:
        with serving(build_app(core)) as base, httpx.Client(base_url=base, timeout=30) as http:
            health = http.get("/health").json()
            assert health["suffix"] == {"enabled": True, "traffic": {}}  # nothing served yet
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
            # The second time the whole output is in the cluster's traffic index too.
            first, second = (http.post("/v1/completions", json=body).json() for _ in range(2))
            metrics = http.get("/metrics").text
            health = http.get("/health").json()
        assert dashboard.flush()
        data = dashboard.data()
    finally:
        dashboard.close()

    for resp in (first, second):
        osd = resp["osd"]
        assert resp["choices"][0]["text"] == want  # suffix candidates never change greedy output
        assert osd["suffix"] is True and set(osd["accepted_by_source"]) == set(SOURCES)
        assert sum(osd["accepted_by_source"].values()) == osd["accepted"]
    by_source = [r["osd"]["accepted_by_source"] for r in (first, second)]
    # The repeat is proposed whole from the index: suffix candidates carry most of the output.
    assert by_source[1]["suffix"] + by_source[1]["both"] >= MAX_TOKENS // 2
    assert second["osd"]["target_forwards"] < first["osd"]["target_forwards"]

    totals = {s: by_source[0][s] + by_source[1][s] for s in SOURCES}
    for s in SOURCES:
        assert metric(metrics, "osd:spec_decode_num_accepted_tokens_by_source", cluster="global", draft_version="0",
                      source=s) == totals[s]
    assert sum(totals.values()) == metric(metrics, "osd:spec_decode_num_accepted_tokens", cluster="global")

    # Each request leaves its prompt's last max_ngram tokens and its output in the traffic index.
    tokens = 2 * (min(SuffixConfig().max_ngram, len(prompt_ids)) + first["usage"]["completion_tokens"])
    traffic = health["suffix"]["traffic"]
    assert health["suffix"]["enabled"] is True and set(traffic) == {"global"}
    # Speculation estimates are the fused tree's (what the draft adds next to suffix candidates), not a chain governor's.
    assert health["speculation"]["mode"] == "fused" and health["speculation"]["drafts"]["global"]["draft_ms"] > 0
    assert (traffic["global"]["requests"], traffic["global"]["tokens"]) == (2, tokens)
    assert traffic["global"]["entries"] > 0
    assert metric(metrics, "osd:suffix_traffic_requests", cluster="global") == 2
    assert metric(metrics, "osd:suffix_traffic_tokens", cluster="global") == tokens

    # The dashboard's window (both requests) holds the same split as the counters.
    share = data.series["global"][-1].source_share_ma
    total = sum(totals.values())
    assert share is not None
    assert share.model_dump() == pytest.approx({s: totals[s] / total for s in SOURCES})


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_engines_without_suffix_report_every_accepted_token_as_the_drafts(kind):
    engine = tiny_engine(noise=0.3, gamma=4)  # a chain
    if kind == "tree":  # a token tree from the draft alone: TreeStats' split, with no suffix candidates
        engine = TreeSpeculativeEngine(engine.target, engine.tokenizer, engine.draft, EngineConfig(speculation="always"),
                                       TreeConfig())
    core = ServingCore(engine, MODEL)
    osd = core.complete({"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0})["osd"]
    assert osd["suffix"] is False and osd["accepted"] > 0
    assert osd["accepted_by_source"] == {"draft": osd["accepted"], "suffix": 0, "both": 0}
    assert core.health()["suffix"] == {"enabled": False, "traffic": {}}
    text = core.metrics_text()
    assert [metric(text, "osd:spec_decode_num_accepted_tokens_by_source", source=s) for s in SOURCES] == [
        osd["accepted"], 0, 0]
    assert not {"osd:suffix_traffic_tokens", "osd:suffix_traffic_requests"} & families(text)  # no traffic index
