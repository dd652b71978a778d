"""Drafting: the draft proposes γ tokens, one forward each, on its own KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from osd.config import SamplingParams
from osd.models import DraftModel
from osd.sampling import sample, warp_probs


@dataclass
class Proposal:
    tokens: torch.Tensor  # [γ] int64: proposed token ids
    # [γ, V] fp32: the distribution each token was drawn from (the warped q). Under
    # greedy decoding it is the temperature-1 softmax instead, used only for α̂.
    probs: torch.Tensor


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop cached positions past `length` (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
    assert cache.get_seq_length() == min(length, cache.get_seq_length()), "KV cache crop failed"


class Drafter:
    """Holds one request's draft cache; `propose` catches up on committed tokens first.

    After a fully accepted round the cache is one token behind (it never saw d_γ), so
    catching up may feed two tokens: that costs one forward, not two.
    """

    def __init__(self, draft: DraftModel):
        self.draft = draft
        self.cache = DynamicCache(config=draft.config)

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def propose(self, tokens: list[int], gamma: int, params: SamplingParams,
                generator: torch.Generator | None) -> Proposal:
        """tokens: every committed token (prompt + output); returns γ proposals continuing them."""
        device = next(self.draft.parameters()).device
        feed = torch.tensor([tokens[self.cached:]], device=device)
        proposed, dists = [], []
        for _ in range(gamma):
            logits = self.draft(feed, past_key_values=self.cache, logits_to_keep=1)[0, -1:]  # [1, V]
            if params.greedy:
                token = logits.argmax(-1)
                dist = logits.softmax(-1)
            else:
                dist = warp_probs(logits, params)
                token = sample(dist, generator)
            proposed.append(token)
            dists.append(dist)
            feed = token.view(1, 1)
        return Proposal(torch.cat(proposed), torch.cat(dists))

    def rollback(self, committed: int) -> None:
        """Keep only cache entries for committed tokens (the last committed token is fed next round)."""
        crop_cache(self.cache, min(self.cached, committed - 1))
