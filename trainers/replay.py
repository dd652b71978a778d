"""``osd distill``: replay prompts through the engine and distil its draft online, in one process.

The data path is the real one (DESIGN.md § Data flow) minus Ray: the engine serves each
prompt with the live draft, its training record goes through the Redis buffer (push, read
via the consumer group, ack after use), the distiller trains on it, the gate compares the
candidate with the live draft on held-out records, and a promoted draft is published to the
registry and swapped into the engine by replacing one reference between requests.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from osd.config import SamplingParams
from osd.engine import Generation, RequestError, SpeculativeEngine
from osd.models import load_published_state, published_specs
from osd.registry import DraftRegistry, RegistryError
from trainers.distiller import OnlineDistiller, UpdateResult
from trainers.gate import GateDecision, PromotionGate

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


@dataclass
class _Live:
    version: int
    decisions: list[dict] = field(default_factory=list)


def load_live_draft(engine: SpeculativeEngine, registry: DraftRegistry, cluster: str = "global") -> int:
    """Start from the registry's live draft for ``cluster``, as a new replica would; returns its version.

    0 (and the engine's draft untouched) when the cluster has no live version yet.
    """
    if engine.draft is None:
        raise ValueError("distillation needs a draft: build the engine with a draft (e.g. --draft self), not 'none'")
    manifest = registry.live(cluster)
    if manifest is None:
        return 0
    live = engine.draft
    state = registry.load_validated(cluster, manifest.version, published_specs(live, manifest.tensors))
    engine.draft = load_published_state(live, state)  # beside the live one
    return manifest.version


def distill_replay(
    engine: SpeculativeEngine,
    prompts: Iterable[list[int]],
    params: SamplingParams,
    distiller: OnlineDistiller,
    gate: PromotionGate,
    buffer=None,  # osd.buffer.RecordBuffer | None: records go through Redis when given
    registry: DraftRegistry | None = None,
    *,
    cluster: str = "global",
    window: int = 8,
    live_version: int = 0,
    consumer: str | None = None,
    flush: bool = True,
    log_line: Callable[[str], None] | None = print,
) -> dict:
    """Serve ``prompts`` one by one and distil the engine's draft online; see the module docstring.

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
    consumer = consumer or f"distill-{os.getpid()}"
    live = _Live(live_version)
    windows: list[WindowStats] = []
    current = WindowStats(0, live_version=live_version)
    unacked: list[tuple[str, str]] = []  # (entry id, request id), oldest first

    def ack_settled() -> None:
        # Ack only what the distiller no longer holds as pending: trained on, or held out.
        nonlocal unacked
        waiting = {r.request_id for r in distiller.pending_records}
        done = [eid for eid, rid in unacked if rid not in waiting]
        if done:
            buffer.ack(cluster, done)
        unacked = [(eid, rid) for eid, rid in unacked if rid in waiting]

    def on_update(result: UpdateResult) -> None:
        decision = gate.decide(distiller.draft, engine.draft, distiller.holdout, distiller.holdout_ages())
        current.updates += 1
        current.gate_candidate_alpha, current.gate_live_alpha = decision.candidate_alpha, decision.live_alpha
        live.decisions.append({"update": result.update, "loss": result.loss, **asdict(decision)})
        if decision.promote:
            _promote(engine, distiller, registry, cluster, live, result, decision)
            current.promotions += 1
            live.decisions[-1]["version"] = live.version
        log.debug("update %d: loss %.4f, %s", result.update, result.loss, decision.reason)

    def feed(records) -> None:
        for result in distiller.add(records):
            on_update(result)

    requests = 0
    for prompt in prompts:
        try:
            gen = engine.generate(prompt, params, draft_version=live.version, cluster=cluster)
        except RequestError as e:
            log.warning("skipping a prompt: %s", e)
            continue
        requests += 1
        current.add(gen)
        if buffer is None:
            feed([gen.record])
        else:
            buffer.push(gen.record)
            entries = buffer.read(consumer, count=64, clusters=[cluster])
            unacked += [(eid, rec.request_id) for eid, rec in entries]
            feed([rec for _, rec in entries])
            ack_settled()
        if current.requests == window:
            current.live_version = live.version
            windows.append(current)
            if log_line:
                log_line(current.line())
            current = WindowStats(len(windows), live_version=live.version)
    if flush:
        if buffer is not None:  # anything pushed but not yet read (e.g. by an earlier crashed run)
            while entries := buffer.read(consumer, count=64, clusters=[cluster]):
                unacked += [(eid, rec.request_id) for eid, rec in entries]
                feed([rec for _, rec in entries])
        if (result := distiller.maybe_update(force=True)) is not None:
            on_update(result)
        if buffer is not None:
            ack_settled()
    if current.requests or current.updates:
        current.live_version = live.version
        windows.append(current)
        if log_line:
            log_line(current.line())
    return {"windows": [w.as_dict() for w in windows], "decisions": live.decisions, "live_version": live.version,
            "requests": requests, "updates": distiller.updates, "promotions": sum(w.promotions for w in windows)}


def _promote(engine: SpeculativeEngine, distiller: OnlineDistiller, registry: DraftRegistry | None, cluster: str,
             live: _Live, result: UpdateResult, decision: GateDecision) -> None:
    """Publish the candidate, then swap it into the engine: the swap is one reference assignment."""
    state = distiller.export_state_dict()
    if registry is None:
        live.version += 1
        engine.draft = load_published_state(engine.draft, state)
        return
    cfg = distiller.config
    manifest = registry.publish(cluster, state, parent=live.version, loss=result.loss,
                                gate_alpha=decision.candidate_alpha,
                                meta={"loss_name": cfg.loss, "mode": cfg.mode, "records_seen": result.records_seen})
    # Load it back the way a serving replica does (checksum + names/shapes/dtypes), beside the live draft.
    specs = published_specs(engine.draft, state)
    engine.draft = load_published_state(engine.draft, registry.load_validated(cluster, manifest.version, specs))
    live.version = manifest.version


# --------------------------------------------------------------------------- command line


def add_distill_args(parser: argparse.ArgumentParser, model_args: bool = True) -> None:
    """Arguments of ``osd distill``; ``model_args`` also adds osd.cli's --target ... --gamma."""
    parser.add_argument("data", nargs="?", default=None,
                        help="questions JSONL (Spec-Bench format; default: ../shared/data/spec_bench_questions.jsonl)")
    parser.add_argument("--category", action="append", default=None, help="only this category (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="replay at most this many questions (file order)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="serving temperature; 0 = greedy")
    parser.add_argument("--window", type=int, default=8, help="print one progress line per this many requests")
    parser.add_argument("--cluster", default="global", help="cluster name for the buffer stream and registry lineage")
    parser.add_argument("--redis-url", default=None,
                        help="redis://host:port/db of the record buffer (default: start an embedded redis-server)")
    parser.add_argument("--registry-path", default=".osd/registry", help="directory of the draft registry")
    g = parser.add_argument_group("distillation (defaults: trainers.config.DistillConfig)")
    g.add_argument("--loss", choices=["fkl", "rkl", "jsd", "tvd"], default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--update-interval", type=int, default=None, help="training records per update")
    g.add_argument("--steps-per-update", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="records per optimizer step")
    g.add_argument("--mode", choices=["full", "lora"], default=None)
    g.add_argument("--on-policy-ratio", type=float, default=None,
                   help="weight r of the on-policy rows' loss: (1-r)·all rows + r·on-policy rows")
    if model_args:
        from osd.cli import _add_model_args

        _add_model_args(parser)


_DISTILL_FIELDS = ("loss", "lr", "update_interval", "steps_per_update", "batch_size", "mode", "on_policy_ratio")


def run_distill_command(args: argparse.Namespace) -> int:
    """``osd distill``: build everything from ``args`` (see add_distill_args) and run distill_replay."""
    from osd.buffer import BufferConfig, RecordBuffer
    from osd.cli import _model_config
    from osd.data import chat_prompt_ids, load_questions
    from osd.engine import build_engine
    from osd.registry import RegistryConfig
    from trainers.config import DistillConfig

    rows = load_questions(args.data, args.category)[: args.limit]
    if not rows:
        raise ValueError("no questions to replay: check --category and --limit")
    config = DistillConfig(device=args.device,
                           **{k: getattr(args, k) for k in _DISTILL_FIELDS if getattr(args, k, None) is not None})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    models, engine_cfg = _model_config(args)
    engine = build_engine(models, engine_cfg)
    registry = DraftRegistry.from_config(RegistryConfig(path=args.registry_path))
    try:
        live_version = load_live_draft(engine, registry, args.cluster)
    except RegistryError as e:
        raise ValueError(f"{e}\nThe registry at {args.registry_path} holds drafts for another model or draft "
                         "construction: pass a different --registry-path (or --cluster).") from e
    print(f"distilling on {len(rows)} questions from v{live_version} "
          f"({config.loss}, lr {config.lr}, update every {config.update_interval}, {config.mode}); "
          f"registry {args.registry_path}")
    distiller = OnlineDistiller(engine.draft, config)
    gate = PromotionGate.from_config(config)
    prompts = (chat_prompt_ids(engine.tokenizer, row["turns"][0]) for row in rows)
    with RecordBuffer(BufferConfig(redis_url=args.redis_url)) as buffer:
        summary = distill_replay(engine, prompts, params, distiller, gate, buffer, registry, cluster=args.cluster,
                                 window=args.window, live_version=live_version)
    first, last = summary["windows"][0], summary["windows"][-1]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"done: {summary['requests']} requests, {summary['updates']} updates, {summary['promotions']} promotions; "
          f"α̂ {fmt(first['alpha_hat'])} (first window) → {fmt(last['alpha_hat'])} (last); live v{summary['live_version']}")
    return 0
