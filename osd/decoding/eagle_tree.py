"""Token trees from an eagle head (EAGLE-2's dynamic trees over osd/decoding/eagle.py's head).

The tree machinery is TreeDrafter's (osd/decoding/tree_engine.py): the same growth, rerank,
suffix fusion, budget from the cost curve and lossless verification. What differs is what a
draft cache entry holds. A self-draft's entry is a token; the head's entry j pairs a context
(the target's feature f_j for committed entries, else the head's own output) with the token
x_{j+1}, and its output predicts x_{j+2}. So:

- every node sees the committed entries, one per committed token but the last: the last
  one pairs (f_{L-2}, the root token) and gives the root's q;
- a node's entry pairs its parent's output with its own token (as a chain's later steps
  do), at position L-2+depth;
- after verification the committed path's target features (rows ``[0, *path]`` of the tree
  forward) become the next round's committed entries, and the round's entries are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from osd.config import TreeConfig
from osd.decoding.calibration import AcceptanceCalibration
from osd.decoding.eagle import EagleDrafter, EagleHead, FeatureCapture
from osd.decoding.kv_cache import KVCacheKind
from osd.decoding.suffix import SuffixProposer
from osd.decoding.tree_engine import DraftGain, TreeDrafter


class EagleTreeDrafter(TreeDrafter):
    """One request's trees from an eagle head (and suffix candidates when on)."""

    def __init__(self, head: EagleHead, capture: FeatureCapture, config: TreeConfig,
                 cost_curve: Mapping[int, float] | None = None, calibration: AcceptanceCalibration | None = None,
                 kv_cache: KVCacheKind = "preallocated", proposer: SuffixProposer | None = None,
                 gain: DraftGain | None = None, vocab_size: int | None = None, keep_features: bool = False):
        super().__init__(head, config, cost_curve, calibration, kv_cache, proposer, gain, vocab_size or head.vocab_size)
        # The committed entries and the feature rows waiting for them live in the chain drafter's bookkeeping.
        self.entries = EagleDrafter(head, capture, kv_cache=kv_cache, keep_features=keep_features)
        self.cache = self.entries.cache
        self._outputs: dict[int, torch.Tensor] = {}  # node → the head's output [H] at its entry

    @property
    def kept(self) -> list[torch.Tensor] | None:
        return self.entries.kept

    def features(self, start: int, stop: int) -> torch.Tensor:
        return self.entries.features(start, stop)

    def target_rows(self, count: int, at: list[int] | None = None) -> None:
        self.entries.target_rows(count, at)

    def rollback(self, committed: int) -> None:
        """Drop the round's node entries; the committed path comes back as target rows."""
        self.entries.rollback(committed)

    def _entries_before_round(self, tokens: list[int]) -> int:
        self._has_context = len(tokens) > 1  # a one-token prompt's first round has no entry to draft from
        return len(tokens) - 1

    def _draft_pays(self) -> bool:
        return self._has_context and super()._draft_pays()

    def _catch_up(self, tokens: list[int]) -> torch.Tensor:
        """Feed the waiting target rows → the root's logits [1, V] (and its output, which its children read)."""
        pending = self.entries._pending
        features = torch.cat(pending) if pending else None  # [m, F]
        new = 0 if features is None else features.shape[0]
        done = self.entries.true_entries
        if new == 0 or done + new != len(tokens) - 1:  # every verification commits at least one row
            raise RuntimeError(f"eagle tree drafter out of step: {done} + {new} feature rows for {len(tokens)} "
                               "committed tokens")
        next_ids = torch.tensor([tokens[done + 1:]], device=self.device)  # x_{j+1} for the new entries
        logits, hidden = self.draft(next_ids, features=features[None], past_key_values=self.cache)
        self.entries.true_entries += new
        self.entries._pending = []
        self._outputs = {0: hidden[0, -1]}  # the root's entry: its children read it
        return logits[0, -1:]

    def _forward_nodes(self, nodes: list[int], ids: torch.Tensor, mask: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        parents = torch.stack([self._outputs[self._parents[n]] for n in nodes])[None]  # [1, n, H]
        logits, hidden = self.draft(ids, hidden=parents, past_key_values=self.cache, attention_mask=mask,
                                    position_ids=positions)  # L-2+depth: _entries_before_round counts L-1
        for row, node in enumerate(nodes):
            self._outputs[node] = hidden[0, row]
        return logits[0]
