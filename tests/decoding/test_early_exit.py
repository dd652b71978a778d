"""Early exit over the target's shared shallow layers: lossless, the same q as the standalone draft, and cheaper.

The reference for "the same computation" is a plain Drafter over the standalone self-draft (same weights, its
own full KV cache): run side by side on the same committed tokens, the two must propose the same tokens from
the same q, round after round, through rejections and fully accepted rounds.
"""

import copy

import pytest
import torch
from support.lossless import VOCAB, assert_distributed_as_target, sample_outputs
from support.tiny import CharTokenizer, hf_greedy, random_prompts, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from osd.config import EngineConfig, SamplingParams
from osd.decoding.drafting import Drafter
from osd.decoding.early_exit import EarlyExitDrafter, EarlyExitEngine
from osd.decoding.engine import SpeculativeEngine
from osd.decoding.stopping import ConfidenceStop, LengthPolicy
from osd.models.drafts import DraftModel, build_self_draft
from osd.models.loading import transpose_linear_weights

SHARED = 2  # target layers 0..1 are the draft's too


def shared_draft(target, adapter_noise: float = 0.0, adapter_layers: int = 1, shortlist=None) -> DraftModel:
    """The target's first SHARED layers plus `adapter_layers` more, the adapter perturbed as training would."""
    model = build_self_draft(target, SHARED + adapter_layers)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.model.layers[SHARED:].parameters():
            p.add_(adapter_noise * p.std() * torch.randn(p.shape, generator=gen))
    return DraftModel(model, shortlist)


def early_engine(target, draft, gamma: int = 4, threshold: float = 0.0, engine_cls=EarlyExitEngine, **config):
    base = SpeculativeEngine(target, CharTokenizer(), None, EngineConfig(speculation="always", gamma=gamma, **config))
    return engine_cls.from_engine(base, SHARED, threshold, draft)


def hooks_on(target) -> int:
    return len(target.get_decoder().layers[SHARED - 1]._forward_hooks)


# ---- lossless --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_equals_target_greedy(gamma):
    target = tiny_llama(vocab=64, layers=4, sharpness=3.0)
    accepted = rejected = 0
    for noise in (0.0, 1.0):  # the untrained adapter (accepted often), a noisy one (rejected often)
        engine = early_engine(target, shared_draft(target, noise), gamma=gamma)
        for prompt in random_prompts(4, 64, seed=gamma) + [[5]]:  # [5]: no prefill, the store starts empty
            out = engine.generate(prompt, SamplingParams(max_tokens=20))
            assert out.output_ids == hf_greedy(target, prompt, 20)
            accepted += out.stats.accepted
            rejected += out.stats.proposed - out.stats.accepted
    assert accepted > 0 and rejected > 0, "both accept and reject paths must be exercised"


def test_transposed_target_layout_is_accepted_and_lossless():
    """build_engine lays CPU target weights out transposed; the draft built from it has the standard layout."""
    target = transpose_linear_weights(tiny_llama(vocab=64, layers=4, sharpness=3.0))
    base = SpeculativeEngine(target, CharTokenizer(), None, EngineConfig(speculation="always", gamma=3))
    engine = EarlyExitEngine.from_engine(base, SHARED, exit_threshold=0.2)  # the default, untrained draft
    assert len(engine.draft.model.model.layers) == SHARED + 1
    prompt = [3, 1, 4, 1, 5]
    assert engine.generate(prompt, SamplingParams(max_tokens=16)).output_ids == hf_greedy(target, prompt, 16)


def test_sampled_sequences_follow_the_target():
    # Peaky enough (sharpness 6, temperature 0.5) that 1200 samples fill many chi-square bins, and an
    # adapter noisy enough that the check tells the draft apart: miss probability ~1e-60 (lossless.py).
    gamma, samples = 3, 1200
    target = tiny_llama(vocab=VOCAB, layers=3, sharpness=6.0)
    draft = shared_draft(target, adapter_noise=2.0)
    params = dict(max_tokens=gamma + 1, temperature=0.5, top_p=0.9)
    engine = early_engine(target, draft, gamma=gamma, record=False)
    prompt = [1, 2]
    counts, outs = sample_outputs(engine, prompt, params, samples)
    accepted = sum(o.stats.accepted for o in outs)
    assert_distributed_as_target(counts, samples, target, draft.model, prompt, SamplingParams(**params))
    assert 0 < accepted < samples * gamma, "both accept and reject paths must be exercised"


# ---- the same q as the standalone draft ------------------------------------------------------------

class RecordingPolicy(LengthPolicy):
    """Reads the hidden state (as HeadStop does) and keeps it, so two drafters' hidden states can be compared."""

    needs_hidden = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def keep_drafting(self, probs, token, hidden):
        self.seen.append((token, hidden.clone()))
        return True


class TwinDrafter:
    """Runs the plain Drafter first on a copy of the generator, then the early-exit drafter (whose result the
    engine uses), and logs both; it also checks that propose leaves the target cache as it found it."""

    def __init__(self, early, plain, target_cache, log):
        self.early, self.plain, self.target_cache, self.log = early, plain, target_cache, log

    @property
    def cached(self):
        return self.early.cached

    def propose(self, tokens, cap, params, generator):
        plain_generator = torch.Generator(device=generator.device)
        plain_generator.set_state(generator.get_state())
        expected = self.plain.propose(tokens, cap, params, plain_generator)
        before = [layer.get_seq_length() for layer in self.target_cache.layers]
        got = self.early.propose(tokens, cap, params, generator)
        after = [layer.get_seq_length() for layer in self.target_cache.layers]
        assert after == before == [len(tokens) - 1] * len(before), "propose must leave the target cache as it was"
        self.log.append((expected, got))
        return got

    def target_rows(self, count):
        self.early.target_rows(count)
        self.plain.target_rows(count)

    def observe(self, proposed, accepted):
        self.early.observe(proposed, accepted)
        self.plain.observe(proposed, accepted)
        self.log[-1] = (*self.log[-1], accepted)

    def rollback(self, committed):
        self.early.rollback(committed)
        self.plain.rollback(committed)
        assert self.early.cached == self.plain.cached <= committed - 1


class TwinEngine(EarlyExitEngine):
    policy = "confidence"

    def _make_drafter(self, draft, cache, prompt_ids, cluster):
        early = super()._make_drafter(draft, cache, prompt_ids, cluster)
        if self.policy == "confidence":
            plain = Drafter(draft, ConfidenceStop(self.exit_threshold))
        else:
            early.policy, plain = RecordingPolicy(), Drafter(draft, RecordingPolicy())
        self.twins.append(TwinDrafter(early, plain, cache, self.log))
        return self.twins[-1]


# Tiny random models are flat (the draft's top-1 q is ~0.035 at the median), hence the small threshold.
@pytest.mark.parametrize("policy, threshold, temperature, shortlist, noise", [
    ("confidence", 0.0, 0.0, False, 0.5), ("confidence", 0.035, 0.9, False, 1.0), ("recording", 0.0, 0.7, False, 0.5),
    ("confidence", 0.0, 0.0, True, 0.5),
])
def test_proposals_equal_the_standalone_drafts(policy, threshold, temperature, shortlist, noise):
    target = tiny_llama(vocab=64, layers=4, sharpness=3.0)
    draft = shared_draft(target, adapter_noise=noise, adapter_layers=2,
                         shortlist=torch.arange(0, 64, 2) if shortlist else None)
    engine = early_engine(target, draft, gamma=4, threshold=threshold, engine_cls=TwinEngine)
    engine.policy, engine.log, engine.twins = policy, [], []
    for seed, prompt in enumerate(random_prompts(3, 64, seed=5) + [[9]]):
        engine.generate(prompt, SamplingParams(max_tokens=24, temperature=temperature, seed=seed))
    assert len(engine.log) > 20
    for expected, got, accepted in engine.log:
        assert torch.equal(got.tokens, expected.tokens)
        assert torch.allclose(got.probs, expected.probs, rtol=1e-4, atol=1e-6)
    outcomes = {"partial" if 0 < a < len(g.tokens) else "none" if a == 0 else "all" for _, g, a in engine.log}
    assert outcomes == {"partial", "none", "all"}, "rounds must include partial, full and no acceptance"
    if policy == "recording":  # the stop policies see the same final-norm hidden state too
        for twin in engine.twins:
            early, plain = twin.early.policy.seen, twin.plain.policy.seen
            assert [t for t, _ in early] == [t for t, _ in plain]
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for (_, a), (_, b) in zip(early, plain))
    if threshold > 0:
        assert any(len(g.tokens) < 4 for _, g, _ in engine.log), "some rounds must exit early"


# ---- caches and hooks ------------------------------------------------------------------------------

def test_hook_lives_for_one_generate_and_the_store_stays_small():
    target = tiny_llama(vocab=64, layers=4, sharpness=3.0)
    engine = early_engine(target, shared_draft(target, 0.5))
    during, store_rows = [], []

    def on_tokens(_):
        during.append(hooks_on(target))
        store_rows.append(engine._capture.store.rows.shape[1])

    engine.generate(list(range(1, 30)), SamplingParams(max_tokens=20), on_tokens=on_tokens)
    assert during and set(during) == {1}
    assert hooks_on(target) == 0
    assert max(store_rows[1:]) <= 4 + 1, "rows the adapter has consumed must be dropped"


def test_no_hook_remains_and_caches_are_restored_when_generate_raises(monkeypatch):
    target = tiny_llama(vocab=64, layers=4, sharpness=3.0)
    engine = early_engine(target, shared_draft(target, 0.5))
    real_verify = engine._verify_round
    calls = []

    def failing_verify(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("verification blew up")
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(engine, "_verify_round", failing_verify)
    with pytest.raises(RuntimeError, match="verification blew up"):
        engine.generate([1, 2, 3], SamplingParams(max_tokens=20))
    assert hooks_on(target) == 0
    monkeypatch.undo()

    # A failure mid-draft still hands the borrowed target-cache positions back.
    caches = []
    real_make = engine._make_drafter
    monkeypatch.setattr(engine, "_make_drafter", lambda d, c, p, k: caches.append(c) or real_make(d, c, p, k))
    real_step, steps = EarlyExitDrafter._step, []

    def failing_step(self, *args):
        steps.append(1)
        if len(steps) == 6:
            raise RuntimeError("draft step blew up")
        return real_step(self, *args)

    monkeypatch.setattr(EarlyExitDrafter, "_step", failing_step)
    with pytest.raises(RuntimeError, match="draft step blew up"):
        engine.generate([1, 2, 3], SamplingParams(max_tokens=20))
    assert hooks_on(target) == 0
    assert len({layer.get_seq_length() for layer in caches[0].layers}) == 1, "shared layers left longer"
    monkeypatch.undo()
    assert engine.generate([1, 2, 3], SamplingParams(max_tokens=8)).output_ids == hf_greedy(target, [1, 2, 3], 8)


# ---- early exit ------------------------------------------------------------------------------------

def test_exit_threshold_sets_round_lengths():
    target = tiny_llama(vocab=64, layers=4, sharpness=3.0)
    draft = shared_draft(target, 0.0)
    prompt, max_tokens, gamma = [2, 7, 1, 8], 24, 5
    always_exit = early_engine(target, draft, gamma=gamma, threshold=1.0).generate(
        prompt, SamplingParams(max_tokens=max_tokens))
    assert always_exit.record.rounds and all(len(r.proposed) == 1 for r in always_exit.record.rounds)
    never_exit = early_engine(target, draft, gamma=gamma, threshold=1e-9).generate(
        prompt, SamplingParams(max_tokens=max_tokens))
    assert never_exit.record.rounds
    assert all(len(r.proposed) == min(gamma, max_tokens - r.start - 1) for r in never_exit.record.rounds)
    assert always_exit.output_ids == never_exit.output_ids == hf_greedy(target, prompt, max_tokens)


# ---- the construction check ------------------------------------------------------------------------

def test_construction_refuses_drafts_that_do_not_share_the_layers():
    target = tiny_llama(vocab=64, layers=4, sharpness=3.0)
    trained = shared_draft(target)
    with torch.no_grad():
        trained.model.model.layers[1].mlp.up_proj.weight.add_(1e-3)
    with pytest.raises(ValueError, match="layer 1 differs.*freeze_layers"):
        early_engine(target, trained)
    moved_embeddings = shared_draft(target)
    with torch.no_grad():
        moved_embeddings.model.model.embed_tokens.weight.mul_(1.01)
    with pytest.raises(ValueError, match="embeddings differ.*freeze_embeddings"):
        early_engine(target, moved_embeddings)
    with pytest.raises(ValueError, match="none above the 2 shared"):
        early_engine(target, DraftModel(build_self_draft(target, SHARED)))
    with pytest.raises(ValueError, match="exit_threshold"):
        early_engine(target, shared_draft(target), threshold=1.5)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4)).eval()
    with pytest.raises(ValueError, match="Llama-family"):
        EarlyExitEngine.from_engine(SpeculativeEngine(gpt2, CharTokenizer()), SHARED, 0.3)


def test_swapped_or_edited_drafts_are_checked_before_use():
    target = tiny_llama(vocab=64, layers=4, sharpness=3.0)
    draft = shared_draft(target)
    engine = early_engine(target, draft)
    bad = copy.deepcopy(draft)
    with torch.no_grad():
        bad.model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="layer 0 differs"):
        engine.generate([1, 2], SamplingParams(max_tokens=4), draft=bad)
    assert hooks_on(target) == 0
    engine.generate([1, 2], SamplingParams(max_tokens=4))  # the live draft still passes
    with torch.no_grad():
        draft.model.model.layers[1].input_layernorm.weight.add_(0.1)  # edited in place after the check
    with pytest.raises(ValueError, match="layer 1 differs"):
        engine.generate([1, 2], SamplingParams(max_tokens=4))


# ---- what it saves ---------------------------------------------------------------------------------

def test_shared_layers_run_only_for_the_pending_and_drafted_tokens():
    """Positions through the draft's shared layers per generate: early exit vs the plain drafter (a measurement:
    the plain drafter also runs the prompt and every catch-up token through them)."""
    target = tiny_llama(vocab=64, layers=4, sharpness=3.0)
    draft = shared_draft(target, 0.0)
    positions = []
    handle = draft.model.model.layers[0].register_forward_hook(lambda m, a, out: positions.append(out.shape[1]))
    prompt, params = list(range(1, 21)), SamplingParams(max_tokens=40)
    try:
        plain = SpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(speculation="always", gamma=4)).generate(prompt, params)
        plain_positions = sum(positions)
        positions.clear()
        early = early_engine(target, draft, gamma=4).generate(prompt, params)
        early_positions = sum(positions)
    finally:
        handle.remove()
    assert early.output_ids == plain.output_ids
    assert early_positions == early.stats.proposed, "one shared-layer position per draft step, nothing else"
    assert early_positions < plain_positions, (early_positions, plain_positions)
    assert plain_positions - early_positions >= len(prompt) - 1  # at least the prompt prefill is saved
