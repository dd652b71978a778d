"""The model options every command shares (--target, --draft, ... --gamma) and their configs."""

from __future__ import annotations

import argparse

from osd.config import EngineConfig, ModelConfig


def parse_layers(text: str) -> int | list[int]:
    try:
        return [int(x) for x in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or comma-separated layer indices, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", default="smollm2", help="target model: 'smollm2' (packaged), an HF dir or hub id")
    g.add_argument("--draft", default="self", help="'self' (the target's first layers), 'eagle' (a one-layer head over "
                                                   "the target's hidden states), 'none', or an HF dir/hub id")
    g.add_argument("--draft-layers", type=parse_layers, default=2,
                   help="self-draft layers: a count (first N) or comma-separated target layer indices, e.g. 0,1,28,29")
    g.add_argument("--shortlist", default=None, help="JSON list of token ids for the draft's shortlist LM head")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto: bfloat16 where the hardware does it well (AVX512-BF16/AMX-BF16 CPUs, "
                        "CUDA with bf16), else float32")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--gamma", type=int, default=4, help="draft tokens proposed per round")
    g.add_argument("--speculation", default="auto", choices=["auto", "always"],
                   help="auto: draft only while it pays on this machine (plain decoding otherwise, probing now and "
                        "then); always: draft every round")


def model_configs(args, **models) -> tuple[ModelConfig, EngineConfig]:
    """The --target/--draft/... options as configs; ``models`` overrides ModelConfig fields."""
    fields = dict(target=args.target, draft=args.draft, draft_layers=args.draft_layers, shortlist=args.shortlist,
                  device=args.device, dtype=args.dtype, torch_threads=args.threads)
    return ModelConfig(**(fields | models)), EngineConfig(gamma=args.gamma, speculation=args.speculation)
