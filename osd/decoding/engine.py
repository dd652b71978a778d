"""The speculative engine: draft γ, verify in one target forward, accept losslessly.

Invariants between rounds (asserted): the target cache holds every committed token
but the last ("pending"), which opens the next verification forward
``[pending, d1..dγ]``; the draft cache holds at most as many. A round with γ = 0 is
plain decoding, so the engine without a draft is the honest baseline.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from osd.config import EngineConfig, ModelConfig, SamplingParams
from osd.data.records import DraftRound, TrainingRecord
from osd.decoding.drafting import Drafter, Proposal, crop_cache
from osd.decoding.eagle import EagleDrafter, EagleHead, FeatureCapture
from osd.decoding.governor import SpeculationGovernor
from osd.decoding.kv_cache import make_cache
from osd.decoding.logprobs import LogprobRows, TokenLogprobs
from osd.decoding.sampling import warp_probs
from osd.decoding.stopping import make_length_policy
from osd.decoding.suffix import TrafficIndex
from osd.decoding.verification import Verdict, overlap, verify_greedy, verify_sampled
from osd.models.drafts import DraftModel, build_draft, load_shortlist
from osd.models.loading import load_target, load_tokenizer

LIVE_DRAFT = object()  # generate()'s default: whatever draft the engine holds when the request starts


class RequestError(ValueError):
    """The request cannot be served as given; the message says what to change."""


@dataclass
class SpecStats:
    rounds: int = 0  # speculative rounds (rounds with at least one proposal)
    proposed: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    target_forwards: int = 0  # decode forwards, prefill excluded
    beta_sum: float = 0.0  # Σ over verified positions of Σ_x min(p, q)
    beta_count: int = 0
    accepted_suffix: int = 0  # of accepted, tokens a suffix chain proposed (batched rounds; not in β)
    prompt_tokens: int = 0
    output_tokens: int = 0
    elapsed_s: float = 0.0  # wall time, less analysis_s
    prefill_s: float = 0.0  # of which the prompt's prefill forward (the same work with or without speculation)
    analysis_s: float = 0.0  # analysis-only work serving would not do (e.g. a tree's α*)

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / rounds (vLLM's convention: the bonus token counts)."""
        return 1.0 + self.accepted / self.rounds if self.rounds else 1.0

    @property
    def alpha_hat(self) -> float | None:
        """Mean β over verified positions: the OSD paper's α. None without a draft."""
        return self.beta_sum / self.beta_count if self.beta_count else None

    def accepted_by_source(self) -> dict[str, int]:
        """Accepted tokens by who proposed them: a chain is the draft's, or a suffix chain (the batch engine's);
        TreeStats splits a fused tree's."""
        return {"draft": self.accepted - self.accepted_suffix, "suffix": self.accepted_suffix, "both": 0}

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
            "accepted_per_position": list(self.accepted_per_position),
            "target_forwards": self.target_forwards,
            "mean_acceptance_length": self.mean_acceptance_length, "alpha_hat": self.alpha_hat,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "elapsed_s": self.elapsed_s, "prefill_s": self.prefill_s, "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class Generation:
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: SpecStats
    record: TrainingRecord | None
    logprobs: TokenLogprobs | None = None  # of output_ids, when generate() was asked for them
    prompt_logprobs: TokenLogprobs | None = None  # of the prompt's tokens (the first has none)


class Teacher:
    """Collects the sparse teacher rows for the training record, straight from verification; with
    ``logprobs`` (top N) also the API's per-token log-probs, from the same log-sum-exp and top-k."""

    def __init__(self, top_k: int, logprobs: int | None = None):
        self.top_k = top_k
        self.ids: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []
        self.lse: list[torch.Tensor] = []
        self.api = LogprobRows(logprobs) if logprobs is not None else None

    def add(self, logits: torch.Tensor, tokens: list[int] | None = None) -> None:
        """logits: [n, V] raw target logits at committed contexts; tokens: [n] the token committed at each
        (needed only for the API's log-probs)."""
        lse = logits.logsumexp(-1)
        top = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1)
        self.ids.append(top.indices.to(torch.int32).cpu())
        self.logprobs.append((top.values - lse[:, None]).to(torch.float16).cpu())
        self.lse.append(lse.float().cpu())
        if self.api is not None:
            self.api.add(logits, tokens, lse, top)

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.ids)[:n], torch.cat(self.logprobs)[:n], torch.cat(self.lse)[:n]


class SpeculativeEngine:
    """One request at a time. Holds the target and (optionally) a draft; both read-only here."""

    def __init__(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 draft: DraftModel | None = None, config: EngineConfig | None = None):
        self.target = target
        self.tokenizer = tokenizer
        self.draft = draft
        self.config = config or EngineConfig()
        self.device = next(target.parameters()).device
        self.context_window = int(getattr(target.config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(target, tokenizer)
        self._governors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # draft → SpeculationGovernor
        # Recent traffic per cluster, for suffix speculation (the tree engine drafts from it).
        self.traffic = TrafficIndex(self.config.suffix) if self.config.suffix is not None else None
        self._captures: dict[tuple[int, ...], FeatureCapture] = {}  # eagle heads' target-feature hooks
        self._feature_credit = 1.0  # the first eagle-drafted request records its features

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty: send at least one token of text")
        if len(prompt_ids) + params.max_tokens > self.context_window:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context window of {self.context_window} tokens; shorten the prompt or lower max_tokens"
            )

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams, draft_version: int = 0,
                 cluster: str = "global", on_tokens: Callable[[list[int]], None] | None = None,
                 draft: DraftModel | None | object = LIVE_DRAFT, request_id: str | None = None,
                 logprobs: int | None = None, prompt_logprobs: bool = False) -> Generation:
        """Decode one request. `on_tokens` (for streaming) gets each round's newly committed ids.

        `draft` overrides the engine's live draft for this request (None: no draft), so a
        caller that swaps drafts can hand over the draft and its version as one pair.
        `request_id` names the training record (a fresh one if None).

        Streamed ids may run past the final output by up to one round: the returned
        Generation is cut at EOS, a stop string or max_tokens, and is the truth.

        `logprobs` (top N, osd.decoding.logprobs) fills ``Generation.logprobs`` from the verification
        forwards, and with `prompt_logprobs` ``Generation.prompt_logprobs`` from the prefill (which then
        keeps every row's logits, not just the last): no extra forward either way.
        """
        self.validate(prompt_ids, params)
        # Read once: a concurrent swap never changes a running request's draft.
        draft = self.draft if draft is LIVE_DRAFT else draft
        start = time.perf_counter()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ())))
        stats = self._new_stats(len(prompt_ids))
        teacher = Teacher(self.config.teacher_top_k, logprobs)
        prompt_rows = LogprobRows(logprobs or 0) if prompt_logprobs else None
        rounds: list[DraftRound] = []
        tokens = list(prompt_ids)
        # Room for the whole request plus one round's speculative rows, so the cache never has to grow.
        cache = make_cache(self.target.config, self.config.kv_cache,
                           len(prompt_ids) + params.max_tokens + self._round_rows())
        drafter = self._make_drafter(draft, cache, prompt_ids, cluster) if self._uses_drafter(draft) else None
        prefill_start = time.perf_counter()
        if len(tokens) > 1:
            logits = self._target_forward(tokens[:-1], cache, keep=len(tokens) - 1 if prompt_rows is not None else 1)
            if prompt_rows is not None:  # row i scores prompt token i + 1
                prompt_rows.add(logits, tokens[1:])
            if drafter is not None:
                drafter.target_rows(len(tokens) - 1)
        stats.prefill_s = time.perf_counter() - prefill_start
        finish = None
        while finish is None:
            out_len = len(tokens) - len(prompt_ids)
            new_tokens, draft_round = self._round(tokens, out_len, cache, drafter, params, generator, teacher, stats)
            if draft_round is not None:
                rounds.append(draft_round)
            tokens.extend(new_tokens)
            if on_tokens is not None:
                on_tokens(new_tokens)
            crop_cache(cache, len(tokens) - 1)
            assert cache.get_seq_length() == len(tokens) - 1, "target cache out of step with committed tokens"
            finish = self._finish_reason(tokens, len(prompt_ids), params)
        output_ids, text, finish = self._finalize(tokens[len(prompt_ids):], params)
        stats.output_tokens = len(output_ids)
        stats.elapsed_s = time.perf_counter() - start - stats.analysis_s
        record = None
        if self.config.record:
            ids, logprobs, lse = teacher.rows(len(output_ids))
            record = TrainingRecord(list(prompt_ids), output_ids, ids, logprobs, lse,
                                    [r for r in rounds if r.start < len(output_ids)],
                                    cluster=cluster, draft_version=draft_version)
            if request_id is not None:
                record.request_id = request_id
            if getattr(drafter, "kept", None) is not None:  # an eagle drafter (chain or tree) keeping features
                self._attach_features(record, drafter)
        if self.traffic is not None and self.config.suffix.traffic:
            # This replica learns from its own request at once; the buffer brings it the others' (same request id).
            self.traffic.add(prompt_ids, output_ids, cluster, record.request_id if record is not None else request_id)
        return Generation(output_ids, text, finish, stats, record,
                          teacher.api.result(len(output_ids)) if teacher.api is not None else None,
                          TokenLogprobs.unconditioned(prompt_ids[0]) + prompt_rows.result()
                          if prompt_rows is not None else None)

    @torch.inference_mode()
    def score(self, prompt_ids: list[int], logprobs: int | None = None) -> Generation:
        """A prompt alone, nothing generated (the API's ``max_tokens`` 0 with ``echo``): with `logprobs`
        (top N), the prompt's log-probs from one prefill forward over it; without, no forward at all."""
        if not prompt_ids:
            raise RequestError("the prompt is empty: send at least one token of text")
        if len(prompt_ids) > self.context_window:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) exceeds the model's context window of "
                               f"{self.context_window} tokens; shorten the prompt")
        start = time.perf_counter()
        stats = self._new_stats(len(prompt_ids))
        prompt = None
        if logprobs is not None:
            rows = LogprobRows(logprobs)
            if len(prompt_ids) > 1:  # the last token's row would score a token that is not there
                cache = make_cache(self.target.config, self.config.kv_cache, len(prompt_ids))
                rows.add(self._target_forward(prompt_ids[:-1], cache, keep=len(prompt_ids) - 1), prompt_ids[1:])
            prompt = TokenLogprobs.unconditioned(prompt_ids[0]) + rows.result()
        stats.elapsed_s = stats.prefill_s = time.perf_counter() - start
        return Generation([], "", "length", stats, None, TokenLogprobs.empty() if logprobs is not None else None,
                          prompt)

    def _new_stats(self, prompt_tokens: int) -> SpecStats:
        return SpecStats(accepted_per_position=[0] * self.config.round_cap, prompt_tokens=prompt_tokens)

    def _round(self, tokens: list[int], out_len: int, cache: DynamicCache, drafter: Drafter | None,
               params: SamplingParams, generator: torch.Generator, teacher: Teacher,
               stats: SpecStats) -> tuple[list[int], DraftRound | None]:
        """One round after ``out_len`` output tokens: draft, one target forward, accept. Returns the newly
        committed tokens and what the draft proposed (None without a draft)."""
        room = params.max_tokens - out_len - 1  # draft tokens that can still be used
        cap = min(self.config.round_cap, room) if drafter else 0
        governor = self.governor(drafter.draft) if drafter is not None and self.config.speculation == "auto" else None
        if governor is not None and cap > 0:
            cap = governor.cap(cap)
        catch_up = len(tokens) - drafter.cached if drafter is not None else 0
        start = time.perf_counter()
        proposal = drafter.propose(tokens, cap, params, generator) if cap > 0 else None
        drafted = time.perf_counter()
        new_tokens, verdict = self._verify_round(tokens, cache, proposal, params, generator, teacher, stats)
        if drafter is not None:
            drafter.target_rows(verdict.num_accepted + 1)  # the positions whose context is now committed
        if governor is not None:
            # Draft time counts only when the draft fed ≤ 2 tokens first (steady state), not after a catch-up.
            governor.observe(len(proposal.tokens) if proposal is not None else 0, verdict.num_accepted,
                             verify_s=time.perf_counter() - drafted, draft_s=drafted - start if catch_up <= 2 else None)
        if proposal is None:
            return new_tokens, None
        drafter.observe(len(proposal.tokens), verdict.num_accepted)
        drafter.rollback(len(tokens) + len(new_tokens))
        return new_tokens, DraftRound(out_len, proposal.tokens.tolist(), verdict.num_accepted)

    def warm_up(self, max_tokens: int = 8) -> float:
        """One short throwaway request through every forward shape a request uses (prefill, plain and
        speculative rounds), so the first user request does not pay one-off kernel and allocator setup.
        Its timings are not shown to the governor (cold numbers would mislead it). Returns seconds."""
        start = time.perf_counter()
        vocab = int(self.target.config.vocab_size)
        prompt = [(7 * i + 3) % vocab for i in range(16)]
        saved, self.config = self.config, self.config.model_copy(update={"speculation": "always", "record": False})
        traffic = self.traffic
        if traffic is not None:  # a throwaway index: the warm-up prompt is not traffic
            self.traffic = TrafficIndex(traffic.config)
        try:
            self.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
            if self.draft is not None:  # plain decoding's single-token forward too
                self.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0), draft=None)
        finally:
            self.config, self.traffic = saved, traffic
        return time.perf_counter() - start

    def governor(self, draft: DraftModel) -> SpeculationGovernor | None:
        """The speculation governor of ``draft`` (one per draft object, so a swapped-in draft starts
        fresh), or None when ``speculation`` is 'always'."""
        if self.config.speculation != "auto":
            return None
        if draft not in self._governors:
            self._governors[draft] = SpeculationGovernor()
        return self._governors[draft]

    def _uses_drafter(self, draft: DraftModel | None) -> bool:
        """Does a request with this draft draft at all? (The tree engine also drafts from suffix indexes.)"""
        return draft is not None

    def _make_drafter(self, draft: DraftModel, cache: DynamicCache, prompt_ids: list[int], cluster: str) -> Drafter:
        """One request's drafter. cache: the request's target cache (empty yet), for drafters that share it."""
        c = self.config
        policy = make_length_policy(c.length_policy, c.gamma,
                                    c.confidence_threshold if c.length_policy == "confidence" else c.head_threshold,
                                    getattr(draft, "acceptance_head", None))
        if isinstance(draft, EagleHead):
            return EagleDrafter(draft, self._feature_capture(draft.feature_layers), policy, c.kv_cache,
                                keep_features=self._sample_features())
        return Drafter(draft, policy, c.kv_cache)

    def _sample_features(self) -> bool:
        """Whether this eagle-drafted request's record carries the target's features: every
        1/record_features-th request, deterministically (as the distiller picks its held-out share)."""
        if not self.config.record or self.config.record_features == 0:
            return False
        take = self._feature_credit >= 1.0 - 1e-9
        self._feature_credit += self.config.record_features - take
        return take

    def _attach_features(self, record: TrainingRecord, drafter) -> None:
        """The target's features at positions feature_start .. P+T-2 of the record (the last
        ``feature_context`` prompt positions and every output position but the last)."""
        prompt_len = len(record.prompt_ids)
        end = prompt_len + record.num_positions - 1
        start = max(0, prompt_len - 1 - self.config.feature_context)
        if end > start:
            record.target_features, record.feature_start = drafter.features(start, end), start

    def _feature_capture(self, layers: list[int]) -> FeatureCapture:
        """Hooks keeping the target's outputs at ``layers`` (one set per layer choice, registered once)."""
        key = tuple(layers)
        if key not in self._captures:
            self._captures[key] = FeatureCapture(self.target, layers)
        return self._captures[key]

    def _round_rows(self) -> int:
        """The most rows one verification forward appends to the target cache: pending + a round's drafts."""
        return self.config.round_cap + 1

    def _target_forward(self, ids: list[int], cache: DynamicCache, keep: int) -> torch.Tensor:
        """ids: the new tokens → logits [keep, V] (fp32) for the last `keep` of them."""
        out = self.target(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache,
                          use_cache=True, logits_to_keep=keep)
        return out.logits[0].float()

    def _verify_round(self, tokens: list[int], cache: DynamicCache, proposal: Proposal | None,
                      params: SamplingParams, generator: torch.Generator, teacher: Teacher,
                      stats: SpecStats) -> tuple[list[int], Verdict]:
        drafted = proposal.tokens if proposal is not None else torch.empty(0, dtype=torch.long, device=self.device)
        gamma = drafted.shape[0]
        logits = self._target_forward([tokens[-1], *drafted.tolist()], cache, keep=gamma + 1)  # [γ+1, V]
        stats.target_forwards += 1
        if params.greedy:
            verdict = verify_greedy(drafted, logits.argmax(-1))
            target_probs = logits[:gamma].softmax(-1)  # temperature-1 p, for α̂ only
        else:
            target_probs = warp_probs(logits, params)
            uniforms = torch.rand(gamma, generator=generator, device=self.device)
            verdict = verify_sampled(drafted, proposal.probs if gamma else target_probs[:0], target_probs,
                                     uniforms, generator)
        n = verdict.num_accepted
        new_tokens = [*drafted[:n].tolist(), verdict.next_token]  # row i of logits chose new_tokens[i]
        teacher.add(logits[: n + 1], new_tokens)
        if gamma:
            stats.rounds += 1
            stats.proposed += gamma
            stats.accepted += n
            for i in range(n):
                stats.accepted_per_position[i] += 1
            verified = min(n + 1, gamma)  # positions whose context is committed
            stats.beta_sum += float(overlap(target_probs[:verified], proposal.probs[:verified]).sum())
            stats.beta_count += verified
        return new_tokens, verdict

    def _finish_reason(self, tokens: list[int], prompt_len: int, params: SamplingParams) -> str | None:
        output = tokens[prompt_len:]
        if any(t in self.eos_ids for t in output):
            return "stop"
        if params.stop and any(s in self.tokenizer.decode(output, skip_special_tokens=True) for s in params.stop):
            return "stop"
        if len(output) >= params.max_tokens:
            return "length"
        return None

    def _finalize(self, output: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        """Cut the output at the first EOS, stop string or max_tokens, whichever comes first."""
        for i, t in enumerate(output):
            if t in self.eos_ids:
                output = output[: i + 1]
                break
        output = output[: params.max_tokens]
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        if params.stop:
            cut = min((text.find(s) for s in params.stop if s in text), default=-1)
            if cut >= 0:
                # Keep the shortest token prefix whose text contains the stop string.
                n = next(i for i in range(1, len(output) + 1)
                         if any(s in self.tokenizer.decode(output[:i], skip_special_tokens=True) for s in params.stop))
                return output[:n], text[:cut], "stop"
        if output and output[-1] in self.eos_ids:
            return output, text, "stop"
        return output, text, "length"  # the loop ends only on EOS, a stop string or max_tokens


def _eos_ids(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def build_engine(models: ModelConfig | None = None, engine: EngineConfig | None = None) -> SpeculativeEngine:
    """Load the configured target and draft and wrap them in an engine."""
    models = models or ModelConfig()
    if models.torch_threads:
        torch.set_num_threads(models.torch_threads)
    target = load_target(models)  # dtype "auto" resolved, [in, out] layout for fp32 on CPU, the choice logged
    tokenizer = load_tokenizer(models.target)
    draft = None
    if models.draft != "none":
        shortlist = load_shortlist(models.shortlist) if models.shortlist else None
        draft = build_draft(target, models.draft, models.draft_layers, shortlist, models.eagle_layers)
    chain = SpeculativeEngine(target, tokenizer, draft, engine)
    if chain.config.max_batch > 1 or (chain.config.tree is None and chain.config.suffix is None):
        return chain  # a batch drafts chains, suffix ones included (osd/decoding/batch_engine.py)
    from osd.decoding.tree_engine import TreeSpeculativeEngine  # it builds on this module

    return TreeSpeculativeEngine.from_engine(chain, chain.config.tree)  # measures the cost curve if it needs it
