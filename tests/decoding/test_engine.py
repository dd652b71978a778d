"""The speculative engine on tiny random models: lossless, bounded, and honest about its stats."""


import pytest
import torch
from support.lossless import VOCAB, assert_distributed_as_target, sample_outputs
from support.tiny import CharTokenizer, hf_greedy, noisy_copy, random_prompts, tiny_llama, tiny_pair

from osd.config import EngineConfig, SamplingParams
from osd.decoding import drafting
from osd.decoding.engine import RequestError, SpeculativeEngine


@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
def test_greedy_equals_target_greedy(gamma):
    target, draft = tiny_pair(vocab=64, sharpness=3.0)
    agreeing = noisy_copy(target, noise=0.3)  # accepts often, so multi-token accepts and bonus tokens occur
    for d in (draft, agreeing):
        engine = SpeculativeEngine(target, CharTokenizer(), d, EngineConfig(speculation="always", gamma=gamma))
        for prompt in random_prompts(6, 64, seed=gamma):
            out = engine.generate(prompt, SamplingParams(max_tokens=24))
            assert out.output_ids == hf_greedy(target, prompt, 24)
            assert out.finish_reason == "length"
    assert out.stats.accepted > 0, "the agreeing draft should have been accepted sometimes"


def test_kv_cache_lengths_every_round(monkeypatch):
    target, _ = tiny_pair(vocab=64, sharpness=3.0)
    draft = noisy_copy(target, noise=0.5)
    seen = []
    real_crop = drafting.crop_cache

    def recording_crop(cache, length):
        real_crop(cache, length)
        seen.append((cache.get_seq_length(), length))

    monkeypatch.setattr("osd.decoding.engine.crop_cache", recording_crop)
    monkeypatch.setattr("osd.decoding.drafting.crop_cache", recording_crop)
    engine = SpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(speculation="always", gamma=4))
    engine.generate([3, 1, 4, 1, 5], SamplingParams(max_tokens=30, temperature=0.8, seed=0))
    assert len(seen) > 10
    # Every crop leaves exactly the committed length (or less for a draft that is one behind).
    assert all(got <= want for got, want in seen)
    target_crops = seen[1::2]  # draft rollback, then target crop, each round
    assert all(got == want for got, want in target_crops)


def test_eos_inside_an_accepted_block_ends_the_output_there():
    target = tiny_llama(vocab=64, sharpness=3.0)
    prompt = [5, 9, 2]
    reference = hf_greedy(target, prompt, 12)
    eos = reference[3]
    target.generation_config.eos_token_id = eos
    first = reference.index(eos)
    # A draft identical to the target accepts all γ=6 proposals, so EOS lands mid-block.
    engine = SpeculativeEngine(target, CharTokenizer(eos), noisy_copy(target, noise=0.0), EngineConfig(speculation="always", gamma=6))
    out = engine.generate(prompt, SamplingParams(max_tokens=12))
    assert out.output_ids == reference[: first + 1]
    assert out.finish_reason == "stop"
    assert out.stats.accepted >= first
    assert out.record.teacher_token_ids.shape[0] == first + 1


def test_stop_string_truncates_text_and_tokens():
    target = tiny_llama(vocab=26, sharpness=3.0)
    prompt = [1, 2, 3]
    reference = hf_greedy(target, prompt, 16)
    text = CharTokenizer().decode(reference)
    stop = text[5:7]
    engine = SpeculativeEngine(target, CharTokenizer(), noisy_copy(target, 0.2), EngineConfig(speculation="always", gamma=3))
    out = engine.generate(prompt, SamplingParams(max_tokens=16, stop=[stop]))
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    assert stop in CharTokenizer().decode(out.output_ids)
    assert out.output_ids == reference[: len(out.output_ids)]


def test_training_record_matches_a_fresh_target_forward():
    target, _ = tiny_pair(vocab=64, sharpness=3.0)
    engine = SpeculativeEngine(target, CharTokenizer(), noisy_copy(target, 0.5), EngineConfig(speculation="always", gamma=3, teacher_top_k=16))
    prompt = [7, 3, 9, 1]
    out = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=3))
    rec = out.record
    with torch.no_grad():
        logits = target(torch.tensor([prompt + out.output_ids])).logits[0, len(prompt) - 1 : -1]
    fresh = logits.log_softmax(-1)
    assert rec.teacher_token_ids.shape == (20, 16)
    assert torch.allclose(rec.teacher_logsumexp, logits.logsumexp(-1), atol=1e-4)
    stored = rec.teacher_logprobs.float()
    assert torch.allclose(stored, fresh.gather(-1, rec.teacher_token_ids.long()), atol=2e-3)
    assert torch.equal(rec.teacher_token_ids.long(), fresh.topk(16, -1).indices)
    # Rounds cover the output: proposals, first-rejection index, on-policy rows.
    assert rec.rounds and all(0 <= r.num_accepted <= len(r.proposed) for r in rec.rounds)
    expected_mask = torch.zeros(20, dtype=torch.bool)
    for r in rec.rounds:
        assert r.proposed[: r.num_accepted] == out.output_ids[r.start : r.start + r.num_accepted]
        expected_mask[r.start : r.start + min(r.num_accepted + 1, len(r.proposed))] = True
    assert torch.equal(rec.on_policy_mask(), expected_mask)


def test_stats_are_consistent():
    target, _ = tiny_pair(vocab=64, sharpness=3.0)
    engine = SpeculativeEngine(target, CharTokenizer(), noisy_copy(target, 0.5), EngineConfig(speculation="always", gamma=4))
    s = engine.generate([1, 2, 3], SamplingParams(max_tokens=40)).stats
    assert s.rounds * 4 >= s.proposed >= s.accepted
    assert s.accepted == sum(s.accepted_per_position)
    assert all(a >= b for a, b in zip(s.accepted_per_position, s.accepted_per_position[1:]))
    assert s.mean_acceptance_length == pytest.approx(1 + s.accepted / s.rounds)
    assert 0.0 <= s.alpha_hat <= 1.0
    # Each round commits accepted + 1 tokens; γ=0 tail steps add one each.
    assert s.output_tokens == s.accepted + s.target_forwards


def test_engine_without_draft_is_plain_decoding():
    target, _ = tiny_pair(vocab=64, sharpness=3.0)
    engine = SpeculativeEngine(target, CharTokenizer(), None)
    out = engine.generate([4, 2], SamplingParams(max_tokens=15))
    assert out.output_ids == hf_greedy(target, [4, 2], 15)
    assert out.stats.target_forwards == 15 and out.stats.rounds == 0 and out.stats.alpha_hat is None


# ---- sampled decoding: whole-sequence distributions must match the target's -------------------------

SAMPLES = 1200


@pytest.mark.parametrize("gamma, temperature, top_p, top_k", [(1, 0.7, 0.9, 0), (3, 1.3, 0.6, 0), (5, 0.9, 1.0, 2)])
def test_sampled_sequences_follow_the_target(gamma, temperature, top_p, top_k):
    # γ + 1 tokens: one full round of γ proposals plus its bonus fits in every sequence.
    target = tiny_llama(vocab=VOCAB, sharpness=4.0)
    draft = noisy_copy(target, noise=1.0)
    prompt = [1, 2]
    params = dict(max_tokens=gamma + 1, temperature=temperature, top_p=top_p, top_k=top_k)
    engine = SpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(speculation="always", gamma=gamma, record=False))
    counts, outs = sample_outputs(engine, prompt, params, SAMPLES)
    accepted = sum(o.stats.accepted for o in outs)
    assert_distributed_as_target(counts, SAMPLES, target, draft.model, prompt, SamplingParams(**params))
    assert 0 < accepted < SAMPLES * gamma, "both accept and reject paths must be exercised"


# ---- bad input ------------------------------------------------------------------------------------

def test_bad_requests_are_clear_errors():
    target, draft = tiny_pair(vocab=64)
    engine = SpeculativeEngine(target, CharTokenizer(), draft)
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(RequestError, match="context window"):
        engine.generate([1] * 10, SamplingParams(max_tokens=250))


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "greater than or equal to 1"),
    ("max_tokens", -5, "greater than or equal to 1"),
    ("temperature", -0.1, "greater than or equal to 0"),
    ("top_p", 0.0, "greater than 0"),
    ("top_p", 1.5, "less than or equal to 1"),
    ("stop", [""], "non-empty"),
])
def test_bad_sampling_params(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_on_tokens_streams_every_committed_token():
    target, _ = tiny_pair(vocab=64, sharpness=3.0)
    engine = SpeculativeEngine(target, CharTokenizer(), noisy_copy(target, 0.3), EngineConfig(speculation="always", gamma=3))
    streamed = []
    out = engine.generate([1, 2, 3], SamplingParams(max_tokens=20), on_tokens=streamed.append)
    flat = [t for chunk in streamed for t in chunk]
    assert flat[: len(out.output_ids)] == out.output_ids
    assert len(streamed) == out.stats.target_forwards  # one callback per round


def test_shortlist_head_copy_follows_weight_updates():
    """The served shortlist head is cached; an in-place weight change must still be seen."""
    from osd.models.drafts import DraftModel

    model = tiny_llama(vocab=64, layers=1, seed=3)
    draft = DraftModel(model, shortlist=torch.arange(0, 64, 2))
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        before = draft(ids)
        assert torch.equal(draft(ids), before)  # served from the cached head
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    with torch.inference_mode():
        after = draft(ids)
    assert torch.allclose(after[..., ::2], 2 * before[..., ::2], rtol=1e-5, atol=1e-5)
    assert torch.isinf(after[..., 1::2]).all()


def test_extreme_sampling_values_decode_as_their_limits():
    """A temperature too small to divide by decodes greedily; a top_p that rounds to 0 in float32 keeps the top
    token (the fuzzer found both as HTTP 500s; the engine itself must not produce NaN either)."""
    target, draft = tiny_pair(vocab=64, sharpness=3.0)
    engine = SpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(speculation="always", gamma=3))
    greedy = engine.generate([4, 2, 7], SamplingParams(max_tokens=12)).output_ids
    assert SamplingParams(temperature=1e-300).greedy and not SamplingParams(temperature=1e-5).greedy
    assert engine.generate([4, 2, 7], SamplingParams(max_tokens=12, temperature=1e-300)).output_ids == greedy
    tiny_top_p = SamplingParams(max_tokens=12, temperature=1.0, top_p=5e-324, seed=3)
    assert engine.generate([4, 2, 7], tiny_top_p).output_ids == greedy  # only the likeliest token survives
