"""ModelConfig.compile: the target's forward through torch.compile stays lossless in every round shape."""

import pytest
from support.tiny import CharTokenizer, hf_greedy, tiny_pair

from osd.config import EngineConfig, SamplingParams, SuffixConfig, TreeConfig
from osd.decoding.engine import SpeculativeEngine
from osd.decoding.tree_engine import TreeSpeculativeEngine
from osd.models.loading import compile_forward


@pytest.mark.timeout(600)  # inductor compiles prefill, decode, verification and a tree's masked forward: ~1 min
def test_a_compiled_target_decodes_exactly_as_the_eager_one():
    target, draft = tiny_pair(vocab=64, sharpness=3.0)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [9, 8, 7, 9, 8]]
    expected = [hf_greedy(target, p, 24) for p in prompts]  # eager, before compiling
    eager_forward = target.forward
    compile_forward(target)
    assert target.forward is not eager_forward
    chain = SpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(speculation="always"))
    tree = TreeSpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(suffix=SuffixConfig()), TreeConfig(),
                                 {1: 1.0, 64: 1.0})
    for prompt, want in zip(prompts, expected):  # the second prompt is another length: no per-size recompile needed
        assert chain.generate(prompt, SamplingParams(max_tokens=24)).output_ids == want
        assert tree.generate(prompt, SamplingParams(max_tokens=24)).output_ids == want
