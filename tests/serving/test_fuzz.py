"""Schema fuzzing of the HTTP surface: schemathesis reads the app's own /openapi.json from a real
uvicorn server (tiny models; a real Redis behind the dashboard, the draft registry and the
training buffer) and sends generated requests to every route in it.

The contract: every case gets a 2xx, or a 4xx whose body is OpenAI's error envelope with a
message that says what to fix — never a 5xx, never a hang — and valid requests succeed after
the run. The admin routes that change the live system (sync, rollback) answer every case 401
without a token and 403 with a wrong one; on this throwaway stack they are fuzzed with the
right token too.

Per route: schemathesis' coverage phase (deterministic: boundary and type-violating values of
each field, missing fields, unexpected methods), then OSD_FUZZ_EXAMPLES generated cases each
of schema-valid ("positive") and schema-invalid ("negative") data. ``make test`` runs the
default (a few hundred cases, derandomized, well under a minute); ``make fuzz`` runs the long
one (>= 2000 cases, a fresh seed each run; OSD_FUZZ_SEED repeats one) and prints the tally.
"""

from __future__ import annotations

import collections
import json
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from support.http_server import serving
from support.tiny import noisy_copy, tiny_llama
from support.tiny_tokenizer import char_tokenizer

from osd.config import EngineConfig, SamplingParams
from osd.data.buffer import BufferConfig, RecordBuffer
from osd.data.recorder import Recorder
from osd.decoding.engine import SpeculativeEngine
from osd.registry import DraftRegistry, RegistryConfig
from osd.serving.core import ServingCore
from osd.serving.dashboard import DashboardConfig, DashboardStore
from osd.serving.http import build_app

# Hypothesis flags global-random use inside schemathesis' own openapi_cases strategy (not ours); harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

MODEL = "tiny"
TOKEN = "s3cret"
EXAMPLES = int(os.environ.get("OSD_FUZZ_EXAMPLES", "20"))  # generated cases per route and mode
LONG = "OSD_FUZZ_EXAMPLES" in os.environ
# Hypothesis seed: make test is derandomized (the same cases every run); the long run draws one unless set.
SEED = os.environ.get("OSD_FUZZ_SEED") or (str(random.randrange(2**32)) if LONG else None)
# Per request. The most a valid request asks of the tiny model (32 prompts, each to the context's end)
# takes seconds; on a loaded 2-core machine several times that. Running into this means a hang.
TIMEOUT_S = 120
ADMIN = ("/admin/drafts/{cluster}/sync", "/admin/drafts/{cluster}/rollback")  # POST: they change the live system
# Framework defaults that name nothing to fix; every error osd sends must say more.
GENERIC = {"Not Found", "Method Not Allowed", "Bad Request", "Unprocessable Entity", "Internal Server Error",
           "There was an error parsing the body", "invalid request"}


@dataclass
class Tally:
    """What the run saw: statuses per route, and every case that broke the contract (with a curl to replay it)."""

    statuses: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    failures: list = field(default_factory=list)
    negative_accepted: list = field(default_factory=list)  # schema-invalid data that got a 2xx (reported, allowed)
    slowest_s: float = 0.0
    cases: int = 0

    def send(self, case, session: requests.Session, headers: dict | None = None,
             expect: set[int] | None = None) -> None:
        label = case.operation.label
        started = time.monotonic()
        try:
            response = case.call(session=session, headers=headers, timeout=TIMEOUT_S)
        except requests.RequestException as e:  # a timeout (hang) or a dropped connection
            self.cases += 1
            self.failures.append(f"{label}: no response ({type(e).__name__})\n    {_curl(case, headers)}")
            return
        self.slowest_s = max(self.slowest_s, time.monotonic() - started)
        self.cases += 1
        self.statuses[label][response.status_code] += 1
        if (problem := contract_problem(response, expect)) is not None:
            self.failures.append(f"{label}: {problem}\n    {_curl(case, headers)}")
        elif response.status_code < 300 and case.meta is not None and case.meta.generation.mode.is_negative:
            self.negative_accepted.append(f"{label}: {response.status_code}\n    {_curl(case, headers)}")

    def report(self, seconds: float) -> str:
        total = collections.Counter()
        lines = []
        for label, counts in sorted(self.statuses.items()):
            total.update(counts)
            lines.append(f"  {label:40s} {sum(counts.values()):5d}  {dict(sorted(counts.items()))}")
        return (f"schema fuzz (seed {SEED or 'derandomized'}): {self.cases} cases over {len(self.statuses)} routes "
                f"in {seconds:.1f} s "
                f"(slowest response {self.slowest_s:.2f} s), statuses {dict(sorted(total.items()))}, "
                f"{len(self.failures)} contract failures, {len(self.negative_accepted)} schema-invalid "
                "cases accepted\n" + "\n".join(lines))


def contract_problem(response, expect: set[int] | None) -> str | None:
    """None if ``response`` keeps the contract, else what is wrong with it."""
    status = response.status_code
    if status >= 500:
        return f"{status}: {response.text[:300]}"
    if expect is not None and status not in expect:
        return f"{status}, expected one of {sorted(expect)}: {response.text[:300]}"
    content_type = _header(response, "content-type")
    if getattr(response, "stream_cut_short", False):  # more events than max_stream_events, or past the timeout
        return f"the stream did not end within {TIMEOUT_S} s: {response.text[-300:]!r}"
    if status < 400:
        return _stream_problem(response.text) if content_type.startswith("text/event-stream") else None
    if not content_type.startswith("application/json"):
        return f"{status} is not JSON ({content_type}): {response.text[:200]}"
    try:
        error = response.json()["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without OpenAI's error envelope: {response.text[:300]}"
    if not isinstance(message, str) or not message.strip() or message in GENERIC:
        return f"{status} with a message that names nothing to fix: {message!r}"
    if "Traceback" in message or not error.get("type"):
        return f"{status} with a traceback or no error type: {error}"
    return None


def _stream_problem(text: str) -> str | None:
    """A stream's status is sent before generation starts: a failure after it is an in-band error event."""
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"the stream does not end with 'data: [DONE]': {text[-300:]!r}"
    for event in events[:-1]:
        error = json.loads(event).get("error")
        if error is not None and (error.get("type") == "server_error" or not error.get("message")):
            return f"in-band error in a 200 stream: {event[:300]}"
    return None


def _header(response, name: str) -> str:
    """schemathesis' Response keeps each header as a list of values."""
    values = next((v for k, v in response.headers.items() if k.lower() == name), [""])
    return values[0] if isinstance(values, list) else values


def _curl(case, headers: dict | None) -> str:
    return case.as_curl_command(headers=headers)[:1500]


def fuzz_operation(schema, operation, tally: Tally, session: requests.Session, headers: dict | None = None,
                   expect: set[int] | None = None, examples: int = EXAMPLES) -> None:
    """The coverage phase's cases, then ``examples`` generated cases per mode, all sent and checked."""
    config = schema.config.generation_for(operation=operation)
    for case in schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                           generation_config=config):
        tally.send(case, session, headers, expect)
    for mode in GenerationMode:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=SEED is None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            tally.send(case, session, headers, expect)

        if SEED is not None:
            run = seed(int(SEED))(run)
        try:
            run()
        except Unsatisfiable:  # no parameters or body to make invalid: the coverage phase sent what there is
            pass


@pytest.fixture(scope="module")
def fuzz_stack(redis_server):
    """The app as a replica serves it, with traffic, a published draft and dashboard history already there."""
    import redis

    if not redis_server.running:
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    tokenizer = char_tokenizer(64)
    target = tiny_llama(vocab=64, sharpness=3.0)
    engine = SpeculativeEngine(target, tokenizer, noisy_copy(target, noise=0.3),
                               EngineConfig(speculation="always", gamma=4))
    buffer = RecordBuffer(BufferConfig(redis_url=redis_server.url))
    registry = DraftRegistry.from_config(RegistryConfig(backend="redis", redis_url=redis_server.url))
    registry.publish("global", noisy_copy(target, noise=0.2, seed=5).model.state_dict())
    dashboard = DashboardStore.from_url(redis_server.url, DashboardConfig(window=4))
    recorder = Recorder(buffer)
    core = ServingCore(engine, MODEL, recorder=recorder, registry=registry, dashboard=dashboard, buffer=buffer)
    reference = SpeculativeEngine(target, tokenizer, None)
    with serving(build_app(core, admin_token=TOKEN)) as base:
        http = httpx.Client(base_url=base, timeout=TIMEOUT_S)
        for prompt in ("warm up", "the quick brown fox", "hello"):
            assert http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8}).status_code == 200
        dashboard.flush()
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        schema.config.output.sanitization.enabled = False  # reproductions show max_tokens, not "[Filtered]"
        schema.config.max_stream_events = 10_000  # read streams to their end (schemathesis stops after 20 events)
        yield {"base": base, "http": http, "core": core, "schema": schema, "reference": reference}
        http.close()
    recorder.close()
    dashboard.close()
    buffer.close()


def operations(schema) -> dict:
    return {(op.method.upper(), op.path): op for op in (r.ok() for r in schema.get_all_operations())}


def assert_still_serving(stack) -> None:
    """After the run: nothing stuck in the engine, and valid requests get the target's greedy output."""
    http, core = stack["http"], stack["core"]
    deadline = time.monotonic() + 10
    while core.load() != {"running": 0, "waiting": 0}:
        assert time.monotonic() < deadline, f"requests still in the engine after the run: {core.load()}"
        time.sleep(0.05)
    want = stack["reference"].generate(core.encode_prompt("still there?"), SamplingParams(max_tokens=12)).text
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "still there?", "max_tokens": 12,
                                           "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert http.get("/health").json()["status"] == "ok"


def test_every_route_answers_2xx_or_an_openai_4xx(fuzz_stack):
    schema, tally = fuzz_stack["schema"], Tally()
    ops = operations(schema)
    # Every route the app serves is in its schema, and so in this run.
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
            ("GET", "/health"), ("GET", "/metrics"), ("GET", "/dashboard"), ("GET", "/dashboard/data"),
            ("GET", "/dashboard/schema"), ("GET", "/admin/drafts"), ("POST", ADMIN[0]), ("POST", ADMIN[1])} <= set(ops)
    started = time.monotonic()
    with requests.Session() as session:
        for (method, path), op in sorted(ops.items()):
            if path in ADMIN:  # without a token: every case, valid or not, is refused before it is read
                fuzz_operation(schema, op, tally, session, expect={401, 404, 405, 422})
            else:
                fuzz_operation(schema, op, tally, session)
    report = tally.report(time.monotonic() - started)
    print("\n" + report)
    assert not tally.failures, f"{len(tally.failures)} cases broke the contract:\n" + "\n".join(tally.failures[:20])
    assert set(tally.statuses) == {op.label for op in ops.values()}, "a route got no case"
    assert all(c[401] for label, c in tally.statuses.items() if any(label.endswith(p) for p in ADMIN))
    assert tally.cases >= (8 * EXAMPLES if LONG else 300), report  # make fuzz's 250: >= 2000 cases
    assert_still_serving(fuzz_stack)


def test_admin_routes_refuse_a_wrong_token_and_survive_the_right_one(fuzz_stack):
    """Sync and rollback with a wrong token: 403 for every case. With the right one (this stack is
    throwaway): whatever the cluster name or body, a 2xx or an OpenAI 4xx (bad name, nothing to roll back)."""
    schema, core = fuzz_stack["schema"], fuzz_stack["core"]
    ops = operations(schema)
    wrong, right = Tally(), Tally()
    started = time.monotonic()
    with requests.Session() as session:
        for path in ADMIN:
            fuzz_operation(schema, ops["POST", path], wrong, session, headers={"Authorization": "Bearer nope"},
                           expect={403, 404, 405, 422}, examples=max(EXAMPLES // 2, 5))
            fuzz_operation(schema, ops["POST", path], right, session, headers={"Authorization": f"Bearer {TOKEN}"},
                           examples=max(EXAMPLES // 2, 5))
    took = time.monotonic() - started
    print("\nwrong token: " + wrong.report(took) + "\nright token: " + right.report(took))
    assert not wrong.failures, "\n".join(wrong.failures[:20])
    assert all(c[403] for c in wrong.statuses.values())
    assert not right.failures, "\n".join(right.failures[:20])
    assert core.live_draft().draft is not None
    assert_still_serving(fuzz_stack)


KNOWN = [  # what earlier runs found, replayed every time
    # A lone UTF-16 surrogate after a NUL: once a 500 from the tokenizer.
    (b'{"prompt": "\\u0000\\udcff", "max_tokens": 3}', 422, "unpaired UTF-16 surrogate"),
    (b'{"prompt": ["ok", "\\u0000\\udcff"], "max_tokens": 3}', 422, "unpaired UTF-16 surrogate"),
    # top_p 5e-324 rounds to 0 in float32 and dropped every token: NaN probabilities, a 500.
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 5e-324, "max_tokens": 3}', 200, None),
    (b'{"prompt": "x", "top_p": 1e-300, "max_tokens": 3}', 200, None),
    (b'{"prompt": "x", "top_p": 5e-324, "max_tokens": 3, "stream": true}', 200, None),  # was an in-band 500
    # a temperature of 1e-300 made the logits inf: NaN again. It is greedy (vLLM's rule below 1e-5).
    (b'{"prompt": "x", "temperature": 1e-300, "max_tokens": 3}', 200, None),
    # not UTF-8 at all: was FastAPI's bare "There was an error parsing the body"
    (b'{"prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "too deeply"),
    (b'{"prompt": 1' + b"0" * 5000 + b"}", 400, "could not be parsed as JSON"),
]


@pytest.mark.parametrize("body,status,says", KNOWN, ids=[f"known-{i}" for i in range(len(KNOWN))])
def test_what_the_fuzzer_found_stays_fixed(fuzz_stack, body, status, says):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = fuzz_stack["http"].post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert contract_problem(r, {status}) is None
    if says is not None:
        assert says in r.json()["error"]["message"]


def test_unknown_routes_and_methods_say_what_to_use(fuzz_stack):
    http = fuzz_stack["http"]
    r = http.get("/v1/completion")
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"] == "GET is not allowed on /v1/completions; use POST"
