"""Training SpecDec++'s acceptance head from the same training records the distiller uses.

Every teacher row of a record is a committed position where the draft could have drafted.
The draft (frozen here) is run once over the records; at each row it would propose x —
its top-1 under greedy decoding, a sample from q under sampling — and the label is the
chance the target accepts x there:
  greedy   1[x = the target's top-1]                     (greedy verification)
  sampled  min(1, p(x) / q(x)), p from the stored top-k  (rejection sampling; 0 outside it)
The head (osd.decoding.stopping.AcceptanceHead) learns p̂(accept) from the draft's state alone, so
it can stop a chain before the target sees it. Labels need the target's rows, which only
committed positions have; that is all a live head ever needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from osd.data.records import TrainingRecord
from osd.decoding.stopping import AcceptanceHead
from osd.models.drafts import DraftModel
from trainers.distiller import collate, student_hidden


@dataclass(frozen=True)
class HeadExamples:
    hidden: torch.Tensor  # [N, H] the draft's final-norm hidden state at each row
    probs: torch.Tensor  # [N, V] q at temperature 1
    tokens: torch.Tensor  # [N] the token the draft proposes there
    labels: torch.Tensor  # [N] chance the target accepts it


@torch.inference_mode()
def head_examples(draft: DraftModel, records: Sequence[TrainingRecord], greedy: bool = True,
                  max_seq_len: int = 1024, batch_size: int = 8, seed: int = 0) -> HeadExamples:
    """Run the draft over ``records`` and label every teacher row (see the module docstring)."""
    device = next(draft.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    parts: list[tuple[torch.Tensor, ...]] = []
    draft_was_training = draft.training
    draft.eval()
    try:
        for i in range(0, len(records), batch_size):
            batch = collate(records[i : i + batch_size], max_seq_len, device)
            if batch is None:
                continue
            hidden = student_hidden(draft, batch)  # [N, H]
            probs = draft.logits_from_hidden(hidden).softmax(-1)  # [N, V] q as served, shortlist included
            tokens = probs.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=generator)[:, 0]
            parts.append((hidden.float(), probs, tokens, _labels(batch.teacher_ids, batch.teacher_logprobs,
                                                                 probs, tokens, greedy)))
    finally:
        draft.train(draft_was_training)
    if not parts:
        raise ValueError("the records hold no teacher rows to learn acceptance from")
    return HeadExamples(*(torch.cat(column) for column in zip(*parts)))


def _labels(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, probs: torch.Tensor,
            tokens: torch.Tensor, greedy: bool) -> torch.Tensor:
    """teacher_ids / teacher_logprobs: [N, k] (sorted, most likely first); probs: [N, V]; tokens: [N] → [N]."""
    if greedy:
        return (teacher_ids[:, 0].long() == tokens).float()
    hit = teacher_ids.long() == tokens[:, None]  # [N, k]
    p = torch.where(hit, teacher_logprobs.float().exp(), torch.zeros_like(teacher_logprobs, dtype=torch.float)).sum(-1)
    q = probs.gather(-1, tokens[:, None])[:, 0]
    return (p / q.clamp_min(1e-12)).clamp(max=1.0)


def train_acceptance_head(draft: DraftModel, records: Sequence[TrainingRecord], greedy: bool = True,
                          head: AcceptanceHead | None = None, steps: int = 300, lr: float = 3e-3,
                          batch_size: int = 256, seed: int = 0) -> AcceptanceHead:
    """Fit (or keep fitting) a head for ``draft`` on ``records``; returns it in eval mode.

    Binary cross-entropy on soft labels; the draft stays frozen, so its states are
    computed once and the head trains on them alone (seconds on a CPU).
    """
    examples = head_examples(draft, records, greedy=greedy, seed=seed)
    device = examples.hidden.device
    head = (head or AcceptanceHead(examples.hidden.shape[-1])).to(device).requires_grad_(True)
    features = AcceptanceHead.features(examples.hidden, examples.probs, examples.tokens)  # [N, H + 3]
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(steps):
        pick = torch.randint(0, features.shape[0], (min(batch_size, features.shape[0]),), generator=generator)
        logits = head.net(features[pick.to(device)]).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, examples.labels[pick.to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head.eval().requires_grad_(False)


@torch.inference_mode()
def head_calibration(head: AcceptanceHead, examples: HeadExamples) -> dict:
    """How well p̂ matches the labels: mean p̂, mean label, Brier score, and the Brier score of
    always predicting the mean label (a head worth having beats it)."""
    predicted = torch.sigmoid(head(examples.hidden, examples.probs, examples.tokens))
    labels = examples.labels
    return {"mean_predicted": float(predicted.mean()), "mean_label": float(labels.mean()),
            "brier": float(((predicted - labels) ** 2).mean()),
            "brier_constant": float(((labels.mean() - labels) ** 2).mean()), "rows": int(labels.numel())}
