"""Drafts: the self-draft built from the target, the shortlist-head wrapper, published weights.

A draft is a causal LM over the target's vocabulary wrapped in ``DraftModel``; what the
trainer publishes (weights, the shortlist it grew from traffic, an optional acceptance head) is
loaded back with ``load_published_state`` beside the live draft.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from osd.config import ModelConfig
from osd.models.loading import ModelLoadError, load_causal_lm, load_target


def build_self_draft(target: PreTrainedModel, layers: int | list[int] = 2) -> PreTrainedModel:
    """A copy of some of the target's decoder layers plus its final norm and LM head.

    `layers` is a count (the first N layers, the default construction) or explicit
    target layer indices in order, e.g. [0, 1, 28, 29] for early plus late layers.
    Kangaroo-style: the copy shares the target's tokenizer and embedding space, so an
    untrained draft already agrees with the target sometimes; distillation does the rest.
    """
    total = target.config.num_hidden_layers
    picked = list(range(layers)) if isinstance(layers, int) else list(layers)
    if not picked or any(not 0 <= i < total for i in picked):
        raise ValueError(f"draft layers must be a count in [1, {total}] or indices in [0, {total - 1}], got {layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(picked)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in picked]
    draft = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
    renumber = {old: new for new, old in enumerate(picked)}
    source = {}
    for key, value in target.state_dict().items():
        index = _layer_index(key)
        if index is None or index in renumber:
            new_key = key if index is None else key.replace(f"layers.{index}.", f"layers.{renumber[index]}.", 1)
            source[new_key] = value.clone(memory_format=torch.contiguous_format)  # independent, standard layout
    missing, unexpected = draft.load_state_dict(source, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    if config.tie_word_embeddings:
        draft.tie_weights()
    return draft.to(target.device).eval()


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


class ShortlistHead:
    """An LM head served through an optional shortlist of token ids (a mixin of the drafts).

    With a shortlist, logits are computed only for the listed token ids and every other token
    gets -inf, so q = 0 there. That stays lossless: verification only ever needs q for what the
    draft proposed, and p - q keeps the target's mass elsewhere. A host calls
    ``_init_shortlist`` and provides ``lm_head()`` (the full output projection) and ``vocab_size``.
    """

    vocab_size: int

    def lm_head(self) -> nn.Module:
        raise NotImplementedError

    def _init_shortlist(self, shortlist: torch.Tensor | None) -> None:
        self.register_buffer("shortlist", self._checked(shortlist), persistent=False)
        self._head_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def _checked(self, shortlist: torch.Tensor | None) -> torch.Tensor | None:
        """shortlist: [K] token ids (any integer dtype, any order) → sorted unique int64 on the head's device."""
        if shortlist is None:
            return None
        if shortlist.dim() != 1 or shortlist.is_floating_point():
            raise ValueError(f"a shortlist is a 1-D tensor of integer token ids, got {shortlist.dtype} "
                             f"{list(shortlist.shape)}")
        shortlist = torch.unique(shortlist.to(device=self.lm_head().weight.device, dtype=torch.long))
        if shortlist.numel() == 0 or shortlist.max() >= self.vocab_size or shortlist.min() < 0:
            raise ValueError(f"shortlist ids must be non-empty and within [0, {self.vocab_size})")
        return shortlist

    def set_shortlist(self, shortlist: torch.Tensor | None) -> None:
        """shortlist: [K] token ids to serve the head through from now on; None = the full head."""
        self.shortlist = self._checked(shortlist)
        self._head_cache = None

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] final-norm hidden states → logits [..., V] fp32 through the (shortlist) head."""
        if self.shortlist is None:
            return self.lm_head()(hidden).float()
        short_logits = (hidden @ self._shortlist_head().T).float()  # [..., K]
        logits = short_logits.new_full((*short_logits.shape[:-1], self.vocab_size), float("-inf"))
        logits[..., self.shortlist] = short_logits
        return logits

    def _shortlist_head(self) -> torch.Tensor:
        """The LM-head rows of the shortlist, [K, H].

        Gathering them copies K·H weights (~9 MB for 4096 × 576) — on every draft step
        that would eat much of what the shortlist saves. Served (no-grad) calls reuse one
        copy until the weight is replaced or changed in place (its version counter moves).
        """
        weight = self.lm_head().weight
        if torch.is_grad_enabled():
            return weight[self.shortlist]  # training: the gather must stay on the autograd graph
        key = (weight.data_ptr(), weight._version)
        if self._head_cache is None or self._head_cache[0] != key:
            self._head_cache = (key, weight[self.shortlist])
        return self._head_cache[1]


class DraftModel(ShortlistHead, nn.Module):
    """A draft causal LM with an optional vocabulary-shortlist LM head (ShortlistHead)."""

    def __init__(self, model: PreTrainedModel, shortlist: torch.Tensor | None = None, acceptance_head=None):
        super().__init__()
        self.model = model
        # osd.decoding.stopping.AcceptanceHead or None: SpecDec++'s stop head, trained for these weights,
        # so it travels (and swaps) with them.
        self.acceptance_head = acceptance_head
        self.vocab_size = model.config.vocab_size
        self._init_shortlist(shortlist)

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def published_module(self) -> nn.Module:
        """The module whose ``state_dict()`` a published version holds: the HF model."""
        return self.model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, past_key_values=None, logits_to_keep: int = 0,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids: [B, S] → logits [B, S or logits_to_keep, V] (fp32 on the model's device).

        return_hidden: also the final-norm hidden states [B, S or logits_to_keep, H] the head read.
        """
        if self.shortlist is None and not return_hidden:
            out = self.model(input_ids=input_ids, past_key_values=past_key_values, use_cache=past_key_values is not None,
                             logits_to_keep=logits_to_keep)
            return out.logits.float()
        hidden = self.model.get_decoder()(input_ids=input_ids, past_key_values=past_key_values,
                                          use_cache=past_key_values is not None).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits_from_hidden(hidden)
        return (logits, hidden) if return_hidden else logits


def load_shortlist(path: str) -> torch.Tensor:
    """A JSON list of token ids → [K] int64."""
    try:
        ids = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the draft shortlist {path!r} (a JSON list of token ids): {e}") from e
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise ModelLoadError(f"draft shortlist {path!r} must be a non-empty JSON list of token ids")
    return torch.tensor(ids, dtype=torch.long)


def check_same_vocabulary(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ModelLoadError(
            f"draft vocabulary ({dv} tokens) differs from the target's ({tv}); speculative decoding "
            "needs a draft that shares the target's tokenizer"
        )


def build_draft(target: PreTrainedModel, draft: str | None = None, draft_layers: int | list[int] = 2,
                shortlist: torch.Tensor | None = None, eagle_layers: list[int] | None = None) -> DraftModel:
    """The default self-draft, an eagle head over the target's hidden states, or any HF causal LM
    sharing the target's tokenizer."""
    if draft == "eagle":
        from osd.decoding.eagle import EagleHead  # local: the eagle module builds on this one

        return EagleHead(target, eagle_layers, shortlist)
    if draft is None or draft == "self":
        model = build_self_draft(target, draft_layers)
    else:
        model = load_causal_lm(draft, device=target.device, dtype=target.dtype)
        check_same_vocabulary(target, model)
    return DraftModel(model, shortlist)


# ---- a published draft version: the draft's weights, plus SpecDec++'s acceptance head when it has one

ACCEPTANCE_HEAD_PREFIX = "acceptance_head."  # head tensors ride in the same safetensors file under this prefix
# The shortlist a trainer grew from traffic rides along as [K] int64 token ids: a version's head is
# served through the shortlist it was gated with. K varies from version to version.
SHORTLIST_KEY = "shortlist"


def published_state_dict(draft: DraftModel) -> dict[str, torch.Tensor]:
    """What a trainer publishes for ``draft`` (a DraftModel or an EagleHead): its own weights
    (``published_module``), its shortlist if it has one, and the acceptance head's weights if attached."""
    state = {k: v.detach() for k, v in draft.published_module.state_dict().items()}
    if draft.shortlist is not None:
        state[SHORTLIST_KEY] = draft.shortlist.detach()
    if draft.acceptance_head is not None:
        state |= {ACCEPTANCE_HEAD_PREFIX + k: v.detach() for k, v in draft.acceptance_head.state_dict().items()}
    return state


def published_specs(template: DraftModel, names) -> dict[str, tuple[list[int], torch.dtype]]:
    """name -> (shape, dtype) a published version must match to load into ``template``'s construction.

    ``names``: the version's tensors (a manifest's name -> (shape, dtype) or a state dict). A version
    with a head must carry exactly the head's tensors; a shortlist may have any length (its ids are
    checked when it loads).
    """
    from osd.decoding.stopping import AcceptanceHead  # local: stopping is the drafting side

    specs = {k: (list(v.shape), v.dtype) for k, v in template.published_module.state_dict().items()}
    if any(name.startswith(ACCEPTANCE_HEAD_PREFIX) for name in names):
        head = AcceptanceHead(template.config.hidden_size)
        specs |= {ACCEPTANCE_HEAD_PREFIX + k: (list(v.shape), v.dtype) for k, v in head.state_dict().items()}
    if SHORTLIST_KEY in names:
        entry = names[SHORTLIST_KEY]
        shape = list(entry.shape) if isinstance(entry, torch.Tensor) else list(entry[0])
        specs[SHORTLIST_KEY] = (shape[:1], torch.int64)  # any length, one dimension
    return specs


def load_published_state(template: DraftModel, state: dict[str, torch.Tensor]) -> DraftModel:
    """A fresh eval-mode copy of ``template`` (same construction) holding ``state``: its weights, its
    shortlist (else the template's) and its acceptance head (else none).

    Raises RuntimeError (from load_state_dict) when names or shapes do not fit, ValueError when the
    shortlist holds ids outside the vocabulary or an eagle version read other target layers.
    """
    from osd.decoding.stopping import AcceptanceHead

    weights = {k: v for k, v in state.items() if not k.startswith(ACCEPTANCE_HEAD_PREFIX) and k != SHORTLIST_KEY}
    head_state = {k[len(ACCEPTANCE_HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(ACCEPTANCE_HEAD_PREFIX)}
    draft = copy.deepcopy(template)  # an eagle head's copy still borrows the target's embedding and LM head
    draft.published_module.load_state_dict(weights, strict=True)
    layers = getattr(template, "feature_layer_ids", None)
    if layers is not None and not torch.equal(draft.feature_layer_ids.cpu(), layers.cpu()):
        raise ValueError(f"this eagle version reads target layers {draft.feature_layer_ids.tolist()}, the replica's "
                         f"head reads {layers.tolist()} (models.eagle_layers)")
    if SHORTLIST_KEY in state:
        draft.set_shortlist(state[SHORTLIST_KEY])
    draft.acceptance_head = None  # a version without a head must not keep the template's
    if head_state:
        device = next(template.parameters()).device
        draft.acceptance_head = AcceptanceHead(template.config.hidden_size).to(device)
        draft.acceptance_head.load_state_dict(head_state, strict=True)
    return draft.eval().requires_grad_(False)


def build_draft_template(models: ModelConfig) -> DraftModel:
    """The draft as a replica builds it (same construction, so registry drafts fit), without keeping the target."""
    if models.draft == "none":
        raise ValueError("the trainer needs a draft to distil: set models.draft to 'self' or a model, not 'none'")
    target = load_target(models, layout=False)  # the replica's dtype ("auto" resolved the same way)
    shortlist = load_shortlist(models.shortlist) if models.shortlist else None
    draft = build_draft(target, models.draft, models.draft_layers, shortlist, models.eagle_layers)
    del target  # an eagle head keeps only the target's embedding and LM head, which it borrows
    return draft
