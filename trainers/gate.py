"""The promotion gate: a candidate draft goes live only if it is not worse than the live one.

Both drafts are scored on the same held-out records by α̂ = mean over teacher rows of
Σ min(p, q) (``estimated_acceptance``), computed from the stored top-k teacher rows: no
generation and no target forward. The rows are the same for both drafts, so the
comparison is fair even though the binned α̂ is an upper bound on the dense one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from osd.models import DraftModel
from osd.records import TrainingRecord
from trainers.distiller import collate, student_logits
from trainers.losses import estimated_acceptance


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    candidate_alpha: float
    live_alpha: float
    rows: int  # held-out teacher rows both were scored on
    reason: str


class PromotionGate:
    """Promote iff candidate α̂ >= live α̂ - ``margin`` on at least ``min_rows`` held-out rows."""

    def __init__(self, margin: float = 0.0, batch_size: int = 16, max_seq_len: int = 1024, min_rows: int = 1,
                 temperature: float = 1.0):
        if margin < 0 or batch_size < 1 or min_rows < 1 or temperature <= 0:
            raise ValueError("PromotionGate needs margin >= 0, batch_size >= 1, min_rows >= 1 and temperature > 0")
        self.margin = margin
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.min_rows = min_rows
        self.temperature = temperature  # 1.0: the records' teacher rows are temperature-1 distributions

    @classmethod
    def from_config(cls, config) -> PromotionGate:  # config: trainers.config.DistillConfig
        return cls(config.gate_margin, config.batch_size, config.max_seq_len)

    @torch.inference_mode()
    def score(self, draft: DraftModel, records: Sequence[TrainingRecord]) -> tuple[float, int]:
        """(α̂ pooled over every teacher row of ``records``, number of rows); (0.0, 0) with no rows."""
        records = list(records)  # a deque (the distiller's holdout) does not slice
        was_training = draft.training
        draft.eval()
        device = next(draft.parameters()).device
        total, rows = 0.0, 0
        try:
            for i in range(0, len(records), self.batch_size):
                batch = collate(records[i : i + self.batch_size], self.max_seq_len, device)
                if batch is None:
                    continue
                logits = student_logits(draft, batch)  # [N, V]
                alpha = estimated_acceptance(logits, batch.teacher_ids, batch.teacher_logprobs,
                                             batch.teacher_logsumexp, temperature=self.temperature)
                total += float(alpha) * batch.num_rows  # a per-batch mean → a pooled sum
                rows += batch.num_rows
        finally:
            draft.train(was_training)
        return (total / rows if rows else 0.0), rows

    def evaluate(self, draft: DraftModel, records: Sequence[TrainingRecord]) -> float:
        """α̂ of ``draft`` on ``records`` (0.0 when they hold no rows)."""
        return self.score(draft, records)[0]

    def decide(self, candidate: DraftModel, live: DraftModel, holdout: Sequence[TrainingRecord]) -> GateDecision:
        cand, rows = self.score(candidate, holdout)
        live_alpha, _ = self.score(live, holdout)
        if rows < self.min_rows:
            return GateDecision(False, cand, live_alpha, rows,
                                f"only {rows} held-out rows (need {self.min_rows}); keeping the live draft")
        if cand >= live_alpha - self.margin:
            return GateDecision(True, cand, live_alpha, rows,
                                f"candidate α̂ {cand:.4f} >= live α̂ {live_alpha:.4f} - margin {self.margin}")
        return GateDecision(False, cand, live_alpha, rows,
                            f"candidate α̂ {cand:.4f} < live α̂ {live_alpha:.4f} - margin {self.margin}")
