"""Sparse top-k distillation losses against dense references (trainers/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainers.losses import (
    LOSSES,
    distillation_loss,
    estimated_acceptance,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    total_variation,
)

N, V = 6, 32


def sparse_teacher(teacher_logits: torch.Tensor, k: int, dtype=torch.float32):
    """[N, V] logits → (ids [N, k] int32, logprobs [N, k], logsumexp [N]), as a record stores them."""
    logprobs, ids = torch.log_softmax(teacher_logits.float(), -1).topk(k, dim=-1)
    return ids.to(torch.int32), logprobs.to(dtype), torch.logsumexp(teacher_logits.float(), -1)


def dense_per_row(name: str, student_logits, teacher_logits, temperature=1.0, beta=0.5):
    """Reference on full rows, in float64, written independently of the module."""
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if name == "fkl":
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if name == "rkl":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * torch.special.xlogy(p, p / m).sum(-1) + (1 - beta) * torch.special.xlogy(q, q / m).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "summin":
        return torch.minimum(p, q).sum(-1)
    raise AssertionError(name)


def logits_pair(seed: int, n: int = N, v: int = V, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("k", [V, 5])
def test_identical_distributions_give_zero(name, k):
    student, _ = logits_pair(0)
    ids, lp, lse = sparse_teacher(student, k)
    assert distillation_loss(name, student, ids, lp, lse).item() == pytest.approx(0.0, abs=1e-6)
    assert estimated_acceptance(student, ids, lp, lse).item() == pytest.approx(1.0, abs=1e-6)
    # ...and a different student does not (so the zero above is not vacuous).
    other, _ = logits_pair(1)
    assert distillation_loss(name, other, ids, lp, lse).item() > 1e-3


def test_beta_endpoints_equal_kl_div():
    student, teacher = logits_pair(2)
    ids, lp, lse = sparse_teacher(teacher, V)
    log_q, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    fkl = F.kl_div(log_q, log_p.exp(), reduction="batchmean")  # KL(p || q)
    rkl = F.kl_div(log_p, log_q.exp(), reduction="batchmean")  # KL(q || p)
    assert generalized_jsd(student, ids, lp, lse, beta=0.0).item() == pytest.approx(fkl.item(), rel=1e-5)
    assert generalized_jsd(student, ids, lp, lse, beta=1.0).item() == pytest.approx(rkl.item(), rel=1e-5)
    assert forward_kl(student, ids, lp, lse).item() == pytest.approx(fkl.item(), rel=1e-5)
    assert reverse_kl(student, ids, lp, lse).item() == pytest.approx(rkl.item(), rel=1e-5)
    assert abs(fkl.item() - rkl.item()) > 1e-2  # the two directions really differ here


def test_jsd_symmetric_at_half_only():
    a, b = logits_pair(3)

    def jsd(student, teacher, beta):
        return generalized_jsd(student, *sparse_teacher(teacher, V), beta=beta).item()

    assert jsd(a, b, 0.5) == pytest.approx(jsd(b, a, 0.5), rel=1e-5)
    assert abs(jsd(a, b, 0.1) - jsd(b, a, 0.1)) > 1e-4


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("name", LOSSES)
def test_full_topk_equals_dense_value_and_gradient(name, temperature):
    student, teacher = logits_pair(4)
    ids, lp, lse = sparse_teacher(teacher, V)
    s = student.clone().requires_grad_(True)
    loss = distillation_loss(name, s, ids, lp, lse, beta=0.3, temperature=temperature)
    loss.backward()
    s_ref = student.double().requires_grad_(True)
    ref = dense_per_row(name, s_ref, teacher, temperature, beta=0.3).mean()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 3.0])
@pytest.mark.parametrize("name", LOSSES)
def test_flat_tail_is_exact_at_any_temperature(name, temperature):
    # The documented tail model: tail mass spread evenly over the V - k tail tokens.
    # When the real tail is flat, the sparse loss must equal the dense one at any T.
    k = 6
    student, teacher = logits_pair(5)
    teacher[:, k:] = -1.0  # flat tail below...
    teacher[:, :k] = teacher[:, :k].abs() + 1.0  # ...strictly larger top-k logits
    ids, lp, lse = sparse_teacher(teacher, k)
    got = distillation_loss(name, student, ids, lp, lse, beta=0.3, temperature=temperature)
    ref = dense_per_row(name, student, teacher, temperature, beta=0.3).mean()
    # Bins lose nothing on the teacher side here, but the student's tail is still merged:
    # the binned value is a lower bound, equal when the student's tail is flat too.
    flat_student = student.clone()
    flat_student[:, k:] = 0.3
    got_flat = distillation_loss(name, flat_student, ids, lp, lse, beta=0.3, temperature=temperature)
    ref_flat = dense_per_row(name, flat_student, teacher, temperature, beta=0.3).mean()
    assert got_flat.item() == pytest.approx(ref_flat.item(), rel=1e-5, abs=1e-6)
    assert got.item() <= ref.item() + 1e-6


@pytest.mark.parametrize("name", LOSSES)
def test_confident_student_tail_is_exact(name):
    # The student holds all but ~1e-9 of its mass in the teacher's top-k. Its tail bin
    # must still be exact (log 1e-9, not a rounded log(1 - sum)); with both tails flat
    # the binned loss equals the dense one.
    k = 4
    student, teacher = logits_pair(15)
    student[:, :k] = 25.0 + student[:, :k].abs()
    student[:, k:] = 0.0
    teacher[:, k:] = 0.0
    teacher[:, :k] = 0.5 + teacher[:, :k].abs()
    ids, lp, lse = sparse_teacher(teacher, k)
    got = distillation_loss(name, student, ids, lp, lse, beta=0.3)
    ref = dense_per_row(name, student, teacher, beta=0.3).mean()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-9)


def test_mask_is_a_weighted_mean_over_positions():
    student, teacher = logits_pair(6)
    ids, lp, lse = sparse_teacher(teacher, 8)
    per_row = torch.stack([forward_kl(student[i : i + 1], ids[i : i + 1], lp[i : i + 1]) for i in range(N)])
    keep = torch.tensor([True, False, True, True, False, False])
    assert forward_kl(student, ids, lp, lse, keep).item() == pytest.approx(per_row[keep].mean().item(), rel=1e-6)
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.0, 0.25])
    expected = (per_row * weights).sum() / weights.sum()
    assert forward_kl(student, ids, lp, lse, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    # A masked-out row whose loss is infinite (q = 0 on a teacher token) must not leak in.
    student[1, ids[1, 0].long()] = -math.inf
    s = student.clone().requires_grad_(True)
    loss = forward_kl(s, ids, lp, lse, keep)
    assert loss.item() == pytest.approx(per_row[keep].mean().item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_empty_mask_gives_zero_and_backward_works(name):
    student, teacher = logits_pair(7)
    ids, lp, lse = sparse_teacher(teacher, 8)
    for mask in (torch.zeros(N, dtype=torch.bool), torch.zeros(N)):
        s = student.clone().requires_grad_(True)
        loss = distillation_loss(name, s, ids, lp, lse, mask)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(s.grad, torch.zeros_like(s))
    assert estimated_acceptance(student, ids, lp, lse, torch.zeros(N, dtype=torch.bool)).item() == 0.0
    # No positions at all behaves the same way.
    s0 = torch.zeros(0, V, requires_grad=True)
    empty = distillation_loss(name, s0, ids[:0], lp[:0], lse[:0])
    assert empty.item() == 0.0
    empty.backward()


@pytest.mark.parametrize("teacher_outside", [-math.inf, -1000.0])
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("k", [V, 8])
def test_neg_inf_outside_shortlist_is_finite(name, k, teacher_outside):
    # A shortlist head: q = 0 outside 12 tokens; the teacher has no mass there either,
    # exactly (-inf) or after fp32 underflow (exp(-1000 / T) == 0).
    g = torch.Generator().manual_seed(8)
    shortlist = torch.randperm(V, generator=g)[:12]
    outside = torch.ones(V, dtype=torch.bool)
    outside[shortlist] = False
    student, teacher = logits_pair(9)
    student[:, outside] = -math.inf
    teacher[:, outside] = teacher_outside
    ids, lp, lse = sparse_teacher(teacher, k)
    for temperature in (1.0, 2.0):
        s = student.clone().requires_grad_(True)
        loss = distillation_loss(name, s, ids, lp, lse, beta=0.3, temperature=temperature)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(s.grad).all()
        assert s.grad[:, outside].abs().max() == 0
    if k == V:  # same distributions as the dense ones restricted to the shortlist
        ref = dense_per_row(name, student[:, shortlist], teacher[:, shortlist], beta=0.3).mean()
        assert distillation_loss(name, student, ids, lp, lse, beta=0.3).item() == pytest.approx(ref.item(), rel=1e-5)


def test_estimated_acceptance():
    student, teacher = logits_pair(10)
    ids, lp, lse = sparse_teacher(teacher, V)
    dense = dense_per_row("summin", student, teacher).mean().item()
    assert estimated_acceptance(student, ids, lp, lse).item() == pytest.approx(dense, rel=1e-5)
    assert total_variation(student, ids, lp, lse).item() == pytest.approx(1 - dense, rel=1e-5)
    for k in (1, 4, 16):
        ids, lp, lse = sparse_teacher(teacher, k)
        alpha = estimated_acceptance(student.requires_grad_(True), ids, lp, lse)
        assert not alpha.requires_grad  # a metric for the gate, not a loss
        assert 0.0 <= alpha.item() <= 1.0
        assert alpha.item() >= dense - 1e-6  # merging the tail can only raise Σ min(p, q)


def test_temperature_changes_the_loss_and_defaults_to_one():
    student, teacher = logits_pair(11)
    ids, lp, lse = sparse_teacher(teacher, 8)
    for name in LOSSES:
        default = distillation_loss(name, student, ids, lp, lse)
        assert distillation_loss(name, student, ids, lp, lse, temperature=1.0).item() == default.item()
        assert abs(distillation_loss(name, student, ids, lp, lse, temperature=2.0).item() - default.item()) > 1e-4
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(student, ids, lp, lse, temperature=0.0)


def test_fp16_teacher_logprobs_accepted():
    student, teacher = logits_pair(12)
    ids, lp32, lse = sparse_teacher(teacher, 8)
    ids, lp16, _ = sparse_teacher(teacher, 8, dtype=torch.float16)
    for name in LOSSES:
        got = distillation_loss(name, student, ids, lp16, lse)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(distillation_loss(name, student, ids, lp32, lse).item(), rel=2e-3)
    # A confident target: in fp16 the top-k sums to >= 1, leaving no tail mass. The
    # floor must keep reverse KL finite although the student puts mass on the tail.
    peaked = torch.zeros(N, V)
    peaked[:, 3] = 30.0
    ids, lp16, lse = sparse_teacher(peaked, 4, dtype=torch.float16)
    assert lp16.float().exp().sum(-1).min() >= 1.0
    s = student.clone().requires_grad_(True)
    loss = reverse_kl(s, ids, lp16, lse)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_gradients_reach_the_student_only():
    student, teacher = logits_pair(13)
    ids, lp, lse = sparse_teacher(teacher, 8)
    s = student.clone().requires_grad_(True)
    lp = lp.clone().requires_grad_(True)
    for name in LOSSES:
        distillation_loss(name, s, ids, lp, lse).backward()
    assert lp.grad is None
    assert s.grad.abs().sum() > 0


def test_dispatcher_matches_functions_and_rejects_bad_arguments():
    student, teacher = logits_pair(14)
    args = (student, *sparse_teacher(teacher, 8))
    assert distillation_loss("fkl", *args).item() == forward_kl(*args).item()
    assert distillation_loss("rkl", *args).item() == reverse_kl(*args).item()
    assert distillation_loss("tvd", *args).item() == total_variation(*args).item()
    assert distillation_loss("jsd", *args, beta=0.3).item() == generalized_jsd(*args, beta=0.3).item()
    with pytest.raises(ValueError, match="fkl, rkl, jsd, tvd"):
        distillation_loss("kl", *args)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(*args, beta=1.5)
    with pytest.raises(ValueError, match="mask"):
        forward_kl(*args, torch.ones(N + 1, dtype=torch.bool))
