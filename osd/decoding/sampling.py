"""Logit warping shared by target and draft.

Losslessness needs p and q warped by exactly the same function: the rejection rule
then reproduces the target's *warped* distribution, which is what plain sampling
would have drawn from.
"""

from __future__ import annotations

import torch

from osd.config import SamplingParams


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [N, V] → probabilities [N, V] (fp32) after temperature, top-k and top-p.

    Greedy (temperature 0) gives the one-hot argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token once the mass *before* it already reaches top_p; the top token always stays.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False  # also when top_p rounds to 0 in float32 (e.g. 5e-324)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs: [N, V] → token ids [N], drawn with the request's own generator."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
