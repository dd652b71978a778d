"""When speculation pays: the cap on a round's draft length, zero when drafting would slow decoding.

A chain round that may draft γ tokens returns, with per-position acceptance α,
E[tokens | γ] = (1 − α^(γ+1)) / (1 − α) tokens (the bonus or recovered token included) for
one verification forward over γ + 1 tokens plus γ draft steps; plain decoding returns one
token for a forward over one. So drafting pays only when

    E[tokens | γ] / (T(γ + 1) + γ · t_draft)  >  1 / T(1)

and the best γ is the one that maximises the left side. A fresh service, a new cluster or a
traffic shift all start with a draft that does not pay yet (measured: the untrained 2-layer
self-draft ran at a fifth of the target's speed), so the engine must notice and decode
plainly — and probe now and then, so it notices when the trained draft does pay.

The governor learns all three numbers from the rounds it sees, on the machine it runs on:
α from the verdicts (exponentially forgetting, so it follows a hot-swapped draft or a
shifting workload), T(k) and t_draft from wall-clock times of the forwards themselves. It
changes only how many tokens are drafted, never which are accepted: losslessness holds
whatever it decides. One governor per draft (the engine keys them by draft), shared by the
requests that draft serves, since a single request is too short to learn from.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens one round commits in expectation: (1 − α^(γ+1)) / (1 − α); γ + 1 when α = 1."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


@dataclass
class GovernorConfig:
    """Knobs of the speculation governor (EngineConfig carries the user-facing ones)."""

    probe_every: int = 16  # plain rounds between two probing speculative rounds
    prior_alpha: float = 0.5  # optimistic start: a new draft is tried before it is judged
    prior_weight: float = 2.0  # the prior counts as this many verified positions
    memory: float = 64.0  # verified positions the α estimate remembers (exponential forgetting)
    time_memory: float = 16.0  # observations each timing average remembers
    margin: float = 0.03  # speculate only when expected throughput beats plain decoding by this fraction


class _Average:
    """An exponential moving average that starts at its first observation."""

    def __init__(self, memory: float) -> None:
        self.weight = 1.0 / memory
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.weight * (x - self.value)


class SpeculationGovernor:
    """The per-draft cap on γ; see the module docstring. The engine serialises requests; the lock is for
    /health, which reads the estimates from another thread while a request updates them."""

    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = c = config or GovernorConfig()
        self.accepted = c.prior_alpha * c.prior_weight  # decayed count of accepted positions
        self.rejected = (1.0 - c.prior_alpha) * c.prior_weight  # decayed count of first rejections
        self.verify_s: dict[int, _Average] = {}  # tokens in the verification forward → seconds
        self.draft_step_s = _Average(c.time_memory)
        self.plain_streak = 0
        self.rounds = {"speculative": 0, "plain": 0}
        self._lock = threading.Lock()

    # -- what it knows ----------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        """Estimated probability that a drafted token is accepted given the ones before it were."""
        return self.accepted / (self.accepted + self.rejected)

    def verify_cost(self, k: int) -> float | None:
        """Seconds of a verification forward over k tokens: measured, else interpolated between
        measured sizes (linear in k; extrapolated flat from the largest below), else None."""
        if k in self.verify_s and self.verify_s[k].value is not None:
            return self.verify_s[k].value
        known = sorted((n, a.value) for n, a in self.verify_s.items() if a.value is not None)
        below = [(n, t) for n, t in known if n < k]
        above = [(n, t) for n, t in known if n > k]
        if below and above:
            (n0, t0), (n1, t1) = below[-1], above[0]
            return t0 + (t1 - t0) * (k - n0) / (n1 - n0)
        if below:
            return below[-1][1]  # optimistic: a larger forward costs at least as much, but we have not seen it
        return above[0][1] if above else None

    def rate(self, gamma: int) -> float | None:
        """Expected tokens per second of rounds that draft γ; None while a cost is unknown."""
        verify = self.verify_cost(gamma + 1)
        draft = self.draft_step_s.value if gamma else 0.0
        if verify is None or draft is None:
            return None
        return expected_tokens(self.alpha, gamma) / (verify + gamma * draft)

    def best_gamma(self, cap: int) -> int | None:
        """The γ in 0..cap with the highest expected rate; None while the costs are still unknown."""
        if 1 not in self.verify_s:  # plain decoding's cost is the yardstick: measure it, never guess it
            return None
        plain = self.rate(0)
        best, best_rate = 0, plain * (1.0 + self.config.margin)
        for gamma in range(1, cap + 1):
            r = self.rate(gamma)
            if r is None:
                return None
            if r > best_rate:
                best, best_rate = gamma, r
        return best

    # -- deciding and learning ----------------------------------------------------------------

    def cap(self, limit: int) -> int:
        """The most tokens the next round may draft (≤ limit); 0 = decode plainly this round."""
        with self._lock:
            return self._cap(limit)

    def _cap(self, limit: int) -> int:
        if limit <= 0:
            return 0
        best = self.best_gamma(limit)
        if best is None:  # still measuring: a speculative round times the draft, a plain one times T(1)
            return limit if self.draft_step_s.value is None else 0
        if best == 0:
            self.plain_streak += 1
            if self.plain_streak > self.config.probe_every:  # probe: has the draft (or the traffic) changed?
                self.plain_streak = 0
                return limit
            return 0
        self.plain_streak = 0
        return best

    def observe(self, proposed: int, accepted: int, verify_s: float, draft_s: float | None) -> None:
        """One verified round: ``proposed`` drafted tokens (0 for plain decoding), ``accepted`` of them,
        the verification forward's seconds, and the drafting seconds (None when not representative,
        e.g. the draft caught up on many tokens first)."""
        with self._lock:
            self._observe(proposed, accepted, verify_s, draft_s)

    def _observe(self, proposed: int, accepted: int, verify_s: float, draft_s: float | None) -> None:
        self.verify_s.setdefault(proposed + 1, _Average(self.config.time_memory)).add(verify_s)
        if proposed == 0:
            self.rounds["plain"] += 1
            return
        self.rounds["speculative"] += 1
        if draft_s is not None:
            self.draft_step_s.add(draft_s / proposed)
        # Geometric acceptance, censored at `proposed`: `accepted` successes, then one failure unless all passed.
        keep = 1.0 - 1.0 / self.config.memory
        forget = keep ** (accepted + (accepted < proposed))
        self.accepted = self.accepted * forget + accepted
        self.rejected = self.rejected * forget + (accepted < proposed)

    def describe(self) -> dict:
        """What /health shows: the estimates and the current decision."""
        with self._lock:
            return self._describe()

    def _describe(self) -> dict:
        best = self.best_gamma(32)
        return {"alpha": round(self.alpha, 4), "best_gamma": best,
                "draft_step_ms": None if self.draft_step_s.value is None else round(self.draft_step_s.value * 1e3, 3),
                "verify_ms": {k: round(a.value * 1e3, 3) for k, a in sorted(self.verify_s.items()) if a.value},
                "rounds": dict(self.rounds)}
