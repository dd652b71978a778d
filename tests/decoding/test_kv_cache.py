"""The preallocated KV cache: the same attention inputs as DynamicCache through every operation the engines use,
and the same greedy output from every engine with either cache."""

import pytest
import torch
from support.tiny import CharTokenizer, hf_greedy, noisy_copy, random_prompts, tiny_llama
from transformers import DynamicCache, MistralConfig

from osd.config import EngineConfig, SamplingParams, TreeConfig
from osd.decoding.cost import forward_cost_curve
from osd.decoding.drafting import crop_cache
from osd.decoding.early_exit import EarlyExitEngine
from osd.decoding.engine import SpeculativeEngine
from osd.decoding.kv_cache import PreallocatedCache, PreallocatedLayer, gather_cache, make_cache
from osd.decoding.tree import TokenTree, tree_attention_mask, tree_position_ids
from osd.decoding.tree_engine import TreeSpeculativeEngine
from osd.models.drafts import DraftModel, build_self_draft

FLAT = {1: 10.0, 256: 10.0}  # a verification cost curve where every tree size costs the same
STATIC = TreeConfig(shape="static", branching=[3, 2, 1])
DYNAMIC = TreeConfig(shape="dynamic", top_k=3, max_depth=4, max_nodes=16)


def forward(model, cache, ids, tree_parents=None, tree_depths=None):
    """ids: new token ids → fp32 logits [len(ids), V]; with a tree (parents, depths), a tree-masked forward."""
    ids = torch.tensor([ids])
    kwargs = {}
    if tree_parents is not None:
        past = cache.get_seq_length()
        kwargs = dict(attention_mask=tree_attention_mask(tree_parents, past, model.dtype),
                      position_ids=tree_position_ids(tree_depths, past))
    return model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs).logits[0].float()


def assert_same_kv(cache, other, length):
    assert cache.get_seq_length() == other.get_seq_length() == length
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        assert mine.keys.shape == theirs.keys.shape
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_appends_crops_and_tree_gathers_match_dynamic_cache_and_a_fresh_forward():
    model = tiny_llama(vocab=64)
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 64, (40,), generator=gen).tolist()
    # A tree over 6 nodes after the committed prefix: root 0, children 1 2, 1 → 3 4, 4 → 5.
    parents = torch.tensor([-1, 0, 0, 1, 1, 4])
    depths = torch.tensor([0, 1, 1, 2, 2, 3])
    with torch.inference_mode():
        ours, theirs = PreallocatedCache(config=model.config, capacity=8), DynamicCache(config=model.config)
        committed: list[int] = []

        def step(ids, **tree):
            a, b = forward(model, ours, ids, **tree), forward(model, theirs, ids, **tree)
            assert torch.allclose(a, b, atol=1e-6, rtol=0)
            return a

        step(seq[:7]); committed += seq[:7]                      # prefill, then past the capacity hint
        assert_same_kv(ours, theirs, 7)
        step(seq[7:12])                                            # a round of 5 ...
        for c in (ours, theirs):
            crop_cache(c, 9)                                       # ... of which 2 are kept
        committed += seq[7:9]
        assert_same_kv(ours, theirs, 9)
        step(seq[9:13]); committed += seq[9:13]
        for c in (ours, theirs):
            c.crop(-1)                                             # a raw negative crop, as DynamicCache.crop takes
        committed.pop()
        assert_same_kv(ours, theirs, 12)
        tree_tokens = seq[20:26]
        logits = step(tree_tokens, tree_parents=parents, tree_depths=depths)
        assert ours.get_seq_length() == 18
        for c in (ours, theirs):
            gather_cache(c, 12, [0, 1, 4, 5])                      # the accepted root path 0 → 1 → 4 → 5
        committed += [tree_tokens[i] for i in (0, 1, 4, 5)]
        assert_same_kv(ours, theirs, 16)
        fresh = model(torch.tensor([committed])).logits[0, -1].float()
        assert torch.allclose(logits[5], fresh, atol=1e-5)         # the tree's node 5 saw exactly this path
        last = step(seq[30:33]); committed += seq[30:33]           # appending after a gather
        assert_same_kv(ours, theirs, 19)
        full = model(torch.tensor([committed])).logits[0, -3:].float()
        assert torch.allclose(last, full, atol=1e-5)
        gather_cache(ours, 17, [0])                                # an identity path: only the crop
        assert ours.get_seq_length() == 18


def test_growth_past_capacity_keeps_the_entries():
    model = tiny_llama(vocab=64)
    seq = torch.randint(0, 64, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        for hint in (0, 4):
            cache = PreallocatedCache(config=model.config, capacity=hint)
            forward(model, cache, seq[:3])
            layer = cache.layers[0]
            assert layer.capacity == max(3, hint) and cache.get_seq_length() == 3
            forward(model, cache, seq[3:5])                        # 5 > capacity: doubles (or fits the need)
            assert layer.capacity == max(5, 2 * max(3, hint)) and cache.get_seq_length() == 5
            for i in range(5, 70):
                out = forward(model, cache, seq[i : i + 1])
                assert cache.get_seq_length() == i + 1
            assert layer.capacity >= 70 and layer.capacity < 2 * 70 + 1
            assert torch.allclose(out[-1], model(torch.tensor([seq])).logits[0, -1], atol=1e-5)


def test_crop_and_gather_move_lengths_not_buffers():
    model = tiny_llama(vocab=64)
    with torch.inference_mode():
        cache = PreallocatedCache(config=model.config, capacity=32)
        forward(model, cache, list(range(10)))
        layer = cache.layers[1]
        buffer = layer.keys.data_ptr()  # a view of the buffer, at its start
        crop_cache(cache, 6)
        gather_cache(cache, 3, [0, 2])
        forward(model, cache, [1, 2, 3])
        assert cache.get_seq_length() == 8 and layer.keys.data_ptr() == buffer, "the buffer must be reused in place"


def test_crop_keeps_dynamic_cache_semantics():
    model = tiny_llama(vocab=64)
    with torch.inference_mode():
        for cache in (PreallocatedCache(config=model.config), DynamicCache(config=model.config)):
            cache.crop(-3)                                         # an empty cache stays empty
            assert cache.get_seq_length() == 0
            forward(model, cache, list(range(6)))
            cache.crop(0)
            assert cache.get_seq_length() == 6
            with pytest.raises(ValueError):
                cache.crop(2)                                      # positive counts are not a length (transformers 5)
            cache.crop(-10)                                        # more than it holds: empty
            assert cache.get_seq_length() == 0
            forward(model, cache, [4, 5])
            assert cache.get_seq_length() == 2


def test_layers_created_lazily_without_a_config():
    model = tiny_llama(vocab=64)
    with torch.inference_mode():
        cache = PreallocatedCache()
        a = forward(model, cache, [1, 2, 3])
        b = forward(model, DynamicCache(), [1, 2, 3])
    assert len(cache.layers) == 2 and all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    assert torch.allclose(a, b, atol=1e-6)


def test_non_full_attention_configs_are_refused():
    config = MistralConfig(num_hidden_layers=2, sliding_window=16)  # every layer a sliding-window one
    with pytest.raises(ValueError, match="kv_cache='dynamic'"):
        PreallocatedCache(config=config)
    dynamic = make_cache(config, "dynamic")
    assert type(dynamic) is DynamicCache
    with pytest.raises(TypeError, match="full-attention"):
        gather_cache(dynamic, 0, [])  # a tree's path gather would be wrong on sliding-window layers
    with pytest.raises(ValueError):
        make_cache(config, "paged")


def test_engine_config_default_and_validation():
    assert EngineConfig().kv_cache == "preallocated"
    with pytest.raises(ValueError):
        EngineConfig(kv_cache="static")


def test_cost_curve_runs_on_either_cache():
    model = tiny_llama(vocab=64)
    for kind in ("preallocated", "dynamic"):
        curve = forward_cost_curve(model, ks=(1, 2), context=8, reps=4, kv_cache=kind)
        assert set(curve) == {1, 2} and all(v > 0 for v in curve.values())


# ---- the engines, either cache --------------------------------------------------------------------

def chain_engine(target, kv_cache):
    return SpeculativeEngine(target, CharTokenizer(), noisy_copy(target, noise=0.3),
                             EngineConfig(speculation="always", gamma=4, kv_cache=kv_cache))


def tree_engine(tree):
    def make(target, kv_cache):
        return TreeSpeculativeEngine(target, CharTokenizer(), noisy_copy(target, noise=0.5),
                                     EngineConfig(speculation="always", kv_cache=kv_cache), tree, cost_curve=FLAT)
    return make


def early_exit_engine(target, kv_cache):
    draft = DraftModel(build_self_draft(target, 3))  # target layers 0..1 shared, one adapter layer
    base = SpeculativeEngine(target, CharTokenizer(), None,
                             EngineConfig(speculation="always", gamma=4, kv_cache=kv_cache))
    return EarlyExitEngine.from_engine(base, 2, 0.0, draft)


ENGINES = {"chain": chain_engine, "tree-static": tree_engine(STATIC), "tree-dynamic": tree_engine(DYNAMIC),
           "early-exit": early_exit_engine}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(ENGINES))
def test_greedy_output_is_the_same_with_either_cache(kind, dtype):
    target = tiny_llama(vocab=64, layers=4 if kind == "early-exit" else 2, sharpness=3.0).to(dtype)
    outputs, accepted = {}, 0
    for kv_cache in ("preallocated", "dynamic"):
        engine = ENGINES[kind](target, kv_cache)
        if engine.draft is not None:
            engine.draft.to(dtype)
        outs = [engine.generate(p, SamplingParams(max_tokens=20)) for p in random_prompts(3, 64, seed=5) + [[7]]]
        outputs[kv_cache] = [o.output_ids for o in outs]
        accepted += sum(o.stats.accepted for o in outs)
    assert outputs["preallocated"] == outputs["dynamic"]
    assert accepted > 0, "the draft must be accepted sometimes, so crops and gathers of accepted rows happen"
    if dtype == torch.float32:
        prompt = random_prompts(3, 64, seed=5)[0]
        assert outputs["preallocated"][0] == hf_greedy(target, prompt, 20)
