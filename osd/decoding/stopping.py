"""Adaptive candidate length: how many tokens the draft proposes this round.

A chain's γ is a bet: each extra draft token costs a draft step and pays only if every
token before it is accepted. The policies here decide from draft-side information alone —
the draft's own distribution and hidden state, and the verdicts of rounds already
verified — never from target outputs for tokens not yet verified, so they cannot change
what is accepted (losslessness holds whatever they decide; only speed moves).

  fixed       always γ (the baseline).
  schedule    HF assisted generation's heuristic: after a round whose every token was
              accepted, γ += 2; after any rejection, γ -= 1 (at least 1, at most the cap).
  confidence  stop once the draft's top-1 probability for the token just drafted falls
              below ``threshold`` (HF's assistant_confidence_threshold; Kangaroo's exit rule).
  head        SpecDec++: a small head on the draft's hidden state predicts the chance the
              token just drafted is accepted; stop once the predicted chance that at least
              one token of the round is rejected, 1 - Π p̂, exceeds ``threshold``. The head
              is trained from the same training records (soft label min(1, p/q) for the
              draft's top-1 token; trainers/acceptance_head.py). Without a head, as fixed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

LengthPolicyName = Literal["fixed", "schedule", "confidence", "head"]


class AcceptanceHead(nn.Module):
    """p̂(accept) for a drafted token from the draft's state where it was drafted.

    Inputs: the final-norm hidden state that produced q (scale-free after the norm), and
    three numbers that carry most of the signal for a weak draft: log q of the drafted
    token, log q_max and the entropy of q.
    """

    def __init__(self, hidden_size: int, width: int = 64):
        super().__init__()
        self.hidden_size = hidden_size
        self.net = nn.Sequential(nn.Linear(hidden_size + 3, width), nn.SiLU(), nn.Linear(width, 1))

    @staticmethod
    def features(hidden: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H]; probs: [N, V] the draft's q; tokens: [N] drafted ids → [N, H + 3] fp32."""
        q = probs.float().clamp_min(1e-12)
        drafted = q.gather(-1, tokens[:, None]).log()  # [N, 1]
        top = q.max(-1, keepdim=True).values.log()  # [N, 1]
        entropy = -(q * q.log()).sum(-1, keepdim=True)  # [N, 1]
        return torch.cat([hidden.float(), drafted, top, entropy], -1)

    def forward(self, hidden: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H]; probs: [N, V]; tokens: [N] → logits [N] of p̂(accept)."""
        return self.net(self.features(hidden, probs, tokens)).squeeze(-1)


class LengthPolicy:
    """One request's length policy (per-request state): fixed γ; subclasses override what they change.

    gamma: the round length; None drafts up to the cap (the stopping rules decide).
    """

    needs_hidden = False  # whether keep_drafting reads the hidden state (costs nothing otherwise)

    def __init__(self, gamma: int | None = None):
        self.gamma = gamma

    def begin_round(self, cap: int) -> int:
        """γ for this round, at most ``cap``; resets per-round state."""
        return cap if self.gamma is None else max(1, min(self.gamma, cap))

    def keep_drafting(self, probs: torch.Tensor, token: int, hidden: torch.Tensor | None) -> bool:
        """After drafting ``token``: probs [V] the q it came from (temperature 1 under greedy);
        hidden [H] the state that produced q, or None unless ``needs_hidden``."""
        return True

    def observe(self, proposed: int, accepted: int) -> None:
        """The verdict of the round just verified."""


class ScheduleLength(LengthPolicy):
    """HF's +2 / -1 schedule over rounds, starting at ``gamma``."""

    def observe(self, proposed: int, accepted: int) -> None:
        self.gamma = self.gamma + 2 if accepted == proposed else max(1, self.gamma - 1)


class ConfidenceStop(LengthPolicy):
    """Stop when the draft's top-1 probability drops below ``threshold``."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def keep_drafting(self, probs: torch.Tensor, token: int, hidden: torch.Tensor | None) -> bool:
        return float(probs.max()) >= self.threshold


class HeadStop(LengthPolicy):
    """SpecDec++: stop when 1 - Π p̂(accept) over the round's tokens exceeds ``threshold``."""

    needs_hidden = True

    def __init__(self, head: AcceptanceHead, threshold: float):
        super().__init__()
        self.head = head
        self.threshold = threshold
        self._all_accepted = 1.0

    def begin_round(self, cap: int) -> int:
        self._all_accepted = 1.0
        return cap

    def keep_drafting(self, probs: torch.Tensor, token: int, hidden: torch.Tensor | None) -> bool:
        tokens = torch.tensor([token], device=probs.device)
        p_accept = torch.sigmoid(self.head(hidden[None], probs[None], tokens))[0]
        self._all_accepted *= float(p_accept)
        return 1.0 - self._all_accepted <= self.threshold


def make_length_policy(name: LengthPolicyName, gamma: int, threshold: float,
                       head: AcceptanceHead | None = None) -> LengthPolicy:
    """The policy for one request; 'head' without a trained head (a fresh service) drafts fixed γ."""
    if name == "schedule":
        return ScheduleLength(gamma)  # starts at γ
    if name == "confidence":
        return ConfidenceStop(threshold)
    if name == "head" and head is not None:
        return HeadStop(head, threshold)
    return LengthPolicy(gamma)
