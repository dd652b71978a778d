"""The training record: what one served request teaches the draft.

Everything here comes from the verification forwards the engine already ran: no
second target pass. One teacher row per emitted token: row ``i`` is the target's
next-token distribution given ``prompt_ids + output_ids[:i]`` (temperature 1, before
any sampling warp), stored sparsely as its top-k log-probs plus the logsumexp of the
raw logits, so the tail mass ``1 - sum(exp(top-k log-probs))`` is known exactly.

Per speculative round we also keep what the draft proposed and where the target
first rejected it: those rows (up to and including the first rejection) are the
on-policy positions DistillSpec found crucial.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import torch

RECORD_SCHEMA_VERSION = 2


@dataclass
class DraftRound:
    """One speculative round as the draft saw it."""

    start: int  # index into output_ids of the first token this round decided
    proposed: list[int]  # the draft's proposals d1..dγ
    num_accepted: int  # proposals accepted before the first rejection (== len(proposed) if none)


@dataclass
class TrainingRecord:
    prompt_ids: list[int]
    output_ids: list[int]
    teacher_token_ids: torch.Tensor  # [T, k] int32: top-k token ids per emitted position
    teacher_logprobs: torch.Tensor  # [T, k] float16: log_softmax of the target's logits
    teacher_logsumexp: torch.Tensor  # [T] float32: logsumexp of the raw target logits
    rounds: list[DraftRound] = field(default_factory=list)
    cluster: str = "global"
    draft_version: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    # The target's hidden states the eagle head reads (osd/decoding/eagle.py), for positions
    # feature_start .. P+T-2 of prompt + output: [P+T-1-feature_start, F] float16, or None. Only
    # requests drafted by an eagle head carry them (EngineConfig.record_features).
    target_features: torch.Tensor | None = None
    feature_start: int = 0

    def __post_init__(self) -> None:
        n = len(self.output_ids)
        if self.teacher_token_ids.shape[0] != n or self.teacher_logprobs.shape[0] != n:
            raise ValueError(
                f"training record has {n} output tokens but "
                f"{self.teacher_token_ids.shape[0]} teacher rows; they must match"
            )
        if self.teacher_logsumexp.shape != (n,):
            raise ValueError(f"teacher_logsumexp must have shape [{n}], got {tuple(self.teacher_logsumexp.shape)}")
        if self.target_features is not None:
            rows = len(self.prompt_ids) + n - 1 - self.feature_start
            if self.feature_start < 0 or self.target_features.dim() != 2 or self.target_features.shape[0] != rows:
                raise ValueError(f"target_features must be [{rows}, F] (positions {self.feature_start}.."
                                 f"{len(self.prompt_ids) + n - 2}), got {tuple(self.target_features.shape)}")

    @property
    def num_positions(self) -> int:
        return len(self.output_ids)

    @property
    def top_k(self) -> int:
        return int(self.teacher_token_ids.shape[1])

    def on_policy_mask(self) -> torch.Tensor:
        """[T] bool: rows where the draft proposed a token, up to and including the first rejection."""
        mask = torch.zeros(self.num_positions, dtype=torch.bool)
        for r in self.rounds:
            end = min(r.start + min(r.num_accepted + 1, len(r.proposed)), self.num_positions)
            mask[r.start : end] = True
        return mask
