"""OpenAI-compatible request and response schemas, plus the osd extensions.

Requests follow the OpenAI completions / chat-completions API closely enough for the
official ``openai`` client to work unchanged. osd adds one request field, ``osd``
({"cluster": ...}, sent with ``extra_body``), and one response field, ``osd`` (the draft
version and speculative-decoding statistics of that request; ``resp.model_extra["osd"]``
in the client).

Defaults follow OpenAI where OpenAI has one (``temperature`` 1.0, ``top_p`` 1.0, ``n`` 1);
``max_tokens`` defaults to 64. Unknown fields are ignored, as OpenAI-compatible servers
usually do; OpenAI fields osd cannot honour (``n`` > 1, ``best_of``, penalties, ...) get a
400 that names the field rather than being silently dropped. The JSON schema (``/openapi.json``)
states the values osd accepts for them, so schema-driven clients and fuzzers see the real API.

A completions ``prompt`` may be a list, as in OpenAI (``split_prompts``): each prompt becomes one
choice, in order, and ``merge_completions`` builds the response from one completion per prompt.

Completions take OpenAI's legacy ``logprobs`` (top N per token, N <= 5) and ``echo`` (the prompt
before the text; with ``max_tokens`` 0, the prompt alone: a scoring request), the shape
evaluation harnesses use (``completion_logprobs``). The log-probs are the target's raw
distribution (osd/decoding/logprobs.py). Neither is streamed: with ``stream`` they are a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from osd.config import GREEDY_BELOW, SamplingParams
from osd.decoding.logprobs import MAX_TOP_LOGPROBS, TokenLogprobs

MAX_STOP_STRINGS = 8  # SamplingParams' limit: every stop string is searched for every round
MAX_PROMPTS = 32  # prompts in one completions request; they run one after another on the replica
MIN_TOP_P = 1e-8  # any smaller top_p keeps only the likeliest token, as this one does; float32 makes 5e-324 a 0


class ServingError(Exception):
    """A request osd will not serve as sent: ``status`` is the HTTP status, ``param`` the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 503: "overloaded_error"}


def error_type(status: int) -> str:
    """The OpenAI-style ``error.type`` for an HTTP status."""
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --------------------------------------------------------------------------- requests


def _first_lone_surrogate(value: Any) -> str | None:
    """The first unpaired UTF-16 surrogate in a string (or in the strings of a list), escaped; None if none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return ascii(value[e.start])
        return None
    if isinstance(value, (list, tuple)):
        return next((found for v in value if (found := _first_lone_surrogate(v)) is not None), None)
    return None


class _Request(BaseModel):
    # Unknown fields are ignored (clients send vendor extras); known ones are validated.
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # JSON can spell a lone UTF-16 surrogate ("\udcff"); Python accepts it, no tokenizer can encode it.
        if (found := _first_lone_surrogate(value)) is not None:
            raise ValueError(f"contains an unpaired UTF-16 surrogate ({found}); send valid Unicode text "
                             "(surrogates only in pairs, or the character itself as UTF-8)")
        return value


class OsdOptions(_Request):
    """The ``osd`` request extension."""

    cluster: str | None = Field(None, description="Pin the request to this query cluster (its draft serves it, its record trains it); None = the router decides ('global' when routing is off).")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with empty choices carrying usage (OpenAI semantics).")


def _only(value: Any) -> dict:
    """JSON-schema override for an unsupported OpenAI field: the one value (or null) osd accepts; others get a 400."""
    return {"anyOf": [{"const": value}, {"type": "null"}]}


class _SamplingFields(_Request):
    """Fields shared by both endpoints."""

    model: str | None = Field(None, description="Served model name (GET /v1/models); omitted = the served model.")
    max_tokens: int | None = Field(None, ge=1, description="Maximum new tokens; None = 64.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature in [0, 2]; default 1.0 as in OpenAI; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass in (0, 1]; 1 disables.")
    top_k: int = Field(0, ge=-1, description="Extension (vLLM-style): keep the k likeliest tokens; 0 or -1 disables.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} non-empty strings that end generation; not included in the output.",
                                         json_schema_extra={"anyOf": [
                                             {"type": "string", "minLength": 1}, {"type": "null"},
                                             {"type": "array", "items": {"type": "string", "minLength": 1},
                                              "maxItems": MAX_STOP_STRINGS}]})
    stream: bool = Field(False, description="Stream Server-Sent Events ending in 'data: [DONE]'.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options; only include_usage.")
    seed: int | None = Field(None, ge=0, le=2**62, description="Seed for reproducible sampling; None draws a fresh one.")
    n: int = Field(1, ge=1, description="Completions per prompt; only 1 is supported (400 otherwise).",
                   json_schema_extra={"maximum": 1})
    user: str | None = Field(None, description="End-user id; accepted and ignored.")
    presence_penalty: float | None = Field(None, description="Unsupported: only 0/None is accepted.",
                                           json_schema_extra=_only(0))
    frequency_penalty: float | None = Field(None, description="Unsupported: only 0/None is accepted.",
                                            json_schema_extra=_only(0))
    logit_bias: dict[str, float] | None = Field(None, description="Unsupported: only empty/None is accepted.",
                                                json_schema_extra={"maxProperties": 0})
    osd: OsdOptions | None = Field(None, description="osd extension: which cluster's draft to use.")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = {"anyOf": [  # what the validator below accepts; lengths beyond these get a 400 naming the prompt
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_PROMPTS},
    _TOKEN_IDS,
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS},
]}
PROMPT_SHAPES = "a string, a list of strings, a list of token ids (integers) or a list of token-id lists"

Prompt = str | list[int]  # one prompt: text, or token ids


def _is_token_id(value: Any) -> bool:
    """A JSON integer: an int, or a number with no fraction (JSON Schema's "integer"); not a bool or a string."""
    return type(value) is int or (type(value) is float and value.is_integer())


def _token_id(value: Any) -> int:
    if not _is_token_id(value):
        raise ValueError("token ids are integers")
    return int(value)


TokenId = Annotated[int, BeforeValidator(_token_id)]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description=f"The prompt: text or token ids of the served model's tokenizer, or a list of up to {MAX_PROMPTS} "
                    "such prompts (strings or token-id lists), each answered by its own choice (index = position).",
        json_schema_extra=_PROMPT_SCHEMA)
    max_tokens: int | None = Field(None, ge=0, description="Maximum new tokens; None = 64. 0 only with echo: the "
                                                           "prompt is scored, nothing is generated.")
    logprobs: int | None = Field(None, description=f"Return log-probabilities: of each token, and of the N (0 to "
                                                   f"{MAX_TOP_LOGPROBS}) likeliest tokens at each position. The "
                                                   "target's raw distribution (temperature 1, before top-k/top-p). "
                                                   "Not with stream.",
                                 json_schema_extra={"minimum": 0, "maximum": MAX_TOP_LOGPROBS})
    echo: bool = Field(False, description="Put the prompt before the generated text (and, with logprobs, its "
                                          "tokens' log-probs first; the first token's is null). Not with stream.")
    best_of: int | None = Field(None, description="Unsupported: only 1/None is accepted.", json_schema_extra=_only(1))
    suffix: str | None = Field(None, description="Unsupported: only None is accepted.",
                               json_schema_extra={"type": "null"})

    @field_validator("logprobs")
    @classmethod
    def _logprobs_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs is how many likeliest tokens to list at each position, 0 to "
                             f"{MAX_TOP_LOGPROBS} (OpenAI's limit), got {v}; the chosen token's log-prob comes "
                             "with any of them")
        return v

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler) -> Any:
        # The union's own errors ("prompt.str: Input should be a valid string (and 4 more)") say little.
        try:
            return handler(value)
        except ValidationError:
            if (problem := _prompt_problem(value)) is None:
                raise
            raise ValueError(f"must be {PROMPT_SHAPES}; {problem}") from None

    @property
    def prompts(self) -> list[Prompt]:
        """The prompts, one per choice: a string or a token-id list is one prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


_JSON_KINDS = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "an object"}


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _prompt_problem(value: Any) -> str | None:
    """Where a prompt that fits none of the four shapes goes wrong, e.g. 'prompt[2] is a number (1.5)';
    None if its shape is one of them."""
    if not isinstance(value, list):
        return None if isinstance(value, str) else f"got {_kind(value)}"
    if not value:
        return None
    first = value[0]
    if isinstance(first, list):  # token-id lists: every item a list of integers
        for i, item in enumerate(value):
            if not isinstance(item, list):
                return f"prompt[{i}] is {_kind(item)}, but prompt[0] is a token-id list"
            for j, t in enumerate(item):
                if not _is_token_id(t):
                    return f"prompt[{i}][{j}] is {_kind(t)} ({t!r:.40}); token ids are integers"
        return None
    fits = (lambda v: type(v) is str) if type(first) is str else _is_token_id if _is_token_id(first) else None
    if fits is None:
        return f"prompt[0] is {_kind(first)} ({first!r:.40})"
    for i, item in enumerate(value):
        if not fits(item):
            return f"prompt[{i}] is {_kind(item)} ({item!r:.40}), but prompt[0] is {_kind(first)}"
    return None


class TextPart(_Request):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text of this part.")


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"] = Field(description="Who wrote the message.")
    content: str | list[TextPart] = Field(description="Message text, or a list of text parts (joined).")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far; at least one message.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens; wins when both are set.")
    logprobs: bool | None = Field(None, description="Unsupported: only false/None is accepted.")
    tools: list[Any] | None = Field(None, description="Unsupported: only None/empty is accepted.")


DEFAULT_MAX_TOKENS = 64


def split_prompts(req: CompletionRequest, vocab_size: int) -> list[CompletionRequest]:
    """One single-prompt request per prompt of ``req``, in order (raises ServingError 400).

    Checked here, before any prompt generates: the number of prompts, streaming (one prompt
    only), empty prompts and token ids outside ``[0, vocab_size)`` (each bad id named with its
    position). Whether a prompt fits the context is checked per prompt when it runs.
    """
    prompts = req.prompts
    if not prompts:
        raise ServingError(400, "prompt is an empty list: send a prompt (text or token ids), or a list of them", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ServingError(400, f"{len(prompts)} prompts in one request; osd takes at most {MAX_PROMPTS}: "
                                "split them over several requests", "prompt")
    if req.stream and len(prompts) > 1:
        raise ServingError(400, f"stream=true takes one prompt, got {len(prompts)}: send one streamed request per "
                                "prompt, or set stream to false to get every choice in one response", "stream")
    many = len(prompts) > 1
    bad = []
    for i, p in enumerate(prompts):
        where = f"prompt[{i}]" if many else "prompt"
        if not p:
            raise ServingError(400, f"{where} is empty: send at least one "
                                    f"{'character of text' if isinstance(p, str) else 'token id'}", "prompt")
        if not isinstance(p, str):
            bad += [(f"{where}[{j}]", t) for j, t in enumerate(p) if not 0 <= t < vocab_size]
    if bad:
        named = ", ".join(f"{w} = {t if abs(t) < 10**12 else f'{t:.3g}'}" for w, t in bad[:5])
        named += f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ServingError(400, f"token ids outside the served model's vocabulary: {named}; token ids must be in "
                                f"[0, {vocab_size})", "prompt", "invalid_token_id")
    return [req.model_copy(update={"prompt": p}) for p in prompts]


def _unsupported(req: _SamplingFields) -> None:
    """400 for OpenAI features osd does not implement, so clients are not silently misled."""
    if req.n != 1:
        raise ServingError(400, f"n={req.n} is not supported: osd returns one choice per request; send n=1 "
                                "(or several requests)", "n")
    chat = isinstance(req, ChatCompletionRequest)
    checks = {"presence_penalty": not req.presence_penalty, "frequency_penalty": not req.frequency_penalty,
              "logit_bias": not req.logit_bias, "logprobs": not (chat and req.logprobs),
              "best_of": getattr(req, "best_of", None) in (None, 1),
              "suffix": getattr(req, "suffix", None) is None, "tools": not getattr(req, "tools", None)}
    for name, ok in checks.items():
        if not ok:
            where = " on /v1/chat/completions (POST /v1/completions has logprobs)" if name == "logprobs" else ""
            raise ServingError(400, f"{name} is not supported by osd{where}; remove it from the request", name)
    if chat:
        return
    if req.stream and (req.logprobs is not None or req.echo):
        name = "logprobs" if req.logprobs is not None else "echo"
        raise ServingError(400, f"{name} is not streamed by osd: send stream=false to get it, or drop {name} "
                                "to stream", name)
    if req.max_tokens == 0 and not req.echo:
        raise ServingError(400, "max_tokens=0 generates nothing: it scores a prompt, so send echo=true with it "
                                "(and logprobs for the prompt's token log-probs), or max_tokens >= 1", "max_tokens")


def to_sampling_params(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    """Map an API request onto the engine's SamplingParams (raises ServingError 400 for unsupported fields)."""
    _unsupported(req)
    max_tokens = next((m for m in (getattr(req, "max_completion_tokens", None), req.max_tokens) if m is not None),
                      DEFAULT_MAX_TOKENS)
    max_tokens = max(max_tokens, 1)  # 0 (echo only) generates nothing: the core scores the prompt instead
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    # Limits, not refusals: a temperature under GREEDY_BELOW is greedy, a top_p under MIN_TOP_P keeps the top
    # token alone; passed through, float32 turns them into inf / 0 and sampling would see NaN.
    temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=max(req.top_p, MIN_TOP_P),
                          top_k=max(req.top_k, 0), stop=stop, seed=req.seed)


# --------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt (after the chat template).")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class OsdStats(BaseModel):
    """The ``osd`` response extension: which draft served the request and how well it did."""

    draft_version: int = Field(description="Draft version used for the whole request (0 = the initial draft).")
    cluster: str = Field(description="Query cluster of the request (pinned by the client or chosen by the router); "
                                     "its training record joins this cluster's buffer.")
    draft_cluster: str = Field(description="Whose draft served it: the cluster's own, or 'global' until the "
                                           "cluster has one on this replica.")
    proposed: int = Field(description="Tokens proposed for verification (the draft's, plus suffix candidates when suffix is on).")
    accepted: int = Field(description="Proposed tokens the target accepted.")
    rounds: int = Field(description="Speculative rounds (target verifications with at least one proposal).")
    mean_acceptance_length: float = Field(description="1 + accepted / rounds (vLLM's convention).")
    alpha_hat: float | None = Field(description="Mean Σ min(p, q) over verified positions; None without a draft.")
    target_forwards: int = Field(description="Target decode forwards (prefill excluded).")
    accepted_by_source: dict[str, int] = Field(description="Accepted tokens by who proposed them: 'draft' only, 'suffix' only (suffix speculation's indexes) or 'both'; they sum to accepted (a draft's chain: all 'draft'; a batched suffix chain: all 'suffix').")
    suffix: bool = Field(description="Whether suffix speculation is on: candidates from the request's own text and its cluster's recent traffic join the draft's.")
    dtype: str = Field(description="Weights dtype the target ran in, e.g. 'bfloat16' (ModelConfig.dtype 'auto' resolved).")


LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token of probability 0 reports this (vLLM's value)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions ``logprobs``: four lists, one entry per token (prompt tokens first with echo)."""

    tokens: list[str] = Field(description="Each token's text (special tokens included, as the tokenizer spells them).")
    token_logprobs: list[float | None] = Field(description="Log-probability of each token given the ones before it; "
                                                           "null for a prompt's first token.")
    top_logprobs: list[dict[str, float] | None] = Field(
        description=f"Per position, the logprobs N likeliest tokens (text -> log-prob), plus the chosen token "
                    f"when it is not among them (so N or N + 1 entries, N <= {MAX_TOP_LOGPROBS}); null for a "
                    "prompt's first token.")
    text_offset: list[int] = Field(description="Character offset of each token in prompt + text, as OpenAI "
                                               "counts it (also without echo): the lengths of the tokens before.")


def completion_logprobs(tokenizer: Any, parts: list[tuple[TokenLogprobs, int]]) -> CompletionLogprobs:
    """The API's ``logprobs`` object for runs of tokens (osd.decoding.logprobs), each with the text offset its
    first token starts at: ``[(prompt, 0), (output, len(prompt text))]`` under echo, else ``[(output, len(prompt text))]``.

    Offsets add up each token's own decoded length (special tokens count 0, as the text skips them),
    as vLLM does: decoding every prefix instead would cost O(n²) per request. They equal the
    offsets in the text except where one character spans several tokens.
    """
    ids = [t for entries, _ in parts for t in entries.token_ids]
    top_ids = sorted({t for entries, _ in parts for row in entries.top_ids if row for t in row} - set(ids))
    names = dict(zip(ids + top_ids, tokenizer.batch_decode([[t] for t in ids + top_ids])))
    special = set(getattr(tokenizer, "all_special_ids", ()))
    offsets: list[int] = []
    for entries, at in parts:
        for t in entries.token_ids:
            offsets.append(at)
            at += 0 if t in special else len(names[t])
    top: list[dict[str, float] | None] = []
    logprobs: list[float | None] = []
    for entries, _ in parts:
        for chosen, lp, row_ids, row_lps in zip(entries.token_ids, entries.logprobs, entries.top_ids,
                                                entries.top_logprobs):
            logprobs.append(None if lp is None else max(lp, LOGPROB_FLOOR))
            if row_ids is None:
                top.append(None)
                continue
            row: dict[str, float] = {}
            for t, v in [*zip(row_ids, row_lps), (chosen, lp)]:
                row.setdefault(names[t], max(v, LOGPROB_FLOOR))  # best first: a text two ids share keeps the likelier
            top.append(row)
    return CompletionLogprobs(tokens=[names[t] for t in ids], token_logprobs=logprobs, top_logprobs=top,
                              text_offset=offsets)


class CompletionChoice(BaseModel):
    index: int = Field(0, description="Which prompt this choice answers: its position in a prompt list, else 0.")
    text: str = Field(description="Generated text, cut before any stop string; with echo, the prompt first.")
    finish_reason: Literal["stop", "length"] | None = Field(description="'stop' (EOS or stop string) or 'length'.")
    logprobs: CompletionLogprobs | None = Field(None, description="With logprobs in the request: per-token "
                                                                  "log-probs (prompt tokens first with echo).")


class Completion(BaseModel):
    id: str = Field(description="Request id, 'cmpl-…'.")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[CompletionChoice] = Field(description="One choice.")
    usage: Usage = Field(description="Token counts.")
    osd: OsdStats = Field(description="Draft version and speculative stats.")


def merge_completions(parts: list[dict]) -> dict:
    """One Completion dict for several prompts, from their single-prompt Completions (``split_prompts`` order).

    Choice i is prompt i's, and carries that request's own ``osd`` stats (``choice.model_extra["osd"]``
    in the client); usage sums over the prompts. The top-level ``osd`` sums the counters,
    recomputes the mean acceptance length from the sums, averages alpha_hat weighted by tokens
    proposed, and names the first prompt's draft version and clusters (a prompt's own may differ:
    the router places each prompt, and a draft can be swapped between two prompts). The id
    and created time are the first prompt's.
    """
    first = parts[0]
    choices = [dict(p["choices"][0], index=i, osd=p["osd"]) for i, p in enumerate(parts)]
    usage = {k: sum(p["usage"][k] for p in parts) for k in first["usage"]}
    stats = [p["osd"] for p in parts]
    summed = {k: sum(s[k] for s in stats) for k in ("proposed", "accepted", "rounds", "target_forwards")}
    weighted = [(s["alpha_hat"], s["proposed"]) for s in stats if s["alpha_hat"] is not None]
    weight = sum(w for _, w in weighted)
    alpha_hat = (sum(a * w for a, w in weighted) / weight if weight
                 else weighted[0][0] if weighted else None)
    by_source = {k: sum(s["accepted_by_source"].get(k, 0) for s in stats)
                 for k in dict.fromkeys(k for s in stats for k in s["accepted_by_source"])}
    osd = OsdStats(**dict(first["osd"], **summed, alpha_hat=alpha_hat, accepted_by_source=by_source,
                          mean_acceptance_length=1.0 + summed["accepted"] / summed["rounds"] if summed["rounds"]
                          else 1.0))
    return dict(first, choices=choices, usage=usage, osd=osd.model_dump())


class CompletionChunk(BaseModel):
    """A streamed completion chunk: text deltas; OpenAI streams completions with the same object name."""

    id: str = Field(description="Same id on every chunk of a stream.")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[CompletionChoice] = Field(description="One choice, or none on the usage chunk.")
    usage: Usage | None = Field(None, description="Only on the usage chunk (stream_options.include_usage).")
    osd: OsdStats | None = Field(None, description="On the last chunk with a finish_reason.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="Generated text.")


class ChatChoice(BaseModel):
    index: int = Field(0, description="Always 0 (n = 1).")
    message: AssistantMessage = Field(description="The reply.")
    finish_reason: Literal["stop", "length"] | None = Field(description="'stop' (EOS or stop string) or 'length'.")
    logprobs: None = Field(None, description="Always null (logprobs unsupported).")


class ChatCompletion(BaseModel):
    id: str = Field(description="Request id, 'chatcmpl-…'.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[ChatChoice] = Field(description="One choice.")
    usage: Usage = Field(description="Token counts.")
    osd: OsdStats = Field(description="Draft version and speculative stats.")


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="Set on the first chunk only.")
    content: str | None = Field(None, description="New text.")


class ChatChunkChoice(BaseModel):
    index: int = Field(0, description="Always 0 (n = 1).")
    delta: Delta = Field(description="What this chunk adds.")
    finish_reason: Literal["stop", "length"] | None = Field(None, description="Set on the last content chunk.")
    logprobs: None = Field(None, description="Always null.")


class ChatCompletionChunk(BaseModel):
    id: str = Field(description="Same id on every chunk of a stream.")
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[ChatChunkChoice] = Field(description="One choice, or none on the usage chunk.")
    usage: Usage | None = Field(None, description="Only on the usage chunk (stream_options.include_usage).")
    osd: OsdStats | None = Field(None, description="On the last chunk with a finish_reason.")


class ModelCard(BaseModel):
    id: str = Field(description="Model name to send as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the replica started.")
    owned_by: str = Field("osd", description="Always 'osd'.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(description="The served model (one).")
