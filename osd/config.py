"""Typed configuration. Every field validates its range and says what it is for."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Temperatures below this decode greedily, as vLLM's _SAMPLING_EPS: logits / 1e-300 is inf, and the
# distribution at such a temperature is the argmax's anyway.
GREEDY_BELOW = 1e-5


class SamplingParams(_Strict):
    """How one request is decoded. The same warp applies to target (p) and draft (q)."""

    max_tokens: int = Field(64, ge=1, description="Maximum number of new tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=2.0,
                               description="Sampling temperature; 0 (or anything below 1e-5) means greedy.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 disables.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass in (0, 1]; 1 disables.")
    stop: list[str] = Field(default_factory=list, max_length=8, description="Strings that end generation when produced.")
    seed: int | None = Field(None, description="Seed for this request's sampling; None draws a fresh one.")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class ModelConfig(_Strict):
    """Which models to load, and where they run."""

    target: str = Field("smollm2", description="Target model: 'smollm2' (packaged), an HF model dir, or a hub id.")
    draft: str = Field("self", description="Draft: 'self' (the target's first layers), 'eagle' (a one-layer head over the "
                                           "target's hidden states, osd/decoding/eagle.py), 'none', or an HF model dir/hub id.")
    eagle_layers: list[int] | None = Field(
        None, description="Target layers whose outputs feed the eagle head; None = EAGLE-3's low, middle and high "
                          "(after layers 1, L/2-1 and L-4).")
    draft_layers: int | list[int] = Field(
        2, description="Self-draft layers: a count (the target's first N) or target layer indices, e.g. [0, 1, 28, 29].")

    @field_validator("draft_layers")
    @classmethod
    def _layers(cls, v: int | list[int]) -> int | list[int]:
        if (isinstance(v, int) and v < 1) or (isinstance(v, list) and (not v or min(v) < 0)):
            raise ValueError("draft_layers must be a positive count or a non-empty list of layer indices")
        return v
    shortlist: str | None = Field(None, description="JSON file of token ids for the draft's shortlist LM head; None = full head.")
    device: str = Field("cpu", description="Torch device for both models, e.g. 'cpu' or 'cuda:0'.")
    dtype: str = Field("auto", description="Weights dtype of target and draft: auto, float32, bfloat16 or float16. "
                                           "auto = bfloat16 on CUDA with bf16 and on CPUs with AVX512-BF16/AMX-BF16, else float32.")
    transpose_weights: bool | None = Field(
        None, description="Lay target Linear weights out [in, out] (MKL's fp32 kernel for 3-16 rows depends on it); "
                          "None = measure both layouts at load for float32 on CPU and keep the faster (T(1)+T(8)), "
                          "standard elsewhere.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 leaves torch's default.")
    compile: bool = Field(
        False, description="torch.compile (inductor, dynamic shapes) the target's forward: measured 1.2x faster per "
                           "forward in bf16 on 2 CPU threads, but compiling took ~4.5 min there (paid at start by the "
                           "warm-up), so off by default (bench/compile_trial.py).")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("dtype must be auto, float32, bfloat16 or float16")
        return v


class TreeConfig(_Strict):
    """Tree shape and size. Static trees fix the branching; dynamic trees grow by score under a budget."""

    shape: Literal["static", "dynamic"] = Field("dynamic", description="'static' (fixed branching) or 'dynamic' (grown by path probability).")
    branching: list[int] = Field(default_factory=lambda: [4, 2, 2, 1],
                                 description="Static: children of every node at each depth, root first.")
    top_k: int = Field(4, ge=1, le=16, description="Dynamic: nodes expanded per depth, and children kept per expanded node.")
    max_depth: int = Field(6, ge=1, le=16, description="Dynamic: deepest level drafted.")
    max_nodes: int = Field(32, ge=1, le=255, description="Dynamic: most nodes (root excluded) a tree may keep.")
    budget: int | None = Field(None, ge=0, le=255, description="Dynamic: fixed node budget; None = chosen each round from the cost curve.")
    sampled_children: Literal["draw", "top"] = Field(
        "draw", description="Under sampling: children drawn from q without replacement, or q's top tokens (point masses).")
    alpha_star: bool = Field(False, description="Log the multi-draft bound α* at every verified node (analysis; costs time).")

    @field_validator("branching")
    @classmethod
    def _branching(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError("branching must be a non-empty list of positive child counts, e.g. [4, 2, 2, 1]")
        size, level = 0, 1
        for b in v:
            level *= b
            size += level
        if size > 255:
            raise ValueError(f"branching {v} makes a {size}-node tree; keep it within 255 nodes")
        return v


class SuffixConfig(_Strict):
    """Suffix speculation (osd/decoding/suffix.py): propose continuations seen in the request and in recent traffic."""

    max_ngram: int = Field(4, ge=1, le=16, description="Longest context suffix (in tokens) looked up in an index.")
    max_depth: int = Field(8, ge=1, le=32, description="Longest continuation proposed from one match.")
    max_matches: int = Field(16, ge=1, le=256, description="Most recent occurrences of the matched suffix whose continuations form the candidate trie.")
    traffic: bool = Field(True, description="Also look up recent traffic of the request's cluster (else the request's own prompt and output only).")
    cluster_tokens: int = Field(65_536, ge=1, description="Traffic index bound per cluster: tokens kept (oldest requests evicted first).")
    cluster_requests: int = Field(1_024, ge=1, description="Traffic index bound per cluster: requests kept (a FIFO).")
    rebuild_records: int = Field(512, ge=0, description="Newest buffer records per cluster a replica folds in at start, so the index survives a restart.")
    poll_s: float = Field(1.0, gt=0.0, le=60.0, description="How often a replica reads other replicas' new records from the buffer into its index.")


class EngineConfig(_Strict):
    """Speculative decoding knobs."""

    gamma: int = Field(4, ge=1, le=32, description="Draft tokens proposed per round.")
    teacher_top_k: int = Field(64, ge=1, le=4096, description="Target log-probs kept per position in training records.")
    record: bool = Field(True, description="Build a training record for every request.")
    record_features: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of eagle-drafted requests whose record also carries the target's "
                                         "features (fp16, 3456 B per position on SmolLM2 vs 262 B of teacher rows); "
                                         "the eagle trainer learns only from those.")
    feature_context: int = Field(
        128, ge=1, le=1_000_000, description="Prompt positions before the output whose features a record keeps (bounds "
                                             "a long prompt's record; the head trains on that much context).")
    length_policy: Literal["fixed", "schedule", "confidence", "head"] = Field(
        "fixed", description="How many tokens a round drafts (osd/decoding/stopping.py): 'fixed' γ, HF's +2/-1 'schedule' "
                             "from γ, stop below a draft 'confidence', or SpecDec++'s acceptance 'head'.")
    max_gamma: int = Field(8, ge=1, le=64, description="Most tokens an adaptive length policy drafts in one round.")
    confidence_threshold: float = Field(
        0.3, gt=0.0, lt=1.0, description="'confidence': stop drafting once the draft's top-1 probability is below this.")
    head_threshold: float = Field(
        0.7, gt=0.0, lt=1.0, description="'head': stop once the predicted chance that some token of the round is "
                                         "rejected exceeds this.")
    speculation: Literal["auto", "always"] = Field(
        "auto", description="'auto': draft only while it pays on this machine (per-draft estimates of acceptance, "
                            "draft and verification time; plain decoding otherwise, with a probing round now and "
                            "then: osd/decoding/governor.py); 'always': draft every round (the fixed baseline).")
    tree: TreeConfig | None = Field(
        None, description="Draft a token tree per round instead of a chain (osd/decoding/tree_engine.py); None = a chain.")
    suffix: SuffixConfig | None = Field(
        None, description="Suffix speculation from the request and recent traffic, fused with the draft in one token tree "
                          "(osd/decoding/suffix.py; implies a tree round); None = off.")
    kv_cache: Literal["preallocated", "dynamic"] = Field(
        "preallocated", description="KV cache of target and draft: 'preallocated' writes in place and crops by a length "
                                    "(osd/decoding/kv_cache.py); 'dynamic' is transformers' DynamicCache (cat per forward).")
    max_batch: int = Field(
        1, ge=1, le=32, description="Requests a serving replica decodes together (continuous batching, "
                                    "osd/decoding/batch_engine.py; README). 1 = one request at a time; >1 drafts "
                                    "chains (tree null, length_policy 'fixed'; with suffix set, a request proposes "
                                    "its suffix chain where that beats the draft) and a draft model, not eagle.")

    @model_validator(mode="after")
    def _cap_covers_gamma(self) -> "EngineConfig":
        if (self.tree is not None or self.suffix is not None) and self.length_policy != "fixed":
            raise ValueError("a token tree sizes itself (TreeConfig; suffix speculation drafts a tree too); length_policy "
                             "applies to chains only, so keep it 'fixed' or drop tree and suffix")
        if self.max_batch > 1 and (self.tree is not None or self.length_policy != "fixed"):
            raise ValueError(f"max_batch={self.max_batch} (continuous batching) batches chains (the draft's or suffix "
                             "ones) of a fixed length: set tree to null and length_policy to 'fixed', or max_batch to 1")
        if self.length_policy != "fixed" and self.max_gamma < self.gamma:
            raise ValueError(f"max_gamma ({self.max_gamma}) must be >= gamma ({self.gamma}) for an adaptive "
                             "length_policy")
        return self

    @property
    def round_cap(self) -> int:
        """The most tokens one round may draft."""
        return self.gamma if self.length_policy == "fixed" else self.max_gamma
