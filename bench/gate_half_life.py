"""Offline check of the promotion gate's half-life: a phased stream replayed through the distiller.

Uses the records `make bench-clusters` leaves in bench/results/clusters_records.osdr (32 per
category; the first 24 of each feed the stream in phases, the last 8 are the phase's
evaluation set). For each half-life, the live draft's α̂ on the current phase's evaluation
set after 12 and 24 of its records, and the promotions so far. No target forward: the
records hold the teacher rows.

    .venv/bin/python bench/gate_half_life.py 0 16   # 0 = every held-out record weighs alike
"""

import json
import sys

import torch

from bench.distill import load_records
from osd.config import EngineConfig, ModelConfig
from osd.data.workloads import load_questions
from osd.decoding.engine import build_engine
from osd.models.drafts import DraftModel, build_self_draft
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller
from trainers.gate import PromotionGate

PHASES = ["math_reasoning", "translation", "summarization", "qa"]


def replay(base: DraftModel, stream: dict, held: dict, half_life: float) -> list[tuple]:
    cfg = DistillConfig(lr=3e-3, steps_per_update=4, update_interval=8, freeze_embeddings=True, freeze_head=True,
                        gate_half_life=half_life)  # the drift bench's trainer
    distiller, gate, live, promotions, out = OnlineDistiller(base, cfg), PromotionGate.from_config(cfg), base, 0, []
    for phase in PHASES:
        for i, record in enumerate(stream[phase]):
            for _ in distiller.add(record):
                if gate.decide(distiller.draft, live, distiller.holdout, distiller.holdout_ages()).promote:
                    live, promotions = distiller.candidate(), promotions + 1
            if i + 1 in (12, 24):
                out.append((phase, i + 1, round(gate.evaluate(live, held[phase]), 3), promotions))
                print(f"half-life {half_life:g}: {phase} after {i + 1}: live α̂ {out[-1][2]:.3f}, "
                      f"{promotions} promotions", flush=True)
    return out


def main() -> None:
    torch.manual_seed(0)
    records, meta = load_records("bench/results/clusters_records.osdr")
    category = {q["question_id"]: q["category"] for q in load_questions(None, PHASES)}
    cats = [category[i] for i in meta["question_ids"]]
    n_stream = len(records) * 3 // 4  # bench clusters stores the stream, then the held-out rows
    stream = {c: [r for r, k in zip(records[:n_stream], cats[:n_stream]) if k == c] for c in PHASES}
    held = {c: [r for r, k in zip(records[n_stream:], cats[n_stream:]) if k == c] for c in PHASES}
    engine = build_engine(ModelConfig(target=meta["target"], draft="none", torch_threads=1), EngineConfig(speculation="always"))
    base = DraftModel(build_self_draft(engine.target, meta["draft_layers"])).eval()
    results = {h: replay(base, stream, held, float(h)) for h in sys.argv[1:] or ["0", "16"]}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
