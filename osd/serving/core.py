"""The serving core: OpenAI-style requests in, speculative generations out; no Ray, no HTTP.

A Ray Serve replica (actors/) holds one ``ServingCore`` and mounts ``osd.serving.http.build_app``.

Concurrency model (one replica):

- Generation is serialised: the engine holds one KV cache per request and is not
  thread-safe, so a lock admits one request at a time and the others wait in arrival
  order (roughly: Python locks are not strictly FIFO). Throughput scales with replicas;
  Serve's ``max_ongoing_requests`` bounds how many wait here, ``num_requests_waiting`` on
  /metrics shows the queue. With ``engine.max_batch`` > 1 up to that many requests share each
  round instead (continuous batching: osd/serving/batch_loop.py); the others queue in its loop.
- Drafts live as one ``LiveDraft(version, draft)`` pair per cluster. A request reads its
  pair once, when it gets the generation lock, and hands draft *and* version to
  ``engine.generate``, so a swap can never mix two versions' weights inside a request nor
  mislabel one. A swap builds and validates the new draft beside the live one, outside the
  generation lock, then replaces the pair under a tiny lock: it never waits for a request
  and no request waits for it; the next request uses the new draft.
- Query clusters (docs/clusters.md): a request's cluster is pinned by the client or chosen
  by the ``Router``; it is served by that cluster's draft when this replica holds one, else
  by global's (and the cluster is noted as wanted for the next registry sync). At most
  ``max_cluster_drafts`` cluster drafts are held, least recently used evicted first; in
  shared-base mode they are LoRA adapters on one base (``osd.models.adapters``).
- Training records go to a ``Recorder`` (background thread), never on the response path.
- With ``auto_rollback`` a ``SwapWatch`` compares each newly live version's served α̂ and tokens
  per forward with its predecessor's; on a clear drop a background thread marks it bad in the
  registry and rolls the live pointer back (osd/serving/swap_watch.py). Other replicas follow
  on their next sync; a version marked bad is never loaded.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from jinja2.exceptions import TemplateError

from osd.data.buffer import RecordBuffer
from osd.data.recorder import Recorder
from osd.decoding.batch_engine import BatchEngine
from osd.decoding.eagle import EagleHead
from osd.decoding.engine import Generation, RequestError, SpeculativeEngine
from osd.decoding.tree_engine import TreeSpeculativeEngine
from osd.models.adapters import SharedBaseDrafts
from osd.models.drafts import DraftModel, load_published_state, published_specs
from osd.registry import (
    CLUSTER_RE,
    BadDraftError,
    CorruptDraftError,
    DraftMismatchError,
    DraftRegistry,
    RegistryError,
    RollbackError,
    normalize_specs,
    spec_diff,
    tensor_specs,
)
from osd.router import Router
from osd.serving.api import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    OsdStats,
    ServingError,
    Usage,
    completion_logprobs,
    to_sampling_params,
)
from osd.serving.batch_loop import BatchLoop
from osd.serving.dashboard import DashboardStore, target_step_s
from osd.serving.engine_thread import EngineThread
from osd.serving.metrics import MetricsMirror, ServingMetrics
from osd.serving.streaming import Cancelled, PreparedRequest, SSEStream, usage_of
from osd.serving.swap_watch import AutoRollbackConfig, SwapWatch, Verdict

log = logging.getLogger(__name__)

__all__ = ["LiveDraft", "MetricsMirror", "ServingCore", "ServingError", "ServingMetrics", "SSEStream"]

DEFAULT_CLUSTER = "global"


@dataclass(frozen=True)
class LiveDraft:
    """What one cluster's requests run with; replaced whole, never mutated."""

    version: int  # 0 = the initial draft built from the target
    draft: DraftModel | None  # None: target-only decoding
    lineage: str = DEFAULT_CLUSTER  # whose versions these are: a cluster without its own draft runs global's


class ServingCore:
    """Target + live drafts behind OpenAI-style request handling; see the module docstring."""

    def __init__(self, engine: SpeculativeEngine, model_name: str = "osd", *, recorder: Recorder | None = None,
                 registry: DraftRegistry | None = None, draft_version: int = 0,
                 max_prompt_tokens: int | None = None, dashboard: DashboardStore | None = None,
                 buffer: RecordBuffer | None = None, metrics_mirror: MetricsMirror | None = None,
                 router: Router | None = None, max_cluster_drafts: int = 8,
                 shared: SharedBaseDrafts | None = None, engine_thread: EngineThread | None = None,
                 auto_rollback: AutoRollbackConfig | None = None) -> None:
        self.engine = engine
        # Every generation runs on this one thread (the replica also loads and warms up on it): see engine_thread.py.
        self.engine_thread = engine_thread or EngineThread()
        # Shared-base mode: one base draft, clusters differ by LoRA adapters. The wrapped base must
        # only be called through its AdapterDrafts, so the engine's default draft becomes the bare base.
        self.shared = shared
        if shared is not None:
            engine.draft = shared.base_draft()
        # engine.max_batch > 1: requests share rounds in a BatchEngine fed by a BatchLoop on that thread (batch_loop.py).
        self.batch_loop: BatchLoop | None = None
        if engine.config.max_batch > 1:
            if isinstance(engine.draft, EagleHead) or isinstance(engine, TreeSpeculativeEngine):
                raise ValueError("engine.max_batch > 1 (continuous batching) drafts with a chain draft model; an "
                                 "eagle head or a token tree is served one request at a time: set max_batch to 1")
            batch = self.engine_thread.run(BatchEngine, engine, max_batch=engine.config.max_batch)  # measures costs
            self.batch_loop = BatchLoop(batch, self.engine_thread)
        self.router = router  # None: requests that name no cluster go to 'global'
        self.max_cluster_drafts = max_cluster_drafts  # cluster drafts held besides global's (LRU beyond)
        self.dashboard = dashboard  # history for /dashboard (None: no dashboard)
        self.buffer = buffer  # only read, for the backlog gauges on /metrics
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.dtype = str(engine.target.dtype).removeprefix("torch.")  # what /health and each response's osd report
        # Suffix speculation: fused into trees one at a time (build_engine picks the tree engine for config.suffix),
        # proposed as chains in a batch (the BatchEngine, max_batch > 1).
        self.suffix = engine.config.suffix is not None and (isinstance(engine, TreeSpeculativeEngine)
                                                            or engine.config.max_batch > 1)
        self.recorder = recorder
        self.registry = registry
        # Undoing a swap needs the registry: without one there is nothing to roll back to.
        self.watch = (SwapWatch(auto_rollback) if auto_rollback is not None and auto_rollback.enabled
                      and registry is not None else None)
        self.vocab_size = int(engine.target.config.vocab_size)
        # At least one new token must fit in the context window.
        self.max_prompt_tokens = min(max_prompt_tokens or engine.context_window - 1, engine.context_window - 1)
        self.metrics = ServingMetrics(metrics_mirror)
        self.started = int(time.time())
        # global first, then clusters from least to most recently used (an LRU under max_cluster_drafts)
        self._drafts: OrderedDict[str, LiveDraft] = OrderedDict({DEFAULT_CLUSTER: LiveDraft(draft_version,
                                                                                            engine.draft)})
        self._wanted: set[str] = set()  # clusters requests asked for that this replica holds no draft of
        self._pair_lock = threading.Lock()  # held only to read or replace a pair
        self._swap_lock = threading.RLock()  # one draft build/sync at a time (never held by requests)
        self._generate_lock = threading.Lock()  # the engine runs one request at a time
        self._state_lock = threading.Lock()  # guards the two counters below
        self._waiting = self._running = 0
        # cluster -> (version, error) of the last version this replica refused as unloadable. Stored versions are
        # immutable, so the same bytes fail the same way: a poll must not fetch and hash them again (a corrupt live
        # SmolLM2 self-draft, embeddings included, is 68 MB in bf16, fetched per replica every draft_poll_interval_s).
        self._refused: dict[str, tuple[int, RegistryError]] = {}

    # -- encoding ------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt (the tokenizer's usual special tokens, e.g. BOS, included)."""
        return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: list[ChatMessage] | list[dict]) -> list[int]:
        """Chat messages -> prompt ids, with the tokenizer's chat template and the assistant prefix
        (as osd.data.workloads.chat_prompt_ids); tokenizers without a template get "role: content" lines."""
        msgs = [m if isinstance(m, dict) else {"role": m.role, "content": m.text} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            try:
                ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            except (TemplateError, ValueError) as e:  # e.g. a template that refuses the system role
                raise ServingError(400, f"the model's chat template rejected these messages: {e}", "messages") from e
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        return self.encode_prompt(text)

    # -- requests ------------------------------------------------------------------------------

    def complete(self, req: CompletionRequest | dict) -> dict:
        """POST /v1/completions without streaming -> a Completion dict (logprobs and echo as asked)."""
        req = _coerce(req, CompletionRequest)
        prep = self._prepare(req)
        gen, cluster, live = self.generate_prepared(prep, logprobs=req.logprobs, score_only=req.max_tokens == 0,
                                                    prompt_logprobs=req.echo and req.logprobs is not None)
        return Completion(id=prep.request_id, created=prep.created, model=self.model_name,
                          choices=[self._completion_choice(req, prep, gen)],
                          usage=usage_of(gen), osd=self.osd_stats(gen, cluster, live)).model_dump()

    def _completion_choice(self, req: CompletionRequest, prep: PreparedRequest, gen: Generation) -> CompletionChoice:
        """The text (after the prompt under echo: the prompt as sent, or its ids decoded) and the logprobs object."""
        if not (req.echo or req.logprobs is not None):
            return CompletionChoice(text=gen.text, finish_reason=gen.finish_reason)
        prompt = req.prompt if isinstance(req.prompt, str) else self.tokenizer.decode(prep.prompt_ids,
                                                                                       skip_special_tokens=True)
        logprobs = None
        if req.logprobs is not None:  # text offsets count from the prompt's start, echo or not (OpenAI)
            parts = [(gen.prompt_logprobs, 0)] if req.echo else []
            logprobs = completion_logprobs(self.tokenizer, [*parts, (gen.logprobs, len(prompt))])
        return CompletionChoice(text=prompt + gen.text if req.echo else gen.text, finish_reason=gen.finish_reason,
                                logprobs=logprobs)

    def chat(self, req: ChatCompletionRequest | dict) -> dict:
        """POST /v1/chat/completions without streaming -> a ChatCompletion dict."""
        prep = self._prepare(_coerce(req, ChatCompletionRequest))
        gen, cluster, live = self.generate_prepared(prep)
        return ChatCompletion(id=prep.request_id, created=prep.created, model=self.model_name,
                              choices=[ChatChoice(message=AssistantMessage(content=gen.text),
                                                  finish_reason=gen.finish_reason)],
                              usage=usage_of(gen), osd=self.osd_stats(gen, cluster, live)).model_dump()

    def stream_complete(self, req: CompletionRequest | dict) -> SSEStream:
        """Validate now (errors raise before anything is streamed), then stream SSE completion chunks."""
        return SSEStream(self, self._prepare(_coerce(req, CompletionRequest)))

    def stream_chat(self, req: ChatCompletionRequest | dict) -> SSEStream:
        """Validate now, then stream SSE chat-completion chunks (first chunk: the assistant role)."""
        return SSEStream(self, self._prepare(_coerce(req, ChatCompletionRequest)))

    def _prepare(self, req: CompletionRequest | ChatCompletionRequest) -> PreparedRequest:
        pinned = self._pinned_cluster(req)
        params = to_sampling_params(req)
        chat = isinstance(req, ChatCompletionRequest)
        if chat:
            prompt_ids = self.encode_chat(req.messages)
        elif isinstance(req.prompt, str):
            if not req.prompt:
                raise ServingError(400, "the prompt is empty: send at least one character of text", "prompt")
            prompt_ids = self.encode_prompt(req.prompt)
        else:
            prompt_ids = list(req.prompt)
            if bad := [t for t in prompt_ids if not 0 <= t < self.vocab_size]:
                raise ServingError(400, f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}", "prompt")
        if not prompt_ids:
            raise ServingError(400, "the prompt is empty: send at least one token", "messages" if chat else "prompt")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise ServingError(413, f"the prompt is {len(prompt_ids)} tokens; this server accepts at most "
                                    f"{self.max_prompt_tokens} prompt tokens (context window "
                                    f"{self.engine.context_window}). Shorten the prompt.",
                               "messages" if chat else "prompt", "context_length_exceeded")
        try:
            self.engine.validate(prompt_ids, params)
        except RequestError as e:
            raise ServingError(400, str(e), "max_tokens", "context_length_exceeded") from e
        cluster = pinned or (self.router.route(prompt_ids) if self.router is not None else DEFAULT_CLUSTER)
        return PreparedRequest(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), prompt_ids,
                         params, cluster, bool(req.stream_options and req.stream_options.include_usage))

    def _pinned_cluster(self, req: CompletionRequest | ChatCompletionRequest) -> str | None:
        """The cluster a client pinned: ``"model": "<model>:<cluster>"`` or ``"osd": {"cluster": ...}``
        (they must agree); None lets the router choose."""
        name, _, from_model = (req.model or "").partition(":")
        if name not in ("", self.model_name):
            raise ServingError(404, f"model {req.model!r} is not served here; use {self.model_name!r} or "
                                    f"'{self.model_name}:<cluster>' (GET /v1/models)", "model", "model_not_found")
        from_field = req.osd.cluster if req.osd else None
        if from_model and from_field and from_model != from_field:
            raise ServingError(400, f"the model names cluster {from_model!r} but osd.cluster is {from_field!r}; "
                                    "send one of them", "osd.cluster")
        pinned = from_model or from_field
        if pinned is not None and not CLUSTER_RE.match(pinned):
            raise ServingError(400, f"invalid cluster name {pinned!r}: use 1-128 characters from [A-Za-z0-9_.-]",
                               "model" if from_model else "osd.cluster")
        return pinned

    def generate_prepared(self, prep: PreparedRequest, on_tokens: Callable[[list[int]], None] | None = None,
                          cancel: threading.Event | None = None, *, logprobs: int | None = None,
                          prompt_logprobs: bool = False, score_only: bool = False) -> tuple[Generation, str, LiveDraft]:
        """Run one prepared request on the engine thread. ``logprobs`` / ``prompt_logprobs``: the target's
        per-token log-probs (top N) of the output / the prompt; ``score_only``: the prompt alone (max_tokens 0)."""
        arrived = time.monotonic()
        if self.batch_loop is not None:
            gen, live = self._generate_batched(prep, on_tokens, cancel, logprobs, prompt_logprobs, score_only)
        else:
            gen, live = self._generate_one(prep, on_tokens, cancel, logprobs, prompt_logprobs, score_only)
        self.metrics.observe_request(prep.cluster, live.version, gen, latency_s=time.monotonic() - arrived)
        if self.watch is not None:
            self._watch_request(live, gen)
        if self.dashboard is not None:  # queued for a background thread: never waits for Redis
            s = gen.stats
            self.dashboard.post_request(prep.cluster, live.version, s.alpha_hat, len(gen.output_ids),
                                        s.target_forwards, s.elapsed_s, accepted=s.accepted_by_source(),
                                        prefill_s=s.prefill_s, target_step_s=target_step_s(self.engine, live.draft))
        if gen.record is not None and self.recorder is not None:
            self.recorder.submit(gen.record)  # never blocks, never raises
        return gen, prep.cluster, live

    def _generate_one(self, prep: PreparedRequest, on_tokens, cancel, logprobs, prompt_logprobs,
                      score_only) -> tuple[Generation, LiveDraft]:
        """One request at a time (max_batch 1): the generation lock, then the engine thread."""
        with self._state_lock:
            self._waiting += 1
        with self._generate_lock:
            with self._state_lock:
                self._waiting -= 1
                self._running += 1
            try:
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                live = self.live_draft(prep.cluster)  # read once: draft and version travel together
                if score_only:
                    gen = self.engine_thread.run(self.engine.score, prep.prompt_ids, logprobs)
                else:
                    asked = {"logprobs": logprobs, "prompt_logprobs": True} if prompt_logprobs else (
                        {"logprobs": logprobs} if logprobs is not None else {})
                    gen = self.engine_thread.run(
                        self.engine.generate, prep.prompt_ids, prep.params, draft_version=live.version,
                        cluster=prep.cluster, on_tokens=on_tokens, draft=live.draft,
                        request_id=prep.request_id.split("-", 1)[1], **asked)  # the id ties the record to the response
            finally:
                with self._state_lock:
                    self._running -= 1
        return gen, live

    def _generate_batched(self, prep: PreparedRequest, on_tokens, cancel, logprobs, prompt_logprobs,
                          score_only) -> tuple[Generation, LiveDraft]:
        """Through the BatchLoop: the request joins the batch, reading its live pair as it does. Log-probs and
        prompt scoring are not batched: they run alone on the engine thread between two rounds."""
        if cancel is not None and cancel.is_set():
            raise Cancelled
        held: dict[str, LiveDraft] = {}

        def live_pair() -> dict:
            held["live"] = live = self.live_draft(prep.cluster)  # read once: draft and version travel together
            return {"draft": live.draft, "draft_version": live.version}

        request_id = prep.request_id.split("-", 1)[1]  # the id ties the record to the response
        if score_only or logprobs is not None or prompt_logprobs:
            def alone() -> Generation:
                pair = live_pair()
                if score_only:
                    return self.engine.score(prep.prompt_ids, logprobs)
                asked = {"logprobs": logprobs, "prompt_logprobs": True} if prompt_logprobs else {"logprobs": logprobs}
                return self.engine.generate(prep.prompt_ids, prep.params, cluster=prep.cluster, on_tokens=on_tokens,
                                            request_id=request_id, **pair, **asked)
            gen = self.batch_loop.call(alone).result()  # type: ignore[union-attr]
        else:
            gen = self.batch_loop.submit(on_tokens, cancel, live_pair, prompt_ids=prep.prompt_ids,  # type: ignore[union-attr]
                                         params=prep.params, cluster=prep.cluster, request_id=request_id).result()
        return gen, held["live"]

    def osd_stats(self, gen: Generation, cluster: str, live: LiveDraft) -> OsdStats:
        s = gen.stats
        return OsdStats(draft_version=live.version, cluster=cluster, draft_cluster=live.lineage, proposed=s.proposed, accepted=s.accepted,
                        rounds=s.rounds, mean_acceptance_length=s.mean_acceptance_length, alpha_hat=s.alpha_hat,
                        target_forwards=s.target_forwards, accepted_by_source=s.accepted_by_source(),
                        suffix=self.suffix, dtype=self.dtype)

    def chunk(self, prep: PreparedRequest, content: str | Delta | None, finish_reason: str | None = None,
               osd: OsdStats | None = None, usage: Usage | None = None) -> CompletionChunk | ChatCompletionChunk:
        """One streamed chunk; ``content`` None means the usage-only chunk (no choices)."""
        common = dict(id=prep.request_id, created=prep.created, model=self.model_name, usage=usage, osd=osd)
        if prep.chat:
            delta = content if isinstance(content, Delta) else Delta(content=content)
            choices = [] if content is None else [ChatChunkChoice(delta=delta, finish_reason=finish_reason)]
            return ChatCompletionChunk(choices=choices, **common)
        choices = [] if content is None else [CompletionChoice(text=content, finish_reason=finish_reason)]
        return CompletionChunk(choices=choices, **common)

    # -- drafts ----------------------------------------------------------------------------------

    def live_draft(self, cluster: str = DEFAULT_CLUSTER) -> LiveDraft:
        """The pair a request for ``cluster`` would use now: its own, else global's (and the cluster
        is noted as wanted, so the next registry sync loads its draft if it has one)."""
        with self._pair_lock:
            live = self._drafts.get(cluster)
            if live is None:
                self._wanted.add(cluster)
                return self._drafts[DEFAULT_CLUSTER]
            if cluster != DEFAULT_CLUSTER:
                self._drafts.move_to_end(cluster)  # most recently used
            return live

    def clusters_to_sync(self, registry_clusters: list[str]) -> list[str]:
        """Of the registry's clusters, those to keep in step: global, the ones held, and the ones
        requests wanted since the last call (loading one past the cap evicts the coldest)."""
        with self._pair_lock:
            wanted, self._wanted = self._wanted, set()
            keep = set(self._drafts) | wanted
        return [c for c in sorted(registry_clusters) if c in keep or c == DEFAULT_CLUSTER]

    def swap_draft(self, version: int, state_dict: Mapping[str, torch.Tensor],
                   cluster: str = DEFAULT_CLUSTER, meta: Mapping[str, Any] | None = None) -> LiveDraft:
        """Make ``state_dict`` the live draft of ``cluster`` as ``version``: whole draft weights (names
        as ``DraftModel.model.state_dict()``), or, in shared-base mode, LoRA adapter tensors
        (``meta``: the registry manifest's, with the adapter's rank and alpha).

        Built and validated beside the live draft; a mismatch raises DraftMismatchError and
        the live draft stays. Running requests keep the draft they started with.
        """
        if not CLUSTER_RE.match(cluster):
            raise ValueError(f"invalid cluster name {cluster!r}: use 1-128 characters from [A-Za-z0-9_.-]")
        with self._swap_lock:
            try:
                new = (self.shared.add(cluster, version, state_dict, meta=meta) if self.shared is not None
                       else self._build_draft(version, state_dict, cluster))
            except DraftMismatchError:
                self.metrics.observe_swap(cluster, "refused")
                raise
            live = LiveDraft(version, new, cluster)
            with self._pair_lock:
                old = self._drafts.get(cluster)
                self._drafts[cluster] = live
                self._drafts.move_to_end(cluster)
                retired = [old] + self._evict_cold_drafts()
                if self.watch is not None:  # under the pair lock: no request of the new pair finishes before it
                    self.watch.swapped(cluster, version)
        for pair in retired:
            self._retire(pair)
        self.metrics.observe_swap(cluster, "ok")
        log.info("cluster %r: draft v%s -> v%s", cluster, old.version if old else None, version)
        return live

    def _build_draft(self, version: int, state_dict: Mapping[str, torch.Tensor], cluster: str) -> DraftModel:
        """A full draft: a copy of global's construction holding ``state_dict``."""
        template = self._drafts[DEFAULT_CLUSTER].draft  # every cluster's draft has global's construction
        if template is None:
            raise DraftMismatchError("this replica serves without a draft (draft 'none'), so there is no "
                                     "draft to swap; start it with a draft to use hot-swapping")
        problems = spec_diff(tensor_specs(state_dict), normalize_specs(published_specs(template, state_dict)))
        if problems:
            raise DraftMismatchError(
                f"draft v{version} for cluster {cluster!r} does not fit the live draft: {'; '.join(problems)}. "
                f"Keeping v{self.live_draft(cluster).version}; publish a draft built for this target and draft "
                "construction.")
        try:  # a copy of global's construction and shortlist, with these weights (and acceptance head)
            return load_published_state(template, dict(state_dict))
        except (RuntimeError, ValueError) as e:  # ValueError: a shortlist with ids outside the vocabulary
            raise DraftMismatchError(f"draft v{version} for cluster {cluster!r} failed to load: {e}") from e

    def _retire(self, pair: LiveDraft | None) -> None:
        """A pair no longer served: in shared-base mode its adapter is freed once its last request ends."""
        if self.shared is not None and pair is not None and pair.draft is not self.shared.base_draft():
            self.shared.remove(pair.draft)

    def _evict_cold_drafts(self) -> list[LiveDraft]:
        """Beyond max_cluster_drafts, drop the least recently used cluster drafts (their requests fall
        back to global's until a request wants them again); returns them. Callers hold _pair_lock."""
        evicted = []
        while len(self._drafts) - 1 > self.max_cluster_drafts:
            cold = next(c for c in self._drafts if c != DEFAULT_CLUSTER)
            log.info("cluster %r: draft v%d evicted (max_cluster_drafts=%d)", cold, self._drafts[cold].version,
                     self.max_cluster_drafts)
            evicted.append(self._drafts.pop(cold))
            self.metrics.observe_swap(cold, "evicted")
        return evicted

    def sync_from_registry(self, registry: DraftRegistry | None = None,
                           cluster: str = DEFAULT_CLUSTER) -> LiveDraft | None:
        """Load the registry's live version of ``cluster`` if it differs from ours (newer, or older
        after a rollback); returns the new pair, or None when already in step or nothing is live.

        What a replica calls at start and on every broadcast or poll. Raises the registry's
        DraftMismatchError / CorruptDraftError, keeping the live draft.
        """
        registry = registry or self.registry
        if registry is None:
            raise ValueError("no registry: pass one, or build the ServingCore with registry=")
        with self._swap_lock:  # serialised, so a slow older sync cannot overwrite a newer one
            manifest = registry.live(cluster)
            with self._pair_lock:
                current = self._drafts.get(cluster)
            if manifest is None or (current is not None and current.version == manifest.version):
                return None
            if (note := registry.bad_versions(cluster).get(manifest.version)) is not None:
                raise BadDraftError(f"draft cluster {cluster!r} v{manifest.version} is live in the registry but "
                                    f"marked bad ({note}); keeping v{current.version if current else None}. "
                                    "Roll the cluster back or publish a new version.")
            template = self._drafts[DEFAULT_CLUSTER].draft
            if template is None:
                raise DraftMismatchError("this replica serves without a draft; it cannot load registry drafts")
            specs = (self.shared.adapter_specs() if self.shared is not None
                     else published_specs(template, manifest.tensors))
            if (refused := self._refused.get(cluster)) is not None and refused[0] == manifest.version:
                raise type(refused[1])(str(refused[1]))
            try:
                state = registry.load_validated(cluster, manifest.version, specs)
                live = self.swap_draft(manifest.version, state, cluster, meta=manifest.meta)
            except (CorruptDraftError, DraftMismatchError) as e:
                self._refused[cluster] = (manifest.version, e)
                raise
        if self.shared is not None:
            self.shared.collect()  # adapters whose last request has ended since the last sync
        return live

    def _watch_request(self, live: LiveDraft, gen: Generation) -> None:
        """Feed the swap watch one finished request; a verdict to roll back starts a thread that does it.
        Never raises: the watch is a safety net, and serving must not fall through it."""
        try:
            verdict = self.watch.observe(live.lineage, live.version, gen.stats)  # type: ignore[union-attr]
            if verdict is None:
                return
            if not verdict.roll_back:
                log.info("cluster %r: draft v%d holds up after its swap: %s", verdict.cluster, verdict.version,
                         verdict.reason)
                return
            threading.Thread(target=self._auto_rollback, args=(verdict,), name="osd-auto-rollback",
                             daemon=True).start()
        except Exception:
            log.exception("swap watch failed on a finished request; serving goes on")

    def _auto_rollback(self, verdict: Verdict) -> None:
        """Mark ``verdict.version`` bad and roll the live pointer back to the version it was judged
        against, then load that here. Idempotent across replicas (``DraftRegistry.reject``): only
        the replica that moves the pointer posts the dashboard's swap point and counts it."""
        cluster, version = verdict.cluster, verdict.version
        log.warning("cluster %r: draft v%d serves worse than v%d, rolling back: %s", cluster, version,
                    verdict.baseline_version, verdict.reason)
        try:
            moved = self.registry.reject(cluster, version, f"auto rollback: {verdict.reason}",  # type: ignore[union-attr]
                                         to_version=verdict.baseline_version)
        except RollbackError as e:  # nothing stored to go back to (v0): retrying will not change that
            log.warning("cluster %r: cannot roll draft v%d back automatically: %s", cluster, version, e)
            return
        except Exception as e:  # registry unreachable, target corrupt: judge again on the next requests
            log.warning("cluster %r: auto rollback of draft v%d failed (%s: %s); judging it again", cluster,
                        version, type(e).__name__, e)
            self.watch.reopen(cluster, version)  # type: ignore[union-attr]
            return
        if moved is None:
            log.info("cluster %r: draft v%d was no longer live (another replica or an admin moved it first); "
                     "marked bad", cluster, version)
        elif self.dashboard is not None:
            self.dashboard.post_swap(cluster, moved.version, "auto_rollback")  # queued, never raises
            try:
                self.dashboard.count_rollback(cluster, auto=True)
            except Exception as e:
                log.warning("dashboard: auto rollback not counted: %s", e)
        try:
            self.sync_from_registry(self.registry, cluster)  # whatever is live now: the baseline, or newer
        except Exception as e:  # the poller tries again
            log.warning("cluster %r: sync after the auto rollback failed: %s", cluster, e)

    def drafts_info(self) -> dict:
        """cluster -> what this replica holds, and the registry's live version when there is a registry."""
        with self._pair_lock:
            held = dict(self._drafts)
        out: dict[str, dict] = {c: {"version": d.version, "has_draft": d.draft is not None} for c, d in held.items()}
        if self.registry is not None:
            try:
                for c in sorted(set(self.registry.clusters()) | set(held)):
                    manifest = self.registry.live(c)
                    entry = out.setdefault(c, {"version": None, "has_draft": False})
                    entry["registry_live"] = manifest.version if manifest else None
                    if bad := self.registry.bad_versions(c):
                        entry["bad_versions"] = {str(v): reason for v, reason in sorted(bad.items())}
            except Exception as e:  # listing must work even when the registry does not
                log.warning("registry unavailable while listing drafts: %s", e)
                for entry in out.values():
                    entry.setdefault("registry_live", None)
                return {"model": self.model_name, "clusters": out, "registry_error": str(e)}
        return {"model": self.model_name, "clusters": out}

    def registry_live_versions(self) -> dict[str, int | None]:
        """cluster -> the registry's live version (None: no registry, or nothing published yet)."""
        if self.registry is None:
            return {}
        out = {}
        for c in self.registry.clusters():
            manifest = self.registry.live(c)
            out[c] = manifest.version if manifest else None
        return out

    # -- introspection -------------------------------------------------------------------------

    def models(self) -> dict:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.started)]).model_dump()

    def load(self) -> dict:
        """Requests running and waiting here: what a trainer's pause-while-busy policy reads."""
        if self.batch_loop is not None:
            return {"running": self.batch_loop.running, "waiting": self.batch_loop.waiting}
        with self._state_lock:
            return {"running": self._running, "waiting": self._waiting}

    def health(self) -> dict:
        with self._pair_lock:
            pairs = dict(self._drafts)
        drafts = {c: d.version for c, d in pairs.items()}
        # Per cluster draft: does speculation pay here, or is it backed off? A chain's governor estimates; a fused
        # tree's DraftGain (what the draft adds next to suffix candidates; absent before the draft's first request).
        if self.suffix and isinstance(self.engine, TreeSpeculativeEngine):
            mode = "fused"
            estimates = {c: g.describe() for c, d in pairs.items()
                         if d.draft is not None and (g := self.engine.draft_gain(d.draft)) is not None}
        else:
            mode = self.engine.config.speculation
            estimates = {c: g.describe() for c, d in pairs.items()
                         if d.draft is not None and (g := self.engine.governor(d.draft)) is not None}
        # Suffix speculation: on or off, and the size of each cluster's traffic index (plain reads, no locks).
        traffic = self.engine.traffic.stats() if self.engine.traffic is not None else {}
        return {"status": "ok", "model": self.model_name, "dtype": self.dtype, "drafts": drafts,
                "speculation": {"mode": mode, "drafts": estimates},
                "suffix": {"enabled": self.suffix, "traffic": traffic}, **self.load()}

    def metrics_text(self) -> str:
        with self._pair_lock:
            versions = {(("cluster", c),): float(d.version) for c, d in self._drafts.items()}
        load = self.load()
        gauges: dict = {
            "osd:draft_version": ("Draft version this replica serves, per cluster.", versions),
            "osd:num_requests_running": ("Requests generating now.", {(): float(load["running"])}),
            "osd:num_requests_waiting": ("Requests waiting for the engine.", {(): float(load["waiting"])}),
        }
        counters: dict = {}
        if self.recorder is not None:
            r = self.recorder.stats()
            counters = {
                "osd:recorder_submitted": ("Training records submitted.", {(): r.submitted}),
                "osd:recorder_pushed": ("Training records pushed to the buffer.", {(): r.pushed}),
                "osd:recorder_dropped": ("Training records dropped (backlog overflow, malformed, or unflushed at "
                                         "close without a spool dir).", {(): r.dropped}),
                "osd:recorder_push_failures": ("Failed pushes to the buffer (each retry counts).",
                                               {(): r.push_failures}),
            }
            gauges |= {
                "osd:recorder_spool_size": ("Training records spooled while the buffer is unavailable.",
                                            {(): float(r.spooled)}),
                "osd:recorder_queue_size": ("Training records not yet pushed to the buffer.", {(): float(r.queued)}),
                "osd:recorder_buffer_available": ("1 if the last push to the buffer succeeded.",
                                                  {(): float(r.buffer_available)}),
            }
        if self.dashboard is not None:
            counters["osd:dashboard_points_dropped"] = (
                "Dashboard points dropped while Redis was unavailable (queue overflow).",
                {(): float(self.dashboard.dropped)})
        if self.engine.traffic is not None:
            traffic = self.engine.traffic.stats()
            for name, field, help_text in _TRAFFIC_GAUGES:
                gauges[name] = (help_text, {(("cluster", c),): float(v[field]) for c, v in traffic.items()})
        gauges |= self._shared_gauges(counters)
        return self.metrics.prometheus_text(gauges, counters)


    def _shared_gauges(self, counters: dict) -> dict:
        """Buffer backlog and trainer state, read from Redis: the same on every replica (aggregate
        them with max, not sum). Adds the trainer's counters to ``counters``; skips what Redis
        cannot answer now (an outage must not break /metrics)."""
        gauges: dict = {}
        if self.buffer is not None:
            try:
                stats = [self.buffer.stats(c) for c in self.buffer.clusters()]
            except Exception as e:
                log.debug("buffer stats unavailable for /metrics: %s", e)
            else:
                for name, field, help_text in _BUFFER_GAUGES:
                    gauges[name] = (help_text, {(("cluster", b.cluster),): float(getattr(b, field) or 0)
                                                for b in stats})
                if stats:  # one dead-letter stream for all clusters
                    gauges["osd:buffer_dead_letters"] = ("Entries in the dead-letter stream (failed to decode).",
                                                         {(): float(stats[0].dead_letter)})
        if self.dashboard is not None:
            try:
                trainer = self.dashboard.trainer_counters()
            except Exception as e:
                log.debug("trainer counters unavailable for /metrics: %s", e)
            else:
                for name, field, help_text, is_counter in _TRAINER_METRICS:
                    series = {(("cluster", c),): v.get(field, 0.0) for c, v in sorted(trainer.items())}
                    (counters if is_counter else gauges)[name] = (help_text, series)
        return gauges


_BUFFER_GAUGES = (
    ("osd:buffer_length", "length", "Training records in the cluster's buffer stream."),
    ("osd:buffer_pending", "pending", "Records delivered to a trainer and not yet acked."),
    ("osd:buffer_lag", "lag", "Records not yet delivered to a trainer."),
)
_TRAFFIC_GAUGES = (  # this replica's suffix traffic index (osd/decoding/suffix.py TrafficIndex), per cluster
    ("osd:suffix_traffic_tokens", "tokens", "Tokens in the cluster's suffix traffic index (cluster_tokens)."),
    ("osd:suffix_traffic_requests", "requests", "Requests in the cluster's suffix traffic index (cluster_requests)."),
)
_TRAINER_METRICS = (  # (name, field of DashboardStore.trainer_counters, help, is a counter)
    ("osd:trainer_updates", "updates", "Trainer updates (each ends with a gate decision).", True),
    ("osd:trainer_promotions", "promotions", "Candidates the gate promoted (published as a new version).", True),
    ("osd:trainer_rejections", "rejections", "Candidates the gate refused.", True),
    ("osd:draft_rollbacks", "rollbacks", "Admin rollbacks of the live draft.", True),
    ("osd:draft_auto_rollbacks", "auto_rollbacks", "Automatic rollbacks of a live draft that served worse than "
                                                   "its predecessor (osd/serving/swap_watch.py).", True),
    ("osd:trainer_loss", "loss", "Distillation loss of the last update.", False),
    ("osd:trainer_gate_alpha_candidate", "alpha_candidate", "Gate alpha-hat of the last candidate (held-out).",
     False),
    ("osd:trainer_gate_alpha_live", "alpha_live", "Gate alpha-hat of the live draft on the same records.", False),
)


def _coerce(req: Any, cls: type) -> Any:
    return req if isinstance(req, cls) else cls.model_validate(req)
