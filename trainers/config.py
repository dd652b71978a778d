"""Distillation configuration: every knob of the online distiller and its promotion gate.

Defaults follow the OSD reference settings (DESIGN.md § Distillation: forward KL, AdamW, one
update every 8 records) except where osd's benchmarks found better on the default self-draft:
lr 3e-3 with 4 steps an update, embeddings and head frozen (docs/benchmarks.md, bench distill).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from osd.registry import CLUSTER_RE
from trainers.losses import LOSSES

LossName = Literal["fkl", "rkl", "jsd", "tvd"]
assert set(LossName.__args__) == set(LOSSES), "keep LossName in step with trainers.losses.LOSSES"


class DistillConfig(BaseModel):
    """How the online distiller trains the draft and when the gate promotes it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- the loss ----------------------------------------------------------------------------
    loss: LossName = Field(
        "fkl", description="Divergence between target p and draft q: forward KL, reverse KL, generalized JSD(β) or TVD.")
    jsd_beta: float = Field(
        0.5, ge=0.0, le=1.0, description="β of loss='jsd' (TRL semantics: 0 = forward KL, 1 = reverse KL).")
    distill_temperature: float = Field(
        1.0, gt=0.0, le=100.0,
        description="Temperature both p and q are divided by inside the loss; separate from the serving temperature.")
    on_policy_ratio: float = Field(
        0.0, ge=0.0, le=1.0,
        description="r in loss = (1-r)·loss over every teacher row (emitted tokens) + r·loss over on-policy rows "
                    "(where the draft proposed, up to and including the first rejection). Each term is a mean over "
                    "its rows; a term with no rows is 0.")

    # -- the optimizer -----------------------------------------------------------------------
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="Learning rate, constant. 3e-3: the best of bench distill's sweep for the frozen-head 2-layer self-draft (OSD's 1e-4 barely moved it).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer over the trainable parameters.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled (AdamW) or L2 (SGD) weight decay.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this; 0 disables clipping.")

    # -- the schedule ------------------------------------------------------------------------
    update_interval: int = Field(
        8, ge=1, le=100_000, description="Training records (held-out ones excluded) collected per update.")
    steps_per_update: int = Field(4, ge=1, le=10_000, description="Optimizer steps per update (4: bench distill's recipe).")
    batch_size: int = Field(
        8, ge=1, le=4096,
        description="Records per optimizer step; steps cycle through the update's records in a shuffled order.")
    max_seq_len: int = Field(
        1024, ge=2, le=1_000_000,
        description="Longest prompt+output sequence fed to the draft; longer records keep their first output rows "
                    "and the end of the prompt.")
    seed: int = Field(0, description="Seed for the batch order.")

    # -- what is trained ---------------------------------------------------------------------
    mode: Literal["full", "lora"] = Field(
        "full", description="'full' trains the draft's weights; 'lora' trains peft LoRA adapters only and exports "
                            "merged weights.")
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank r (mode='lora').")
    lora_alpha: float = Field(16.0, gt=0.0, description="LoRA scaling alpha; the update is scaled by alpha / r.")
    lora_targets: str | list[str] = Field(
        "all-linear", description="peft target_modules: 'all-linear' (every linear layer but the LM head) or a list "
                                  "of module names, e.g. ['q_proj', 'v_proj'].")
    freeze_embeddings: bool = Field(
        True, description="Keep the input embeddings fixed (mode='full'). With tied embeddings this freezes the LM "
                          "head too. On by default: bench distill's winner (first2_frozen) trains 7M parameters "
                          "instead of 35M and generalises as well.")
    freeze_head: bool = Field(
        True, description="Keep the LM head fixed (mode='full'). With tied embeddings this freezes the embeddings "
                          "too. On by default, as freeze_embeddings.")
    freeze_layers: list[int] = Field(
        default_factory=list,
        description="Draft decoder layers to keep fixed (mode='full'), as indices into the draft's own layers, e.g. "
                    "[0, 1]. With freeze_embeddings and freeze_head this trains only the layers above them and the "
                    "final norm: a Kangaroo-style adapter on a frozen shallow sub-network.")

    shortlist_size: int = Field(
        4096, ge=0, le=10_000_000,
        description="Grow the draft's shortlist LM head from traffic: the ids carrying the most target mass in the "
                    "records trained on, re-proposed after every update and published with the weights "
                    "(trainers/shortlist.py). 0 keeps the head the draft was built with; a size >= the vocabulary "
                    "means the full head. 4096: bench distill's winner (draft step 0.07 of a target step, not 0.13).")
    shortlist_coverage: float = Field(
        0.9, ge=0.0, le=1.0,
        description="Adopt a grown shortlist only if it holds at least this share of the tokens the target emitted "
                    "in the held-out records, and no less than the current shortlist does.")

    acceptance_head: Literal["off", "greedy", "sampled"] = Field(
        "off", description="Also train SpecDec++'s acceptance head on each update's records and publish it with the "
                           "draft, for replicas with engine.length_policy='head': labels for 'greedy' or 'sampled' "
                           "verification. Not published in shared-base (cluster_drafts='lora') mode.")
    acceptance_head_steps: int = Field(50, ge=1, le=10_000, description="Head optimizer steps per update.")
    ttt_steps: int = Field(
        3, ge=1, le=16, description="Eagle drafts: draft steps unrolled per record in training-time test (EAGLE-3); "
                                    "step s weighs 0.8^(s-1).")

    # -- the promotion gate ------------------------------------------------------------------
    holdout_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of incoming records set aside (never trained on) for the gate.")
    holdout_size: int = Field(32, ge=1, le=100_000, description="The gate judges on at most this many recent held-out records.")
    gate_half_life: float = Field(
        16.0, ge=0.0, description="The gate weighs a held-out record by 0.5^(age / gate_half_life), age = records "
                                  "taken in since it arrived, so it judges the current traffic; 0 weighs all alike.")
    gate_margin: float = Field(
        0.0, ge=0.0, le=1.0, description="Promote iff candidate α̂ >= live α̂ - margin on the held-out records.")

    device: str = Field("cpu", description="Torch device the trainable draft lives on, e.g. 'cpu' or 'cuda:0'.")

    @field_validator("freeze_layers")
    @classmethod
    def _layers_non_negative(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("freeze_layers holds draft layer indices, which start at 0")
        return sorted(set(v))

    @field_validator("lora_targets")
    @classmethod
    def _targets_not_empty(cls, v: str | list[str]) -> str | list[str]:
        if not v or (isinstance(v, list) and not all(v)):
            raise ValueError("lora_targets must be 'all-linear' or a non-empty list of module names")
        return v


class TrainerSettings(BaseModel):
    """Where the trainer actor runs and when it trains."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run the trainer actor (online distillation) beside the replicas.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved for the trainer actor; fractional is fine.")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved for the trainer actor; set distill.device='cuda' to use them.")
    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads in the trainer (Ray sets OMP_NUM_THREADS from num_cpus; this wins).")
    poll_interval_s: float = Field(0.5, gt=0, le=60, description="How long one buffer read blocks, and how long a busy or paused trainer sleeps between load checks.")
    read_count: int = Field(16, ge=1, le=4096, description="Records read from the buffer per read.")
    pause_when_busy: bool = Field(True, description="Pause training while serving is busy (see busy_threshold).")
    busy_threshold: int = Field(1, ge=1, description="Serving is busy while running + waiting requests summed over all replicas >= this.")
    max_pause_s: float | None = Field(60.0, gt=0, description="Train anyway after pausing this long in a row (a starvation guard under steady traffic); None pauses as long as serving is busy.")
    load_timeout_s: float = Field(2.0, gt=0, le=60, description="Bound on asking the replicas for their load; on failure the trainer assumes serving is idle.")
    flush_idle_s: float | None = Field(10.0, gt=0, description="With no new record for this long, train on the records waiting (fewer than distill.update_interval) so they are acked; None waits for a full update.")
    reclaim_interval_s: float = Field(30.0, gt=0, description="How often to XAUTOCLAIM entries other (dead) trainers left pending longer than buffer.claim_idle_ms.")
    consumer: str | None = Field(None, description="Consumer name in the buffer's group when the trainer has one fixed cluster; None = 'trainer-<cluster>' (always so with several). Stable, so a restarted trainer re-reads its own pending entries.")
    clusters: list[str] | None = Field(None, description="Query clusters to distil; None = every cluster that has records in the buffer, picked up as it appears (checked every discovery_interval_s).")
    max_clusters: int = Field(8, ge=1, le=1024, description="Cluster trainers held at once (each keeps a draft copy and optimizer state); past it the least recently trained one is closed, its unacked records stay pending in Redis for its return.")
    discovery_interval_s: float = Field(5.0, gt=0, description="How often the trainer looks for new clusters' buffer streams.")


    @field_validator("clusters")
    @classmethod
    def _cluster_names(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if not CLUSTER_RE.match(name):
                raise ValueError(f"invalid cluster name {name!r}: use 1-128 characters from [A-Za-z0-9_.-]")
        return v
