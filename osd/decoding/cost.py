"""What a forward costs, measured: the curve T(k) of one forward over k new tokens.

Speculation pays only when verifying k tokens costs little more than decoding one; every
budget and back-off decision reads this curve, measured for the model, dtype, device and
thread count actually serving (never assumed).
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel

from osd.decoding.drafting import crop_cache
from osd.decoding.kv_cache import KVCacheKind, make_cache


def forward_cost_curve(model, ks=(1, 2, 3, 4, 5, 6, 8, 12, 16), context: int = 200, reps: int = 12,
                       kv_cache: KVCacheKind = "preallocated") -> dict[int, float]:
    """Lower-quartile ms of one forward over k new tokens on top of a `context`-token KV cache, cropped back after
    each forward as the engine does, on the kind of cache the engine uses (EngineConfig.kv_cache).

    `model` is an HF causal LM or a DraftModel (both take past_key_values and logits_to_keep).
    The lower quartile, not the median: on a shared machine a burst of other work can stall
    a whole run of reps, and the curve must describe the model, not the neighbours.
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    cache = make_cache(model.config, kv_cache, context + max(ks))
    curve = {}
    with torch.inference_mode():
        model(torch.randint(0, vocab, (1, context), device=device), past_key_values=cache, logits_to_keep=1)
        for k in ks:
            times = []
            for i in range(reps + 2):
                ids = torch.randint(0, vocab, (1, k), device=device)
                start = time.perf_counter()
                model(ids, past_key_values=cache, logits_to_keep=k)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:  # the first calls pay one-off kernel setup
                    times.append(time.perf_counter() - start)
                crop_cache(cache, context)
            curve[k] = statistics.quantiles(times, n=4)[0] * 1000
    return curve


def verification_cost(curve: Mapping[int, float], k: int) -> float:
    """ms of one target forward over k new tokens: the curve, linearly interpolated (and extrapolated)."""
    ks = sorted(curve)
    if k in curve:
        return float(curve[k])
    if k <= ks[0]:
        return float(curve[ks[0]])
    i = bisect.bisect_left(ks, k)
    lo, hi = (ks[i - 1], ks[i]) if i < len(ks) else (ks[-2], ks[-1]) if len(ks) > 1 else (ks[0], ks[0])
    if hi == lo:
        return float(curve[lo])
    slope = (curve[hi] - curve[lo]) / (hi - lo)
    return float(curve[lo] + slope * (k - lo))


def choose_budget(values: Sequence[float], curve: Mapping[int, float], fixed_ms: float = 0.0) -> int:
    """How many nodes to verify: n maximising expected tokens per ms.

    values: estimated acceptance probability of each candidate node, in the order nodes
    would be added (descending for a score-ranked tree). Verifying the best n yields
    1 + Σ values[:n] tokens in expectation (each accepted node is a token, plus the
    recovered/bonus one) for `fixed_ms` (drafting) + the cost of a forward over n + 1 new
    tokens (the root too). Ties go to the smaller tree.
    """
    best_n, best = 0, 1.0 / (fixed_ms + verification_cost(curve, 1))
    expected = 1.0
    for n, v in enumerate(values, start=1):
        expected += v
        rate = expected / (fixed_ms + verification_cost(curve, n + 1))
        if rate > best:
            best_n, best = n, rate
    return best_n


def best_rate(values: Sequence[float], curve: Mapping[int, float], fixed_ms: float) -> float:
    ranked = sorted(values, reverse=True)
    n = choose_budget(ranked, curve, fixed_ms)
    return (1.0 + sum(ranked[:n])) / (fixed_ms + verification_cost(curve, n + 1))


def measure_verification_cost(target: PreTrainedModel, max_new: int, context: int = 200, reps: int = 6,
                              kv_cache: KVCacheKind = "preallocated") -> dict[int, float]:
    """ms of one target forward by new tokens, measured on `target` (see forward_cost_curve).

    A forward over more tokens never costs less, and noise on a shared machine only ever
    adds time, so each point is lowered to the cheapest measurement at or above its k.
    """
    ks = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256} & set(range(1, max_new + 1)) | {max_new})
    return monotone_cost(forward_cost_curve(target, ks=tuple(ks), context=context, reps=reps, kv_cache=kv_cache))


def monotone_cost(curve: Mapping[int, float]) -> dict[int, float]:
    """The curve with each point replaced by the minimum over it and every larger k (non-decreasing)."""
    out, floor = {}, float("inf")
    for k in sorted(curve, reverse=True):
        floor = min(floor, float(curve[k]))
        out[k] = floor
    return dict(sorted(out.items()))
