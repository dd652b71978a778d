"""Watching a swap: is the draft version that just went live serving worse than the one it replaced?

The promotion gate judges a candidate offline, on held-out records, before it is published.
What replicas then serve can still be worse: bytes damaged between the trainer and the
replicas, or held-out records that do not look like live traffic. (SGLang users saw weight
syncs silently corrupt drafts, acceptance length 2.7 -> 1.0, and nothing caught it.) So each
replica keeps, per draft lineage, the served totals of the version before a swap and of the
new version after it, and compares them once both have enough evidence:

    roll back  iff  α̂_new < (1 − margin) · α̂_old
               and  (tpf_new − 1) < (1 − margin) · (tpf_old − 1)

α̂ is Σβ / Σ verified positions (the OSD paper's α, a ratio of sums over the requests), tpf is
Σ generated tokens / Σ target decode forwards; tpf − 1 is what speculation adds per forward
(plain decoding makes one token per forward). Both must fall:

- α̂ alone is the draft's own quality, but a drop in it costs users nothing when suffix
  candidates or a wider tree carry the tokens per forward;
- tokens per forward alone is what users feel, but it also moves with the traffic (less
  repetitive prompts give suffix speculation fewer hits) with no fault of the draft.

Both falling by more than the margin at once is the draft making decoding slower. The new
side is the new version's requests since it went live, judged once they number
``min_requests`` *and* carry ``min_draft_positions`` verified draft positions; the old side is
the previous version's newest requests on this replica that meet the same two minimums. Both
minimums, because a few long requests carry many positions from one or two prompts (one
prompt's α̂ is not the traffic's), and many short or plain-decoded requests (a governor that
backed off drafts only now and then) carry too few positions for α̂ to mean anything. Until
both hold the watch waits.

Only forward swaps are watched (a newer version replacing an older one): a rollback, by an
admin or by this watch, is a choice already made, never second-guessed. The baseline is the
last version that served enough requests here, so when the trainer publishes twice before a
version has been judged, the newest is judged against that same, proven baseline, and is rolled
back to it. A lineage's first version here (a cluster's first draft of its own, which took
over from global's draft) has no baseline in that lineage and is not judged. Rolling back needs
the baseline stored in the registry: the initial draft (v0) is not, so a v1 found worse than it
is reported (a warning) but stays live.

Plain Python, no locks held while calling out: ``ServingCore`` feeds it every finished request
and every swap, and acts on the verdicts (osd/serving/core.py).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from osd.decoding.engine import SpecStats


class AutoRollbackConfig(BaseModel):
    """When a replica undoes a newly live draft version that serves clearly worse than the one it replaced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Watch each newly live draft version against the version it replaced and roll it back on a clear drop (osd/serving/swap_watch.py).")
    min_requests: int = Field(50, ge=1, le=100_000, description="Requests the new version must serve on a replica before it is compared with the previous version, whose newest requests there must meet the same minimums.")
    min_draft_positions: int = Field(500, ge=1, description="Verified draft positions each side needs as well: α̂ is a mean over them, and short or plain-decoded requests add few.")
    margin: float = Field(0.25, gt=0.0, lt=1.0, description="Relative drop that counts as clear: roll back when α̂ and the tokens speculation adds per target forward (tokens per forward - 1) both fall below (1 - margin) x the previous version's.")


@dataclass
class Totals:
    """Served sums over some requests of one version."""

    requests: int = 0
    positions: int = 0  # verified draft positions (SpecStats.beta_count)
    beta: float = 0.0  # Σ β over them (SpecStats.beta_sum)
    tokens: int = 0  # generated tokens
    forwards: int = 0  # target decode forwards

    @classmethod
    def of(cls, stats: SpecStats) -> Totals:
        return cls(1, stats.beta_count, stats.beta_sum, stats.output_tokens, stats.target_forwards)

    def add(self, other: Totals, sign: int = 1) -> None:
        self.requests += sign * other.requests
        self.positions += sign * other.positions
        self.beta += sign * other.beta
        self.tokens += sign * other.tokens
        self.forwards += sign * other.forwards

    def enough(self, config: AutoRollbackConfig) -> bool:
        """Evidence enough to judge by, or to be judged against."""
        return self.requests >= config.min_requests and self.positions >= config.min_draft_positions

    @property
    def alpha(self) -> float:
        return self.beta / self.positions if self.positions else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 1.0

    def describe(self) -> str:
        return (f"α̂ {self.alpha:.3f}, {self.tokens_per_forward:.2f} tokens/forward over {self.requests} requests "
                f"({self.positions} draft positions)")


@dataclass(frozen=True)
class Verdict:
    """The watch's judgement of ``version`` against ``baseline_version`` in lineage ``cluster``."""

    cluster: str
    version: int
    baseline_version: int
    roll_back: bool
    new: Totals
    old: Totals
    reason: str


@dataclass
class _Lineage:
    version: int  # the version this replica serves now
    recent: deque[Totals] = field(default_factory=deque)  # its newest requests, one Totals each...
    recent_total: Totals = field(default_factory=Totals)  # ...and their sum: no more than enough evidence
    baseline: tuple[int, Totals] | None = None  # (version, recent_total when it was swapped out): the last proven one
    watching: Totals | None = None  # the current version's requests since it went live, until judged
    rejected: set[int] = field(default_factory=set)  # versions judged worse: never a baseline


class SwapWatch:
    """Per draft lineage: the old version's served totals, the new one's, and the verdict; see the module docstring."""

    def __init__(self, config: AutoRollbackConfig | None = None) -> None:
        self.config = config or AutoRollbackConfig()
        self._lineages: dict[str, _Lineage] = {}
        self._lock = threading.Lock()  # requests finish on several threads; swaps happen on others

    def _lineage(self, cluster: str, version: int) -> _Lineage:
        lin = self._lineages.get(cluster)
        if lin is None:
            lin = self._lineages[cluster] = _Lineage(version)
        return lin

    def swapped(self, cluster: str, version: int) -> None:
        """``version`` now serves ``cluster``'s lineage on this replica (a swap, a sync, a rollback)."""
        with self._lock:
            lin = self._lineage(cluster, version)
            if version == lin.version:  # e.g. an evicted cluster draft loaded again
                return
            if lin.version not in lin.rejected and lin.recent_total.enough(self.config):
                lin.baseline = (lin.version, lin.recent_total)
            if lin.baseline is not None and lin.baseline[0] > version:  # rolled away from: no longer trusted
                lin.baseline = None
            lin.version = version
            lin.recent, lin.recent_total = deque(), Totals()
            # Only a newer version than the proven one is judged: a rollback is never second-guessed.
            forward = lin.baseline is not None and version > lin.baseline[0]
            lin.watching = Totals() if forward else None

    def observe(self, cluster: str, version: int, stats: SpecStats) -> Verdict | None:
        """A finished request of ``cluster``'s lineage served by ``version``; a Verdict once the new
        version is judged (once per swap), else None."""
        with self._lock:
            lin = self._lineage(cluster, version)
            # Started before a swap: neither side's evidence. No decode forward (one token, or a prompt
            # scored with max_tokens 0): nothing about the draft, and it must not count towards min_requests.
            if version != lin.version or stats.target_forwards == 0:
                return None
            one, cfg = Totals.of(stats), self.config
            lin.recent.append(one)
            lin.recent_total.add(one)
            # Keep the newest requests that are just enough evidence: drop the oldest while the rest suffice.
            while len(lin.recent) > 1:
                rest = Totals(**vars(lin.recent_total))
                rest.add(lin.recent[0], sign=-1)
                if not rest.enough(cfg):
                    break
                lin.recent.popleft()
                lin.recent_total = rest
            if lin.watching is None:
                return None
            lin.watching.add(one)
            new = lin.watching
            if not new.enough(cfg):
                return None
            lin.watching = None  # judged: the next verdict needs the next swap
            old_version, old = lin.baseline  # type: ignore[misc]  # watching implies a baseline
            keep = 1.0 - cfg.margin
            worse = new.alpha < keep * old.alpha and new.tokens_per_forward - 1 < keep * (old.tokens_per_forward - 1)
            if worse:
                lin.rejected.add(version)
            verdict = (f"both fell by more than {cfg.margin:.0%}" if worse
                       else f"at least one of them is within {cfg.margin:.0%}")
            reason = f"served {new.describe()}, against v{old_version}'s {old.describe()}: {verdict}"
            return Verdict(cluster, version, old_version, worse, new, old, reason)

    def reopen(self, cluster: str, version: int) -> None:
        """Judge ``version`` afresh on its next requests (its rollback failed, e.g. the registry was down)."""
        with self._lock:
            lin = self._lineages.get(cluster)
            if lin is not None and lin.version == version and lin.baseline is not None:
                lin.rejected.discard(version)
                lin.watching = Totals()
