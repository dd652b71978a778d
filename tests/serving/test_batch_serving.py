"""Continuous batching in the serving core (engine.max_batch > 1): concurrent requests share rounds in a BatchLoop on
the engine thread and each gets what the one-at-a-time core gives it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError
from support.tiny import hf_greedy, noisy_copy, tiny_llama
from support.tiny_tokenizer import char_tokenizer

from actors.config import OsdAppConfig
from osd.config import EngineConfig, TreeConfig
from osd.decoding.engine import SpeculativeEngine
from osd.decoding.tree_engine import TreeSpeculativeEngine
from osd.serving.core import ServingCore, ServingError

MODEL = "tiny"
PROMPTS = ["abc", "hello world", "x", "the cat sat on", "zzz", "batching!"]


class Records:
    """A Recorder stand-in: keeps what it is submitted."""

    def __init__(self):
        self.records, self._lock = [], threading.Lock()

    def submit(self, record):
        with self._lock:
            self.records.append(record)
        return True

    def by_id(self, completion_id):
        return next(r for r in self.records if r.request_id == completion_id.split("-", 1)[1])


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(vocab=64, sharpness=3.0)
    return target, noisy_copy(target, noise=0.3), char_tokenizer(64)


def _core(models, max_batch, **config):
    target, draft, tokenizer = models
    engine = SpeculativeEngine(target, tokenizer, draft,
                               EngineConfig(speculation="always", gamma=4, max_batch=max_batch, **config))
    records = Records()
    return ServingCore(engine, MODEL, recorder=records), records


def _request(i):
    sampled = i % 2 == 1
    return {"model": MODEL, "prompt": PROMPTS[i], "max_tokens": 6 + 5 * i,
            "temperature": 0.9 if sampled else 0.0, "seed": 1000 + i if sampled else None}


def _stream_text(stream):
    import json

    text = ""
    for line in stream:
        payload = line.removeprefix("data: ").strip()
        if payload == "[DONE]":
            break
        body = json.loads(payload)
        text += "".join(c["text"] for c in body["choices"])
    return text


def test_concurrent_requests_get_what_the_one_at_a_time_core_gives(models):
    batched, records = _core(models, max_batch=4)
    single, single_records = _core(models, max_batch=1)
    assert single.batch_loop is None and batched.batch_loop is not None
    batch, sizes = batched.batch_loop.batch, []
    step = batch.step
    batch.step = lambda: sizes.append(batch.active) or step()

    def run(i):
        if i == 2:  # one streaming request
            return _stream_text(batched.stream_complete(_request(i) | {"stream": True}))
        return batched.complete(_request(i))

    gate = threading.Event()
    held = batched.batch_loop.call(gate.wait)  # hold the loop until all six are queued
    with ThreadPoolExecutor(6) as pool:  # six requests, four slots: two queue in the loop and join as others leave
        futures = [pool.submit(run, i) for i in range(6)]
        deadline = time.monotonic() + 10
        while batched.batch_loop.waiting < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        gate.set()
        held.result(timeout=10)
        outs = [f.result(timeout=30) for f in futures]
    assert batched.load() == {"running": 0, "waiting": 0}
    assert sizes[0] == 4 and max(sizes) == 4  # they shared rounds; the two queued joined as others left
    target = models[0]
    for i, out in enumerate(outs):
        alone = single.complete(_request(i))
        text = out if i == 2 else out["choices"][0]["text"]
        assert text == alone["choices"][0]["text"], i
        if i == 2:
            continue
        assert out["usage"] == alone["usage"]
        assert out["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"]
        record = records.by_id(out["id"])  # each request's own record, under its own id
        reference = single_records.by_id(alone["id"])
        assert record.output_ids == reference.output_ids and record.rounds == reference.rounds
        assert (record.cluster, record.draft_version) == ("global", 0)
        if _request(i)["temperature"] == 0 and out["choices"][0]["finish_reason"] == "length":
            prompt_ids = batched.encode_prompt(PROMPTS[i])
            assert record.output_ids == hf_greedy(target, prompt_ids, _request(i)["max_tokens"])
    assert len(records.records) == 6


def test_a_cancelled_stream_frees_its_slot_and_the_others_finish(models):
    core, records = _core(models, max_batch=3)
    loop, batch, sizes = core.batch_loop, core.batch_loop.batch, []
    gate = threading.Event()
    held = loop.call(gate.wait)  # hold the loop until all three are queued: they join in one admission
    stream = core.stream_complete({"model": MODEL, "prompt": "a", "max_tokens": 200, "temperature": 0.0,
                                   "stream": True})
    step = batch.step

    def stepping():
        sizes.append(batch.active)
        if len(sizes) == 3:
            stream.close()  # the client goes away mid-way, all three decoding
        return step()

    batch.step = stepping
    with ThreadPoolExecutor(3) as pool:
        streamed = pool.submit(lambda: list(stream))
        others = [pool.submit(core.complete, _request(i) | {"max_tokens": 40}) for i in (0, 1)]
        deadline = time.monotonic() + 10
        while loop.waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        gate.set()
        held.result(timeout=10)
        outs = [f.result(timeout=20) for f in others]
        streamed.result(timeout=20)  # the stream just ends (no [DONE] for an absent client)
    assert sizes[:4] == [3, 3, 3, 2]  # dropped right after the round in which it went away
    assert all(o["choices"][0]["finish_reason"] for o in outs)
    assert batch.active == 0 and core.load() == {"running": 0, "waiting": 0}
    assert len(records.records) == 2  # none for the cancelled request
    assert core.complete(_request(3))["choices"][0]["finish_reason"]  # the loop serves on


def test_a_bad_request_is_refused_before_the_batch(models):
    core, _ = _core(models, max_batch=4)
    submitted = []
    submit = core.batch_loop.submit
    core.batch_loop.submit = lambda *a, **k: submitted.append(k) or submit(*a, **k)
    with pytest.raises(ServingError) as e:
        core.complete({"model": MODEL, "prompt": "a" * 300, "max_tokens": 4})
    assert e.value.status == 413
    with pytest.raises(ServingError) as e:
        core.complete({"model": MODEL, "prompt": "abc", "max_tokens": 255})
    assert e.value.status == 400
    assert submitted == [] and core.batch_loop.batch.active == 0
    assert core.complete(_request(0))["choices"][0]["text"]
    assert len(submitted) == 1


def test_logprobs_and_scoring_run_alone_between_rounds(models):
    batched, _ = _core(models, max_batch=4)
    single, _ = _core(models, max_batch=1)
    for req in ({"model": MODEL, "prompt": "abc", "max_tokens": 5, "temperature": 0, "logprobs": 2},
                {"model": MODEL, "prompt": "abc", "max_tokens": 0, "echo": True, "logprobs": 1}):
        got, want = batched.complete(req), single.complete(req)
        assert got["choices"] == want["choices"]


def test_config_refuses_what_batching_cannot_serve(models):
    for bad in ({"tree": TreeConfig()}, {"length_policy": "schedule"}):
        with pytest.raises(ValidationError, match="max_batch"):
            EngineConfig(max_batch=4, **bad)
    EngineConfig(max_batch=1, tree=TreeConfig())  # one at a time: anything goes
    EngineConfig(max_batch=4, suffix={})  # suffix chains are batched
    with pytest.raises(ValidationError, match="eagle"):
        OsdAppConfig.model_validate({"models": {"draft": "eagle"}, "engine": {"suffix": None, "max_batch": 4}})
    app = OsdAppConfig.model_validate({"engine": {"suffix": None, "max_batch": 24}, "max_ongoing_requests": 16})
    assert app.replica_max_ongoing_requests == 24
    assert OsdAppConfig().replica_max_ongoing_requests == OsdAppConfig().max_ongoing_requests
    target, draft, tokenizer = models
    tree = TreeSpeculativeEngine(target, tokenizer, draft, EngineConfig(tree=TreeConfig()))
    tree.config = tree.config.model_copy(update={"max_batch": 2})  # past the validator: the core still refuses it
    with pytest.raises(ValueError, match="max_batch"):
        ServingCore(tree, MODEL)


def test_batch_loop_keeps_a_failure_to_its_request(models):
    """A raising on_tokens fails its own request only; a failing round fails its requests and the loop serves on."""
    from osd.config import SamplingParams
    from osd.decoding.batch_engine import BatchEngine
    from osd.serving.batch_loop import BatchLoop
    from osd.serving.engine_thread import EngineThread

    target, draft, tokenizer = models
    engine = SpeculativeEngine(target, tokenizer, draft, EngineConfig(speculation="always", gamma=3))
    loop = BatchLoop(BatchEngine(engine, max_batch=3), EngineThread())
    params = SamplingParams(max_tokens=12, temperature=0)

    def boom(ids):
        raise KeyError("client bug")

    bad = loop.submit(boom, prompt_ids=[3, 4], params=params)
    good = loop.submit(None, prompt_ids=[3, 4], params=params)
    with pytest.raises(KeyError):
        bad.result(timeout=20)
    assert good.result(timeout=20).output_ids == engine.generate([3, 4], params).output_ids
    refused = loop.submit(None, prompt_ids=[3] * 250, params=params)  # past the context window: add refuses it
    with pytest.raises(ValueError):
        refused.result(timeout=20)
    step = loop.batch.step
    loop.batch.step = lambda: (_ for _ in ()).throw(RuntimeError("round failed"))
    with pytest.raises(RuntimeError, match="round failed"):
        loop.submit(None, prompt_ids=[5], params=params).result(timeout=20)
    loop.batch.step = step
    assert loop.batch.active == 0 and loop.submit(None, prompt_ids=[5], params=params).result(timeout=20).output_ids


def test_suffix_chains_serve_greedy_requests_losslessly_and_learn_from_traffic(models):
    """engine.suffix with max_batch > 1: the replica's BatchEngine proposes suffix chains; a repeated prompt is served
    from the traffic index, token for token the target's greedy output."""
    from osd.config import SuffixConfig

    core, records = _core(models, max_batch=4, suffix=SuffixConfig())
    target = models[0]
    req = {"model": MODEL, "prompt": "the cat sat on", "max_tokens": 24, "temperature": 0}
    with ThreadPoolExecutor(3) as pool:
        first = list(pool.map(core.complete, [req, req | {"prompt": "abc"}, req | {"prompt": "zzz"}]))
    again = core.complete(req)
    prompt_ids = core.encode_prompt(req["prompt"])
    for out in (first[0], again):
        assert records.by_id(out["id"]).output_ids == hf_greedy(target, prompt_ids, 24)
    assert again["osd"]["accepted_by_source"]["suffix"] >= 20  # the whole answer, from the first request's
