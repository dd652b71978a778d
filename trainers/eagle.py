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

Offline for now: a record's target features come from one no-grad target forward here. In
serving they are captured from the verification forwards (osd/decoding/eagle.py); storing them
in the training record, so the trainer needs no target, is the next step of issue 15.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from osd.data.records import TrainingRecord
from osd.decoding.eagle import EagleHead, FeatureCapture
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


def ttt_loss(head: EagleHead, record: TrainingRecord, features: Tensor, steps: int = 3,
             loss: str = "fkl") -> Tensor | None:
    """features: [T-1, F] (record_features) → the weighted training-time-test loss, or None when the record
    has no teacher row an entry can predict."""
    tokens = torch.tensor(record.prompt_ids + record.output_ids, device=features.device)
    prompt_len, n = len(record.prompt_ids), len(tokens) - 2  # entries at positions 0..n-1
    first = max(prompt_len - 2, 0)  # entry p predicts output row p + 2 - prompt_len
    if n <= first:
        return None
    teacher = (record.teacher_token_ids.to(features.device).long(), record.teacher_logprobs.to(features.device).float(),
               record.teacher_logsumexp.to(features.device))
    cache = DynamicCache(config=head.config)
    logits, hidden = head(tokens[1 : n + 1][None], features=features[:n][None], past_key_values=cache)
    total, weights = 0.0, 0.0
    for step in range(1, steps + 1):
        if step > 1:
            positions = torch.arange(step - 1, n, device=tokens.device)
            if positions.numel() == 0:
                break
            mask = unrolled_mask(n, step, hidden.dtype, tokens.device)
            logits, hidden = head(tokens[positions + 1][None], hidden=hidden[:, :-1], past_key_values=cache,
                                  attention_mask=mask, position_ids=positions[None])
        offset = step - 1  # this step's entry i sits at position i + offset
        at = torch.arange(max(first, offset), n, device=tokens.device)  # positions with a teacher row
        if at.numel() == 0:
            break
        out_rows = at + 2 - prompt_len
        step_loss = distillation_loss(loss, logits[0, at - offset], *(t[out_rows] for t in teacher))
        weight = STEP_DECAY ** (step - 1)
        total, weights = total + weight * step_loss, weights + weight
    return total / weights


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
            batch = [ttt_loss(head, records[i], features[i], steps, loss) for i in order[start : start + batch_size]]
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
