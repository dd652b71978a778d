"""The dashboard and /metrics of a live stack: a ServingCore over tiny models behind a real
uvicorn server, records through a real Redis buffer to a TrainerLoop (no Ray) that promotes
drafts into a Redis registry, the replica hot-swapping them. Then /dashboard/data, /metrics
and the page in headless Chromium."""

from __future__ import annotations

import httpx
import jsonschema
import pytest
from support.browser import Dom, artifact_path, chromium, render  # noqa: F401  (chromium is a fixture)
from support.http_server import serving
from prometheus_client.parser import text_string_to_metric_families
from support.tiny import noisy_copy, tiny_engine, tiny_llama
from support.tiny_tokenizer import char_tokenizer

from osd.config import EngineConfig
from osd.data.buffer import BufferConfig, RecordBuffer
from osd.data.recorder import Recorder
from osd.decoding.engine import SpeculativeEngine
from osd.registry import DraftRegistry, RegistryConfig
from osd.serving.core import ServingCore
from osd.serving.dashboard import DashboardConfig, DashboardStore
from osd.serving.http import build_app
from trainers.config import DistillConfig, TrainerSettings
from trainers.loop import TrainerLoop

TOKEN = "s3cret"
PROMPTS = [f"request {i}: the quick brown fox" for i in range(40)]


def metric(text: str, family: str, suffix: str = "", **labels) -> float:
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return sum(s.value for s in fam.samples if s.name == family + suffix
                       and all(s.labels.get(k) == v for k, v in labels.items()))
    raise AssertionError(f"metric {family} not exported")


@pytest.fixture(scope="module")
def live(redis_server):
    """Traffic, trainer updates with promotions, and hot-swaps have happened by the time tests run."""
    import redis

    if not redis_server.running:
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    tokenizer = char_tokenizer(64)
    target = tiny_llama(vocab=64, sharpness=3.0)
    engine = SpeculativeEngine(target, tokenizer, noisy_copy(target, noise=0.6), EngineConfig(speculation="always", gamma=3))
    buffer = RecordBuffer(BufferConfig(redis_url=redis_server.url))
    registry = DraftRegistry.from_config(RegistryConfig(backend="redis", redis_url=redis_server.url))
    dashboard = DashboardStore.from_url(redis_server.url, DashboardConfig(window=10, backlog_interval_s=0.01))
    recorder = Recorder(buffer)
    core = ServingCore(engine, "tiny", recorder=recorder, registry=registry, dashboard=dashboard, buffer=buffer)
    trainer = TrainerLoop(noisy_copy(target, noise=0.6), RecordBuffer(BufferConfig(redis_url=redis_server.url)),
                          registry, DistillConfig(update_interval=6, holdout_fraction=0.2, batch_size=4,
                                                  gate_margin=1.0, lr=3e-3),
                          TrainerSettings(poll_interval_s=0.05, read_count=8, flush_idle_s=None,
                                          pause_when_busy=False),
                          dashboard=DashboardStore.from_url(redis_server.url))
    with serving(build_app(core, admin_token=TOKEN)) as base:
        http = httpx.Client(base_url=base, timeout=30)
        before = http.get("/metrics").text
        for i, prompt in enumerate(PROMPTS):
            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0})
            assert r.status_code == 200, r.text
            if i % 8 == 7:  # let the trainer catch up, and the replica pick up what it published
                recorder.flush(timeout_s=10)
                while trainer.step():
                    pass
                core.sync_from_registry()
        dashboard.flush()
        trainer.dashboard.flush()
        yield dict(http=http, core=core, trainer=trainer, registry=registry, before=before, base=base)
        http.close()
    trainer.close()
    recorder.close()
    dashboard.close()
    buffer.close()


def test_data_validates_against_the_published_schema_and_shows_the_swaps(live):
    http = live["http"]
    schema = http.get("/dashboard/schema").json()
    data = http.get("/dashboard/data").json()
    jsonschema.validate(data, schema)
    live_version = live["registry"].live("global").version
    assert live["trainer"].status()["promotions"] >= 2 and live_version >= 2
    assert [s["version"] for s in data["swaps"]] == list(range(1, live_version + 1))
    points = data["series"]["global"]
    assert len(points) == len(PROMPTS) and data["window"] == 10
    assert {p["version"] for p in points} >= {0, 1}  # requests served by several versions
    assert all(0 <= p["alpha"] <= 1 for p in points)
    (row,) = data["clusters"]
    assert row["live_version"] == live_version and row["requests"] == len(PROMPTS)
    assert row["alpha_now"] == pytest.approx(sum(p["alpha"] for p in points[-10:]) / 10)
    # speculation='always' never decodes a plain round, so this chain timed no single-token step:
    # the speedup is unknown (null), not 0.
    assert row["speedup_now"] is None and all(p["speedup"] is None and p["speedup_ma"] is None for p in points)
    assert len(data["trainer"]) == live["trainer"].status()["updates"] and data["backlog"]
    assert http.get("/dashboard/data", params={"window": 0}).status_code == 400


def test_metrics_move_with_traffic_and_training(live):
    http, before = live["http"], live["before"]
    after = http.get("/metrics").text
    status = live["trainer"].status()
    assert metric(after, "osd:request_alpha", "_count") - metric(before, "osd:request_alpha", "_count") == len(PROMPTS)
    assert metric(after, "osd:e2e_request_latency_seconds", "_count") == len(PROMPTS)
    assert metric(after, "osd:request_tokens_per_second", "_sum") > 0
    assert metric(after, "osd:trainer_updates", "_total", cluster="global") == status["updates"]
    assert metric(after, "osd:trainer_promotions", "_total", cluster="global") == status["promotions"]
    assert 0 <= metric(after, "osd:trainer_gate_alpha_candidate", cluster="global") <= 1
    assert metric(after, "osd:buffer_length", cluster="global") >= len(PROMPTS) - 1  # maybe one still queued
    assert metric(after, "osd:buffer_pending", cluster="global") >= 0
    assert metric(after, "osd:draft_swaps", "_total", cluster="global", outcome="ok") == status["promotions"]


def test_rollback_is_a_marker_and_a_counted_metric(live):
    http, registry = live["http"], live["registry"]
    was = registry.live("global").version
    r = http.post("/admin/drafts/global/rollback", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["version"] == was - 1
    live["core"].dashboard.flush()
    data = http.get("/dashboard/data").json()
    assert (data["swaps"][-1]["version"], data["swaps"][-1]["kind"]) == (was - 1, "rollback")
    assert metric(http.get("/metrics").text, "osd:draft_rollbacks", "_total", cluster="global") == 1
    http.post("/admin/drafts/global/rollback", json={"to_version": was},
              headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
    live["core"].dashboard.flush()


def test_dashboard_page_is_self_contained(live):
    page = live["http"].get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for external in ("http://", "https://", "//cdn"):
        assert external not in page.text.replace("http://www.w3.org", "")  # SVG namespaces are not fetches


def test_dashboard_in_a_real_browser_after_traffic_and_hot_swaps(live, chromium):
    """Headless Chromium loads /dashboard from the live stack: the α̂ chart draws the cluster's
    series with a marker per version that went live; the screenshot is kept as an artifact."""
    data = live["http"].get("/dashboard/data").json()
    shot = artifact_path("dashboard_live.png")
    dom = Dom(render(f"{live['base']}/dashboard", shot, window=(1366, 1240)))
    assert "data-error" not in dom.body() and int(dom.body()["data-rendered"]) >= 1
    alpha = dom.by_id("chart-alpha")
    assert alpha["data-series"] == "global"
    assert alpha["data-markers"].split(",") == [f"v{s['version']}" for s in data["swaps"]]
    assert int(alpha["data-points"]) == len(data["series"]["global"])
    assert dom.by_id("chart-trainer")["data-empty"] == "false"
    (row,) = dom.all(tag="tr", data_cluster="global")
    assert row["data-live-version"] == str(live["registry"].live("global").version)
    assert [td["text"] for td in dom.all(tag="td", data_col="speedup")] == ["—"]  # not measured (see above)
    assert dom.by_id("chart-speedup")["data-empty"] == "true"
    assert shot.stat().st_size > 20_000


def test_dashboard_data_is_a_503_while_redis_is_down_and_serving_goes_on():
    import socket

    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    store = DashboardStore(redis.Redis(port=port, socket_timeout=0.2, socket_connect_timeout=0.2))
    try:
        with serving(build_app(ServingCore(tiny_engine(noise=0.6, gamma=3), "tiny", dashboard=store))) as base:
            r = httpx.get(f"{base}/dashboard/data", timeout=30)
            assert r.status_code == 503 and "unavailable" in r.json()["error"]["message"]
            ok = httpx.post(f"{base}/v1/completions", json={"prompt": "still here", "max_tokens": 4}, timeout=30)
            assert ok.status_code == 200
            assert httpx.get(f"{base}/dashboard", timeout=30).status_code == 200  # the page itself still loads
    finally:
        store.close(timeout_s=0.5)
