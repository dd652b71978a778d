"""The trainer as a restartable Ray actor: a thin wrapper that runs ``trainers.clusters.ClusterTrainers``
(one ``trainers.loop.TrainerLoop`` per query cluster) on a thread.

What is Ray's here: the actor and its restarts (``max_restarts=-1``: a crashed trainer
comes back and re-reads its own pending records, see trainers/loop.py), its name, its
resources, and how it sees the serving replicas (their load, for pause-while-busy, and a
``sync_drafts`` broadcast after each promotion; a replica that misses it finds the draft
at its next registry poll).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import warnings

import ray
import torch
from ray import serve

from actors.config import OsdAppConfig
from actors.ray_metrics import RayTrainerMetrics
from osd.data.buffer import RecordBuffer
from osd.models.drafts import build_draft_template
from osd.registry import DraftRegistry
from trainers.clusters import ClusterTrainers
from trainers.loop import TrainerLoop

log = logging.getLogger(__name__)

TRAINER_NAMESPACE = "osd"


def trainer_actor_name(app_name: str) -> str:
    """The trainer actor's name (namespace TRAINER_NAMESPACE) for a Serve application."""
    return f"osd-trainer-{app_name}"


def cluster_trainers(config: OsdAppConfig, **loop_kwargs) -> ClusterTrainers:
    """A loop per cluster from the app config (one draft template, copied per cluster), one
    dashboard store shared by all; ``trainer.consumer`` names the consumer of a single fixed cluster."""
    template = build_draft_template(config.models)
    registry = DraftRegistry.from_config(config.registry_config())
    dashboard = config.dashboard_store()
    settings = config.trainer
    clusters = settings.clusters

    def make_loop(cluster: str) -> TrainerLoop:
        consumer = settings.consumer if settings.consumer and clusters == [cluster] else f"trainer-{cluster}"
        return TrainerLoop(copy.deepcopy(template), RecordBuffer(config.buffer_config()), registry,
                           config.distill, settings, cluster=cluster, consumer=consumer, dashboard=dashboard,
                           publish_adapters=config.cluster_drafts == "lora", **loop_kwargs)

    trainers = ClusterTrainers(make_loop, RecordBuffer(config.buffer_config()), settings, clusters)
    trainers.dashboard = dashboard
    return trainers


class ServingReplicas:
    """The Serve deployment as the trainer sees it (through ``DeploymentHandle.broadcast``): its
    load, for pause-while-busy, and a nudge to load a draft just published. Failures are logged
    once per streak and never raised: the replicas' own registry poll is the safety net."""

    def __init__(self, app_name: str, deployment: str, timeout_s: float) -> None:
        self.app_name, self.deployment, self.timeout_s = app_name, deployment, timeout_s
        self._handle = None
        self._failing: set[str] = set()

    def _broadcast(self, method: str) -> list | None:
        try:
            if self._handle is None:
                self._handle = serve.get_deployment_handle(self.deployment, self.app_name)
            results = self._handle.broadcast(method).results(timeout_s=self.timeout_s, return_exceptions=True)
        except Exception as e:  # Serve restarting, app gone...
            if method not in self._failing:
                log.warning("trainer: %s on the replicas failed (%s: %s)", method, type(e).__name__, e)
            self._failing.add(method)
            return None
        self._failing.discard(method)
        return [r for r in results if not isinstance(r, BaseException)]

    def load(self) -> int | None:
        """Running + waiting requests summed over the replicas; None (serving counts as idle) if none answered."""
        loads = [r for r in self._broadcast("load") or [] if isinstance(r, dict)]
        return sum(int(r["running"]) + int(r["waiting"]) for r in loads) if loads else None

    def sync_drafts(self, version: int) -> None:
        """Ask every live replica to load the registry's live drafts now rather than at its next poll."""
        self._broadcast("sync_drafts")


def _die() -> None:
    # A hard exit, like an OOM kill: no cleanup, no acks; Ray restarts the actor (max_restarts=-1).
    os._exit(1)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class TrainerActor:
    """Runs a TrainerLoop on a thread. ``config`` is an OsdAppConfig dict; ``app_name`` and
    ``server_deployment`` name the Serve deployment whose load pauses training (None: never pause)."""

    def __init__(self, config: dict, app_name: str | None = None, server_deployment: str | None = None) -> None:
        cfg = OsdAppConfig.model_validate(config)
        torch.set_num_threads(cfg.trainer.torch_threads)  # Ray set OMP_NUM_THREADS from num_cpus; be deliberate
        with warnings.catch_warnings():  # Ray's own property trips its deprecated actor_id accessor
            warnings.simplefilter("ignore")
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        replicas = (ServingReplicas(app_name, server_deployment, cfg.trainer.load_timeout_s)
                    if app_name and server_deployment else None)
        self.loop = cluster_trainers(cfg, load=replicas and replicas.load,
                                                on_publish=replicas and replicas.sync_drafts, crash=_die,
                                                metrics=RayTrainerMetrics())
        self._thread = threading.Thread(target=self.loop.run, name="osd-trainer", daemon=True)
        self._thread.start()
        log.info("trainer started (%s) for clusters %s", "restarted" if self.restarted else "first start",
                 cfg.trainer.clusters or "as they appear")

    def status(self) -> dict:
        return {**self.loop.status(), "restarted": self.restarted, "pid": os.getpid(),
                "running": self._thread.is_alive()}

    def pause(self) -> dict:
        """Stop training until resume() (an operator pause; a restarted actor starts unpaused)."""
        self.loop.pause()
        return self.status()

    def resume(self) -> dict:
        self.loop.resume()
        return self.status()

    def crash_after_next_read(self) -> None:
        """Test hook: exit the process after the next read that returns records, before acking them."""
        self.loop.arm_crash()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.loop.stop()
        self._thread.join(timeout_s)
        self.loop.close()


def start_trainer(config: dict, app_name: str | None = None, server_deployment: str | None = None,
                  wait_for_name_s: float = 30.0):
    """Create the TrainerActor with the resources ``config['trainer']`` asks for; returns its handle.

    Named ``trainer_actor_name(app_name)`` in namespace TRAINER_NAMESPACE when ``app_name`` is
    given; if a previous owner's actor still holds the name (it dies with its owner), wait.
    """
    settings = OsdAppConfig.model_validate(config).trainer
    options = dict(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus)
    if app_name is not None:
        options |= dict(name=trainer_actor_name(app_name), namespace=TRAINER_NAMESPACE)
    deadline = time.monotonic() + wait_for_name_s
    while True:
        try:
            return TrainerActor.options(**options).remote(config, app_name, server_deployment)
        except ValueError as e:  # "actor name already taken"
            if "name" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
