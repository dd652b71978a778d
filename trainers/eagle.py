"""Training the eagle head (osd/decoding/eagle.py) with EAGLE-3's training-time test.

While drafting, the head's first step reads the target's features and every later step reads
the head's own output. Trained on target features only, its later steps drift (issue 15's
probe). Training-time test unrolls the same k steps during training:

- step 1: entry p pairs (target feature f_p, token x_{p+1}) and predicts x_{p+2};
- step s > 1: entry p pairs (the head's step s-1 output at p-1, x_{p+1}) and predicts x_{p+2}
  again. It attends to what a drafting step s at p would have in its cache: step-1 entries up
  to p-s+1 (the committed context of a round starting there), the same round's entries of
  steps 2..s-1, and itself.

All steps run through the head's own layer on one KV cache, the unrolled pattern given as an
additive attention mask. The loss is the configured distillation divergence against the
records' sparse teacher rows (trainers/losses.py, as the other drafts), weighted 0.8^(s-1) per
step as EAGLE-3 does.

Online (``EagleDistiller``, what the trainer actor runs for models.draft='eagle'): the features
come with the records — captured from the replica's own verification forwards and stored in
fp16 (osd/decoding/engine.py, codec version 2) — so the trainer needs no target forward.
Offline (``train_eagle_head``, the benches and tests): one no-grad target forward per record.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from osd.data.records import TrainingRecord
from osd.decoding.eagle import EagleHead, FeatureCapture
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller
from trainers.losses import distillation_loss

STEP_DECAY = 0.8  # weight of step s is STEP_DECAY^(s-1)


@torch.no_grad()
def record_features(target: PreTrainedModel, capture: FeatureCapture, record: TrainingRecord) -> Tensor:
    """[T-1, F]: the target's features at every position but the last of prompt + output (T tokens)."""
    tokens = record.prompt_ids + record.output_ids
    target(torch.tensor([tokens[:-1]], device=target.device))
    return capture.rows(len(tokens) - 1)


def unrolled_mask(num_entries: int, step: int, dtype: torch.dtype, device) -> Tensor:
    """Additive [1, 1, q, K] mask of step ``step`` (≥ 2) over a cache of steps 1..step-1 plus its own q entries.

    Entries of step s sit at positions s-1..n-1 (n = num_entries), so the cache holds n, n-1, ..., entries per
    step. A query at position p sees step-1 keys at positions ≤ p-step+1, step s' keys at p-step+s', and itself.
    """
    n = num_entries
    queries = torch.arange(step - 1, n, device=device)  # [q] positions
    blocks = [torch.arange(n, device=device)[None] <= (queries - step + 1)[:, None]]  # step-1 keys: positions 0..n-1
    for s in range(2, step + 1):
        keys = torch.arange(s - 1, n, device=device)  # step-s keys' positions
        blocks.append(keys[None] == (queries - step + s)[:, None])  # for s == step: the query itself
    allowed = torch.cat(blocks, dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def ttt_loss(head: EagleHead, record: TrainingRecord, features: Tensor, start: int = 0, steps: int = 3,
             loss: str = "fkl") -> Tensor | None:
    """features: [rows, F] the target's features at positions start .. of prompt + output (record_features
    gives them from 0; a served record stores them from ``record.feature_start``) → the weighted
    training-time-test loss, or None when no entry can predict a teacher row."""
    tokens = torch.tensor((record.prompt_ids + record.output_ids)[start:], device=features.device)
    prompt_len, n = len(record.prompt_ids) - start, min(len(tokens) - 2, features.shape[0])  # entries 0..n-1
    first = max(prompt_len - 2, 0)  # entry p predicts output row p + 2 - prompt_len
    if n <= first:
        return None
    teacher = (record.teacher_token_ids.to(features.device).long(), record.teacher_logprobs.to(features.device).float(),
               record.teacher_logsumexp.to(features.device))
    cache = DynamicCache(config=head.config)
    logits, hidden = head(tokens[1 : n + 1][None], features=features[:n][None], past_key_values=cache,
                          use_shortlist=False)
    total, weights = 0.0, 0.0
    for step in range(1, steps + 1):
        if step > 1:
            positions = torch.arange(step - 1, n, device=tokens.device)
            if positions.numel() == 0:
                break
            mask = unrolled_mask(n, step, hidden.dtype, tokens.device)
            logits, hidden = head(tokens[positions + 1][None], hidden=hidden[:, :-1], past_key_values=cache,
                                  attention_mask=mask, position_ids=positions[None], use_shortlist=False)
        offset = step - 1  # this step's entry i sits at position i + offset
        at = torch.arange(max(first, offset), n, device=tokens.device)  # positions with a teacher row
        if at.numel() == 0:
            break
        out_rows = at + 2 - prompt_len
        step_loss = distillation_loss(loss, logits[0, at - offset], *(t[out_rows] for t in teacher))
        weight = STEP_DECAY ** (step - 1)
        total, weights = total + weight * step_loss, weights + weight
    return total / weights


def stored_features(head: EagleHead, record: TrainingRecord) -> Tensor | None:
    """The record's stored target features [rows, F] in the head's dtype and device, or None."""
    if record.target_features is None:
        return None
    if record.target_features.shape[1] != head.feature_size:
        raise ValueError(f"record {record.request_id} carries {record.target_features.shape[1]} features per position; "
                         f"this eagle head reads {head.feature_size} (were models.eagle_layers changed?)")
    weight = head.fuse.weight
    return record.target_features.to(weight.device, weight.dtype)


@torch.inference_mode()
def first_step_logits(head: EagleHead, record: TrainingRecord) -> tuple[Tensor, Tensor] | None:
    """What the head's first draft step predicts for each teacher row it can see, from the record's stored
    features: (logits [N, V] fp32 as served — shortlist included, output row indices [N]), or None."""
    features = stored_features(head, record)
    if features is None:
        return None
    start = record.feature_start
    tokens = torch.tensor((record.prompt_ids + record.output_ids)[start:], device=features.device)
    prompt_len, n = len(record.prompt_ids) - start, min(len(tokens) - 2, features.shape[0])
    first = max(prompt_len - 2, 0)
    if n <= first:
        return None
    logits, _ = head(tokens[1 : n + 1][None], features=features[:n][None], past_key_values=DynamicCache(config=head.config))
    at = torch.arange(first, n, device=features.device)
    return logits[0, at], at + 2 - prompt_len


class EagleDistiller(OnlineDistiller):
    """The online distiller for an eagle head: the same split, schedule, shortlist growth and export as
    OnlineDistiller, with EAGLE-3's training-time-test loss over the features the records carry.

    Records without features (served by another draft, or not sampled: EngineConfig.record_features)
    count and are held out as usual, but teach the head nothing. LoRA mode and the acceptance head are
    for self-drafts: the head is one layer, trained whole.
    """

    def _student(self, draft: EagleHead) -> EagleHead:
        cfg = self.config
        if cfg.mode != "full" or cfg.acceptance_head != "off":
            raise ValueError("an eagle head trains in mode='full' without an acceptance head; set distill.mode='full' "
                             "and distill.acceptance_head='off'")
        for borrowed in draft._target:  # the target's embedding and LM head: frozen, shared, never stepped
            borrowed.requires_grad_(False)
        student = copy.deepcopy(draft).to(cfg.device)  # the copy borrows the same target parts
        student.requires_grad_(True)
        student.set_shortlist(self._shortlist)
        return student

    def _loss(self, records: list[TrainingRecord]) -> Tensor | None:
        losses = []
        for rec in records:
            features = stored_features(self.draft, rec)
            if features is not None:
                step_loss = ttt_loss(self.draft, rec, features, rec.feature_start, self.config.ttt_steps,
                                     self.config.loss)
                if step_loss is not None:
                    losses.append(step_loss)
        return torch.stack(losses).mean() if losses else None

    def candidate(self) -> EagleHead:
        """An eval-mode copy of the head with the current weights, independent of further training."""
        return copy.deepcopy(self.draft).eval().requires_grad_(False)


def make_distiller(draft, config: DistillConfig) -> OnlineDistiller:
    """The distiller that fits ``draft``: EagleDistiller for an eagle head, OnlineDistiller otherwise."""
    return EagleDistiller(draft, config) if isinstance(draft, EagleHead) else OnlineDistiller(draft, config)


def train_eagle_head(head: EagleHead, target: PreTrainedModel, records: Sequence[TrainingRecord], epochs: int = 4,
                     lr: float = 1e-3, steps: int = 3, loss: str = "fkl", batch_size: int = 4, seed: int = 0,
                     grad_clip: float = 1.0) -> list[float]:
    """AdamW on the head's own weights over ``records`` (the target stays frozen); returns each epoch's mean loss."""
    target.requires_grad_(False)  # the borrowed embedding and LM head must not collect gradients
    capture = FeatureCapture(target, head.feature_layers)
    try:
        features = [record_features(target, capture, r) for r in records]
    finally:
        capture.close()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order, rng, history = list(range(len(records))), random.Random(seed), []
    head.train()
    for _ in range(epochs):
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), batch_size):
            batch = [ttt_loss(head, records[i], features[i], 0, steps, loss) for i in order[start : start + batch_size]]
            batch = [b for b in batch if b is not None]
            if not batch:
                continue
            total = torch.stack(batch).mean()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
            optimizer.step()
            losses.append(float(total.detach()))
        history.append(sum(losses) / len(losses) if losses else float("nan"))
    head.eval()
    return history
