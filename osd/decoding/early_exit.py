"""Kangaroo-style early exit: a self-draft that reuses the target's shallow layers, their KV and their hidden states.

The draft is the target's first s decoder layers (shared: frozen, never trained) plus one or more adapter layers
(trained online), then the final norm and the LM head, e.g. ``build_self_draft(target, s + 1)`` distilled with
``DistillConfig(freeze_layers=list(range(s)), freeze_embeddings=True, freeze_head=True)``. Because the shared
layers and the embeddings equal the target's, the target already computes, for every committed token, what the
draft's shared layers would:

- their KV: the target cache's layers 0..s-1. The drafter keeps no KV of its own for the shared layers; while
  drafting it appends the pending and drafted tokens to those target layers, and crops them back before
  ``propose`` returns (even on an exception).
- their output: a forward hook on target layer s-1, installed when a request's drafter is made and removed when
  that ``generate`` returns or raises, records the hidden states of prefill and verification. Committed tokens the
  adapter has not seen yet (the prompt; after a fully accepted round, the last draft token) enter the adapter
  straight from those rows, so the shared layers never run twice for a committed token.

Saved against a plain Drafter over the same standalone draft: the draft's prompt prefill through the shared
layers, the catch-up token's shared-layer work after every fully accepted round, and the shared layers' KV memory.
While drafting only the pending token and the drafted ones pass the shared layers. The drafter computes the same
q as the standalone draft (the tests check it), so acceptance does not move, only draft cost.

Invariants:
- Between rounds every layer of the target cache holds len(tokens) - 1 positions (the engine's invariant);
  ``propose`` asserts it on entry and restores it on exit.
- The drafter's own cache (draft-shaped; only layers s.. are ever filled) holds at most len(tokens) - 1 committed
  positions between rounds, as in Drafter.
- The hidden-state store covers every committed position from the adapter cache's length on (asserted on use).

Early exit: drafting stops once the draft's top-1 probability falls below ``exit_threshold`` (ConfidenceStop,
Kangaroo's exit rule); EarlyExitDrafter takes any LengthPolicy.

Decoder layers are run by hand (embedding, rotary embedding, causal mask, positions from each cache's length), as
transformers' Llama implementation does: Llama-family models only (model_type "llama": SmolLM2, LLaMA, Vicuna).
Anything else raises ValueError at construction.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_causal_mask

from osd.config import EngineConfig, SamplingParams
from osd.decoding.drafting import Proposal, choose_token
from osd.decoding.engine import Generation, SpeculativeEngine
from osd.decoding.kv_cache import KVCacheKind, make_cache
from osd.decoding.stopping import ConfidenceStop, LengthPolicy
from osd.models.drafts import DraftModel, build_self_draft

SUPPORTED_MODEL_TYPES = ("llama",)

_FREEZE_HINT = ("the shared layers and the embeddings must stay the target's: distil with "
                "DistillConfig(freeze_layers=list(range({s})), freeze_embeddings=True, freeze_head=True), "
                "or rebuild the draft with build_self_draft(target, {s} + adapter layers)")


# ---- checks -----------------------------------------------------------------------------------------

def check_architecture(model: PreTrainedModel) -> None:
    """Raise ValueError unless `model` is a decoder this module can run layer by layer."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"early exit runs decoder layers by hand and supports Llama-family models "
                         f"(model_type in {SUPPORTED_MODEL_TYPES}), not {model_type!r}; serve this model with "
                         "SpeculativeEngine and a standalone draft instead")
    decoder = model.get_decoder()
    missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, name)]
    if missing:
        raise ValueError(f"{type(decoder).__name__} lacks {missing}: not the Llama layout early exit needs")


def check_shared_layers(target: PreTrainedModel, draft: PreTrainedModel, shared_layers: int) -> None:
    """Raise ValueError unless the draft's embeddings, rotary embedding and first `shared_layers` decoder layers
    equal the target's (values; the target's Linear weights may be laid out transposed) and an adapter remains."""
    check_architecture(target)
    check_architecture(draft)
    target_decoder, draft_decoder = target.get_decoder(), draft.get_decoder()
    total, draft_total = len(target_decoder.layers), len(draft_decoder.layers)
    if not 1 <= shared_layers <= total:
        raise ValueError(f"shared_layers must be in [1, {total}] (the target's layer count), got {shared_layers}")
    if draft_total <= shared_layers:
        raise ValueError(f"the draft has {draft_total} decoder layers, none above the {shared_layers} shared ones "
                         f"to adapt; build it with build_self_draft(target, {shared_layers + 1}) or more layers")
    hint = _FREEZE_HINT.format(s=shared_layers)
    _require_equal("embeddings", target_decoder.embed_tokens, draft_decoder.embed_tokens, hint)
    _require_equal("rotary embedding", target_decoder.rotary_emb, draft_decoder.rotary_emb,
                   "build the draft from the target's config (build_self_draft does)", buffers=True)
    for i in range(shared_layers):
        _require_equal(f"layer {i}", target_decoder.layers[i], draft_decoder.layers[i], hint)


def _require_equal(what: str, target_part: nn.Module, draft_part: nn.Module, fix: str, buffers: bool = False) -> None:
    theirs = dict(draft_part.named_buffers() if buffers else draft_part.named_parameters())
    for name, value in (target_part.named_buffers() if buffers else target_part.named_parameters()):
        other = theirs.get(name)
        # torch.equal compares values whatever the strides, so the target's transposed layout is no difference.
        if other is None or other.shape != value.shape or not torch.equal(value, other.to(value.device, value.dtype)):
            raise ValueError(f"draft {what} differs from the target's ({name}): it was trained or comes from "
                             f"another model; {fix}")


# ---- the hidden states of target layer s-1 ----------------------------------------------------------

class SharedHiddenStore:
    """One request's hidden states after target layer s-1, for a contiguous range of positions [start, end)."""

    def __init__(self):
        self.start = 0
        self.rows: torch.Tensor | None = None  # [1, end - start, H]

    @property
    def end(self) -> int:
        return self.start + (self.rows.shape[1] if self.rows is not None else 0)

    def record(self, start: int, hidden: torch.Tensor) -> None:
        """hidden: [1, S, H] for positions start..start+S-1; it replaces whatever was stored from `start` on
        (rows of rejected drafts from the last verification)."""
        if self.rows is None or not self.start <= start <= self.end:
            self.start, self.rows = start, hidden
        else:
            self.rows = torch.cat([self.rows[:, : start - self.start], hidden], 1)

    def take(self, begin: int, end: int) -> torch.Tensor:
        """The rows for positions [begin, end) → [1, end - begin, H]."""
        if not self.start <= begin <= end <= self.end:
            raise RuntimeError(f"hidden states for positions [{begin}, {end}) were not captured (stored: "
                               f"[{self.start}, {self.end})); every target forward of the request must go through "
                               "the engine, on the request's cache")
        return self.rows[:, begin - self.start : end - self.start]

    def forget_before(self, position: int) -> None:
        """Drop rows the drafter will never read again, so the store stays a few rows long."""
        if self.rows is not None and position > self.start:
            keep = min(position, self.end) - self.start
            self.rows, self.start = self.rows[:, keep:], self.start + keep


class SharedHiddenCapture:
    """A forward hook on target layer s-1 that fills a SharedHiddenStore from one request's target forwards.

    Call `remove` when the request ends: the hook belongs to the request, not the model.
    """

    def __init__(self, layer: nn.Module, layer_index: int, cache: DynamicCache):
        self.store = SharedHiddenStore()
        self._layer_index = layer_index
        self._cache = cache
        self._handle = layer.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if kwargs.get("past_key_values") is not self._cache:
            return  # not this request's forward (no cache, or another cache): its positions mean nothing here
        hidden = output[0] if isinstance(output, tuple) else output  # [1, S, H]
        # The layer has already appended its KV, so its cache length is the end of these positions.
        start = self._cache.get_seq_length(self._layer_index) - hidden.shape[1]
        self.store.record(start, hidden.detach())

    def remove(self) -> None:
        self._handle.remove()


# ---- running decoder layers by hand -----------------------------------------------------------------

def run_decoder_layers(decoder: nn.Module, layers: Iterable[nn.Module], first_layer: int, hidden: torch.Tensor,
                       cache: DynamicCache) -> torch.Tensor:
    """hidden: [1, S, H] the input of decoder layer `first_layer` for the S positions after what `cache` holds in
    that layer → [1, S, H] the output of the last of `layers`, whose KV `cache` now holds too.

    What LlamaModel.forward does around its layer loop: positions continue the cache, one rotary embedding and
    one causal mask (sized from layer `first_layer`'s cache) serve every layer of the range.
    """
    start = cache.get_seq_length(first_layer)
    position_ids = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]  # [1, S]
    mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=cache, position_ids=position_ids, layer_idx=first_layer)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                       use_cache=True, position_embeddings=position_embeddings)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def crop_layers(cache: DynamicCache, layers: range, length: int) -> None:
    """Crop only `layers` of `cache` to at most `length` positions (Cache.crop would cut every layer alike)."""
    for i in layers:
        extra = cache.layers[i].get_seq_length() - length
        if extra > 0:
            cache.layers[i].crop(-extra)
        assert cache.layers[i].get_seq_length() <= length, "KV cache crop failed"


# ---- the drafter ------------------------------------------------------------------------------------

class EarlyExitDrafter:
    """One request's drafter over a shared-prefix self-draft; the Drafter interface (cached, propose, observe,
    rollback). It borrows the target cache's layers 0..s-1 while drafting and keeps its own KV for the adapter only.
    """

    def __init__(self, draft: DraftModel, shared_layers: int, target_cache: DynamicCache,
                 hidden: SharedHiddenStore, policy: LengthPolicy | None = None, kv_cache: KVCacheKind = "preallocated"):
        self.draft = draft
        self.shared_layers = shared_layers
        self.target_cache = target_cache
        self.hidden = hidden
        self.policy = policy or LengthPolicy()
        self.cache = make_cache(draft.config, kv_cache)  # draft-shaped; only the adapter layers (>= s) fill
        self._decoder = draft.model.get_decoder()
        self._shared_stack = list(self._decoder.layers[:shared_layers])  # the target's layers, in the draft's copy
        self._adapter_stack = list(self._decoder.layers[shared_layers:])
        self._adapter_range = range(shared_layers, len(self._decoder.layers))
        self._device = next(draft.parameters()).device

    @property
    def cached(self) -> int:
        """Positions the adapter cache holds."""
        return self.cache.get_seq_length(self.shared_layers)

    @torch.inference_mode()
    def propose(self, tokens: list[int], cap: int, params: SamplingParams,
                generator: torch.Generator | None) -> Proposal:
        """tokens: every committed token (prompt + output); returns 1..cap proposals continuing them."""
        committed = len(tokens) - 1  # positions the target cache holds: all but the pending token
        shared = range(self.shared_layers)
        assert all(self.target_cache.layers[i].get_seq_length() == committed for i in shared), \
            "target cache out of step with committed tokens"
        catch_up = self.hidden.take(self.cached, committed) if self.cached < committed else None  # [1, k, H]
        feed = torch.tensor([[tokens[-1]]], device=self._device)
        gamma = self.policy.begin_round(cap)
        proposed, dists = [], []
        try:
            for i in range(gamma):
                hidden = self._step(feed, catch_up if i == 0 else None)  # [1, H]
                token, dist = choose_token(self.draft.logits_from_hidden(hidden), params, generator)
                proposed.append(token)
                dists.append(dist)
                if i + 1 < gamma and not self.policy.keep_drafting(
                        dist[0], int(token), hidden[0] if self.policy.needs_hidden else None):
                    break
                feed = token.view(1, 1)
        finally:
            # The drafted tokens' shared-layer KV was borrowed space in the target cache: give it back.
            crop_layers(self.target_cache, shared, committed)
        return Proposal(torch.cat(proposed), torch.cat(dists))

    def _step(self, token: torch.Tensor, catch_up: torch.Tensor | None) -> torch.Tensor:
        """token: [1, 1] the newest token; catch_up: [1, k, H] captured layer-(s-1) outputs for the committed
        positions just before it that the adapter lacks → [1, H] the final-norm hidden state at the token."""
        embedded = self._decoder.embed_tokens(token)  # [1, 1, H]
        shallow = run_decoder_layers(self._decoder, self._shared_stack, 0, embedded, self.target_cache)  # [1, 1, H]
        if catch_up is not None:
            shallow = torch.cat([catch_up.to(shallow.dtype), shallow], 1)  # [1, k + 1, H]
        deep = run_decoder_layers(self._decoder, self._adapter_stack, self.shared_layers, shallow, self.cache)
        assert self.cached == self.target_cache.get_seq_length(0), "adapter and shared caches out of step"
        return self._decoder.norm(deep[:, -1])  # [1, H]

    def target_rows(self, count: int) -> None:
        """The target's last forward committed ``count`` positions; this drafter reads the shared cache instead."""

    def observe(self, proposed: int, accepted: int) -> None:
        """The round's verdict, for policies that adapt across rounds."""
        self.policy.observe(proposed, accepted)

    def rollback(self, committed: int) -> None:
        """Keep only adapter entries for committed tokens (the last committed token is fed next round)."""
        crop_layers(self.cache, self._adapter_range, min(self.cached, committed - 1))
        self.hidden.forget_before(self.cached)


# ---- the engine -------------------------------------------------------------------------------------

class EarlyExitEngine(SpeculativeEngine):
    """SpeculativeEngine whose drafter shares the target's first `shared_layers` layers and exits early.

    The round cap is the engine config's (config.round_cap); within it the exit threshold decides, whatever
    config.length_policy says.
    """

    def __init__(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, draft: DraftModel | None = None,
                 config: EngineConfig | None = None, *, shared_layers: int, exit_threshold: float):
        if not 0.0 <= exit_threshold <= 1.0:
            raise ValueError(f"exit_threshold is a probability in [0, 1], got {exit_threshold}")
        check_architecture(target)
        super().__init__(target, tokenizer, draft, config)
        self.shared_layers = shared_layers
        self.exit_threshold = exit_threshold
        self._capture: SharedHiddenCapture | None = None
        self._checked: tuple | None = None  # the weights signature of the last draft that passed the check
        if draft is not None:
            self._check_draft(draft)

    @classmethod
    def from_engine(cls, engine: SpeculativeEngine, shared_layers: int, exit_threshold: float,
                    draft: DraftModel | None = None) -> EarlyExitEngine:
        """engine's target, tokenizer and config; `draft`, or else the untrained target[:shared_layers + 1]
        self-draft."""
        check_architecture(engine.target)
        if draft is None:
            total = engine.target.config.num_hidden_layers
            if not 1 <= shared_layers < total:
                raise ValueError(f"shared_layers must be in [1, {total - 1}] to leave the default draft an adapter "
                                 f"layer of this {total}-layer target, got {shared_layers}")
            draft = DraftModel(build_self_draft(engine.target, shared_layers + 1))
        return cls(engine.target, engine.tokenizer, draft, engine.config,
                   shared_layers=shared_layers, exit_threshold=exit_threshold)

    def generate(self, prompt_ids: list[int], params: SamplingParams, *args, **kwargs) -> Generation:
        """SpeculativeEngine.generate; the hidden-state hook lives from the drafter's making to this return or raise."""
        try:
            return super().generate(prompt_ids, params, *args, **kwargs)
        finally:
            self._release_capture()

    def _make_drafter(self, draft: DraftModel, cache: DynamicCache, prompt_ids: list[int], cluster: str) -> EarlyExitDrafter:
        self._check_draft(draft)  # a swapped-in draft must share the layers too
        self._release_capture()
        index = self.shared_layers - 1
        self._capture = SharedHiddenCapture(self.target.get_decoder().layers[index], index, cache)
        return EarlyExitDrafter(draft, self.shared_layers, cache, self._capture.store,
                                ConfidenceStop(self.exit_threshold), self.config.kv_cache)

    def _release_capture(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _check_draft(self, draft: DraftModel) -> None:
        """check_shared_layers, skipped while the draft's checked weights are the same tensors, unmodified."""
        check_architecture(draft.model)
        decoder = draft.model.get_decoder()
        watched = [*decoder.embed_tokens.parameters(),
                   *(p for layer in decoder.layers[: self.shared_layers] for p in layer.parameters())]
        # An in-place update bumps a tensor's version counter, so a trainer editing shared weights is caught.
        signature = (id(draft.model), *((p.data_ptr(), p._version) for p in watched))
        if signature != self._checked:
            check_shared_layers(self.target, draft.model, self.shared_layers)
            self._checked = signature
