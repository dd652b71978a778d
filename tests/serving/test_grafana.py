"""deploy/grafana-osd.json queries only metrics osd really exports through Ray, and every query
returns data from a real Prometheus scraping a live app.

The live test: Debian's prometheus (support/prometheus.py) scrapes the Ray node's metrics export
port (what docs/dashboard.md tells operators to scrape) while the osd app (a tiny model, one
replica + the trainer) serves greedy and streaming requests and the trainer promotes drafts;
then each of the dashboard's PromQL expressions goes through Prometheus's /api/v1/query.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
from pathlib import Path

import openai
import pytest
import redis
from ray.util.metrics import Counter, Gauge, Histogram
from support.prometheus import PrometheusError, prometheus_binary, run_prometheus  # noqa: F401  (a fixture)
from support.ray_fixtures import wait_for
from support.tiny import tiny_llama
from support.tiny_tokenizer import char_tokenizer

from actors.config import OsdAppConfig
from actors.ray_metrics import RayServingMetrics, RayTrainerMetrics
from osd.config import EngineConfig, ModelConfig
from trainers.config import DistillConfig, TrainerSettings

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-osd.json"
SUFFIXES = {Counter: ("_total",), Gauge: ("",), Histogram: ("_bucket", "_sum", "_count")}
# Grafana's $__rate_interval is max(4 × scrape interval, $__interval + scrape interval): 1m at the
# usual 15 s scrape interval. The live test's traffic all falls within the last minute.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
APP = "osd-grafana"
MODEL = "tiny"


def exported_names() -> set[str]:
    """What Ray's metrics agent exports for osd's metric objects (it prefixes 'ray_')."""
    names = set()
    for holder in (RayServingMetrics(), RayTrainerMetrics()):
        for value in vars(holder).values():
            for metric in value.values() if isinstance(value, dict) else [value]:
                kind = next(k for k in SUFFIXES if isinstance(metric, k))
                names |= {f"ray_{metric._name}{s}" for s in SUFFIXES[kind]}
    return names


def dashboard_queries() -> dict[str, str]:
    """Every PromQL expression of the dashboard (panel targets and annotations), by where it sits,
    with Grafana's variables replaced by what Grafana would send."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {f"{p['title']} [{t.get('legendFormat') or t['refId']}]": t["expr"]
               for p in dashboard["panels"] for t in p["targets"]}
    queries |= {f"annotation {a['name']}": a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a}
    for where, expr in queries.items():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a Grafana variable this test does not know: {expr}"
        queries[where] = expr
    return queries


def test_grafana_dashboard_queries_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    used = {m for e in exprs for m in re.findall(r"ray_osd_\w+", e)}
    assert len(dashboard["panels"]) >= 8 and used
    assert used <= exported_names(), f"unknown metrics: {sorted(used - exported_names())}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    assert len(dashboard_queries()) == len(exprs)  # distinct names: none shadows another


# --------------------------------------------------------------------------- against a real Prometheus


def finite_values(series: list[dict]) -> list[float]:
    """The series' values Grafana would draw (NaN and ±Inf, e.g. 0/0 or a quantile of no observations, draw nothing)."""
    return [v for s in series if math.isfinite(v := float(s["value"][1]))]


@pytest.fixture(scope="module")
def live(ray_session, redis_server, prometheus_binary, tmp_path_factory):
    """Prometheus scraping the Ray node's metrics export port, and the osd app (1 replica + trainer, paused) on
    a tiny model; yields both plus the app's supervisor handle and an OpenAI client."""
    import ray
    from ray import serve

    from actors.serve_app import TRAINER_DEPLOYMENT, deploy

    model_dir = tmp_path_factory.mktemp("tiny-target")
    tiny_llama(vocab=64, sharpness=3.0).save_pretrained(model_dir)
    char_tokenizer(64).save_pretrained(model_dir)
    if not redis_server.running:  # an earlier test module may have left it down
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()  # no other module's records, drafts or history
    config = OsdAppConfig(
        model_name=MODEL,
        models=ModelConfig(target=str(model_dir), draft="self", draft_layers=1),
        engine=EngineConfig(speculation="always", gamma=4),
        redis_url=redis_server.url,
        # gate_margin 1: every candidate is promoted, so swaps (and the swap annotation) happen within the test
        distill=DistillConfig(update_interval=4, holdout_fraction=0.25, batch_size=4, gate_margin=1.0),
        num_replicas=1, replica_num_cpus=0.5, replica_torch_threads=1,
        # the traffic below never stops: a trainer that pauses while serving is busy would not train
        trainer=TrainerSettings(num_cpus=0.25, torch_threads=1, poll_interval_s=0.2, flush_idle_s=0.5,
                                pause_when_busy=False),
        draft_poll_interval_s=0.3,
        spool_dir=str(tmp_path_factory.mktemp("spool")),
    )
    metrics_port = ray.nodes()[0]["MetricsExportPort"]
    with run_prometheus(prometheus_binary, [f"127.0.0.1:{metrics_port}"], tmp_path_factory.mktemp("prometheus")) as prom:
        prom.wait_for_targets_up(30)
        deploy(config, name=APP, port=int(ray_session.rsplit(":", 1)[1]), timeout_s=150)
        supervisor = serve.get_deployment_handle(TRAINER_DEPLOYMENT, APP)
        assert supervisor.pause.remote().result(timeout_s=60)["paused"]
        client = openai.OpenAI(base_url=f"{ray_session}/v1", api_key="x", max_retries=0, timeout=30)
        try:
            yield {"prometheus": prom, "supervisor": supervisor, "client": client}
        finally:
            client.close()
            serve.delete(APP)


def send_traffic(client: openai.OpenAI, stop: threading.Event, errors: list[Exception]) -> None:
    """Greedy and streaming completions and chats, one after another, until ``stop``."""
    for i in itertools.count():
        if stop.is_set():
            return
        prompt = f"Question {i % 7}: why is the sky blue?"
        try:
            if i % 3 == 0:
                client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24)
            elif i % 3 == 1:
                list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stream=True))
            else:
                list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=24, stream=True))
        except Exception as e:  # noqa: BLE001 (the test asserts there were none)
            errors.append(e)
            return


@pytest.mark.ray
@pytest.mark.timeout(420)  # includes the session's Ray start, a first-use apt install and the deploy
def test_every_dashboard_query_returns_data_from_a_real_prometheus(live):
    prom, start = live["prometheus"], time.monotonic()
    queries = dashboard_queries()
    stop, errors = threading.Event(), []
    traffic = threading.Thread(target=send_traffic, args=(live["client"], stop, errors), daemon=True)
    traffic.start()
    try:
        # The swap annotation looks for a change of the draft version at 15 s steps
        # (changes(...[1m:15s])): let Prometheus hold version 0 at one step before the trainer
        # may promote, or the first version it sees could already be 1.
        # (Any series at 0: in a full test session, series of an earlier module's replicas linger
        # until Ray's exporter drops them as stale.)
        wait_for(lambda: prom.query("ray_osd_draft_version == 0"), 60, "draft version 0 in Prometheus",
                 interval_s=0.5)
        time.sleep(15 - time.time() % 15 + 1)
        live["supervisor"].resume.remote().result(timeout_s=30)

        first_data: dict[str, float] = {}
        results: dict[str, list[dict]] = {}
        deadline = time.monotonic() + 90
        while len(first_data) < len(queries) and time.monotonic() < deadline and not errors:
            for where, expr in queries.items():
                if where not in first_data:
                    results[where] = prom.query(expr)
                    if finite_values(results[where]):
                        first_data[where] = time.monotonic() - start
            time.sleep(1)
    finally:
        stop.set()
        traffic.join(timeout=60)
    assert not errors, errors[:3]
    print("seconds into the test until each query had data:",
          json.dumps({w: round(t, 1) for w, t in first_data.items()}, indent=1, ensure_ascii=False))
    empty = {w: (queries[w], results.get(w)) for w in queries if w not in first_data}
    assert not empty, f"dashboard queries without data from a live app: {json.dumps(empty, indent=1, ensure_ascii=False)}"

    # The same check fails where it should: a metric osd does not export, osd's own /metrics name
    # (not what Ray's exporter serves), and PromQL that Prometheus rejects.
    for wrong in ("sum(rate(ray_osd_no_such_metric_total[1m]))", "sum(rate(osd:generation_tokens_total[1m]))"):
        assert not finite_values(prom.query(wrong)), wrong
    with pytest.raises(PrometheusError, match="parse error"):
        prom.query("sum(rate(ray_osd_generation_tokens_total[1m])")
