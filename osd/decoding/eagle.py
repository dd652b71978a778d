"""EAGLE-style drafting: a one-layer head that reads the target's own hidden states.

A self-draft must rebuild the context with decoder layers of its own; the target's verification
forward has already built it. The head (EAGLE-3's shape, Li et al. 2025) drafts token x_{j+2}
from two things at position j: the target's residual stream after a low, a middle and a high
layer, fused by one linear map, and the embedding of token x_{j+1}. One Llama decoder layer
(warm-started from the target's last layer) with its own KV cache runs over those pairs; a copy of
the target's final norm and the target's own frozen LM head turn its output into logits. For the next draft
step the head feeds its own output back in place of the target's features (the target has not
seen the drafted token yet); after each round the target features of the committed positions
replace them, so the head never drifts further than one round.

Nothing here changes what is emitted: the head only proposes tokens with a q, and verification
(osd/decoding/verification.py) keeps the output the target's.

The features come from the engine's own target forwards (prefill and verification), captured by
``FeatureCapture``'s forward hooks: no extra target pass.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, PreTrainedModel

from osd.config import SamplingParams
from osd.decoding.drafting import Proposal, choose_token, crop_cache
from osd.decoding.kv_cache import KVCacheKind, make_cache
from osd.decoding.stopping import LengthPolicy
from osd.models.drafts import ShortlistHead


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high features: the residual stream before layers 2, L/2 and L-3,
    i.e. after layers 1, L/2-1 and L-4 (clamped and deduplicated on shallow models)."""
    wanted = [1, num_layers // 2 - 1, num_layers - 4]
    return sorted({min(max(i, 0), num_layers - 1) for i in wanted})


class EagleHead(ShortlistHead, nn.Module):
    """The draft head. Its state is its own weights only: the target's embedding and LM head are
    borrowed (frozen, shared with the target) and not part of ``state_dict()``; so is the
    shortlist the head may be served through (ShortlistHead), which a version publishes beside it."""

    def __init__(self, target: PreTrainedModel, feature_layers: Sequence[int] | None = None,
                 shortlist: torch.Tensor | None = None):
        super().__init__()
        tcfg = target.config
        num_layers = tcfg.num_hidden_layers
        self.feature_layers = list(feature_layers) if feature_layers is not None else default_feature_layers(num_layers)
        if not self.feature_layers or any(not 0 <= i < num_layers for i in self.feature_layers):
            raise ValueError(f"eagle feature layers must be target layer indices in [0, {num_layers - 1}], "
                             f"got {self.feature_layers}")
        hidden = tcfg.hidden_size
        dtype, device = target.dtype, target.device
        self.vocab_size = tcfg.vocab_size
        # Borrowed, not registered: a tuple attribute is not a submodule.
        self._target = (target.get_input_embeddings(), target.get_output_embeddings())
        self.fuse = nn.Linear(len(self.feature_layers) * hidden, hidden, bias=False, dtype=dtype, device=device)
        self.proj = nn.Linear(2 * hidden, hidden, bias=False, dtype=dtype, device=device)
        body_config = LlamaConfig(**{**tcfg.to_dict(), "num_hidden_layers": 1, "vocab_size": 1, "layer_types": None,
                                     "tie_word_embeddings": False, "pad_token_id": None})
        self.body = LlamaModel(body_config).to(device=device, dtype=dtype)
        self.body.norm = nn.Identity()  # the body's output is the pre-norm feature fed back next step
        self.norm = copy.deepcopy(target.get_decoder().norm)
        # Warm start: the target's last layer already maps a late residual stream towards the next token.
        self.body.layers[0].load_state_dict(target.get_decoder().layers[-1].state_dict())
        # Which target layers a version was trained on travels with its weights (load_published_state checks it).
        self.register_buffer("feature_layer_ids", torch.tensor(self.feature_layers, device=device))
        self._init_shortlist(shortlist)
        self.acceptance_head = None  # SpecDec++'s head is trained for self-drafts only

    def lm_head(self) -> nn.Module:
        return self._target[1]

    @property
    def published_module(self) -> nn.Module:
        """The module whose ``state_dict()`` a published version holds: the head itself."""
        return self

    def __deepcopy__(self, memo: dict) -> EagleHead:
        """A copy with its own weights that still borrows the same target embedding and LM head."""
        memo[id(self._target)] = self._target
        clone = self.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        return clone

    @property
    def config(self) -> LlamaConfig:
        return self.body.config

    @property
    def feature_size(self) -> int:
        return len(self.feature_layers) * self.config.hidden_size

    def forward(self, next_ids: torch.Tensor, features: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                past_key_values=None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_shortlist: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """next_ids: [1, S] tokens x_{j+1}; features: [1, S, F] target features at j, or hidden: [1, S, H] the
        head's own output at j → (logits [1, S, V] fp32 for x_{j+2}, output hidden [1, S, H]).

        attention_mask: an additive [1, 1, S, past + S] mask and position_ids [1, S] for entries that are
        not one causal run (training-time test unrolls, trees); None = causal after the cache.
        use_shortlist=False: the full head's logits even with a shortlist (training: forward KL
        must stay finite where the teacher's top-k leaves the shortlist)."""
        embed = self._target[0]
        context = self.fuse(features) if features is not None else hidden  # [1, S, H]
        x = self.proj(torch.cat([embed(next_ids), context], dim=-1))
        out = self.body(inputs_embeds=x, past_key_values=past_key_values, use_cache=past_key_values is not None,
                        attention_mask=attention_mask, position_ids=position_ids)
        h = out.last_hidden_state  # [1, S, H]
        normed = self.norm(h)
        return (self.logits_from_hidden(normed) if use_shortlist else self.lm_head()(normed).float()), h


class FeatureCapture:
    """Forward hooks on the target's decoder layers that keep the last forward's outputs of ``layers``."""

    def __init__(self, target: PreTrainedModel, layers: Sequence[int]):
        self.layers = list(layers)
        self._last: dict[int, torch.Tensor] = {}
        decoder_layers = target.get_decoder().layers
        self._handles = [decoder_layers[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, index: int):
        def keep(module, args, output) -> None:
            self._last[index] = output[0] if isinstance(output, tuple) else output  # [1, S, H]
        return keep

    def rows(self, count: int, at: list[int] | None = None) -> torch.Tensor:
        """Rows ``at`` of the last forward (a tree's committed path), else its first ``count`` positions:
        [count, F], the layers concatenated in order."""
        if at is not None:
            index = torch.tensor(at, device=self._last[self.layers[0]].device)
            return torch.cat([self._last[i][0, index] for i in self.layers], dim=-1)
        return torch.cat([self._last[i][0, :count] for i in self.layers], dim=-1)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class EagleDrafter:
    """One request's head cache. Entry j holds the pair (target feature f_j, token x_{j+1}); entries fed
    with the head's own output during a round are dropped at rollback."""

    def __init__(self, head: EagleHead, capture: FeatureCapture, policy: LengthPolicy | None = None,
                 kv_cache: KVCacheKind = "preallocated", keep_features: bool = False):
        self.draft = head
        self.capture = capture
        self.policy = policy or LengthPolicy()
        self.cache = make_cache(head.config, kv_cache)
        self.true_entries = 0  # leading cache entries fed with target features
        self._pending: list[torch.Tensor] = []  # target feature rows [m, F] not fed yet, in position order
        # Every committed row, in position order, for the training record (keep_features).
        self.kept: list[torch.Tensor] | None = [] if keep_features else None

    @property
    def cached(self) -> int:
        """Committed tokens the head has consumed (entry j consumed x_{j+1}; x_0 needs no entry)."""
        return self.true_entries + 1

    def target_rows(self, count: int, at: list[int] | None = None) -> None:
        """The last target forward's first ``count`` positions (or its rows ``at``, a tree's committed path)
        are committed context: keep their features."""
        if count > 0:
            rows = self.capture.rows(count, at)  # [count, F]
            self._pending.append(rows)
            if self.kept is not None:
                self.kept.append(rows)

    def features(self, start: int, stop: int) -> torch.Tensor:
        """Kept rows of positions [start, stop): [stop - start, F] float16 on the CPU, for a training record."""
        return torch.cat(self.kept)[start:stop].to("cpu", torch.float16)

    @torch.inference_mode()
    def propose(self, tokens: list[int], cap: int, params: SamplingParams,
                generator: torch.Generator | None) -> Proposal | None:
        """tokens: every committed token; the target has features for all but the last. None when there is
        no context to draft from yet (a one-token prompt's first round)."""
        features = torch.cat(self._pending) if self._pending else None  # [m, F]
        new = 0 if features is None else features.shape[0]
        if self.true_entries + new != len(tokens) - 1:
            raise RuntimeError(f"eagle drafter out of step: {self.true_entries} + {new} feature rows for "
                               f"{len(tokens)} committed tokens")
        if new == 0:
            return None
        device = features.device
        next_ids = torch.tensor([tokens[self.true_entries + 1:]], device=device)  # x_{j+1} for the new entries
        logits, hidden = self.draft(next_ids, features=features[None], past_key_values=self.cache)
        self.true_entries += new
        self._pending = []
        gamma = self.policy.begin_round(cap)
        proposed, dists = [], []
        for i in range(gamma):
            token, dist = choose_token(logits[0, -1:], params, generator)
            proposed.append(token)
            dists.append(dist)
            if i + 1 < gamma and not self.policy.keep_drafting(dist[0], int(token), None):
                break
            if i + 1 < gamma:
                logits, hidden = self.draft(token.view(1, 1), hidden=hidden[:, -1:], past_key_values=self.cache)
        return Proposal(torch.cat(proposed), torch.cat(dists))

    def observe(self, proposed: int, accepted: int) -> None:
        self.policy.observe(proposed, accepted)

    def rollback(self, committed: int) -> None:
        """Drop the entries fed with the head's own outputs; the committed ones arrive as target rows."""
        crop_cache(self.cache, self.true_entries)
