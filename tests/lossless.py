"""Whole-sequence losslessness: sampled outputs through an engine against the target's exact distribution.

On an 8-token vocabulary every continuation of a few tokens can be enumerated, so the
target's exact sequence distribution is known; a chi-square test compares what an engine
sampled with it. The same test must also reject the draft's own distribution, so it is
shown able to fail.
"""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from osd.config import SamplingParams
from osd.sampling import warp_probs

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


def chi_square_pvalue(counts: dict, dist: dict, n: int) -> float:
    """Pearson's test of sampled sequence counts against dist; bins with expected < 5 are pooled."""
    seqs = sorted(dist, key=dist.get, reverse=True)
    expected = [dist[s] * n for s in seqs]
    observed = [counts.get(s, 0) for s in seqs]
    big = [i for i, e in enumerate(expected) if e >= 5]
    small = [i for i in range(len(seqs)) if i not in big]
    obs = [observed[i] for i in big] + [sum(observed[i] for i in small)]
    exp = [expected[i] for i in big] + [sum(expected[i] for i in small)]
    if exp[-1] < 5:  # merge the tail into the last big bin
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    scale = sum(obs) / sum(exp)
    return chisquare(obs, [e * scale for e in exp]).pvalue


def assert_distributed_as_target(counts: dict, n: int, target, draft_model, prompt: list[int],
                                 params: SamplingParams) -> None:
    """counts: sampled output tuples → how often, over n samples through an engine."""
    target_dist = exact_sequences(target, prompt, params)
    assert not set(counts) - set(target_dist), "a sequence the target can never produce appeared"
    assert chi_square_pvalue(counts, target_dist, n) > 1e-3
    draft_dist = exact_sequences(draft_model, prompt, params)
    assert chi_square_pvalue(counts, {s: draft_dist.get(s, 0.0) + 1e-12 for s in set(draft_dist) | set(counts)},
                             n) < 1e-3, "the check could not tell the draft's distribution from the target's"


def sample_outputs(engine, prompt: list[int], params: dict, n: int) -> tuple[dict, list]:
    """n sampled generations (seeds 0..n-1) → (output tuple → count, the Generations)."""
    counts, generations = {}, []
    for seed in range(n):
        out = engine.generate(prompt, SamplingParams(seed=seed, **params))
        counts[tuple(out.output_ids)] = counts.get(tuple(out.output_ids), 0) + 1
        generations.append(out)
    return counts, generations
