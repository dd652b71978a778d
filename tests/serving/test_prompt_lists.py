"""``prompt`` as a list on /v1/completions, as OpenAI accepts it: a string, a list of strings, a list
of token ids, or a list of token-id lists. Each prompt is one choice (index = its position), and
each choice is what that prompt alone returns; usage sums over the prompts."""

from __future__ import annotations

import httpx
import openai
import pytest
from support.http_server import serving
from support.tiny import noisy_copy, tiny_llama
from support.tiny_tokenizer import char_tokenizer

from osd.config import EngineConfig, SamplingParams
from osd.decoding.engine import SpeculativeEngine
from osd.serving.api import MAX_PROMPTS
from osd.serving.core import ServingCore
from osd.serving.http import build_app

MODEL = "tiny"
GREEDY = {"temperature": 0, "max_tokens": 20}
PROMPTS = ["The quick brown fox", "Once upon a time", "abc"]


@pytest.fixture(scope="module")
def stack():
    tokenizer = char_tokenizer(64)
    target = tiny_llama(vocab=64, sharpness=3.0)
    engine = SpeculativeEngine(target, tokenizer, noisy_copy(target, noise=0.3), EngineConfig(speculation="always", gamma=4))
    core = ServingCore(engine, MODEL)
    reference = SpeculativeEngine(target, tokenizer, None)  # target-only: the greedy truth
    with serving(build_app(core)) as base:
        http = httpx.Client(base_url=base, timeout=30)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        yield {"core": core, "http": http, "client": client, "reference": reference}
        http.close()


def greedy(stack, prompt_ids: list[int]) -> str:
    return stack["reference"].generate(prompt_ids, SamplingParams(max_tokens=GREEDY["max_tokens"])).text


def singles(stack, prompts) -> list:
    return [stack["client"].completions.create(model=MODEL, prompt=p, **GREEDY) for p in prompts]


def assert_merged(resp, alone) -> None:
    """Choice i is prompt i's single-prompt answer; usage and the osd counters sum over the prompts."""
    assert [c.index for c in resp.choices] == list(range(len(alone)))
    assert [c.text for c in resp.choices] == [a.choices[0].text for a in alone]
    assert [c.finish_reason for c in resp.choices] == [a.choices[0].finish_reason for a in alone]
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert getattr(resp.usage, field) == sum(getattr(a.usage, field) for a in alone)
    per_choice = [c.model_extra["osd"] for c in resp.choices]
    osd = resp.model_extra["osd"]
    for counter in ("proposed", "accepted", "rounds", "target_forwards"):
        assert osd[counter] == sum(s[counter] for s in per_choice)
    assert osd["mean_acceptance_length"] == pytest.approx(1 + osd["accepted"] / osd["rounds"])
    assert sum(osd["accepted_by_source"].values()) == osd["accepted"]
    assert min(s["alpha_hat"] for s in per_choice) <= osd["alpha_hat"] <= max(s["alpha_hat"] for s in per_choice)


def test_a_list_of_strings_gives_one_choice_per_prompt(stack):
    core = stack["core"]
    resp = stack["client"].completions.create(model=MODEL, prompt=PROMPTS, **GREEDY)
    assert_merged(resp, singles(stack, PROMPTS))
    assert [c.text for c in resp.choices] == [greedy(stack, core.encode_prompt(p)) for p in PROMPTS]
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"


def test_a_list_of_token_id_lists_gives_one_choice_per_prompt(stack):
    core = stack["core"]
    ids = [core.encode_prompt(p) for p in PROMPTS]
    resp = stack["client"].completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert_merged(resp, singles(stack, ids))
    assert [c.text for c in resp.choices] == [greedy(stack, i) for i in ids]
    # and the same prompts as text give the same choices
    assert [c.text for c in resp.choices] == [
        c.text for c in stack["client"].completions.create(model=MODEL, prompt=PROMPTS, **GREEDY).choices]


@pytest.mark.parametrize("prompt", [["abc"], [[3, 4, 5]], [3, 4, 5], "abc"], ids=["[str]", "[[ids]]", "[ids]", "str"])
def test_one_prompt_in_any_form_is_one_choice(stack, prompt):
    ids = prompt if isinstance(prompt[0], int) else prompt[0] if isinstance(prompt[0], list) else None
    text = prompt if isinstance(prompt, str) else prompt[0] if isinstance(prompt[0], str) else None
    want = greedy(stack, ids if ids is not None else stack["core"].encode_prompt(text))
    resp = stack["http"].post("/v1/completions", json={"prompt": prompt, **GREEDY}).json()
    assert [(c["index"], c["text"]) for c in resp["choices"]] == [(0, want)]
    assert "osd" not in resp["choices"][0]  # a single prompt's response is unchanged: stats at the top only


def test_streaming_takes_one_prompt(stack):
    client = stack["client"]
    chunks = list(client.completions.create(model=MODEL, prompt=["abc"], stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == greedy(stack, stack["core"].encode_prompt("abc"))
    assert {c.choices[0].index for c in chunks} == {0}
    with pytest.raises(openai.BadRequestError, match="stream=true takes one prompt, got 2") as e:
        client.completions.create(model=MODEL, prompt=["abc", "def"], stream=True, **GREEDY)
    assert e.value.body["param"] == "stream"


BAD = [
    ("empty list", [], 400, "prompt is an empty list"),
    ("empty string in a list", ["abc", ""], 400, "prompt[1] is empty"),
    ("empty token list", [[3], []], 400, "prompt[1] is empty"),
    ("id past the vocabulary", [[3, 4], [5, 6, 64]], 400, "prompt[1][2] = 64"),
    ("negative id", [3, -1, 4], 400, "prompt[1] = -1"),
    ("huge id", [[10**40]], 400, "prompt[0] = 1e+40"),
    ("too many prompts", ["a"] * (MAX_PROMPTS + 1), 400, f"at most {MAX_PROMPTS}"),
    ("strings and ids mixed", ["abc", 3], 422, "prompt[1] is an integer (3), but prompt[0] is a string"),
    ("ids and lists mixed", [[3], 4], 422, "prompt[1] is an integer, but prompt[0] is a token-id list"),
    ("a boolean id", [[3, True]], 422, "prompt[0][1] is a boolean"),
    ("a fractional id", [3.5], 422, "prompt[0] is a number (3.5)"),
    ("an object", {"text": "abc"}, 422, "got an object"),
]


@pytest.mark.parametrize("name,prompt,status,says", BAD, ids=[b[0] for b in BAD])
def test_bad_prompt_lists_are_4xx_naming_the_prompt(stack, name, prompt, status, says):
    r = stack["http"].post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["param"] == "prompt"
    if " = " in says:  # a token id outside the vocabulary: the range to use
        assert "[0, 64)" in error["message"] and error["code"] == "invalid_token_id"


def test_bad_token_id_through_the_openai_client(stack):
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\]\[0\] = 99; token ids must be in \[0, 64\)"):
        stack["client"].completions.create(model=MODEL, prompt=[[3, 4], [99]], **GREEDY)


def test_a_prompt_too_long_for_the_context_is_named(stack):
    core = stack["core"]
    long_prompt = "a" * (core.max_prompt_tokens + 5)
    r = stack["http"].post("/v1/completions", json={"prompt": ["abc", long_prompt], "max_tokens": 4})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("prompt[1]: the prompt is")
    r = stack["http"].post("/v1/completions", json={"prompt": ["abc", "a" * 200], "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt[1]: ")
    # not about one prompt: no prompt named
    r = stack["http"].post("/v1/completions", json={"prompt": ["abc", "def"], "n": 2})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("n=2")


def test_sampled_prompt_lists_keep_each_prompts_seed(stack):
    """With a seed, each prompt samples as it would alone (every prompt starts from the request's seed)."""
    sampled = {"temperature": 0.9, "seed": 7, "max_tokens": 16}
    resp = stack["client"].completions.create(model=MODEL, prompt=PROMPTS[:2], **sampled)
    alone = [stack["client"].completions.create(model=MODEL, prompt=p, **sampled) for p in PROMPTS[:2]]
    assert [c.text for c in resp.choices] == [a.choices[0].text for a in alone]


def test_the_schema_states_the_prompt_forms_and_the_vocabulary(stack):
    """/openapi.json (what clients and the fuzzer read) lists the four forms, with this model's token-id range."""
    schema = stack["http"].get("/openapi.json").json()
    shapes = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert [s["type"] for s in shapes] == ["string", "array", "array", "array"]
    ids, nested = shapes[2]["items"], shapes[3]["items"]["items"]
    assert ids["maximum"] == nested["maximum"] == 63 and ids["minimum"] == 0
    assert shapes[1]["maxItems"] == shapes[3]["maxItems"] == MAX_PROMPTS
