"""`osd bench overhead`'s parts: the variants' configs, the endpoint timing against a tiny app under uvicorn
(no Ray), and the summary. The whole command (two Ray deployments) runs in `make bench-overhead`."""

from __future__ import annotations

import httpx
import pytest
from support.http_server import serving
from support.tiny import tiny_engine

from bench.overhead import _endpoint, render_markdown, summarize, variant_configs
from cli.main import build_parser
from osd.serving.core import ServingCore
from osd.serving.http import build_app


def test_variants_are_the_service_default_and_the_target_alone():
    args = build_parser().parse_args(["bench", "overhead", "--replica-threads", "2"])
    models, engine = variant_configs(args, "speculative")
    assert models.draft == "self" and engine.suffix is not None and models.torch_threads == 2
    models, engine = variant_configs(args, "target_alone")
    assert models.draft == "none" and engine.suffix is None


def test_endpoint_timing_counts_the_completion_tokens():
    with serving(build_app(ServingCore(tiny_engine(noise=0.3, gamma=4), "tiny"))) as base, \
            httpx.Client(base_url=base, timeout=60) as http:
        row = _endpoint(http, {"turns": ["why is the sky blue?"]}, 5)
    assert row["tokens"] == 5 and row["seconds"] > 0 and isinstance(row["text"], str)


def test_summary_ratios():
    rows = [{"in_process": {"tokens": 10, "seconds": 1.0, "text": "a"}, "endpoint": {"tokens": 10, "seconds": 2.0, "text": "a"},
             "same_text": True},
            {"in_process": {"tokens": 30, "seconds": 1.0, "text": "b"}, "endpoint": {"tokens": 30, "seconds": 1.0, "text": "c"},
             "same_text": False}]
    s = summarize(rows)
    assert s["in_process"]["tokens_per_s"] == 20.0 and s["endpoint"]["tokens_per_s"] == pytest.approx(40 / 3)
    assert s["ratio"] == pytest.approx(2 / 3) and s["median_ratio"] == pytest.approx(0.75)
    assert s["same_text_share"] == 0.5
    md = render_markdown({"config": {"questions": 2, "max_tokens": 8, "replica_threads": 2},
                          "environment": {"date": "d", "torch": "t", "cpu_count": 2},
                          "variants": {"speculative": {"summary": s}}})
    assert "| speculative | 20 |" in md or "| speculative | 20.0 |" in md
