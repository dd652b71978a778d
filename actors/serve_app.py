"""The osd Ray Serve application: ``OsdServer`` replicas behind the OpenAI-compatible API, plus the trainer.

Deploy with ``serve deploy`` / ``serve run`` and import path ``actors.serve_app:app_builder``;
the application's ``args`` are an :class:`actors.config.OsdAppConfig` dict. From Python,
:func:`deploy` does the same and waits (bounded) until the application is RUNNING.

- ``OsdServer`` (ingress, ``num_replicas``): one ``osd.serving.core.ServingCore`` per replica,
  served by ``osd.serving.http.build_app``. The FastAPI app wraps the replica's own core, so it is
  built per replica after ``__init__``: ``@serve.ingress()`` without an app plus
  ``__serve_build_asgi_app__`` (the late-bound ingress of Ray 2.60). Drafts: the replica loads
  the registry's live versions at start (so a replica that starts later catches up by
  itself), a thread re-checks every ``draft_poll_interval_s``, and ``sync_drafts`` is the
  same check on demand (``handle.broadcast("sync_drafts")`` after a publish). With suffix
  speculation on, a ``TrafficFeed`` thread (osd/data/traffic_feed.py) tails the record buffer
  into the engine's traffic index, so every replica proposes from every replica's traffic.
- ``TrainerSupervisor`` (one replica, 0 CPUs): owns the ``TrainerActor`` (actors/trainer.py),
  so the trainer lives and dies with the application; the actor restarts itself on a
  crash (``max_restarts=-1``). ``GET /admin/trainer`` shows its counters.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import asdict

import torch
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from actors.config import OsdAppConfig
from actors.ray_metrics import RayServingMetrics
from actors.trainer import start_trainer
from osd.data.buffer import RecordBuffer
from osd.data.recorder import Recorder
from osd.data.traffic_feed import TrafficFeed
from osd.decoding.engine import build_engine
from osd.models.adapters import AdapterSpec, SharedBaseDrafts
from osd.registry import DraftRegistry, RegistryError
from osd.router import Router, template_affixes
from osd.serving.core import DEFAULT_CLUSTER, ServingCore, ServingError
from osd.serving.engine_thread import EngineThread
from osd.serving.http import build_app

log = logging.getLogger(__name__)

SERVER_DEPLOYMENT = "OsdServer"
TRAINER_DEPLOYMENT = "TrainerSupervisor"
DEFAULT_APP_NAME = "osd"
_CALL_TIMEOUT_S = 10.0


def _recorder(buffer: RecordBuffer, config: OsdAppConfig) -> Recorder:
    """A Recorder, spooling to the first free ``<spool_dir>/replica-<i>`` (each is flock'ed by its
    user), so a replacement replica picks up what a dead one left behind."""
    root = config.spool_root()
    if root is None:
        return Recorder(buffer, config.recorder_capacity)
    for i in range(4096):
        try:
            return Recorder(buffer, config.recorder_capacity, spool_dir=root / f"replica-{i}")
        except RuntimeError as e:
            if "in use" not in str(e):
                raise
    raise RuntimeError(f"no free spool directory under {root}: are 4096 replicas using it?")


def _router(config: OsdAppConfig, engine) -> Router | None:
    """The query-cluster router on the app's Redis (shared by every replica), or None when off."""
    if not config.router.enabled:
        return None
    embeddings = engine.target.get_input_embeddings().weight.detach()  # [V, d], shared with the target
    return Router(config.router, embeddings, config.require_redis_url(), template=template_affixes(engine.tokenizer))


def _shared_base(config: OsdAppConfig, engine) -> SharedBaseDrafts | None:
    """Shared-base mode: the engine's initial draft becomes the base every cluster's adapter sits on."""
    if config.cluster_drafts != "lora":
        return None
    if engine.draft is None:
        raise ValueError("cluster_drafts='lora' puts adapters on the draft, but models.draft is 'none'; "
                         "use a draft (e.g. 'self') or cluster_drafts='full'")
    return SharedBaseDrafts(engine.draft, AdapterSpec.from_distill_config(config.distill))


@serve.deployment(name=SERVER_DEPLOYMENT)
@serve.ingress()
class OsdServer:
    """One serving replica: target + live drafts, the OpenAI API, records to the buffer."""

    def __init__(self, config: dict, trainer: DeploymentHandle | None = None) -> None:
        self.config = cfg = OsdAppConfig.model_validate(config)
        # Load, warm up and generate on one thread (osd/serving/engine_thread.py: 1.3x the tokens/s of
        # requests on the HTTP layer's worker threads).
        self.engine_thread = EngineThread()
        self.engine_thread.run(torch.set_num_threads, cfg.replica_torch_threads)  # Ray set OMP_NUM_THREADS from num_cpus
        models = cfg.models.model_copy(update={"torch_threads": cfg.replica_torch_threads})
        engine = self.engine_thread.run(build_engine, models, cfg.engine)
        # the first user request is not the one to pay kernel setup
        log.info("osd replica: warm-up request took %.1f s", self.engine_thread.run(engine.warm_up))
        self.buffer = RecordBuffer(cfg.buffer_config())
        # Suffix speculation learns from every replica's traffic: tail the buffer into the engine's index.
        self.traffic_feed = None
        if engine.traffic is not None and cfg.engine.suffix.traffic:
            self.traffic_feed = TrafficFeed(self.buffer, engine.traffic, cfg.engine.suffix).start()
        self.recorder = _recorder(self.buffer, cfg)
        self.registry = DraftRegistry.from_config(cfg.registry_config())
        self.dashboard = cfg.dashboard_store()
        self.router = _router(cfg, engine)
        self.core = ServingCore(engine, cfg.model_name, recorder=self.recorder, registry=self.registry,
                                max_prompt_tokens=cfg.max_prompt_tokens, dashboard=self.dashboard,
                                buffer=self.buffer, metrics_mirror=(ray_metrics := RayServingMetrics()),
                                router=self.router, max_cluster_drafts=cfg.max_cluster_drafts,
                                shared=_shared_base(cfg, engine), engine_thread=self.engine_thread,
                                auto_rollback=cfg.auto_rollback)
        self.ray_metrics = ray_metrics
        self.trainer = trainer
        self._sync_errors: dict[str, str] = {}
        try:
            self._sync_all()  # before the first request: a late replica serves the latest draft
        except Exception as e:  # registry unreachable: serve v0 now, the poller catches up
            self._note_error("*", e)
        self.started_with = self.core.health()["drafts"]
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="osd-draft-poll", daemon=True)
        self._poller.start()

    def __serve_build_asgi_app__(self):
        app = build_app(self.core, self.config.resolved_admin_token())

        @app.get("/admin/trainer")
        async def trainer_status():
            """The trainer actor's counters (records trained, updates, promotions, paused...)."""
            if self.trainer is None:
                raise ServingError(404, "this deployment runs no trainer (trainer.enabled is false)",
                                   code="no_trainer")
            try:
                return await asyncio.wait_for(self.trainer.status.remote(), _CALL_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise ServingError(503, "the trainer did not answer in time (starting or restarting?); retry",
                                   code="trainer_unavailable") from None

        return app

    # -- drafts ----------------------------------------------------------------------------------

    def _sync_all(self) -> dict[str, int]:
        """Load each cluster's live registry version that differs from ours; cluster -> version held."""
        for cluster in self.core.clusters_to_sync(self.registry.clusters()) or [DEFAULT_CLUSTER]:
            try:
                self.core.sync_from_registry(cluster=cluster)
                self._sync_errors.pop(cluster, None)
            except RegistryError as e:  # refused draft: keep serving the live one
                self._note_error(cluster, e)
        return self.core.health()["drafts"]

    def _note_error(self, cluster: str, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        if self._sync_errors.get(cluster) != message:  # log each distinct problem once
            log.warning("draft sync (%s) failed, keeping the live draft: %s", cluster, message)
        self._sync_errors[cluster] = message

    def _poll(self) -> None:
        while not self._stop.wait(self.config.draft_poll_interval_s):
            try:
                self._sync_all()
                self._sync_errors.pop("*", None)
            except Exception as e:
                self._note_error("*", e)
            health = self.core.health()
            self.ray_metrics.observe_replica(self.recorder.stats(), health["drafts"], traffic=health["suffix"]["traffic"])

    async def sync_drafts(self) -> dict[str, int]:
        """Check the registry now (what a publisher broadcasts); returns cluster -> version held."""
        return await asyncio.to_thread(self._sync_all)

    # -- introspection (DeploymentHandle methods) ------------------------------------------------

    async def load(self) -> dict:
        """{"running", "waiting"} requests on this replica: the trainer's pause-while-busy input."""
        return self.core.load()

    async def status(self) -> dict:
        """Drafts held (and held right after start), load, recorder counters and sync problems of this
        replica; ``actor_name`` is its Ray actor's name in namespace "serve"."""
        replica = serve.get_replica_context().replica_id
        return {"replica": replica.unique_id, "actor_name": replica.to_full_id_str(), **self.core.health(),
                "started_with": self.started_with, "recorder": asdict(self.recorder.stats()),
                "sync_errors": dict(self._sync_errors),
                "traffic_feed": self.traffic_feed.stats() if self.traffic_feed is not None else None}

    def check_health(self) -> None:
        if not self._poller.is_alive():
            raise RuntimeError("the draft poller thread died; replace this replica")

    def __del__(self) -> None:
        if (stop := getattr(self, "_stop", None)) is not None:
            stop.set()
        if (feed := getattr(self, "traffic_feed", None)) is not None:
            feed.stop(timeout_s=2.0)
        if (recorder := getattr(self, "recorder", None)) is not None:
            recorder.close(timeout_s=2.0)  # unpushed records go to the spool dir (or are counted dropped)
        if (buffer := getattr(self, "buffer", None)) is not None:
            buffer.close()
        if (dashboard := getattr(self, "dashboard", None)) is not None:
            dashboard.close(timeout_s=1.0)


@serve.deployment(name=TRAINER_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
class TrainerSupervisor:
    """Owns the TrainerActor for its application (the actor dies with this replica, and a
    replacement replica starts a new one that resumes from the buffer's pending entries)."""

    def __init__(self, config: dict) -> None:
        app_name = serve.get_replica_context().app_name
        self.actor = start_trainer(config, app_name, SERVER_DEPLOYMENT)

    async def status(self) -> dict:
        return await self.actor.status.remote()

    async def pause(self) -> dict:
        return await self.actor.pause.remote()

    async def resume(self) -> dict:
        return await self.actor.resume.remote()


def app_builder(args: dict) -> Application:
    """``serve run|deploy`` entry point: ``args`` is an OsdAppConfig dict (validated here first)."""
    cfg = OsdAppConfig.model_validate(args or {})
    cfg.require_redis_url()
    config = cfg.model_dump(mode="json")
    trainer = TrainerSupervisor.bind(config) if cfg.trainer.enabled else None
    server = OsdServer.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.replica_max_ongoing_requests,  # a full batch at least, with engine.max_batch > 1
        ray_actor_options={"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus},
    )
    return server.bind(config, trainer)


def deploy(config: dict | OsdAppConfig, name: str = DEFAULT_APP_NAME, host: str = "127.0.0.1", port: int = 8000,
           timeout_s: float = 300.0, route_prefix: str = "/") -> DeploymentHandle:
    """Start Serve's HTTP proxy on ``host:port`` (loopback unless told otherwise; ignored if Serve
    already runs), deploy the app at ``route_prefix`` and wait until it is RUNNING. Apps of other
    names and prefixes can share the proxy (bench load serves several configurations side by side)."""
    if isinstance(config, OsdAppConfig):
        config = config.model_dump(mode="json")
    serve.start(http_options={"host": host, "port": port})
    handle = serve._run(app_builder(config), _blocking=False, name=name, route_prefix=route_prefix)
    wait_until_running(name, timeout_s)
    return handle


def wait_until_running(name: str = DEFAULT_APP_NAME, timeout_s: float = 300.0) -> None:
    """Poll ``serve.status()`` until application ``name`` is RUNNING; raise with Serve's messages otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        state = str(getattr(app, "status", None))
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            details = "; ".join(f"{d}: {s.status} {s.message}" for d, s in (app.deployments if app else {}).items())
            raise RuntimeError(f"Serve application {name!r} is {state} after {timeout_s:.0f}s at most "
                               f"({app.message if app else 'not found'}; {details}). See the replica logs under "
                               "the Ray session's logs/serve directory.")
        time.sleep(0.5)


__all__ = ["OsdServer", "TrainerSupervisor", "app_builder", "deploy", "wait_until_running"]
