"""The osd Serve application in a real Ray session with a real Redis: the OpenAI client against the
endpoint, draft hot-swap under load, a Redis outage, a trainer crash, bad requests.

Tiny models saved to disk stand in for SmolLM2, so replicas load them with ``build_engine``
like any HF model directory. One Ray session for the whole test session (ray_fixtures.py),
one application for this module (2 replicas, 0.5 CPU each, + the trainer on 0.25 CPU).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis
import torch
from support.ray_fixtures import wait_for
from support.tiny import tiny_llama
from support.tiny_tokenizer import char_tokenizer

from actors.config import OsdAppConfig
from actors.trainer import TRAINER_NAMESPACE, trainer_actor_name
from osd.config import EngineConfig, ModelConfig, SamplingParams
from osd.data.buffer import BufferConfig, RecordBuffer
from osd.data.redis_server import EmbeddedRedis
from osd.decoding.engine import build_engine
from osd.models.drafts import build_draft_template
from osd.registry import DraftRegistry, FileStore
from osd.serving.core import ServingCore
from trainers.config import DistillConfig, TrainerSettings
from trainers.loop import SimulatedCrash, TrainerLoop

APP = "osd"
MODEL = "tiny"
TOKEN = "s3cret"
STREAM = "osd:records:global"
GROUP = "trainers"


# --------------------------------------------------------------------------- models on disk


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama target + the tiny char tokenizer (with its chat template), saved as an HF model dir."""
    path = tmp_path_factory.mktemp("tiny-target")
    tiny_llama(vocab=64, sharpness=3.0).save_pretrained(path)
    char_tokenizer(64).save_pretrained(path)
    return path


def model_config(model_dir: Path) -> ModelConfig:
    return ModelConfig(target=str(model_dir), draft="self", draft_layers=1)


def perturbed_draft(model_dir: Path, noise: float, seed: int) -> dict[str, torch.Tensor]:
    """A state dict that fits the replicas' self-draft (same construction), with seeded noise."""
    state = build_draft_template(model_config(model_dir)).model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {k: v + noise * v.std().nan_to_num() * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in state.items()}


# --------------------------------------------------------------------------- config and builder, no Ray session


def test_app_config_validates_and_resolves_redis_and_token_from_the_environment(monkeypatch):
    from pydantic import ValidationError

    from actors.serve_app import app_builder

    monkeypatch.delenv("OSD_REDIS_URL", raising=False)
    monkeypatch.delenv("OSD_ADMIN_TOKEN", raising=False)
    with pytest.raises(ValidationError, match="trainr"):
        app_builder({"redis_url": "redis://127.0.0.1:1/0", "trainr": {}})  # typos name the field
    with pytest.raises(ValidationError, match="busy_threshold"):
        OsdAppConfig.model_validate({"trainer": {"busy_threshold": 0}})
    with pytest.raises(ValueError, match="needs redis_url"):
        app_builder({})
    with pytest.raises(ValidationError, match="differ"):
        OsdAppConfig(redis_url="redis://a:1/0", buffer=BufferConfig(redis_url="redis://b:1/0"))
    monkeypatch.setenv("OSD_REDIS_URL", "redis://10.0.0.5:6380/1")
    monkeypatch.setenv("OSD_ADMIN_TOKEN", "from-env")
    config = OsdAppConfig.model_validate({"trainer": {"num_gpus": 1}, "distill": {"device": "cuda"}})
    assert config.buffer_config().redis_url == config.registry_config().redis_url == "redis://10.0.0.5:6380/1"
    assert config.registry_config().backend == "redis" and config.resolved_admin_token() == "from-env"
    assert OsdAppConfig.model_validate(config.model_dump(mode="json")) == config  # what replicas receive
    app_builder(config.model_dump(mode="json"))  # builds (deploys nothing)


# --------------------------------------------------------------------------- TrainerLoop without Ray


def test_trainer_loop_recovers_its_pending_records_after_a_crash(model_dir, tmp_path):
    """No Ray: a loop dies between training and acking; a new loop with the same consumer name
    re-reads those entries first, trains on them and acks every record exactly once."""
    models = model_config(model_dir)
    target_engine = build_engine(models, EngineConfig(speculation="always", gamma=3))
    core = ServingCore(target_engine, MODEL)
    distill = DistillConfig(update_interval=3, holdout_fraction=0.25, batch_size=4, gate_margin=1.0)
    settings = TrainerSettings(poll_interval_s=0.05, read_count=5, flush_idle_s=0.01, pause_when_busy=False)
    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        bconf = BufferConfig(redis_url=server.url)
        registry = DraftRegistry(FileStore(tmp_path / "registry"))
        with RecordBuffer(bconf) as producer:
            for i in range(12):
                ids = core.encode_prompt(f"record {i}: hello")
                producer.push(target_engine.generate(ids, SamplingParams(max_tokens=8)).record)

        def loop(**kw) -> TrainerLoop:
            return TrainerLoop(build_draft_template(models), RecordBuffer(bconf), registry, distill, settings, **kw)

        first = loop()
        first.arm_crash()
        with pytest.raises(SimulatedCrash):
            while True:  # the first read recovers nothing, the second reads 5 records, then dies
                first.step()
        assert first.status()["acked"] == 0 and first.status()["records_read"] == 5
        first.buffer.close()

        second = loop()
        deadline = time.monotonic() + 60
        while second.status()["acked"] < 12 or second.status()["records_pending"]:
            assert time.monotonic() < deadline, second.status()
            second.step()
        status = second.status()
        assert status["records_recovered"] == 5 and status["acked"] == 12 and status["unacked"] == 0
        assert status["records_trained"] + status["records_held_out"] == 12 and status["updates"] >= 3
        assert status["promotions"] >= 1 and registry.live("global").version == status["live_version"]
        stats = second.buffer.stats("global")
        assert (stats.length, stats.pending, stats.lag, stats.dead_letter) == (12, 0, 0, 0)
        second.close()


# --------------------------------------------------------------------------- the Serve app


@pytest.fixture(scope="module")
def app(ray_session, redis_server, model_dir, tmp_path_factory):
    """The osd app (2 replicas + trainer) on an emptied Redis; the trainer starts paused."""
    from ray import serve

    from actors.serve_app import SERVER_DEPLOYMENT, TRAINER_DEPLOYMENT, deploy

    if not redis_server.running:  # an earlier test module may have left it down
        redis_server.start()
    rclient = redis.Redis.from_url(redis_server.url)
    rclient.flushall()  # records of other test modules must not reach this trainer
    spool = tmp_path_factory.mktemp("spool")
    config = OsdAppConfig(
        model_name=MODEL,
        models=model_config(model_dir),
        engine=EngineConfig(speculation="always", gamma=4),
        redis_url=redis_server.url,
        buffer=BufferConfig(socket_timeout_s=2.0, socket_connect_timeout_s=0.5),
        distill=DistillConfig(update_interval=4, holdout_fraction=0.25, batch_size=4, gate_margin=1.0),
        admin_token=TOKEN,
        num_replicas=2, replica_num_cpus=0.5, replica_torch_threads=1, max_ongoing_requests=8,
        trainer=TrainerSettings(num_cpus=0.25, torch_threads=1, poll_interval_s=0.2, flush_idle_s=0.5,
                                busy_threshold=1),
        draft_poll_interval_s=0.3,
        spool_dir=str(spool),
    )
    start = time.monotonic()
    deploy(config, name=APP, port=int(ray_session.rsplit(":", 1)[1]), timeout_s=150)
    server = serve.get_deployment_handle(SERVER_DEPLOYMENT, APP)
    supervisor = serve.get_deployment_handle(TRAINER_DEPLOYMENT, APP)
    assert supervisor.pause.remote().result(timeout_s=60)["paused"]
    print(f"app deployed in {time.monotonic() - start:.1f}s")
    reference = build_engine(ModelConfig(target=str(model_dir), draft="none"), EngineConfig(speculation="always"))
    http = httpx.Client(base_url=ray_session, timeout=30)
    client = openai.OpenAI(base_url=f"{ray_session}/v1", api_key="x", max_retries=0, timeout=30)
    yield dict(server=server, supervisor=supervisor, redis=rclient, http=http, client=client, spool=spool,
               reference=reference, ref_core=ServingCore(reference, MODEL), model_dir=model_dir,
               registry=DraftRegistry.from_config(config.registry_config()))
    http.close()
    serve.delete(APP)
    rclient.close()

    def trainer_gone() -> bool:  # it lives and dies with the application (its supervisor owns it)
        try:
            trainer_actor()
        except ValueError:
            return True
        return False

    wait_for(trainer_gone, 30, "the trainer actor to go with the application", interval_s=0.5)


def greedy(app, prompt_ids: list[int], max_tokens: int) -> str:
    return app["reference"].generate(prompt_ids, SamplingParams(max_tokens=max_tokens)).text


def replica_status(app) -> list[dict]:
    return app["server"].broadcast("status").results(timeout_s=20)


def trainer_actor():
    import ray

    return ray.get_actor(trainer_actor_name(APP), namespace=TRAINER_NAMESPACE)


@pytest.mark.ray
@pytest.mark.timeout(240)  # includes the session's Ray start and the deploy
def test_openai_client_against_the_endpoint(app):
    client, http, ref = app["client"], app["http"], app["ref_core"]
    assert [m.id for m in client.models.list()] == [MODEL]
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["drafts"] == {"global": 0}

    prompt = "The quick brown fox"
    resp = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24)
    assert resp.choices[0].text == greedy(app, ref.encode_prompt(prompt), 24)
    osd = resp.model_extra["osd"]
    assert osd["draft_version"] == 0 and osd["cluster"] == "global" and osd["proposed"] > 0
    assert osd["mean_acceptance_length"] >= 1 and osd["alpha_hat"] is not None and resp.usage.completion_tokens > 0

    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    assert chat.choices[0].message.content == greedy(app, ref.encode_chat(messages), 24)
    assert chat.model_extra["osd"]["draft_version"] == 0 and chat.usage.prompt_tokens == len(ref.encode_chat(messages))

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text
    assert len([c for c in chunks if c.choices[0].text]) >= 2, "text should arrive incrementally"
    assert chunks[-1].model_extra["osd"]["draft_version"] == 0

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chunks[-2].model_extra["osd"]["proposed"] == chat.model_extra["osd"]["proposed"]

    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "osd:spec_decode_num_draft_tokens" in metrics.text
    assert http.post("/admin/drafts/global/sync").status_code == 401  # admin token configured
    assert http.get("/admin/trainer").json()["paused"] is True


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_hot_swap_under_load(app):
    """8 clients send greedy requests non-stop while v1 (broadcast) and v2 (picked up by the
    replicas' poll) are published: every answer is the target's greedy text, whichever draft served it."""
    client, registry, ref = app["client"], app["registry"], app["ref_core"]
    prompts = [f"Question {i}: why is the sky blue?" for i in range(8)]
    want = [greedy(app, ref.encode_prompt(p), 32) for p in prompts]
    start_version = registry.live("global").version if registry.live("global") else 0
    results: list[tuple[int, str, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            try:
                r = client.completions.create(model=MODEL, prompt=prompts[i], temperature=0, max_tokens=32)
                results.append((i, r.choices[0].text, r.model_extra["osd"]["draft_version"]))
            except BaseException as e:  # noqa: BLE001: collected and asserted below
                errors.append(e)
                return

    def served(n: int) -> None:
        goal = len(results) + n
        wait_for(lambda: len(results) >= goal or errors, 60, f"{n} more responses")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    try:
        served(8)
        v1 = registry.publish("global", perturbed_draft(app["model_dir"], 0.3, seed=1), parent=start_version).version
        # push: every replica alive now checks the registry at once
        assert app["server"].broadcast("sync_drafts").results(timeout_s=30) == [{"global": v1}] * 2
        served(8)
        v2 = registry.publish("global", perturbed_draft(app["model_dir"], 0.1, seed=2), parent=v1).version
        # pull: no broadcast; the replicas' poll threads find v2
        wait_for(lambda: all(s["drafts"]["global"] == v2 for s in replica_status(app)), 30, "replicas on v2",
                 interval_s=0.2)
        served(8)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)
    for i, text, version in results:
        assert text == want[i], f"prompt {i} served by draft v{version} is not the target's greedy output"
    versions = [v for *_, v in results]
    assert set(versions) <= {start_version, v1, v2} and {v1, v2} <= set(versions), sorted(set(versions))
    assert versions[-1] == v2 and len(results) >= 24
    assert all(s["sync_errors"] == {} for s in replica_status(app))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_replica_started_later_loads_the_live_draft_itself(app):
    """Broadcasts reach only the replicas alive at the time: a replacement replica must load the
    registry's live draft in its constructor, before it serves anything."""
    import ray

    live = app["registry"].live("global").version
    assert live >= 1, "runs after the hot-swap test, which publishes drafts"
    before = replica_status(app)
    assert all(s["drafts"]["global"] == live for s in before)
    victim = before[0]
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)

    def replaced():
        statuses = replica_status(app)
        fresh = [s for s in statuses if s["replica"] not in {b["replica"] for b in before}]
        return fresh[0] if len(statuses) == 2 and fresh else None

    fresh = wait_for(replaced, 90, "Serve to replace the killed replica", interval_s=0.5)
    assert fresh["started_with"] == {"global": live}, "the new replica should start on the live draft"
    r = app["client"].completions.create(model=MODEL, prompt="late", temperature=0, max_tokens=8)
    assert r.model_extra["osd"]["draft_version"] == live


BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", dict(content=b'{"prompt": "hi",', headers={"content-type": "application/json"}), 400),
    ("missing messages", "/v1/chat/completions", dict(json={"model": MODEL}), 422),
    ("negative max_tokens", "/v1/completions", dict(json={"prompt": "hi", "max_tokens": -5}), 422),
    ("temperature 7", "/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": "x"}], "temperature": 7}), 422),
    ("100k-token prompt", "/v1/completions", dict(json={"prompt": "ab" * 50_000}), 413),
    ("wrong content type", "/v1/completions", dict(content=b"prompt=hi", headers={"content-type": "text/plain"}), 415),
]


@pytest.mark.ray
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,path,kwargs,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_json_errors_and_serving_continues(app, name, path, kwargs, status):
    http = app["http"]
    r = http.post(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in error["message"]
    ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_redis_outage_spools_records_and_flushes_them_when_redis_returns(app, redis_server):
    http, rclient = app["http"], app["redis"]
    wait_for(lambda: sum(s["recorder"]["queued"] for s in replica_status(app)) == 0, 20, "recorders drained")
    before = rclient.xlen(STREAM)
    redis_server.stop()
    try:
        for i in range(4):
            r = http.post("/v1/completions", json={"prompt": f"outage {i}", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
        spooled = wait_for(lambda: (s := replica_status(app)) and sum(x["recorder"]["spooled"] for x in s) == 4 and s,
                           20, "4 records spooled")
        assert sum(s["recorder"]["push_failures"] for s in spooled) >= 1
        assert all(not s["recorder"]["buffer_available"] for s in spooled if s["recorder"]["spooled"])
        wait_for(lambda: len(list(app["spool"].glob("replica-*/*.osdr"))) == 4, 20, "4 spool files on disk")
    finally:
        redis_server.start()
    wait_for(lambda: rclient.xlen(STREAM) == before + 4, 30, "spooled records in the stream", interval_s=0.2)
    wait_for(lambda: not list(app["spool"].glob("replica-*/*.osdr")), 20, "spool files removed")
    assert all(s["recorder"]["dropped"] == 0 for s in replica_status(app))
    assert http.post("/v1/completions", json={"prompt": "back", "max_tokens": 4}).status_code == 200


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_trainer_crash_mid_update_restarts_reclaims_and_loses_nothing(app):
    """The trainer dies after training on a batch but before acking it; Ray restarts it; the
    new incarnation re-reads its pending entries, trains on, and acks every record in the stream."""
    import ray

    http, rclient = app["http"], app["redis"]
    for i in range(6):  # records from this test, on top of the earlier tests' traffic
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"teach me {i}"}],
                                                       "max_tokens": 12, "temperature": 0}).status_code == 200
    wait_for(lambda: sum(s["recorder"]["queued"] for s in replica_status(app)) == 0, 20, "records pushed")
    total = rclient.xlen(STREAM)
    assert total >= 6
    actor = trainer_actor()
    first = ray.get(actor.status.remote(), timeout=30)
    assert first["paused"] and first["records_read"] == 0 and not first["restarted"]
    ray.get(actor.crash_after_next_read.remote(), timeout=30)
    ray.get(actor.resume.remote(), timeout=30)  # reads up to 16 records, trains (update_interval 4), dies

    def restarted():
        s = ray.get(actor.status.remote(), timeout=60)  # retried by Ray across the restart
        return s if s["pid"] != first["pid"] and s["restarted"] else None

    wait_for(restarted, 90, "the trainer to restart", interval_s=0.5)

    def settled(expected: int):
        s = ray.get(actor.status.remote(), timeout=30)
        group = next(g for g in rclient.xinfo_groups(STREAM) if g["name"] == GROUP.encode())
        done = (group["pending"] == 0 and group["last-delivered-id"] == rclient.xrevrange(STREAM, count=1)[0][0]
                and s["acked"] == expected and s["records_pending"] == 0)
        return s if done else None

    status = wait_for(lambda: settled(total), 90, "every record acked by the restarted trainer", interval_s=0.5)
    assert status["records_recovered"] >= 1, "the restarted trainer should redo its own pending entries"
    assert status["updates"] >= 1 and status["records_trained"] + status["records_held_out"] == total
    assert status["promotions"] + status["rejections"] == status["updates"] and status["last_gate"] is not None
    assert rclient.xlen("osd:dead-letter") == 0

    # training goes on with new traffic
    for i in range(4):
        assert http.post("/v1/completions", json={"prompt": f"more {i}", "max_tokens": 12}).status_code == 200
    wait_for(lambda: settled(total + 4), 60, "the new records trained and acked", interval_s=0.5)
    assert rclient.xlen(STREAM) == total + 4
    # whatever the trainer promoted is what every replica serves (broadcast after publish, or poll)
    live = manifest.version if (manifest := app["registry"].live("global")) else 0
    status = ray.get(actor.status.remote(), timeout=30)
    assert status["live_version"] == live
    wait_for(lambda: all(s["drafts"]["global"] == live for s in replica_status(app)), 30, "replicas on the live draft")


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_metrics_and_the_dashboard_through_the_endpoint(app):
    """After the tests above (traffic, hot-swaps, trainer updates): Ray's metrics agent exports
    osd's counters, and /dashboard/data (any replica) holds the shared history."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    http = app["http"]
    assert http.post("/v1/completions", json={"prompt": "metrics", "max_tokens": 8}).status_code == 200
    port = ray.nodes()[0]["MetricsExportPort"]
    trained = ray.get(trainer_actor().status.remote(), timeout=30)["updates"] > 0  # in this module's order: yes

    def exported() -> dict[str, float] | None:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_osd_"):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        wanted = ["ray_osd_spec_decode_num_draft_tokens_total", "ray_osd_request_alpha_count",
                  "ray_osd_buffer_length"] + ["ray_osd_trainer_updates_total"] * trained
        return totals if all(totals.get(w, 0) > 0 for w in wanted) else None

    totals = wait_for(exported, 60, "osd's Ray metrics at the metrics export port", interval_s=1.0)
    assert totals["ray_osd_spec_decode_num_accepted_tokens_total"] <= totals["ray_osd_spec_decode_num_draft_tokens_total"]

    data = http.get("/dashboard/data").json()
    assert len(data["series"]["global"]) >= 1 and data["backlog"] and bool(data["trainer"]) == trained
    assert all(s["kind"] in ("promoted", "rollback") for s in data["swaps"])
    page = http.get("/dashboard")
    assert page.status_code == 200 and "<canvas" in page.text


def test_replica_router_and_shared_base_come_from_the_app_config(model_dir, redis_url):
    """What OsdServer builds from `router` and `cluster_drafts`, without a Ray session."""
    from pydantic import ValidationError

    from actors.serve_app import _router, _shared_base

    engine = build_engine(model_config(model_dir), EngineConfig(speculation="always", gamma=3))
    off = OsdAppConfig(redis_url=redis_url, models=model_config(model_dir))
    assert _router(off, engine) is None and _shared_base(off, engine) is None
    on = off.model_copy(update={"router": off.router.model_copy(update={"enabled": True, "num_clusters": 2})})
    router = _router(on, engine)
    try:
        ids = engine.tokenizer("hello there").input_ids
        assert router.route(ids) == router.route(ids) == "c0"  # shared through the app's Redis
    finally:
        router.close()
    with pytest.raises(ValidationError, match="needs distill.mode='lora'"):
        OsdAppConfig(redis_url=redis_url, cluster_drafts="lora")
    lora = OsdAppConfig(redis_url=redis_url, models=model_config(model_dir), cluster_drafts="lora",
                        distill=DistillConfig(mode="lora"))
    shared = _shared_base(lora, engine)
    assert shared.base_draft() is not None and shared.memory_bytes()["adapters"] == {}
    with pytest.raises(ValueError, match="models.draft is 'none'"):
        _shared_base(lora, build_engine(ModelConfig(target=str(model_dir), draft="none"), EngineConfig(speculation="always")))
