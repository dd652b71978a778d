"""The lossless acceptance rule (Leviathan et al., arXiv 2211.17192).

Notation: p = target, q = draft, both after the same warp. A proposal d_i is
accepted iff u_i * q_i(d_i) <= p_i(d_i); at the first rejection the next token is
*recovered* from norm(max(0, p_i - q_i)); if all γ are accepted a *bonus* token is
drawn from p_{γ+1}. The randomness is passed in, so the rule is a pure function
that tests can drive exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    num_accepted: int  # proposals accepted before the first rejection
    next_token: int  # the recovered token (after a rejection) or the bonus token (after none)

    def kind(self, gamma: int) -> str:
        return "bonus" if self.num_accepted == gamma else "recovered"


def acceptance_probs(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """target_probs, draft_probs: [γ] probabilities of the proposed tokens → [γ] min(1, p/q)."""
    return torch.where(draft_probs > 0, (target_probs / draft_probs).clamp(max=1.0), torch.ones_like(draft_probs))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p, q: [V] → norm(max(0, p - q)) [V]; falls back to p when that has no usable mass.

    The fallback only triggers when p ≈ q, where a rejection has probability ~0: it
    keeps sampling well defined instead of dividing by zero.
    """
    residual = (p - q).clamp(min=0.0)
    total = residual.sum()
    if not torch.isfinite(total) or total <= 1e-12:
        return p
    return residual / total


def overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p, q: [N, V] → [N] β = Σ min(p, q): the probability that a proposal from q is accepted."""
    return torch.minimum(p, q).sum(-1)


def verify_sampled(
    draft_tokens: torch.Tensor,  # [γ] int64: the draft's proposals
    draft_probs: torch.Tensor,  # [γ, V]: exactly the q each proposal was sampled from
    target_probs: torch.Tensor,  # [γ + 1, V]: p at each proposal and one past the last
    uniforms: torch.Tensor,  # [γ] in [0, 1): one coin per proposal
    generator: torch.Generator | None,  # draws the recovered / bonus token
) -> Verdict:
    gamma = draft_tokens.shape[0]
    idx = torch.arange(gamma, device=draft_tokens.device)
    p_d = target_probs[idx, draft_tokens]
    q_d = draft_probs[idx, draft_tokens]
    rejected = (uniforms * q_d > p_d).nonzero()
    if rejected.numel() == 0:
        bonus = torch.multinomial(target_probs[gamma], 1, generator=generator)
        return Verdict(gamma, int(bonus))
    n = int(rejected[0])
    recovery = residual_distribution(target_probs[n], draft_probs[n])
    return Verdict(n, int(torch.multinomial(recovery, 1, generator=generator)))


def verify_greedy(
    draft_tokens: torch.Tensor,  # [γ] int64: the draft's proposals
    target_argmax: torch.Tensor,  # [γ + 1] int64: the target's argmax at each position
) -> Verdict:
    gamma = draft_tokens.shape[0]
    mismatch = (draft_tokens != target_argmax[:gamma]).nonzero()
    n = gamma if mismatch.numel() == 0 else int(mismatch[0])
    return Verdict(n, int(target_argmax[n]))
