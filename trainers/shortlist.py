"""The draft's shortlist head, grown from traffic.

A small draft's LM head over SmolLM2's 49152 tokens is most of its cost (bench distill: the
2-layer self-draft's step falls from c ≈ 0.13 to 0.07 of a target step through a 4096-token
head). Which 4096 tokens is a property of the traffic, so the trainer tallies the target's
probability mass per token over the records it trains on, and after every update proposes the
heaviest ``size`` ids. A proposal replaces the draft's shortlist only if it covers at least
``min_coverage`` of the tokens the target emitted in the held-out records (never trained on, so
the coverage is honest) and no less than the current shortlist does. The shortlist is then
published with the draft's weights (``osd.models.drafts.SHORTLIST_KEY``), so each version is
served through the shortlist it was gated with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from osd.data.records import TrainingRecord


class TokenTally:
    """Target probability mass per token id over the records added so far."""

    def __init__(self, vocab_size: int):
        self.mass = torch.zeros(vocab_size, dtype=torch.float64)  # [V]
        self.records = 0

    def add(self, records: TrainingRecord | Iterable[TrainingRecord]) -> None:
        """Each stored top-k teacher entry adds its probability; each emitted token adds 1."""
        for r in [records] if isinstance(records, TrainingRecord) else records:
            ids = r.teacher_token_ids.reshape(-1).long()
            self.mass.index_add_(0, ids, r.teacher_logprobs.reshape(-1).double().exp())
            self.mass.index_add_(0, torch.tensor(r.output_ids, dtype=torch.long),
                                 torch.ones(len(r.output_ids), dtype=torch.float64))
            self.records += 1

    def shortlist(self, size: int) -> torch.Tensor:
        """The ``size`` heaviest ids, sorted: [min(size, V)] int64.

        If fewer ids were ever seen, the lowest unseen ids fill up: in a BPE vocabulary low ids
        are the earliest merges, roughly the most frequent tokens.
        """
        size = min(size, self.mass.numel())
        order = torch.argsort(self.mass, descending=True, stable=True)  # unseen ids (0 mass) keep ascending order
        return torch.sort(order[:size]).values


def coverage(shortlist: torch.Tensor | None, records: Sequence[TrainingRecord]) -> float:
    """shortlist: [K] token ids (None = the full head) → share of the records' emitted tokens inside it.

    A ceiling on a shortlist draft's greedy acceptance; 1.0 with no records or no shortlist.
    """
    tokens = torch.tensor([t for r in records for t in r.output_ids], dtype=torch.long)
    if shortlist is None or tokens.numel() == 0:
        return 1.0
    return float(torch.isin(tokens, shortlist.cpu()).double().mean())


def grown_shortlist(tally: TokenTally, current: torch.Tensor | None, holdout: Sequence[TrainingRecord],
                    size: int, min_coverage: float) -> torch.Tensor | None:
    """The shortlist to serve next: the tally's proposal if it qualifies (see the module docstring), else
    ``current``. current: [K] token ids or None (the full head)."""
    if size <= 0 or size >= tally.mass.numel() or not holdout:
        return current
    proposed = tally.shortlist(size)
    if current is not None and torch.equal(proposed, current.cpu()):
        return current
    covered = coverage(proposed, holdout)
    if covered < min_coverage or (current is not None and covered < coverage(current, holdout)):
        return current
    return proposed
