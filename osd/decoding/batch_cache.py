"""A batched KV cache for continuous batching: one preallocated buffer of slots, each with its own length.

Each layer owns buffers ``[slots, kv_heads, capacity, head_dim]``; slot ``s`` holds one request's K/V at positions
``[0, lengths[s])``. A forward runs over a contiguous *window* of slots (the active ones are kept at the front,
see ``move``) with a ragged plan: row ``i`` feeds ``counts[i]`` real tokens, padded to the widest row. Only real
tokens are written (at ``lengths[i] + j``), so padding never touches any slot's cache, and the 4-D mask from
``attention_mask`` lets row ``i``'s query ``j`` see exactly its own slot's positions ``[0, lengths[i] + j]``.
Rejected proposals are dropped by setting a slot's length back (``set_length``), as PreallocatedCache crops.

Buffers are zero-initialised and only finite values are ever written: masked-out entries still enter the
attention matmul (times a zero weight), and uninitialised memory could hold NaN, which 0 · NaN would spread.

Full-attention layers only, and the model must honour a custom 4-D additive mask (sdpa or eager attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

BATCH_ATTENTION = ("sdpa", "eager")  # implementations that honour a custom 4-D additive mask


@dataclass(frozen=True)
class ForwardPlan:
    """Where one ragged forward's real tokens go. Row i of the input is slot start + i."""

    start: int  # first slot of the window
    counts: tuple[int, ...]  # real tokens per row (0: a row that only pads)
    lengths: tuple[int, ...]  # each row's slot length before the forward
    width: int  # S: the padded row width
    src_row: torch.Tensor  # [R] int64: row of each real token in the input
    src_col: torch.Tensor  # [R] int64: its column
    dst_slot: torch.Tensor  # [R] int64: the slot it is written to
    dst_pos: torch.Tensor  # [R] int64: the position it is written at

    @property
    def rows(self) -> int:
        return len(self.counts)

    @property
    def key_length(self) -> int:
        """Positions the attention views cover: up to the longest row's last real token (at least 1)."""
        return max(1, max(length + count for length, count in zip(self.lengths, self.counts)))


class BatchLayer:
    """One layer's K/V for every slot; allocated at its first write (dtype and head sizes from the states)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: BatchKVCache):
        self.cache = cache
        self.k: torch.Tensor | None = None  # [slots, kv_heads, capacity, head_dim]
        self.v: torch.Tensor | None = None  # [slots, kv_heads, capacity, v_head_dim]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states: [rows, kv_heads, S, head_dim] (value_states alike) for the plan's window → views
        [rows, kv_heads, key_length, ·] of the window's slots, the real new tokens written in place."""
        plan = self.cache.plan
        if plan is None:
            raise RuntimeError("BatchKVCache.begin(...) must plan a forward before the model runs on the cache")
        if self.k is None:
            self._allocate(key_states, value_states)
        # Advanced indices around a slice put the index dimension first: both sides are [R, kv_heads, head_dim].
        self.k[plan.dst_slot, :, plan.dst_pos] = key_states[plan.src_row, :, plan.src_col]
        self.v[plan.dst_slot, :, plan.dst_pos] = value_states[plan.src_row, :, plan.src_col]
        window = slice(plan.start, plan.start + plan.rows)
        end = plan.key_length
        return self.k[window, :, :end], self.v[window, :, :end]

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots, capacity = self.cache.slots, self.cache.capacity
        heads = key_states.shape[1]
        self.k = key_states.new_zeros((slots, heads, capacity, key_states.shape[-1]))
        self.v = value_states.new_zeros((slots, heads, capacity, value_states.shape[-1]))

    def resize(self, slots: int, capacity: int) -> None:
        """Reallocate to [slots, ·, capacity, ·], keeping every slot's entries (the only copy of the whole cache)."""
        if self.k is None:
            return
        old_slots, old_capacity = self.k.shape[0], self.k.shape[2]
        keep_s, keep_c = min(slots, old_slots), min(capacity, old_capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((slots, old.shape[1], capacity, old.shape[3]))
            new[:keep_s, :, :keep_c] = old[:keep_s, :, :keep_c]
            setattr(self, name, new)

    def move(self, src: int, dst: int, length: int) -> None:
        if self.k is not None and length:
            self.k[dst, :, :length] = self.k[src, :, :length]
            self.v[dst, :, :length] = self.v[src, :, :length]


class BatchKVCache(Cache):
    """Slots of per-request K/V, see the module docstring. `slots` and `capacity` grow on demand (``reserve``)."""

    def __init__(self, config, slots: int = 1, capacity: int = 64):
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ValueError(f"the batched KV cache holds full-attention layers only, and this model also has {other} "
                             "layers; serve it with the one-request engine (SpeculativeEngine)")
        impl = getattr(config, "_attn_implementation", None)
        if impl not in BATCH_ATTENTION:
            raise ValueError(f"batched decoding needs a custom 4-D attention mask, which attn_implementation={impl!r} "
                             "ignores; load the model with attn_implementation='sdpa' or 'eager'")
        self.slots = slots
        self.capacity = capacity
        self.lengths = [0] * slots
        self.plan: ForwardPlan | None = None
        super().__init__(layers=[BatchLayer(self) for _ in layer_types])

    def reserve(self, slots: int, capacity: int) -> None:
        """Room for at least `slots` slots of `capacity` positions; grows by doubling (amortised copies)."""
        new_slots = self.slots if slots <= self.slots else max(slots, 2 * self.slots)
        new_capacity = self.capacity if capacity <= self.capacity else max(capacity, 2 * self.capacity)
        if (new_slots, new_capacity) == (self.slots, self.capacity):
            return
        if any(length > new_capacity for length in self.lengths):
            raise ValueError("cannot shrink the KV cache below a slot's length")
        for layer in self.layers:
            layer.resize(new_slots, new_capacity)
        self.lengths += [0] * (new_slots - self.slots)
        self.slots, self.capacity = new_slots, new_capacity

    def set_length(self, slot: int, length: int) -> None:
        """Keep slot's first `length` positions (a crop or a free: nothing is copied)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"slot length {length} outside [0, {self.capacity}]")
        self.lengths[slot] = length

    def move(self, src: int, dst: int) -> None:
        """Slot src's entries become slot dst's (dst's are dropped); src is left empty. Keeps active slots at the
        front, so a window is a plain slice of the buffers and no forward gathers."""
        if src == dst:
            return
        for layer in self.layers:
            layer.move(src, dst, self.lengths[src])
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0

    def begin(self, start: int, counts: list[int], device: torch.device | str) -> ForwardPlan:
        """Plan the next forward over slots [start, start + len(counts)), row i feeding counts[i] real tokens (left
        aligned, padded to the widest); slot lengths advance by their counts once the plan is made."""
        rows = len(counts)
        if start < 0 or start + rows > self.slots:
            raise ValueError(f"window [{start}, {start + rows}) outside the cache's {self.slots} slots")
        lengths = tuple(self.lengths[start + i] for i in range(rows))
        if any(length + count > self.capacity for length, count in zip(lengths, counts)):
            raise ValueError("a slot would outgrow the KV cache; reserve() more capacity first")
        width = max(1, max(counts, default=1))
        src_row = [i for i, c in enumerate(counts) for _ in range(c)]
        src_col = [j for c in counts for j in range(c)]

        def as_tensor(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=device)

        self.plan = ForwardPlan(start, tuple(counts), lengths, width, as_tensor(src_row), as_tensor(src_col),
                                as_tensor([start + i for i in src_row]),
                                as_tensor([lengths[i] + j for i, j in zip(src_row, src_col)]))
        for i, count in enumerate(counts):
            self.lengths[start + i] += count
        return self.plan

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted by models that build their own positions or mask; a batched forward passes both.
        return max(self.lengths, default=0)


def plan_mask(plan: ForwardPlan, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The additive mask [rows, 1, S, key_length]: row i's query j sees its slot's positions [0, lengths[i] + j].

    Padding queries (j >= counts[i]) see what the row's last real token sees, and a row with no real token sees
    position 0, so no query row is fully masked (that would make NaN).
    """
    lengths = torch.tensor(plan.lengths, device=device)[:, None]  # [rows, 1]
    last = (torch.tensor(plan.counts, device=device) - 1)[:, None]  # [rows, 1]
    j = torch.arange(plan.width, device=device)[None, :]  # [1, S]
    bound = (lengths + torch.minimum(j, last)).clamp(min=0)  # [rows, S]: the last position each query sees
    allowed = torch.arange(plan.key_length, device=device)[None, None, :] <= bound[:, :, None]  # [rows, S, K]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def plan_positions(plan: ForwardPlan, device: torch.device | str) -> torch.Tensor:
    """position_ids [rows, S]: lengths[i] + j for real tokens; padding repeats the row's last real position."""
    lengths = torch.tensor(plan.lengths, device=device)[:, None]
    last = (torch.tensor(plan.counts, device=device) - 1).clamp(min=0)[:, None]
    j = torch.arange(plan.width, device=device)[None, :]
    return lengths + torch.minimum(j, last)


def ragged_ids(rows: list[list[int]], width: int, device: torch.device | str, pad: int = 0) -> torch.Tensor:
    """Token rows, left aligned and padded with `pad` to `width` → [len(rows), width] int64."""
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long, device=device)


# ---- forwards over a window of slots ------------------------------------------------------------------


def _inputs(cache: BatchKVCache, start: int, rows: list[list[int]], dtype: torch.dtype, device) -> dict:
    plan = cache.begin(start, [len(row) for row in rows], device)
    return {"input_ids": ragged_ids(rows, plan.width, device), "attention_mask": plan_mask(plan, dtype, device),
            "position_ids": plan_positions(plan, device), "past_key_values": cache, "use_cache": True}


def target_forward(model, cache: BatchKVCache, start: int, rows: list[list[int]], logits: bool = True
                   ) -> torch.Tensor | None:
    """rows[i]: the tokens slot start + i feeds → fp32 logits [len(rows), S, V] at every column (padding columns
    included; callers read each row's first len(rows[i])), or None with logits=False (a prefill)."""
    device = next(model.parameters()).device
    inputs = _inputs(cache, start, rows, model.dtype, device)
    out = model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] if logits else 1)
    return out.logits.float() if logits else None


def draft_forward(draft, cache: BatchKVCache, start: int, rows: list[list[int]]) -> torch.Tensor:
    """rows[i]: the tokens slot start + i feeds → fp32 logits [len(rows), V] after each row's last real token.

    The head runs on those rows only, through DraftModel.logits_from_hidden (where its shortlist rule lives), so a
    long catch-up row costs the decoder, not a head per padded column. A row of no tokens gives garbage logits.
    """
    device = next(draft.parameters()).device
    inputs = _inputs(cache, start, rows, draft.model.dtype, device)
    hidden = draft.model.get_decoder()(**inputs).last_hidden_state  # [rows, S, H]
    last = torch.tensor([max(len(row) - 1, 0) for row in rows], device=device)
    return draft.logits_from_hidden(hidden[torch.arange(len(rows), device=device), last])
