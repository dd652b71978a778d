"""The eagle head drafting from the target's own hidden states: features, alignment, losslessness."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support.lossless import VOCAB, assert_distributed_as_target, sample_outputs
from support.tiny import CharTokenizer, hf_greedy, tiny_llama

from osd.config import EngineConfig, SamplingParams, SuffixConfig, TreeConfig
from osd.decoding.eagle import EagleHead, FeatureCapture, default_feature_layers
from osd.decoding.eagle_tree import EagleTreeDrafter
from osd.decoding.engine import SpeculativeEngine
from osd.decoding.kv_cache import make_cache
from osd.decoding.tree_engine import TreeSpeculativeEngine


def fresh_features(target, ids: list[int], layers: list[int]) -> torch.Tensor:
    """[len(ids), F]: the target's outputs at ``layers`` for ``ids`` from one uncached forward."""
    with torch.no_grad():
        hs = target(torch.tensor([ids]), output_hidden_states=True).hidden_states  # [0] = embeddings
    return torch.cat([hs[i + 1][0] for i in layers], dim=-1)


def test_default_feature_layers_follow_eagle3_and_fit_shallow_models():
    assert default_feature_layers(30) == [1, 14, 26]
    assert default_feature_layers(2) == [0, 1]
    with pytest.raises(ValueError, match="feature layers"):
        EagleHead(tiny_llama(16, layers=2), feature_layers=[5])


def test_captured_features_equal_a_fresh_forward_through_a_kv_cache():
    target = tiny_llama(32, layers=6, seed=0)
    capture = FeatureCapture(target, [1, 2, 4])
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    cache = make_cache(target.config, "preallocated", 16)
    with torch.no_grad():
        target(torch.tensor([ids[:5]]), past_key_values=cache, use_cache=True)
        first = capture.rows(5)
        target(torch.tensor([ids[5:]]), past_key_values=cache, use_cache=True)  # a verification-like forward
        second = capture.rows(3)
    capture.close()
    torch.testing.assert_close(torch.cat([first, second]), fresh_features(target, ids, [1, 2, 4]),
                               atol=1e-5, rtol=1e-4)


def test_the_head_is_fed_the_target_features_of_exactly_the_committed_positions(monkeypatch):
    """Over a whole request, the target features the head consumed are those of positions 0..N-2 of the
    final committed tokens, in order, each once: no drafted (uncommitted) position's features slip in."""
    target = tiny_llama(48, layers=4, seed=0, sharpness=3.0)
    head = EagleHead(target)
    fed = []
    forward = head.forward

    def spy(next_ids, features=None, hidden=None, past_key_values=None):
        if features is not None:
            fed.append(features[0].clone())
        return forward(next_ids, features=features, hidden=hidden, past_key_values=past_key_values)

    monkeypatch.setattr(head, "forward", spy)
    engine = SpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always", gamma=3))
    prompt = [5, 7, 11, 2, 9]
    out = engine.generate(prompt, SamplingParams(max_tokens=20))
    tokens = prompt + out.output_ids
    consumed = torch.cat(fed)
    assert out.stats.rounds > 3
    torch.testing.assert_close(consumed, fresh_features(target, tokens, head.feature_layers)[: consumed.shape[0]],
                               atol=1e-5, rtol=1e-4)
    assert consumed.shape[0] >= len(tokens) - 1 - 4  # the last round's rows arrive after its proposal


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_output_is_the_targets(gamma):
    target = tiny_llama(64, layers=4, seed=0, sharpness=3.0)
    engine = SpeculativeEngine(target, CharTokenizer(), EagleHead(target), EngineConfig(speculation="always", gamma=gamma))
    for prompt in ([3], [4, 2], [1, 5, 9, 13, 2, 8]):
        out = engine.generate(prompt, SamplingParams(max_tokens=24))
        assert out.output_ids == hf_greedy(target, prompt, 24)
    assert out.stats.rounds > 0 and out.stats.proposed > 0


class HeadChainLM:
    """The distribution a broken engine would emit (the head's drafts, unverified) as an LM over
    ``prompt + seq``: the first token from the target's features of the prompt, the rest from the head's
    own outputs. What the lossless check must be able to tell from the target."""

    def __init__(self, target, head: EagleHead, prompt_len: int):
        self.target, self.head, self.prompt_len = target, head, prompt_len
        self.capture = FeatureCapture(target, head.feature_layers)

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        p = self.prompt_len
        self.target(ids[:, : p - 1])
        features = self.capture.rows(p - 1)[None]
        cache = make_cache(self.head.config, "dynamic")
        logits, hidden = self.head(ids[:, 1:p], features=features, past_key_values=cache)
        for t in range(p, ids.shape[1]):
            logits, hidden = self.head(ids[:, t : t + 1], hidden=hidden[:, -1:], past_key_values=cache)
        return SimpleNamespace(logits=logits)


def test_sampled_sequences_follow_the_target():
    target = tiny_llama(vocab=VOCAB, layers=4, sharpness=8.0)
    head = EagleHead(target)
    with torch.no_grad():  # a head far enough from the target that the check can tell them apart
        head.fuse.weight.normal_(0, 1.0)
    prompt, gamma, n = [1, 2, 3], 3, 1200
    params = {"max_tokens": gamma + 1, "temperature": 0.8, "top_p": 0.95}
    engine = SpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always", gamma=gamma, record=False))
    counts, outs = sample_outputs(engine, prompt, params, n)
    accepted = sum(o.stats.accepted for o in outs)
    assert 0 < accepted < n * gamma, "both accept and reject paths must be exercised"
    with torch.no_grad():
        assert_distributed_as_target(counts, n, target, HeadChainLM(target, head, len(prompt)), prompt,
                                     SamplingParams(**params))


TREE = TreeConfig(shape="dynamic", top_k=3, max_depth=4, budget=8)


@pytest.mark.parametrize("suffix", [None, SuffixConfig()], ids=["head", "head+suffix"])
def test_tree_greedy_output_is_the_targets(suffix):
    target = tiny_llama(64, layers=4, seed=0, sharpness=3.0)
    head = EagleHead(target)
    engine = TreeSpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always", suffix=suffix),
                                   TREE)
    for prompt in ([3], [4, 2], [1, 5, 9, 13, 2, 8], [1, 5, 9, 13, 2, 8]):  # the repeat gives suffix matches
        out = engine.generate(prompt, SamplingParams(max_tokens=24))
        assert out.output_ids == hf_greedy(target, prompt, 24)
    assert out.stats.draft_rounds > 0 and out.stats.proposed > out.stats.rounds


def test_every_tree_node_gets_the_heads_distribution_after_its_own_path():
    """Each expanded node's q is what the head gives after drafting exactly that node's path (its parent's
    output fed back, siblings and cousins invisible), computed from scratch by HeadChainLM."""
    target = tiny_llama(48, layers=4, seed=0, sharpness=3.0)
    head = EagleHead(target)
    prompt = [5, 7, 11, 2, 9]
    capture = FeatureCapture(target, head.feature_layers)
    drafter = EagleTreeDrafter(head, capture, TreeConfig(shape="dynamic", top_k=2, max_depth=3, budget=12))
    with torch.no_grad():
        target(torch.tensor([prompt[:-1]]))
    drafter.target_rows(len(prompt) - 1)
    tree, _ = drafter.build(prompt, SamplingParams(temperature=0.0), None, 3)
    reference = HeadChainLM(target, head, len(prompt))
    checked = 0
    for node in range(tree.size):
        if not tree.q[node].any():
            continue  # a leaf the head never expanded
        path, n = [], node
        while n > 0:
            path.insert(0, int(tree.tokens[n]))
            n = int(tree.parents[n])
        with torch.no_grad():
            want = reference(torch.tensor([prompt + path])).logits[0, -1].softmax(-1)
        torch.testing.assert_close(tree.q[node], want, atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked >= 4 and int(tree.depths.max()) == 3


def test_a_tree_reads_the_committed_paths_features():
    """After tree rounds the head's committed entries are the target's features of the committed tokens
    (rows of the accepted path, not of rejected siblings), so a record's features equal a fresh forward's."""
    target = tiny_llama(48, layers=4, seed=0, sharpness=3.0)
    head = EagleHead(target)
    engine = TreeSpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always"), TREE)
    out = engine.generate([5, 7, 11, 2, 9], SamplingParams(max_tokens=20))
    rec = out.record
    tokens = rec.prompt_ids + rec.output_ids
    assert out.stats.rounds > 3 and out.stats.proposed > out.stats.rounds  # trees wider than chains
    torch.testing.assert_close(rec.target_features.float(),
                               fresh_features(target, tokens, head.feature_layers)[: len(tokens) - 1].half().float(),
                               atol=2e-3, rtol=1e-2)


def test_tree_sampled_sequences_follow_the_target():
    """Drawn children (the default); the top-k point-mass rule is the same code for every draft
    (tests/decoding/test_tree.py), and the head's tree q is checked exactly above."""
    target = tiny_llama(vocab=VOCAB, layers=4, sharpness=8.0)
    head = EagleHead(target)
    with torch.no_grad():
        head.fuse.weight.normal_(0, 1.0)
    prompt, n = [1, 2, 3], 1200
    params = {"max_tokens": 3, "temperature": 0.8, "top_p": 0.95}
    tree = TreeConfig(shape="dynamic", top_k=2, max_depth=2, budget=4, sampled_children="draw")
    engine = TreeSpeculativeEngine(target, CharTokenizer(), head, EngineConfig(speculation="always", record=False), tree)
    counts, outs = sample_outputs(engine, prompt, params, n)
    accepted = sum(o.stats.accepted for o in outs)
    assert 0 < accepted < n * 2, "both accept and reject paths must be exercised"
    with torch.no_grad():
        assert_distributed_as_target(counts, n, target, HeadChainLM(target, head, len(prompt)), prompt,
                                     SamplingParams(**params))
