"""The JSON behind ``GET /dashboard/data``: what the drift dashboard draws, as pydantic models.

Times are Unix seconds (float). Series are oldest first. Every moving average is over the
last ``window`` requests *of that cluster* (fewer at the start of its history). ``alpha`` is
the per-request α̂ (mean over verified positions of Σ_x min(p, q)); it is null for requests
served without a draft. The schema is published at ``GET /dashboard/schema``.

``speedup`` is measured, never predicted: the time the target alone would have taken for the
same tokens (generated tokens × the target's single-token decode step, as this replica measured
it) over the time decoding took (generation seconds less the prompt's prefill, which both pay
alike). It is null where the replica had not measured the single-token step.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceShare(_Frozen):
    """Shares of accepted tokens by who proposed them (they sum to 1)."""

    draft: float = Field(description="Proposed by the draft only.")
    suffix: float = Field(description="Proposed by suffix speculation only (the request's own text or recent traffic).")
    both: float = Field(description="Proposed by both.")


class RequestPoint(_Frozen):
    """One finished request, as a point of its cluster's series."""

    t: float = Field(description="When the request finished (Unix s).")
    version: int = Field(description="Draft version that served it (0 = the initial draft).")
    alpha: float | None = Field(description="This request's α̂; null without a draft.")
    alpha_ma: float | None = Field(description="Moving average of alpha over the window (requests with an α̂ only).")
    tokens_per_forward_ma: float = Field(description="Moving window: generated tokens / target decode forwards.")
    tokens_per_s_ma: float = Field(description="Moving window: generated tokens / generation seconds.")
    latency_s: float = Field(description="This request's generation time in seconds.")
    source_share_ma: SourceShare | None = Field(None, description="Moving window: shares of accepted tokens by source; "
                                                                  "null while the window accepted none.")
    speedup: float | None = Field(None, description="This request's speedup against the target alone: tokens × "
                                                    "target_step_s / decode seconds; null without a measured step.")
    speedup_ma: float | None = Field(None, description="Moving window: Σ tokens × target_step_s / Σ decode seconds over "
                                                       "the window's requests with a measured step; null if none.")
    target_step_s: float | None = Field(None, description="The target's single-token decode step (s) the replica had "
                                                          "measured when this request finished; null if not measured.")


class SwapEvent(_Frozen):
    """A draft version went live for a cluster (promoted by the trainer, an admin rollback, or an automatic one)."""

    t: float
    cluster: str
    version: int
    kind: str = Field(description="'promoted', 'rollback' (an admin's) or 'auto_rollback' (a replica found the "
                                  "version it replaced serving clearly worse: osd/serving/swap_watch.py).")


class BacklogPoint(_Frozen):
    """A sample of one cluster's record buffer."""

    t: float
    cluster: str
    length: int = Field(description="Entries in the stream.")
    pending: int = Field(description="Delivered to the trainer, not yet acked.")
    lag: int | None = Field(description="Entries not yet delivered to the trainer.")


class TrainerPoint(_Frozen):
    """One trainer update and the gate's verdict on it."""

    t: float
    cluster: str
    update: int = Field(description="Update counter of the trainer run.")
    loss: float = Field(description="Mean distillation loss of the update.")
    alpha_candidate: float = Field(description="Gate α̂ of the freshly trained candidate on held-out records.")
    alpha_live: float = Field(description="Gate α̂ of the live draft on the same records.")
    promoted: bool
    version: int | None = Field(description="Version published when promoted, else null.")


class ClusterRow(_Frozen):
    """One row of the clusters table."""

    cluster: str
    live_version: int | None = Field(description="Registry's live version (null: still the initial draft, v0).")
    alpha_now: float | None = Field(description="alpha_ma of the cluster's latest request.")
    alpha_hour_ago: float | None = Field(description="alpha_ma of its last request at least an hour old; null if none.")
    speedup_now: float | None = Field(None, description="speedup_ma of the cluster's latest request: measured speedup "
                                                        "against the target alone; null while unknown.")
    target_step_s: float | None = Field(None, description="The latest measured single-token step of the target (s) "
                                                          "behind speedup_now; null if none.")
    requests: int = Field(description="Requests of this cluster in the retained history.")
    last_update: float | None = Field(description="Time of its last trainer update or swap (Unix s); null if none.")


class DashboardData(_Frozen):
    """Everything ``/dashboard`` draws."""

    generated_at: float
    window: int = Field(description="Requests per moving window.")
    retention_s: float = Field(description="History older than this is trimmed from Redis.")
    clusters: list[ClusterRow]
    series: dict[str, list[RequestPoint]] = Field(description="cluster -> its requests, oldest first.")
    swaps: list[SwapEvent]
    backlog: list[BacklogPoint]
    trainer: list[TrainerPoint]
