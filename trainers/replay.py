"""``osd distill``: replay prompts through the engine and distil its draft online, in one process.

The data path is the real one (DESIGN.md § Data flow) minus Ray: the engine serves each
prompt with the live draft, its training record goes through the Redis buffer, and the
same ``trainers.loop.TrainerLoop`` the trainer actor runs reads it through the consumer
group, trains, gates, publishes to the registry and acks. The engine is the loop's draft
holder, so a promoted draft is swapped into it by replacing one reference between requests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from osd.config import SamplingParams
from osd.data.buffer import BufferStats, RecordBuffer
from osd.decoding.engine import Generation, RequestError, SpeculativeEngine
from osd.registry import DraftRegistry
from trainers.config import TrainerSettings
from trainers.distiller import OnlineDistiller, UpdateResult
from trainers.gate import GateDecision, PromotionGate
from trainers.loop import TrainerLoop

log = logging.getLogger(__name__)


@dataclass
class WindowStats:
    """Engine and trainer activity over one window of requests."""

    index: int
    requests: int = 0
    beta_sum: float = 0.0
    beta_count: int = 0
    rounds: int = 0
    accepted: int = 0
    output_tokens: int = 0
    elapsed_s: float = 0.0  # engine time only: training is not charged to serving
    updates: int = 0
    promotions: int = 0
    gate_candidate_alpha: float | None = None  # the window's last gate decision
    gate_live_alpha: float | None = None
    live_version: int = 0  # at the window's end

    def add(self, gen: Generation) -> None:
        s = gen.stats
        self.requests += 1
        self.beta_sum += s.beta_sum
        self.beta_count += s.beta_count
        self.rounds += s.rounds
        self.accepted += s.accepted
        self.output_tokens += s.output_tokens
        self.elapsed_s += s.elapsed_s

    @property
    def alpha_hat(self) -> float | None:
        """Pooled over every verified position of the window (as SpecStats.alpha_hat per request)."""
        return self.beta_sum / self.beta_count if self.beta_count else None

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.accepted / self.rounds if self.rounds else 1.0

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "alpha_hat": self.alpha_hat, "mean_acceptance_length": self.mean_acceptance_length,
                "tokens_per_second": self.tokens_per_second}

    def line(self) -> str:
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        gate = (f" | gate α̂ cand {fmt(self.gate_candidate_alpha)} vs live {fmt(self.gate_live_alpha)}"
                if self.gate_candidate_alpha is not None else "")
        return (f"window {self.index:3d}: {self.requests} req | α̂ {fmt(self.alpha_hat)} | "
                f"acc len {self.mean_acceptance_length:.2f} | {self.tokens_per_second:6.1f} tok/s | "
                f"updates {self.updates} promoted {self.promotions}{gate} | live v{self.live_version}")


class _WindowTracker:
    """The loop's metrics sink here: it charges each update and gate decision to the current window."""

    def __init__(self) -> None:
        self.window = WindowStats(0)
        self.decisions: list[dict] = []

    def observe_update(self, cluster: str, result: UpdateResult, decision: GateDecision) -> None:
        self.window.updates += 1
        self.window.promotions += int(decision.promote)
        self.window.gate_candidate_alpha, self.window.gate_live_alpha = decision.candidate_alpha, decision.live_alpha
        self.decisions.append({"update": result.update, "loss": result.loss, **asdict(decision)})

    def observe_backlog(self, stats: BufferStats) -> None:
        pass


# The replay drives the loop itself: no pausing for load, no idle flush, and a short block on
# an empty read (a pushed record is already there when the loop reads).
REPLAY_SETTINGS = TrainerSettings(pause_when_busy=False, flush_idle_s=None, poll_interval_s=0.05)


def distill_replay(
    engine: SpeculativeEngine,
    prompts: Iterable[list[int]],
    params: SamplingParams,
    distiller: OnlineDistiller,
    gate: PromotionGate,
    buffer: RecordBuffer,
    registry: DraftRegistry,
    *,
    cluster: str = "global",
    window: int = 8,
    consumer: str | None = None,
    flush: bool = True,
    log_line: Callable[[str], None] | None = print,
) -> dict:
    """Serve ``prompts`` one by one and distil the engine's draft online; see the module docstring.

    The engine starts from the registry's live draft for ``cluster`` (as a new replica would).
    Prints (via ``log_line``) one line per ``window`` requests. ``flush`` trains on the
    records still waiting at the end (and gates the result), so every buffered record is
    used and acked. Returns {"windows": [...], "decisions": [...], "live_version", "requests",
    "updates", "promotions"}.
    """
    if engine.draft is None:
        raise ValueError("distillation needs a draft: build the engine with a draft (e.g. --draft self), not 'none'")
    if not engine.config.record:
        raise ValueError("the engine does not build training records: set EngineConfig(record=True)")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    tracker = _WindowTracker()
    loop = TrainerLoop(engine.draft, buffer, registry, distiller.config, REPLAY_SETTINGS, cluster=cluster,
                       consumer=consumer or f"distill-{os.getpid()}", holder=engine, distiller=distiller, gate=gate,
                       metrics=tracker)
    windows: list[WindowStats] = []
    tracker.window.live_version = loop.live.version

    def close_window() -> None:
        tracker.window.live_version = loop.live.version
        windows.append(tracker.window)
        if log_line:
            log_line(tracker.window.line())
        tracker.window = WindowStats(len(windows), live_version=loop.live.version)

    requests = 0
    for prompt in prompts:
        try:
            gen = engine.generate(prompt, params, draft_version=loop.live.version, cluster=cluster)
        except RequestError as e:
            log.warning("skipping a prompt: %s", e)
            continue
        requests += 1
        tracker.window.add(gen)
        buffer.push(gen.record)
        while loop.step():  # read what is there (our record, or an earlier run's leftovers), train, gate, ack
            pass
        if tracker.window.requests == window:
            close_window()
    if flush:
        while loop.step():
            pass
        loop.flush()
    if tracker.window.requests or tracker.window.updates:
        close_window()
    return {"windows": [w.as_dict() for w in windows], "decisions": tracker.decisions,
            "live_version": loop.live.version, "requests": requests, "updates": distiller.updates,
            "promotions": sum(w.promotions for w in windows)}
