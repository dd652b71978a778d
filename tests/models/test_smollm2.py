"""Integration on the packaged SmolLM2-135M target and its default self-draft."""

import copy

import pytest
import torch

from osd.config import EngineConfig, SamplingParams
from osd.data.workloads import chat_prompt_ids, load_questions, spread_across_categories
from osd.decoding.engine import SpeculativeEngine
from osd.models.drafts import DraftModel, build_draft
from osd.models.loading import ModelLoadError, load_causal_lm, transpose_linear_weights

pytestmark = pytest.mark.smollm2


def test_self_draft_is_an_independent_copy_of_the_first_layers(smollm2):
    target, _, draft = smollm2
    assert draft.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 30
    t, d = target.state_dict(), draft.model.state_dict()
    assert torch.equal(t["model.layers.1.mlp.up_proj.weight"], d["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(t["model.norm.weight"], d["model.norm.weight"])
    assert d["model.layers.0.self_attn.q_proj.weight"].data_ptr() != t["model.layers.0.self_attn.q_proj.weight"].data_ptr()


def test_greedy_equals_target_on_spec_bench(smollm2, all_threads):
    target, tokenizer, draft = smollm2
    engine = SpeculativeEngine(target, tokenizer, draft, EngineConfig(speculation="always", gamma=4))
    for q in spread_across_categories(load_questions(), 3):
        prompt = chat_prompt_ids(tokenizer, q["turns"][0])
        out = engine.generate(prompt, SamplingParams(max_tokens=64))
        ids = torch.tensor([prompt])
        ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
        assert out.output_ids == ref[0, len(prompt):].tolist(), q["category"]
        assert out.stats.alpha_hat is not None and out.record.num_positions == len(out.output_ids)


def test_shortlist_head_stays_lossless(smollm2, all_threads):
    target, tokenizer, draft = smollm2
    prompt = chat_prompt_ids(tokenizer, "Name three primary colors.")
    ids = torch.tensor([prompt])
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)[0, len(prompt):]
    shortlist = torch.cat([torch.arange(0, 4096), ref])  # most frequent ids first in this BPE vocab
    short = DraftModel(draft.model, shortlist)
    logits = short(torch.tensor([prompt]))
    outside = torch.ones(logits.shape[-1], dtype=torch.bool)
    outside[short.shortlist] = False
    assert torch.isinf(logits[..., outside]).all() and torch.isfinite(logits[..., ~outside]).all()
    out = SpeculativeEngine(target, tokenizer, short, EngineConfig(speculation="always", gamma=3)).generate(prompt, SamplingParams(max_tokens=24))
    assert out.output_ids == ref.tolist()


def test_mismatched_vocabulary_is_refused(smollm2, tmp_path):
    target, _, _ = smollm2
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="vocabulary"):
        build_draft(target, str(tmp_path))


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(str(tmp_path))


def test_transposed_weight_layout_keeps_values_and_ties(smollm2):
    served, _, draft = smollm2
    # Which layout build_engine keeps is measured at load (either can win on a given machine): test the
    # transposed one on a copy.
    target = copy.deepcopy(served)
    if target.lm_head.weight.is_contiguous():
        transpose_linear_weights(target)
    assert target.lm_head.weight.stride() == (1, target.config.vocab_size)
    assert target.lm_head.weight is target.model.embed_tokens.weight, "tied embeddings must stay tied"
    assert draft.model.lm_head.weight.is_contiguous(), "the trainable draft keeps the standard layout"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    contiguous = {k: v.contiguous() for k, v in target.state_dict().items()}
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(target.config).eval()
    plain.load_state_dict(contiguous, strict=False)
    plain.tie_weights()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, target(ids).logits, rtol=1e-4, atol=2e-3)


def test_self_draft_from_early_and_late_layers(smollm2):
    target, _, _ = smollm2
    draft = build_draft(target, "self", [0, 1, 28, 29])
    t, d = target.state_dict(), draft.model.state_dict()
    assert draft.config.num_hidden_layers == 4
    assert torch.equal(d["model.layers.2.mlp.down_proj.weight"], t["model.layers.28.mlp.down_proj.weight"])
    assert torch.equal(d["model.layers.3.self_attn.o_proj.weight"], t["model.layers.29.self_attn.o_proj.weight"])
    with pytest.raises(ValueError, match="draft layers"):
        build_draft(target, "self", [0, 30])


def test_concurrent_first_use_converts_once(tmp_path):
    """A replica and the trainer starting together must not trip over one conversion."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OSD_CACHE_DIR": str(tmp_path)}
    code = "from osd.models.loading import resolve_model_path; print(resolve_model_path('smollm2'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert results[0][0].strip() == results[1][0].strip() == str(tmp_path / "smollm2-135m-instruct")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]
