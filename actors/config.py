"""The osd Serve application's configuration: one JSON-able dict, the ``args`` of the Serve config.

``serve deploy`` passes ``applications[].args`` to ``actors.serve_app:app_builder``, which
validates it as :class:`OsdAppConfig`; every replica and the trainer actor re-validate the
same dict, so a typo fails the deploy with the field's name instead of a replica crash loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from osd.config import EngineConfig, ModelConfig, SuffixConfig
from osd.data.buffer import BufferConfig
from osd.registry import RegistryConfig
from osd.router import RouterConfig
from osd.serving.dashboard import DashboardConfig, DashboardStore
from osd.serving.swap_watch import AutoRollbackConfig
from trainers.config import DistillConfig, TrainerSettings

ADMIN_TOKEN_ENV = "OSD_ADMIN_TOKEN"
REDIS_URL_ENV = "OSD_REDIS_URL"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OsdAppConfig(_Strict):
    """Everything the osd Serve application (replicas + trainer) needs; the Serve config's ``args``."""

    model_name: str = Field("osd", min_length=1, description="Model name clients send as `model` (GET /v1/models).")
    models: ModelConfig = Field(default_factory=ModelConfig, description="Target and draft to load (models.torch_threads is overridden by replica_torch_threads / trainer.torch_threads).")
    engine: EngineConfig = Field(
        default_factory=lambda: EngineConfig(suffix=SuffixConfig()),
        description="Speculative decoding knobs. This default serves one request at a time and fuses suffix "
                    "speculation with the draft in one tree (what `osd bench suffix` measured fastest one at a time); "
                    "deploy/serve_config.yaml (`make run`) adds max_batch 16, continuous batching with suffix and "
                    "draft chains (what `osd bench load` measured fastest under concurrent load).")
    redis_url: str | None = Field(None, description=f"redis://host:port/db of the record buffer (and, with registry None, of the draft registry); None = ${REDIS_URL_ENV} in each replica's and the trainer's environment (keeps a password out of the Serve config). One of them is required: replicas are many processes and cannot each start an embedded Redis, so deploy/up.sh starts one and passes its URL.")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="Record buffer settings; its redis_url is taken from redis_url.")
    registry: RegistryConfig | None = Field(None, description="Draft registry; None = backend 'redis' on redis_url (every node of a Ray cluster reaches it). A file registry needs a path all replicas share.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Online distillation and promotion gate settings.")
    router: RouterConfig = Field(default_factory=lambda: RouterConfig(enabled=False), description="Query-cluster routing: which per-cluster draft serves a request that pins no cluster. Off by default (every such request goes to 'global'); see docs/clusters.md.")
    cluster_drafts: Literal["full", "lora"] = Field("full", description="How cluster drafts differ: 'full' = each is a whole draft copy; 'lora' = shared-base mode, one base draft per replica plus a small LoRA adapter per cluster (global included), hot-swapped the same way; needs distill.mode='lora'.")
    max_cluster_drafts: int = Field(8, ge=0, le=1024, description="Per-cluster drafts a replica holds besides global's; past it the least recently used is dropped (its requests use global's until wanted again).")
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig, description="Drift dashboard history (in Redis on redis_url) and GET /dashboard.")
    admin_token: str | None = Field(None, description=f"Bearer token for state-changing /admin routes; None = ${ADMIN_TOKEN_ENV} in the replica's environment, else no auth.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longest prompt accepted (413 above); None = the target's context window - 1.")
    num_replicas: int = Field(1, ge=1, le=1024, description="Serving replicas, each holding the target and the live drafts.")
    replica_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica; fractional is fine.")
    replica_num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica (set models.device='cuda' to use them).")
    replica_torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads per replica (Ray sets OMP_NUM_THREADS from num_cpus; this wins).")
    max_ongoing_requests: int = Field(16, ge=1, le=32, description="Requests Serve hands one replica at once; they queue for its engine (one generation at a time; with engine.max_batch > 1, at least max_batch are handed over, and that many decode together). Keep below 40, the HTTP thread pool.")
    trainer: TrainerSettings = Field(default_factory=TrainerSettings, description="The trainer actor.")
    auto_rollback: AutoRollbackConfig = Field(default_factory=AutoRollbackConfig, description="Each replica compares a newly live draft version's served α̂ and tokens per forward with the version it replaced; a clear drop marks it bad in the registry and rolls it back (README, docs/dashboard.md).")
    draft_poll_interval_s: float = Field(2.0, gt=0, le=3600, description="How often each replica checks the registry for a live draft version other than its own (newer, or older after a rollback).")
    spool_dir: str | None = Field(None, description="Directory for records spooled while Redis is down; each replica claims its own replica-<i> subdirectory, so a restarted replica pushes what its predecessor left. None = memory only.")
    recorder_capacity: int = Field(10_000, ge=1, description="Records a replica holds for the buffer (queue + spool) before dropping the oldest (counted in /metrics).")

    @model_validator(mode="after")
    def _adapters_need_lora(self) -> OsdAppConfig:
        if self.cluster_drafts == "lora" and self.distill.mode != "lora":
            raise ValueError("cluster_drafts='lora' (shared base + adapters) needs distill.mode='lora'")
        if self.engine.max_batch > 1 and self.models.draft == "eagle":
            raise ValueError("engine.max_batch > 1 (continuous batching) drafts with a draft model; an eagle head reads "
                             "the target's features, which the batched forward does not capture: set max_batch to 1 "
                             "or use another draft")
        if self.cluster_drafts == "lora" and self.models.draft == "eagle":
            raise ValueError("cluster_drafts='lora' adapts a shared self-draft; an eagle head is one layer and trains "
                             "whole: use cluster_drafts='full' with models.draft='eagle'")
        return self

    @model_validator(mode="after")
    def _one_redis_url(self) -> OsdAppConfig:
        if self.buffer.redis_url is not None:
            if self.redis_url not in (None, self.buffer.redis_url):
                raise ValueError("redis_url and buffer.redis_url differ; set only redis_url")
            self.redis_url = self.buffer.redis_url
        return self

    # -- what the pieces are built from ----------------------------------------------------------

    def require_redis_url(self) -> str:
        """redis_url, else $OSD_REDIS_URL of this process; raises if neither is set."""
        url = self.redis_url or os.environ.get(REDIS_URL_ENV)
        if not url:
            raise ValueError(f"osd's Serve app needs redis_url (redis://host:port/db) in its args or ${REDIS_URL_ENV} "
                             "in the environment: deploy/up.sh starts an embedded Redis and passes its URL; on a "
                             "cluster, point it at a Redis every node reaches")
        return url

    def buffer_config(self) -> BufferConfig:
        return self.buffer.model_copy(update={"redis_url": self.require_redis_url()})

    def registry_config(self) -> RegistryConfig:
        if self.registry is not None:
            return self.registry
        return RegistryConfig(backend="redis", redis_url=self.require_redis_url())

    def dashboard_store(self) -> DashboardStore | None:
        """A DashboardStore on redis_url, or None when the dashboard is disabled."""
        return DashboardStore.from_url(self.require_redis_url(), self.dashboard) if self.dashboard.enabled else None

    def resolved_admin_token(self) -> str | None:
        """The configured token, else $OSD_ADMIN_TOKEN of this process (empty = none)."""
        return self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None

    def spool_root(self) -> Path | None:
        return Path(self.spool_dir).expanduser() if self.spool_dir else None

    @property
    def replica_max_ongoing_requests(self) -> int:
        """What Serve hands one replica at once: max_ongoing_requests, and never fewer than a full batch (so the
        batch can fill; requests past it queue in the replica, not at the proxy)."""
        return max(self.max_ongoing_requests, self.engine.max_batch)
