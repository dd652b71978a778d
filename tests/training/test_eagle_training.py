"""Training the eagle head: the unrolled mask, and a trained head accepted more often on held-out prompts."""

from __future__ import annotations

import torch
from support.tiny import CharTokenizer, tiny_llama

from osd.config import EngineConfig, SamplingParams
from osd.decoding.eagle import EagleHead
from osd.decoding.engine import SpeculativeEngine
from trainers.eagle import train_eagle_head, unrolled_mask


def test_unrolled_mask_is_what_a_drafting_step_sees():
    allowed = unrolled_mask(5, 3, torch.float32, "cpu")[0, 0] == 0  # step 3 over 5 entries: queries at 2, 3, 4
    # keys: step 1 at 0..4 | step 2 at 1..4 | step 3 at 2..4
    assert allowed.shape == (3, 5 + 4 + 3)
    assert allowed[0].tolist() == [True, False, False, False, False] + [True, False, False, False] + [True, False, False]
    assert allowed[2].tolist() == [True, True, True, False, False] + [False, False, True, False] + [False, False, True]


def prompts(n: int, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(4, 9, (), generator=g)),), generator=g).tolist() for _ in range(n)]


def accepted_per_round(target, head, ps) -> float:
    engine = SpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always", gamma=3, record=False))
    accepted = rounds = 0
    for p in ps:
        s = engine.generate(p, SamplingParams(max_tokens=24)).stats
        accepted, rounds = accepted + s.accepted, rounds + s.rounds
    return accepted / rounds


def test_a_trained_head_is_accepted_more_on_held_out_prompts():
    vocab = 48
    target = tiny_llama(vocab, layers=4, seed=0, sharpness=4.0)
    plain = SpeculativeEngine(target, CharTokenizer(), None, EngineConfig(record=True))
    records = [plain.generate(p, SamplingParams(max_tokens=24)).record for p in prompts(48, 0, vocab)]
    held_out = prompts(12, 1, vocab)
    head = EagleHead(target)
    before = accepted_per_round(target, head, held_out)
    losses = train_eagle_head(head, target, records, epochs=6, lr=3e-3, steps=3)
    after = accepted_per_round(target, head, held_out)
    print(f"eagle head: loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-out accepted/round {before:.2f} -> {after:.2f}")
    assert losses[-1] < losses[0]
    assert after > before + 0.5


def test_training_time_test_makes_later_draft_steps_accepted():
    """Trained on target features only (steps=1), the head's later chain steps drift; unrolled (steps=3), they
    are accepted far more often. Measured: positions 2-4 accepted 0.19 vs 0.65 per round."""
    vocab = 48
    target = tiny_llama(vocab, layers=4, seed=0, sharpness=4.0)
    plain = SpeculativeEngine(target, CharTokenizer(), None, EngineConfig(record=True))
    records = [plain.generate(p, SamplingParams(max_tokens=24)).record for p in prompts(48, 0, vocab)]
    later = {}
    for steps in (1, 3):
        torch.manual_seed(0)
        head = EagleHead(target)
        train_eagle_head(head, target, records, epochs=6, lr=3e-3, steps=steps)
        engine = SpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always", gamma=4, record=False))
        stats = [engine.generate(p, SamplingParams(max_tokens=24)).stats for p in prompts(12, 1, vocab)]
        later[steps] = sum(sum(s.accepted_per_position[1:]) for s in stats) / sum(s.rounds for s in stats)
    assert later[3] > 2 * later[1], later
