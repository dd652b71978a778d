"""A preallocated KV cache: appends write in place, crops move a length, the tree path gather moves a few rows.

Why not transformers' DynamicCache: it appends with ``torch.cat``, so every forward copies the whole cached K/V of
every layer, and a speculative round (one forward over k new tokens, then a crop back) pays that copy every round:
~1.2-1.5 ms of cache work per SmolLM2 forward at 200 cached tokens against ~0.5 ms here (measured on 2 CPU threads;
1-2% of a forward there, growing linearly with the context). Here each layer owns buffers
``[B, kv_heads, capacity, head_dim]``; ``update`` copies only the new positions and hands attention views of the filled
prefix, ``crop`` only moves the length, and capacity doubles when full (the only time old entries are copied).

The cache is a DynamicCache subclass, so transformers' Llama-family models take it as ``past_key_values`` unchanged:
the mask is sized from ``get_seq_length`` + the query length exactly as for DynamicLayer (the views returned by
``update`` have that length), so causal masks, the skipped-mask sdpa path and 4-D custom (tree) masks all see the
same shapes as with DynamicCache. Full-attention layers only (sliding-window or linear-attention configs raise;
use ``make_cache(..., "dynamic")`` for those). For inference: the buffers are overwritten in place, which autograd
cannot replay.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

KVCacheKind = Literal["preallocated", "dynamic"]


class PreallocatedLayer(DynamicLayer):
    """One layer's K/V in buffers [B, kv_heads, capacity, head_dim]; positions [0, length) are live, the rest is
    scratch (allocated uninitialised and never read).

    ``keys`` / ``values`` read as views of the live prefix (what DynamicLayer's callers expect to see); assigning a
    whole tensor to them (what inherited HF helpers such as ``reorder_cache`` or ``offload`` do) adopts it as a full
    buffer, so those helpers stay correct.
    """

    def __init__(self, capacity: int = 0, **kwargs):
        self._k: torch.Tensor | None = None  # [B, kv_heads, capacity, head_dim]
        self._v: torch.Tensor | None = None  # [B, kv_heads, capacity, v_head_dim]
        self.length = 0
        self.capacity_hint = capacity  # positions to reserve at the first write (0: just what it needs)
        super().__init__(**kwargs)  # sets keys = values = None through the setters below

    # -- DynamicLayer's view of the layer ------------------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[..., : self.length, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self.length = 0 if value is None else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[..., : self.length, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value
        self.length = 0 if value is None else value.shape[-2]

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Buffers take the dtype and device of the first states; they are allocated by the first write, sized then.
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    # -- the cache operations -----------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states: [B, kv_heads, s, head_dim], value_states: [B, kv_heads, s, v_head_dim] for the s positions
        after the live ones → views [B, kv_heads, length + s, ·] of everything live, new positions included."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.length
        end = start + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end, key_states, value_states)
        self._k[..., start:end, :].copy_(key_states)
        self._v[..., start:end, :].copy_(value_states)
        self.length = end
        return self._k[..., :end, :], self._v[..., :end, :]

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Reallocate to hold at least `needed` positions: doubling keeps the copies amortised O(1) per token."""
        capacity = max(needed, 2 * self.capacity, self.capacity_hint)
        batch, heads = key_states.shape[:2]
        k = key_states.new_empty((batch, heads, capacity, key_states.shape[-1]))
        v = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        if self.length:
            k[..., : self.length, :].copy_(self._k[..., : self.length, :])
            v[..., : self.length, :].copy_(self._v[..., : self.length, :])
        self._k, self._v = k, v

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """DynamicLayer.crop's contract (a negative count of positions to drop; positive raises), without a copy."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to drop (transformers 5 semantics), got "
                             f"{tokens_to_remove}; crop_cache(cache, length) crops to a length")
        self.length = max(0, self.length + tokens_to_remove)

    def gather(self, past: int, keep: torch.Tensor) -> None:
        """keep: [m] int64 on the buffers' device, increasing offsets from `past` (a tree's root path) → entry
        past + keep[j] moves to past + j and the layer ends at past + m. Only the m kept rows are copied."""
        m = keep.shape[0]
        index = keep + past  # [m]
        # index_select reads into a fresh [B, heads, m, D] before the write, so overlapping rows cannot clobber.
        self._k[..., past : past + m, :] = self._k.index_select(-2, index)
        self._v[..., past : past + m, :] = self._v.index_select(-2, index)
        self.length = past + m

    def reset(self) -> None:
        # Drop the buffers (as DynamicLayer does) rather than zero them: a reset cache may serve another shape.
        self.keys = self.values = None
        self.is_initialized = False

    def get_max_length(self) -> int:
        return -1  # it grows without a bound, like DynamicLayer


class PreallocatedCache(DynamicCache):
    """A DynamicCache whose layers are PreallocatedLayers. `capacity`: positions each layer reserves at its first
    write (e.g. prompt + max_tokens + one round), so a request need not grow; too small only costs a regrowth."""

    def __init__(self, config=None, capacity: int = 0):
        layer = partial(PreallocatedLayer, capacity)
        if config is None:
            Cache.__init__(self, layer_class_to_replicate=layer)  # layers appear as the model first writes them
            return
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ValueError(f"the preallocated KV cache holds full-attention layers only, and this model also has "
                             f"{other} layers; use EngineConfig(kv_cache='dynamic') for it")
        Cache.__init__(self, layers=[layer() for _ in layer_types])


def make_cache(config, kind: KVCacheKind = "preallocated", capacity: int = 0) -> DynamicCache:
    """A fresh KV cache for a model with `config`: ours (`capacity` positions reserved per layer) or DynamicCache."""
    if kind == "dynamic":
        return DynamicCache(config=config)
    if kind == "preallocated":
        return PreallocatedCache(config=config, capacity=capacity)
    raise ValueError(f"kv_cache must be 'preallocated' or 'dynamic', got {kind!r}")


def gather_cache(cache: DynamicCache, past: int, keep: list[int]) -> None:
    """Keep the committed prefix plus the tree nodes `keep` (indices into the n nodes after `past`), in order.

    keep must be increasing (a root path is): entry past + keep[j] moves to past + j, the rest is cropped.
    PreallocatedLayers move the kept rows in place; DynamicLayers do the same on their tensors, then crop.
    """
    for layer in cache.layers:
        if not isinstance(layer, PreallocatedLayer) and type(layer) is not DynamicLayer:
            raise TypeError(f"tree decoding gathers KV entries of full-attention layers only, not {type(layer).__name__}")
    filled = [layer for layer in cache.layers if layer.get_seq_length() > 0]  # a draft-shaped cache may skip some
    if keep != list(range(len(keep))) and filled:
        index = torch.tensor(keep, device=filled[0].keys.device)  # [m]
        for layer in filled:
            if isinstance(layer, PreallocatedLayer):
                layer.gather(past, index)
            else:
                layer.keys[..., past : past + len(keep), :] = layer.keys.index_select(-2, index + past)
                layer.values[..., past : past + len(keep), :] = layer.values.index_select(-2, index + past)
    extra = cache.get_seq_length() - (past + len(keep))
    if extra > 0:
        cache.crop(-extra)
    assert cache.get_seq_length() == past + len(keep), "tree KV gather left the cache at the wrong length"
