"""The HTTP serving surface: a real uvicorn server around a ServingCore over tiny models,
driven by the official openai client and raw httpx."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import httpx
import openai
import pytest
import torch
from support.http_server import serving
from prometheus_client.parser import text_string_to_metric_families
from support.tiny import noisy_copy, tiny_llama
from support.tiny_tokenizer import char_tokenizer

from osd.config import EngineConfig, SamplingParams, TreeConfig
from osd.decoding.engine import SpeculativeEngine
from osd.registry import DraftMismatchError, DraftRegistry, FileStore
from osd.serving.core import ServingCore, ServingError
from osd.serving.http import build_app

MODEL = "tiny"
TOKEN = "s3cret"
GREEDY = dict(temperature=0, max_tokens=24)


class ListSink:
    """A RecordBuffer stand-in that keeps what it is pushed (the Redis path is tests/test_recorder.py)."""

    def __init__(self):
        self.records = []

    def push(self, record):
        self.records.append(record)
        return str(len(self.records))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from osd.data.recorder import Recorder

    tokenizer = char_tokenizer(64)
    target = tiny_llama(vocab=64, sharpness=3.0)
    draft = noisy_copy(target, noise=0.3)  # agrees often: accepted tokens and bonus tokens occur
    engine = SpeculativeEngine(target, tokenizer, draft, EngineConfig(speculation="always", gamma=4))
    reference = SpeculativeEngine(target, tokenizer, None)  # target-only: the greedy truth
    registry = DraftRegistry(FileStore(tmp_path_factory.mktemp("registry")))
    sink = ListSink()
    recorder = Recorder(sink)
    core = ServingCore(engine, MODEL, recorder=recorder, registry=registry)
    app = build_app(core, admin_token=TOKEN)

    with serving(app) as base:
        http = httpx.Client(base_url=base, timeout=30)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        yield dict(core=core, target=target, reference=reference, registry=registry, sink=sink, recorder=recorder,
                   http=http, client=client, tokenizer=tokenizer)
        http.close()
    recorder.close()


def greedy_text(stack, prompt_ids, max_tokens=24, stop=()):
    gen = stack["reference"].generate(prompt_ids, SamplingParams(max_tokens=max_tokens, stop=list(stop)))
    return gen.text, gen.output_ids


def draft_state(target, noise, seed):
    return noisy_copy(target, noise=noise, seed=seed).model.state_dict()


def metric(text, family, **labels):
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return sum(s.value for s in fam.samples
                       if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created"))
    raise AssertionError(f"metric {family} not exported")


# --------------------------------------------------------------------------- OpenAI client


def test_models_and_health(stack):
    assert [m.id for m in stack["client"].models.list()] == [MODEL]
    health = stack["http"].get("/health").json()
    assert health["status"] == "ok" and "global" in health["drafts"]
    assert health["dtype"] == "float32"  # the tiny target's; ModelConfig.dtype "auto" is resolved at load
    assert health["speculation"] == {"mode": "always", "drafts": {}}  # no governor: every round drafts


def test_a_bf16_engine_reports_bfloat16():
    target = tiny_llama(vocab=64, sharpness=3.0).to(torch.bfloat16)
    core = ServingCore(SpeculativeEngine(target, char_tokenizer(64), noisy_copy(target, noise=0.3)), MODEL)
    assert core.health()["dtype"] == "bfloat16"
    assert core.complete({"model": MODEL, "prompt": "abc", "max_tokens": 4})["osd"]["dtype"] == "bfloat16"
    speculation = core.health()["speculation"]  # the default mode: the governor's estimates per cluster draft
    assert speculation["mode"] == "auto" and speculation["drafts"]["global"]["rounds"]["speculative"] >= 1


def test_completion_greedy_equals_target_and_carries_stats(stack):
    core = stack["core"]
    prompt = "The quick brown fox"
    want_text, want_ids = greedy_text(stack, core.encode_prompt(prompt))
    resp = stack["client"].completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert resp.choices[0].text == want_text
    assert resp.usage.completion_tokens == len(want_ids)
    assert resp.usage.prompt_tokens == len(core.encode_prompt(prompt))
    osd = resp.model_extra["osd"]
    assert osd["draft_version"] == core.live_draft().version and osd["cluster"] == "global"
    assert osd["proposed"] > 0 and 0 < osd["accepted"] <= osd["proposed"]
    assert osd["mean_acceptance_length"] > 1 and 0 < osd["alpha_hat"] <= 1 and osd["target_forwards"] > 0
    assert osd["dtype"] == str(stack["target"].dtype).removeprefix("torch.") == "float32"
    # token-id prompts work too
    resp = stack["client"].completions.create(model=MODEL, prompt=core.encode_prompt(prompt), **GREEDY)
    assert resp.choices[0].text == want_text


@pytest.mark.parametrize("config", [EngineConfig(speculation="always", tree=TreeConfig(shape="static", branching=[3, 2, 1])),
                                    EngineConfig(speculation="always", gamma=2, length_policy="schedule", max_gamma=6)],
                         ids=["static-tree", "schedule"])
def test_tree_and_adaptive_engines_serve_the_targets_output(stack, config):
    """The same endpoint over a tree engine and an adaptive-length chain: greedy is the target's
    output, the stats and the training record come along."""
    from osd.data.recorder import Recorder
    from osd.decoding.tree_engine import TreeSpeculativeEngine

    target, tokenizer = stack["target"], stack["tokenizer"]
    kind = TreeSpeculativeEngine if config.tree is not None else SpeculativeEngine
    engine = kind(target, tokenizer, noisy_copy(target, noise=0.3), config)
    sink = ListSink()
    core = ServingCore(engine, MODEL, recorder=Recorder(sink))
    with core.recorder, serving(build_app(core)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        prompt = "The quick brown fox"
        want_text, want_ids = greedy_text(stack, core.encode_prompt(prompt))
        resp = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
        assert resp.choices[0].text == want_text
        osd = resp.model_extra["osd"]
        assert osd["proposed"] > 0 and 0 < osd["accepted"] and osd["target_forwards"] < len(want_ids)
        assert core.recorder.flush(timeout_s=10)
    assert [r.output_ids for r in sink.records] == [want_ids]


def test_chat_greedy_uses_the_chat_template(stack):
    core = stack["core"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = core.encode_chat(messages)
    assert stack["tokenizer"].decode(ids).endswith("user: Hello there\nassistant:")
    want_text, _ = greedy_text(stack, ids)
    resp = stack["client"].chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert resp.choices[0].message.content == want_text and resp.choices[0].message.role == "assistant"
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.model_extra["osd"]["draft_version"] == core.live_draft().version


def test_chat_without_a_template_joins_roles(stack):
    core = ServingCore(SpeculativeEngine(stack["target"], char_tokenizer(64, chat_template=None)), MODEL)
    ids = core.encode_chat([{"role": "user", "content": "hi"}])
    assert core.tokenizer.decode(ids) == "user: hi\nassistant:"


@pytest.mark.parametrize("stop", [[], "stopchar"])
def test_streamed_completion_concatenates_to_the_non_streamed_text(stack, stop):
    core, client = stack["core"], stack["client"]
    prompt = "Once upon a time"
    full, _ = greedy_text(stack, core.encode_prompt(prompt), max_tokens=40)
    if stop:  # a stop string taken from the middle of the real output, so it fires mid-round
        stop = [full[12:14]]
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=40, stop=stop or None)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=40,
                                            stop=stop or None, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == plain.choices[0].text
    assert len([c for c in chunks if c.choices[0].text]) >= 2, "text should arrive incrementally"
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].model_extra["osd"]["draft_version"] == core.live_draft().version
    if stop:
        assert plain.choices[0].finish_reason == "stop" and stop[0] not in streamed
        assert streamed == full[: full.find(stop[0])]


def test_streamed_chat_with_usage(stack):
    client = stack["client"]
    messages = [{"role": "user", "content": "Tell me a story"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-2].model_extra["osd"]["proposed"] == plain.model_extra["osd"]["proposed"]


def test_raw_sse_ends_with_done(stack):
    with stack["http"].stream("POST", "/v1/completions",
                              json={"model": MODEL, "prompt": "abc", "max_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_client_disconnect_mid_stream_stops_generation(stack, monkeypatch):
    core, http = stack["core"], stack["http"]
    real_generate = core.engine.generate

    def slow(*args, on_tokens=None, **kwargs):  # ~10 ms a round: 250 tokens would take seconds
        def slowed(ids):
            time.sleep(0.01)
            on_tokens(ids)
        return real_generate(*args, on_tokens=slowed if on_tokens else None, **kwargs)

    monkeypatch.setattr(core.engine, "generate", slow)
    finished = core.metrics.value("osd:request_success")
    with http.stream("POST", "/v1/completions",
                     json={"prompt": "abc", "max_tokens": 250, "temperature": 0, "stream": True}) as r:
        next(r.iter_lines())  # generation is under way
    deadline = time.monotonic() + 2
    while core.load()["running"]:
        assert time.monotonic() < deadline, "a cancelled stream kept the engine busy"
        time.sleep(0.01)
    assert core.metrics.value("osd:request_success") == finished, "the abandoned request ran to the end"
    assert stack["client"].completions.create(model=MODEL, prompt="abc", **GREEDY).choices[0].text is not None


def test_stream_text_holds_back_stop_prefixes_eos_and_overshoot(stack):
    from osd.serving.streaming import StreamText

    tok = stack["tokenizer"]
    ids = tok("hello world").input_ids

    def run(params, feed):
        st = StreamText(tok, {tok.eos_token_id}, params)
        deltas = [st.add(chunk) for chunk in feed]
        return deltas, st

    # the stop string "lo w" arrives one character per round: "l" must wait until it is clear
    deltas, st = run(SamplingParams(stop=["lo w"]), [[i] for i in ids])
    assert deltas[:7] == ["h", "e", "", "l", "", "", ""] and "".join(deltas) == "hel"
    assert st.finish("hel") == ""
    # a prefix of the stop string that turns out not to be one is released later
    deltas, st = run(SamplingParams(stop=["lox"]), [[i] for i in ids])
    assert deltas[4] == "" and deltas[5] == "lo " and "".join(deltas) == "hello world"
    # ids after EOS or past max_tokens (the engine's overshoot within a round) are never shown
    deltas, _ = run(SamplingParams(), [ids[:3], [ids[3], tok.eos_token_id, ids[4]], ids[5:]])
    assert "".join(deltas) == "hell"
    deltas, _ = run(SamplingParams(max_tokens=2), [ids[:4]])
    assert deltas == ["he"]


def test_cluster_extension(stack):
    core, client, target = stack["core"], stack["client"], stack["target"]
    resp = client.completions.create(model=MODEL, prompt="abc", extra_body={"osd": {"cluster": "math"}}, **GREEDY)
    osd = resp.model_extra["osd"]
    assert (osd["cluster"], osd["draft_cluster"]) == ("math", "global")  # no 'math' draft on this replica yet
    assert stack["recorder"].flush()
    assert stack["sink"].records[-1].cluster == "math"  # its record trains the math cluster
    assert "math" in core.clusters_to_sync(["global", "math", "code"])  # wanted: the next sync loads it
    core.swap_draft(5, draft_state(target, 0.1, seed=3), cluster="math")
    resp = client.completions.create(model=f"{MODEL}:math", prompt="abc", **GREEDY)  # pinned through the model
    osd = resp.model_extra["osd"]
    assert (osd["cluster"], osd["draft_cluster"], osd["draft_version"]) == ("math", "math", 5)
    assert resp.choices[0].text == greedy_text(stack, core.encode_prompt("abc"))[0]
    assert core.clusters_to_sync(["global", "math", "code"]) == ["global", "math"]  # code: never asked for
    with pytest.raises(openai.BadRequestError, match="send one of them"):
        client.completions.create(model=f"{MODEL}:math", prompt="abc", extra_body={"osd": {"cluster": "code"}},
                                  **GREEDY)
    with pytest.raises(openai.BadRequestError, match="invalid cluster name"):
        client.completions.create(model=f"{MODEL}:no way", prompt="abc", **GREEDY)


def test_cluster_drafts_are_capped_least_recently_used_first(stack):
    core, target = stack["core"], stack["target"]
    cap = core.max_cluster_drafts
    core.max_cluster_drafts = 2
    try:
        for i, cluster in enumerate(["lru-a", "lru-b"]):
            core.swap_draft(1, draft_state(target, 0.1, seed=10 + i), cluster=cluster)
        core.live_draft("lru-a")  # a request for lru-a: now lru-b is the coldest
        core.swap_draft(1, draft_state(target, 0.1, seed=12), cluster="lru-c")
        held = core.health()["drafts"]
        assert "lru-b" not in held and {"global", "lru-a", "lru-c"} <= set(held)
        assert len(held) - 1 <= 2
        assert core.live_draft("lru-b").lineage == "global"  # falls back, and is wanted again
        assert "lru-b" in core.clusters_to_sync(["global", "lru-a", "lru-b", "lru-c"])
        assert core.metrics.value("osd:draft_swaps", cluster="lru-b", outcome="evicted") == 1
    finally:
        core.max_cluster_drafts = cap
        for cluster in ("lru-a", "lru-c", "math"):
            core._drafts.pop(cluster, None)


# --------------------------------------------------------------------------- bad requests


BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", dict(content=b'{"prompt": "hi",', headers={"content-type": "application/json"}), 400, None),
    ("missing messages", "/v1/chat/completions", dict(json={"model": MODEL}), 422, "messages"),
    ("empty messages", "/v1/chat/completions", dict(json={"messages": []}), 422, "messages"),
    ("bad role", "/v1/chat/completions", dict(json={"messages": [{"role": "robot", "content": "x"}]}), 422, "messages.0.role"),
    ("negative max_tokens", "/v1/completions", dict(json={"prompt": "hi", "max_tokens": -5}), 422, "max_tokens"),
    ("temperature 7", "/v1/completions", dict(json={"prompt": "hi", "temperature": 7}), 422, "temperature"),
    ("wrong type", "/v1/completions", dict(json={"prompt": "hi", "max_tokens": "lots"}), 422, "max_tokens"),
    ("100k-token prompt", "/v1/completions", dict(json={"prompt": "ab" * 50_000}), 413, "prompt"),
    ("100k token ids", "/v1/completions", dict(json={"prompt": [3] * 100_000}), 413, "prompt"),
    ("prompt + max_tokens too long", "/v1/completions", dict(json={"prompt": "a" * 200, "max_tokens": 100}), 400, "max_tokens"),
    ("empty prompt", "/v1/completions", dict(json={"prompt": ""}), 400, "prompt"),
    ("token id out of range", "/v1/completions", dict(json={"prompt": [1, 64]}), 400, "prompt"),
    ("wrong content type", "/v1/completions", dict(content=b"prompt=hi", headers={"content-type": "text/plain"}), 415, None),
    ("form body", "/v1/chat/completions", dict(data={"prompt": "hi"}), 415, None),
    ("n=2", "/v1/completions", dict(json={"prompt": "hi", "n": 2}), 400, "n"),
    ("logprobs above 5", "/v1/completions", dict(json={"prompt": "hi", "logprobs": 6}), 422, "logprobs"),
    ("unsupported best_of", "/v1/completions", dict(json={"prompt": "hi", "best_of": 3}), 400, "best_of"),
    ("unknown model", "/v1/completions", dict(json={"model": "gpt-9", "prompt": "hi"}), 404, "model"),
    ("empty stop string", "/v1/completions", dict(json={"prompt": "hi", "stop": [""]}), 422, "stop"),
    # JSON may spell a lone UTF-16 surrogate ("\udcff"); no tokenizer can encode it.
    ("lone surrogate in prompt", "/v1/completions", dict(content=b'{"prompt": "\\u0000\\udcff", "max_tokens": 3}',
                                                         headers={"content-type": "application/json"}), 422, "prompt"),
    ("lone surrogate in a message", "/v1/chat/completions",
     dict(content=b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', headers={"content-type": "application/json"}),
     422, "messages.0.content"),
    ("lone surrogate in a stop string", "/v1/completions",
     dict(content=b'{"prompt": "hi", "stop": ["\\udfff"]}', headers={"content-type": "application/json"}), 422, "stop"),
    ("NUL is valid text", "/v1/completions", dict(json={"prompt": "a\u0000b", "max_tokens": 3}), 200, None),
]


@pytest.mark.parametrize("name,path,kwargs,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(stack, name, path, kwargs, status, param):
    r = stack["http"].post(path, **kwargs)
    assert r.status_code == status, r.text
    if status == 200:
        return
    error = r.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in error["message"]
    assert error["param"] == param
    if status == 413:
        assert str(stack["core"].max_prompt_tokens) in error["message"]
    ok = stack["http"].post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_request_through_the_openai_client(stack):
    with pytest.raises(openai.BadRequestError, match="n=2"):
        stack["client"].completions.create(model=MODEL, prompt="hi", n=2)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        stack["client"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                temperature=7)


def test_unexpected_errors_are_500_json_and_serving_continues(stack, monkeypatch):
    engine = stack["core"].engine

    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "generate", boom)
    r = stack["http"].post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    assert r.status_code == 500
    assert "secret internals" not in r.text and "RuntimeError" in r.json()["error"]["message"]
    with stack["http"].stream("POST", "/v1/completions", json={"prompt": "hi", "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "server_error"
    assert lines[-1] == "data: [DONE]"
    monkeypatch.undo()
    assert stack["http"].post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}).status_code == 200


# --------------------------------------------------------------------------- drafts


def test_hot_swap_under_load(stack, monkeypatch):
    core, registry, target, client, http = (stack[k] for k in ("core", "registry", "target", "client", "http"))
    start_version = core.live_draft().version
    prompts = [f"Question {i}: why is the sky blue?" for i in range(8)]
    want = [greedy_text(stack, core.encode_prompt(p))[0] for p in prompts]
    seen = []  # (version, draft object) handed to the engine, per request
    real_generate = core.engine.generate

    def spy(*args, **kwargs):
        seen.append((kwargs["draft_version"], kwargs["draft"]))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(core.engine, "generate", spy)
    v1 = registry.publish("global", draft_state(target, 0.5, seed=11)).version
    v2 = registry.publish("global", draft_state(target, 0.2, seed=12), parent=v1).version
    registry.rollback("global", to_version=v1)  # v2 stays stored; v1 is live for the first sync
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def ask(i):
        resp = client.completions.create(model=MODEL, prompt=prompts[i], **GREEDY)
        return i, resp.choices[0].text, resp.model_extra["osd"]["draft_version"], resp.id

    results = []
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(8)]
        for n, fut in enumerate(as_completed(futures)):
            results.append(fut.result())
            if n == 0:  # 7 requests still queued or running: publish-and-broadcast v1
                assert http.post("/admin/drafts/global/sync", headers=auth).json()["version"] == v1
            if n == 2:
                registry.promote("global", v2)
                assert http.post("/admin/drafts/global/sync", headers=auth).json() == {
                    "cluster": "global", "version": v2, "changed": True}
    assert len(results) == 8
    for i, text, version, _ in results:
        assert text == want[i], f"request {i} (draft v{version}) is not the target's greedy output"
        assert version in {start_version, v1, v2}
    assert len({v for *_, v, _ in results}) >= 2, "the swaps should have landed between queued requests"
    assert core.live_draft().version == v2
    # one draft object per version: no request ran one version's label with another's weights
    drafts_by_version = {}
    for version, draft in seen:
        assert drafts_by_version.setdefault(version, draft) is draft
    assert len({id(d) for d in drafts_by_version.values()}) == len(drafts_by_version)
    # every training record names the version its response named
    assert stack["recorder"].flush(5)
    records = {r.request_id: r for r in stack["sink"].records}
    for *_, version, rid in results:
        assert records[rid.split("-", 1)[1]].draft_version == version


def test_mismatched_draft_is_refused_and_the_live_one_stays(stack):
    core, registry, http = stack["core"], stack["registry"], stack["http"]
    before = core.live_draft()
    wrong = tiny_llama(vocab=64, layers=1).state_dict()  # one layer, not two
    with pytest.raises(DraftMismatchError, match="missing"):
        core.swap_draft(before.version + 10, wrong)
    bent = dict(draft_state(stack["target"], 0.1, seed=5))
    bent["model.norm.weight"] = torch.ones(7)
    with pytest.raises(DraftMismatchError, match="model.norm.weight"):
        core.swap_draft(before.version + 10, bent)
    assert core.live_draft() is before
    registry.publish("odd", wrong)  # the registry stores it; the replica refuses it
    r = http.post("/admin/drafts/odd/sync", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 409 and "does not fit" in r.json()["error"]["message"]
    assert core.live_draft("odd") is before and "odd" not in core.health()["drafts"]
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}).json()["osd"]["draft_version"] == before.version


def test_sync_follows_rollback_and_admin_token_is_enforced(stack):
    core, registry, target, http = stack["core"], stack["registry"], stack["target"], stack["http"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    a = registry.publish("global", draft_state(target, 0.4, seed=21)).version
    b = registry.publish("global", draft_state(target, 0.4, seed=22), parent=a).version
    assert http.post("/admin/drafts/global/sync").status_code == 401
    assert http.post("/admin/drafts/global/sync", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert http.post("/admin/drafts/global/rollback").status_code == 401
    assert core.live_draft().version != b
    assert http.post("/admin/drafts/global/sync", headers=auth).json()["version"] == b
    listing = http.get("/admin/drafts").json()["clusters"]["global"]
    assert listing["version"] == b and listing["registry_live"] == b and listing["has_draft"]
    r = http.post("/admin/drafts/global/rollback", headers=auth)  # to b's parent, a: lower than ours
    assert r.status_code == 200 and r.json()["version"] == a and core.live_draft().version == a
    assert core.sync_from_registry() is None  # already in step
    assert http.post("/admin/drafts/global/rollback", headers=auth, json={"to_version": 10_000}).status_code == 409
    assert http.post("/admin/drafts/bad$name/sync", headers=auth).status_code == 400


def test_metrics_parse_and_move(stack):
    http, core = stack["http"], stack["core"]
    before = http.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    version = str(core.live_draft().version)
    drafted = metric(before.text, "osd:spec_decode_num_draft_tokens", cluster="global", draft_version=version)
    errors = metric(before.text, "osd:request_errors", status="422")
    http.post("/v1/completions", json={"prompt": "metrics please", "max_tokens": 16, "temperature": 0})
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
    after = http.get("/metrics").text
    assert metric(after, "osd:spec_decode_num_draft_tokens", cluster="global", draft_version=version) > drafted
    accepted = metric(after, "osd:spec_decode_num_accepted_tokens", cluster="global", draft_version=version)
    per_pos = [metric(after, "osd:spec_decode_num_accepted_tokens_per_pos", cluster="global",
                      draft_version=version, position=str(p)) for p in range(4)]
    assert sum(per_pos) == accepted > 0 and per_pos == sorted(per_pos, reverse=True)
    assert metric(after, "osd:request_errors", status="422") == errors + 1
    assert metric(after, "osd:draft_version", cluster="global") == float(version)
    assert metric(after, "osd:recorder_submitted") >= metric(after, "osd:recorder_pushed") > 0
    assert metric(after, "osd:recorder_dropped") == 0 and metric(after, "osd:recorder_spool_size") == 0


def test_core_validation_without_http(stack):
    core = stack["core"]
    with pytest.raises(ServingError) as e:
        core.complete({"prompt": "hi", "n": 3})
    assert e.value.status == 400 and e.value.param == "n"
    with pytest.raises(ServingError) as e:
        core.complete({"prompt": [5] * 1000})
    assert e.value.status == 413 and "255" in e.value.message
    out = core.complete({"prompt": "hi", "max_tokens": 3, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 1})
    assert out["usage"]["completion_tokens"] <= 3 and out["osd"]["draft_version"] == core.live_draft().version


def test_oversized_body_is_refused_before_reading(stack):
    from fastapi.testclient import TestClient

    with TestClient(build_app(stack["core"], max_body_bytes=1000)) as small:
        r = small.post("/v1/completions", json={"prompt": "x" * 2000})
        assert r.status_code == 413 and "limit is 1000" in r.json()["error"]["message"]
        assert small.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_replay_client_reports_what_the_endpoint_served(stack):
    from osd.serving.client import replay

    questions = [{"question_id": i, "category": c, "turns": [text]}
                 for i, (c, text) in enumerate([("qa", "abc"), ("math", "hello there")])]
    results = replay(str(stack["http"].base_url), questions, max_tokens=8)
    assert [r["question_id"] for r in results] == [0, 1]
    assert all(1 <= r["tokens"] <= 8 and r["draft_version"] is not None and r["tokens_per_s"] > 0 for r in results)
    assert all(1 <= r["target_forwards"] <= r["tokens"] and set(r["accepted_by_source"]) == {"draft", "suffix", "both"}
               for r in results)
