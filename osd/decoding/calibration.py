"""Acceptance calibration: what a proposal's confidence says about its chance of being accepted."""

from __future__ import annotations

import torch


class AcceptanceCalibration:
    """P(a child is accepted | its parent is reached), as a function of the draft's probability for it.

    Path probabilities are the draft's own guess at acceptance; a draft that spreads its mass
    (or an overconfident one) misjudges it, and with it the budget. This learns the map from
    verification outcomes — binned by q, starting from "q is calibrated" with a weight of
    `prior` observations per bin, halving old counts past `cap` so it follows a changing draft.
    `prior_scale` < 1 starts from a more sceptical guess (q · prior_scale) for weaker signals,
    such as a suffix index's match fraction. It only ever looks at past rounds, so trees stay
    lossless.
    """

    EDGES = (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    def __init__(self, prior: float = 4.0, cap: float = 1000.0, prior_scale: float = 1.0):
        self.edges = torch.tensor(self.EDGES, dtype=torch.float64)
        self.mid = (self.edges[1:] + self.edges[:-1]) / 2 * prior_scale  # [B]: the prior guess per bin
        self.hits = torch.zeros(len(self.mid), dtype=torch.float64)
        self.count = torch.zeros(len(self.mid), dtype=torch.float64)
        self.prior, self.cap = prior, cap

    def _bins(self, q: torch.Tensor) -> torch.Tensor:
        return (torch.bucketize(q.double().cpu(), self.edges[1:-1], right=True)).clamp(max=len(self.mid) - 1)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """q: [m] draft probabilities → [m] fp64 estimated acceptance probabilities in [0, 1]."""
        b = self._bins(q)
        return (self.hits[b] + self.prior * self.mid[b]) / (self.count[b] + self.prior)

    def update(self, q: torch.Tensor, accepted: torch.Tensor) -> None:
        """q: [m] draft probabilities of tried children, accepted: [m] bool."""
        b = self._bins(q)
        self.hits.index_add_(0, b, accepted.double().cpu())
        self.count.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
        full = self.count > self.cap
        self.hits[full] /= 2
        self.count[full] /= 2
