"""The FastAPI app around a ServingCore: the OpenAI-compatible HTTP surface of a replica.

The Ray Serve deployment (actors/) mounts ``build_app(core)`` with ``@serve.ingress``; it
also runs standalone under uvicorn (the tests do). Model work never runs on the event
loop: requests go to the thread pool, streams are fed from a worker thread, so /health
and /metrics answer while a generation runs. Requests waiting for the engine each hold one
of the thread pool's threads (anyio's default limit: 40), so keep Serve's
``max_ongoing_requests`` per replica well below that.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``):
malformed JSON or a body that is not UTF-8 400, unsupported field values 400 (e.g. n > 1),
unknown model or route 404, wrong method 405, a body that is not JSON 415, a body or prompt
over the limit 413, schema violations 422 (naming the field), admin auth 401/403, a refused
draft 409, anything unexpected 500 without a traceback (the replica keeps serving).
tests/serving/test_fuzz.py holds every route of /openapi.json to that (docs/api.md).

A completions ``prompt`` list runs the single-prompt path once per prompt and merges the
answers (``_complete_each``); streaming takes one prompt.

Besides the OpenAI routes: /health, /metrics (Prometheus text), /dashboard (the drift page),
/dashboard/data (its JSON, 503 while Redis is down), /dashboard/schema, and /admin/drafts.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    StreamingResponse,
)
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from osd.registry import DraftNotFoundError, RegistryError
from osd.serving.api import (
    ChatCompletionRequest,
    CompletionRequest,
    ServingError,
    error_body,
    error_type,
    merge_completions,
    split_prompts,
)
from osd.serving.core import ServingCore, SSEStream
from osd.serving.dashboard_schema import DashboardData

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 2**20  # far above any prompt a context window can hold
DASHBOARD_PAGE = Path(__file__).with_name("static") / "dashboard.html"


class RollbackBody(BaseModel):
    to_version: int | None = Field(None, ge=1, description="Version to go back to; None = the registry's "
                                                           "default (the live version's parent).")


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type(status), param, code), status_code=status, headers=headers)


def _field_name(loc: tuple) -> str:
    # ("body", "messages", 0, "role") -> "messages.0.role"
    return ".".join(str(p) for p in loc if p != "body") or "body"


async def _require_json(request: Request) -> None:
    """415 for bodies that are not JSON (curl -d defaults to a form type). A missing header is accepted."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise ServingError(415, f"Content-Type {content_type!r} is not supported; send a JSON body with "
                                "'Content-Type: application/json'", code="unsupported_media_type")


def build_app(core: ServingCore, admin_token: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The HTTP app. ``admin_token`` set: state-changing /admin routes need ``Authorization: Bearer <token>``."""
    app = FastAPI(title="osd", summary="Speculative decoding with online draft distillation (OpenAI-compatible API)")
    app.state.core = core
    app.openapi = _with_vocabulary(app.openapi, core.vocab_size)

    # -- errors -------------------------------------------------------------------------------

    def counted(response: JSONResponse) -> JSONResponse:
        core.metrics.observe_error(response.status_code)
        return response

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return counted(_error(exc.status, exc.message, exc.param, exc.code, headers))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            where = bad_json.get("loc", ())[-1]
            reason = (bad_json.get("ctx") or {}).get("error", "not valid JSON")
            return counted(_error(400, f"the request body is not valid JSON ({reason} at character {where}); "
                                       "send a JSON object", code="invalid_json"))
        return counted(_validation_error(errors))

    @app.exception_handler(ValidationError)  # pydantic errors raised inside handlers (e.g. admin bodies)
    async def _invalid_model(request: Request, exc: ValidationError) -> JSONResponse:
        return counted(_validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return counted(_error(exc.status_code, _http_error_message(request, exc),
                              code="invalid_json" if _body_parse_error(exc) else None, headers=exc.headers))

    @app.exception_handler(RegistryError)
    async def _registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        status = 404 if isinstance(exc, DraftNotFoundError) else 409
        return counted(_error(status, str(exc), code=type(exc).__name__))

    app.add_middleware(_Guard, max_body_bytes=max_body_bytes, count=core.metrics.observe_error)

    # -- OpenAI routes --------------------------------------------------------------------------

    @app.post("/v1/completions", dependencies=[Depends(_require_json)])
    async def completions(req: CompletionRequest):
        prompts = split_prompts(req, core.vocab_size)  # a prompt list: one choice per prompt
        if req.stream:  # one prompt (split_prompts refuses more)
            return _streaming(await run_in_threadpool(core.stream_complete, prompts[0]))
        if len(prompts) == 1:
            return JSONResponse(await run_in_threadpool(core.complete, prompts[0]))
        return JSONResponse(await run_in_threadpool(_complete_each, core, prompts))

    @app.post("/v1/chat/completions", dependencies=[Depends(_require_json)])
    async def chat_completions(req: ChatCompletionRequest):
        if req.stream:
            return _streaming(await run_in_threadpool(core.stream_chat, req))
        return JSONResponse(await run_in_threadpool(core.chat, req))

    @app.get("/v1/models")
    async def models():
        return core.models()

    @app.get("/health")
    async def health():
        return core.health()

    @app.get("/metrics")
    async def metrics():
        # Off the event loop (it reads Redis), and off Starlette's pool (queued requests fill it).
        return PlainTextResponse(await asyncio.to_thread(core.metrics_text), media_type=CONTENT_TYPE_LATEST)

    # -- dashboard ------------------------------------------------------------------------------

    def dashboard_store():
        if core.dashboard is None:
            raise ServingError(404, "this replica keeps no dashboard history (dashboard.enabled is false)",
                               code="no_dashboard")
        return core.dashboard

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard():
        """The acceptance-rate drift dashboard: a self-contained page drawing /dashboard/data."""
        dashboard_store()
        return HTMLResponse(DASHBOARD_PAGE.read_text(encoding="utf-8"))

    @app.get("/dashboard/data", response_model=DashboardData)
    async def dashboard_data(window: int | None = Query(None, json_schema_extra={"minimum": 1, "maximum": 10_000},
                                                        description="Requests per moving average (default: "
                                                                    "the dashboard's configured window).")):
        """The dashboard's history (schema: GET /dashboard/schema). ``window``: requests per moving average."""
        if window is not None and not 1 <= window <= 10_000:
            raise ServingError(400, f"window must be in [1, 10000], got {window}", "window")
        store = dashboard_store()
        try:
            return await asyncio.to_thread(lambda: store.data(core.registry_live_versions(), window))
        except Exception as e:  # Redis down: say so; the page keeps its last charts and retries
            log.warning("dashboard data unavailable: %s", e)
            raise ServingError(503, f"dashboard history is unavailable (Redis: {type(e).__name__}: {e}); retry",
                               code="dashboard_unavailable") from None

    @app.get("/dashboard/schema")
    async def dashboard_schema():
        """JSON Schema of /dashboard/data."""
        return DashboardData.model_json_schema()

    # -- admin ----------------------------------------------------------------------------------

    async def require_admin(request: Request) -> None:
        if admin_token is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise ServingError(401, "admin routes need 'Authorization: Bearer <admin token>'", code="missing_token")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            raise ServingError(403, "the admin token is wrong", code="invalid_token")

    def registry():
        if core.registry is None:
            raise ServingError(409, "this replica has no draft registry configured; start it with one to sync "
                                    "or roll back drafts", code="no_registry")
        return core.registry

    # Admin work runs on asyncio's executor, not Starlette's thread pool: requests queued for
    # the engine occupy that pool's threads, and a draft swap must not wait behind them.

    @app.get("/admin/drafts")
    async def list_drafts():
        return await asyncio.to_thread(core.drafts_info)

    @app.post("/admin/drafts/{cluster}/sync", dependencies=[Depends(require_admin)])
    async def sync_draft(cluster: str):
        """Load the registry's live version of ``cluster`` into this replica if it differs."""
        live = await asyncio.to_thread(_sync, core, registry(), cluster)
        return {"cluster": cluster, "version": live.version if live else core.live_draft(cluster).version,
                "changed": live is not None}

    @app.post("/admin/drafts/{cluster}/rollback", dependencies=[Depends(require_admin)],
              openapi_extra={"requestBody": {"required": False, "content": {  # read by hand: an empty body is fine
                  "application/json": {"schema": RollbackBody.model_json_schema()}}}})
    async def rollback_draft(cluster: str, request: Request):
        """Move the registry's live pointer back (default: to the live version's parent), then load it here.

        Other replicas follow on their next sync (broadcast or poll).
        """
        raw = await request.body()
        body = RollbackBody.model_validate_json(raw) if raw.strip() else RollbackBody()
        reg = registry()
        manifest = await asyncio.to_thread(_registry_call, reg.rollback, cluster, body.to_version)
        if core.dashboard is not None:
            core.dashboard.post_swap(cluster, manifest.version, "rollback")
            await asyncio.to_thread(_quietly, core.dashboard.count_rollback, cluster)
        await asyncio.to_thread(_sync, core, reg, cluster)
        return {"cluster": cluster, "version": manifest.version, "replica_version": core.live_draft(cluster).version}

    return app


class _Guard:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware wraps streaming bodies and delays
    disconnect handling): 413 for oversized bodies before they are read (a huge body would
    otherwise be buffered, then tokenized), and a JSON 500 for anything unhandled. It sits
    inside Starlette's ServerErrorMiddleware, which would re-raise after its own 500."""

    def __init__(self, app, max_body_bytes: int, count) -> None:
        self.app, self.max_body_bytes, self.count = app, max_body_bytes, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            self.count(413)
            response = _error(413, f"request body is {int(length)} bytes; the limit is {self.max_body_bytes}. "
                                   "Shorten the prompt.", code="body_too_large")
            return await response(scope, receive, send)
        started = False

        async def watch(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for a status code: the client sees the stream cut off
                return
            self.count(500)
            await _error(500, f"internal error ({type(exc).__name__}); the replica logged the details and "
                              "keeps serving", code="internal_error")(scope, receive, send)


def _with_vocabulary(openapi, vocab_size: int):
    """/openapi.json stating this replica's token-id range in the completions prompt (known only at build time)."""
    def with_vocabulary() -> dict:
        schema = openapi()  # FastAPI builds it once and caches it; patching twice is harmless
        prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
        shapes = copy.deepcopy(prompt["anyOf"])  # never the class's own schema dicts
        for shape in shapes:
            items = shape.get("items", {})
            for ids in (shape, items, items.get("items", {})):
                if ids.get("type") == "integer":
                    ids["maximum"] = vocab_size - 1
        prompt["anyOf"] = shapes
        return schema

    return with_vocabulary


def _complete_each(core: ServingCore, prompts: list[CompletionRequest]) -> dict:
    """Several prompts: the single-prompt path once per prompt, in order, merged into one response.

    Validation that depends on the prompt's tokens (its length against the context) happens
    when its turn comes; the error then names the prompt.
    """
    parts = []
    for i, req in enumerate(prompts):
        try:
            parts.append(core.complete(req))
        except ServingError as e:
            if e.param not in ("prompt", "max_tokens"):  # not about this prompt: the same for all of them
                raise
            raise ServingError(e.status, f"prompt[{i}]: {e.message}", e.param, e.code) from e
    return merge_completions(parts)


def _body_parse_error(exc: HTTPException) -> BaseException | None:
    """What FastAPI hit reading a JSON body when it says only 'There was an error parsing the body'
    (its JSONDecodeError becomes a 400 'invalid JSON' above; this is the rest: bad UTF-8, too deep)."""
    return exc.__cause__ if exc.status_code == 400 and exc.__cause__ is not None else None


def _http_error_message(request: Request, exc: HTTPException) -> str:
    """Starlette's bare 'Not Found' / 'Method Not Allowed', and FastAPI's body errors, saying what to do."""
    if (cause := _body_parse_error(exc)) is not None:
        if isinstance(cause, UnicodeDecodeError):
            return (f"the request body is not valid UTF-8 ({cause.reason} at byte {cause.start}); "
                    "send JSON text encoded as UTF-8")
        if isinstance(cause, RecursionError):
            return "the request body nests JSON arrays or objects too deeply to parse; send a flatter JSON object"
        return f"the request body could not be parsed as JSON ({type(cause).__name__}: {cause}); send a JSON object"
    if exc.status_code == 404 and exc.detail == "Not Found":
        return (f"no route {request.url.path}: the API is POST /v1/completions, POST /v1/chat/completions and "
                "GET /v1/models (all routes: GET /openapi.json)")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "another method")
        return f"{request.method} is not allowed on {request.url.path}; use {allowed}"
    return str(exc.detail)


def _validation_error(errors: list) -> JSONResponse:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _field_name(tuple(first.get("loc", ())))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return _error(422, f"{field}: {first.get('msg')}{more}", field, "invalid_value")


def _registry_call(fn, cluster: str, *args):
    try:
        return fn(cluster, *args)
    except ValueError as e:  # bad cluster names and the like
        if isinstance(e, RegistryError):
            raise
        raise ServingError(400, str(e), "cluster") from e


def _quietly(fn, *args) -> None:
    """Telemetry around an admin action must not fail the action."""
    try:
        fn(*args)
    except Exception as e:
        log.warning("%s failed: %s", getattr(fn, "__name__", fn), e)


def _sync(core: ServingCore, registry, cluster: str):
    return _registry_call(lambda c: core.sync_from_registry(registry, c), cluster)


def _streaming(stream: SSEStream) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for line in iterate_in_threadpool(stream):
                yield line
        finally:
            stream.close()  # client gone or stream done: stop the engine at its next round

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

