"""``osd distill``: its arguments and the command that builds the engine, buffer and registry
and runs ``trainers.replay.distill_replay``."""

from __future__ import annotations

import argparse

from cli.models import add_model_args, model_configs
from osd.config import SamplingParams
from osd.data.buffer import BufferConfig, RecordBuffer
from osd.data.workloads import chat_prompt_ids, load_questions
from osd.decoding.engine import build_engine
from osd.registry import DraftRegistry, RegistryConfig, RegistryError
from trainers.config import DistillConfig
from trainers.eagle import make_distiller
from trainers.gate import PromotionGate
from trainers.loop import load_live_draft
from trainers.replay import distill_replay


def add_distill_args(parser: argparse.ArgumentParser, model_args: bool = True) -> None:
    """Arguments of ``osd distill``; ``model_args`` also adds cli.main's --target ... --gamma."""
    parser.add_argument("data", nargs="?", default=None,
                        help="questions JSONL (Spec-Bench format; default: the vendored Spec-Bench questions)")
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
        add_model_args(parser)


_DISTILL_FIELDS = ("loss", "lr", "update_interval", "steps_per_update", "batch_size", "mode", "on_policy_ratio")


def run_distill_command(args: argparse.Namespace) -> int:
    """``osd distill``: build everything from ``args`` (see add_distill_args) and run distill_replay."""
    rows = load_questions(args.data, args.category)[: args.limit]
    if not rows:
        raise ValueError("no questions to replay: check --category and --limit")
    config = DistillConfig(device=args.device,
                           **{k: getattr(args, k) for k in _DISTILL_FIELDS if getattr(args, k, None) is not None})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    models, engine_cfg = model_configs(args)
    engine = build_engine(models, engine_cfg)
    registry = DraftRegistry.from_config(RegistryConfig(path=args.registry_path))
    try:
        live_version = load_live_draft(engine, registry, args.cluster)  # before the distiller copies the draft
    except RegistryError as e:
        raise ValueError(f"{e}\nThe registry at {args.registry_path} holds drafts for another model or draft "
                         "construction: pass a different --registry-path (or --cluster).") from e
    print(f"distilling on {len(rows)} questions from v{live_version} "
          f"({config.loss}, lr {config.lr}, update every {config.update_interval}, {config.mode}); "
          f"registry {args.registry_path}")
    distiller = make_distiller(engine.draft, config)
    gate = PromotionGate.from_config(config)
    prompts = (chat_prompt_ids(engine.tokenizer, row["turns"][0]) for row in rows)
    with RecordBuffer(BufferConfig(redis_url=args.redis_url)) as buffer:
        summary = distill_replay(engine, prompts, params, distiller, gate, buffer, registry, cluster=args.cluster,
                                 window=args.window)
    served = [w for w in summary["windows"] if w["requests"]] or summary["windows"]
    first, last = served[0], served[-1]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"done: {summary['requests']} requests, {summary['updates']} updates, {summary['promotions']} promotions; "
          f"α̂ {fmt(first['alpha_hat'])} (first window) → {fmt(last['alpha_hat'])} (last); live v{summary['live_version']}")
    return 0
