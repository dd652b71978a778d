"""When speculation pays at a batch size: the measured cost of batched forwards, and the round's draft length.

A batched round over n requests drafts G steps (one draft forward over the batch each) and verifies with one
target forward over n rows padded to G + 1 tokens, so its cost is

    T(n, G + 1) + G · D(n)

and it commits Σ_i E[tokens | α_i, γ_i] tokens, γ_i = min(G, room_i), E as in governor.expected_tokens.
Plain batched decoding (G = 0) commits n tokens for T(n, 1). On a CPU, T(1, k) is nearly flat in k (bf16 SmolLM2:
T(1, 5) ≈ 1.2 T(1, 1)) but T(n, k) grows with the n·k rows once the forward is compute bound, so the best G falls
as the batch grows, to 0 where speculation no longer pays: both curves are measured on the serving machine
(``measure_batch_costs``), never assumed.

Why one G for the whole batch rather than a free γ per request: rows are padded, so a row drafting fewer tokens
than the widest saves no target time, and the draft runs as many steps as the longest chain; with E increasing in
γ, every row's best γ is then the round's G (less where max_tokens leaves less room). The acceptance estimates
α_i still differ per request (its draft's running estimate, refined by the request's own verdicts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from osd.decoding.batch_cache import BatchKVCache, draft_forward, target_forward
from osd.decoding.cost import monotone_cost, verification_cost
from osd.decoding.governor import expected_tokens


@dataclass
class BatchCosts:
    """ms of batched forwards, measured: verify_ms[n][k] = target over n rows of k tokens; draft_ms[n] = one
    draft step over n rows of one token. Between measured sizes, linear interpolation (cost.verification_cost)."""

    verify_ms: dict[int, dict[int, float]]
    draft_ms: dict[int, float] = field(default_factory=dict)

    def verify(self, rows: int, width: int) -> float:
        per_size = {n: verification_cost(curve, width) for n, curve in self.verify_ms.items()}
        return verification_cost(per_size, rows)

    def draft(self, rows: int) -> float:
        if not self.draft_ms:
            return 0.0
        return verification_cost(self.draft_ms, rows)

    def as_dict(self) -> dict:
        return {"verify_ms": {n: dict(c) for n, c in self.verify_ms.items()}, "draft_ms": dict(self.draft_ms)}


def _time_forward(forward, vocab: int, cache: BatchKVCache, rows: int, width: int, context: int,
                  device: torch.device, timer: Callable[[], float]) -> float:
    """Seconds of ``forward(cache, ids)`` over `rows` rows of `width` random tokens on `context` cached positions
    each (the cache is cropped back first, as the engine does)."""
    for s in range(rows):
        cache.set_length(s, context)
    ids = torch.randint(0, vocab, (rows, width)).tolist()
    start = timer()
    forward(cache, ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return timer() - start


@torch.inference_mode()
def measure_batch_costs(target, draft=None, batch_sizes: Sequence[int] = (1, 2, 4, 8), widths: Sequence[int] = (1, 2, 3, 5),
                        context: int = 128, reps: int = 3, timer: Callable[[], float] = time.perf_counter
                        ) -> BatchCosts:
    """The cost table on this machine, through the engine's own forwards. `draft`: a DraftModel or None. `timer`:
    the wall clock; a benchmark on a shared machine may pass its process's CPU time (see bench/batching.py).

    Each repetition times every point once, in turn, and a point keeps its fastest time: on a shared machine a burst
    of other work then slows one repetition of every point rather than every repetition of a few, and noise only
    ever adds time. Each curve is also made non-decreasing in k (cost.monotone_cost). The cached K/V are zeros:
    attention costs the same whatever they hold, so no prefill is needed.
    """
    device = next(target.parameters()).device
    cache = BatchKVCache(target.config, slots=max(batch_sizes), capacity=context + max(widths))
    points = {("verify", n, k): lambda n=n, k=k: _time_forward(lambda c, ids: target_forward(target, c, 0, ids),
                                                                target.config.vocab_size, cache, n, k, context, device,
                                                                timer)
              for n in batch_sizes for k in widths}
    if draft is not None:
        draft_cache = BatchKVCache(draft.config, slots=max(batch_sizes), capacity=context + 1)
        points |= {("draft", n, 1): lambda n=n: _time_forward(lambda c, ids: draft_forward(draft, c, 0, ids),
                                                               draft.config.vocab_size, draft_cache, n, 1, context, device,
                                                               timer)
                   for n in batch_sizes}
    for measure in points.values():  # one unrecorded call each: one-off setup of every shape
        measure()
    best = {key: measure() for key, measure in points.items()}
    for _ in range(reps - 1):
        for key, measure in points.items():
            best[key] = min(best[key], measure())
    verify = {n: monotone_cost({k: best["verify", n, k] * 1000 for k in widths}) for n in batch_sizes}
    drafts = {n: best["draft", n, 1] * 1000 for n in batch_sizes} if draft is not None else {}
    return BatchCosts(verify, drafts)


def choose_draft_length(alphas: Sequence[float | None], rooms: Sequence[int], cap: int, costs: BatchCosts,
                        draft_rows: Sequence[int], margin: float = 0.03) -> int:
    """G in 0..cap maximising expected committed tokens per ms for the whole batch (see the module docstring).

    alphas: per active request, its acceptance estimate (None: it has no draft and decodes plainly); rooms: how
    many proposals each can still use (max_tokens − output − 1); draft_rows: requests per draft (one draft
    forward each per step). Speculation must beat plain batched decoding by `margin` (noise in the costs).
    """
    n = len(alphas)
    best, best_rate = 0, n / costs.verify(n, 1) * (1.0 + margin)
    draft_step_ms = sum(costs.draft(rows) for rows in draft_rows)
    for g in range(1, cap + 1):
        gammas = [min(g, room) if a is not None else 0 for a, room in zip(alphas, rooms)]
        steps = max(gammas, default=0)
        if steps < g:  # no request can use more proposals
            break
        tokens = sum(expected_tokens(a, gamma) if a is not None else 1.0 for a, gamma in zip(alphas, gammas))
        rate = tokens / (costs.verify(n, steps + 1) + steps * draft_step_ms)
        if rate > best_rate:
            best, best_rate = g, rate
    return best


class AcceptanceEstimate:
    """P(a drafted token is accepted | the ones before it were), forgetting old rounds exponentially (a swapped or
    improving draft, a shifting workload): governor.SpeculationGovernor's estimate, without its timing part."""

    def __init__(self, prior: float = 0.5, weight: float = 2.0, memory: float = 64.0):
        self.accepted = prior * weight
        self.rejected = (1.0 - prior) * weight
        self.keep = 1.0 - 1.0 / memory

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, proposed: int, accepted: int) -> None:
        """A verified round: `accepted` successes, then one failure unless all `proposed` passed."""
        if proposed == 0:
            return
        failed = accepted < proposed
        forget = self.keep ** (accepted + failed)
        self.accepted = self.accepted * forget + accepted
        self.rejected = self.rejected * forget + failed


def blended_alpha(draft_alpha: float, accepted: int, rejected: int, weight: float = 8.0) -> float:
    """A request's own acceptance, shrunk toward its draft's: the draft's estimate counts as `weight` trials."""
    return (accepted + weight * draft_alpha) / (accepted + rejected + weight)


class ChainPayoff:
    """Do suffix chains pay in a batch of this size? Measured, not predicted: committed tokens per ms of the rounds
    that carried chains and of those that did not, per batch-size bucket (1, 2-3, 4-7, 8-15, 16+), each an average
    that forgets old rounds exponentially.

    The cost table and the chains' calibrated scores decide each round's chains; this is the check on that decision
    as a whole. Chain widths cost every row of the batch, and on a CPU a wide batched forward costs more than the
    table measured with short contexts (bench load: predicted gains, actual losses of 7-12% at 4-16 requests). Where
    rounds with chains commit fewer tokens per ms than rounds without, chains are held back; every ``probe_every``-th
    round goes the other way, so both rates stay measured and a change (traffic that repeats, a warmer index) is seen.
    """

    def __init__(self, memory: float = 32.0, min_rounds: int = 8, probe_every: int = 16):
        self.keep = 1.0 - 1.0 / memory
        self.min_rounds, self.probe_every = min_rounds, probe_every
        self._rate: dict[tuple[int, bool], list[float]] = {}  # (bucket, chains) → [Σ tokens, Σ ms, rounds], decayed
        self._since_probe: dict[int, int] = {}

    @staticmethod
    def bucket(rows: int) -> int:
        return min(rows, 16).bit_length()

    def rate(self, rows: int, chains: bool) -> float | None:
        """Committed tokens per ms of rounds with (or without) chains at this batch size; None until measured."""
        tokens, ms, rounds = self._rate.get((self.bucket(rows), chains), (0.0, 0.0, 0))
        return tokens / ms if rounds >= self.min_rounds and ms > 0 else None

    def allow(self, rows: int) -> bool:
        """May this round carry chains? First measure both (rounds with chains, then rounds without, min_rounds
        each); then yes where chains measure at least as fast, but for a probe the other way every probe_every-th
        round."""
        b = self.bucket(rows)
        on, off = self.rate(rows, True), self.rate(rows, False)
        if on is None or off is None:
            return on is None
        self._since_probe[b] = self._since_probe.get(b, 0) + 1
        probe = self._since_probe[b] >= self.probe_every
        if probe:
            self._since_probe[b] = 0
        return (on >= off) != probe

    def observe(self, rows: int, chains: bool, tokens: int, ms: float) -> None:
        """A finished round: its batch size, whether it carried chains, tokens committed and its ms."""
        key = (self.bucket(rows), chains)
        tokens_sum, ms_sum, rounds = self._rate.get(key, (0.0, 0.0, 0))
        self._rate[key] = [tokens_sum * self.keep + tokens, ms_sum * self.keep + ms, rounds + 1]
