"""The speculation governor: drafts only while drafting pays, probes, and never changes outputs."""

import pytest
import torch

from osd.config import EngineConfig, SamplingParams
from osd.decoding.engine import SpeculativeEngine
from osd.decoding.governor import GovernorConfig, SpeculationGovernor, expected_tokens
from osd.models.drafts import DraftModel
from support.tiny import CharTokenizer, hf_greedy, tiny_llama


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def trained(alpha: float, verify_ms: dict[int, float], draft_ms: float, rounds: int = 200,
            gamma: int = 4) -> SpeculationGovernor:
    """A governor that has seen ``rounds`` speculative rounds at acceptance ``alpha`` (deterministic
    pattern) and the given costs."""
    gov = SpeculationGovernor()
    for k, ms in verify_ms.items():
        gov.observe(k - 1, 0, verify_s=ms / 1e3, draft_s=(k - 1) * draft_ms / 1e3 if k > 1 else None)
    credit = 0.0
    for _ in range(rounds):
        accepted = 0
        while accepted < gamma:  # accept while the running credit allows: a deterministic α
            credit += alpha
            if credit < 1.0:
                break
            credit -= 1.0
            accepted += 1
        gov.observe(gamma, accepted, verify_s=verify_ms[gamma + 1] / 1e3, draft_s=gamma * draft_ms / 1e3)
    return gov


FLAT = {1: 40.0, 2: 41.0, 3: 43.0, 4: 45.0, 5: 48.0}  # bf16-like: verifying 5 costs 1.2x one
STEEP = {1: 40.0, 2: 60.0, 3: 70.0, 4: 75.0, 5: 80.0}  # fp32-like


def test_a_good_cheap_draft_speculates_and_a_bad_one_does_not():
    good = trained(0.8, FLAT, draft_ms=3.0)
    assert good.alpha == pytest.approx(0.8, abs=0.05)
    assert good.cap(4) == 4
    bad = trained(0.1, STEEP, draft_ms=8.0)
    assert bad.cap(4) == 0
    # The same acceptance pays on a flat curve with a cheap draft, not on a steep one with a dear draft.
    assert trained(0.45, FLAT, draft_ms=2.0).cap(4) > 0
    assert trained(0.45, STEEP, draft_ms=8.0).cap(4) == 0


def test_the_cap_is_the_best_gamma_not_the_largest():
    gov = trained(0.55, {1: 40.0, 2: 42.0, 3: 60.0, 4: 80.0, 5: 100.0}, draft_ms=2.0)
    assert gov.cap(4) == 1  # verifying 3+ tokens is dear here: one drafted token is the sweet spot


def test_backed_off_it_probes_every_probe_every_plain_rounds():
    gov = trained(0.05, STEEP, draft_ms=8.0)
    every = gov.config.probe_every
    caps = [gov.cap(4) for _ in range(3 * (every + 1))]
    assert caps.count(4) == 3 and caps.count(0) == 3 * every
    assert [i for i, c in enumerate(caps) if c] == [every, 2 * every + 1, 3 * every + 2]


def test_it_comes_back_when_the_draft_improves():
    gov = trained(0.05, FLAT, draft_ms=3.0, rounds=100)
    assert gov.cap(4) == 0
    for _ in range(40):  # probes now see a draft that is accepted almost always
        gov.observe(4, 4, verify_s=FLAT[5] / 1e3, draft_s=4 * 3.0 / 1e3)
    assert gov.alpha > 0.6 and gov.cap(4) == 4


def test_it_measures_before_it_judges():
    gov = SpeculationGovernor(GovernorConfig())
    assert gov.cap(4) == 4  # nothing known: speculate (times the draft)
    gov.observe(4, 1, verify_s=0.05, draft_s=None)  # a catch-up round: the draft time is not representative
    assert gov.cap(4) == 4
    gov.observe(4, 1, verify_s=0.05, draft_s=0.02)
    assert gov.cap(4) == 0  # the draft is timed; plain decoding is not yet: time it
    gov.observe(0, 0, verify_s=0.04, draft_s=None)
    assert gov.best_gamma(4) is not None


# ---- through the engine -----------------------------------------------------------------------------


def hopeless_draft(target) -> DraftModel:
    """A draft whose top token is never the target's: its LM head is the target's, negated."""
    draft = tiny_llama(vocab=64, layers=1, seed=3, sharpness=3.0)
    with torch.no_grad():
        draft.lm_head.weight.copy_(-target.lm_head.weight)
        draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
    return DraftModel(draft)


def test_a_hopeless_draft_is_mostly_not_run_and_the_output_is_the_targets():
    target = tiny_llama(vocab=64, layers=4, sharpness=3.0)
    engine = SpeculativeEngine(target, CharTokenizer(), hopeless_draft(target), EngineConfig(gamma=4, record=False))
    assert engine.config.speculation == "auto"  # the default
    rounds = forwards = 0
    for seed in range(3):
        prompt = [1 + seed, 2, 3]
        out = engine.generate(prompt, SamplingParams(max_tokens=60))
        assert out.output_ids == hf_greedy(target, prompt, 60)  # lossless whatever the governor decides
        rounds += out.stats.rounds
        forwards += out.stats.target_forwards
    gov = engine.governor(engine.draft)
    assert gov.alpha < 0.2
    # Warm-up rounds, then one probe per probe_every plain rounds.
    assert rounds <= 4 + forwards / gov.config.probe_every, (rounds, forwards)
    always = SpeculativeEngine(target, CharTokenizer(), engine.draft,
                               EngineConfig(gamma=4, record=False, speculation="always"))
    assert always.governor(always.draft) is None
    assert always.generate([1, 2, 3], SamplingParams(max_tokens=20)).stats.rounds >= 10


def test_a_swapped_in_draft_gets_a_fresh_governor():
    target = tiny_llama(vocab=64, layers=2, sharpness=3.0)
    engine = SpeculativeEngine(target, CharTokenizer(), hopeless_draft(target), EngineConfig(gamma=4, record=False))
    engine.generate([1, 2], SamplingParams(max_tokens=40))
    old = engine.governor(engine.draft)
    engine.draft = hopeless_draft(target)
    assert engine.governor(engine.draft) is not old and engine.governor(engine.draft).rounds["speculative"] == 0


def test_warm_up_leaves_no_trace():
    """warm_up runs a throwaway request; the config, the governor's estimates and outputs are as before."""
    target = tiny_llama(vocab=64, layers=2, sharpness=3.0)
    engine = SpeculativeEngine(target, CharTokenizer(), hopeless_draft(target), EngineConfig(gamma=3))
    config = engine.config
    assert engine.warm_up() > 0
    assert engine.config is config
    assert engine.governor(engine.draft).rounds == {"speculative": 0, "plain": 0}
    assert engine.generate([1, 2], SamplingParams(max_tokens=12)).output_ids == hf_greedy(target, [1, 2], 12)
