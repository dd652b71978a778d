"""A real (tokenizers-backed) character-level tokenizer for the tiny models, with a chat template.

tests/tiny.py's CharTokenizer only decodes; serving also encodes text and applies chat
templates, so it needs a real PreTrainedTokenizerFast. One token per character keeps
the vocabulary as small as the tiny models' (64).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

EOS = "<eos>"
UNK = "<unk>"
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \n.,:?!'-()0123456789"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def char_tokenizer(vocab_size: int = 64, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Ids 0 = <eos>, 1 = <unk>, then one id per character of CHARS, up to ``vocab_size``."""
    vocab = {EOS: 0, UNK: 1}
    for c in CHARS[: vocab_size - 2]:
        vocab[c] = len(vocab)
    # BPE without merges splits text into characters; Fuse joins them back without spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token=UNK, chat_template=chat_template)
