"""Divergences for distilling the draft q from a sparse top-k teacher p.

A training record keeps, per position, the target's top-k log-probs (temperature 1)
and their token ids, not the full row. Every divergence here therefore compares p and q
on the same k+1 *bins*: the k teacher tokens, plus one tail bin holding all other
tokens. The student's bins are exact (its full row is at hand); the teacher's tail mass
is ``1 - sum(top-k probs)``.

Consequences worth knowing:

- Merging tokens into one bin can only lose information, so each binned divergence is a
  lower bound on the dense one, and the binned Σ min(p, q) (``estimated_acceptance``)
  an upper bound on the dense α. Merging happens only in the tail bin, so with k = V
  (empty tail bin) every function equals its dense counterpart.
- fp16 log-probs can make the top-k sum round to >= 1 on confident positions. The
  teacher's tail is floored at ``TAIL_FLOOR`` (as TRL's top-k tail bucket does) so that
  reverse KL does not turn infinite there; with k = V there is no tail and no floor.

Temperature T (distillation's own knob, TRL semantics: both sides divided by T). The
student is exact: ``softmax(logits / T)``. The teacher's tail tokens are unknown, so we
assume its tail mass m is spread evenly over the n = V - k tail tokens: each tail token
has raw logit ``log(m / n)`` (relative to the row's log-normaliser), so after tempering
the tail bin has logit ``log n + log(m / n) / T``. This is exact at T = 1, exact at any T
when the real tail is flat, and right in both limits (T → ∞: uniform over V; T → 0: the
top-1 token). Every bin logit carries the same ``teacher_logsumexp / T`` shift, which
the renormalisation cancels: the record's logsumexp is accepted for parity with the
record schema but does not change the result.

Losses are the (weighted) mean over masked positions; gradients reach student_logits
only. -inf student logits (a shortlist head) are fine: 0 · log 0 counts as 0, and
backward stays NaN-free. A KL can still be +inf where one side has mass the other lacks
(e.g. the teacher's top-k holds a token outside the draft's shortlist) — that is the
true value; the gradient in that forward-KL case stays finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOSSES = ("fkl", "rkl", "jsd", "tvd")
TAIL_FLOOR = 1e-7  # smallest teacher tail mass when k < V; guards reverse KL against fp16 rounding


def _logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """torch.logsumexp, but an all -inf slice gives -inf with a zero (not NaN) gradient."""
    shift = x.amax(dim, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = (x - shift).exp().sum(dim)
    alive = total > 0  # >= 1 whenever any entry is finite, so no underflow worries
    log_total = torch.log(torch.where(alive, total, torch.ones_like(total)))
    return torch.where(alive, log_total, torch.full_like(log_total, -math.inf)) + shift.squeeze(dim)


def _binned(
    student_logits: Tensor,  # [N, V]
    teacher_ids: Tensor,  # [N, k], distinct within a row
    teacher_logprobs: Tensor,  # [N, k]
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Return (teacher, student) log-probs on the bins, each [N, k + 1]; the last bin is the tail."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if student_logits.dim() != 2 or teacher_ids.dim() != 2 or teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            "expected student_logits [N, V] and teacher_ids / teacher_logprobs [N, k]; got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_ids.shape)}, {tuple(teacher_logprobs.shape)}"
        )
    (n_rows, vocab), k = student_logits.shape, teacher_ids.shape[1]
    if teacher_ids.shape[0] != n_rows or k > vocab:
        raise ValueError(f"teacher rows [{teacher_ids.shape[0]}, {k}] do not fit student logits [{n_rows}, {vocab}]")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16/fp16 in, fp32 math
    ids = teacher_ids.long()
    n_tail = vocab - k
    t = temperature

    # Teacher: a constant (detached), top-k re-tempered, tail re-tempered as if flat.
    lp = teacher_logprobs.detach().to(dtype)
    if n_tail == 0:
        tail_logit = torch.full((n_rows, 1), -math.inf, dtype=dtype, device=lp.device)
    else:
        tail_mass = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR)
        tail_logit = math.log(n_tail) + (tail_mass.log() - math.log(n_tail)) / t
    teacher = torch.log_softmax(torch.cat([lp / t, tail_logit], dim=-1), dim=-1)

    # Student: exact. The tail is a log-sum-exp over the non-top-k tokens rather than
    # log(1 - sum top-k), which cancels catastrophically when the top-k holds nearly all mass.
    s = student_logits.to(dtype) / t
    log_norm = _logsumexp(s).unsqueeze(-1)
    top = s.gather(-1, ids) - log_norm
    if n_tail == 0:
        tail = torch.full_like(log_norm, -math.inf)
    else:
        in_top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, ids, True)
        tail = _logsumexp(s.masked_fill(in_top, -math.inf)).unsqueeze(-1) - log_norm
    return teacher, torch.cat([top, tail], dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """[N, B] log-probs → [N] KL(a || b). Bins with a == 0 contribute 0 (0 · log 0 = 0).

    Zeroing both logs where a == 0 (not masking the product afterwards) keeps -inf out of
    the product and so out of its backward, where 0 · inf would be NaN. ``a > 0`` rather
    than ``log_a > -inf`` also drops bins whose probability underflows to 0.
    """
    a = log_a.exp()
    live = a > 0
    zero = torch.zeros_like(a)
    diff = torch.where(live, log_a, zero) - torch.where(live, log_b, zero)
    return (a * diff).sum(-1)


def _jsd(teacher: Tensor, student: Tensor, beta: float) -> Tensor:
    """[N, B] log-probs → [N] generalized JSD with TRL's semantics (see generalized_jsd)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if beta == 0.0:
        return _kl(teacher, student)
    if beta == 1.0:
        return _kl(student, teacher)
    # log m, m = β·p + (1-β)·q, in log space so tiny probabilities do not underflow to 0.
    mixture = _logsumexp(torch.stack([teacher + math.log(beta), student + math.log1p(-beta)], dim=-1))
    return beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)


def _masked_mean(per_row: Tensor, mask: Tensor | None) -> Tensor:
    """[N] values, [N] bool/float weights → weighted mean; no weight at all gives 0.0, not NaN."""
    if mask is None:
        return per_row.mean() if per_row.numel() else per_row.sum()
    if mask.shape != per_row.shape:
        raise ValueError(f"mask must have shape {tuple(per_row.shape)} (one per position), got {tuple(mask.shape)}")
    weight = mask.to(per_row.dtype)
    kept = weight != 0
    # Dropped rows may hold inf (e.g. padding); `where` keeps them out of the sum and its gradient.
    total = (torch.where(kept, per_row, torch.zeros_like(per_row)) * weight).sum()
    denom = weight.sum()
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


def _check_lse(teacher_logsumexp: Tensor | None, n_rows: int) -> None:
    if teacher_logsumexp is not None and teacher_logsumexp.shape != (n_rows,):
        raise ValueError(f"teacher_logsumexp must have shape [{n_rows}], got {tuple(teacher_logsumexp.shape)}")


def generalized_jsd(
    student_logits: Tensor,  # [N, V] float; may hold -inf outside a shortlist head
    teacher_ids: Tensor,  # [N, k] int32/int64: the teacher's top-k token ids, distinct per row
    teacher_logprobs: Tensor,  # [N, k] fp16/fp32: log_softmax of the target logits at T = 1
    teacher_logsumexp: Tensor | None = None,  # [N] fp32: cancels (module docstring); shape-checked only
    mask: Tensor | None = None,  # [N] bool or float weights; None = every row
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:  # [] scalar
    """Generalized JSD(β) as TRL's ``generalized_jsd_loss`` defines it (GKD, arXiv 2306.13649 eq. 1).

    β = 0 is forward KL(p || q) and β = 1 reverse KL(q || p), both special-cased; in between,
    ``β·KL(p || m) + (1-β)·KL(q || m)`` with ``m = β·p + (1-β)·q``. Like TRL's, the mixture
    tends to 0 (not to a KL) as β → 0 or 1: the endpoints are a switch, not a limit.
    """
    _check_lse(teacher_logsumexp, student_logits.shape[0])
    teacher, student = _binned(student_logits, teacher_ids, teacher_logprobs, temperature)
    return _masked_mean(_jsd(teacher, student, beta), mask)


def forward_kl(
    student_logits: Tensor,  # [N, V]
    teacher_ids: Tensor,  # [N, k]
    teacher_logprobs: Tensor,  # [N, k]
    teacher_logsumexp: Tensor | None = None,  # [N]
    mask: Tensor | None = None,  # [N]
    *,
    temperature: float = 1.0,
) -> Tensor:  # [] scalar
    """KL(p || q), mass-covering: the OSD paper's default. Arguments as in generalized_jsd."""
    return generalized_jsd(
        student_logits, teacher_ids, teacher_logprobs, teacher_logsumexp, mask, beta=0.0, temperature=temperature
    )


def reverse_kl(
    student_logits: Tensor,  # [N, V]
    teacher_ids: Tensor,  # [N, k]
    teacher_logprobs: Tensor,  # [N, k]
    teacher_logsumexp: Tensor | None = None,  # [N]
    mask: Tensor | None = None,  # [N]
    *,
    temperature: float = 1.0,
) -> Tensor:  # [] scalar
    """KL(q || p), mode-seeking. Arguments as in generalized_jsd."""
    return generalized_jsd(
        student_logits, teacher_ids, teacher_logprobs, teacher_logsumexp, mask, beta=1.0, temperature=temperature
    )


def total_variation(
    student_logits: Tensor,  # [N, V]
    teacher_ids: Tensor,  # [N, k]
    teacher_logprobs: Tensor,  # [N, k]
    teacher_logsumexp: Tensor | None = None,  # [N]
    mask: Tensor | None = None,  # [N]
    *,
    temperature: float = 1.0,
) -> Tensor:  # [] scalar
    """½ Σ |p - q| = 1 - Σ min(p, q): minimising it maximises the acceptance rate directly."""
    _check_lse(teacher_logsumexp, student_logits.shape[0])
    teacher, student = _binned(student_logits, teacher_ids, teacher_logprobs, temperature)
    return _masked_mean(0.5 * (teacher.exp() - student.exp()).abs().sum(-1), mask)


def distillation_loss(
    name: str,  # one of LOSSES: "fkl", "rkl", "jsd", "tvd"
    student_logits: Tensor,  # [N, V]
    teacher_ids: Tensor,  # [N, k]
    teacher_logprobs: Tensor,  # [N, k]
    teacher_logsumexp: Tensor | None = None,  # [N]
    mask: Tensor | None = None,  # [N]
    *,
    beta: float = 0.5,  # used by "jsd" only
    temperature: float = 1.0,
) -> Tensor:  # [] scalar
    """Dispatch on a config string; arguments as in generalized_jsd."""
    args = (student_logits, teacher_ids, teacher_logprobs, teacher_logsumexp, mask)
    if name == "fkl":
        return forward_kl(*args, temperature=temperature)
    if name == "rkl":
        return reverse_kl(*args, temperature=temperature)
    if name == "jsd":
        return generalized_jsd(*args, beta=beta, temperature=temperature)
    if name == "tvd":
        return total_variation(*args, temperature=temperature)
    raise ValueError(f"unknown distillation loss {name!r}; choose one of {', '.join(LOSSES)}")


@torch.no_grad()
def estimated_acceptance(
    student_logits: Tensor,  # [N, V]
    teacher_ids: Tensor,  # [N, k]
    teacher_logprobs: Tensor,  # [N, k]
    teacher_logsumexp: Tensor | None = None,  # [N]
    mask: Tensor | None = None,  # [N]
    *,
    temperature: float = 1.0,
) -> Tensor:  # [] float in [0, 1]
    """α̂ = mean over masked positions of β = Σ min(p, q), the promotion gate's yardstick.

    A metric, so no gradient (train on "tvd" for the same quantity: β = 1 - TVD). On k+1
    bins the tail bin's min(Σ p, Σ q) >= Σ min(p, q) over its tokens, so this is an upper
    bound on the dense α, exact when k = V. Both drafts a gate compares share the same
    teacher bins, which keeps the comparison fair. An empty mask gives 0.0.
    """
    _check_lse(teacher_logsumexp, student_logits.shape[0])
    teacher, student = _binned(student_logits, teacher_ids, teacher_logprobs, temperature)
    return _masked_mean(torch.minimum(teacher.exp(), student.exp()).sum(-1), mask)
