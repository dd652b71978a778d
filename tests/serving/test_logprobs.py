"""``logprobs`` and ``echo`` on /v1/completions (OpenAI's legacy format), over the real HTTP app and tiny models.

The reference is a fresh forward of the target over prompt + output: every reported log-prob must be
log_softmax of its logits at that position (temperature 1, whatever the request's sampling), for the
chain and the tree engine, generated and prompt tokens alike.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from support.http_server import serving
from support.tiny import noisy_copy, tiny_llama
from support.tiny_tokenizer import char_tokenizer

from osd.config import EngineConfig, SamplingParams, TreeConfig
from osd.decoding.engine import SpeculativeEngine
from osd.decoding.tree_engine import TreeSpeculativeEngine
from osd.serving.core import ServingCore
from osd.serving.http import build_app

MODEL = "tiny"
PROMPT = "The quick brown fox"
TOL = 1e-4


@pytest.fixture(scope="module")
def stack():
    tokenizer = char_tokenizer(64)
    target = tiny_llama(vocab=64, sharpness=3.0)
    engine = SpeculativeEngine(target, tokenizer, noisy_copy(target, noise=0.3), EngineConfig(speculation="always", gamma=4))
    core = ServingCore(engine, MODEL)
    with serving(build_app(core)) as base:
        http = httpx.Client(base_url=base, timeout=30)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        yield {"core": core, "target": target, "tokenizer": tokenizer, "http": http, "client": client}
        http.close()


def fresh_logprobs(target, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i = log p(· | ids[:i + 1]), one plain forward of the target."""
    with torch.no_grad():
        return target(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_against_forward(stack, prompt_ids: list[int], output_ids: list[int], lp, echo: bool, top: int) -> None:
    """lp: the response's logprobs object (openai client or dict); every entry against a fresh forward."""
    lp = lp if isinstance(lp, dict) else lp.model_dump()
    tok = stack["tokenizer"]
    ids = prompt_ids + output_ids
    ref = fresh_logprobs(stack["target"], ids)
    first = 0 if echo else len(prompt_ids)  # position in ids of the first reported token
    assert lp["tokens"] == [tok.decode([t]) for t in ids[first:]]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(ids) - first
    for k, pos in enumerate(range(first, len(ids))):
        if pos == 0:  # nothing before a prompt's first token
            assert lp["token_logprobs"][k] is None and lp["top_logprobs"][k] is None
            continue
        row = ref[pos - 1]
        assert lp["token_logprobs"][k] == pytest.approx(row[ids[pos]].item(), abs=TOL)
        top_ids = torch.topk(row, top).indices.tolist()
        want = {tok.decode([t]): row[t].item() for t in top_ids + [ids[pos]]}
        assert lp["top_logprobs"][k] == pytest.approx(want, abs=TOL)
    # offsets: characters before each token in prompt + text (the char tokenizer: one per token; EOS none)
    prompt_text = tok.decode(prompt_ids, skip_special_tokens=True)
    assert lp["text_offset"][0] == (0 if echo else len(prompt_text))
    lengths = [len(tok.decode([t], skip_special_tokens=True)) for t in ids[first:]]
    assert lp["text_offset"] == [lp["text_offset"][0] + sum(lengths[:k]) for k in range(len(lengths))]


def reported_ids(stack, lp, skip: int) -> list[int]:
    """The ids of a response's tokens after the first ``skip`` (each char-tokenizer token spells uniquely)."""
    lp = lp if isinstance(lp, dict) else lp.model_dump()
    spelled = {stack["tokenizer"].decode([t]): t for t in range(64)}
    return [spelled[s] for s in lp["tokens"][skip:]]


def greedy_ids(core, prompt_ids: list[int], max_tokens: int) -> list[int]:
    return SpeculativeEngine(core.engine.target, core.tokenizer, None).generate(
        prompt_ids, SamplingParams(max_tokens=max_tokens)).output_ids


def test_greedy_logprobs_through_the_openai_client(stack):
    core = stack["core"]
    resp = stack["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=3)
    choice = resp.choices[0]
    prompt_ids = core.encode_prompt(PROMPT)
    output_ids = greedy_ids(core, prompt_ids, 16)
    assert choice.text == stack["tokenizer"].decode(output_ids, skip_special_tokens=True)
    assert resp.model_extra["osd"]["accepted"] > 0  # speculation ran: the rows came from verification forwards
    check_against_forward(stack, prompt_ids, output_ids, choice.logprobs, echo=False, top=3)
    # greedy: the chosen token is the likeliest, so each position lists exactly 3 tokens, the chosen one first
    for token, lp, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert len(top) == 3 and top[token] == lp == max(top.values())
    assert resp.usage.completion_tokens == len(output_ids)


def test_echo_with_max_tokens_0_scores_the_prompt_alone(stack):
    resp = stack["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = resp.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 0 and resp.usage.prompt_tokens == len(PROMPT)
    assert resp.model_extra["osd"]["target_forwards"] == 0  # the prefill alone
    check_against_forward(stack, stack["core"].encode_prompt(PROMPT), [], choice.logprobs, echo=True, top=2)
    # echo without logprobs: the prompt back, no forward needed
    r = stack["http"].post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True}).json()
    assert r["choices"][0] == {"index": 0, "text": PROMPT, "finish_reason": "length", "logprobs": None}


def test_lm_eval_loglikelihood_request_shape(stack):
    """What lm-eval's local-completions sends to score a continuation: token ids, echo, logprobs 1,
    max_tokens 1, temperature 0; it sums token_logprobs[len(context):-1]."""
    core = stack["core"]
    context, continuation = core.encode_prompt("Question: two plus two? Answer:"), core.encode_prompt(" four")
    body = {"model": MODEL, "prompt": [context + continuation], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    choice = stack["http"].post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    output_ids = greedy_ids(core, context + continuation, 1)
    assert len(lp["token_logprobs"]) == len(context) + len(continuation) + 1
    check_against_forward(stack, context + continuation, output_ids, lp, echo=True, top=1)
    ref = fresh_logprobs(stack["target"], context + continuation)
    want = sum(ref[len(context) + i - 1, t].item() for i, t in enumerate(continuation))
    assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(want, abs=1e-3)
    assert choice["text"] == stack["tokenizer"].decode(context + continuation + output_ids, skip_special_tokens=True)


def test_sampled_requests_report_the_raw_distribution(stack):
    """temperature and top_k shape sampling, not the reported log-probs: those stay log_softmax(logits)."""
    core = stack["core"]
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.7, "top_k": 20, "seed": 7, "logprobs": 0,
            "echo": True}
    first = stack["http"].post("/v1/completions", json=body).json()["choices"][0]
    again = stack["http"].post("/v1/completions", json=body).json()["choices"][0]
    assert first == again  # the same seed, the same sample and log-probs
    prompt_ids = core.encode_prompt(PROMPT)
    output_ids = reported_ids(stack, first["logprobs"], len(prompt_ids))
    assert first["text"] == PROMPT + stack["tokenizer"].decode(output_ids, skip_special_tokens=True)
    check_against_forward(stack, prompt_ids, output_ids, first["logprobs"], echo=True, top=0)


@pytest.mark.parametrize("config", [
    EngineConfig(speculation="always", tree=TreeConfig(shape="static", branching=[3, 2, 1])),
    EngineConfig(speculation="always", tree=TreeConfig(shape="dynamic", budget=6, max_depth=4)),
], ids=["static-tree", "dynamic-tree"])
def test_tree_engines_report_the_same_logprobs(stack, config):
    """A tree round commits a root-to-leaf path; its rows are the path's, in order."""
    target, tokenizer = stack["target"], stack["tokenizer"]
    core = ServingCore(TreeSpeculativeEngine(target, tokenizer, noisy_copy(target, noise=0.3), config), MODEL)
    prompt_ids = core.encode_prompt(PROMPT)
    for body in ({"temperature": 0}, {"temperature": 0.8, "seed": 3}):
        resp = core.complete({"prompt": PROMPT, "max_tokens": 14, "logprobs": 2, "echo": True, **body})
        choice = resp["choices"][0]
        assert resp["osd"]["accepted"] > 0
        output_ids = reported_ids(stack, choice["logprobs"], len(prompt_ids))
        assert choice["text"] == PROMPT + tokenizer.decode(output_ids, skip_special_tokens=True)
        assert len(output_ids) == resp["usage"]["completion_tokens"]
        check_against_forward(stack, prompt_ids, output_ids, choice["logprobs"], echo=True, top=2)


def test_a_prompt_list_gives_each_choice_its_own_logprobs(stack):
    core = stack["core"]
    prompts = [PROMPT, "abc"]
    resp = stack["client"].completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, logprobs=1,
                                              echo=True)
    for choice, prompt in zip(resp.choices, prompts):
        ids = core.encode_prompt(prompt)
        check_against_forward(stack, ids, greedy_ids(core, ids, 5), choice.logprobs, echo=True, top=1)


BAD = [
    ("logprobs 6", {"logprobs": 6}, 422, "logprobs", "0 to 5"),
    ("negative logprobs", {"logprobs": -1}, 422, "logprobs", "0 to 5"),
    ("logprobs streamed", {"logprobs": 2, "stream": True}, 400, "logprobs", "stream=false"),
    ("echo streamed", {"echo": True, "stream": True}, 400, "echo", "stream=false"),
    ("max_tokens 0 without echo", {"max_tokens": 0}, 400, "max_tokens", "echo=true"),
]


@pytest.mark.parametrize("body,status,param,says", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_logprobs_requests_get_a_4xx_that_says_what_to_send(stack, body, status, param, says):
    r = stack["http"].post("/v1/completions", json={"prompt": PROMPT, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_chat_logprobs_are_still_refused(stack):
    r = stack["http"].post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "logprobs": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert "/v1/completions" in r.json()["error"]["message"]
