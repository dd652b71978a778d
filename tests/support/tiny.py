"""Tiny random models for fast engine tests (a real LlamaForCausalLM, just small)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from osd.models.drafts import DraftModel


class CharTokenizer:
    """Token i decodes to chr(ord('a') + i): enough for stop strings on tiny vocabularies.

    A stand-in only because no real tokenizer has a 16-token vocabulary.
    """

    def __init__(self, eos_token_id: int | None = None):
        self.eos_token_id = eos_token_id

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + int(i)) for i in ids
                       if not (skip_special_tokens and int(i) == self.eos_token_id))


def tiny_llama(vocab: int = 64, layers: int = 2, seed: int = 0, sharpness: float = 1.0,
               eos_token_id: int | None = None) -> LlamaForCausalLM:
    """A random 2-layer Llama; `sharpness` scales the LM head so distributions are peakier."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    model.generation_config.eos_token_id = eos_token_id
    return model


def tiny_pair(vocab: int = 64, sharpness: float = 1.0, eos_token_id: int | None = None):
    target = tiny_llama(vocab, 2, seed=0, sharpness=sharpness, eos_token_id=eos_token_id)
    draft = DraftModel(tiny_llama(vocab, 1, seed=1, sharpness=sharpness, eos_token_id=eos_token_id))
    return target, draft


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The target's plain greedy output through HF generate (no EOS stop)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def noisy_copy(model: LlamaForCausalLM, noise: float, seed: int = 7) -> DraftModel:
    """A draft that agrees with the target often but not always: the target plus LM-head noise."""
    import copy

    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = draft.lm_head.weight
        w.add_(noise * w.std() * torch.randn(w.shape, generator=gen))
    return DraftModel(draft)


def tiny_engine(noise: float = 0.3, gamma: int = 4):
    """A SpeculativeEngine over a 64-token tiny target, a noisy-copy draft and the char tokenizer:
    the stand-in model behind the HTTP-level tests."""
    from support.tiny_tokenizer import char_tokenizer

    from osd.config import EngineConfig
    from osd.decoding.engine import SpeculativeEngine

    target = tiny_llama(vocab=64, sharpness=3.0)
    return SpeculativeEngine(target, char_tokenizer(64), noisy_copy(target, noise=noise), EngineConfig(speculation="always", gamma=gamma))


def random_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n random prompts of 1-11 token ids below ``vocab``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 12, (), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]
