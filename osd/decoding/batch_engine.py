"""Continuous batching with speculation: many requests share every draft and target forward.

Requests join (``add``) and leave (finish or ``cancel``) between rounds; ``step`` runs one round for every active
request:

  1. G = the round's draft length for the whole batch, from the measured cost of batched forwards at the current
     batch size (osd/decoding/batch_cost.py; 0 = plain batched decoding where speculation no longer pays), or the
     configured γ under ``speculation='always'``. Request i drafts γ_i = min(G, what its max_tokens leaves).
  2. Each draft proposes for its requests in one forward per draft step (requests on different drafts — clusters,
     a hot swap mid-request — form one group per draft object, each with its own batched KV cache). With
     ``engine.suffix`` a request may instead propose a chain from its suffix indexes (its own text and recent
     traffic, osd/decoding/suffix.py: free to draft, verified as point masses), where that chain's calibrated
     expectation beats the draft's; how long such chains may be is chosen from the same cost table, since every
     row pays for the widest.
  3. One target forward verifies every request's ``[pending, d1..dγ_i]``, rows padded to the widest, with a mask
     that keeps each row inside its own slot's cache (osd/decoding/batch_cache.py).
  4. Per request, exactly the one-request engine's rule and bookkeeping: verify_greedy / verify_sampled with the
     request's own torch.Generator, teacher rows, SpecStats, stop rules, the training record.

Each request keeps its own length, sampling parameters, seed, stop rules, draft, draft version and cluster. What a
request commits depends only on its own draws and its own logits, so its output does not depend on its batch
mates: under greedy decoding always; under sampling with a seed, given the same sequence of γ — with
``speculation='always'`` it is the same as the one-request SpeculativeEngine's output for that seed. Under
``'auto'`` G follows the load, and a different γ draws differently (each draw still exact: lossless either way).
Floating point is the one caveat: a row's logits in a batched forward can differ from a lone forward's in the last
bits (BLAS blocking depends on the row count), which flips a result only at an exact tie.

The engine is not thread-safe: one thread (the replica's engine thread) calls add / step / cancel, admitting queued
requests between steps; ``on_tokens`` callbacks run on that thread, as SpeculativeEngine.generate's do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from osd.config import SamplingParams
from osd.data.records import DraftRound, TrainingRecord
from osd.decoding.batch_cache import BatchKVCache, draft_forward, target_forward
from osd.decoding.batch_cost import (
    AcceptanceEstimate,
    BatchCosts,
    ChainPayoff,
    blended_alpha,
    choose_draft_length,
    measure_batch_costs,
)
from osd.decoding.drafting import Proposal, choose_token
from osd.decoding.eagle import EagleHead
from osd.decoding.engine import (
    LIVE_DRAFT,
    Generation,
    SpecStats,
    SpeculativeEngine,
    Teacher,
)
from osd.decoding.governor import expected_tokens
from osd.decoding.sampling import warp_probs
from osd.decoding.suffix import Candidate, SuffixProposer
from osd.decoding.verification import Verdict, overlap, verify_greedy, verify_sampled
from osd.models.drafts import DraftModel

# Under 'auto', plain rounds between two probing ones (one draft token per request), so a draft that started paying
# is noticed; the gap doubles after each probe that changes nothing, up to the max (a probe costs a draft catch-up).
PROBE_EVERY, MAX_PROBE_EVERY = 16, 128
CHAIN_MARGIN = 0.03  # suffix chains must beat the round without them by this much in expected tokens per ms
SOLO_CATCH_UP = 64  # a draft lag longer than this (a new prompt) is fed in a forward of its own, not padded into all


class BatchFull(RuntimeError):
    """Every slot is taken: step() until a request finishes (StepOutput.finished), then add again."""


@dataclass
class StepOutput:
    tokens: dict[str, list[int]] = field(default_factory=dict)  # request id → ids committed this round (streaming)
    finished: dict[str, Generation] = field(default_factory=dict)  # request id → its final Generation


@dataclass(eq=False)
class _Request:
    """One active request: its state between rounds and where its K/V live."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    draft: DraftModel | None
    cluster: str
    draft_version: int
    on_tokens: Callable[[list[int]], None] | None
    stats: SpecStats
    teacher: Teacher
    started: float
    slot: int  # row in the target cache (active requests fill slots 0..n-1)
    draft_slot: int = -1  # row in its draft group's cache
    tokens: list[int] = field(default_factory=list)  # prompt + output so far
    rounds: list[DraftRound] = field(default_factory=list)
    accepted: int = 0  # its own verdicts, for its acceptance estimate
    rejected: int = 0
    gamma: int = 0  # this round's draft length
    proposal: Proposal | None = None  # this round's proposals
    suffix: SuffixProposer | None = None  # its suffix lookups (engine.suffix set)
    chain: list[Candidate] = field(default_factory=list)  # this round's suffix chain, when it proposes from one

    @property
    def output_len(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)


class _DraftGroup:
    """The requests drafting with one draft object, batched over its own KV cache."""

    def __init__(self, draft: DraftModel, slots: int, capacity: int):
        self.draft = draft
        self.cache = BatchKVCache(draft.config, slots=slots, capacity=capacity)
        self.members: list[_Request] = []  # index = draft slot
        self.acceptance = AcceptanceEstimate()


class BatchEngine:
    """Continuous batching over a SpeculativeEngine's target, drafts, tokenizer and config; see the module docstring.

    ``costs``: the measured batched-forward costs speculation='auto' decides with; None measures them (measure_costs:
    a few seconds for SmolLM2 on a CPU) now with ``measure``, else when a round first needs them.
    """

    def __init__(self, engine: SpeculativeEngine, max_batch: int = 8, costs: BatchCosts | None = None,
                 measure: bool = True):
        config = engine.config
        if config.tree is not None or config.length_policy != "fixed":
            raise ValueError("BatchEngine batches chains (the draft's, or suffix ones) of a fixed length cap; set "
                             "engine.tree to null and length_policy to 'fixed', or serve with the one-request engine")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.engine = engine
        self.target = engine.target
        self.config = config
        self.max_batch = max_batch
        self.device = engine.device
        self.cap = config.round_cap
        # a suffix chain costs no draft forward, so it may run deeper than γ (the cost table decides how deep)
        self.width_cap = max(self.cap, config.suffix.max_depth) if config.suffix is not None else self.cap
        self.suffix_calibrations: dict = {}  # (index, match length) → calibration, across requests (as the tree engine)
        self.chain_payoff = ChainPayoff()  # under 'auto': do chains pay at this batch size, measured
        self.clock = time.perf_counter  # what rounds are timed with (tests pass their own)
        self.cache = BatchKVCache(self.target.config, slots=max_batch, capacity=64)  # buffers appear at the first write
        self._slots: list[_Request] = []  # index = target slot
        self._by_id: dict[str, _Request] = {}
        self._groups: dict[int, _DraftGroup] = {}  # id(draft) → its group (only while it has requests or is live)
        self._plain_streak = 0
        self._probe_every = PROBE_EVERY
        if costs is None and measure and config.speculation == "auto" and (engine.draft is not None or
                                                                           config.suffix is not None):
            costs = self.measure_costs()
        self.costs = costs

    # -- admission ----------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._slots)

    @property
    def has_room(self) -> bool:
        return len(self._slots) < self.max_batch

    def measure_costs(self, draft: DraftModel | None | object = LIVE_DRAFT, **kwargs) -> BatchCosts:
        """Time batched target and draft forwards at batch sizes up to max_batch and widths up to γ + 1 (kwargs:
        measure_batch_costs's context, reps, timer). Other drafts of the same architecture cost the same; one of
        another shape is costed as this one."""
        draft = self.engine.draft if draft is LIVE_DRAFT else draft
        sizes = sorted({n for n in (1, 2, 4, 8, 16, 32, 64) if n < self.max_batch} | {self.max_batch})
        widths = sorted({1, 2, 3, (self.cap + 2) // 2, self.cap + 1, self.width_cap + 1})
        return measure_batch_costs(self.target, draft, sizes, widths, **kwargs)

    @torch.inference_mode()
    def add(self, prompt_ids: list[int], params: SamplingParams, *, draft_version: int = 0, cluster: str = "global",
            on_tokens: Callable[[list[int]], None] | None = None, draft: DraftModel | None | object = LIVE_DRAFT,
            request_id: str | None = None) -> str:
        """Admit a request (its prompt is prefilled now); returns its id. Arguments as SpeculativeEngine.generate."""
        self.engine.validate(prompt_ids, params)
        if not self.has_room:
            raise BatchFull(f"all {self.max_batch} slots are taken: step() until a request finishes, then add it")
        draft = self.engine.draft if draft is LIVE_DRAFT else draft  # read once, as generate does
        if isinstance(draft, EagleHead):
            raise TypeError("BatchEngine drafts with draft models; an eagle head reads the target's features, which "
                            "the batched forward does not capture yet: serve it with the one-request engine")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._by_id:
            raise ValueError(f"request {request_id!r} is already running")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ())))
        start = time.perf_counter()
        stats = SpecStats(accepted_per_position=[0] * self.width_cap, prompt_tokens=len(prompt_ids))
        request = _Request(request_id, list(prompt_ids), params, generator, draft, cluster, draft_version, on_tokens,
                           stats, Teacher(self.config.teacher_top_k), start, slot=len(self._slots),
                           tokens=list(prompt_ids))
        if self.config.suffix is not None:
            traffic = self.engine.traffic.get(cluster) if self.engine.traffic is not None else None
            request.suffix = SuffixProposer(self.config.suffix, prompt_ids, traffic, self.suffix_calibrations)
        capacity = len(prompt_ids) + params.max_tokens + self.width_cap + 1  # the request, plus one round's rows
        self._prune_groups()  # the live draft may have been swapped since the last request
        group = self._group(draft, capacity) if draft is not None else None  # first: it refuses drafts it cannot batch
        self.cache.reserve(self.max_batch, capacity)
        self.cache.set_length(request.slot, 0)
        if len(prompt_ids) > 1:  # the cache holds all but the pending token, which opens the first round
            target_forward(self.target, self.cache, request.slot, [prompt_ids[:-1]], logits=False)
        if group is not None:
            request.draft_slot = len(group.members)
            group.members.append(request)
            group.cache.reserve(self.max_batch, capacity)
            group.cache.set_length(request.draft_slot, 0)  # the draft catches up when it first drafts
        self._slots.append(request)
        self._by_id[request_id] = request
        request.stats.prefill_s = time.perf_counter() - start
        return request_id

    @torch.inference_mode()  # moving a slot writes the cache's inference tensors
    def cancel(self, request_id: str) -> bool:
        """Drop a request between rounds and free its slot; False if it is not running."""
        request = self._by_id.get(request_id)
        if request is None:
            return False
        self._release(request)
        return True

    def _group(self, draft: DraftModel, capacity: int) -> _DraftGroup:
        if id(draft) not in self._groups:
            self._groups[id(draft)] = _DraftGroup(draft, self.max_batch, capacity)
        return self._groups[id(draft)]

    def _release(self, request: _Request) -> None:
        """Free the request's slots, moving the last active slot into each hole so active slots stay in front."""
        last = self._slots.pop()
        if last is not request:
            self.cache.move(last.slot, request.slot)
            last.slot = request.slot
            self._slots[request.slot] = last
        self.cache.set_length(len(self._slots), 0)
        if request.draft is not None:
            group = self._groups[id(request.draft)]
            tail = group.members.pop()
            if tail is not request:
                group.cache.move(tail.draft_slot, request.draft_slot)
                tail.draft_slot = request.draft_slot
                group.members[request.draft_slot] = tail
            group.cache.set_length(len(group.members), 0)
        del self._by_id[request.id]
        self._prune_groups()

    def _prune_groups(self) -> None:
        """A draft's cache goes with its last request, unless it is the live draft (the next request's, likely)."""
        for key, group in list(self._groups.items()):
            if not group.members and group.draft is not self.engine.draft:
                del self._groups[key]

    # -- one round ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> StepOutput:
        """One round for every active request: draft, one batched verification, accept, stop. Streaming callbacks
        run as each request's tokens are committed; finished requests leave the batch."""
        out = StepOutput()
        if not self._slots:
            return out
        start, batch_size = self.clock(), len(self._slots)
        g = self._draft_length()
        # Under 'auto', measured: do rounds carrying chains pay at this batch size? If not, skip even the lookups.
        lookups = self.config.suffix is not None and (self.config.speculation != "auto"
                                                      or self.chain_payoff.allow(batch_size))
        for request in self._slots:
            room = request.params.max_tokens - request.output_len - 1  # draft tokens that can still be used
            request.gamma = min(g, room) if request.draft is not None else 0
            request.proposal = None
            request.chain = suffix_chain(request.suffix.candidates(request.tokens, min(self.width_cap, room))) \
                if lookups and request.suffix is not None and room > 0 else []
        self._choose_chains(g)
        carried = any(r.chain for r in self._slots)
        for group in self._groups.values():
            if any(r.gamma for r in group.members):
                self._propose(group)
        for request in self._slots:
            if request.chain:
                request.proposal = self._chain_proposal(request)
                request.gamma = len(request.chain)
        rows = [[r.tokens[-1], *(r.proposal.tokens.tolist() if r.proposal is not None else [])] for r in self._slots]
        logits = target_forward(self.target, self.cache, 0, rows)  # [n, S, V]
        finished = []
        for request, row_logits in zip(self._slots, logits):
            new_tokens = self._accept(request, row_logits[: request.gamma + 1])
            out.tokens[request.id] = new_tokens
            if request.on_tokens is not None:
                request.on_tokens(new_tokens)
            finish = self.engine._finish_reason(request.tokens, len(request.prompt_ids), request.params)
            if finish is not None:
                finished.append(request)
        if self.config.suffix is not None and self.config.speculation == "auto":
            self.chain_payoff.observe(batch_size, carried, sum(map(len, out.tokens.values())),
                                      1000 * (self.clock() - start))
        for request in finished:
            out.finished[request.id] = self._finish(request)
            self._release(request)
        return out

    def _chain_proposal(self, request: _Request) -> Proposal:
        """A suffix chain as a Proposal. Its q is a point mass on each token; only sampled verification reads it
        (greedy compares tokens, and a chain has no α̂), so a greedy request gets an empty [γ, 0] in its place
        rather than γ rows of vocabulary size (tens of MB a round across a batch)."""
        tokens = torch.tensor([c.path[-1] for c in request.chain], device=self.device)
        if request.params.greedy:
            return Proposal(tokens, torch.empty(len(tokens), 0, device=self.device))
        probs = torch.zeros(len(tokens), int(self.target.config.vocab_size), device=self.device)
        return Proposal(tokens, probs.scatter_(1, tokens[:, None], 1.0))

    def _alphas(self) -> list[float | None]:
        """Each active request's acceptance estimate for its draft (None: no draft)."""
        out = []
        for r in self._slots:
            group = self._groups[id(r.draft)] if r.draft is not None else None
            out.append(None if group is None else blended_alpha(group.acceptance.alpha, r.accepted, r.rejected))
        return out

    def _draft_length(self) -> int:
        """G for this round: γ under 'always'; under 'auto' the cost model's pick, probing now and then."""
        drafting = [r for r in self._slots if r.draft is not None]
        if not drafting:
            return 0
        if self.config.speculation == "always":
            return self.cap
        if self.costs is None:  # not measured at start (no draft then, or measure=False)
            self.costs = self.measure_costs(drafting[0].draft)
        rooms = [r.params.max_tokens - r.output_len - 1 for r in self._slots]
        draft_rows = [len(group.members) for group in self._groups.values() if group.members]
        best = choose_draft_length(self._alphas(), rooms, self.cap, self.costs, draft_rows)
        if best:
            self._plain_streak, self._probe_every = 0, PROBE_EVERY
            return best
        self._plain_streak += 1
        if self._plain_streak > self._probe_every:  # has a draft (or the traffic) changed?
            self._plain_streak, self._probe_every = 0, min(2 * self._probe_every, MAX_PROBE_EVERY)
            return 1
        return 0

    def _choose_chains(self, g: int) -> None:
        """Which requests propose their suffix chain this round instead of drafting, and how deep chains go.

        A request takes its chain (cut to depth W) where the chain's expected tokens, 1 + Σ of its calibrated path
        scores, beat its draft's at γ_i; W maximises the batch's expected tokens per ms (every row pays for the
        widest; the draft steps only if some request still drafts). Under 'always', W is as deep as chains go.
        (Under 'auto', step() looks no chains up in a round where ChainPayoff measured them not paying.)"""
        if not any(r.chain for r in self._slots):
            return
        if self.costs is None and self.config.speculation == "auto":  # not measured at start (measure=False)
            self.costs = self.measure_costs()
        alphas = self._alphas()
        drafted = [expected_tokens(a, r.gamma) if a is not None and r.gamma else 1.0 for a, r in zip(alphas, self._slots)]

        def plan(depth: int) -> tuple[float, list[bool]]:
            use = [bool(r.chain[:depth]) and 1.0 + sum(c.score for c in r.chain[:depth]) > e
                   for r, e in zip(self._slots, drafted)]
            tokens = sum(1.0 + sum(c.score for c in r.chain[:depth]) if u else e
                         for r, u, e in zip(self._slots, use, drafted))
            width = max([min(depth, len(r.chain)) if u else r.gamma for r, u in zip(self._slots, use)], default=0)
            steps = max([r.gamma for r, u in zip(self._slots, use) if not u], default=0)
            if self.costs is None:  # speculation 'always': no cost table
                return tokens, use
            draft_ms = sum(self.costs.draft(len(gr.members)) for gr in self._groups.values() if gr.members)
            return tokens / (self.costs.verify(len(self._slots), width + 1) + steps * draft_ms), use

        if self.costs is None:
            depth = self.width_cap
        else:  # chains must beat the round without them by a margin (noise in the costs, as choose_draft_length)
            rates = {d: plan(d)[0] * (1.0 + CHAIN_MARGIN if d == 0 else 1.0) for d in range(self.width_cap + 1)}
            depth = max(rates, key=rates.__getitem__)
        for r, use in zip(self._slots, plan(depth)[1]):
            if use:
                r.chain, r.gamma = r.chain[:depth], 0  # sits this round out of its draft's forwards
            else:
                r.chain = []

    def _propose(self, group: _DraftGroup) -> None:
        """Every member drafts its γ tokens: one draft forward over the group per step. The first step also catches
        every member up on the tokens committed since it last drafted (two after a fully accepted round, more after
        plain rounds); members that draft fewer (or none) catch up too, so the next round starts close."""
        cache, members, draft = group.cache, group.members, group.draft
        for r in members:  # a long lag (a new prompt) is fed alone, not padded across the whole group
            if len(r.tokens) - cache.lengths[r.draft_slot] > SOLO_CATCH_UP:
                draft_forward(draft, cache, r.draft_slot, [r.tokens[cache.lengths[r.draft_slot]:-1]])
        feeds = [r.tokens[cache.lengths[r.draft_slot]:] for r in members]
        drafted: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for step in range(max(r.gamma for r in members)):
            logits = draft_forward(draft, cache, 0, feeds)  # [members, V]
            feeds = []
            for r in members:
                if step >= r.gamma:
                    feeds.append([])
                    continue
                token, dist = choose_token(logits[r.draft_slot : r.draft_slot + 1], r.params, r.generator)
                tokens, dists = drafted.setdefault(r.draft_slot, ([], []))
                tokens.append(token)
                dists.append(dist)
                feeds.append([int(token)] if step + 1 < r.gamma else [])  # d_γ is never fed, as in Drafter
        for r in members:
            if r.gamma:
                tokens, dists = drafted[r.draft_slot]
                r.proposal = Proposal(torch.cat(tokens), torch.cat(dists))

    def _accept(self, request: _Request, logits: torch.Tensor) -> list[int]:
        """logits: [γ + 1, V] the request's verification rows → the newly committed tokens; caches cropped."""
        from_suffix = bool(request.chain)
        new_tokens, verdict = judge(request.proposal, logits, request.params, request.generator,
                                    request.teacher if self.config.record else None, request.stats, from_suffix)
        proposed = request.gamma
        if from_suffix:  # calibrates the next chains; the draft's estimate and record rounds are the draft's own
            tried = min(verdict.num_accepted + 1, proposed)  # a node is tried once its parent was accepted
            request.suffix.observe([(c, d < verdict.num_accepted) for d, c in enumerate(request.chain[:tried])])
        elif proposed:
            request.rounds.append(DraftRound(request.output_len, request.proposal.tokens.tolist(), verdict.num_accepted))
            self._groups[id(request.draft)].acceptance.observe(proposed, verdict.num_accepted)
            request.accepted += verdict.num_accepted
            request.rejected += verdict.num_accepted < proposed
        request.tokens.extend(new_tokens)
        committed = len(request.tokens)
        self.cache.set_length(request.slot, committed - 1)  # the new pending token opens the next round
        if request.draft is not None:
            group = self._groups[id(request.draft)]
            group.cache.set_length(request.draft_slot, min(group.cache.lengths[request.draft_slot], committed - 1))
        return new_tokens

    def _finish(self, request: _Request) -> Generation:
        """The request's Generation, exactly as SpeculativeEngine.generate builds it."""
        output_ids, text, finish = self.engine._finalize(request.tokens[len(request.prompt_ids):], request.params)
        if self.engine.traffic is not None and self.config.suffix.traffic:  # later requests can match this one
            self.engine.traffic.add(request.prompt_ids, output_ids, request.cluster, request.id)
        stats = request.stats
        stats.output_tokens = len(output_ids)
        stats.elapsed_s = time.perf_counter() - request.started
        record = None
        if self.config.record:
            ids, logprobs, lse = request.teacher.rows(len(output_ids))
            record = TrainingRecord(list(request.prompt_ids), output_ids, ids, logprobs, lse,
                                    [r for r in request.rounds if r.start < len(output_ids)],
                                    cluster=request.cluster, draft_version=request.draft_version,
                                    request_id=request.id)
        return Generation(output_ids, text, finish, stats, record)

    # -- convenience --------------------------------------------------------------------------------

    def generate_many(self, requests: Iterable[dict]) -> list[Generation]:
        """Run requests to completion, admitting the next as soon as a slot frees; each dict holds add()'s
        arguments (prompt_ids, params, ...). Returns the Generations in the order given."""
        pending = list(requests)
        ids: list[str] = []
        done: dict[str, Generation] = {}
        while pending or self._slots:
            while pending and self.has_room:
                ids.append(self.add(**pending.pop(0)))
            done.update(self.step().finished)
        return [done[i] for i in ids]


def suffix_chain(candidates: list[Candidate]) -> list[Candidate]:
    """The likeliest path through the suffix trie: from the root, the best-scored child at each depth. candidates:
    SuffixProposer.candidates (parents before children; a score is P(the whole path is accepted))."""
    by_parent: dict[tuple[int, ...], Candidate] = {}
    for c in candidates:
        best = by_parent.get(c.path[:-1])
        if best is None or c.score > best.score:
            by_parent[c.path[:-1]] = c
    chain, path = [], ()
    while path in by_parent:
        chain.append(by_parent[path])
        path = by_parent[path].path
    return chain


def judge(proposal: Proposal | None, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
          teacher: Teacher | None, stats: SpecStats, from_suffix: bool = False) -> tuple[list[int], Verdict]:
    """One request's verdict on its round: SpeculativeEngine._verify_round after the forward, the same draws in the
    same order (so a seed gives the same tokens). logits: [γ + 1, V] raw target logits at [pending, d1..dγ].
    ``from_suffix``: the proposal is a suffix chain (point masses): counted apart, and not in the draft's α̂."""
    device = logits.device
    drafted = proposal.tokens if proposal is not None else torch.empty(0, dtype=torch.long, device=device)
    gamma = drafted.shape[0]
    stats.target_forwards += 1
    if params.greedy:
        verdict = verify_greedy(drafted, logits.argmax(-1))
        target_probs = None if from_suffix else logits[:gamma].softmax(-1)  # temperature-1 p, for α̂ only
    else:
        target_probs = warp_probs(logits, params)
        uniforms = torch.rand(gamma, generator=generator, device=device)
        verdict = verify_sampled(drafted, proposal.probs if gamma else target_probs[:0], target_probs, uniforms,
                                 generator)
    n = verdict.num_accepted
    if teacher is not None:
        teacher.add(logits[: n + 1])
    if gamma:
        stats.rounds += 1
        stats.proposed += gamma
        stats.accepted += n
        for i in range(n):
            stats.accepted_per_position[i] += 1
        if from_suffix:
            stats.accepted_suffix += n
        else:
            verified = min(n + 1, gamma)  # positions whose context is committed
            stats.beta_sum += float(overlap(target_probs[:verified], proposal.probs[:verified]).sum())
            stats.beta_count += verified
    return [*drafted[:n].tolist(), verdict.next_token], verdict
