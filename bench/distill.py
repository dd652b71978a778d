"""`osd bench distill`: online distillation on one Spec-Bench category, end to end.

Three phases, all on the same prompts (the category's first ``stream`` questions are the
traffic, its last ``heldout`` questions are never trained on):

A. Records. The target alone serves every prompt (greedy); each request's TrainingRecord
   (top-k teacher rows for every emitted token) is kept. These target-generated records are
   the shared stream phase B compares draft constructions on. Cached as codec bytes
   (never pickle) so a rerun can skip this phase (``--reuse-records``).
B. Draft constructions. Each construction (which target layers, what is trained) is distilled
   on the stream records in stream order with the same OnlineDistiller settings phase C uses,
   then judged on the held-out records: α̂ (PromotionGate's Σ min(p, q) on the teacher rows,
   no generation), greedy top-1 agreement (what greedy acceptance actually tests), the draft
   step cost c, a predicted speedup, and, for the most promising variants, *measured*
   end-to-end tokens/s of the engine against the target alone, prompt by prompt in turn.
   Every construction is scored with the full LM head and with a shortlist head; the shortlist
   variant shares the full-head training run (see ``_view``). The learning rate is picked by a
   small sweep on a prefix of the stream, validated on the stream's tail (never the held-out set).
C. Online run with the winner (by measured tokens/s): held-out before (untrained draft), then
   the stream served through ``distill_replay`` with the real Redis buffer, a file registry,
   the promotion gate and draft hot-swaps, recording the learning curve; then held-out after.

The core (``run_distill_bench``) takes models and token-id prompts, so tests run it on tiny
random models; ``run_distill_bench_command`` is the SmolLM2 command line around it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from bench.report import environment, save_figure, table, update_doc_section, write_json
from osd.config import EngineConfig, SamplingParams
from osd.data.codec import decode_record, encode_record
from osd.data.records import TrainingRecord
from osd.decoding.cost import forward_cost_curve
from osd.decoding.engine import SpeculativeEngine
from osd.models.drafts import DraftModel, build_self_draft
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller, UpdateResult, collate, student_logits
from trainers.gate import GateDecision, PromotionGate
from trainers.losses import estimated_acceptance
from trainers.shortlist import TokenTally, coverage

ALPHA_GOAL = 0.6  # the target for held-out α̂


# --------------------------------------------------------------------------- constructions


@dataclass(frozen=True)
class Construction:
    """How a self-draft is cut from the target and which of its parameters are trained."""

    name: str
    description: str
    layers: Callable[[int], int | list[int]]  # target depth → build_self_draft's `layers`
    mode: str = "full"  # DistillConfig.mode
    freeze_embeddings: bool = False
    freeze_head: bool = False
    freeze_layers: tuple[int, ...] = ()  # draft layer indices

    @property
    def lr_family(self) -> str:
        """Constructions in one family share the swept learning rate."""
        return "lora" if self.mode == "lora" else "full"


CONSTRUCTIONS: dict[str, Construction] = {c.name: c for c in [
    Construction("first2", "first 2 layers, full fine-tuning", lambda n: 2),
    Construction("first4", "first 4 layers, full fine-tuning", lambda n: min(4, n)),
    Construction("first6", "first 6 layers, full fine-tuning", lambda n: min(6, n)),
    Construction("early_late", "layers 0, 1 and the last two (0,1,28,29 on SmolLM2), full fine-tuning",
                 lambda n: sorted({0, 1, n - 2, n - 1})),
    # Kangaroo-style: a frozen shallow sub-network (an exact copy of the target's first layers) plus
    # one trainable adapter layer under the frozen LM head. The adapter starts as a copy of layer 2
    # (the natural continuation of layers 0-1); "kangaroo_late" starts it from the last layer.
    Construction("kangaroo", "layers 0, 1 frozen + one trainable adapter layer (init: layer 2); embeddings "
                             "and head frozen", lambda n: [0, 1, 2],
                 freeze_embeddings=True, freeze_head=True, freeze_layers=(0, 1)),
    Construction("kangaroo_late", "layers 0, 1 frozen + one trainable adapter layer (init: the last layer); "
                                  "embeddings and head frozen", lambda n: [0, 1, n - 1],
                 freeze_embeddings=True, freeze_head=True, freeze_layers=(0, 1)),
    Construction("first2_frozen", "first 2 layers, embeddings and head frozen", lambda n: 2,
                 freeze_embeddings=True, freeze_head=True),
    Construction("first2_lora", "first 2 layers, LoRA (r=8, all linears but the head)", lambda n: 2, mode="lora"),
]}
DEFAULT_CONSTRUCTIONS = ("first2", "first6", "early_late", "kangaroo", "first2_frozen", "first2_lora")
HEADS = ("full", "shortlist")


@dataclass
class DistillBenchSettings:
    """Every knob of the benchmark; the defaults are the full run (~30 min on 2 CPU cores)."""

    max_tokens: int = 96
    teacher_top_k: int = 64
    constructions: tuple[str, ...] = DEFAULT_CONSTRUCTIONS
    heads: tuple[str, ...] = HEADS
    shortlist_size: int = 4096
    gammas: tuple[int, ...] = (2, 3, 4)
    # distillation, shared by phases B and C (OSD: update every 8 requests, FKL, AdamW)
    loss: str = "fkl"
    update_interval: int = 8
    steps_per_update: int = 4
    batch_size: int = 8
    holdout_fraction: float = 0.2  # of the stream, for the promotion gate (DistillConfig's default)
    on_policy_ratio: float = 0.5  # phase C only: target-generated records carry no draft proposals
    lr: float | None = None  # None: sweep lr_grid (full-weight constructions)
    lora_lr: float | None = None  # None: sweep lr_grid (LoRA constructions)
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    lora_lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # adapters usually want ~10x the full-weight lr
    sweep_records: int = 24  # stream prefix the sweep trains on
    sweep_val_records: int = 12  # the stream records right after it validate (never the held-out set)
    # measurement
    e2e_prompts: int = 6  # held-out prompts per construction for measured tokens/s
    e2e_max: int = 4  # measure at most this many variants end to end, best predicted first
    window: int = 8  # phase C: requests per learning-curve window
    timing_context: int = 200
    timing_reps: int = 20
    seed: int = 0

    @classmethod
    def quick(cls) -> DistillBenchSettings:
        """A smoke test in a few minutes: tiny numbers, two constructions."""
        return cls(max_tokens=24, constructions=("first2", "kangaroo"), update_interval=2, steps_per_update=1,
                   batch_size=4, lr_grid=(1e-3, 3e-3), sweep_records=4, sweep_val_records=2, e2e_prompts=2, e2e_max=4,
                   window=2, timing_reps=5)


# --------------------------------------------------------------------------- phase A: records


def _serve(engine: SpeculativeEngine, prompt: list[int], params: SamplingParams):
    return engine.generate(prompt, params)


def collect_records(target: PreTrainedModel, tokenizer, prompts: Sequence[list[int]], max_tokens: int,
                    top_k: int = 64, progress: bool = True) -> tuple[list[TrainingRecord], list[dict]]:
    """The target alone serves every prompt (greedy); returns (records, per-request timing)."""
    engine = SpeculativeEngine(target, tokenizer, None, EngineConfig(speculation="always", teacher_top_k=top_k, record=True))
    params = SamplingParams(max_tokens=max_tokens)
    _serve(engine, prompts[0][:16], SamplingParams(max_tokens=4))  # warm-up: one-off kernel setup
    records, timing = [], []
    for prompt in tqdm(prompts, desc="A: target-only records", unit="req", disable=not progress):
        gen = _serve(engine, prompt, params)
        records.append(gen.record)
        timing.append({"tokens": gen.stats.output_tokens, "seconds": gen.stats.elapsed_s})
    return records, timing


_CACHE_MAGIC = b"OSDRECS1"


def save_records(path: str | Path, records: Sequence[TrainingRecord], meta: dict) -> Path:
    """``magic | u32 len | meta JSON | (u32 len | codec bytes)*``: the records' own wire format, no pickle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps(meta).encode()
    chunks = [_CACHE_MAGIC, struct.pack("<I", len(header)), header]
    for rec in records:
        data = encode_record(rec)
        chunks += [struct.pack("<I", len(data)), data]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(path)
    return path


def load_records(path: str | Path) -> tuple[list[TrainingRecord], dict]:
    data = Path(path).read_bytes()
    if not data.startswith(_CACHE_MAGIC):
        raise ValueError(f"{path} is not an osd records cache; delete it or drop --reuse-records")
    at = len(_CACHE_MAGIC)
    (n,) = struct.unpack_from("<I", data, at)
    meta = json.loads(data[at + 4: at + 4 + n])
    at += 4 + n
    records = []
    while at < len(data):
        (n,) = struct.unpack_from("<I", data, at)
        records.append(decode_record(data[at + 4: at + 4 + n]))
        at += 4 + n
    return records, meta


def bytes_per_position(records: Sequence[TrainingRecord]) -> dict:
    """Encoded bytes per emitted position: everything (prompt, header, rounds) and the teacher rows alone."""
    total = sum(len(encode_record(r)) for r in records)
    positions = sum(r.num_positions for r in records)
    k = records[0].top_k if records else 0
    largest = max((int(r.teacher_token_ids.max()) for r in records if r.num_positions), default=0)
    id_bytes = 2 if largest <= 0xFFFF else 4  # the codec's uint16 / int32 choice
    return {"records": len(records), "positions": positions, "bytes": total,
            "bytes_per_position": total / positions if positions else 0.0,
            "teacher_row_bytes": k * id_bytes + k * 2 + 4 + id_bytes, "top_k": k}


# --------------------------------------------------------------------------- measurement helpers


def build_shortlist(records: Sequence[TrainingRecord], size: int, vocab: int) -> torch.Tensor:
    """The `size` token ids carrying the most teacher mass in `records` (the stream only), as the
    trainer grows a shortlist from traffic (trainers.shortlist.TokenTally)."""
    tally = TokenTally(vocab)
    tally.add(records)
    return tally.shortlist(size)


@torch.inference_mode()
def score_draft(draft: DraftModel, records: Sequence[TrainingRecord], batch_size: int = 8,
                max_seq_len: int = 1024) -> dict:
    """Held-out quality from stored teacher rows, no generation.

    alpha_hat: PromotionGate.score's α̂ (pooled Σ min(p, q) on the k+1 teacher bins);
    top1: the draft's argmax equals the target's (what greedy verification accepts);
    top4: the target's argmax is in the draft's top 4 (what a width-4 tree could accept).
    """
    was_training = draft.training
    draft.eval()
    device = next(draft.parameters()).device
    alpha = top1 = top4 = 0.0
    rows = 0
    try:
        for i in range(0, len(records), batch_size):
            batch = collate(list(records[i: i + batch_size]), max_seq_len, device)
            if batch is None:
                continue
            logits = student_logits(draft, batch)  # [N, V]
            n = batch.num_rows
            alpha += float(estimated_acceptance(logits, batch.teacher_ids, batch.teacher_logprobs,
                                                batch.teacher_logsumexp)) * n
            best = batch.teacher_ids[:, :1].long()  # [N, 1]: torch.topk sorts, so column 0 is the argmax
            rank = (logits > logits.gather(1, best)).sum(-1)  # [N]
            top1 += float((rank == 0).sum())
            top4 += float((rank < 4).sum())
            rows += n
    finally:
        draft.train(was_training)
    if not rows:
        return {"alpha_hat": 0.0, "top1": 0.0, "top4": 0.0, "rows": 0}
    return {"alpha_hat": alpha / rows, "top1": top1 / rows, "top4": top4 / rows, "rows": rows}


def draft_step_ms(draft: DraftModel, context: int = 200, reps: int = 40) -> float:
    """ms of one 1-token draft forward on a `context`-token KV cache, as the Drafter runs it."""
    return forward_cost_curve(draft, ks=(1,), context=context, reps=reps)[1]


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """(1 - α^(γ+1)) / (1 - α): accepted drafts plus the bonus/recovered token, i.i.d. acceptance."""
    return float(gamma + 1) if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, gamma: int, c: float, v: float) -> float:
    """Tokens per round over the round's cost in target steps: γ draft steps (c each) + one γ+1-token verify (v)."""
    return expected_tokens_per_round(alpha, gamma) / (gamma * c + v)


def serve_interleaved(engines: dict[str, SpeculativeEngine], prompts: Sequence[list[int]], params: SamplingParams,
                      reference: str | None = "target", progress: bool = True, desc: str = "serve") -> dict[str, dict]:
    """Every engine serves each prompt in turn (order rotated per prompt), so drift hits all alike.

    Per engine: pooled tokens/s (Σ tokens / Σ seconds), α̂ pooled over verified positions, mean
    acceptance length (1 + accepted / rounds), whether every output equals the reference's and, for
    each that does not, the token where it parts.
    """
    names = list(engines)
    for name in names:  # warm-up
        _serve(engines[name], prompts[0][:16], SamplingParams(max_tokens=4))
    acc = {n: {"tokens": 0, "seconds": 0.0, "beta_sum": 0.0, "beta_count": 0, "rounds": 0, "accepted": 0,
               "proposed": 0, "target_forwards": 0, "outputs": []} for n in names}
    for i, prompt in enumerate(tqdm(prompts, desc=desc, unit="prompt", disable=not progress)):
        for name in names[i % len(names):] + names[: i % len(names)]:
            gen = _serve(engines[name], prompt, params)
            a, s = acc[name], gen.stats
            a["tokens"] += s.output_tokens
            a["seconds"] += s.elapsed_s
            a["beta_sum"] += s.beta_sum
            a["beta_count"] += s.beta_count
            a["rounds"] += s.rounds
            a["accepted"] += s.accepted
            a["proposed"] += s.proposed
            a["target_forwards"] += s.target_forwards
            a["outputs"].append(gen.output_ids)
    out = {}
    for name, a in acc.items():
        out[name] = {
            "prompts": len(prompts), "tokens": a["tokens"], "seconds": a["seconds"],
            "tokens_per_s": a["tokens"] / a["seconds"] if a["seconds"] else 0.0,
            "alpha_hat": a["beta_sum"] / a["beta_count"] if a["beta_count"] else None,
            "mean_acceptance_length": 1.0 + a["accepted"] / a["rounds"] if a["rounds"] else 1.0,
            "rounds": a["rounds"], "proposed": a["proposed"], "accepted": a["accepted"],
            "target_forwards_per_token": a["target_forwards"] / a["tokens"] if a["tokens"] else None,
        }
        if reference in acc:
            ref = acc[reference]["outputs"]
            out[name]["same_output"] = a["outputs"] == ref
            # where an output parts from the reference's: greedy bf16 can flip a near-tie
            out[name]["first_divergence"] = [next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y),
                                                  min(len(mine), len(theirs)))
                                             for mine, theirs in zip(a["outputs"], ref, strict=True) if mine != theirs]
    if reference in out:
        base = out[reference]["tokens_per_s"]
        for o in out.values():
            o["speedup_vs_target"] = o["tokens_per_s"] / base if base else None
    return out


# --------------------------------------------------------------------------- training helpers


class _TracedDistiller(OnlineDistiller):
    """An OnlineDistiller that remembers what it trained on, when, and how big the records were."""

    def __init__(self, draft: DraftModel, config: DistillConfig):
        super().__init__(draft, config)
        self.results: list[UpdateResult] = []
        self.trained: list[TrainingRecord] = []
        self.encoded_bytes = 0
        self.encoded_positions = 0

    @property
    def trained_records(self) -> int:
        return sum(r.records for r in self.results)

    def add(self, records):
        records = [records] if isinstance(records, TrainingRecord) else list(records)
        for rec in records:
            self.encoded_bytes += len(encode_record(rec))
            self.encoded_positions += rec.num_positions
        return super().add(records)

    def update(self) -> UpdateResult:
        self.trained += self._pending
        result = super().update()
        self.results.append(result)
        return result


class _CurveGate(PromotionGate):
    """The promotion gate, plus a learning-curve point per decision on the fixed held-out records.

    The distiller trains the full LM head (forward KL against a shortlist head is infinite
    wherever the teacher's top-k leaves the shortlist); with a shortlist the candidate is
    judged, like the live draft, through that shortlist.
    """

    def __init__(self, distiller: _TracedDistiller, curve_records: Sequence[TrainingRecord],
                 shortlist: torch.Tensor | None, **kw):
        super().__init__(**kw)
        self.distiller = distiller
        self.curve_records = list(curve_records)
        self.shortlist = shortlist
        self.curve: list[dict] = []

    def decide(self, candidate: DraftModel, live: DraftModel, holdout, ages=None) -> GateDecision:
        start = time.perf_counter()
        cand = _view(candidate, self.shortlist)
        decision = super().decide(cand, live, holdout, ages)
        gate_s = time.perf_counter() - start
        score = score_draft(cand, self.curve_records, self.batch_size, self.max_seq_len)
        last = self.distiller.results[-1]
        self.curve.append({
            "update": last.update, "records_trained": self.distiller.trained_records,
            "records_seen": last.records_seen, "loss": last.loss, "train_s": last.seconds, "gate_s": gate_s,
            "gate_candidate_alpha": decision.candidate_alpha, "gate_live_alpha": decision.live_alpha,
            "gate_rows": decision.rows, "promoted": decision.promote,
            "heldout_alpha_hat": score["alpha_hat"], "heldout_top1": score["top1"], "heldout_top4": score["top4"],
        })
        return decision


def _view(draft: DraftModel, shortlist: torch.Tensor | None) -> DraftModel:
    """The same weights behind another head: a shortlist view shares every parameter."""
    return DraftModel(draft.model, shortlist) if shortlist is not None else DraftModel(draft.model)


def make_draft(target: PreTrainedModel, cons: Construction) -> DraftModel:
    return DraftModel(build_self_draft(target, cons.layers(target.config.num_hidden_layers))).eval()


def distill_config(cons: Construction, lr: float, s: DistillBenchSettings, on_policy_ratio: float = 0.0) -> DistillConfig:
    return DistillConfig(loss=s.loss, lr=lr, update_interval=s.update_interval, steps_per_update=s.steps_per_update,
                         batch_size=s.batch_size, holdout_fraction=s.holdout_fraction, on_policy_ratio=on_policy_ratio,
                         mode=cons.mode, freeze_embeddings=cons.freeze_embeddings, freeze_head=cons.freeze_head,
                         freeze_layers=list(cons.freeze_layers), seed=s.seed,
                         shortlist_size=0)  # heads are compared here with one fixed shortlist, not grown


def train_on_stream(draft: DraftModel, records: Sequence[TrainingRecord], config: DistillConfig) -> _TracedDistiller:
    """Online distillation on `records` in order: an update every `update_interval`, the rest flushed at the end."""
    distiller = _TracedDistiller(draft, config)
    for rec in records:
        distiller.add(rec)
    distiller.maybe_update(force=True)
    return distiller


def lr_sweep(target: PreTrainedModel, cons: Construction, train: Sequence[TrainingRecord],
             val: Sequence[TrainingRecord], s: DistillBenchSettings, grid: Sequence[float]) -> dict:
    """Train `cons` on `train` at each lr of `grid`; pick the best α̂ on `val` (stream records, not held-out)."""
    base = make_draft(target, cons)
    rows = []
    for lr in grid:
        start = time.perf_counter()
        dist = train_on_stream(base, train, distill_config(cons, lr, s))
        score = score_draft(dist.draft, val, s.batch_size)
        rows.append({"lr": lr, **score, "updates": len(dist.results),
                     "last_loss": dist.results[-1].loss if dist.results else None,
                     "seconds": time.perf_counter() - start})
        del dist
    best = max(rows, key=lambda r: r["alpha_hat"])
    return {"construction": cons.name, "train_records": len(train), "val_records": len(val), "rows": rows,
            "chosen": best["lr"]}


# --------------------------------------------------------------------------- the benchmark


def run_distill_bench(target: PreTrainedModel, tokenizer, stream_prompts: Sequence[list[int]],
                      heldout_prompts: Sequence[list[int]], settings: DistillBenchSettings | None = None, *,
                      records: Sequence[TrainingRecord] | None = None, phase_a: dict | None = None,
                      redis_url: str | None = None, progress: bool = True,
                      log: Callable[[str], None] = tqdm.write) -> dict:
    """Phases A–C (module docstring) on injected models and token-id prompts; returns the result dict.

    ``records``: phase A's records for ``stream_prompts + heldout_prompts`` if already made
    (with ``phase_a`` their timing summary); otherwise phase A runs here.
    """
    s = settings or DistillBenchSettings()
    unknown = [c for c in s.constructions if c not in CONSTRUCTIONS]
    if unknown:
        raise ValueError(f"unknown constructions {unknown}; choose from {', '.join(CONSTRUCTIONS)}")
    if not stream_prompts or not heldout_prompts:
        raise ValueError("the benchmark needs at least one stream prompt and one held-out prompt")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    params = SamplingParams(max_tokens=s.max_tokens)

    # -- phase A ------------------------------------------------------------------------------
    if records is None:
        log(f"[distill] phase A: the target alone serves {len(stream_prompts) + len(heldout_prompts)} prompts "
            f"({s.max_tokens} tokens, greedy) to make the shared records")
        records, timing = collect_records(target, tokenizer, [*stream_prompts, *heldout_prompts], s.max_tokens,
                                          s.teacher_top_k, progress)
        tokens, seconds = sum(t["tokens"] for t in timing), sum(t["seconds"] for t in timing)
        phase_a = {"cached": False, "tokens": tokens, "seconds": seconds, "target_tokens_per_s": tokens / seconds}
    if len(records) != len(stream_prompts) + len(heldout_prompts):
        raise ValueError(f"{len(records)} records for {len(stream_prompts) + len(heldout_prompts)} prompts")
    stream_records, heldout_records = list(records[: len(stream_prompts)]), list(records[len(stream_prompts):])
    phase_a = {**(phase_a or {}), **bytes_per_position(records)}
    timings["A_records"] = time.perf_counter() - t0
    log(f"[distill] records: {phase_a['positions']} positions, {phase_a['bytes_per_position']:.0f} B/position "
        f"(teacher rows {phase_a['teacher_row_bytes']} B)"
        + (f"; target alone {phase_a['target_tokens_per_s']:.1f} tok/s" if phase_a.get("target_tokens_per_s") else ""))

    # -- phase B ------------------------------------------------------------------------------
    t1 = time.perf_counter()
    phase_b = compare_constructions(target, tokenizer, stream_records, heldout_records, heldout_prompts, s, progress, log)
    timings["B_constructions"] = time.perf_counter() - t1

    # -- phase C ------------------------------------------------------------------------------
    t2 = time.perf_counter()
    winner = next(v for v in phase_b["variants"] if v["name"] == phase_b["winner"])
    shortlist = phase_b["_shortlist"] if winner["head"] == "shortlist" else None
    phase_c = online_run(target, tokenizer, CONSTRUCTIONS[winner["construction"]], winner["lr"], winner["gamma"],
                         shortlist, stream_prompts, heldout_prompts, heldout_records, s, redis_url, progress, log)
    phase_c["variant"] = winner["name"]
    timings["C_online"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    del phase_b["_shortlist"]
    return {
        "benchmark": "distill",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "prompts": {"stream": len(stream_prompts), "heldout": len(heldout_prompts)},
        "records": phase_a, "constructions": phase_b, "online": phase_c, "timings_s": timings,
    }


def compare_constructions(target, tokenizer, stream_records, heldout_records, heldout_prompts,
                          s: DistillBenchSettings, progress: bool, log) -> dict:
    """Phase B: train each construction on the stream, score every head variant, measure the best end to end."""
    vocab = target.config.vocab_size
    constructions = [CONSTRUCTIONS[c] for c in s.constructions]
    shortlist = build_shortlist(stream_records, s.shortlist_size, vocab) if "shortlist" in s.heads else None
    heads = {h: (shortlist if h == "shortlist" else None) for h in s.heads}

    # Learning rates: fixed, or swept per family on a stream prefix, validated on the stream's tail.
    lrs, sweeps = {"full": s.lr, "lora": s.lora_lr}, []
    n_train = min(s.sweep_records, len(stream_records) * 2 // 3)
    sweep_train, sweep_val = stream_records[:n_train], stream_records[n_train: n_train + s.sweep_val_records]
    for family in ("full", "lora"):
        members = [c for c in constructions if c.lr_family == family]
        grid = s.lora_lr_grid if family == "lora" else s.lr_grid
        if lrs[family] is not None or not members:
            continue
        if not sweep_train or not sweep_val or len(grid) == 1:
            lrs[family] = grid[len(grid) // 2]
            continue
        log(f"[distill] phase B: lr sweep {list(grid)} for {family} ({members[0].name}) on {len(sweep_train)} "
            f"stream records, validated on the next {len(sweep_val)}")
        sweep = lr_sweep(target, members[0], sweep_train, sweep_val, s, grid)
        sweep["family"] = family
        sweeps.append(sweep)
        lrs[family] = sweep["chosen"]
        log("[distill]   " + ", ".join(f"lr {r['lr']:g}: α̂ {r['alpha_hat']:.3f} top-1 {r['top1']:.3f}"
                                      for r in sweep["rows"]) + f" → {sweep['chosen']:g}")

    # Cost model: target steps for 1 and γ+1 new tokens, measured once.
    context = min(s.timing_context, int(getattr(target.config, "max_position_embeddings", 2048)) - 32)
    curve = forward_cost_curve(target, ks=(1, *sorted({g + 1 for g in s.gammas})), context=context,
                               reps=max(3, s.timing_reps // 2))
    t1 = curve[1]
    v = {g: curve[g + 1] / t1 for g in s.gammas}

    variants, trained = [], {}
    log(f"[distill] phase B: distilling {len(constructions)} constructions on {len(stream_records)} stream records")
    for cons in tqdm(constructions, desc="B: constructions", unit="draft", disable=not progress):
        lr = lrs[cons.lr_family]
        base = make_draft(target, cons)
        untrained = {h: score_draft(_view(base, sl), heldout_records, s.batch_size) for h, sl in heads.items()}
        start = time.perf_counter()
        dist = train_on_stream(base, stream_records, distill_config(cons, lr, s))
        train_s = time.perf_counter() - start
        n_params = dist.trainable_parameters
        draft = dist.candidate()
        n_sample = min(len(heldout_records), 12)  # records it trained on, spread over the stream
        sample = dist.trained[:: max(1, len(dist.trained) // n_sample)][:n_sample]
        per_update = [r.seconds for r in dist.results]
        for head, sl in heads.items():
            d = _view(draft, sl)
            held = score_draft(d, heldout_records, s.batch_size)
            seen = score_draft(d, sample, s.batch_size)
            step = draft_step_ms(d, context, s.timing_reps)
            c = step / t1
            preds = {g: predicted_speedup(held["top1"], g, c, v[g]) for g in s.gammas}
            gamma = max(preds, key=preds.get)
            name = f"{cons.name}+{head}"
            trained[name] = d
            variants.append({
                "name": name, "construction": cons.name, "description": cons.description, "head": head,
                "layers": cons.layers(target.config.num_hidden_layers), "mode": cons.mode, "lr": lr,
                "trainable_params": n_params, "records_trained": dist.trained_records, "updates": len(dist.results),
                "train_s": train_s, "train_s_per_update": statistics.mean(per_update) if per_update else 0.0,
                "final_loss": dist.results[-1].loss if dist.results else None,
                "untrained": untrained[head], "heldout": held, "trained_on": seen,
                "draft_step_ms": step, "c": c, "gamma": gamma,
                "predicted_speedup_by_gamma": {str(g): p for g, p in preds.items()},
                "predicted_speedup": preds[gamma],
                "predicted_speedup_alpha_hat": predicted_speedup(held["alpha_hat"], gamma, c, v[gamma]),
                "e2e": None,
            })
            log(f"[distill]   {name:24s} α̂ {untrained[head]['alpha_hat']:.3f} → {held['alpha_hat']:.3f}, "
                f"top-1 {held['top1']:.3f} (trained-on {seen['top1']:.3f}), step {step:.1f} ms (c {c:.3f}), "
                f"γ={gamma} predicted ×{preds[gamma]:.2f}; {train_s:.0f}s training")
        del dist

    # Measured end to end: the best-predicted variants, prompt by prompt with the target alone.
    ranked = sorted(variants, key=lambda x: -x["predicted_speedup"])
    measured = ranked[: s.e2e_max] if s.e2e_prompts > 0 else []
    if measured and len(measured) >= 2:
        # Measure both heads: the best-predicted variant of each head kind is always in.
        for head in heads:
            best = next((x for x in ranked if x["head"] == head), None)
            if best is not None and best not in measured:
                drop = next(x for x in reversed(measured) if sum(y["head"] == x["head"] for y in measured) > 1)
                measured[measured.index(drop)] = best
        measured.sort(key=lambda x: -x["predicted_speedup"])
    for vv in ranked[len(measured):]:
        vv["e2e_skipped"] = (f"predicted ×{vv['predicted_speedup']:.2f}, below the {len(measured)} best predictions"
                             if measured else "end-to-end measurement disabled")
    e2e_target = None
    if measured:
        prompts = list(heldout_prompts[: s.e2e_prompts])
        log(f"[distill] phase B: measured tokens/s of {len(measured)} variants vs the target alone on "
            f"{len(prompts)} held-out prompts")
        engines = {"target": SpeculativeEngine(target, tokenizer, None, EngineConfig(speculation="always", record=False))}
        for vv in measured:
            engines[vv["name"]] = SpeculativeEngine(target, tokenizer, trained[vv["name"]],
                                                    EngineConfig(speculation="always", gamma=vv["gamma"], record=False))
        e2e = serve_interleaved(engines, prompts, SamplingParams(max_tokens=s.max_tokens), "target", progress,
                                "B: end to end")
        e2e_target = e2e["target"]
        for vv in measured:
            vv["e2e"] = e2e[vv["name"]]
        winner = max(measured, key=lambda x: x["e2e"]["tokens_per_s"])
        basis = "measured end-to-end tokens/s"
    else:
        winner = ranked[0]
        basis = "predicted speedup (no end-to-end measurement)"
    log(f"[distill] winner: {winner['name']} (γ={winner['gamma']}) by {basis}")
    return {"lr": lrs, "lr_sweeps": sweeps, "shortlist_size": int(shortlist.numel()) if shortlist is not None else None,
            "shortlist_coverage_heldout": coverage(shortlist, heldout_records) if shortlist is not None else None,
            "target_step_ms": t1, "target_forward_ms_by_new_tokens": {str(k): ms for k, ms in curve.items()},
            "v_by_gamma": {str(g): x for g, x in v.items()}, "variants": variants, "e2e_target": e2e_target,
            "winner": winner["name"], "winner_basis": basis, "_shortlist": shortlist}


def online_run(target, tokenizer, cons: Construction, lr: float, gamma: int, shortlist: torch.Tensor | None,
               stream_prompts, heldout_prompts, heldout_records, s: DistillBenchSettings, redis_url: str | None,
               progress: bool, log) -> dict:
    """Phase C: held-out before, the stream through distill_replay (buffer, registry, gate, swaps), held-out after."""
    from osd.data.buffer import BufferConfig, RecordBuffer
    from osd.registry import DraftRegistry, RegistryConfig
    from trainers.replay import distill_replay

    params = SamplingParams(max_tokens=s.max_tokens)
    base = make_draft(target, cons)
    live = _view(base, shortlist).eval().requires_grad_(False)
    plain = SpeculativeEngine(target, tokenizer, None, EngineConfig(speculation="always", record=False))

    log(f"[distill] phase C: held-out BEFORE ({len(heldout_prompts)} prompts, untrained {cons.name}, γ={gamma})")
    measure = SpeculativeEngine(target, tokenizer, live, EngineConfig(speculation="always", gamma=gamma, record=False))
    before = serve_interleaved({"target": plain, "draft": measure}, heldout_prompts, params, "target", progress,
                               "C: held-out before")
    before_scores = score_draft(live, heldout_records, s.batch_size)

    config = distill_config(cons, lr, s, s.on_policy_ratio)
    distiller = _TracedDistiller(_view(base, None), config)  # full head: see _CurveGate
    gate = _CurveGate(distiller, heldout_records, shortlist, margin=config.gate_margin, batch_size=config.batch_size,
                      max_seq_len=config.max_seq_len, half_life=config.gate_half_life)
    engine = SpeculativeEngine(target, tokenizer, live,
                               EngineConfig(speculation="always", gamma=gamma, teacher_top_k=s.teacher_top_k, record=True))
    trained_at_request: list[int] = []

    def stream():
        for prompt in tqdm(stream_prompts, desc="C: online stream", unit="req", disable=not progress):
            trained_at_request.append(distiller.trained_records)
            yield prompt

    log(f"[distill] phase C: streaming {len(stream_prompts)} prompts with online distillation "
        f"(update every {config.update_interval}, {config.steps_per_update} steps, lr {lr:g}, "
        f"on-policy ratio {config.on_policy_ratio}, gate holdout {config.holdout_fraction})")
    start = time.perf_counter()
    with RecordBuffer(BufferConfig(redis_url=redis_url)) as buffer, tempfile.TemporaryDirectory() as tmp:
        registry = DraftRegistry.from_config(RegistryConfig(path=Path(tmp) / "registry"))
        summary = distill_replay(engine, stream(), params, distiller, gate, buffer, registry,
                                 cluster="bench-distill", window=s.window, log_line=lambda line: log("[distill]   " + line))
        buffer_kind = "external Redis" if redis_url else "embedded redis-server"
    stream_s = time.perf_counter() - start
    for w in summary["windows"]:
        first = w["index"] * s.window
        w["records_trained_at_start"] = trained_at_request[first] if first < len(trained_at_request) else None

    log(f"[distill] phase C: held-out AFTER (live v{summary['live_version']})")
    after_engine = SpeculativeEngine(target, tokenizer, engine.draft, EngineConfig(speculation="always", gamma=gamma, record=False))
    after = serve_interleaved({"target": plain, "draft": after_engine}, heldout_prompts, params, "target", progress,
                              "C: held-out after")
    after_scores = score_draft(engine.draft, heldout_records, s.batch_size)
    train_s = [u["train_s"] for u in gate.curve]
    gate_s = [u["gate_s"] for u in gate.curve]
    return {
        "construction": cons.name, "head": "shortlist" if shortlist is not None else "full", "gamma": gamma, "lr": lr,
        "distill_config": config.model_dump(),
        "buffer": buffer_kind,
        "before": {"engine": before["draft"], "target": before["target"], "heldout_scores": before_scores},
        "after": {"engine": after["draft"], "target": after["target"], "heldout_scores": after_scores},
        "learning_curve": [{"update": 0, "records_trained": 0, "heldout_alpha_hat": before_scores["alpha_hat"],
                            "heldout_top1": before_scores["top1"], "heldout_top4": before_scores["top4"]},
                           *gate.curve],
        "windows": summary["windows"], "live_version": summary["live_version"], "requests": summary["requests"],
        "updates": summary["updates"], "promotions": summary["promotions"],
        "records_trained": distiller.trained_records, "records_held_for_gate": summary["requests"] - distiller.trained_records,
        "trainer_s_per_update": statistics.mean(train_s) if train_s else None,
        "gate_s_per_update": statistics.mean(gate_s) if gate_s else None,
        "stream_s": stream_s,
        "stream_bytes_per_position": (distiller.encoded_bytes / distiller.encoded_positions
                                      if distiller.encoded_positions else None),
    }


# --------------------------------------------------------------------------- reporting


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n / 1e3:.1f}k"


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def limits_paragraph(result: dict) -> str:
    """'What limits α̂', read off the numbers; the lead edits it after looking at the full run."""
    on, b = result["online"], result["constructions"]
    after = on["after"]["heldout_scores"]
    curve = [p for p in on["learning_curve"] if p["update"] > 0]
    parts = []
    goal = "reaches" if after["alpha_hat"] >= ALPHA_GOAL else "falls short of"
    parts.append(f"Held-out α̂ after the stream is {after['alpha_hat']:.3f} (teacher rows) and "
                 f"{_f(on['after']['engine']['alpha_hat'])} as served; that {goal} the {ALPHA_GOAL} goal.")
    if len(curve) >= 2:
        half = len(curve) // 2
        early = curve[half - 1]["heldout_alpha_hat"] - on["learning_curve"][0]["heldout_alpha_hat"]
        late = curve[-1]["heldout_alpha_hat"] - curve[half - 1]["heldout_alpha_hat"]
        trend = ("still rising at the end, so more records would help (data-limited)" if late > 0.02
                 else "flat over the second half, so more of the same records would not help much")
        parts.append(f"The learning curve gained {early:+.3f} over its first {half} updates and {late:+.3f} over the "
                     f"rest: {trend}.")
    full = [v for v in b["variants"] if v["head"] == "full"]
    if full:
        best = max(full, key=lambda v: v["heldout"]["alpha_hat"])
        w = next(v for v in b["variants"] if v["name"] == on["variant"])
        by_cons = {v["construction"]: v for v in full}
        deeper = [by_cons[c] for c in ("first4", "first6", "early_late") if c in by_cons]
        if "first2" in by_cons and deeper:
            base = by_cons["first2"]
            parts.append("Depth: " + ", ".join(
                f"{v['construction']} {v['heldout']['alpha_hat'] - base['heldout']['alpha_hat']:+.3f} α̂ at "
                f"{v['draft_step_ms'] / base['draft_step_ms']:.2f}× the step cost" for v in deeper)
                + f" relative to first2 ({base['heldout']['alpha_hat']:.3f}).")
        gap = w["trained_on"]["top1"] - w["heldout"]["top1"]
        versus = ("the winner is also the best construction by held-out α̂" if best["construction"] == w["construction"]
                  else f"the best construction by held-out α̂ is {best['construction']} "
                       f"({best['heldout']['alpha_hat']:.3f} at {best['draft_step_ms']:.1f} ms/step) against the "
                       f"winner's {w['heldout']['alpha_hat']:.3f} at {w['draft_step_ms']:.1f} ms/step")
        reading = ("a generalisation gap: more (or more varied) data would help" if gap > 0.05
                   else "no real gap: the draft is capacity-limited, not data-limited")
        parts.append(f"Selection: {versus}. The winner's top-1 on records it trained on is "
                     f"{w['trained_on']['top1']:.3f} vs {w['heldout']['top1']:.3f} held out ({reading}).")
        parts.append(f"The target's argmax is in the winner's top 4 {w['heldout']['top4']:.0%} of the time vs top 1 "
                     f"{w['heldout']['top1']:.0%}: a token tree would turn part of that gap into accepted tokens.")
    if b.get("shortlist_coverage_heldout") is not None:
        parts.append(f"The {b['shortlist_size']}-token shortlist covers {b['shortlist_coverage_heldout']:.1%} of "
                     "held-out output tokens, a ceiling on a shortlist draft's greedy acceptance.")
    parts.append("_(Lead: confirm or edit this reading after the full run.)_")
    return " ".join(parts)


def render_markdown(result: dict, plot_name: str | None = "distill_learning_curve.png") -> str:
    st, rec, b, on = result["settings"], result["records"], result["constructions"], result["online"]
    env = result.get("environment", {})
    cfg = result.get("config", {})
    lines = [
        f"## Online distillation (`osd bench distill`{', ' + env['date'] if env else ''})",
        "",
        f"Target `{cfg.get('target', '?')}`, category `{cfg.get('category', '?')}`: {result['prompts']['stream']} stream "
        f"prompts, {result['prompts']['heldout']} held-out prompts (never trained on), {st['max_tokens']} tokens, "
        f"greedy. Distillation: {st['loss']}, AdamW, update every {st['update_interval']} records, "
        f"{st['steps_per_update']} steps × batch {st['batch_size']}, {st['holdout_fraction']:.0%} of the stream held "
        f"for the promotion gate" + (f"; torch {env['torch']}, {env['threads']} threads on {env['cpu_count']} cores"
                                     if env else "") + ".",
        "",
        f"**Records** (phase A, target alone): {rec['records']} records, {rec['positions']} positions, "
        f"**{rec['bytes_per_position']:.0f} bytes per stored position** (all of it: teacher rows "
        f"{rec['teacher_row_bytes']} B at k={rec['top_k']}, plus prompt, header) — vs "
        f"{2 * result.get('vocab_size', 49152) / 1024:.0f} KiB for a dense fp16 row"
        + (f"; target alone {rec['target_tokens_per_s']:.1f} tok/s" if rec.get("target_tokens_per_s") else "")
        + (" (cached records)" if rec.get("cached") else "") + ".",
        "",
        "### Draft constructions (phase B: same stream, same settings)",
        "",
        f"Learning rates: {', '.join(f'{k} {v:g}' for k, v in b['lr'].items() if v is not None)}"
        + (" (swept: " + "; ".join(f"{sw['family']}: " + ", ".join(f"{r['lr']:g} → α̂ {r['alpha_hat']:.3f}"
                                                                     for r in sw["rows"]) for sw in b["lr_sweeps"])
           + f", on {b['lr_sweeps'][0]['train_records']} stream records, validated on the next "
             f"{b['lr_sweeps'][0]['val_records']})" if b["lr_sweeps"] else " (fixed)")
        + f". Target step {b['target_step_ms']:.1f} ms; verifying γ+1 tokens costs v = "
        + ", ".join(f"{x:.2f} (γ={g})" for g, x in b["v_by_gamma"].items()) + " target steps. "
        f"Predicted speedup = (1−a^(γ+1))/(1−a) / (γ·c + v) with a = held-out top-1 agreement (greedy acceptance); "
        f"γ per variant is the best predicted. Shortlist: {b['shortlist_size']} ids by teacher mass in the stream "
        f"records, covering {_f(b['shortlist_coverage_heldout'])} of held-out output tokens; shortlist variants "
        "reuse the full-head training run.",
        "",
        table(["variant", "trained params", "α̂ untrained", "held-out α̂", "top-1", "top-4", "top-1 trained-on",
               "draft ms", "c", "γ", "pred ×", "measured tok/s", "× target", "same output", "train s / update"],
              [[v["name"], _count(v["trainable_params"]), v["untrained"]["alpha_hat"], v["heldout"]["alpha_hat"],
                v["heldout"]["top1"], v["heldout"]["top4"], v["trained_on"]["top1"], v["draft_step_ms"], v["c"],
                v["gamma"], v["predicted_speedup"],
                v["e2e"]["tokens_per_s"] if v["e2e"] else "skipped", v["e2e"]["speedup_vs_target"] if v["e2e"] else "–",
                ("yes" if v["e2e"]["same_output"] else "NO") if v["e2e"] else "–", v["train_s_per_update"]]
               for v in b["variants"]]),
        "",
    ]
    if b["e2e_target"]:
        lines.append(f"Target alone on the same {b['e2e_target']['prompts']} held-out prompts: "
                     f"{b['e2e_target']['tokens_per_s']:.1f} tok/s. ")
    skipped = [v for v in b["variants"] if v.get("e2e_skipped")]
    if skipped:
        lines.append("Not measured end to end: " + "; ".join(f"{v['name']} ({v['e2e_skipped']})" for v in skipped) + ". ")
    lines += [f"**Default pick: `{b['winner']}`** by {b['winner_basis']}.", ""]

    bef, aft = on["before"], on["after"]
    row = lambda name, x: [name, x["heldout_scores"]["alpha_hat"], x["heldout_scores"]["top1"],  # noqa: E731
                           x["engine"]["alpha_hat"], x["engine"]["mean_acceptance_length"], x["engine"]["tokens_per_s"],
                           x["target"]["tokens_per_s"], x["engine"]["speedup_vs_target"],
                           "yes" if x["engine"]["same_output"] else "NO"]
    lines += [
        f"### Online run (phase C: `{on['variant']}`, γ={on['gamma']}, lr {on['lr']:g})",
        "",
        f"{on['requests']} stream requests through the engine, the Redis buffer ({on['buffer']}), the distiller, the "
        f"promotion gate and the file registry: {on['records_trained']} records trained on, "
        f"{on['records_held_for_gate']} held for the gate, {on['updates']} updates, {on['promotions']} promotions "
        f"(live v{on['live_version']}). Trainer time per update {_f(on['trainer_s_per_update'], 2)} s "
        f"(+ gate {_f(on['gate_s_per_update'], 2)} s); stream records with draft rounds take "
        f"{_f(on['stream_bytes_per_position'], 0)} B per position. On-policy ratio "
        f"{on['distill_config']['on_policy_ratio']}.",
        "",
        f"Held-out: {result['prompts']['heldout']} prompts, {st['max_tokens']} tokens, greedy, each prompt served by "
        "the draft engine and the target alone in turn.",
        "",
        table(["held-out", "α̂ (teacher rows)", "top-1", "α̂ (served)", "mean accept len", "tok/s", "target tok/s",
               "× target", "same output"], [row("before (untrained)", bef), row("after (live draft)", aft)]),
        "",
        "Learning curve (held-out α̂ on the fixed held-out records after each update; gate α̂ on the gate's own "
        "held-out stream records):",
        "",
        table(["update", "records trained", "held-out α̂", "held-out top-1", "gate cand α̂", "gate live α̂", "promoted",
               "loss", "train s"],
              [[p["update"], p["records_trained"], p["heldout_alpha_hat"], p["heldout_top1"],
                p.get("gate_candidate_alpha", "–"), p.get("gate_live_alpha", "–"),
                ("yes" if p["promoted"] else "no") if "promoted" in p else "–", p.get("loss", "–"), p.get("train_s", "–")]
               for p in on["learning_curve"]]),
        "",
        "Served α̂ per window:",
        "",
        table(["window", "requests", "records trained at start", "α̂", "mean accept len", "tok/s", "live version"],
              [[w["index"], w["requests"], w["records_trained_at_start"] if w["records_trained_at_start"] is not None else "–",
                w["alpha_hat"] if w["alpha_hat"] is not None else "–", w["mean_acceptance_length"],
                w["tokens_per_second"], w["live_version"]] for w in on["windows"]]),
        "",
    ]
    if plot_name:
        lines += [f"![learning curve]({plot_name})", ""]
    t = result["timings_s"]
    lines += ["### What limits α̂", "", limits_paragraph(result), "",
              f"Run time: {t['total'] / 60:.1f} min (records {t['A_records'] / 60:.1f}, constructions "
              f"{t['B_constructions'] / 60:.1f}, online {t['C_online'] / 60:.1f})."]
    return "\n".join(lines)


def plot_learning_curve(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on = result["online"]
    curve = on["learning_curve"]
    x = [p["records_trained"] for p in curve]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, [p["heldout_alpha_hat"] for p in curve], "o-", label="held-out α̂ of each update's candidate")
    ax.plot(x, [p["heldout_top1"] for p in curve], "s--", label="held-out top-1 agreement")
    ax.plot(x, [p["heldout_top4"] for p in curve], "^:", alpha=0.6, label="held-out top-4 hit")
    wins = [w for w in on["windows"] if w["alpha_hat"] is not None and w["records_trained_at_start"] is not None]
    if wins:
        ax.plot([w["records_trained_at_start"] for w in wins], [w["alpha_hat"] for w in wins], "x", ms=8,
                label="served α̂ per window (x: records trained at its start)")
    aft = on["after"]["engine"]["alpha_hat"]
    if aft is not None:  # the live draft is the last promoted candidate
        live_x = max((p["records_trained"] for p in curve if p.get("promoted")), default=0)
        ax.plot([live_x], [aft], "*", ms=12, label=f"served α̂ on held-out prompts after (live v{on['live_version']})")
    ax.axhline(ALPHA_GOAL, color="grey", ls="--", lw=0.8, label=f"goal α̂ = {ALPHA_GOAL}")
    ax.set_xlabel("records trained on")
    ax.set_ylabel("acceptance")
    ax.set_ylim(0, 1)
    ax.set_title(f"Online distillation: {on['variant']} (γ={on['gamma']}, lr {on['lr']:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- command line


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def add_bench_distill_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench distill (ignores --questions, --draft, --draft-layers, --shortlist, --gamma)")
    g.add_argument("--category", default="math_reasoning", help="Spec-Bench category to stream and hold out")
    g.add_argument("--stream", type=int, default=60, help="stream prompts (the category's first N)")
    g.add_argument("--heldout", type=int, default=20, help="held-out prompts (the category's last N)")
    g.add_argument("--quick", action="store_true",
                   help="smoke test: 6 stream / 3 held-out prompts, 24 tokens, 2 constructions; writes "
                        "distill_quick.json and leaves docs/ alone")
    g.add_argument("--constructions", default=None,
                   help=f"comma-separated subset of {','.join(CONSTRUCTIONS)} (default: {','.join(DEFAULT_CONSTRUCTIONS)})")
    g.add_argument("--lr", type=float, default=None, help="fix the lr of full-weight constructions (default: sweep)")
    g.add_argument("--lora-lr", type=float, default=None, help="fix the lr of LoRA constructions (default: sweep)")
    g.add_argument("--lr-grid", type=_floats, default=None, help="lrs the full-weight sweep tries (default 3e-4,1e-3,3e-3)")
    g.add_argument("--lora-lr-grid", type=_floats, default=None, help="lrs the LoRA sweep tries (default 1e-3,3e-3,1e-2)")
    g.add_argument("--steps-per-update", type=int, default=None, help="optimizer steps per update (default 4)")
    g.add_argument("--gammas", type=lambda t: tuple(int(x) for x in t.split(",")), default=None,
                   help="γ candidates per construction, picked by predicted speedup (default 2,3,4)")
    g.add_argument("--e2e-prompts", type=int, default=None, help="held-out prompts per end-to-end measurement (default 6)")
    g.add_argument("--e2e-max", type=int, default=None, help="variants measured end to end, best predicted first (default 4)")
    g.add_argument("--shortlist-size", type=int, default=None, help="shortlist head size (default 4096)")
    g.add_argument("--on-policy-ratio", type=float, default=None, help="phase C on-policy loss share (default 0.5)")
    g.add_argument("--redis-url", default=None, help="record buffer (default: an embedded redis-server)")
    g.add_argument("--records", default=None,
                   help="records cache (default bench/results/distill_records-<category>-<stream>+<heldout>x<tokens>.osdr)")
    g.add_argument("--reuse-records", action="store_true", help="reuse the records cache when it matches this run")
    g.add_argument("--plot", default=None, help="learning-curve PNG (default docs/distill_learning_curve.png)")


def settings_from_args(args: argparse.Namespace) -> DistillBenchSettings:
    s = DistillBenchSettings.quick() if args.quick else DistillBenchSettings(max_tokens=args.max_tokens)
    overrides = {"lr": args.lr, "lora_lr": args.lora_lr, "lr_grid": args.lr_grid, "lora_lr_grid": args.lora_lr_grid,
                 "steps_per_update": args.steps_per_update, "gammas": args.gammas, "e2e_prompts": args.e2e_prompts,
                 "e2e_max": args.e2e_max, "shortlist_size": args.shortlist_size, "on_policy_ratio": args.on_policy_ratio,
                 "constructions": tuple(args.constructions.split(",")) if args.constructions else None}
    return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def run_distill_bench_command(args: argparse.Namespace) -> dict:
    from osd.config import ModelConfig
    from osd.data.workloads import chat_prompt_ids, load_questions
    from osd.decoding.engine import build_engine

    s = settings_from_args(args)
    n_stream, n_held = (6, 3) if args.quick else (args.stream, args.heldout)
    rows = load_questions(args.data, [args.category])
    if n_stream + n_held > len(rows):
        raise ValueError(f"category {args.category} has {len(rows)} questions; --stream {n_stream} + --heldout {n_held} "
                         "must not exceed that")
    if n_stream < 1 or n_held < 1:
        raise ValueError("--stream and --heldout must both be at least 1")
    stream_rows, held_rows = rows[:n_stream], rows[len(rows) - n_held:]
    engine = build_engine(ModelConfig(target=args.target, draft="none", device=args.device, dtype=args.dtype,
                                      torch_threads=args.threads), EngineConfig(speculation="always", teacher_top_k=s.teacher_top_k))
    target, tokenizer = engine.target, engine.tokenizer
    stream_prompts = [chat_prompt_ids(tokenizer, r["turns"][0]) for r in stream_rows]
    held_prompts = [chat_prompt_ids(tokenizer, r["turns"][0]) for r in held_rows]

    out = Path(args.out)
    cache = Path(args.records or out / f"distill_records-{args.category}-{n_stream}+{n_held}x{s.max_tokens}.osdr")
    meta = {"target": args.target, "category": args.category, "max_tokens": s.max_tokens, "top_k": s.teacher_top_k,
            "question_ids": [r["question_id"] for r in stream_rows + held_rows]}
    records = phase_a = None
    if args.reuse_records and cache.exists():
        cached, cached_meta = load_records(cache)
        if {k: cached_meta.get(k) for k in meta} == meta and len(cached) == n_stream + n_held:
            records, phase_a = cached, {**cached_meta.get("phase_a", {}), "cached": True, "cache": str(cache)}
            print(f"[distill] reusing {len(records)} records from {cache}")
        else:
            print(f"[distill] {cache} was made for another configuration; regenerating it")
    if records is None:
        print(f"[distill] phase A: the target alone serves {n_stream + n_held} prompts ({s.max_tokens} tokens, greedy)")
        start = time.perf_counter()
        records, timing = collect_records(target, tokenizer, stream_prompts + held_prompts, s.max_tokens, s.teacher_top_k)
        tokens, seconds = sum(t["tokens"] for t in timing), sum(t["seconds"] for t in timing)
        phase_a = {"cached": False, "tokens": tokens, "seconds": seconds, "target_tokens_per_s": tokens / seconds,
                   "wall_s": time.perf_counter() - start}
        save_records(cache, records, {**meta, "phase_a": phase_a})
        print(f"[distill] records cached at {cache} (reuse with --reuse-records)")

    result = run_distill_bench(target, tokenizer, stream_prompts, held_prompts, s, records=records, phase_a=phase_a,
                               redis_url=args.redis_url)
    if not phase_a.get("cached"):  # phase A ran here, outside the core's clock
        result["timings_s"]["A_records"] = phase_a["wall_s"]
        result["timings_s"]["total"] += phase_a["wall_s"]
    result["environment"] = environment()
    result["config"] = {"target": args.target, "category": args.category, "quick": bool(args.quick),
                        "stream_question_ids": meta["question_ids"][:n_stream],
                        "heldout_question_ids": meta["question_ids"][n_stream:], "records_cache": str(cache)}
    result["vocab_size"] = int(target.config.vocab_size)
    name = "distill_quick" if args.quick else "distill"
    plot = Path(args.plot) if args.plot else (out / "distill_quick_learning_curve.png" if args.quick
                                              else Path(args.doc).parent / "distill_learning_curve.png")
    plot_learning_curve(result, plot)
    path = write_json(out, name, result)
    doc_plot = Path(plot).name if Path(plot).parent.resolve() == Path(args.doc).parent.resolve() else str(plot)
    markdown = render_markdown(result, doc_plot)
    print(markdown)
    if args.quick:
        print(f"\nresults: {path}\nplot:    {plot}\n(--quick leaves {args.doc} alone)")
    else:
        doc = update_doc_section(args.doc, "distill", markdown)
        print(f"\nresults: {path}\nplot:    {plot}\ntable:   {doc}")
    return result
