"""Token trees: the data structure, the tree attention mask and the lossless tree rules.

Pure data and rules, no model: the tree engine (osd/decoding/tree_engine.py) builds trees with
the draft and verifies them in one target forward; tests drive the rules exactly.

A tree's node 0 is the *root*: the pending token (committed, not yet in the target's
cache). Every other node is a draft proposal whose context is its root path. Nodes are
in topological order (``parents[i] < i``) and siblings in the order they were drawn, so
"the first child" is the one tried first.

Notation as in osd/decoding/verification.py: p = target, q = draft, both after the same warp.

Greedy rule: walk down from the root, at each node taking the child whose token is the
target's argmax there; the next token is the argmax at the deepest accepted node. The
output is the target's greedy continuation for any tree.

Sampled rule (recursive rejection sampling, SpecInfer; children drawn *without
replacement* as in Jeon et al.'s RSD): at a node with target distribution p and children
c1..cm, try the children in draw order. Child i is proposed by

    q_i = q with c1..c_{i-1} removed, renormalised        (children drawn from q)
    q_i = δ(c_i)                                          (children chosen deterministically)

Accept c_i with probability min(1, p_i(c_i) / q_i(c_i)), where p_1 = p; on rejection set
p_{i+1} = norm(max(0, p_i - q_i)) and try the next child; if all are rejected, sample the
next token from p_{m+1}. Why it is exact (by induction from the last child back):

    Claim: given the history h_i (which siblings were drawn and rejected), the token
    emitted from step i on is distributed as p_i. Step m+1 samples p_{m+1} directly.
    At step i the draw c_i is distributed as q_i given h_i — without replacement, the
    next draw is q renormalised over what is left, whatever coins were thrown; a
    deterministic child is a point mass. So the emitted token x has probability
        Σ_c q_i(c)·[min(1, p_i(c)/q_i(c))·1{x = c} + (1 - min(1, p_i(c)/q_i(c)))·p_{i+1}(x)]
      = min(p_i(x), q_i(x)) + (1 - Σ_c min(p_i(c), q_i(c)))·p_{i+1}(x)
      = min(p_i(x), q_i(x)) + max(0, p_i(x) - q_i(x))  =  p_i(x),
    using that p_{i+1} depends on h_i only (not on which c_i was drawn) and that
    Σ_x max(0, p_i - q_i) = 1 - Σ min(p_i, q_i).

The renormalisation is what makes "c_i ~ q_i given h_i" true; using the plain q for
every sibling (the with-replacement rule) on children drawn without replacement is
wrong, and tests/decoding/test_tree.py's exact enumeration shows it. A rejected c_i has
p_i(c_i) < q_i(c_i), so p_{i+1}(c_i) = 0: a rejected sibling is never emitted later.

Losslessness of the whole tree needs one more condition, which the engine keeps: whether
a child *exists* must not depend on its own token (or on later siblings' tokens). Fixed
branching with drawn children satisfies it; a tree grown by scores must use deterministic
children (point masses), where the rule reduces to "sample x from p; descend if x is a
child" and any tree built from draft information alone is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osd.decoding.verification import residual_distribution


@dataclass
class TokenTree:
    """One round's draft tree. Node 0 is the root (the pending token)."""

    tokens: torch.Tensor  # [n] int64: token of every node; tokens[0] is the pending token
    parents: torch.Tensor  # [n] int64: parent index, parents[0] = -1, parents[i] < i
    depths: torch.Tensor  # [n] int64: depth, depths[0] = 0, depths[i] = depths[parents[i]] + 1
    # [n, V] fp32: the draft's distribution *at* each node, over its children; a node was
    # drawn from q[parents[i]]. Zero rows where the draft never ran (leaves). Warped like p
    # under sampling; the temperature-1 softmax under greedy decoding (used for α̂ only).
    q: torch.Tensor
    drawn: bool = False  # children drawn from q without replacement (True) or chosen deterministically
    scores: torch.Tensor | None = None  # [n] fp64: estimated P(node accepted), a (calibrated) path probability; root 1
    sources: torch.Tensor | None = None  # [n] uint8: who proposed each node, bits DRAFT=1 and SUFFIX=2; root 0

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        assert self.parents.shape == (n,) and self.depths.shape == (n,) and self.q.shape[0] == n, "tree shapes disagree"
        assert n >= 1 and int(self.parents[0]) == -1 and int(self.depths[0]) == 0, "node 0 must be the root"
        if n > 1:
            idx = torch.arange(1, n, device=self.parents.device)
            assert bool((self.parents[1:] < idx).all() and (self.parents[1:] >= 0).all()), "parents must precede children"
            assert bool((self.depths[1:] == self.depths[self.parents[1:]] + 1).all()), "depths disagree with parents"
        self._children: list[list[int]] | None = None

    @classmethod
    def root_only(cls, token: int, vocab: int, device: torch.device | str = "cpu") -> "TokenTree":
        """A tree with no proposals: verifying it is one step of plain decoding."""
        z = torch.zeros(1, dtype=torch.long, device=device)
        return cls(torch.tensor([token], device=device), z - 1, z, torch.zeros(1, vocab, device=device))

    @property
    def size(self) -> int:
        """Number of nodes, root included."""
        return int(self.tokens.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    def children(self, node: int) -> list[int]:
        """Children of `node` in draw order."""
        if self._children is None:
            kids: list[list[int]] = [[] for _ in range(self.size)]
            for i, parent in enumerate(self.parents.tolist()[1:], start=1):
                kids[parent].append(i)
            self._children = kids
        return self._children[node]

    def path(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        out, parents = [], self.parents.tolist()
        while node >= 0:
            out.append(node)
            node = parents[node]
        return out[::-1]


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """parents: [n] int64 (topological) → [n, n] bool, [i, j] = j is i or an ancestor of i."""
    n = parents.shape[0]
    anc = torch.eye(n, dtype=torch.bool, device=parents.device)
    for i, parent in enumerate(parents.tolist()):
        if parent >= 0:
            anc[i] |= anc[parent]
    return anc


def tree_attention_mask(parents: torch.Tensor, past_len: int, dtype: torch.dtype) -> torch.Tensor:
    """parents: [n] → additive mask [1, 1, n, past_len + n] for a forward over the n tree nodes.

    0 where node i may attend — the whole cached past plus its ancestors and itself — and
    the dtype's minimum elsewhere (not -inf: a fully masked row would turn into NaN).
    """
    n = parents.shape[0]
    allowed = torch.cat([torch.ones(n, past_len, dtype=torch.bool, device=parents.device), ancestor_matrix(parents)], 1)
    mask = torch.zeros(n, past_len + n, dtype=dtype, device=parents.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def tree_position_ids(depths: torch.Tensor, past_len: int) -> torch.Tensor:
    """depths: [n] → position ids [1, n]: a node sits right after its root path."""
    return (past_len + depths)[None]


# ---- verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeVerdict:
    path: list[int]  # accepted node indices below the root, root to leaf
    next_token: int  # recovered (a node's children all rejected) or bonus (an accepted leaf)

    @property
    def num_accepted(self) -> int:
        return len(self.path)


@dataclass(frozen=True)
class NodeRule:
    """Recursive rejection sampling at one node, step by step."""

    accept: torch.Tensor  # [m]: P(accept child i | children before it rejected) = min(1, p_i(c_i)/q_i(c_i))
    residuals: torch.Tensor  # [m + 1, V]: p_1 = p, ..., p_{m+1} (what a fully rejected node samples from)


def sibling_proposals(q: torch.Tensor, tokens: torch.Tensor, drawn: bool) -> torch.Tensor:
    """q: [V], tokens: [m] children in draw order → [m, V]: the distribution child i was drawn from.

    Drawn children: q with the earlier siblings removed, renormalised (sampling without
    replacement). Deterministic children: the point mass on the child itself.
    """
    m, v = tokens.shape[0], q.shape[-1]
    if not drawn:
        return torch.nn.functional.one_hot(tokens, v).to(q.dtype)
    earlier = torch.zeros(m, v, dtype=torch.bool, device=q.device)
    for i in range(1, m):
        earlier[i] = earlier[i - 1]
        earlier[i, tokens[i - 1]] = True
    out = q.expand(m, v).masked_fill(earlier, 0.0)
    return out / out.sum(-1, keepdim=True).clamp(min=torch.finfo(q.dtype).tiny)


def rrs_node(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, drawn: bool) -> NodeRule:
    """p: [V] target at the node, q: [V] draft at the node, tokens: [m] children in draw order."""
    proposals = sibling_proposals(q, tokens, drawn)  # [m, V]
    accept, residuals = [], [p]
    for i in range(tokens.shape[0]):
        c = tokens[i]
        q_c = proposals[i, c]
        # q_i(c_i) > 0 for a real draw; guard anyway so a malformed tree rejects rather than divides by zero.
        accept.append(torch.where(q_c > 0, (p[c] / q_c).clamp(max=1.0), torch.zeros_like(q_c)))
        p = residual_distribution(p, proposals[i])
        residuals.append(p)
    return NodeRule(torch.stack(accept) if accept else p.new_zeros(0), torch.stack(residuals))


def verify_tree_sampled(
    tree: TokenTree,
    target_probs,  # [n, V] warped p at every node; anything indexable by node giving a [V] row
    uniforms: torch.Tensor,  # [n] in [0, 1): one coin per node (the root's is unused)
    generator: torch.Generator | None,  # draws the recovered / bonus token
) -> TreeVerdict:
    """Recursive rejection sampling down the tree: child i is accepted iff uniforms[i] < accept_i."""
    node, path = 0, []
    while True:
        kids = tree.children(node)
        if not kids:
            bonus = torch.multinomial(target_probs[node], 1, generator=generator)
            return TreeVerdict(path, int(bonus))
        rule = rrs_node(target_probs[node], tree.q[node], tree.tokens[kids], tree.drawn)
        accepted = next((c for i, c in enumerate(kids) if float(uniforms[c]) < float(rule.accept[i])), None)
        if accepted is None:
            recovered = torch.multinomial(rule.residuals[-1], 1, generator=generator)
            return TreeVerdict(path, int(recovered))
        path.append(accepted)
        node = accepted


def verify_tree_greedy(
    tree: TokenTree,
    target_argmax: torch.Tensor,  # [n] int64: the target's argmax at every node
) -> TreeVerdict:
    node, path = 0, []
    tokens, argmax = tree.tokens.tolist(), target_argmax.tolist()
    while True:
        nxt = next((c for c in tree.children(node) if tokens[c] == argmax[node]), None)
        if nxt is None:
            return TreeVerdict(path, argmax[node])
        path.append(nxt)
        node = nxt


# ---- the multi-draft bound ----------------------------------------------------------------------


def optimal_acceptance(p: torch.Tensor, q: torch.Tensor, k: int = 1, max_terms: int = 2**20) -> float:
    """α*: the best acceptance probability any lossless rule can reach with k drafts drawn from q.

    p, q: [V]. k = 1 is Σ min(p, q). For k drafts drawn *without replacement* (Hu et al.,
    "Towards optimal multi-draft speculative decoding", ICLR 2025), by LP duality (max-flow
    min-cut on drafts → emitted token)

        α* = min over token sets H of  p(H) + 1 - P(all k drafts fall in H),

    and the minimum is reached at a prefix of the tokens sorted by p/q ascending. See
    `optimal_acceptance_bounds` for how large vocabularies are handled; this returns its
    upper end, which is α* exactly whenever q's mass fits the enumeration.
    """
    return optimal_acceptance_bounds(p, q, k, max_terms)[1]


def optimal_acceptance_bounds(p: torch.Tensor, q: torch.Tensor, k: int = 1,
                              max_terms: int = 2**20) -> tuple[float, float]:
    """(lower, upper) around α* for k drafts drawn from q without replacement; equal when exact.

    P(all k drafts in H) is a sum over ordered k-tuples of distinct tokens, so it is
    enumerated over q's top M tokens with M^k ≤ max_terms. Dropping tuples that leave the
    top M lowers that probability, so min over prefixes of the truncated objective is ≥ α*;
    it overshoots by at most ε = P(some draft leaves the top M), so α* ≥ upper - ε.
    """
    p, q = p.double().flatten(), q.double().flatten()
    support = int((q > 0).sum())
    k = min(k, support)
    if k > 7:
        raise ValueError(f"optimal_acceptance enumerates k-tuples of drafts; k = {k} is too many (use k ≤ 7)")
    if k <= 1:
        alpha = float(torch.minimum(p, q).sum())
        return alpha, alpha
    m = min(support, max(k, int(max_terms ** (1.0 / k) + 1e-9)))
    top_q, top_ids = torch.topk(q, m)  # [M]
    # The full order by p/q (q = 0 last); the objective only changes where a top-M token joins H,
    # and between such points p(H) only grows, so evaluating right after each top-M token suffices.
    ratio = torch.where(q > 0, p / q.clamp(min=torch.finfo(torch.float64).tiny), torch.full_like(p, float("inf")))
    order = torch.argsort(ratio, stable=True)  # [V]
    rank_in_order = torch.empty_like(order)
    rank_in_order[order] = torch.arange(order.shape[0])
    p_before = torch.cumsum(p[order], 0)  # [V]: p(H) for the prefix ending at each position
    pos = rank_in_order[top_ids]  # [M]: where each top-M token sits in the full order
    by_pos = torch.argsort(pos)  # top-M tokens in the order they join H
    local_rank = torch.empty_like(by_pos)
    local_rank[by_pos] = torch.arange(m)  # [M]: 0 for the first top-M token to join H, ...

    # Ordered k-tuples of distinct top-M tokens: probability Π q(x_i) / (1 - Σ_{j<i} q(x_j)).
    prob = top_q.clone()  # [M]
    taken = top_q.clone()  # [M]: Σ q over the tuple so far
    last_rank = local_rank.clone()  # [M]: max join rank over the tuple so far
    members = [torch.arange(m)]  # token index (into top-M) at each tuple position
    for _ in range(1, k):
        shape = prob.shape
        nxt = top_q.view(*([1] * len(shape)), m)
        denom = (1.0 - taken).unsqueeze(-1).clamp(min=1e-300)
        prob = prob.unsqueeze(-1) * nxt / denom
        distinct = torch.ones(*shape, m, dtype=torch.bool)
        new_idx = torch.arange(m).view(*([1] * len(shape)), m)
        for idx in members:
            distinct &= idx.unsqueeze(-1) != new_idx
        prob = prob * distinct
        taken = taken.unsqueeze(-1) + nxt
        last_rank = torch.maximum(last_rank.unsqueeze(-1), local_rank.view(*([1] * len(shape)), m))
        members = [idx.unsqueeze(-1).expand(*shape, m) for idx in members] + [new_idx.expand(*shape, m)]
    # W[j]: P(all k drafts among the first j+1 top-M tokens to join H).
    w = torch.zeros(m, dtype=torch.float64).index_add_(0, last_rank.flatten(), prob.flatten()).cumsum(0)
    p_h = p_before[pos[by_pos]]  # [M]: p(H) for the prefix ending at the j-th top-M token to join
    upper = float(torch.minimum(torch.tensor(1.0, dtype=torch.float64), (p_h + 1.0 - w).min()))
    slack = max(0.0, 1.0 - float(w[-1]))  # P(some draft leaves the top M)
    return max(0.0, upper - slack), upper
