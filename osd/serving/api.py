"""OpenAI-compatible request and response schemas, plus the osd extensions.

Requests follow the OpenAI completions / chat-completions API closely enough for the
official ``openai`` client to work unchanged. osd adds one request field, ``osd``
({"cluster": ...}, sent with ``extra_body``), and one response field, ``osd`` (the draft
version and speculative-decoding statistics of that request; ``resp.model_extra["osd"]``
in the client).

Defaults follow OpenAI where OpenAI has one (``temperature`` 1.0, ``top_p`` 1.0, ``n`` 1);
``max_tokens`` defaults to 64. Unknown fields are ignored, as OpenAI-compatible servers
usually do; OpenAI fields osd cannot honour (``n`` > 1, ``logprobs``, penalties, ...) get a
400 that names the field rather than being silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from osd.config import SamplingParams

MAX_STOP_STRINGS = 8  # SamplingParams' limit: every stop string is searched for every round


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


class _SamplingFields(_Request):
    """Fields shared by both endpoints."""

    model: str | None = Field(None, description="Served model name (GET /v1/models); omitted = the served model.")
    max_tokens: int | None = Field(None, ge=1, description="Maximum new tokens; None = 64.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature in [0, 2]; default 1.0 as in OpenAI; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass in (0, 1]; 1 disables.")
    top_k: int = Field(0, ge=-1, description="Extension (vLLM-style): keep the k likeliest tokens; 0 or -1 disables.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} non-empty strings that end generation; not included in the output.")
    stream: bool = Field(False, description="Stream Server-Sent Events ending in 'data: [DONE]'.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options; only include_usage.")
    seed: int | None = Field(None, ge=0, le=2**62, description="Seed for reproducible sampling; None draws a fresh one.")
    n: int = Field(1, ge=1, description="Completions per prompt; only 1 is supported (400 otherwise).")
    user: str | None = Field(None, description="End-user id; accepted and ignored.")
    presence_penalty: float | None = Field(None, description="Unsupported: only 0/None is accepted.")
    frequency_penalty: float | None = Field(None, description="Unsupported: only 0/None is accepted.")
    logit_bias: dict[str, float] | None = Field(None, description="Unsupported: only empty/None is accepted.")
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


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(description="The prompt: text, or token ids of the served model's tokenizer.")
    logprobs: int | None = Field(None, description="Unsupported: only 0/None is accepted.")
    echo: bool = Field(False, description="Unsupported: only false is accepted.")
    best_of: int | None = Field(None, description="Unsupported: only 1/None is accepted.")
    suffix: str | None = Field(None, description="Unsupported: only None is accepted.")


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


def _unsupported(req: _SamplingFields) -> None:
    """400 for OpenAI features osd does not implement, so clients are not silently misled."""
    if req.n != 1:
        raise ServingError(400, f"n={req.n} is not supported: osd returns one choice per request; send n=1 "
                                "(or several requests)", "n")
    checks = {"presence_penalty": not req.presence_penalty, "frequency_penalty": not req.frequency_penalty,
              "logit_bias": not req.logit_bias, "logprobs": not getattr(req, "logprobs", None),
              "echo": not getattr(req, "echo", False), "best_of": getattr(req, "best_of", None) in (None, 1),
              "suffix": getattr(req, "suffix", None) is None, "tools": not getattr(req, "tools", None)}
    for name, ok in checks.items():
        if not ok:
            raise ServingError(400, f"{name} is not supported by osd; remove it from the request", name)


def to_sampling_params(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    """Map an API request onto the engine's SamplingParams (raises ServingError 400 for unsupported fields)."""
    _unsupported(req)
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or DEFAULT_MAX_TOKENS
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
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
    accepted_by_source: dict[str, int] = Field(description="Accepted tokens by who proposed them: 'draft' only, 'suffix' only (suffix speculation's indexes) or 'both'; they sum to accepted (a chain: all 'draft').")
    suffix: bool = Field(description="Whether suffix speculation is on: candidates from the request's own text and its cluster's recent traffic join the draft's.")
    dtype: str = Field(description="Weights dtype the target ran in, e.g. 'bfloat16' (ModelConfig.dtype 'auto' resolved).")


class CompletionChoice(BaseModel):
    index: int = Field(0, description="Always 0 (n = 1).")
    text: str = Field(description="Generated text, cut before any stop string.")
    finish_reason: Literal["stop", "length"] | None = Field(description="'stop' (EOS or stop string) or 'length'.")
    logprobs: None = Field(None, description="Always null (logprobs unsupported).")


class Completion(BaseModel):
    id: str = Field(description="Request id, 'cmpl-…'.")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[CompletionChoice] = Field(description="One choice.")
    usage: Usage = Field(description="Token counts.")
    osd: OsdStats = Field(description="Draft version and speculative stats.")


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
