"""Token-tree speculative decoding: draft a tree, verify it in one target forward.

Same models, tokenizer, sampling and outputs as `SpeculativeEngine` (a `Generation` with
stats and a training record); the round differs. Build it from a chain engine with
`TreeSpeculativeEngine.from_engine(engine, TreeConfig(...))`.

A round:
  1. Draft (TreeDrafter): catch the draft's cache up on the committed tokens (one
     forward that also gives q at the root), then one batched draft forward per depth
     over that depth's expanded nodes, with a tree mask over the draft's own cache.
     Static trees expand every node with fixed branching per depth; dynamic trees
     (DySpec / EAGLE-2) expand the top-k nodes by estimated path probability (the product
     of draft probabilities along the path), give each one top-k children, and keep the
     best `budget` nodes. The budget is chosen per round from the measured verification
     cost curve (`choose_budget`); growth stops early when one more draft forward cannot
     pay for itself. The draft cache is cropped back
     to the committed tokens after the round.
  2. Verify: one target forward over all tree nodes with the 4-D additive tree mask and
     `position_ids = L + depth`, then the lossless tree rule of osd/decoding/tree.py.
  3. Commit: the accepted path's KV entries are gathered into place after the committed
     prefix and the rest is cropped, so between rounds the target cache holds every
     committed token but the pending one, exactly as in the chain engine (asserted).

Losslessness under sampling (`sampled_children`):
  - "draw" (default): children are drawn from q without replacement and verified by
    recursive rejection sampling with q renormalised after each rejected sibling. A
    child's existence must not depend on its own token (osd/decoding/tree.py), so static trees fix
    the branching, and dynamic trees score child *slots* by the parent's score times q's
    j-th largest probability (not the drawn token's) and cut each depth's slots before
    drawing; nothing is removed afterwards.
  - "top": q's top-k tokens, verified as point masses (sample from p, descend if the
    sample is a child). Any tree built from draft information alone is lossless this way,
    so dynamic trees get EAGLE-2's global rerank. Greedy decoding always uses top-k
    children and follows the target's argmax down the tree.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from osd.config import EngineConfig, SamplingParams, TreeConfig
from osd.data.records import DraftRound
from osd.decoding.calibration import AcceptanceCalibration
from osd.decoding.cost import (
    best_rate,
    choose_budget,
    measure_verification_cost,
    verification_cost,
)
from osd.decoding.drafting import crop_cache
from osd.decoding.eagle import EagleHead
from osd.decoding.engine import SpecStats, SpeculativeEngine, Teacher
from osd.decoding.kv_cache import KVCacheKind, gather_cache, make_cache
from osd.decoding.sampling import warp_probs
from osd.decoding.suffix import Candidate, SuffixProposer
from osd.decoding.tree import (
    TokenTree,
    TreeVerdict,
    optimal_acceptance_bounds,
    tree_attention_mask,
    tree_position_ids,
    verify_tree_greedy,
    verify_tree_sampled,
)
from osd.decoding.verification import overlap
from osd.models.drafts import DraftModel

TREE_ATTENTION = ("sdpa", "eager")  # implementations that honour a custom 4-D additive mask


@dataclass
class TreeStats(SpecStats):
    """SpecStats plus the tree's own accounting. `proposed` counts tree nodes (root excluded).

    node_trials / node_accepts: verified nodes with children (on the accepted path) and how
    many of them accepted a child; their ratio is the achieved per-node acceptance, which
    α* (the multi-draft bound for the same nodes) caps in expectation.
    elapsed_s excludes analysis_s (the α* computation, which serving would not run).
    """

    node_trials: int = 0
    node_accepts: int = 0
    alpha_star_sum: float = 0.0  # Σ α* (the upper end of optimal_acceptance_bounds: exact unless q's tail is cut)
    alpha_star_low_sum: float = 0.0  # Σ of the lower ends; equal to alpha_star_sum when every α* was exact
    alpha_star_count: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    budgets: list[int] = field(default_factory=list)  # tree size (root excluded) of every round
    accepted_draft_only: int = 0  # accepted tokens only the draft proposed
    accepted_suffix_only: int = 0  # accepted tokens only a suffix index proposed
    accepted_both: int = 0  # accepted tokens both proposed
    draft_rounds: int = 0  # rounds the draft ran in (with suffix candidates it may sit a round out)

    def accepted_by_source(self) -> dict[str, int]:
        return {"draft": self.accepted_draft_only, "suffix": self.accepted_suffix_only, "both": self.accepted_both}

    @property
    def node_acceptance(self) -> float | None:
        return self.node_accepts / self.node_trials if self.node_trials else None

    @property
    def alpha_star(self) -> float | None:
        return self.alpha_star_sum / self.alpha_star_count if self.alpha_star_count else None

    @property
    def alpha_star_low(self) -> float | None:
        return self.alpha_star_low_sum / self.alpha_star_count if self.alpha_star_count else None

    @property
    def tokens_per_target_forward(self) -> float:
        return self.output_tokens / self.target_forwards if self.target_forwards else 0.0

    def as_dict(self) -> dict:
        return {**super().as_dict(), "node_trials": self.node_trials, "node_accepts": self.node_accepts,
                "node_acceptance": self.node_acceptance, "alpha_star": self.alpha_star,
                "alpha_star_low": self.alpha_star_low,
                "tokens_per_target_forward": self.tokens_per_target_forward, "draft_s": self.draft_s,
                "verify_s": self.verify_s, "analysis_s": self.analysis_s,
                "mean_tree_nodes": sum(self.budgets) / len(self.budgets) if self.budgets else 0.0,
                "accepted_by_source": self.accepted_by_source(),
                "draft_rounds": self.draft_rounds}


# ---- drafting -------------------------------------------------------------------------------------


def draft_forward(draft: DraftModel, ids: torch.Tensor, cache: DynamicCache, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, keep: int = 0) -> torch.Tensor:
    """ids: [1, s] → fp32 logits [s or keep, V]: DraftModel.forward plus a mask and positions (same shortlist rule)."""
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache, use_cache=True)
    if draft.shortlist is None:
        return draft.model(input_ids=ids, logits_to_keep=keep, **kwargs).logits[0].float()
    hidden = draft.model.model(input_ids=ids, **kwargs).last_hidden_state[0, -keep:]  # [s or keep, H]
    return draft.logits_from_hidden(hidden)  # the one place the "q = 0 outside the shortlist" rule lives


def _draw_children(q: torch.Tensor, m: int, drawn: bool, generator: torch.Generator | None) -> torch.Tensor:
    """q: [V] → up to m child tokens [≤ m] in draw order (never a token with q = 0).

    drawn: the first m draws without replacement (Gumbel-top-k: the order of log q + Gumbel
    noise is the sequential draw order); else q's top m tokens.
    """
    m = min(m, int((q > 0).sum()))
    if not drawn:
        return torch.topk(q, m).indices
    u = torch.rand(q.shape, generator=generator, device=q.device).clamp(min=torch.finfo(q.dtype).tiny)
    keys = torch.where(q > 0, q.log() - (-u.log()).log(), torch.full_like(q, float("-inf")))
    return torch.topk(keys, m).indices


DRAFT, SUFFIX = 1, 2  # node source bits: proposed by the draft, by a suffix index (both: 3)


class DraftGain:
    """What running the draft adds to a round that has suffix candidates, learnt across rounds and requests.

    In a fused tree the draft runs only when its expected extra accepted tokens pay for its
    time and the larger verification (a probe every `interval` rounds, from `probe_every` and
    doubling up to `max_probe_every` while probes find nothing, keeps the estimates up with a
    draft that improves). With no suffix candidate the comparison is against plain
    decoding, so a draft that does not pay yet costs only its probes. A decision from past
    rounds only: trees stay lossless. One per draft object, so a swapped-in draft starts fresh.
    """

    def __init__(self, probe_every: int = 16, max_probe_every: int = 256, decay: float = 0.9):
        self.tokens = 0.0  # EMA of accepted tokens only the draft proposed, per round it ran
        self.nodes = 0.0  # EMA of the draft's nodes in the tree, per round it ran
        self.ms = 0.0  # EMA of the draft's time per round it ran, catching up included (0 until measured)
        self.skipped = 0
        self.interval = probe_every  # rounds between probes: doubles while probes find nothing
        self.probe_every, self.max_probe_every, self.decay = probe_every, max_probe_every, decay

    def observe(self, draft_only_accepted: int, draft_nodes: int, draft_ms: float) -> None:
        # A probe that adds nothing makes the next one twice as rare (a probe can cost several target
        # forwards: the draft first catches up on everything since it last ran); one that adds resets it.
        self.interval = self.probe_every if draft_only_accepted else min(self.max_probe_every, 2 * self.interval)
        d = self.decay
        if self.ms == 0.0:  # the first measurement starts the averages
            self.tokens, self.nodes, self.ms = float(draft_only_accepted), float(draft_nodes), draft_ms
        else:
            self.tokens = d * self.tokens + (1 - d) * draft_only_accepted
            self.nodes = d * self.nodes + (1 - d) * draft_nodes
            self.ms = d * self.ms + (1 - d) * draft_ms

    def describe(self) -> dict:
        """The estimates, for /health."""
        return {"draft_only_tokens_per_round": self.tokens, "draft_nodes": self.nodes, "draft_ms": self.ms,
                "probe_every": self.interval}

    def pays(self, scores: list[float], curve: Mapping[int, float], max_nodes: int) -> bool:
        """scores: the suffix candidates' (maybe none). Run the draft this round?"""
        if self.ms == 0.0:
            return True  # not measured yet
        scores = sorted(scores, reverse=True)
        n = choose_budget(scores, curve)
        now = (1.0 + sum(scores[:n])) / verification_cost(curve, n + 1)
        with_draft = min(max_nodes, n + round(self.nodes))
        hope = (1.0 + sum(scores[:n]) + self.tokens) / (verification_cost(curve, with_draft + 1) + self.ms)
        self.skipped = 0 if hope > now else self.skipped + 1
        if self.skipped >= self.interval:  # a probe
            self.skipped = 0
            return True
        return self.skipped == 0


class TreeDrafter:
    """One request's tree growth: the draft's candidates and, when on, the suffix indexes', in one tree.

    Between rounds the draft cache holds committed tokens only. Either source may be absent.
    """

    def __init__(self, draft: DraftModel | None, config: TreeConfig, cost_curve: Mapping[int, float] | None = None,
                 calibration: AcceptanceCalibration | None = None, kv_cache: KVCacheKind = "preallocated",
                 proposer: SuffixProposer | None = None, gain: DraftGain | None = None, vocab_size: int | None = None):
        self.draft = draft
        self.vocab_size = vocab_size or int(draft.config.vocab_size)  # q rows span the target's vocabulary
        self.config = config
        self.cost_curve = cost_curve
        self.calibration = calibration
        self.proposer = proposer
        self.gain = gain or DraftGain()
        self.cache = make_cache(draft.config, kv_cache) if draft is not None else None
        self.device = next(draft.parameters()).device if draft is not None else None
        self.draft_ran = False  # in the last round
        self.candidates: dict[int, Candidate] = {}  # last tree's node → the suffix candidate it came from

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def target_rows(self, count: int, at: list[int] | None = None) -> None:
        """The target's last forward committed ``count`` positions (rows ``at`` of it, else its first
        ``count``); the tree's sources read tokens only (an eagle head's tree reads them: eagle_tree.py)."""

    def rollback(self, committed: int) -> None:
        """Drop the tree nodes: keep cache entries for the `committed` tokens known before the round."""
        if self.cache is not None:
            crop_cache(self.cache, min(self.cached, committed))
        assert self.cached <= committed, "draft cache holds uncommitted tokens"

    @torch.inference_mode()
    def build(self, tokens: list[int], params: SamplingParams, generator: torch.Generator | None,
              max_depth: int, device: torch.device | None = None) -> tuple[TokenTree, float]:
        """tokens: every committed token (the last is the root) → (tree, drafting ms). device: where the tree's
        tensors go (the target's; default the draft's)."""
        start = time.perf_counter()
        device = device or self.device
        self._tokens, self._parents, self._depths, self._scores = [tokens[-1]], [-1], [0], [1.0]
        self._sources, self._node_of, self._from_index = [0], {}, {}
        self._q: dict[int, torch.Tensor] = {}
        self._slot = {0: len(tokens) - 1}
        self._committed = self._entries_before_round(tokens)
        self._params, self._generator = params, generator
        if self.proposer is not None:
            self._add_candidates(self.proposer.candidates(tokens, max_depth))
        self.draft_ran = self.draft is not None and self._draft_pays()
        if self.draft_ran:
            self._q[0] = self._dist(self._catch_up(tokens))[0]
            self._step_ms = (time.perf_counter() - start) * 1000
            if self.config.shape == "static":
                keep = self._grow_static(max_depth)
            else:
                keep = self._grow_dynamic(min(max_depth, self.config.max_depth), start)
        else:
            keep = self._rerank(start)
        draft_ms = (time.perf_counter() - start) * 1000
        return self._tree(keep, device), draft_ms

    def _entries_before_round(self, tokens: list[int]) -> int:
        """Draft cache entries every node sees (the committed past, root included): one per committed token."""
        return len(tokens)

    def _catch_up(self, tokens: list[int]) -> torch.Tensor:
        """Feed the committed tokens the draft cache lacks → the root's logits [1, V]."""
        feed = torch.tensor([tokens[self.cached:]], device=self.device)
        return draft_forward(self.draft, feed, self.cache, keep=1)

    def _forward_nodes(self, nodes: list[int], ids: torch.Tensor, mask: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        """ids: [1, n] the nodes' tokens, mask: [1, 1, n, cached + n], positions: [1, n] → logits [n, V]."""
        return draft_forward(self.draft, ids, self.cache, mask, positions)

    def _add_candidates(self, candidates: list[Candidate]) -> None:
        """Suffix candidates (parents first) as deterministic nodes."""
        node_of_path: dict[tuple[int, ...], int] = {(): 0}
        for cand in candidates:
            node = self._add(node_of_path[cand.path[:-1]], cand.path[-1], cand.score, SUFFIX)
            node_of_path[cand.path] = node
            self._from_index[node] = cand

    def _draft_pays(self) -> bool:
        """Draft-only trees always run the draft; fused trees ask what the draft has been adding (DraftGain)."""
        if self.proposer is None or self.cost_curve is None:
            return True
        return self.gain.pays(self._scores[1:], self.cost_curve, self.config.max_nodes)

    def _dist(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [N, V] → q [N, V]: warped like p under sampling; the temperature-1 softmax under greedy."""
        return logits.softmax(-1) if self._params.greedy else warp_probs(logits, self._params)

    def _drawn(self) -> bool:
        """Children drawn from q? Never with suffix candidates: mixed sources are all point masses."""
        return not self._params.greedy and self.config.sampled_children == "draw" and self.proposer is None

    def _add(self, parent: int, token: int, score: float, source: int = DRAFT) -> int:
        """A child of `parent`; the same token under the same parent from another source merges into one node."""
        node = self._node_of.get((parent, token))
        if node is not None:
            self._scores[node] = max(self._scores[node], score)
            self._sources[node] |= source
            return node
        self._tokens.append(token)
        self._parents.append(parent)
        self._depths.append(self._depths[parent] + 1)
        self._scores.append(score)
        self._sources.append(source)
        node = self._node_of[(parent, token)] = len(self._tokens) - 1
        return node

    def _expand(self, nodes: list[int]) -> None:
        """One batched draft forward over `nodes` (all at one depth, ancestors already fed) → their q."""
        t0 = time.perf_counter()
        cached = self.cached
        allowed = torch.zeros(len(nodes), cached + len(nodes), dtype=torch.bool, device=self.device)
        allowed[:, : self._committed] = True  # the committed past, root included
        for row, node in enumerate(nodes):
            parent = self._parents[node]
            while parent > 0:
                allowed[row, self._slot[parent]] = True
                parent = self._parents[parent]
            allowed[row, cached + row] = True
            self._slot[node] = cached + row
        dtype = next(self.draft.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, torch.finfo(dtype).min)
        ids = torch.tensor([[self._tokens[n] for n in nodes]], device=self.device)
        positions = torch.tensor([[self._committed - 1 + self._depths[n] for n in nodes]], device=self.device)
        q = self._dist(self._forward_nodes(nodes, ids, mask[None, None], positions))  # [len(nodes), V]
        for row, node in enumerate(nodes):
            self._q[node] = q[row]
        self._step_ms = (time.perf_counter() - t0) * 1000

    def _slot_values(self, node: int, m: int) -> list[float]:
        """Scores of `node`'s first m child slots: its score times the j-th largest q (calibrated).

        For top-k children that is the child's own (estimated) path probability; for drawn
        children it is a proxy that does not look at the drawn token, which keeps slot
        selection lossless.
        """
        q = self._q[node]
        top = torch.topk(q, min(m, int((q > 0).sum()))).values
        accept = self.calibration(top) if self.calibration is not None else top.double()
        return [self._scores[node] * v for v in accept.tolist()]

    def _children(self, node: int, m: int, drawn: bool) -> list[int]:
        picked = _draw_children(self._q[node], m, drawn, self._generator).tolist()
        return [self._add(node, t, v) for t, v in zip(picked, self._slot_values(node, len(picked)))]

    def _grow_static(self, max_depth: int) -> list[int]:
        frontier, drawn = [0], self._drawn()
        for depth, branching in enumerate(self.config.branching[:max_depth]):
            if depth > 0:
                self._expand(frontier)
            frontier = [c for node in frontier for c in self._children(node, branching, drawn)]
        return list(range(len(self._tokens)))

    def _grow_dynamic(self, max_depth: int, start: float) -> list[int]:
        """EAGLE-2-style growth: per depth, expand the top-k frontier, give each its top-k child slots.

        Deterministic children: every slot becomes a candidate; the best `budget` candidates
        overall are kept at the end. Drawn children: a slot's existence must not depend on the
        token drawn into it, so each depth's slots are cut *before* drawing (by slot value,
        with the cost curve deciding how many pay off) and nothing is removed afterwards.
        """
        cfg, curve, drawn = self.config, self.cost_curve, self._drawn()
        frontier = [0]
        for depth in range(max_depth):
            if depth > 0:
                if cfg.budget is None and curve is not None and not self._worth_deeper(frontier, start):
                    break
                if cfg.budget is not None and self._budget_full(frontier):
                    break
                self._expand(frontier)
            slots = sorted(((v, f, j) for f in frontier for j, v in enumerate(self._slot_values(f, cfg.top_k))),
                           key=lambda s: (-s[0], s[1], s[2]))
            if drawn:
                # A child's slots are a prefix (values fall with j), so counting per parent is enough.
                slots = slots[: self._level_budget([s[0] for s in slots], start)]
            created = [c for f in frontier for c in self._children(f, sum(1 for s in slots if s[1] == f), drawn)]
            if not created:
                break
            frontier = sorted(created, key=lambda c: (-self._scores[c], c))[: cfg.top_k]
        if drawn:
            return list(range(len(self._tokens)))
        return self._rerank(start)

    def _rerank(self, start: float) -> list[int]:
        """The best nodes of every source under one budget. A child never outscores its parent and ties
        go to the lower index, so the kept set is closed under parents."""
        cfg, curve = self.config, self.cost_curve
        ranked = sorted(range(1, len(self._tokens)), key=lambda c: (-self._scores[c], c))[: cfg.max_nodes]
        if cfg.budget is not None:
            n = min(cfg.budget, len(ranked))
        elif curve is not None:
            n = choose_budget([self._scores[c] for c in ranked], curve, (time.perf_counter() - start) * 1000)
        else:
            n = len(ranked)
        return [0] + sorted(ranked[:n])

    def _worth_deeper(self, frontier: list[int], start: float) -> bool:
        """Could one more draft forward pay off? Best case: each frontier node's children carry all its mass."""
        spent = (time.perf_counter() - start) * 1000
        now = best_rate(self._scores[1:], self.cost_curve, spent)
        hope = best_rate(self._scores[1:] + [self._scores[f] for f in frontier], self.cost_curve, spent + self._step_ms)
        return hope > now

    def _budget_full(self, frontier: list[int]) -> bool:
        """Fixed budget: no deeper node can enter the best `budget` (children never outscore parents)."""
        scores = sorted(self._scores[1:], reverse=True)
        budget = min(self.config.budget, self.config.max_nodes)
        if len(scores) < budget:
            return False
        # Drawn children are never reranked away, so a full tree is final.
        return self._drawn() or budget == 0 or max(self._scores[f] for f in frontier) <= scores[budget - 1]

    def _level_budget(self, values: list[float], start: float) -> int:
        """How many of this depth's slots (values descending) to add to the tree built so far."""
        size, cap = len(self._tokens) - 1, self.config.max_nodes
        if self.config.budget is not None:
            cap = min(cap, self.config.budget)
        values = values[: max(0, cap - size)]
        if self.config.budget is not None or self.cost_curve is None:
            return len(values)
        spent = (time.perf_counter() - start) * 1000
        expected, best_n, best = 1.0 + sum(self._scores[1:]), 0, 0.0
        for n in range(len(values) + 1):
            rate = (expected + sum(values[:n])) / (spent + verification_cost(self.cost_curve, size + n + 1))
            if rate > best:
                best_n, best = n, rate
        return best_n

    def _tree(self, keep: list[int], device: torch.device) -> TokenTree:
        """The kept nodes (sorted, closed under parents) re-indexed into a TokenTree."""
        new = {old: i for i, old in enumerate(keep)}
        if self._q:
            q = torch.zeros(len(keep), self.vocab_size, device=device)
            for old, i in new.items():
                if old in self._q:
                    q[i] = self._q[old]
        else:  # suffix nodes only: no draft distribution anywhere (a read-only view, no [n, V] fill)
            q = torch.zeros(1, self.vocab_size, device=device).expand(len(keep), -1)
        self.candidates = {new[old]: cand for old, cand in self._from_index.items() if old in new}
        return TokenTree(
            tokens=torch.tensor([self._tokens[o] for o in keep], device=device),
            parents=torch.tensor([new[self._parents[o]] if o else -1 for o in keep], device=device),
            depths=torch.tensor([self._depths[o] for o in keep], device=device),
            q=q, drawn=self._drawn(),
            scores=torch.tensor([self._scores[o] for o in keep], dtype=torch.float64),
            sources=torch.tensor([self._sources[o] for o in keep], dtype=torch.uint8))


# ---- the engine -----------------------------------------------------------------------------------


class _WarpedRows:
    """p at tree nodes, warped on first use: verification visits only the root path."""

    def __init__(self, logits: torch.Tensor, params: SamplingParams):
        self.logits, self.params, self.rows = logits, params, {}

    def __getitem__(self, node: int) -> torch.Tensor:
        if node not in self.rows:
            self.rows[node] = warp_probs(self.logits[node : node + 1], self.params)[0]
        return self.rows[node]


class TreeSpeculativeEngine(SpeculativeEngine):
    """The chain engine's request handling (validation, stop rules, records) with tree rounds."""

    def __init__(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, draft: DraftModel | None = None,
                 config: EngineConfig | None = None, tree: TreeConfig | None = None,
                 cost_curve: Mapping[int, float] | None = None):
        super().__init__(target, tokenizer, draft, config)
        self.tree_config = tree or self.config.tree or TreeConfig()
        self.cost_curve = dict(cost_curve) if cost_curve else None
        self.calibration = AcceptanceCalibration()  # learnt across requests, like the cost curve
        self.suffix_calibrations: dict = {}  # (index, match length) → AcceptanceCalibration of match fractions
        self._draft_gains: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # draft → DraftGain
        if self.config.suffix is not None and self.tree_config.shape == "static":
            raise ValueError("suffix speculation merges its candidates into a dynamic tree; use TreeConfig(shape='dynamic')")
        for model in (target, getattr(draft, "model", draft)):  # an eagle head is its own model
            impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if model is not None and impl not in TREE_ATTENTION:
                raise ValueError(f"tree decoding needs a custom 4-D attention mask, which attn_implementation={impl!r} "
                                 f"ignores; load the model with attn_implementation='sdpa' or 'eager'")

    @classmethod
    def from_engine(cls, engine: SpeculativeEngine, tree: TreeConfig | None = None,
                    cost_curve: Mapping[int, float] | None = None, measure: bool = True) -> "TreeSpeculativeEngine":
        """Same target, draft, tokenizer and config. A dynamic tree with no fixed budget needs the
        verification cost curve: pass one (ms by new tokens) or let this measure it (a few seconds)."""
        tree = tree or TreeConfig()
        if cost_curve is None and measure and tree.shape == "dynamic" and tree.budget is None:
            cost_curve = measure_verification_cost(engine.target, tree.max_nodes + 1, kv_cache=engine.config.kv_cache)
        return cls(engine.target, engine.tokenizer, engine.draft, engine.config, tree, cost_curve)

    def _depth_cap(self) -> int:
        cfg, suffix = self.tree_config, self.config.suffix
        if cfg.shape == "static":
            return len(cfg.branching)
        return max(cfg.max_depth, suffix.max_depth) if suffix is not None else cfg.max_depth

    def _new_stats(self, prompt_tokens: int) -> TreeStats:
        return TreeStats(accepted_per_position=[0] * self._depth_cap(), prompt_tokens=prompt_tokens)

    def _uses_drafter(self, draft: DraftModel | None) -> bool:
        return draft is not None or self.config.suffix is not None

    def _make_drafter(self, draft: DraftModel | None, cache: DynamicCache, prompt_ids: list[int],
                      cluster: str) -> TreeDrafter:
        proposer = None
        if self.config.suffix is not None:
            proposer = SuffixProposer(self.config.suffix, prompt_ids, self.traffic.get(cluster), self.suffix_calibrations)
        gain = None
        if draft is not None:
            gain = self._draft_gains.setdefault(draft, DraftGain())
        args = (self.tree_config, self.cost_curve, self.calibration, self.config.kv_cache, proposer, gain,
                int(self.target.config.vocab_size))
        if isinstance(draft, EagleHead):
            from osd.decoding.eagle_tree import EagleTreeDrafter  # it builds on this module

            return EagleTreeDrafter(draft, self._feature_capture(draft.feature_layers), *args,
                                    keep_features=self._sample_features())
        return TreeDrafter(draft, *args)

    def warm_up(self, max_tokens: int = 8) -> float:
        """SpeculativeEngine.warm_up, then forget what it taught: cold timings and a synthetic prompt would
        mislead the draft's gain estimate and the suffix calibrations."""
        seconds = super().warm_up(max_tokens)
        self._draft_gains.clear()
        self.suffix_calibrations.clear()
        return seconds

    def draft_gain(self, draft: DraftModel) -> DraftGain | None:
        """What `draft` has been adding to fused trees (None before its first request)."""
        return self._draft_gains.get(draft)

    def _round_rows(self) -> int:
        """The most rows one tree forward appends to the target cache: the whole tree, root included."""
        cfg, size, level = self.tree_config, 0, 1
        if cfg.shape == "dynamic":
            return cfg.max_nodes + 1
        for b in cfg.branching:
            level *= b
            size += level
        return size + 1

    def _round(self, tokens: list[int], out_len: int, cache: DynamicCache, drafter: TreeDrafter | None,
               params: SamplingParams, generator: torch.Generator, teacher: Teacher,
               stats: TreeStats) -> tuple[list[int], DraftRound | None]:
        """One tree per round: draft it, verify it in one target forward, keep the accepted path's KV."""
        depth = min(self._depth_cap(), params.max_tokens - out_len - 1) if drafter else 0
        if depth > 0:
            tree, draft_ms = drafter.build(tokens, params, generator, depth, self.device)
            stats.draft_s += draft_ms / 1000
        else:
            tree, draft_ms = TokenTree.root_only(tokens[-1], self.target.config.vocab_size, self.device), 0.0
        new_tokens, verdict = self._verify_tree(tokens, cache, tree, params, generator, teacher, stats)
        if drafter is not None:
            drafter.target_rows(len(new_tokens), at=[0, *verdict.path])  # the committed path's rows of the forward
            drafter.rollback(len(tokens))
        if tree.size == 1:
            return new_tokens, None
        self._learn(drafter, tree, verdict, params, stats, draft_ms)
        if not drafter.draft_ran:
            return new_tokens, None  # suffix candidates only: the record's rounds describe the draft
        path = verdict.path
        kids = tree.children(path[-1] if path else 0)
        # What the draft proposed along the committed path, up to the first rejected child.
        proposed = tree.tokens[path + kids[:1]].tolist()
        return new_tokens, DraftRound(out_len, proposed, verdict.num_accepted)

    def _tree_forward(self, tree: TokenTree, cache: DynamicCache) -> torch.Tensor:
        """All tree nodes in one target forward on top of the cache → fp32 logits [n, V]."""
        past = cache.get_seq_length()
        out = self.target(input_ids=tree.tokens[None], attention_mask=tree_attention_mask(tree.parents, past, self.target.dtype),
                          position_ids=tree_position_ids(tree.depths, past), past_key_values=cache, use_cache=True,
                          logits_to_keep=tree.size)
        return out.logits[0].float()

    def _verify_tree(self, tokens: list[int], cache: DynamicCache, tree: TokenTree, params: SamplingParams,
                     generator: torch.Generator, teacher: Teacher, stats: TreeStats) -> tuple[list[int], TreeVerdict]:
        t0 = time.perf_counter()
        past = len(tokens) - 1
        logits = self._tree_forward(tree, cache)  # [n, V]
        stats.target_forwards += 1
        if params.greedy:
            verdict = verify_tree_greedy(tree, logits.argmax(-1))
        else:
            target_probs = _WarpedRows(logits, params)
            uniforms = torch.rand(tree.size, generator=generator, device=self.device)
            verdict = verify_tree_sampled(tree, target_probs, uniforms, generator)
        keep = [0] + verdict.path
        gather_cache(cache, past, keep)
        new_tokens = [*tree.tokens[verdict.path].tolist(), verdict.next_token]  # row keep[i] chose new_tokens[i]
        teacher.add(logits[keep], new_tokens)
        stats.verify_s += time.perf_counter() - t0
        if tree.size > 1:
            self._tree_stats(tree, verdict, logits, params, stats)
        return new_tokens, verdict

    def _tree_stats(self, tree: TokenTree, verdict: TreeVerdict, logits: torch.Tensor, params: SamplingParams,
                    stats: TreeStats) -> None:
        stats.rounds += 1
        stats.proposed += tree.size - 1
        stats.accepted += verdict.num_accepted
        stats.budgets.append(tree.size - 1)
        for i in range(verdict.num_accepted):
            if i >= len(stats.accepted_per_position):
                stats.accepted_per_position.append(0)
            stats.accepted_per_position[i] += 1
        # Verified nodes: those on the committed path that had children (their context is committed).
        verified = [n for n in [0] + verdict.path if tree.children(n)]
        stats.node_trials += len(verified)
        stats.node_accepts += verdict.num_accepted
        drafted = [n for n in verified if tree.sources is None or bool(tree.q[n].any())]  # nodes the draft ran at
        if drafted:
            rows = logits[drafted]
            p_beta = rows.softmax(-1) if params.greedy else warp_probs(rows, params)  # temperature-1 p under greedy, as α̂ is
            stats.beta_sum += float(overlap(p_beta, tree.q[drafted]).sum())
            stats.beta_count += len(drafted)
        rows = logits[verified]
        if self.tree_config.alpha_star:
            t0 = time.perf_counter()
            p_rule = warp_probs(rows, params)  # what the rule verifies against: one-hot under greedy
            for row, node in enumerate(verified):
                kids = tree.tokens[tree.children(node)]
                if tree.drawn:
                    low, high = optimal_acceptance_bounds(p_rule[row], tree.q[node], k=len(kids))
                else:  # a fixed candidate set S: the best any rule can do is p(S), which point masses reach
                    low = high = float(p_rule[row, kids].sum())
                stats.alpha_star_sum += high
                stats.alpha_star_low_sum += low
                stats.alpha_star_count += 1
            stats.analysis_s += time.perf_counter() - t0

    def _learn(self, drafter: TreeDrafter, tree: TokenTree, verdict: TreeVerdict, params: SamplingParams,
               stats: TreeStats, draft_ms: float) -> None:
        """After a round: calibrate both sources' scores from what was tried and accepted, count who served,
        and update what the draft adds next to suffix candidates."""
        path = set(verdict.path)
        draft_q, draft_hit, suffix_tried = [], [], []
        for node in (n for n in [0] + verdict.path if tree.children(n)):
            kids = tree.children(node)
            hit = [c in path for c in kids]
            if not params.greedy and any(hit):  # sampled: siblings after the accepted one were never tried
                kids, hit = kids[: hit.index(True) + 1], hit[: hit.index(True) + 1]
            if tree.drawn:  # the j-th child fills the j-th slot
                draft_q.extend(torch.topk(tree.q[node], len(kids)).values.tolist())
                draft_hit.extend(hit)
                continue
            for kid, h in zip(kids, hit):
                if tree.sources is None or int(tree.sources[kid]) & DRAFT:
                    draft_q.append(float(tree.q[node, tree.tokens[kid]]))
                    draft_hit.append(h)
                if kid in drafter.candidates:
                    suffix_tried.append((drafter.candidates[kid], h))
        if draft_q:
            self.calibration.update(torch.tensor(draft_q), torch.tensor(draft_hit))
        if drafter.proposer is not None:
            drafter.proposer.observe(suffix_tried)
        sources = [int(tree.sources[n]) if tree.sources is not None else DRAFT for n in verdict.path]
        stats.accepted_draft_only += sum(1 for s in sources if s == DRAFT)
        stats.accepted_suffix_only += sum(1 for s in sources if s == SUFFIX)
        stats.accepted_both += sum(1 for s in sources if s == DRAFT | SUFFIX)
        if drafter.draft_ran:
            stats.draft_rounds += 1
            if drafter.proposer is not None:
                drafted = sum(1 for s in tree.sources.tolist() if s & DRAFT)
                drafter.gain.observe(sum(1 for s in sources if s == DRAFT), drafted, draft_ms)
