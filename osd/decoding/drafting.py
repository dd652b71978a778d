"""Drafting: the draft proposes up to γ tokens, one forward each, on its own KV cache.

How many is the length policy's call (osd/decoding/stopping.py); it sees only draft-side state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from osd.config import SamplingParams
from osd.decoding.kv_cache import KVCacheKind, make_cache
from osd.decoding.sampling import sample, warp_probs
from osd.decoding.stopping import LengthPolicy
from osd.models.drafts import DraftModel


@dataclass
class Proposal:
    tokens: torch.Tensor  # [γ] int64: proposed token ids
    # [γ, V] fp32: the distribution each token was drawn from (the warped q). Under
    # greedy decoding it is the temperature-1 softmax instead, used only for α̂.
    probs: torch.Tensor


def choose_token(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [1, V] → (token [1], q [1, V]): the warped q it is sampled from, or under greedy the
    argmax and the temperature-1 softmax (used for α̂ only)."""
    if params.greedy:
        return logits.argmax(-1), logits.softmax(-1)
    dist = warp_probs(logits, params)
    return sample(dist, generator), dist


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop cached positions past `length` (transformers 5 crops by a negative count; a PreallocatedCache takes the
    same count and only moves its length)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
    assert cache.get_seq_length() == min(length, cache.get_seq_length()), "KV cache crop failed"


class Drafter:
    """Holds one request's draft cache; `propose` catches up on committed tokens first.

    After a fully accepted round the cache is one token behind (it never saw d_γ), so
    catching up may feed two tokens: that costs one forward, not two.
    """

    def __init__(self, draft: DraftModel, policy: LengthPolicy | None = None, kv_cache: KVCacheKind = "preallocated"):
        self.draft = draft
        self.policy = policy or LengthPolicy()  # no policy: every round drafts the cap
        self.cache = make_cache(draft.config, kv_cache)  # grows by doubling from the prompt's prefill

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def propose(self, tokens: list[int], cap: int, params: SamplingParams,
                generator: torch.Generator | None) -> Proposal:
        """tokens: every committed token (prompt + output); returns 1..cap proposals continuing them."""
        device = next(self.draft.parameters()).device
        feed = torch.tensor([tokens[self.cached:]], device=device)
        gamma = self.policy.begin_round(cap)
        want_hidden = self.policy.needs_hidden
        proposed, dists = [], []
        for i in range(gamma):
            out = self.draft(feed, past_key_values=self.cache, logits_to_keep=1, return_hidden=want_hidden)
            logits, hidden = (out[0][0, -1:], out[1][0, -1]) if want_hidden else (out[0, -1:], None)  # [1, V], [H]
            token, dist = choose_token(logits, params, generator)
            proposed.append(token)
            dists.append(dist)
            if i + 1 < gamma and not self.policy.keep_drafting(dist[0], int(token), hidden):
                break
            feed = token.view(1, 1)
        return Proposal(torch.cat(proposed), torch.cat(dists))

    def target_rows(self, count: int) -> None:
        """The target's last forward committed its first ``count`` positions. This draft reads only tokens;
        a drafter over the target's hidden states (osd/decoding/eagle.py) keeps them."""

    def observe(self, proposed: int, accepted: int) -> None:
        """The round's verdict, for policies that adapt across rounds."""
        self.policy.observe(proposed, accepted)

    def rollback(self, committed: int) -> None:
        """Keep only cache entries for committed tokens (the last committed token is fed next round)."""
        crop_cache(self.cache, min(self.cached, committed - 1))
