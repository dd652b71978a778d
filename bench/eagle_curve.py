"""`osd bench eagle`: the eagle head's learning curve, side by side with the `first2_frozen` self-draft.

Issue 15's benchmark. Records are made by the target alone, greedy (bench distill's phase A,
batched here: ``greedy_records``), with the eagle head's input features taken from the same
forwards, and cached (codec bytes, features as safetensors beside them) so reruns skip it:

- domain stream: GSM8K training questions in file order;
- mixed stream: Spec-Bench questions of all 13 categories but each category's last few,
  interleaved (a fixed shuffle) with GSM8K questions from the domain stream's start.

Held-out prompts are never trained on: GSM8K training questions from the end of the file, and
each Spec-Bench category's last questions. Both drafts train online in stream order on bench
distill's OnlineDistiller schedule (the eagle head through trainers.eagle.EagleDistiller with
EAGLE-3's training-time test), and at each record count N of the curve both are judged on the
held-out records:

- top-1 agreement (greedy acceptance of the first draft step) and α̂ (Σ min(p, q) on the teacher
  rows). The head's first step drafts x_{p+2} from the target's features at p and x_{p+1}: the
  same per-position quantity as a self-draft's next-token prediction;
- mean acceptance length of γ-chains and of a static tree, replayed offline on every held-out
  record (``simulate_rounds``): a greedy round accepts while the target's token is the draft's
  pick (in a tree: among the node's top-b), and what the draft's step s sees when its earlier
  drafts were the target's tokens is exactly the training-time-test unroll.

At the largest N: the draft cost c (a draft step over a target decode step, on a ~200-entry
cache), and the engine serving held-out prompts (greedy, each prompt by every engine in turn):
chains with the full LM head and with a shortlist head, the static tree and bench trees'
dynamic tree, measured tokens/s against the target alone and the served acceptance lengths.

``ttt_loss_sparse`` is trainers.eagle.ttt_loss computed only where it is needed: logits at
positions with a teacher row, and the unrolled steps ≥ 2 only over the positions whose chain
reaches one (a long prompt costs one step-1 pass, not three LM-head passes).

The core (``run_eagle_curve``) takes models, records and prompts, so tests run it on tiny random
models; ``run_eagle_curve_command`` is the SmolLM2 command line around it. On a CPU shared with
other work, run it with ``--threads 1``: two torch threads on oversubscribed cores wait on each
other (record generation measured 4.5x slower than with one).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from bench.distill import (
    CONSTRUCTIONS,
    DistillBenchSettings,
    build_shortlist,
    distill_config,
    load_records,
    make_draft,
    save_records,
    score_draft,
    serve_interleaved,
)
from bench.report import environment, save_figure, table, update_doc_section, write_json
from osd.config import EngineConfig, SamplingParams
from osd.data.records import TrainingRecord
from osd.decoding.eagle import EagleHead, FeatureCapture, default_feature_layers
from osd.decoding.engine import SpeculativeEngine
from osd.models.drafts import DraftModel
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller
from trainers.eagle import STEP_DECAY, EagleDistiller
from trainers.losses import distillation_loss, estimated_acceptance
from trainers.shortlist import coverage

TOP1_AIM, ACCEPT_AIM, SPEEDUP_AIM = 0.6, 2.5, 1.5  # issue 15's aims on this CPU


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Question:
    """One prompt of the benchmark: where it comes from and its text."""

    source: str  # "gsm8k" | "spec_bench"
    qid: int | str
    category: str
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}:{self.qid}"


def plan_questions(domain: int = 500, mixed: int = 1000, gsm8k_heldout: int = 40,
                   spec_heldout_per_category: int = 3, seed: int = 0, data: str | None = None) -> dict[str, list[Question]]:
    """The streams and held-out sets (module docstring). The mixed stream takes Spec-Bench questions (all but
    the held-out ones, at most half the stream, round-robin over categories) and fills up to ``mixed`` with
    GSM8K questions from the start of the file, so its GSM8K part shares the domain stream's records; a fixed
    shuffle interleaves the two."""
    from osd.data.workloads import (
        load_gsm8k_train,
        load_questions,
        spread_across_categories,
    )

    gsm = load_gsm8k_train()
    spec = load_questions(data)
    by_cat: dict[str, list[dict]] = {}
    for r in spec:
        by_cat.setdefault(r["category"], []).append(r)
    spec_stream = [r for rows in by_cat.values() for r in rows[: len(rows) - spec_heldout_per_category]]
    spec_held = [r for rows in by_cat.values() for r in rows[len(rows) - spec_heldout_per_category:]]
    n_gsm = max(domain, mixed - min(len(spec_stream), mixed // 2))
    if n_gsm + gsm8k_heldout > len(gsm):
        raise ValueError(f"GSM8K has {len(gsm)} training questions; {n_gsm} stream + {gsm8k_heldout} held out is too many")

    def g(r):
        return Question("gsm8k", r["question_id"], "gsm8k_train", r["turns"][0])

    def s(r):
        return Question("spec_bench", r["question_id"], r["category"], r["turns"][0])

    gsm_stream = [g(r) for r in gsm[:n_gsm]]
    n_spec = min(len(spec_stream), mixed // 2)  # all of Spec-Bench's stream part for the full run
    mixed_stream = gsm_stream[: mixed - n_spec] + [s(r) for r in spread_across_categories(spec_stream, n_spec)]
    random.Random(seed).shuffle(mixed_stream)
    return {"domain": gsm_stream[:domain], "mixed": mixed_stream,
            "heldout_gsm8k": [g(r) for r in gsm[len(gsm) - gsm8k_heldout:]],
            "heldout_spec": [s(r) for r in spec_held]}


def generation_order(plan: dict[str, list[Question]]) -> list[Question]:
    """Every distinct question once, in the order that makes a partial cache most useful: held-out first,
    then the domain stream, then the rest of the mixed stream."""
    seen, order = set(), []
    for name in ("heldout_gsm8k", "heldout_spec", "domain", "mixed"):
        for q in plan[name]:
            if q.key not in seen:
                seen.add(q.key)
                order.append(q)
    return order


def eos_ids(target, tokenizer) -> set[int]:
    """The ids that end a request, as the engine reads them (tokenizer and generation config)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(target, "generation_config", None), "eos_token_id", None)):
        ids.update([value] if isinstance(value, int) else (value or []))
    return ids


@torch.inference_mode()
def greedy_records(target: PreTrainedModel, prompts: Sequence[list[int]], max_tokens: int, top_k: int,
                   eos: set[int], batch_size: int = 16, max_batch_tokens: int = 8192,
                   feature_layers: Sequence[int] = ()) -> tuple[list[TrainingRecord], list[torch.Tensor | None]]:
    """The target alone, greedy, ``batch_size`` prompts of similar length per forward (left-padded): the
    records the engine's target-only serving makes (collect_records), teacher rows as its Teacher keeps them,
    output cut after the first EOS. Batched because record generation is this benchmark's expensive phase on
    a CPU: a batch of 16 decodes at a few times one request's cost. Padded bf16 forwards round differently
    from the engine's unpadded ones, so a greedy tie can resolve the other way now and then; both are the
    target's greedy output.

    With ``feature_layers``, also the eagle head's input: each record's [T-1, F] target features (the outputs of
    those decoder layers at every position but the last, as trainers.eagle.record_features gives them), taken
    from these same forwards, so no second pass over the records is needed. Returns (records, features)."""
    kept: dict[int, torch.Tensor] = {}

    def hook(index):
        def keep(module, args, output) -> None:
            kept[index] = output[0] if isinstance(output, tuple) else output  # [B, S, H]
        return keep

    layers = list(feature_layers)
    handles = [target.get_decoder().layers[i].register_forward_hook(hook(i)) for i in layers]
    try:
        return _greedy_batches(target, prompts, max_tokens, top_k, eos, batch_size, max_batch_tokens, layers, kept)
    finally:
        for h in handles:
            h.remove()


def _greedy_batches(target, prompts, max_tokens, top_k, eos, batch_size, max_batch_tokens, layers, kept):
    device = target.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[TrainingRecord | None] = [None] * len(prompts)
    feats: list[torch.Tensor | None] = [None] * len(prompts)
    i = 0
    while i < len(order):
        longest = len(prompts[order[min(i + batch_size, len(order)) - 1]]) + max_tokens
        size = max(1, min(batch_size, max_batch_tokens // longest))
        batch = order[i: i + size]
        i += size
        width = max(len(prompts[j]) for j in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        for row, j in enumerate(batch):
            ids[row, width - len(prompts[j]):] = torch.tensor(prompts[j])
            mask[row, width - len(prompts[j]):] = 1
        cache = DynamicCache(config=target.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        tokens, rows, done = [], [], torch.zeros(len(batch), dtype=torch.bool, device=device)
        steps: list[torch.Tensor] = []  # per forward: [B, S, F] features of its input positions
        for _ in range(max_tokens):
            logits = target(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1].float()  # [B, V]
            if layers:
                steps.append(torch.cat([kept[k] for k in layers], dim=-1))
            lse = logits.logsumexp(-1)
            top = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
            rows.append((top.indices.to(torch.int32), (top.values - lse[:, None]).to(torch.float16), lse))
            ids = logits.argmax(-1, keepdim=True)  # [B, 1]
            tokens.append(ids[:, 0])
            done |= torch.isin(ids[:, 0], torch.tensor(sorted(eos), device=device))
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
            positions = positions[:, -1:] + 1
        emitted = torch.stack(tokens, dim=1).tolist()  # [B, steps]
        for row, j in enumerate(batch):
            seq = emitted[row]
            n = next((k + 1 for k, t in enumerate(seq) if t in eos), len(seq))
            out[j] = TrainingRecord(prompt_ids=list(prompts[j]), output_ids=seq[:n],
                                    teacher_token_ids=torch.stack([r[0][row] for r in rows[:n]]).cpu(),
                                    teacher_logprobs=torch.stack([r[1][row] for r in rows[:n]]).cpu(),
                                    teacher_logsumexp=torch.stack([r[2][row] for r in rows[:n]]).cpu())
            if layers:  # prompt positions from the prefill, then output rows 0..n-2 as the decode steps fed them
                feats[j] = torch.cat([steps[0][row, width - len(prompts[j]):], *(x[row] for x in steps[1:n])]).cpu()
    return out, feats


class RecordStore:
    """Target-generated records by question key, cached as bench distill's codec-bytes file (no pickle), and
    their eagle features in safetensors files beside it (one per generated chunk).

    The cache is rewritten every ``save_every`` new records, so an interrupted generation resumes where it
    stopped; a cache made with other settings (target, dtype, tokens, top-k, layers) is refused, not mixed in."""

    def __init__(self, path: str | Path, meta: dict):
        self.path, self.meta = Path(path), dict(meta)
        self.records: dict[str, TrainingRecord] = {}
        self.features: dict[str, torch.Tensor] = {}
        if self.path.exists():
            records, cached = load_records(self.path)
            mismatch = {k: (cached.get(k), v) for k, v in meta.items() if cached.get(k) != v}
            if mismatch:
                raise ValueError(f"{self.path} was made with other settings {mismatch}; delete it or pass "
                                 "another --records path")
            self.records = dict(zip(cached["keys"], records, strict=True))
            self.meta["generation_s"] = cached.get("generation_s", 0.0)
            self.meta["generated_tokens"] = cached.get("generated_tokens", 0)
            from safetensors.torch import load_file

            for part in sorted(self.path.parent.glob(self.path.name + ".features.*.safetensors")):
                self.features.update((k, v) for k, v in load_file(part).items() if k in self.records)

    def save(self, new_features: dict[str, torch.Tensor] | None = None) -> None:
        if new_features:
            from safetensors.torch import save_file

            index = len(list(self.path.parent.glob(self.path.name + ".features.*.safetensors")))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in new_features.items()},
                      self.path.parent / f"{self.path.name}.features.{index:04d}.safetensors")
        keys = list(self.records)
        save_records(self.path, [self.records[k] for k in keys], {**self.meta, "keys": keys})

    def fill(self, target, tokenizer, questions: Sequence[Question], max_tokens: int, top_k: int,
             batch_size: int = 16, save_every: int = 64, progress: bool = True,
             log: Callable[[str], None] = print) -> None:
        """Generate the records ``questions`` lack (the target alone, greedy, batched) with their features at
        ``meta["feature_layers"]``, saving as it goes."""
        from osd.data.workloads import chat_prompt_ids

        todo = [q for q in questions if q.key not in self.records]
        if not todo:
            return
        log(f"[eagle] records: {len(self.records)} cached, generating {len(todo)} ({max_tokens} tokens, greedy, "
            f"batches of ≤ {batch_size}) into {self.path}")
        bar = tqdm(total=len(todo), desc="records", unit="req", disable=not progress)
        for i in range(0, len(todo), save_every):
            chunk = todo[i: i + save_every]
            start = time.perf_counter()
            records, feats = greedy_records(target, [chat_prompt_ids(tokenizer, q.text) for q in chunk], max_tokens,
                                            top_k, eos_ids(target, tokenizer), batch_size,
                                            feature_layers=self.meta.get("feature_layers", ()))
            self.meta["generation_s"] = self.meta.get("generation_s", 0.0) + time.perf_counter() - start
            self.meta["generated_tokens"] = self.meta.get("generated_tokens", 0) + sum(r.num_positions for r in records)
            self.records.update((q.key, r) for q, r in zip(chunk, records, strict=True))
            new = {q.key: f for q, f in zip(chunk, feats, strict=True) if f is not None}
            self.features.update(new)
            self.save(new)
            bar.update(len(chunk))
        bar.close()

    def feature_map(self) -> dict[str, torch.Tensor]:
        """request_id → features, for run_eagle_curve's ``features``."""
        return {self.records[k].request_id: f for k, f in self.features.items()}

    def get(self, questions: Sequence[Question]) -> list[TrainingRecord]:
        return [self.records[q.key] for q in questions]


# --------------------------------------------------------------------------- the eagle head: loss, training, scores


@torch.no_grad()
def all_features(target: PreTrainedModel, layers: Sequence[int], records: Sequence[TrainingRecord],
                 progress: bool = False, desc: str = "features") -> list[torch.Tensor]:
    """[T-1, F] per record (trainers.eagle.record_features), in the target's dtype: one target forward each."""
    capture = FeatureCapture(target, layers)
    try:
        out = []
        for r in tqdm(records, desc=desc, unit="rec", disable=not progress):
            tokens = r.prompt_ids + r.output_ids
            target(torch.tensor([tokens[:-1]], device=target.device))
            out.append(capture.rows(len(tokens) - 1).clone())
        return out
    finally:
        capture.close()


def _head_hidden(head: EagleHead, next_ids: torch.Tensor, context: torch.Tensor, cache, mask=None,
                 positions=None) -> torch.Tensor:
    """EagleHead.forward without the LM head: next_ids [1, S], context [1, S, H] (fused features or the head's
    own output) → output hidden [1, S, H]. Logits are then taken only where a loss or a score needs them."""
    embed, _ = head._target
    x = head.proj(torch.cat([embed(next_ids), context], dim=-1))
    return head.body(inputs_embeds=x, past_key_values=cache, use_cache=True, attention_mask=mask,
                     position_ids=positions).last_hidden_state


def _head_logits(head: EagleHead, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [N, H] → logits [N, V] fp32 through the head's norm and the target's (full) LM head."""
    return head._target[1](head.norm(hidden)).float()  # the full head, also when serving through a shortlist


def sparse_unrolled_mask(starts: Sequence[int], n: int, step: int, dtype: torch.dtype, device) -> torch.Tensor:
    """trainers.eagle.unrolled_mask when step s's entries start at position ``starts[s-1]`` instead of s-1.

    Additive [1, 1, q, K]: queries are step ``step``'s entries at starts[step-1]..n-1; keys are step 1 at
    0..n-1, then each step s in 2..step at starts[s-1]..n-1 (the cache's order). A query at p sees step-1
    keys at ≤ p-step+1, step s keys at p-step+s, and itself (s = step)."""
    queries = torch.arange(starts[step - 1], n, device=device)
    blocks = [torch.arange(n, device=device)[None] <= (queries - step + 1)[:, None]]
    for s in range(2, step + 1):
        keys = torch.arange(starts[s - 1], n, device=device)
        blocks.append(keys[None] == (queries - step + s)[:, None])
    allowed = torch.cat(blocks, dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def unrolled_logits(head: EagleHead, record: TrainingRecord, features: torch.Tensor, steps: int):
    """The training-time-test unroll of trainers.eagle.ttt_loss, computed where it is needed.

    features: [T-1, F]. Yields (step, output rows [R], logits [R, V]) per step: step s's prediction of output
    row r is what a drafting round's s-th step proposes when its first s-1 drafts were the target's tokens.
    Step s runs only from position max(s-1, first-(steps-s)) on (earlier entries feed no later loss), and
    logits are taken only at positions with a teacher row."""
    tokens = torch.tensor(record.prompt_ids + record.output_ids, device=features.device)
    prompt_len, n = len(record.prompt_ids), len(tokens) - 2  # entries at positions 0..n-1
    first = max(prompt_len - 2, 0)  # entry p predicts output row p + 2 - prompt_len
    if n <= first:
        return
    starts = [max(s - 1, first - (steps - s)) for s in range(1, steps + 1)]
    starts[0] = 0  # step 1 runs everywhere: it is every later step's committed context
    cache = DynamicCache(config=head.config)
    hidden = _head_hidden(head, tokens[1: n + 1][None], head.fuse(features[:n][None]), cache)
    for step in range(1, steps + 1):
        lo = starts[step - 1]
        if step > 1:
            if lo >= n:
                return
            positions = torch.arange(lo, n, device=tokens.device)
            mask = sparse_unrolled_mask(starts, n, step, hidden.dtype, tokens.device)
            prev = starts[step - 2]  # step s at p reads step s-1's output at p-1
            hidden = _head_hidden(head, tokens[positions + 1][None], hidden[:, lo - 1 - prev: n - 1 - prev], cache,
                                  mask, positions[None])
        at = torch.arange(max(first, step - 1), n, device=tokens.device)  # positions with a teacher row
        if at.numel() == 0:
            return
        yield step, at + 2 - prompt_len, _head_logits(head, hidden[0, at - lo])


def ttt_loss_sparse(head: EagleHead, record: TrainingRecord, features: torch.Tensor, steps: int = 3,
                    loss: str = "fkl") -> torch.Tensor | None:
    """trainers.eagle.ttt_loss, equal up to float rounding (tested), at a fraction of the LM-head work."""
    teacher = (record.teacher_token_ids.to(features.device).long(), record.teacher_logprobs.to(features.device).float(),
               record.teacher_logsumexp.to(features.device))
    total, weights = 0.0, 0.0
    for step, rows, logits in unrolled_logits(head, record, features, steps):
        weight = STEP_DECAY ** (step - 1)
        total = total + weight * distillation_loss(loss, logits, *(t[rows] for t in teacher))
        weights += weight
    return total / weights if weights else None


class EagleTrainer:
    """AdamW on the head's own weights, through fp32 master copies when the head is bf16/fp16 (as the
    OnlineDistiller steps a bf16 draft: an lr-1e-4 step is below half a bf16 ulp of most weights)."""

    def __init__(self, head: EagleHead, lr: float, steps: int = 3, loss: str = "fkl", batch_size: int = 4,
                 grad_clip: float = 1.0, seed: int = 0):
        self.head, self.steps, self.loss, self.batch_size, self.grad_clip = head, steps, loss, batch_size, grad_clip
        self.params = [p for p in head.parameters() if p.requires_grad]
        self.masters = [p.detach().float().requires_grad_(True) if p.dtype in (torch.bfloat16, torch.float16) else p
                        for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=0.0)
        self.rng = random.Random(seed)
        self.seconds = 0.0

    def epoch(self, records: Sequence[TrainingRecord], features: Sequence[torch.Tensor]) -> float:
        """One shuffled pass over ``records``; returns the mean batch loss."""
        start = time.perf_counter()
        order = list(range(len(records)))
        self.rng.shuffle(order)
        self.head.train()
        losses = []
        for i in range(0, len(order), self.batch_size):
            batch = [ttt_loss_sparse(self.head, records[j], features[j], self.steps, self.loss)
                     for j in order[i: i + self.batch_size]]
            batch = [b for b in batch if b is not None]
            if not batch:
                continue
            total = torch.stack(batch).mean()
            for p in self.params:
                p.grad = None
            total.backward()
            for p, m in zip(self.params, self.masters, strict=True):
                if m is not p:
                    m.grad = None if p.grad is None else p.grad.float()
            torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(self.params, self.masters, strict=True):
                    if m is not p:
                        p.copy_(m)
            losses.append(float(total.detach()))
        self.head.eval()
        self.seconds += time.perf_counter() - start
        return sum(losses) / len(losses) if losses else float("nan")


@torch.inference_mode()
def score_eagle(head: EagleHead, records: Sequence[TrainingRecord], features: Sequence[torch.Tensor],
                steps: int = 4) -> dict:
    """Held-out quality of the head from the records' teacher rows and target features, no generation.

    top1 / alpha_hat / top4: the first draft step (target features at p, token x_{p+1} → x_{p+2}), the
    quantity score_draft reports for a self-draft. top1_by_step: step s's top-1 where steps 1..s-1 drafted
    the target's tokens (the training-time-test unroll). ``ranks`` [records][steps] → per output row the rank of
    the target's token under step s, for the chain and tree simulations (simulate_rounds)."""
    was = head.training
    head.eval()
    alpha = top1 = top4 = 0.0
    rows = 0
    hits = [0.0] * steps
    counts = [0] * steps
    ranks = []
    try:
        for rec, feats in zip(records, features, strict=True):
            per_step = []
            for step, out_rows, logits in unrolled_logits(head, rec, feats, steps):
                best = rec.teacher_token_ids[out_rows, :1].long()  # [R, 1] the target's argmax (topk sorts)
                rank = (logits > logits.gather(1, best)).sum(-1)  # [R]
                per_step.append(rank.tolist())
                hits[step - 1] += float((rank == 0).sum())
                counts[step - 1] += rank.numel()
                if step == 1:
                    n = rank.numel()
                    alpha += float(estimated_acceptance(logits, rec.teacher_token_ids[out_rows].long(),
                                                        rec.teacher_logprobs[out_rows].float(),
                                                        rec.teacher_logsumexp[out_rows])) * n
                    top1 += float((rank == 0).sum())
                    top4 += float((rank < 4).sum())
                    rows += n
            ranks.append(per_step)
    finally:
        head.train(was)
    return {"alpha_hat": alpha / rows if rows else 0.0, "top1": top1 / rows if rows else 0.0,
            "top4": top4 / rows if rows else 0.0, "rows": rows,
            "top1_by_step": [h / c if c else None for h, c in zip(hits, counts, strict=True)], "ranks": ranks}


@torch.inference_mode()
def self_draft_ranks(draft, records: Sequence[TrainingRecord]) -> list[list[list[int]]]:
    """Per record, the rank of the target's token at each output row under a teacher-forced self-draft, as one
    list per chain step (the same list: a self-draft's s-th step given s-1 right drafts is its prediction
    at that position)."""
    from trainers.distiller import collate, student_logits

    out = []
    for rec in records:
        batch = collate([rec], 1 << 16, next(draft.parameters()).device)
        if batch is None:
            out.append([[]])
            continue
        logits = student_logits(draft, batch)  # [R, V]
        best = batch.teacher_ids[:, :1].long()
        out.append([(logits > logits.gather(1, best)).sum(-1).tolist()])
    return out


def simulate_rounds(ranks: Sequence[Sequence[Sequence[int]]], widths: Sequence[int]) -> float:
    """Mean acceptance length (1 + accepted drafts per round) of greedy rounds over each record's output,
    replayed offline as the engine runs them: a round drafted from output row r accepts level d = 1, 2, ...
    while the target's token at row r+d-1 is within the top ``widths[d-1]`` of the draft's step-d prediction
    there, then commits accepted + 1 tokens. widths all 1 is a γ-chain; [4, 2, 2, 1] the greedy path through
    the static tree. ``ranks[i][s-1][row]``: step s's rank of the target's token at each output row (one list
    serves every step of a self-draft). Row 0 comes from prefill; a round drafts at most up to the record's
    last row but one (the engine's max_tokens room) and a round with no room is plain decoding, not a round."""
    accepted = rounds = 0
    for per_step in ranks:
        n = len(per_step[0])
        r = 1
        while r < n:
            depth = min(len(widths), n - 1 - r)
            k = 0
            while k < depth and per_step[min(k, len(per_step) - 1)][r + k] < widths[k]:
                k += 1
            if depth:
                accepted, rounds = accepted + k, rounds + 1
            r += k + 1
    return 1.0 + accepted / rounds if rounds else 1.0


# --------------------------------------------------------------------------- costs


@torch.inference_mode()
def step_costs(target, drafts: dict, context: int = 200, reps: int = 20, ingest: int = 3) -> dict[str, dict]:
    """Lower-quartile ms of one decode step of the target and of each draft on a ``context``-entry cache of the
    kind the engine uses, timed in turn rep by rep so a shared machine's load drifts over all of them alike.

    A self-draft's step is one token (as forward_cost_curve times it). An eagle head has two forwards a round
    (EagleDrafter.propose): a draft step (one token, its own output fed back) and the round's first forward,
    which feeds ``ingest`` committed positions' target features (accepted + 1): both are timed."""
    from osd.decoding.drafting import crop_cache
    from osd.decoding.kv_cache import make_cache

    device = next(target.parameters()).device
    vocab = target.config.vocab_size
    ids = torch.randint(0, vocab, (1, context + ingest), device=device)
    calls: dict[str, Callable[[], None]] = {}

    def cached(config, prefill, step):
        cache = make_cache(config, "preallocated", context + ingest + 1)
        out = prefill(cache)

        def call():
            step(cache, out)
            crop_cache(cache, context)
        return call

    calls["target"] = cached(target.config, lambda c: target(ids[:, :context], past_key_values=c, logits_to_keep=1),
                             lambda c, _: target(ids[:, context: context + 1], past_key_values=c, logits_to_keep=1))
    for name, d in drafts.items():
        if isinstance(d, EagleHead):
            feats = torch.randn(1, context + ingest, d.feature_size, device=device, dtype=d.fuse.weight.dtype)
            cache = make_cache(d.config, "preallocated", context + ingest + 1)
            _, hidden = d(ids[:, :context], features=feats[:, :context], past_key_values=cache)

            def step(d=d, cache=cache, hidden=hidden):
                d(ids[:, context: context + 1], hidden=hidden[:, -1:], past_key_values=cache)
                crop_cache(cache, context)

            def feed(d=d, cache=cache, feats=feats):
                d(ids[:, context: context + ingest], features=feats[:, context: context + ingest], past_key_values=cache)
                crop_cache(cache, context)
            calls[name], calls[f"{name}:ingest"] = step, feed
        else:
            calls[name] = cached(d.config, lambda c, d=d: d(ids[:, :context], past_key_values=c, logits_to_keep=1),
                                 lambda c, _, d=d: d(ids[:, context: context + 1], past_key_values=c, logits_to_keep=1))
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(reps + 2):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # the first calls pay one-off kernel setup
                times[name].append(time.perf_counter() - start)
    ms = {k: 1000 * sorted(v)[len(v) // 4] for k, v in times.items()}
    out = {"target": {"step_ms": ms["target"]}}
    for name in drafts:
        out[name] = {"step_ms": ms[name], **({"ingest_ms": ms[f"{name}:ingest"], "ingest_rows": ingest}
                                             if f"{name}:ingest" in ms else {})}
    return out


# --------------------------------------------------------------------------- the benchmark


@dataclass
class EagleCurveSettings:
    """Every knob; the defaults are the full run (see docs/benchmarks.md for its time on 2 CPU cores)."""

    max_tokens: int = 64
    teacher_top_k: int = 64
    points: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"domain": (50, 100, 200, 500),
                                                                        "mixed": (50, 100, 200, 500, 1000)})
    gamma: int = 4
    tree: tuple[int, ...] = (4, 2, 2, 1)  # bench trees' static tree (DEFAULT_STATIC), replayed offline
    # Both drafts: bench distill's OnlineDistiller schedule in stream order (an update every update_interval
    # records: steps_per_update AdamW steps over them, batch batch_size, fp32 masters), nothing held for a gate.
    # The eagle head through trainers.eagle.EagleDistiller, EAGLE-3's training-time test over ttt_steps.
    update_interval: int = 8
    steps_per_update: int = 4
    batch_size: int = 8
    ttt_steps: int = 3
    eagle_lr: float | None = None  # None: sweep eagle_lr_grid
    eagle_lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    first2_lr: float | None = None  # None: sweep first2_lr_grid
    first2_lr_grid: tuple[float, ...] = (3e-3, 1e-2)
    # and, at the largest N of each curve, the online head trained this many more shuffled epochs over the same
    # records (0: none): does replaying them help?
    offline_epochs: int = 0
    offline_batch_size: int = 4  # records per step of those epochs
    sweep_records: int = 64  # the domain stream's first records train the sweeps ...
    sweep_val_records: int = 40  # ... and the records right after them validate (never the held-out set)
    # measurement
    chain_prompts: int = 0  # held-out prompts per set the engine serves at every N (0: only at the largest, e2e)
    e2e_prompts: int = 8  # held-out prompts per set for measured tokens/s at the largest N
    shortlist_size: int = 4096
    trees: bool = True  # also serve the static tree and bench trees' dynamic tree at the largest N
    timing_context: int = 200
    timing_reps: int = 20
    seed: int = 0

    @classmethod
    def quick(cls) -> EagleCurveSettings:
        return cls(max_tokens=24, points={"domain": (8, 16), "mixed": (8, 24)}, eagle_lr=3e-3, first2_lr=3e-3,
                   chain_prompts=2, e2e_prompts=2, timing_reps=5)


@dataclass
class HeldOut:
    """One held-out set: its records (teacher rows), their eagle features and the prompts to serve."""

    records: list[TrainingRecord]
    prompts: list[list[int]]
    features: list[torch.Tensor] = field(default_factory=list)


def spread(items: Sequence, k: int) -> list:
    """k items evenly over ``items`` (held-out sets are ordered by category)."""
    if k >= len(items):
        return list(items)
    return [items[int(i * len(items) / k)] for i in range(k)]


def sim_lengths(ranks, gamma: int, tree: Sequence[int]) -> dict:
    return {"chain": simulate_rounds(ranks, [1] * gamma), "tree": simulate_rounds(ranks, tree)}


def engine_chain(target, tokenizer, draft, prompts, gamma: int, max_tokens: int) -> dict:
    engine = SpeculativeEngine(target, tokenizer, draft, EngineConfig(speculation="always", gamma=gamma, record=False))
    r = serve_interleaved({"draft": engine}, prompts, SamplingParams(max_tokens=max_tokens), None, False)["draft"]
    return {k: r[k] for k in ("prompts", "tokens", "rounds", "accepted", "mean_acceptance_length", "alpha_hat",
                              "tokens_per_s")}


def score_heldout_eagle(target, tokenizer, head, heldout: dict[str, HeldOut], chain_sets, s: EagleCurveSettings) -> dict:
    out = {}
    for name, h in heldout.items():
        sc = score_eagle(head, h.records, h.features, max(s.gamma, len(s.tree)))
        ranks = sc.pop("ranks")
        out[name] = {**sc, "simulated": sim_lengths(ranks, s.gamma, s.tree)}
        if name in chain_sets and s.chain_prompts:
            out[name]["engine"] = engine_chain(target, tokenizer, head, spread(h.prompts, s.chain_prompts), s.gamma,
                                               s.max_tokens)
    return out


def score_heldout_draft(target, tokenizer, draft, heldout: dict[str, HeldOut], chain_sets, s: EagleCurveSettings) -> dict:
    out = {}
    for name, h in heldout.items():
        sc = score_draft(draft, h.records, s.batch_size, max_seq_len=1 << 16)
        out[name] = {**sc, "simulated": sim_lengths(self_draft_ranks(draft, h.records), s.gamma, s.tree)}
        if name in chain_sets and s.chain_prompts:
            out[name]["engine"] = engine_chain(target, tokenizer, draft, spread(h.prompts, s.chain_prompts), s.gamma,
                                               s.max_tokens)
    return out


class SparseEagleDistiller(EagleDistiller):
    """trainers.eagle.EagleDistiller (the online trainer of an eagle head) with ``ttt_loss_sparse`` (the same loss,
    a fraction of the LM-head work) over features given by request_id instead of stored in the records."""

    def __init__(self, head: EagleHead, config: DistillConfig, features: dict[str, torch.Tensor]):
        self.features = features
        super().__init__(head, config)

    def _loss(self, records: list[TrainingRecord]) -> torch.Tensor | None:
        losses = [ttt_loss_sparse(self.draft, r, self.features[r.request_id], self.config.ttt_steps, self.config.loss)
                  for r in records]
        losses = [x for x in losses if x is not None]
        return torch.stack(losses).mean() if losses else None


def distill_settings(s: EagleCurveSettings) -> DistillBenchSettings:
    return DistillBenchSettings(loss="fkl", update_interval=s.update_interval, steps_per_update=s.steps_per_update,
                                batch_size=s.batch_size, holdout_fraction=0.0, seed=s.seed)


def eagle_distiller(target, lr: float, s: EagleCurveSettings, features: dict[str, torch.Tensor]) -> SparseEagleDistiller:
    torch.manual_seed(s.seed)  # the head's fresh fuse and proj
    config = distill_config(CONSTRUCTIONS["first2_frozen"], lr, distill_settings(s)).model_copy(
        update={"freeze_embeddings": False, "freeze_head": False, "ttt_steps": s.ttt_steps})
    return SparseEagleDistiller(EagleHead(target).eval(), config, features)


def first2_distiller(target, lr: float, s: EagleCurveSettings) -> OnlineDistiller:
    cons = CONSTRUCTIONS["first2_frozen"]
    return OnlineDistiller(make_draft(target, cons), distill_config(cons, lr, distill_settings(s)))


def feed(distiller: OnlineDistiller, records: Sequence[TrainingRecord]) -> float:
    """Records in order (an update every update_interval), the rest flushed: seconds spent."""
    start = time.perf_counter()
    distiller.add(list(records))
    distiller.maybe_update(force=True)
    return time.perf_counter() - start


def sweep(target, stream: Sequence[TrainingRecord], features: dict[str, torch.Tensor], s: EagleCurveSettings,
          log) -> dict:
    """The learning rates from the stream alone, as bench distill sweeps them: the online schedule over the stream's
    first records, validated (top-1) on the records right after them (never the held-out set)."""
    eagle_lr, first2_lr = s.eagle_lr, s.first2_lr
    n_train = min(s.sweep_records, len(stream) * 2 // 3)
    train, val = list(stream[:n_train]), list(stream[n_train: n_train + s.sweep_val_records])
    out = {"train_records": len(train), "val_records": len(val), "eagle": [], "first2_frozen": []}
    if None in (eagle_lr, first2_lr) and not (train and val):
        raise ValueError(f"a stream of {len(stream)} records is too short to sweep learning rates; fix them")
    val_features = [features[r.request_id] for r in val]
    if eagle_lr is None:
        for lr in s.eagle_lr_grid:
            dist = eagle_distiller(target, lr, s, features)
            seconds = feed(dist, train)
            sc = score_eagle(dist.draft, val, val_features, 1)
            out["eagle"].append({"lr": lr, "val_top1": sc["top1"], "val_alpha_hat": sc["alpha_hat"], "train_s": seconds})
            log(f"[eagle] sweep eagle lr {lr:g}: val top-1 {sc['top1']:.3f} α̂ {sc['alpha_hat']:.3f} ({seconds:.0f}s)")
        eagle_lr = max(out["eagle"], key=lambda r: r["val_top1"])["lr"]
    if first2_lr is None:
        for lr in s.first2_lr_grid:
            dist = first2_distiller(target, lr, s)
            seconds = feed(dist, train)
            sc = score_draft(dist.candidate(), val, s.batch_size, max_seq_len=1 << 16)
            out["first2_frozen"].append({"lr": lr, "val_top1": sc["top1"], "val_alpha_hat": sc["alpha_hat"],
                                         "train_s": seconds})
            log(f"[eagle] sweep first2_frozen lr {lr:g}: val top-1 {sc['top1']:.3f} ({seconds:.0f}s)")
        first2_lr = max(out["first2_frozen"], key=lambda r: r["val_top1"])["lr"]
    out["chosen"] = {"eagle_lr": eagle_lr, "first2_lr": first2_lr}
    log(f"[eagle] chosen: eagle lr {eagle_lr:g}, first2_frozen lr {first2_lr:g}")
    return out


def replay_epochs(target, tokenizer, head: EagleHead, records: Sequence[TrainingRecord],
                  features: dict[str, torch.Tensor], heldout: dict[str, HeldOut], val: Sequence[TrainingRecord],
                  lr: float, epochs: int, s: EagleCurveSettings) -> dict:
    """A copy of ``head`` (the online head at a curve's largest N) trained ``epochs`` more shuffled epochs over the
    same ``records`` (EagleTrainer, fresh AdamW), scored after each: does replaying them help? ``val``: records
    outside the stream's first N to watch for over-fitting without the held-out set (may be empty)."""
    import copy

    torch.manual_seed(s.seed)
    head = copy.deepcopy(head).train().requires_grad_(True)
    trainer = EagleTrainer(head, lr, s.ttt_steps, batch_size=s.offline_batch_size, seed=s.seed)
    feats = [features[r.request_id] for r in records]
    rows = []
    for epoch in range(1, epochs + 1):
        loss = trainer.epoch(records, feats)
        row = {"epoch": epoch, "loss": loss, "train_s": trainer.seconds,
               "heldout": score_heldout_eagle(target, tokenizer, head, heldout, (), s)}
        if val:
            row.update(val_records=len(val), val_top1=score_eagle(head, val, [features[r.request_id] for r in val],
                                                                  1)["top1"])
        rows.append(row)
    return {"records": len(records), "lr": lr, "batch_size": s.offline_batch_size, "rows": rows}


DRAFTS = ("eagle", "first2_frozen")


def train_curve(kind: str, target, tokenizer, stream: Sequence[TrainingRecord], features: dict[str, torch.Tensor],
                heldout: dict[str, HeldOut], chain_sets: Sequence[str], points: Sequence[int], lr: float,
                s: EagleCurveSettings, progress: bool, log) -> tuple[list[dict], object]:
    """One draft ("eagle" or "first2_frozen") trained online in stream order and scored at every N of ``points``
    (an update is forced at each N, so a point is exactly the first N records). Returns the points and the draft
    at the largest N."""
    distiller = eagle_distiller(target, lr, s, features) if kind == "eagle" else first2_distiller(target, lr, s)
    score = score_heldout_eagle if kind == "eagle" else score_heldout_draft
    fed, rows, seconds, draft = 0, [], 0.0, None
    for n in tqdm(points, desc=f"curve {kind}", unit="point", disable=not progress):
        seconds += feed(distiller, stream[fed:n])
        fed, draft = n, distiller.candidate()
        start = time.perf_counter()
        rows.append({"records": n, "lr": lr, "updates": distiller.updates, "train_s": seconds,
                     "heldout": score(target, tokenizer, draft, heldout, chain_sets, s),
                     "score_s": time.perf_counter() - start})
        log(f"[eagle]   {kind} N={n}: " + ", ".join(
            f"{name} top-1 {v['top1']:.3f} α̂ {v['alpha_hat']:.3f} chain {v['simulated']['chain']:.2f}"
            + (f" (engine {v['engine']['mean_acceptance_length']:.2f})" if "engine" in v else "")
            + f" tree {v['simulated']['tree']:.2f}" for name, v in rows[-1]["heldout"].items())
            + f" [{seconds:.0f}s training]")
    return rows, draft


def run_curve(target, tokenizer, stream: Sequence[TrainingRecord], features: dict[str, torch.Tensor],
              heldout: dict[str, HeldOut], chain_sets: Sequence[str], points: Sequence[int], chosen: dict,
              s: EagleCurveSettings, progress: bool, log) -> tuple[list[dict], EagleHead, object]:
    """Both drafts' curves (train_curve), point by point side by side; the drafts at the largest N."""
    eagle, head = train_curve("eagle", target, tokenizer, stream, features, heldout, chain_sets, points,
                              chosen["eagle_lr"], s, progress, log)
    first2, draft = train_curve("first2_frozen", target, tokenizer, stream, features, heldout, chain_sets, points,
                                chosen["first2_lr"], s, progress, log)
    return [{"records": a["records"], "eagle": a, "first2_frozen": b} for a, b in zip(eagle, first2, strict=True)], head, draft


def save_draft(draft, path: str | Path) -> None:
    """A trained draft's own weights (an eagle head's, or a self-draft's model) as safetensors."""
    from safetensors.torch import save_model

    save_model(draft if isinstance(draft, EagleHead) else draft.model, str(path))


def load_draft(kind: str, target, path: str | Path):
    from safetensors.torch import load_model

    draft = EagleHead(target) if kind == "eagle" else make_draft(target, CONSTRUCTIONS["first2_frozen"])
    load_model(draft if kind == "eagle" else draft.model, str(path))
    return draft.eval()


def shortlist_view(draft, shortlist: torch.Tensor):
    """The same weights served through ``shortlist``: a DraftModel view, or an eagle head's copy (EagleHead's
    deepcopy keeps borrowing the target's embedding and LM head) with set_shortlist. None when the head cannot."""
    if isinstance(draft, EagleHead):
        if not hasattr(draft, "set_shortlist"):
            return None
        import copy

        view = copy.deepcopy(draft)
        view.set_shortlist(shortlist)
        return view.eval()
    return DraftModel(draft.model, shortlist)  # the same weights behind the shortlist head


@torch.inference_mode()
def shortlist_top1(head: EagleHead, records: Sequence[TrainingRecord], features: Sequence[torch.Tensor]) -> dict:
    """The first step's top-1 and α̂ as served through the head's shortlist (logits_from_hidden)."""
    hits = alpha = rows = 0.0
    for rec, feats in zip(records, features, strict=True):
        tokens = torch.tensor(rec.prompt_ids + rec.output_ids, device=feats.device)
        p, n = len(rec.prompt_ids), len(tokens) - 2
        first = max(p - 2, 0)
        if n <= first:
            continue
        logits, _ = head(tokens[1: n + 1][None], features=feats[:n][None], past_key_values=DynamicCache(config=head.config))
        logits = logits[0, first:n]
        out_rows = torch.arange(first, n) + 2 - p
        ids = rec.teacher_token_ids[out_rows].long()
        hits += float((logits.argmax(-1) == ids[:, 0]).sum())
        alpha += float(estimated_acceptance(logits, ids, rec.teacher_logprobs[out_rows].float(),
                                            rec.teacher_logsumexp[out_rows])) * len(out_rows)
        rows += len(out_rows)
    return {"top1": hits / rows if rows else 0.0, "alpha_hat": alpha / rows if rows else 0.0, "rows": int(rows)}


def trained_on(head: EagleHead, draft, records: Sequence[TrainingRecord], features: dict[str, torch.Tensor],
               count: int = 40) -> dict:
    """Top-1 and α̂ of both drafts on ``count`` records they trained on (spread over them): next to the held-out
    numbers, a gap means data-limited, none means the schedule or the draft's capacity limits it."""
    sample = spread(records, count)
    e = score_eagle(head, sample, [features[r.request_id] for r in sample], 1)
    f = score_draft(draft, sample, 8, max_seq_len=1 << 16)
    return {"records": len(sample), "eagle": {k: e[k] for k in ("top1", "alpha_hat", "rows")},
            "first2_frozen": {k: f[k] for k in ("top1", "alpha_hat", "rows")}}


def costs_and_e2e(target, tokenizer, head: EagleHead, draft, stream: Sequence[TrainingRecord],
                  heldout: dict[str, HeldOut], sets: Sequence[str], s: EagleCurveSettings, progress: bool, log) -> dict:
    """At the largest N: c of each draft (full head and shortlist) and measured tokens/s against the target
    alone, every engine serving each held-out prompt in turn."""
    context = min(s.timing_context, int(getattr(target.config, "max_position_embeddings", 2048)) - 32)
    shortlist = build_shortlist(stream, s.shortlist_size, target.config.vocab_size)
    variants = {"first2_frozen": draft, "eagle": head}
    for name in ("first2_frozen", "eagle"):
        view = shortlist_view(variants[name], shortlist)
        if view is not None:
            variants[f"{name}+shortlist"] = view
    steps = step_costs(target, variants, context, s.timing_reps)
    t1 = steps.pop("target")["step_ms"]
    cost = {"target_step_ms": t1, "context": context, "variants": {}}
    for name, ms in steps.items():
        # a round drafts γ tokens: a self-draft γ steps; an eagle head its ingest forward and γ-1 steps
        round_ms = ms["ingest_ms"] + (s.gamma - 1) * ms["step_ms"] if "ingest_ms" in ms else s.gamma * ms["step_ms"]
        cost["variants"][name] = {**ms, "c": ms["step_ms"] / t1, "round_draft_ms": round_ms,
                                  "c_round": round_ms / (s.gamma * t1)}
    if "eagle+shortlist" in variants:
        h = [heldout[k] for k in sets]
        cost["eagle_shortlist_heldout"] = shortlist_top1(variants["eagle+shortlist"], [r for x in h for r in x.records],
                                                         [f for x in h for f in x.features])
    cost["shortlist_size"] = int(shortlist.numel())
    cost["shortlist_coverage_heldout"] = coverage(shortlist, [r for k in sets for r in heldout[k].records])
    log("[eagle]   c: " + ", ".join(f"{k} {v['c']:.3f} ({v['step_ms']:.1f} ms)" for k, v in cost["variants"].items())
        + f"; target step {t1:.1f} ms")

    prompts = [p for k in sets for p in spread(heldout[k].prompts, s.e2e_prompts)]
    engines = {"target": SpeculativeEngine(target, tokenizer, None, EngineConfig(speculation="always", record=False))}
    for name, d in variants.items():
        engines[name] = SpeculativeEngine(target, tokenizer, d,
                                          EngineConfig(speculation="always", gamma=s.gamma, record=False))
    if s.trees:  # bench trees' static and dynamic trees, with the full heads
        from bench.trees import DEFAULT_DYNAMIC, DEFAULT_STATIC
        from osd.decoding.cost import measure_verification_cost
        from osd.decoding.tree_engine import TreeSpeculativeEngine

        static = DEFAULT_STATIC.model_copy(update={"branching": list(s.tree)})
        curve = measure_verification_cost(target, DEFAULT_DYNAMIC.max_nodes + 1, context)
        for name in ("eagle", "first2_frozen"):
            for shape, tree in (("static_tree", static), ("dynamic_tree", DEFAULT_DYNAMIC)):
                if name == "first2_frozen" and shape == "static_tree":
                    continue  # bench trees measures the self-draft's static tree; the replay checks ours
                engines[f"{name}+{shape}"] = TreeSpeculativeEngine.from_engine(engines[name], tree, curve)
    e2e = serve_interleaved(engines, prompts, SamplingParams(max_tokens=s.max_tokens), "target", progress, "e2e")
    for v in e2e.values():  # greedy, so every engine should emit the target's tokens; bf16 can flip a near-tie
        v["identical_prompts"] = v["prompts"] - len(v["first_divergence"])
    log("[eagle]   e2e: " + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s (×{v['speedup_vs_target']:.2f}, accept "
                                     f"{v['mean_acceptance_length']:.2f})" for k, v in e2e.items()))
    return {"cost": cost, "e2e": e2e, "e2e_prompts": len(prompts)}


def run_eagle_curve(target, tokenizer, streams: dict[str, Sequence[TrainingRecord]], heldout: dict[str, HeldOut],
                    curve_sets: dict[str, Sequence[str]], settings: EagleCurveSettings | None = None, *,
                    features: dict[str, torch.Tensor] | None = None, progress: bool = True,
                    log: Callable[[str], None] = tqdm.write) -> dict:
    """The benchmark on injected models and records (module docstring).

    streams: name → records in stream order (the sweep uses the first, the domain stream); heldout: name →
    HeldOut; curve_sets: stream name → the held-out sets whose prompts the engine serves for it (every set is
    scored offline for every stream); features: request_id → [T-1, F] target features already taken
    (greedy_records), the rest are computed here."""
    s = settings or EagleCurveSettings()
    target.requires_grad_(False)  # the head borrows its embedding and LM head: no gradients into the target
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    layers = EagleHead(target).feature_layers
    every = [r for recs in streams.values() for r in recs] + [r for h in heldout.values() for r in h.records]
    distinct = list({r.request_id: r for r in every}.values())  # the mixed stream shares the domain's records
    feats = dict(features or {})
    missing = [r for r in distinct if r.request_id not in feats]
    feats.update(zip([r.request_id for r in missing], all_features(target, layers, missing, progress, "features"),
                     strict=True))
    for h in heldout.values():
        h.features = [feats[r.request_id] for r in h.records]
    timings["features"] = time.perf_counter() - t0
    log(f"[eagle] features of {len(distinct)} records (layers {layers}): {len(missing)} computed in "
        f"{timings['features']:.0f}s, the rest taken while generating")

    t1 = time.perf_counter()
    sw = sweep(target, next(iter(streams.values())), feats, s, log)
    timings["sweep"] = time.perf_counter() - t1

    curves = {}
    for name, recs in streams.items():
        points = [n for n in s.points.get(name, ()) if n <= len(recs)]
        if not points:
            continue
        t2 = time.perf_counter()
        log(f"[eagle] curve {name}: N = {points}")
        rows, head, draft = run_curve(target, tokenizer, recs, feats, heldout, curve_sets[name], points, sw["chosen"],
                                      s, progress, log)
        timings[f"curve_{name}"] = time.perf_counter() - t2
        curves[name] = {"records": len(recs), "points": rows, "heldout_sets": list(curve_sets[name]),
                        "trained_on": trained_on(head, draft, recs[: points[-1]], feats)}
        if s.offline_epochs:
            t3 = time.perf_counter()
            curves[name]["replay_epochs"] = replay_epochs(
                target, tokenizer, head, list(recs[: points[-1]]), feats, heldout,
                list(recs[points[-1]: points[-1] + s.sweep_val_records]), sw["chosen"]["eagle_lr"], s.offline_epochs, s)
            timings[f"replay_epochs_{name}"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        curves[name].update(costs_and_e2e(target, tokenizer, head, draft, recs[: points[-1]], heldout,
                                          curve_sets[name], s, progress, log))
        timings[f"e2e_{name}"] = time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0
    result = {"benchmark": "eagle_curve", "settings": _jsonable(asdict(s)), "feature_layers": layers,
              "heldout": {k: {"records": len(h.records), "positions": sum(r.num_positions for r in h.records)}
                          for k, h in heldout.items()},
              "sweep": sw, "curves": curves, "timings_s": timings}
    result["aims"] = aims(result)
    return result


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def aims(result: dict) -> dict:
    """Issue 15's aims, read off the domain stream (its held-out set, ≤ 500 records): the online curve and, where
    run, the online head plus replayed epochs over the same records. Acceptance lengths: served by the engine where
    it served the head (the largest N), replayed offline at every point. Tokens/s: every eagle engine served."""
    out = {}
    dom = result["curves"].get("domain")
    speed = [(v["speedup_vs_target"], f"{name}, N = {c['points'][-1]['records']} online: {k}")
             for name, c in result["curves"].items() for k, v in c.get("e2e", {}).items() if k.startswith("eagle")]
    if dom:
        key = dom["heldout_sets"][0]
        big = dom["points"][-1]["records"]
        scored = [(p["eagle"]["heldout"][key], f"N = {p['records']} online") for p in dom["points"] if p["records"] <= 500]
        served = [(dom.get("e2e", {}), f"N = {big} online")] if big <= 500 else []
        replay = dom.get("replay_epochs")
        if replay and replay["records"] <= 500:
            label = f"N = {replay['records']} online + {{}} epochs"
            scored += [(x["heldout"][key], label.format(x["epoch"])) for x in replay["rows"]]
            if replay.get("e2e"):
                served.append((replay["e2e"], label.format(replay["rows"][-1]["epoch"])))
                speed += [(v["speedup_vs_target"], f"domain, {label.format(replay['rows'][-1]['epoch'])}: {k}")
                          for k, v in replay["e2e"].items() if k.startswith("eagle")]
        top1 = max(((h["top1"], where) for h, where in scored), default=(None, None))
        out["top1"] = {"aim": TOP1_AIM, "best": top1[0], "where": top1[1], "heldout": key,
                       "met": top1[0] is not None and top1[0] >= TOP1_AIM}
        for m in ("chain", "tree"):
            rep = max(((h["simulated"][m], where) for h, where in scored), default=(None, None))
            srv = max(((v["mean_acceptance_length"], f"{where}: {k}") for e2e, where in served for k, v in e2e.items()
                       if k.startswith("eagle") and ("tree" in k) == (m == "tree")), default=(None, None))
            best = srv[0] if srv[0] is not None else rep[0]
            out[f"{m}_acceptance"] = {"aim": ACCEPT_AIM, "met": best is not None and best >= ACCEPT_AIM, "best": best,
                                      "served": {"value": srv[0], "where": srv[1]} if srv[0] is not None else None,
                                      "replayed": {"value": rep[0], "where": rep[1]}, "heldout": key}
    if speed:
        x, where = max(speed)
        out["speedup"] = {"aim": SPEEDUP_AIM, "best": x, "where": where, "met": x >= SPEEDUP_AIM}
    return out


# --------------------------------------------------------------------------- reporting


def _pooled(heldout: dict, sets: Sequence[str]) -> dict:
    """Rows-weighted top-1/α̂ and rounds-weighted engine acceptance length over ``sets``."""
    rows = sum(heldout[k]["rows"] for k in sets)
    out = {m: sum(heldout[k][m] * heldout[k]["rows"] for k in sets) / rows for m in ("top1", "alpha_hat", "top4")}
    out["simulated"] = {m: statistics.fmean([heldout[k]["simulated"][m] for k in sets]) for m in ("chain", "tree")}
    eng = [heldout[k]["engine"] for k in sets if "engine" in heldout[k]]
    if eng:
        rounds = sum(e["rounds"] for e in eng)
        out["engine"] = {"mean_acceptance_length": 1 + sum(e["accepted"] for e in eng) / rounds if rounds else 1.0}
    return out


def curve_table(curve: dict) -> str:
    sets = curve["heldout_sets"]
    header = ["N records", "eagle top-1", "f2f top-1", "eagle α̂", "f2f α̂", "eagle chain (engine)", "f2f chain (engine)",
              "eagle chain (replay)", "f2f chain (replay)", "eagle tree (replay)", "f2f tree (replay)",
              "eagle top-1 by step", "train s eagle / f2f"]
    rows = []
    for p in curve["points"]:
        e, f = _pooled(p["eagle"]["heldout"], sets), _pooled(p["first2_frozen"]["heldout"], sets)
        by_step = [p["eagle"]["heldout"][k]["top1_by_step"] for k in sets]
        rows.append([p["records"], e["top1"], f["top1"], e["alpha_hat"], f["alpha_hat"],
                     e.get("engine", {}).get("mean_acceptance_length", "–"),
                     f.get("engine", {}).get("mean_acceptance_length", "–"),
                     e["simulated"]["chain"], f["simulated"]["chain"], e["simulated"]["tree"], f["simulated"]["tree"],
                     " / ".join(f"{x:.2f}" for x in by_step[0] if x is not None),
                     f"{p['eagle']['train_s']:.0f} / {p['first2_frozen']['train_s']:.0f}"])
    return table(header, rows)


def render_markdown(result: dict, plot_name: str | None = "eagle_learning_curve.png") -> str:
    s, env, cfg = result["settings"], result.get("environment", {}), result.get("config", {})
    sw = result["sweep"]
    ch = sw["chosen"]
    lines = [
        f"## EAGLE head vs first2_frozen: learning curve (`osd bench eagle`{', ' + env['date'] if env else ''})",
        "",
        f"Target `{cfg.get('target', '?')}` in {cfg.get('dtype', '?')} (the serving default here), records made by the "
        f"target alone, greedy, {s['max_tokens']} tokens, top-{s['teacher_top_k']} teacher rows. Streams: "
        + "; ".join(f"**{k}** {c['records']} records" for k, c in result["curves"].items())
        + (f" ({cfg['streams']})" if cfg.get("streams") else "") + ". Held-out (never trained on): "
        + ", ".join(f"{k} {v['records']} records" for k, v in result["heldout"].items()) + ".",
        "",
        (f"Both drafts train online in stream order on bench distill's OnlineDistiller schedule (an update every "
         f"{s['update_interval']} records: {s['steps_per_update']} AdamW steps × batch {s['batch_size']} over them, fp32 "
         f"master weights, nothing held for a gate), each point exactly the stream's first N records. **eagle**: "
         f"osd/decoding/eagle.py's head (target features after layers {result['feature_layers']}) through "
         f"trainers.eagle.EagleDistiller, EAGLE-3's training-time test over {s['ttt_steps']} steps, lr "
         f"{ch['eagle_lr']:g}. **first2_frozen** (f2f): the first 2 target layers, embeddings and LM head frozen, lr "
         f"{ch['first2_lr']:g}. Learning rates by a sweep on the domain stream's first {sw['train_records']} records, "
         f"validated on the next {sw['val_records']} (top-1)"
         + (": " + "; ".join(f"{k} " + ", ".join(f"{r['lr']:g} → {r['val_top1']:.3f}" for r in sw[k])
                             for k in ("eagle", "first2_frozen") if sw[k]) if sw["eagle"] or sw["first2_frozen"] else
            " (fixed)") + "."),
        "",
        (f"Top-1 and α̂: the first draft step on the held-out records' teacher rows. Chain: mean acceptance length of "
        f"γ={s['gamma']} chains (1 + accepted per round), replayed offline on every held-out record from the drafts' "
        f"ranks of the target's tokens "
        f"(eagle: the training-time-test unroll, exactly what a greedy round whose earlier drafts were accepted "
        f"sees). Tree: bench trees' static tree {list(s['tree'])} replayed the same way (the greedy path is accepted "
        f"while the target's token is in the node's top-b). At the largest N the engine serves held-out prompts with "
        f"chains and both trees (its acceptance lengths check the replay)."),
        "",
    ]
    for name, c in result["curves"].items():
        lines += [f"### {name} stream (held-out: {', '.join(c['heldout_sets'])})", ""]
        sched = c.get("schedule")
        if sched and sched.get("steps_per_update") != s["steps_per_update"]:
            lines += [(f"This curve's schedule: {sched['steps_per_update']} steps per update of "
                       f"{sched['update_interval']} records (both drafts)."), ""]
        lines += [curve_table(c), ""]
        if c.get("trained_on"):
            t = c["trained_on"]
            lines += [(f"On {t['records']} of the records they trained on (N = {c['points'][-1]['records']}): top-1 eagle "
                       f"{t['eagle']['top1']:.3f}, first2_frozen {t['first2_frozen']['top1']:.3f} (a gap to held-out means "
                       "data-limited)."), ""]
        if c.get("replay_epochs"):
            r, sets = c["replay_epochs"], c["heldout_sets"]
            has_val = "val_top1" in r["rows"][0]
            lines += [(f"Replaying the same records: the online eagle head at N = {r['records']}, then more shuffled "
                       f"epochs over those records (batch {r['batch_size']}, lr {r['lr']:g}, fresh AdamW)"
                       + (f"; validation: {r['rows'][0]['val_records']} records of the domain never in its first N"
                          if has_val else "") + ":"), "",
                      table(["epochs", "train loss"] + (["val top-1"] if has_val else [])
                            + ["held-out top-1", "α̂", "chain (replay)", "tree (replay)", "train s"],
                            [[x["epoch"], x["loss"]] + ([x["val_top1"]] if has_val else [])
                             + [q["top1"], q["alpha_hat"], q["simulated"]["chain"], q["simulated"]["tree"],
                                round(x["train_s"])]
                             for x in r["rows"] for q in [_pooled(x["heldout"], sets)]]), ""]
            if r.get("e2e"):
                lines += [(f"Served with the head after {r['rows'][-1]['epoch']} replayed epochs (same prompts and "
                           "engines as below, one interleaved run of its own): "
                           + ", ".join(f"{k} ×{v['speedup_vs_target']:.2f} (accept {v['mean_acceptance_length']:.2f})"
                                       for k, v in r["e2e"].items() if k != "target") + "."), ""]
        cost, e2e = c["cost"], c["e2e"]
        lines += [
            f"At N = {c['points'][-1]['records']}: draft cost c = draft step / target step ({cost['target_step_ms']:.1f} ms, "
            f"{cost['context']}-token cache) and measured tokens/s on {c['e2e_prompts']} held-out prompts, each served by "
            f"every engine in turn (γ={s['gamma']}). Shortlist: {cost['shortlist_size']} ids by teacher mass in the "
            f"stream, covering {cost['shortlist_coverage_heldout']:.1%} of held-out output tokens"
            + (f"; the eagle head through it: top-1 {cost['eagle_shortlist_heldout']['top1']:.3f}"
               if cost.get("eagle_shortlist_heldout") else "") + ".",
            "",
            table(["engine", "draft step ms", "c", "c per round", "tok/s", "× target", "accept len", "α̂ served",
                   "same output as the target"],
                  [[k, cost["variants"].get(k, {}).get("step_ms", "–"), cost["variants"].get(k, {}).get("c", "–"),
                    cost["variants"].get(k, {}).get("c_round", "–"), v["tokens_per_s"], v["speedup_vs_target"],
                    v["mean_acceptance_length"], v["alpha_hat"] if v.get("alpha_hat") is not None else "–",
                    _same(v)] for k, v in e2e.items()]),
            "",
        ]
        if any(not v.get("same_output", True) for v in e2e.values()):
            lines += [("Greedy, so every engine should emit the target's tokens; where one does not, the outputs part at "
                       "a near-tie: in " + cfg.get("dtype", "?") + " a verification forward over several tokens rounds "
                       "differently from the target's one-token step (docs/benchmarks.md's lm-eval section runs float32 "
                       "for this reason). Speculation itself stays lossless: tests/decoding/test_eagle.py checks "
                       "greedy equality in float32."), ""]
    if plot_name:
        lines += [f"![eagle learning curve]({plot_name})", ""]
    lines += ["### Aims (issue 15)", "", aims_paragraph(result), ""]
    t = result["timings_s"]
    lines.append("Run time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in t.items())
                 + (f"; records {cfg['records_generation_s'] / 60:.1f} min to generate" if cfg.get("records_generation_s")
                    else "") + ". The machine (2 cores) was shared with other work: timings are ratios from one run.")
    return "\n".join(lines)


def aims_paragraph(result: dict) -> str:
    a, parts = result["aims"], []
    if "top1" in a:
        x = a["top1"]
        parts.append(f"Held-out top-1 ≥ {x['aim']} after ≤ 500 domain records: **{'met' if x['met'] else 'not met'}** "
                     + f"(best {x['best']:.3f}, {x['where']}; {x['heldout']}).")
        for m, what in (("tree", "with trees"), ("chain", f"with γ={result['settings']['gamma']} chains")):
            x = a[f"{m}_acceptance"]
            served = f"served {x['served']['value']:.2f} ({x['served']['where']})" if x["served"] else "not served"
            parts.append(f"Mean acceptance length ≥ {x['aim']} {what}: **{'met' if x['met'] else 'not met'}** ({served}; "
                         + f"replayed {x['replayed']['value']:.2f}, {x['replayed']['where']}).")
    if "speedup" in a:
        x = a["speedup"]
        parts.append(f"End to end ≥ {x['aim']}× the target alone: **{'met' if x['met'] else 'not met'}** "
                     f"(best ×{x['best']:.2f}, {x['where']}).")
    parts.append(climbing_sentence(result))
    return " ".join(parts)


def climbing_sentence(result: dict) -> str:
    bits = []
    for name, c in result["curves"].items():
        pts = c["points"]
        if len(pts) < 2:
            continue
        sets = c["heldout_sets"]
        a, b = pts[-2], pts[-1]
        ea, eb = _pooled(a["eagle"]["heldout"], sets)["top1"], _pooled(b["eagle"]["heldout"], sets)["top1"]
        fa, fb = (_pooled(a["first2_frozen"]["heldout"], sets)["top1"], _pooled(b["first2_frozen"]["heldout"], sets)["top1"])
        bits.append(f"{name}: eagle top-1 {ea:.3f} → {eb:.3f} from N = {a['records']} to {b['records']} "
                    f"({'still climbing' if eb - ea > 0.01 else 'flat'}), first2_frozen {fa:.3f} → {fb:.3f}")
    return ("Last step of each curve: " + "; ".join(bits) + ".") if bits else ""


def _same(v: dict) -> str:
    if "identical_prompts" not in v:
        return "yes" if v.get("same_output", True) else "no"
    n = v["prompts"]
    return "yes" if v["identical_prompts"] == n else (f"{v['identical_prompts']}/{n} prompts (others part at tokens "
                                                      + ", ".join(map(str, v["first_divergence"])) + ")")


def plot_curves(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result["curves"]
    colors = {"eagle": "C0", "first2_frozen": "C2"}
    fig, axes = plt.subplots(2, len(curves), figsize=(6.5 * len(curves), 8), squeeze=False)
    for col, (name, c) in enumerate(curves.items()):
        sets = c["heldout_sets"]
        x = [p["records"] for p in c["points"]]
        pooled = {k: [_pooled(p[k]["heldout"], sets) for p in c["points"]] for k in DRAFTS}
        top, low = axes[0][col], axes[1][col]
        for k, style in (("eagle", "-"), ("first2_frozen", "--")):
            top.plot(x, [q["top1"] for q in pooled[k]], "o" + style, color=colors[k], label=f"{k} top-1")
            top.plot(x, [q["alpha_hat"] for q in pooled[k]], "s" + style, color=colors[k], alpha=0.45, label=f"{k} α̂")
            low.plot(x, [q["simulated"]["tree"] for q in pooled[k]], "^" + style, color=colors[k],
                     label=f"{k} static tree {list(result['settings']['tree'])} (replay)")
            low.plot(x, [q["simulated"]["chain"] for q in pooled[k]], "o" + style, color=colors[k], alpha=0.6,
                     label=f"{k} chain γ={result['settings']['gamma']} (replay)")
        replay = c.get("replay_epochs")
        if replay:
            q = _pooled(replay["rows"][-1]["heldout"], sets)
            top.plot([replay["records"]], [q["top1"]], "*", ms=14, color=colors["eagle"],
                     label=f"eagle top-1, + {replay['rows'][-1]['epoch']} epochs over the same records")
            low.plot([replay["records"]], [q["simulated"]["tree"]], "*", ms=14, color=colors["eagle"],
                     label=f"eagle tree, + {replay['rows'][-1]['epoch']} epochs (replay)")
        for engine, marker in (("eagle", "x"), ("eagle+static_tree", "X"), ("first2_frozen", "x"),
                               ("first2_frozen+dynamic_tree", "P"), ("eagle+dynamic_tree", "P")):
            served = c.get("e2e", {}).get(engine)
            if served:
                low.plot([x[-1]], [served["mean_acceptance_length"]], marker, ms=10,
                         color=colors[engine.split("+")[0]], label=f"{engine} served by the engine")
        top.axhline(TOP1_AIM, color="grey", ls=":", lw=0.8, label=f"aim top-1 {TOP1_AIM}")
        low.axhline(ACCEPT_AIM, color="grey", ls=":", lw=0.8, label=f"aim {ACCEPT_AIM}")
        top.set(ylim=(0, 1), ylabel="held-out agreement (first draft step)",
                title=f"{name} stream (held-out: {', '.join(sets)})")
        low.set(ylabel="mean acceptance length", ylim=(1, max(ACCEPT_AIM + 0.2, low.get_ylim()[1])))
        for ax in (top, low):
            ax.set_xscale("log")
            ax.set_xticks(x, [str(v) for v in x])
            ax.minorticks_off()
            ax.set_xlabel("records trained on")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- command line


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def add_bench_eagle_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench eagle (also reads --quick, --records, --plot, --e2e-prompts, --shortlist-size, "
                                  "--gamma, --max-tokens [64])")
    g.add_argument("--eagle-domain", type=int, default=500, help="GSM8K training questions in the domain stream")
    g.add_argument("--eagle-mixed", type=int, default=1000, help="records in the mixed stream (GSM8K + Spec-Bench)")
    g.add_argument("--eagle-gsm8k-heldout", type=int, default=40, help="held-out GSM8K questions (the file's last)")
    g.add_argument("--eagle-spec-heldout", type=int, default=3, help="held-out Spec-Bench questions per category (last)")
    g.add_argument("--eagle-points-domain", type=_ints, default=None, help="record counts of the domain curve")
    g.add_argument("--eagle-points-mixed", type=_ints, default=None, help="record counts of the mixed curve")
    g.add_argument("--eagle-lr", type=float, default=None, help="fix the head's lr (default: sweep)")
    g.add_argument("--eagle-offline-epochs", type=int, default=None,
                   help="at each curve's largest N, also train the online head this many more epochs over the same "
                        "records (default 0: no)")
    g.add_argument("--eagle-streams", default="domain,mixed", help="which curves to run (a partial run merges into "
                                                                   "the existing eagle_curve.json)")
    g.add_argument("--eagle-first2-lr", type=float, default=None, help="fix first2_frozen's lr (default: sweep)")
    g.add_argument("--eagle-chain-prompts", type=int, default=None,
                   help="held-out prompts per set the engine serves at every N (default 0: only at the largest N)")
    g.add_argument("--eagle-gen-batch", type=int, default=16, help="prompts per batched forward generating records")


def settings_from_args(args: argparse.Namespace) -> EagleCurveSettings:
    s = EagleCurveSettings.quick() if args.quick else EagleCurveSettings(max_tokens=args.max_tokens)
    points = dict(s.points)
    if args.eagle_points_domain:
        points["domain"] = args.eagle_points_domain
    if args.eagle_points_mixed:
        points["mixed"] = args.eagle_points_mixed
    overrides = {"eagle_lr": args.eagle_lr, "offline_epochs": args.eagle_offline_epochs, "first2_lr": args.eagle_first2_lr,
                 "chain_prompts": args.eagle_chain_prompts, "e2e_prompts": args.e2e_prompts,
                 "shortlist_size": args.shortlist_size, "gamma": args.gamma if args.gamma != 4 else None}
    return replace(s, points=points, **{k: v for k, v in overrides.items() if v is not None})


def run_eagle_curve_command(args: argparse.Namespace) -> dict:
    from osd.config import ModelConfig
    from osd.data.workloads import chat_prompt_ids
    from osd.decoding.engine import build_engine

    s = settings_from_args(args)
    wanted = [x for x in args.eagle_streams.split(",") if x]
    if not wanted or set(wanted) - {"domain", "mixed"}:
        raise ValueError(f"--eagle-streams takes domain and/or mixed, got {args.eagle_streams!r}")
    out = Path(args.out)
    previous = out / "eagle_curve.json"
    merge = not args.quick and set(wanted) != {"domain", "mixed"} and previous.exists()
    old = json.loads(previous.read_text()) if merge else None
    if old is not None:  # a partial run: the learning rates the earlier run chose, unless set
        chosen = old["sweep"]["chosen"]
        s = replace(s, eagle_lr=s.eagle_lr if s.eagle_lr is not None else chosen["eagle_lr"],
                    first2_lr=s.first2_lr if s.first2_lr is not None else chosen["first2_lr"])
    sizes = ((16, 24, 4, 1) if args.quick else
             (args.eagle_domain, args.eagle_mixed, args.eagle_gsm8k_heldout, args.eagle_spec_heldout))
    plan = plan_questions(*sizes, seed=s.seed, data=args.data)
    engine = build_engine(ModelConfig(target=args.target, draft="none", device=args.device, dtype=args.dtype,
                                      torch_threads=args.threads), EngineConfig(speculation="always"))
    target, tokenizer = engine.target, engine.tokenizer
    dtype = str(target.dtype).removeprefix("torch.")
    short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)
    cache = Path(args.records or out / f"eagle_records-{Path(args.target).name}-{short}x{s.max_tokens}.osdr")
    store = RecordStore(cache, {"target": args.target, "dtype": dtype, "max_tokens": s.max_tokens,
                                "top_k": s.teacher_top_k,
                                "feature_layers": default_feature_layers(target.config.num_hidden_layers)})
    before = store.meta.get("generation_s", 0.0)
    store.fill(target, tokenizer, generation_order(plan), s.max_tokens, s.teacher_top_k, args.eagle_gen_batch)
    generated_now = store.meta.get("generation_s", 0.0) - before

    def held(name):
        return HeldOut(store.get(plan[name]), [chat_prompt_ids(tokenizer, q.text) for q in plan[name]])

    streams = {k: store.get(plan[k]) for k in ("domain", "mixed") if k in wanted}
    heldout = {"gsm8k": held("heldout_gsm8k"), "spec_bench": held("heldout_spec")}
    result = run_eagle_curve(target, tokenizer, streams, heldout, {"domain": ["gsm8k"], "mixed": ["gsm8k", "spec_bench"]},
                             s, features=store.feature_map())
    n_spec = sum(q.source == "spec_bench" for q in plan["mixed"])
    result["environment"] = environment()
    result["config"] = {
        "target": args.target, "dtype": dtype, "quick": bool(args.quick), "records_cache": str(cache),
        "records_generation_s": store.meta.get("generation_s"), "records_generated_this_run_s": generated_now,
        "records_generated_tokens": store.meta.get("generated_tokens"),
        "streams": f"domain: GSM8K train questions 0..{len(plan['domain']) - 1}; mixed: {len(plan['mixed']) - n_spec} "
                   f"GSM8K + {n_spec} Spec-Bench (13 categories) in a fixed shuffle",
        "heldout": {"gsm8k": [q.qid for q in plan["heldout_gsm8k"]], "spec_bench": [q.qid for q in plan["heldout_spec"]]},
    }
    if old is not None:
        merged = {**old["curves"], **result["curves"]}
        result["curves"] = {k: merged[k] for k in ("domain", "mixed") if k in merged}
        if not (result["sweep"]["eagle"] or result["sweep"]["first2_frozen"]):
            result["sweep"] = old["sweep"]
        timings = dict(old["timings_s"])
        for k, v in result["timings_s"].items():
            timings[k] = timings.get(k, 0.0) + v if k in ("features", "sweep", "total") else v
        result["timings_s"] = timings
        result["aims"] = aims(result)
    name = "eagle_curve_quick" if args.quick else "eagle_curve"
    plot = Path(args.plot) if args.plot else (out / "eagle_curve_quick.png" if args.quick
                                              else Path(args.doc).parent / "eagle_learning_curve.png")
    plot_curves(result, plot)
    path = write_json(out, name, result)
    doc_plot = plot.name if plot.parent.resolve() == Path(args.doc).parent.resolve() else str(plot)
    markdown = render_markdown(result, doc_plot)
    print(markdown)
    if args.quick:
        print(f"\nresults: {path}\nplot:    {plot}\n(--quick leaves {args.doc} alone)")
    else:
        print(f"\nresults: {path}\nplot:    {plot}\ntable:   {update_doc_section(args.doc, 'eagle', markdown)}")
    return result
