"""The serving core: OpenAI-style requests in, speculative generations out; no Ray, no HTTP.

A Ray Serve replica (actors/) holds one ``ServingCore`` and mounts ``osd.http.build_app``.

Concurrency model (one replica):

- Generation is serialised: the engine holds one KV cache per request and is not
  thread-safe, so a lock admits one request at a time and the others wait in arrival
  order (roughly: Python locks are not strictly FIFO). Throughput scales with replicas;
  Serve's ``max_ongoing_requests`` bounds how many wait here, ``num_requests_waiting`` on
  /metrics shows the queue.
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
  shared-base mode they are LoRA adapters on one base (``osd.adapters``).
- Training records go to a ``Recorder`` (background thread), never on the response path.
"""

from __future__ import annotations

import copy
import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from jinja2.exceptions import TemplateError
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from osd.adapters import SharedBaseDrafts
from osd.api import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                     ChatCompletionRequest, ChatMessage, Completion, CompletionChoice, CompletionChunk,
                     CompletionRequest, Delta, ModelCard, ModelList, OsdStats, ServingError, Usage, error_body,
                     to_sampling_params)
from osd.buffer import RecordBuffer
from osd.config import SamplingParams
from osd.dashboard import DashboardStore
from osd.engine import Generation, RequestError, SpeculativeEngine
from osd.models import DraftModel, load_published_state, published_specs
from osd.recorder import Recorder
from osd.registry import _CLUSTER_RE, DraftMismatchError, DraftRegistry, _normalize_specs, _spec_diff, tensor_specs
from osd.router import Router

log = logging.getLogger(__name__)

__all__ = ["LiveDraft", "MetricsMirror", "ServingCore", "ServingError", "ServingMetrics", "SSEStream"]

DEFAULT_CLUSTER = "global"


@dataclass(frozen=True)
class LiveDraft:
    """What one cluster's requests run with; replaced whole, never mutated."""

    version: int  # 0 = the initial draft built from the target
    draft: DraftModel | None  # None: target-only decoding
    lineage: str = DEFAULT_CLUSTER  # whose versions these are: a cluster without its own draft runs global's


# --------------------------------------------------------------------------- metrics

REQUEST_LABELS = ("cluster", "draft_version")
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "osd:request_success": ("Requests finished, by finish reason.", (*REQUEST_LABELS, "finished_reason")),
    "osd:request_errors": ("Requests answered with an error, by HTTP status.", ("status",)),
    "osd:prompt_tokens": ("Prompt tokens processed.", REQUEST_LABELS),
    "osd:generation_tokens": ("Tokens generated.", REQUEST_LABELS),
    "osd:spec_decode_num_drafts": ("Speculative rounds (draft proposals verified by the target).", REQUEST_LABELS),
    "osd:spec_decode_num_draft_tokens": ("Draft tokens proposed.", REQUEST_LABELS),
    "osd:spec_decode_num_accepted_tokens": ("Draft tokens accepted by the target.", REQUEST_LABELS),
    "osd:spec_decode_num_accepted_tokens_per_pos": ("Accepted draft tokens by position in the round (0 = first).",
                                                    (*REQUEST_LABELS, "position")),
    "osd:spec_decode_alpha_sum": ("Sum over verified positions of sum_x min(p, q); alpha-hat = rate(sum) / rate(count).",
                                  REQUEST_LABELS),
    "osd:spec_decode_alpha_count": ("Verified positions contributing to alpha_sum.", REQUEST_LABELS),
    "osd:target_forwards": ("Target decode forwards (prefill excluded).", REQUEST_LABELS),
    "osd:draft_swaps": ("Draft swaps on this replica, by outcome (ok / refused / evicted).", ("cluster", "outcome")),
}
# name -> (help, bucket upper bounds); labelled by REQUEST_LABELS. One observation per finished request.
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "osd:request_alpha": ("Per-request alpha-hat (mean sum_x min(p, q) over its verified positions).",
                          tuple(i / 10 for i in range(1, 11))),
    "osd:e2e_request_latency_seconds": ("Request latency: waiting for the engine plus generation.",
                                        (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)),
    "osd:request_tokens_per_second": ("Per-request generation speed (output tokens / generation seconds).",
                                      (1, 2, 5, 10, 15, 20, 30, 40, 60, 100, 200, 500)),
}


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int]  # per bucket (not cumulative); the last is +Inf
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        cumulative, out = 0, []
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            cumulative += n
            out.append((bound, cumulative))
        return out


class MetricsMirror(Protocol):
    """Receives every counter increment and histogram observation too (e.g. Ray metrics)."""

    def add(self, name: str, labels: dict[str, str], value: float) -> None: ...

    def observe(self, name: str, labels: dict[str, str], value: float) -> None: ...


class ServingMetrics:
    """Counters aggregated over requests; ``prometheus_text`` renders them (plus gauges) for /metrics."""

    def __init__(self, mirror: MetricsMirror | None = None) -> None:
        self.mirror = mirror
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[str, dict[tuple[str, ...], _Histogram]] = defaultdict(dict)

    def _add(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._values[name][labels] += value
        if self.mirror is not None and value:
            self.mirror.add(name, dict(zip(COUNTERS[name][1], labels)), value)

    def _observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        bounds = HISTOGRAMS[name][1]
        hist = self._histograms[name].setdefault(labels, _Histogram(bounds, [0] * (len(bounds) + 1)))
        hist.observe(value)
        if self.mirror is not None:
            self.mirror.observe(name, dict(zip(REQUEST_LABELS, labels)), value)

    def observe_request(self, cluster: str, version: int, gen: Generation, latency_s: float) -> None:
        s, key = gen.stats, (cluster, str(version))
        with self._lock:
            if s.alpha_hat is not None:
                self._observe("osd:request_alpha", key, s.alpha_hat)
            self._observe("osd:e2e_request_latency_seconds", key, latency_s)
            if s.elapsed_s > 0:
                self._observe("osd:request_tokens_per_second", key, s.tokens_per_second)
            self._add("osd:request_success", (*key, gen.finish_reason), 1)
            self._add("osd:prompt_tokens", key, s.prompt_tokens)
            self._add("osd:generation_tokens", key, len(gen.output_ids))
            self._add("osd:spec_decode_num_drafts", key, s.rounds)
            self._add("osd:spec_decode_num_draft_tokens", key, s.proposed)
            self._add("osd:spec_decode_num_accepted_tokens", key, s.accepted)
            for pos, n in enumerate(s.accepted_per_position):
                self._add("osd:spec_decode_num_accepted_tokens_per_pos", (*key, str(pos)), n)
            self._add("osd:spec_decode_alpha_sum", key, s.beta_sum)
            self._add("osd:spec_decode_alpha_count", key, s.beta_count)
            self._add("osd:target_forwards", key, s.target_forwards)

    def observe_error(self, status: int) -> None:
        with self._lock:
            self._add("osd:request_errors", (str(status),), 1)

    def observe_swap(self, cluster: str, outcome: str) -> None:
        with self._lock:
            self._add("osd:draft_swaps", (cluster, outcome), 1)

    def value(self, name: str, **labels: str) -> float:
        """Sum of a counter over the series matching ``labels`` (for tests and quick checks)."""
        names = COUNTERS[name][1]
        with self._lock:
            return sum(v for k, v in self._values[name].items()
                       if all(k[names.index(n)] == want for n, want in labels.items()))

    def prometheus_text(self, gauges: Mapping[str, tuple[str, Mapping[tuple[tuple[str, str], ...], float]]] = {},
                        counters: Mapping[str, tuple[str, Mapping[tuple[tuple[str, str], ...], float]]] = {}) -> str:
        """Prometheus text format of the request counters and histograms plus, from the caller,
        ``gauges`` and ``counters``: name -> (help, {((label, value), ...): value})."""
        families: list = []
        with self._lock:
            for name, (help_text, label_names) in COUNTERS.items():
                family = CounterMetricFamily(name, help_text, labels=list(label_names))
                for labels, value in sorted(self._values[name].items()):
                    family.add_metric(list(labels), value)
                families.append(family)
            for name, (help_text, _) in HISTOGRAMS.items():
                family = HistogramMetricFamily(name, help_text, labels=list(REQUEST_LABELS))
                for labels, hist in sorted(self._histograms[name].items()):
                    family.add_metric(list(labels), hist.buckets(), hist.total)
                families.append(family)
        for kind, extra in ((CounterMetricFamily, counters), (GaugeMetricFamily, gauges)):
            for name, (help_text, series) in extra.items():
                family = kind(name, help_text, labels=[k for k, _ in next(iter(series), ())])
                for labels, value in series.items():
                    family.add_metric([v for _, v in labels], value)
                families.append(family)
        return generate_latest(_Families(families)).decode()


class _Families:
    """Just enough of a CollectorRegistry for prometheus_client.generate_latest."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


# --------------------------------------------------------------------------- streaming


class _Cancelled(Exception):
    """The client went away: stop generating (raised from the engine's on_tokens callback)."""


@dataclass
class _Prepared:
    """A validated request, ready to generate."""

    chat: bool
    request_id: str
    created: int
    prompt_ids: list[int]
    params: SamplingParams
    cluster: str
    include_usage: bool


class _StreamText:
    """Turns streamed token ids into text deltas that are always a prefix of the final text.

    The engine may run up to one round past EOS or a stop string, and a byte-level BPE
    may end mid-character, so: ids after the first EOS (or past max_tokens) are ignored,
    no text at or after a stop string is sent, a tail that could be the start of a stop
    string is held back, and so is a trailing U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer, eos_ids: set[int], params: SamplingParams) -> None:
        self.tokenizer, self.eos_ids, self.params = tokenizer, eos_ids, params
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def add(self, new_ids: list[int]) -> str:
        if self.done:
            return ""
        for t in new_ids:
            if len(self.ids) >= self.params.max_tokens:
                self.done = True
                break
            self.ids.append(t)
            if t in self.eos_ids:
                self.done = True
                break
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        safe = text[: self._safe_length(text)]
        if not safe.startswith(self.sent):  # decode was not prefix-stable here: let the final text settle it
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def _safe_length(self, text: str) -> int:
        cut = len(text)
        for s in self.params.stop:
            if (i := text.find(s)) >= 0:
                cut, self.done = min(cut, i), True
        hold = 0
        for s in self.params.stop:
            hold = max(hold, next((k for k in range(min(len(s) - 1, cut), 0, -1) if text[:cut].endswith(s[:k])), 0))
        cut -= hold
        while cut > 0 and text[cut - 1] == "\ufffd":
            cut -= 1
        return cut

    def finish(self, final_text: str) -> str:
        """The rest of the final (non-streamed) text after what was sent."""
        if not final_text.startswith(self.sent):
            log.warning("streamed text diverged from the final text (tokenizer decode is not prefix-stable); "
                        "the stream's concatenation may differ from the non-streamed response")
            return ""
        return final_text[len(self.sent):]


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = _sse("[DONE]")


class SSEStream:
    """Iterator of Server-Sent-Event strings for one request, ending with ``data: [DONE]``.

    Generation starts on the first ``next()`` in a worker thread, which feeds each round's
    tokens through a queue. ``close()`` may be called from any thread (e.g. the event loop
    when the client disconnects): it ends iteration and makes the engine stop at its next
    round, so the generation lock is not held for an absent client.
    """

    def __init__(self, core: ServingCore, prep: _Prepared) -> None:
        self._core, self._prep = core, prep
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._lines = self._generate_lines()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> SSEStream:
        return self

    def __next__(self) -> str:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="osd-stream", daemon=True)
            self._thread.start()
        return next(self._lines)

    def close(self) -> None:
        self._cancel.set()
        self._events.put(("cancelled", None))

    def _work(self) -> None:
        def on_tokens(ids: list[int]) -> None:
            if self._cancel.is_set():
                raise _Cancelled
            self._events.put(("tokens", list(ids)))

        try:
            self._events.put(("done", self._core._generate(self._prep, on_tokens, self._cancel)))
        except _Cancelled:
            self._events.put(("cancelled", None))
        except ServingError as e:
            self._events.put(("error", e))
        except Exception as e:  # the 200 is already sent: report in-band, keep serving
            log.exception("streamed request %s failed", self._prep.request_id)
            self._core.metrics.observe_error(500)
            self._events.put(("error", e))

    def _generate_lines(self) -> Iterator[str]:
        core, prep = self._core, self._prep
        text = _StreamText(core.tokenizer, core.engine.eos_ids, prep.params)
        if prep.chat:
            yield _sse(core._chunk(prep, Delta(role="assistant", content="")).model_dump_json())
        while True:
            kind, payload = self._events.get()
            if kind == "tokens":
                if delta := text.add(payload):
                    yield _sse(core._chunk(prep, delta).model_dump_json())
            elif kind == "done":
                gen, cluster, live = payload
                tail = text.finish(gen.text)
                yield _sse(core._chunk(prep, tail, gen.finish_reason, core._osd_stats(gen, cluster, live))
                           .model_dump_json())
                if prep.include_usage:
                    yield _sse(core._chunk(prep, None, usage=_usage(gen)).model_dump_json())
                yield SSE_DONE
                return
            elif kind == "error":
                status = payload.status if isinstance(payload, ServingError) else 500
                message = payload.message if isinstance(payload, ServingError) else (
                    f"generation failed ({type(payload).__name__}); see the replica log")
                yield _sse(_json(error_body(message, "server_error" if status >= 500 else "invalid_request_error")))
                yield SSE_DONE
                return
            else:  # cancelled
                return


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _usage(gen: Generation) -> Usage:
    prompt, completion = gen.stats.prompt_tokens, len(gen.output_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# --------------------------------------------------------------------------- the core


class ServingCore:
    """Target + live drafts behind OpenAI-style request handling; see the module docstring."""

    def __init__(self, engine: SpeculativeEngine, model_name: str = "osd", *, recorder: Recorder | None = None,
                 registry: DraftRegistry | None = None, draft_version: int = 0,
                 max_prompt_tokens: int | None = None, dashboard: DashboardStore | None = None,
                 buffer: RecordBuffer | None = None, metrics_mirror: MetricsMirror | None = None,
                 router: Router | None = None, max_cluster_drafts: int = 8,
                 shared: SharedBaseDrafts | None = None) -> None:
        self.engine = engine
        # Shared-base mode: one base draft, clusters differ by LoRA adapters. The wrapped base must
        # only be called through its AdapterDrafts, so the engine's default draft becomes the bare base.
        self.shared = shared
        if shared is not None:
            engine.draft = shared.base_draft()
        self.router = router  # None: requests that name no cluster go to 'global'
        self.max_cluster_drafts = max_cluster_drafts  # cluster drafts held besides global's (LRU beyond)
        self.dashboard = dashboard  # history for /dashboard (None: no dashboard)
        self.buffer = buffer  # only read, for the backlog gauges on /metrics
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.recorder = recorder
        self.registry = registry
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

    # -- encoding ------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt (the tokenizer's usual special tokens, e.g. BOS, included)."""
        return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: list[ChatMessage] | list[dict]) -> list[int]:
        """Chat messages -> prompt ids, with the tokenizer's chat template and the assistant prefix
        (as osd.data.chat_prompt_ids); tokenizers without a template get "role: content" lines."""
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
        """POST /v1/completions without streaming -> a Completion dict."""
        prep = self._prepare(_coerce(req, CompletionRequest))
        gen, cluster, live = self._generate(prep)
        return Completion(id=prep.request_id, created=prep.created, model=self.model_name,
                          choices=[CompletionChoice(text=gen.text, finish_reason=gen.finish_reason)],
                          usage=_usage(gen), osd=self._osd_stats(gen, cluster, live)).model_dump()

    def chat(self, req: ChatCompletionRequest | dict) -> dict:
        """POST /v1/chat/completions without streaming -> a ChatCompletion dict."""
        prep = self._prepare(_coerce(req, ChatCompletionRequest))
        gen, cluster, live = self._generate(prep)
        return ChatCompletion(id=prep.request_id, created=prep.created, model=self.model_name,
                              choices=[ChatChoice(message=AssistantMessage(content=gen.text),
                                                  finish_reason=gen.finish_reason)],
                              usage=_usage(gen), osd=self._osd_stats(gen, cluster, live)).model_dump()

    def stream_complete(self, req: CompletionRequest | dict) -> SSEStream:
        """Validate now (errors raise before anything is streamed), then stream SSE completion chunks."""
        return SSEStream(self, self._prepare(_coerce(req, CompletionRequest)))

    def stream_chat(self, req: ChatCompletionRequest | dict) -> SSEStream:
        """Validate now, then stream SSE chat-completion chunks (first chunk: the assistant role)."""
        return SSEStream(self, self._prepare(_coerce(req, ChatCompletionRequest)))

    def _prepare(self, req: CompletionRequest | ChatCompletionRequest) -> _Prepared:
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
        return _Prepared(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), prompt_ids,
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
        if pinned is not None and not _CLUSTER_RE.match(pinned):
            raise ServingError(400, f"invalid cluster name {pinned!r}: use 1-128 characters from [A-Za-z0-9_.-]",
                               "model" if from_model else "osd.cluster")
        return pinned

    def _generate(self, prep: _Prepared, on_tokens: Callable[[list[int]], None] | None = None,
                  cancel: threading.Event | None = None) -> tuple[Generation, str, LiveDraft]:
        arrived = time.monotonic()
        with self._state_lock:
            self._waiting += 1
        with self._generate_lock:
            with self._state_lock:
                self._waiting -= 1
                self._running += 1
            try:
                if cancel is not None and cancel.is_set():
                    raise _Cancelled
                live = self.live_draft(prep.cluster)  # read once: draft and version travel together
                gen = self.engine.generate(prep.prompt_ids, prep.params, draft_version=live.version,
                                           cluster=prep.cluster, on_tokens=on_tokens, draft=live.draft)
            finally:
                with self._state_lock:
                    self._running -= 1
        self.metrics.observe_request(prep.cluster, live.version, gen, latency_s=time.monotonic() - arrived)
        if self.dashboard is not None:  # queued for a background thread: never waits for Redis
            s = gen.stats
            self.dashboard.post_request(prep.cluster, live.version, s.alpha_hat, len(gen.output_ids),
                                        s.target_forwards, s.elapsed_s)
        if gen.record is not None and self.recorder is not None:
            gen.record.request_id = prep.request_id.split("-", 1)[1]  # ties the record to the response id
            self.recorder.submit(gen.record)  # never blocks, never raises
        return gen, prep.cluster, live

    def _osd_stats(self, gen: Generation, cluster: str, live: LiveDraft) -> OsdStats:
        s = gen.stats
        return OsdStats(draft_version=live.version, cluster=cluster, draft_cluster=live.lineage, proposed=s.proposed, accepted=s.accepted,
                        rounds=s.rounds, mean_acceptance_length=s.mean_acceptance_length, alpha_hat=s.alpha_hat,
                        target_forwards=s.target_forwards)

    def _chunk(self, prep: _Prepared, content: str | Delta | None, finish_reason: str | None = None,
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
        if not _CLUSTER_RE.match(cluster):
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
        problems = _spec_diff(tensor_specs(state_dict), _normalize_specs(published_specs(template, state_dict)))
        if problems:
            raise DraftMismatchError(
                f"draft v{version} for cluster {cluster!r} does not fit the live draft: {'; '.join(problems)}. "
                f"Keeping v{self.live_draft(cluster).version}; publish a draft built for this target and draft "
                "construction.")
        try:  # a copy of global's construction and shortlist, with these weights (and acceptance head)
            return load_published_state(template, dict(state_dict))
        except RuntimeError as e:
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
            template = self._drafts[DEFAULT_CLUSTER].draft
            if template is None:
                raise DraftMismatchError("this replica serves without a draft; it cannot load registry drafts")
            specs = (self.shared.adapter_specs() if self.shared is not None
                     else published_specs(template, manifest.tensors))
            state = registry.load_validated(cluster, manifest.version, specs)
            live = self.swap_draft(manifest.version, state, cluster, meta=manifest.meta)
        if self.shared is not None:
            self.shared.collect()  # adapters whose last request has ended since the last sync
        return live

    def drafts_info(self) -> dict:
        """cluster -> what this replica holds, and the registry's live version when there is a registry."""
        with self._pair_lock:
            held = dict(self._drafts)
        out: dict[str, dict] = {c: {"version": d.version, "has_draft": d.draft is not None} for c, d in held.items()}
        if self.registry is not None:
            try:
                for c in sorted(set(self.registry.clusters()) | set(held)):
                    manifest = self.registry.live(c)
                    out.setdefault(c, {"version": None, "has_draft": False})["registry_live"] = (
                        manifest.version if manifest else None)
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
        with self._state_lock:
            return {"running": self._running, "waiting": self._waiting}

    def health(self) -> dict:
        with self._pair_lock:
            drafts = {c: d.version for c, d in self._drafts.items()}
        return {"status": "ok", "model": self.model_name, "drafts": drafts, **self.load()}

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
_TRAINER_METRICS = (  # (name, field of DashboardStore.trainer_counters, help, is a counter)
    ("osd:trainer_updates", "updates", "Trainer updates (each ends with a gate decision).", True),
    ("osd:trainer_promotions", "promotions", "Candidates the gate promoted (published as a new version).", True),
    ("osd:trainer_rejections", "rejections", "Candidates the gate refused.", True),
    ("osd:draft_rollbacks", "rollbacks", "Admin rollbacks of the live draft.", True),
    ("osd:trainer_loss", "loss", "Distillation loss of the last update.", False),
    ("osd:trainer_gate_alpha_candidate", "alpha_candidate", "Gate alpha-hat of the last candidate (held-out).",
     False),
    ("osd:trainer_gate_alpha_live", "alpha_live", "Gate alpha-hat of the live draft on the same records.", False),
)


def _coerce(req: Any, cls: type) -> Any:
    return req if isinstance(req, cls) else cls.model_validate(req)
