"""The promotion gate: a candidate draft goes live only if it is not worse than the live one.

Both drafts are scored on the same held-out records by α̂ = mean over teacher rows of
Σ min(p, q) (``estimated_acceptance``), computed from the stored top-k teacher rows: no
generation and no target forward. The rows are the same for both drafts, so the
comparison is fair even though the binned α̂ is an upper bound on the dense one.

The gate judges the *current* traffic: a held-out record weighs 0.5^(age / half_life),
age = records taken in since it arrived. With equal weights, the held-out set after a
shift in traffic is still mostly the old kind, on which the live draft (trained on it)
wins; every candidate that follows the shift is then refused and the draft never
recovers (measured: docs/benchmarks.md § Distribution shift).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from osd.data.records import TrainingRecord
from osd.decoding.eagle import EagleHead
from osd.models.drafts import DraftModel
from trainers.distiller import collate, has_rows, student_logits
from trainers.eagle import first_step_logits
from trainers.losses import estimated_acceptance


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    candidate_alpha: float
    live_alpha: float
    rows: int  # held-out teacher rows both were scored on
    reason: str


class PromotionGate:
    """Promote iff candidate α̂ >= live α̂ - ``margin`` on at least ``min_rows`` held-out rows.

    half_life: in records taken in; 0 weighs every held-out record alike.
    """

    def __init__(self, margin: float = 0.0, batch_size: int = 16, max_seq_len: int = 1024, min_rows: int = 1,
                 temperature: float = 1.0, half_life: float = 0.0):
        if margin < 0 or batch_size < 1 or min_rows < 1 or temperature <= 0 or half_life < 0:
            raise ValueError("PromotionGate needs margin >= 0, batch_size >= 1, min_rows >= 1, temperature > 0 "
                             "and half_life >= 0")
        self.margin = margin
        self.half_life = half_life
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.min_rows = min_rows
        self.temperature = temperature  # 1.0: the records' teacher rows are temperature-1 distributions

    @classmethod
    def from_config(cls, config) -> PromotionGate:  # config: trainers.config.DistillConfig
        return cls(config.gate_margin, config.batch_size, config.max_seq_len, half_life=config.gate_half_life)

    def weights(self, ages: Sequence[int]) -> list[float]:
        """Each held-out record's weight from its age in records taken in."""
        if self.half_life == 0:
            return [1.0] * len(ages)
        return [0.5 ** (age / self.half_life) for age in ages]

    @torch.inference_mode()
    def score(self, draft: DraftModel, records: Sequence[TrainingRecord],
              weights: Sequence[float] | None = None) -> tuple[float, int]:
        """(α̂ pooled over every teacher row of ``records``, number of rows); (0.0, 0) with no rows.

        weights: one per record (default all 1), applied to each of its rows.
        """
        records = list(records)  # a deque (the distiller's holdout) does not slice
        weights = [1.0] * len(records) if weights is None else list(weights)
        if len(weights) != len(records):
            raise ValueError(f"score got {len(weights)} weights for {len(records)} records; give one per record")
        kept = [(r, w) for r, w in zip(records, weights) if has_rows(r, self.max_seq_len)]  # as collate keeps them
        was_training = draft.training
        draft.eval()
        device = next(draft.parameters()).device
        total, weight_sum, rows = 0.0, 0.0, 0
        if isinstance(draft, EagleHead):
            return self._score_eagle(draft, kept)
        try:
            for i in range(0, len(kept), self.batch_size):
                chunk = kept[i : i + self.batch_size]
                batch = collate([r for r, _ in chunk], self.max_seq_len, device)
                row_weight = torch.tensor([w for _, w in chunk], device=device)[batch.row_batch]  # [N]
                logits = student_logits(draft, batch)  # [N, V]
                alpha = estimated_acceptance(logits, batch.teacher_ids, batch.teacher_logprobs,
                                             batch.teacher_logsumexp, row_weight, temperature=self.temperature)
                total += float(alpha) * float(row_weight.sum())  # a weighted per-batch mean → a pooled sum
                weight_sum += float(row_weight.sum())
                rows += batch.num_rows
        finally:
            draft.train(was_training)
        return (total / weight_sum if weight_sum > 0 else 0.0), rows

    def _score_eagle(self, head: EagleHead, kept: Sequence[tuple[TrainingRecord, float]]) -> tuple[float, int]:
        """score() for an eagle head: its first draft step at every teacher row, from the records' stored
        features (records without them are skipped: their rows cannot be scored without a target forward)."""
        total, weight_sum, rows = 0.0, 0.0, 0
        for record, weight in kept:
            scored = first_step_logits(head, record)
            if scored is None:
                continue
            logits, at = scored  # [N, V], [N]
            ids, logprobs, lse = (t.to(logits.device)[at] for t in (record.teacher_token_ids, record.teacher_logprobs,
                                                                   record.teacher_logsumexp))
            alpha = estimated_acceptance(logits, ids, logprobs, lse, temperature=self.temperature)
            total += float(alpha) * weight * len(at)
            weight_sum += weight * len(at)
            rows += len(at)
        return (total / weight_sum if weight_sum > 0 else 0.0), rows

    def evaluate(self, draft: DraftModel, records: Sequence[TrainingRecord]) -> float:
        """α̂ of ``draft`` on ``records`` (0.0 when they hold no rows)."""
        return self.score(draft, records)[0]

    def decide(self, candidate: DraftModel, live: DraftModel, holdout: Sequence[TrainingRecord],
               ages: Sequence[int] | None = None) -> GateDecision:
        """ages: per held-out record, records taken in since it arrived (``OnlineDistiller.holdout_ages``);
        None weighs them alike."""
        weights = None if ages is None else self.weights(ages)
        cand, rows = self.score(candidate, holdout, weights)
        live_alpha, _ = self.score(live, holdout, weights)
        if rows < self.min_rows:
            return GateDecision(False, cand, live_alpha, rows,
                                f"only {rows} held-out rows (need {self.min_rows}); keeping the live draft")
        if cand >= live_alpha - self.margin:
            return GateDecision(True, cand, live_alpha, rows,
                                f"candidate α̂ {cand:.4f} >= live α̂ {live_alpha:.4f} - margin {self.margin}")
        return GateDecision(False, cand, live_alpha, rows,
                            f"candidate α̂ {cand:.4f} < live α̂ {live_alpha:.4f} - margin {self.margin}")
