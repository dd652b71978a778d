"""The acceptance rule, checked exactly by enumerating outcomes on small vocabularies."""

import itertools

import pytest
import torch

from osd.decoding.verification import (
    acceptance_probs,
    overlap,
    residual_distribution,
    verify_greedy,
    verify_sampled,
)

CASES = {
    "random": (torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)),
    "zeros in p": (torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64), torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)),
    "zeros in q": (torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64)),
    "p == q": (torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)),
    "one-hot p": (torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64), torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)),
    "one-hot q": (torch.tensor([0.2, 0.3, 0.4, 0.1], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)),
    "disjoint": (torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64)),
}


def output_distribution(p, q, accept_fn=acceptance_probs, residual_fn=residual_distribution):
    """Exact distribution of the first emitted token: Σ_d q(d)·[accept d, or recover from the residual]."""
    p, q = p.double(), q.double()
    out = torch.zeros_like(p)
    for d in range(len(p)):
        if q[d] == 0:
            continue
        a = accept_fn(p[d : d + 1], q[d : d + 1])[0]
        out[d] += q[d] * a
        out += q[d] * (1 - a) * residual_fn(p, q)
    return out


@pytest.mark.parametrize("name", CASES)
def test_rule_reproduces_target_exactly(name):
    p, q = CASES[name]
    assert torch.allclose(output_distribution(p, q), p.double(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_acceptance_probability_is_overlap(name):
    p, q = (t.double() for t in CASES[name])
    accept = sum(q[d] * acceptance_probs(p[d : d + 1], q[d : d + 1])[0] for d in range(len(p)) if q[d] > 0)
    assert abs(float(accept) - float(overlap(p[None], q[None])[0])) < 1e-12


def test_enumeration_catches_a_wrong_rule():
    """Recovering from p instead of the residual is a classic bug; the same check must see it."""
    p, q = CASES["random"]
    wrong = output_distribution(p, q, residual_fn=lambda p, q: p)
    assert not torch.allclose(wrong, p.double(), atol=1e-3)


def test_random_small_vocabularies_exact():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        v = int(torch.randint(2, 7, (), generator=gen))
        p = torch.rand(v, generator=gen, dtype=torch.float64) ** 3
        q = torch.rand(v, generator=gen, dtype=torch.float64) ** 3
        p[torch.rand(v, generator=gen) < 0.3] = 0
        p, q = p / p.sum() if p.sum() > 0 else torch.full((v,), 1 / v, dtype=torch.float64), q / q.sum()
        assert torch.allclose(output_distribution(p, q), p, atol=1e-9, rtol=0)


def test_verify_sampled_decides_by_the_coin():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    drafted = torch.tensor([0, 1])  # a(d1) = 0.2, a(d2) = 0.25
    gen = torch.Generator().manual_seed(0)
    assert verify_sampled(drafted, q[:2], p, torch.tensor([0.19, 0.24]), gen).num_accepted == 2
    assert verify_sampled(drafted, q[:2], p, torch.tensor([0.19, 0.26]), gen).num_accepted == 1
    v = verify_sampled(drafted, q[:2], p, torch.tensor([0.21, 0.0]), gen)
    assert v.num_accepted == 0
    # The recovered token comes from norm(max(0, p1 - q1)) = token 1 or 2 only.
    assert v.next_token in (1, 2)


def test_recovery_never_draws_outside_the_residual():
    p = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(1)
    tokens = {verify_sampled(torch.tensor([1]), q, p, torch.tensor([0.99]), gen).next_token for _ in range(200)}
    assert tokens == {2}


@pytest.mark.parametrize(
    "drafted, argmax, accepted, nxt",
    [
        ([1, 2, 3], [1, 2, 3, 4], 3, 4),  # all accepted: bonus
        ([1, 2, 3], [1, 5, 3, 4], 1, 5),  # first mismatch at position 2
        ([1, 2, 3], [7, 2, 3, 4], 0, 7),  # immediate rejection
        ([], [9], 0, 9),  # γ = 0 is plain greedy decoding
    ],
)
def test_greedy_table(drafted, argmax, accepted, nxt):
    v = verify_greedy(torch.tensor(drafted, dtype=torch.long), torch.tensor(argmax))
    assert (v.num_accepted, v.next_token) == (accepted, nxt)


def test_residual_falls_back_to_p_when_p_equals_q():
    p = torch.tensor([0.25, 0.75])
    assert torch.equal(residual_distribution(p, p.clone()), p)
    assert list(itertools.chain(residual_distribution(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])).tolist())) == [0.0, 1.0]
