"""Whole-sequence losslessness: sampled outputs through an engine against the target's exact distribution.

On an 8-token vocabulary every continuation of a few tokens can be enumerated, so the
target's exact sequence distribution is known; a chi-square test compares what an engine
sampled with it. The same test must also reject the draft's own distribution, so it is
shown able to fail, and its power is checked from the exact distributions first.
"""

from __future__ import annotations

import math
import os

import torch
from scipy.stats import chi2, chisquare, ncx2

from osd.config import SamplingParams
from osd.decoding.sampling import warp_probs

VOCAB = 8  # the vocabulary these checks enumerate


def exact_sequences(model, prompt: list[int], params: SamplingParams) -> dict[tuple[int, ...], float]:
    """Exact probability of every continuation of length params.max_tokens under the warped model."""
    frontier = [((), 1.0)]
    with torch.no_grad():
        for _ in range(params.max_tokens):
            nxt = []
            for seq, prob in frontier:
                logits = model(torch.tensor([prompt + list(seq)])).logits[0, -1:]
                probs = warp_probs(logits, params)[0].double()
                nxt += [(seq + (t,), prob * float(probs[t])) for t in range(VOCAB) if probs[t] > 0]
            frontier = nxt
    return dict(frontier)


# A false failure (the engine is exact, the test says it is not) and a missed failure (the
# check cannot tell the draft from the target) must each happen with probability below 1e-6,
# on any machine: the threshold is the first, and the power check below bounds the second
# from the exact distributions before any sample is drawn.
ALPHA = 1e-6


def pooled_bins(dist: dict, n: int) -> list[list[tuple]]:
    """Sequences grouped so every bin expects >= 5 of n samples under ``dist`` (Pearson's rule):
    the likely sequences each alone, the tail pooled, and a tail expecting < 5 merged into the last."""
    seqs = sorted(dist, key=dist.get, reverse=True)
    bins = [[s] for s in seqs if dist[s] * n >= 5]
    tail = [s for s in seqs if dist[s] * n < 5]
    if tail:
        bins.append(tail)
    if len(bins) > 1 and sum(dist[s] for s in bins[-1]) * n < 5:
        bins[-2] += bins.pop()
    return bins


def chi_square_pvalue(counts: dict, dist: dict, n: int) -> float:
    """Pearson's test of sampled sequence counts against ``dist`` over pooled_bins."""
    bins = pooled_bins(dist, n)
    obs = [sum(counts.get(s, 0) for s in b) for b in bins]
    exp = [sum(dist[s] for s in b) * n for b in bins]
    scale = sum(obs) / sum(exp)
    return chisquare(obs, [e * scale for e in exp]).pvalue


def miss_probability(target_dist: dict, draft_dist: dict, n: int) -> float:
    """P(the test against ``draft_dist`` passes, p > ALPHA) when n samples really follow ``target_dist``.

    The statistic is then approximately noncentral chi-square with noncentrality
    λ = n · Σ_bins (P_target − P_draft)² / P_draft, so this is exact up to that approximation
    and depends only on the two models, not on a draw.
    """
    bins = pooled_bins(draft_dist, n)
    pt = [sum(target_dist.get(s, 0.0) for s in b) for b in bins]
    pd = [sum(draft_dist[s] for s in b) for b in bins]
    lam = n * sum((t - d) ** 2 / d for t, d in zip(pt, pd))
    df = len(bins) - 1
    if df < 1:
        return 1.0  # one bin: the test cannot tell anything apart
    if not math.isfinite(lam):
        return 0.0  # the target puts mass where the draft has none: rejected with certainty
    return float(ncx2.cdf(chi2.isf(ALPHA, df), df, lam))


def assert_distributed_as_target(counts: dict, n: int, target, draft_model, prompt: list[int],
                                 params: SamplingParams) -> None:
    """counts: sampled output tuples → how often, over n samples through an engine.

    Fails if the test is too weak to be trusted (the draft's distribution too close to the
    target's for n samples), if the samples do not follow the target's distribution, or if
    they cannot be told apart from the draft's.
    """
    target_dist = exact_sequences(target, prompt, params)
    draft_dist = exact_sequences(draft_model, prompt, params)
    draft_dist = {s: draft_dist.get(s, 0.0) + 1e-12 for s in set(draft_dist) | set(target_dist) | set(counts)}
    miss = miss_probability(target_dist, draft_dist, n)
    if os.environ.get("OSD_SHOW_POWER"):
        print(f"lossless check: miss probability {miss:.1e} with {n} samples")
    assert miss < ALPHA, (f"the check is too weak: with {n} samples it would miss a draft-distributed engine "
                          f"with probability {miss:.1e}; make the draft differ more or sample more")
    assert not set(counts) - set(target_dist), "a sequence the target can never produce appeared"
    assert chi_square_pvalue(counts, target_dist, n) > ALPHA
    assert chi_square_pvalue(counts, draft_dist, n) < ALPHA, \
        "the check could not tell the draft's distribution from the target's"


def sample_outputs(engine, prompt: list[int], params: dict, n: int) -> tuple[dict, list]:
    """n sampled generations (seeds 0..n-1) → (output tuple → count, the Generations)."""
    counts, generations = {}, []
    for seed in range(n):
        out = engine.generate(prompt, SamplingParams(seed=seed, **params))
        counts[tuple(out.output_ids)] = counts.get(tuple(out.output_ids), 0) + 1
        generations.append(out)
    return counts, generations
