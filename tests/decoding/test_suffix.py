"""Suffix speculation: the index, mixed-source trees (exact and sampled), and the engine on tiny models."""

import itertools

import pytest
import torch
from support.lossless import assert_distributed_as_target, sample_outputs
from support.tiny import CharTokenizer, hf_greedy, noisy_copy, tiny_llama, tiny_pair

from osd.config import EngineConfig, SamplingParams, SuffixConfig, TreeConfig
from osd.decoding.suffix import Match, SuffixIndex, SuffixProposer, TrafficIndex
from osd.decoding.tree import rrs_node, verify_tree_greedy
from osd.decoding.tree_engine import DRAFT, SUFFIX, TreeSpeculativeEngine

FLAT = {1: 10.0, 256: 10.0}  # every tree size costs the same: the budget is bounded by max_nodes only


# ---- the index ------------------------------------------------------------------------------------

def test_longest_match_wins_and_recent_occurrences_come_first():
    index = SuffixIndex(max_ngram=3)
    index.add([1, 2, 3, 4, 5])
    index.add([9, 2, 3, 7, 8])
    index.add([0, 3, 6])
    # "2 3" occurs twice (most recent first); "3" alone three times, but the 2-gram is longer.
    assert index.match([5, 2, 3], max_depth=2) == Match(2, [[7, 8], [4, 5]])
    assert index.match([1, 2, 3], max_depth=4) == Match(3, [[4, 5]])  # the 3-gram "1 2 3"
    assert index.match([42, 3], max_depth=1) == Match(1, [[6], [7], [4]])
    assert index.match([42], max_depth=3) == Match(0, [])
    assert index.match([2, 3], max_depth=8, max_matches=1).continuations == [[7, 8]]


def test_continuations_stop_at_the_end_of_their_sequence():
    index = SuffixIndex(max_ngram=2)
    index.add([1, 2])
    index.add([3, 4])
    assert index.match([1], max_depth=5).continuations == [[2]]  # not [2, 3, 4]
    assert index.match([2], max_depth=5) == Match(0, [])  # nothing followed it: no continuation, no match


def test_a_request_index_skips_the_context_itself():
    index = SuffixIndex(max_ngram=2)
    index.add([5, 6, 7, 5, 6])  # the context ends with "5 6", whose only earlier occurrence continues "7 5 6"
    assert index.match([5, 6, 7, 5, 6], max_depth=4) == Match(2, [[7, 5, 6]])
    index.extend([7])
    assert index.match([5, 6, 7, 5, 6, 7], max_depth=2).continuations == [[5, 6]]


def test_trie_fractions_are_per_parent():
    m = Match(1, [[1, 2], [1, 3], [1, 2], [4]])
    trie = m.trie()
    assert trie[(1,)] == pytest.approx(3 / 4) and trie[(4,)] == pytest.approx(1 / 4)
    assert trie[(1, 2)] == pytest.approx(2 / 3) and trie[(1, 3)] == pytest.approx(1 / 3)


def test_eviction_by_sequences_and_tokens():
    index = SuffixIndex(max_ngram=2, max_sequences=2)
    for i in range(5):
        index.add([100 + i, 7, i])
    assert index.num_sequences == 2
    assert index.match([7], max_depth=1).continuations == [[4], [3]]  # the three oldest are gone
    assert index.match([100], max_depth=1) == Match(0, [])

    index = SuffixIndex(max_ngram=2, max_tokens=10)
    for i in range(6):
        index.add([i, i + 1, i + 2, i + 3])
        assert index.num_tokens <= 10
    assert index.match([2, 3], max_depth=1) == Match(0, [])  # from an evicted sequence ...
    assert index.match([5, 6], max_depth=3).continuations == [[7, 8], [7]]  # ... but the newest two are there


def test_one_sequence_longer_than_the_window_keeps_its_tail():
    index = SuffixIndex(max_ngram=2, max_tokens=6)
    index.add(list(range(20)))
    assert index.num_tokens == 6
    assert index.match([15], max_depth=2).continuations == [[16, 17]]
    assert index.match([3], max_depth=2) == Match(0, [])


def test_memory_stays_bounded_under_a_long_stream():
    gen = torch.Generator().manual_seed(0)
    index = SuffixIndex(max_ngram=4, max_tokens=500, max_sequences=40)
    for _ in range(400):
        index.add(torch.randint(0, 50, (int(torch.randint(1, 60, (), generator=gen)),), generator=gen).tolist())
        assert index.num_tokens <= 500 and index.num_sequences <= 40
        # Stale positions are compacted away: the table holds at most 2 · max_ngram positions per live slot.
        assert index.num_entries <= 2 * 4 * (index.num_tokens + index.num_sequences)


def test_traffic_index_dedupes_by_request_id_and_bounds_each_cluster():
    traffic = TrafficIndex(SuffixConfig(max_ngram=2, cluster_requests=3))
    assert traffic.add([1, 2, 3], [4, 5], "a", "r1")
    assert not traffic.add([1, 2, 3], [4, 5], "a", "r1")  # the same record again (e.g. through the buffer)
    assert not traffic.add([1], [], "a", "r2")  # nothing generated: nothing to learn
    for i in range(5):
        traffic.add([9], [i], "b", f"b{i}")
    assert traffic.stats()["a"] == {"tokens": 4, "requests": 1, "entries": traffic.get("a").num_entries}
    assert traffic.stats()["b"]["requests"] == 3
    # The prompt's tail is kept, so a repeated prompt matches from the first output token.
    assert traffic.get("a").match([0, 2, 3], max_depth=2).continuations == [[4, 5]]


def test_proposer_scores_are_calibrated_path_products():
    traffic = TrafficIndex(SuffixConfig(max_ngram=2))
    traffic.add([1], [2, 3, 4], "g")
    traffic.add([1], [2, 3, 5], "g")
    proposer = SuffixProposer(SuffixConfig(max_ngram=2), [8, 1], traffic.get("g"), {})
    cands = {c.path: c for c in proposer.candidates([8, 1], max_depth=3)}
    assert set(cands) == {(2,), (2, 3), (2, 3, 4), (2, 3, 5)}
    assert cands[(2, 3, 4)].fraction == pytest.approx(0.5)
    assert cands[(2, 3, 4)].score < cands[(2, 3)].score <= cands[(2,)].score <= 1.0
    # Failures teach the calibration: the same candidates score lower afterwards.
    before = cands[(2,)].score
    proposer.observe([(cands[(2,)], False)] * 30)
    after = {c.path: c for c in proposer.candidates([8, 1], max_depth=3)}
    assert after[(2,)].score < before / 2


# ---- mixed-source trees: exact enumeration --------------------------------------------------------

def random_dists(vocab, depth, seed):
    gen = torch.Generator().manual_seed(seed)
    table = {}
    for n in range(depth + 1):
        for ctx in itertools.product(range(vocab), repeat=n):
            d = torch.rand(vocab, generator=gen, dtype=torch.float64) ** 3
            d[torch.rand(vocab, generator=gen) < 0.3] = 0
            d[int(torch.randint(0, vocab, (), generator=gen))] += 0.1
            table[ctx] = d / d.sum()
    return table


def continuation(p, ctx, n):
    if n == 0:
        return torch.tensor(1.0, dtype=torch.float64)
    return torch.stack([p[ctx][x] * continuation(p, ctx + (x,), n - 1) for x in range(len(p[ctx]))])


def mixed_children(q, suffix, ctx, m):
    """A fused node's children: the suffix index's tokens first, then the draft's top m not already there."""
    kids = list(suffix.get(ctx, ()))
    kids += [t for t in torch.topk(q[ctx], m).indices.tolist() if t not in kids][: m]
    return kids


def mixed_tree_output(p, q, suffix, depth, m, rule, ctx=()):
    """Exact distribution of the next depth + 1 tokens from one fused round verified by `rule`."""
    n = depth + 1

    def emit(dist):
        return torch.stack([dist[x] * continuation(p, ctx + (x,), n - 1) for x in range(len(dist))])

    kids = mixed_children(q, suffix, ctx, m) if depth else []
    if not kids:
        return emit(p[ctx])
    # Point masses: q only chose the children. The draft's q is passed to show which rule is used.
    node = rule(p[ctx], q[ctx], torch.tensor(kids), False)
    out, reach = torch.zeros([len(p[ctx])] * n, dtype=torch.float64), 1.0
    for i, c in enumerate(kids):
        a = float(node.accept[i])
        if a > 0:
            out[c] += reach * a * mixed_tree_output(p, q, suffix, depth - 1, m, rule, ctx + (c,))
        reach *= 1.0 - a
    return out + reach * emit(node.residuals[-1])


@pytest.mark.parametrize("vocab, depth, m", [(3, 2, 1), (4, 2, 2), (5, 2, 1), (3, 3, 1)])
def test_fused_trees_reproduce_the_target_exactly(vocab, depth, m):
    for seed in range(3):
        p, q = random_dists(vocab, depth, seed), random_dists(vocab, depth, seed + 50)
        gen = torch.Generator().manual_seed(seed)
        # Suffix proposals: arbitrary tokens at some contexts, sometimes the draft's own choice too.
        suffix = {ctx: torch.randperm(vocab, generator=gen)[: int(torch.randint(0, 3, (), generator=gen))].tolist()
                  for ctx in p if len(ctx) < depth}
        out = mixed_tree_output(p, q, suffix, depth, m, rrs_node)
        assert torch.allclose(out, continuation(p, (), depth + 1), atol=1e-9, rtol=0)


def test_the_enumeration_catches_verifying_suffix_tokens_against_the_draft_q():
    """The bug a fused tree invites: verifying an index token as if the draft had drawn it (accept p/q)."""

    def as_if_drawn(p, q, tokens, drawn):
        return rrs_node(p, q, tokens, True)  # every child verified as a draw from the draft's q

    p, q = random_dists(4, 2, 1), random_dists(4, 2, 2)
    suffix = {(): [0], (0,): [1]}
    wrong = mixed_tree_output(p, q, suffix, 2, 1, as_if_drawn)
    assert not torch.allclose(wrong, continuation(p, (), 3), atol=1e-3)


# ---- the engine -----------------------------------------------------------------------------------

def repetitive_prompts(n, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        phrase = torch.randint(0, vocab, (5,), generator=gen).tolist()
        out.append(phrase * 3 + phrase[:2])
    return out


@pytest.mark.parametrize("with_draft", [False, True], ids=["suffix-only", "fused"])
def test_greedy_output_equals_the_target_and_repeats_get_cheaper(with_draft):
    target, draft = tiny_pair(vocab=64, sharpness=3.0)
    engine = TreeSpeculativeEngine(target, CharTokenizer(), draft if with_draft else None,
                                   EngineConfig(suffix=SuffixConfig()), TreeConfig(), FLAT)
    for prompt in repetitive_prompts(3, 64):
        expected = hf_greedy(target, prompt, 40)
        first = engine.generate(prompt, SamplingParams(max_tokens=40))
        again = engine.generate(prompt, SamplingParams(max_tokens=40))  # now in the traffic index
        assert first.output_ids == expected and again.output_ids == expected
        s = again.stats
        assert s.accepted_draft_only + s.accepted_suffix_only + s.accepted_both == s.accepted
        assert s.accepted_suffix_only + s.accepted_both >= 30  # the repeat is proposed whole, in rounds of up to 8
        assert s.target_forwards <= 6 and s.target_forwards <= first.stats.target_forwards
    if with_draft:
        assert engine.draft_gain(draft).ms > 0  # the draft ran and was timed


def test_the_fused_tree_runs_the_draft_only_while_it_pays():
    target, useless = tiny_pair(vocab=64, sharpness=3.0)
    perfect = noisy_copy(target, noise=0.0)  # proposes the target's own argmax
    prompt = repetitive_prompts(1, 64, seed=4)[0]
    # A verification of 1 ms makes any draft forward (≥ 0.1 ms) too dear for a draft that adds < 0.1 token a round;
    # one of 100 ms makes a draft that adds tokens worth its few ms.
    for draft, runs_mostly, cost in ((useless, False, 1.0), (perfect, True, 100.0)):
        engine = TreeSpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(suffix=SuffixConfig(), record=False),
                                       TreeConfig(), {1: cost, 256: cost})
        out = engine.generate(prompt, SamplingParams(max_tokens=120))
        assert out.output_ids == hf_greedy(target, prompt, 120)
        s, gain = out.stats, engine.draft_gain(draft)
        if runs_mostly:
            assert s.draft_rounds == s.target_forwards and s.accepted_draft_only > 0 and gain.tokens > 1
        else:  # the first round measures it, then only the probes
            assert s.draft_rounds <= 1 + s.target_forwards // gain.probe_every and gain.tokens < 0.5


def test_warm_up_leaves_no_learnt_state_behind():
    target, draft = tiny_pair(vocab=64, sharpness=3.0)
    engine = TreeSpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(suffix=SuffixConfig()), TreeConfig(), FLAT)
    engine.generate([5, 6, 7, 5, 6], SamplingParams(max_tokens=4))  # a real request: learnt state and traffic
    assert engine.draft_gain(draft) is not None and engine.suffix_calibrations
    engine.warm_up()
    assert engine.draft_gain(draft) is None and not engine.suffix_calibrations  # cold timings, synthetic prompt
    assert engine.traffic.stats()["global"]["requests"] == 1  # the warm-up prompt is not traffic either


def test_a_tree_with_both_sources_marks_them():
    target, draft = tiny_pair(vocab=64, sharpness=3.0)
    engine = TreeSpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(suffix=SuffixConfig(), record=False),
                                   TreeConfig(max_nodes=16), FLAT)
    prompt = repetitive_prompts(1, 64)[0]
    drafter = engine._make_drafter(draft, None, prompt, "global")
    tree, _ = drafter.build(prompt, SamplingParams(max_tokens=8), None, 8, torch.device("cpu"))
    sources = tree.sources.tolist()
    assert sources[0] == 0 and {s & SUFFIX for s in sources[1:]} == {0, SUFFIX} and any(s & DRAFT for s in sources)
    assert set(drafter.candidates) == {i for i, s in enumerate(sources) if s & SUFFIX}
    assert tree.size <= 17 and not tree.drawn  # point masses whatever the sampling
    # Verifying still follows the target's argmax.
    path = verify_tree_greedy(tree, torch.zeros(tree.size, dtype=torch.long)).path
    assert all(int(tree.tokens[n]) == 0 for n in path)


def test_suffix_needs_a_dynamic_tree():
    target, _ = tiny_pair(vocab=16)
    with pytest.raises(ValueError, match="dynamic"):
        TreeSpeculativeEngine(target, CharTokenizer(), None, EngineConfig(suffix=SuffixConfig()),
                              TreeConfig(shape="static"), FLAT)
    with pytest.raises(ValueError, match="length_policy"):
        EngineConfig(suffix=SuffixConfig(), length_policy="schedule")


SAMPLES = 1200


@pytest.mark.parametrize("with_draft", [False, True], ids=["suffix-only", "fused"])
def test_sampled_sequences_follow_the_target_with_mixed_sources(with_draft):
    target = tiny_llama(vocab=8, sharpness=4.0)
    draft = noisy_copy(target, noise=1.5)
    prompt = [1, 2, 1, 2, 1]
    params = dict(max_tokens=3, temperature=0.9, top_p=1.0, top_k=0)
    engine = TreeSpeculativeEngine(target, CharTokenizer(), draft if with_draft else None,
                                   EngineConfig(suffix=SuffixConfig(max_ngram=2), record=False, speculation="always"),
                                   TreeConfig(top_k=2, max_depth=2, max_nodes=6), {1: 1000.0, 256: 1000.0})
    gen = torch.Generator().manual_seed(3)  # (verification made dear, so the draft keeps paying for itself)
    for i in range(40):  # traffic the index proposes from, some of it the target's likely continuations
        engine.traffic.add(prompt, torch.randint(0, 8, (3,), generator=gen).tolist(), "global", f"seed-{i}")
    counts, outs = sample_outputs(engine, prompt, params, SAMPLES)
    assert_distributed_as_target(counts, SAMPLES, target, draft.model, prompt, SamplingParams(**params))
    suffix = sum(o.stats.accepted_suffix_only + o.stats.accepted_both for o in outs)
    rejected = sum(o.stats.node_trials - o.stats.node_accepts for o in outs)  # nodes whose children all lost
    assert suffix > 0 and rejected > 0, "proposals must be both accepted and rejected"
    if with_draft:  # draft nodes, alone or merged with a suffix node, were accepted too
        assert sum(o.stats.accepted_draft_only + o.stats.accepted_both for o in outs) > 0
