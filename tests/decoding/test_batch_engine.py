"""Continuous batching (tiny random models, one SmolLM2 check): every request in a mixed batch decodes as it would alone."""

import pytest
import torch
from support.lossless import VOCAB, assert_distributed_as_target
from support.tiny import (
    CharTokenizer,
    hf_greedy,
    noisy_copy,
    random_prompts,
    tiny_llama,
)

from osd.config import EngineConfig, SamplingParams, TreeConfig
from osd.data.workloads import chat_prompt_ids, load_questions, spread_across_categories
from osd.decoding.batch_cache import BatchKVCache, target_forward
from osd.decoding.batch_cost import BatchCosts, choose_draft_length, measure_batch_costs
from osd.decoding.batch_engine import BatchEngine, BatchFull
from osd.decoding.engine import SpeculativeEngine


def _engine(target, draft, tokenizer=None, **config) -> SpeculativeEngine:
    config = {"speculation": "always", "gamma": 3} | config
    return SpeculativeEngine(target, tokenizer or CharTokenizer(), draft, EngineConfig(**config))


def _run_alone(engine: SpeculativeEngine, request: dict):
    return BatchEngine(engine, max_batch=1).generate_many([request])[0]


# ---- the batched KV cache -------------------------------------------------------------------------


def test_ragged_forward_matches_lone_forwards():
    model = tiny_llama(vocab=64)
    cache = BatchKVCache(model.config, slots=1, capacity=4)
    cache.reserve(3, 32)  # growth keeps nothing yet; later forwards write past the first capacity
    seqs = [[1, 2, 3, 4, 5, 6, 7], [9], [3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3]]
    with torch.inference_mode():
        for slot, seq in enumerate(seqs):  # prefill all but the last token (none for a 1-token prompt)
            target_forward(model, cache, slot, [seq[:-1]], logits=False)
        rows = [[seqs[0][-1], 11, 12], [seqs[1][-1]], [seqs[2][-1], 13, 14, 15, 16]]  # widths 3, 1, 5
        logits = target_forward(model, cache, 0, rows)
        for i, (seq, row) in enumerate(zip(seqs, rows)):
            alone = model(torch.tensor([seq[:-1] + row])).logits[0, -len(row):]
            assert torch.allclose(logits[i, : len(row)], alone, atol=1e-5), f"row {i}"
        assert cache.lengths[:3] == [len(s) - 1 + len(r) for s, r in zip(seqs, rows)]
        # Crop slot 2 back (a rejection), move it to slot 1 (a departure), and decode on: still exact.
        cache.set_length(2, len(seqs[2]) + 1)
        cache.move(2, 1)
        assert cache.lengths[:3] == [len(seqs[0]) + 2, len(seqs[2]) + 1, 0]
        logits = target_forward(model, cache, 0, [[21], [22, 23]])
        first = seqs[0][:-1] + rows[0] + [21]
        second = seqs[2][:-1] + rows[2][:2] + [22, 23]
        assert torch.allclose(logits[0, :1], model(torch.tensor([first])).logits[0, -1:], atol=1e-5)
        assert torch.allclose(logits[1, :2], model(torch.tensor([second])).logits[0, -2:], atol=1e-5)


# ---- every request as if alone ----------------------------------------------------------------------


def test_mixed_batch_equals_the_one_request_engine():
    """Greedy and sampled requests, prompt lengths 1-11, max_tokens 5-29, a stop string, EOS, another draft and no
    draft, three slots for eight requests (so they join mid-way as others leave): each request's output, stats,
    streamed tokens and training record are the one-request engine's."""
    target = tiny_llama(vocab=26, sharpness=3.0)
    eos = 16  # greedy after [4, 2]: 3 9 7 16 ...; after [5, 5, 1]: "mwomwomwomit..."; neither hits the other's end
    target.generation_config.eos_token_id = eos
    draft, other_draft = noisy_copy(target, 0.3), noisy_copy(target, 0.6, seed=3)
    single = _engine(target, draft, CharTokenizer(eos))
    prompts = random_prompts(8, 26, seed=4)
    prompts[:2] = [[4, 2], [5, 5, 1]]
    requests = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=16 if i == 1 else 5 + 3 * i, temperature=0.0 if i in (0, 1, 4, 6) else 0.8,
                                seed=100 + i, stop=["it"] if i == 1 else [])
        request = {"prompt_ids": prompt, "params": params, "request_id": f"r{i}", "cluster": f"c{i % 2}",
                   "draft_version": i}
        if i == 3:
            request["draft"] = other_draft
        if i == 5:
            request["draft"] = None
        requests.append(request)
    streamed = {r["request_id"]: [] for r in requests}
    for r in requests:
        r["on_tokens"] = streamed[r["request_id"]].extend
    outs = BatchEngine(single, max_batch=3).generate_many(requests)

    finish_reasons = set()
    for r, out in zip(requests, outs):
        kwargs = {k: r[k] for k in ("draft", "cluster", "draft_version", "request_id") if k in r}
        alone = single.generate(r["prompt_ids"], r["params"], **kwargs)
        assert out.output_ids == alone.output_ids, r["request_id"]
        assert (out.text, out.finish_reason) == (alone.text, alone.finish_reason)
        timing = {"elapsed_s": 0, "prefill_s": 0, "tokens_per_second": 0, "alpha_hat": 0}  # α̂ to float rounding
        assert out.stats.as_dict() | timing == alone.stats.as_dict() | timing
        assert out.stats.alpha_hat == pytest.approx(alone.stats.alpha_hat, abs=1e-5)
        assert streamed[r["request_id"]][: len(out.output_ids)] == out.output_ids
        rec, ref = out.record, alone.record
        assert (rec.request_id, rec.cluster, rec.draft_version, rec.rounds) == \
            (ref.request_id, ref.cluster, ref.draft_version, ref.rounds)
        assert torch.equal(rec.teacher_token_ids, ref.teacher_token_ids)
        assert torch.allclose(rec.teacher_logsumexp, ref.teacher_logsumexp, atol=1e-5)
        finish_reasons.add((r["request_id"], out.finish_reason))
        if r["params"].greedy and out.finish_reason == "length":
            assert out.output_ids == hf_greedy(target, r["prompt_ids"], r["params"].max_tokens)
    assert {("r0", "stop"), ("r1", "stop")} <= finish_reasons
    assert outs[1].text == "mwomwomwom" and outs[0].output_ids == [3, 9, 7, eos]
    assert outs[5].stats.rounds == 0 and outs[3].stats.rounds > 0


def test_output_does_not_depend_on_batch_mates():
    target = tiny_llama(vocab=64, sharpness=3.0)
    engine = _engine(target, noisy_copy(target, 0.4), gamma=4)
    probes = [{"prompt_ids": [5, 6, 7], "params": SamplingParams(max_tokens=30, temperature=0.9, seed=7)},
              {"prompt_ids": [1] * 9, "params": SamplingParams(max_tokens=25, temperature=1.0, top_k=8, seed=1)},
              {"prompt_ids": [9, 3], "params": SamplingParams(max_tokens=28)}]
    alone = [_run_alone(engine, p).output_ids for p in probes]
    fillers = [{"prompt_ids": p, "params": SamplingParams(max_tokens=4 + 5 * i, temperature=1.2, seed=i)}
               for i, p in enumerate(random_prompts(6, 64, seed=9))]
    batch = BatchEngine(engine, max_batch=5)
    mixed = batch.generate_many(fillers[:3] + probes[:1] + fillers[3:] + probes[1:])  # probes join at different times
    assert [mixed[3].output_ids, mixed[7].output_ids, mixed[8].output_ids] == alone

    # Under 'auto' the draft length follows the batch size; greedy outputs do not move with it.
    auto = BatchEngine(_engine(target, noisy_copy(target, 0.4), gamma=4, speculation="auto"), max_batch=4,
                       costs=_costs_where_speculation_stops_paying_at(3))
    greedy = [{"prompt_ids": p, "params": SamplingParams(max_tokens=12 + 4 * i)}
              for i, p in enumerate(random_prompts(6, 64, seed=11))]
    outs = auto.generate_many(greedy)
    for request, out in zip(greedy, outs):
        assert out.output_ids == hf_greedy(target, request["prompt_ids"], request["params"].max_tokens)
    assert any(o.stats.rounds for o in outs) and any(o.stats.target_forwards > o.stats.rounds for o in outs)


# ---- speculation that fits the load -----------------------------------------------------------------


def _costs_where_speculation_stops_paying_at(rows: int) -> BatchCosts:
    """Verifying k tokens costs as much as one below `rows` rows, and k times as much from there on."""
    return BatchCosts({n: {k: 10.0 * n * (1 if n < rows else k) for k in (1, 2, 3, 5)} for n in (1, 2, 4, 8)},
                      {n: 0.5 for n in (1, 2, 4, 8)})


def test_draft_length_from_the_cost_curve():
    costs = _costs_where_speculation_stops_paying_at(4)
    assert choose_draft_length([0.8], [10], 4, costs, [1]) == 4  # flat curve: draft the cap
    assert choose_draft_length([0.8] * 8, [10] * 8, 4, costs, [8]) == 0  # steep at batch 8: plain decoding
    assert choose_draft_length([0.0], [10], 4, costs, [1]) == 0  # a draft that is never accepted never pays
    assert choose_draft_length([0.8, None], [2, 10], 4, costs, [1]) == 2  # no more than max_tokens leaves room for
    assert choose_draft_length([None, None], [10, 10], 4, costs, []) == 0
    flat = BatchCosts({1: {1: 10.0, 5: 10.0}}, {1: 4.0})  # free verification, but each draft step costs 0.4 T
    assert choose_draft_length([0.3], [10], 4, flat, [1]) == 0 and choose_draft_length([0.9], [10], 4, flat, [1]) > 0


def test_auto_decodes_plainly_where_speculation_does_not_pay():
    target = tiny_llama(vocab=64, sharpness=3.0)
    engine = _engine(target, noisy_copy(target, 0.0), speculation="auto", gamma=4)  # the draft is always right
    costs = _costs_where_speculation_stops_paying_at(4)
    prompts = random_prompts(8, 64, seed=2)
    crowd = BatchEngine(engine, max_batch=8, costs=costs).generate_many(
        [{"prompt_ids": p, "params": SamplingParams(max_tokens=12)} for p in prompts])
    assert all(o.stats.rounds == 0 and o.stats.target_forwards == 12 for o in crowd)
    lone = BatchEngine(engine, max_batch=1, costs=costs).generate_many(
        [{"prompt_ids": prompts[0], "params": SamplingParams(max_tokens=12)}])[0]
    assert lone.stats.rounds > 0 and lone.stats.target_forwards < 12
    assert lone.output_ids == crowd[0].output_ids


def test_cost_table_is_measured_for_every_batch_size():
    target = tiny_llama(vocab=64)
    costs = measure_batch_costs(target, noisy_copy(target, 0.1), batch_sizes=(1, 3), widths=(1, 4), context=16, reps=2)
    assert set(costs.verify_ms) == {1, 3} and all(set(c) == {1, 4} for c in costs.verify_ms.values())
    assert all(c[1] <= c[4] for c in costs.verify_ms.values()) and set(costs.draft_ms) == {1, 3}
    assert costs.verify(2, 3) > 0 and costs.draft(2) > 0


# ---- sampled decoding through the batch: whole-sequence distributions ---------------------------------

SAMPLES = 1200


def test_sampled_sequences_follow_the_target_through_the_batch():
    gamma = 3
    target = tiny_llama(vocab=VOCAB, sharpness=4.0)
    draft = noisy_copy(target, noise=1.0)
    prompt = [1, 2]
    params = {"max_tokens": gamma + 1, "temperature": 1.3, "top_p": 0.6}
    engine = _engine(target, draft, gamma=gamma, record=False)
    # 32 requests at a time, each seeded differently, with greedy fillers of other lengths joining and leaving.
    requests = []
    for seed in range(SAMPLES):
        requests.append({"prompt_ids": prompt, "params": SamplingParams(seed=seed, **params)})
        if seed % 100 == 0:
            requests.append({"prompt_ids": [3, 1, 4, 1, 5][: 1 + seed % 5], "params": SamplingParams(max_tokens=9)})
    outs = BatchEngine(engine, max_batch=32).generate_many(requests)
    samples = [o for r, o in zip(requests, outs) if not r["params"].greedy]
    counts = {}
    for out in samples:
        counts[tuple(out.output_ids)] = counts.get(tuple(out.output_ids), 0) + 1
    assert_distributed_as_target(counts, SAMPLES, target, draft.model, prompt, SamplingParams(**params))
    accepted = sum(o.stats.accepted for o in samples)
    assert 0 < accepted < SAMPLES * gamma, "both accept and reject paths must be exercised"


# ---- joining, leaving, refusing -------------------------------------------------------------------------


def test_cancel_frees_the_slot_and_leaves_the_others_alone():
    target = tiny_llama(vocab=64, sharpness=3.0)
    engine = _engine(target, noisy_copy(target, 0.4))
    a, b, c = ({"prompt_ids": p, "params": SamplingParams(max_tokens=20, temperature=0.7, seed=i)}
               for i, p in enumerate(random_prompts(3, 64, seed=5)))
    batch = BatchEngine(engine, max_batch=2)
    batch.add(**a, request_id="a")
    batch.add(**b, request_id="b")
    with pytest.raises(BatchFull, match="step"):
        batch.add(**c)
    batch.step()
    assert batch.cancel("a") and not batch.cancel("a") and not batch.cancel("nobody")
    assert batch.active == 1 and batch.has_room
    batch.add(**c, request_id="c")  # takes the freed slot
    done = {}
    while batch.active:
        out = batch.step()
        assert "a" not in out.tokens
        done |= out.finished
    assert set(done) == {"b", "c"}
    assert done["b"].output_ids == _run_alone(engine, b).output_ids
    assert done["c"].output_ids == _run_alone(engine, c).output_ids


def test_a_swapped_draft_serves_new_requests_while_running_ones_keep_theirs():
    target = tiny_llama(vocab=64, sharpness=3.0)
    old, new = noisy_copy(target, 0.8, seed=1), noisy_copy(target, 0.1, seed=2)
    engine = _engine(target, old)
    first, second = ({"prompt_ids": p, "params": SamplingParams(max_tokens=24, temperature=0.8, seed=4)}
                     for p in random_prompts(2, 64, seed=6))
    batch = BatchEngine(engine, max_batch=2)
    batch.add(**first, request_id="first")
    batch.step()
    engine.draft = new  # a hot swap between rounds
    batch.add(**second, request_id="second")
    done = {}
    while batch.active:
        done |= batch.step().finished
    assert done["first"].output_ids == engine.generate(**first, draft=old).output_ids
    assert done["first"].stats.accepted == engine.generate(**first, draft=old).stats.accepted
    assert done["second"].stats.accepted == engine.generate(**second, draft=new).stats.accepted
    assert [g.draft for g in batch._groups.values()] == [new]  # the old draft's cache went with its last request


def test_refuses_what_it_cannot_batch():
    target = tiny_llama(vocab=64)
    with pytest.raises(ValueError, match="tree"):
        BatchEngine(SpeculativeEngine(target, CharTokenizer(), None, EngineConfig(tree=TreeConfig())))
    batch = BatchEngine(_engine(target, None))
    with pytest.raises(ValueError, match="context window"):
        batch.add([1] * 10, SamplingParams(max_tokens=250))
    batch.add([1, 2], SamplingParams(max_tokens=2), request_id="x")
    with pytest.raises(ValueError, match="already running"):
        batch.add([1, 2], SamplingParams(max_tokens=2), request_id="x")


@pytest.mark.smollm2
def test_smollm2_batch_equals_the_one_request_engine(smollm2):
    """The real model (fp32: bf16 rounds a batched row differently at near-ties, see test_bf16.py): three Spec-Bench
    prompts of different lengths, one without the draft, decode in one batch exactly as one at a time."""
    target, tokenizer, draft = smollm2
    engine = SpeculativeEngine(target, tokenizer, draft, EngineConfig(speculation="always", gamma=3))
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in spread_across_categories(load_questions(), 3)]
    requests = [{"prompt_ids": p, "params": SamplingParams(max_tokens=12, temperature=0.0 if i else 0.7, seed=i)}
                for i, p in enumerate(prompts)]
    requests[2]["draft"] = None
    outs = BatchEngine(engine, max_batch=3).generate_many(requests)
    for request, out in zip(requests, outs):
        alone = engine.generate(**request)
        assert out.output_ids == alone.output_ids and out.stats.accepted == alone.stats.accepted


# ---- suffix chains in the batch ---------------------------------------------------------------------------


LIVE = object()  # a request without "draft": the engine's live draft


def _suffix_engine(target, draft, **config) -> SpeculativeEngine:
    from osd.config import SuffixConfig

    return _engine(target, draft, suffix=SuffixConfig(max_depth=6), **config)


def test_suffix_chains_are_greedy_lossless_and_do_the_drafting_on_repeats():
    """Repetitive prompts (their own text predicts the output) and a repeated request (the traffic index has it):
    suffix chains carry most accepted tokens, and every output is HF greedy's, with or without a draft."""
    target = tiny_llama(vocab=26, sharpness=3.0)
    engine = _suffix_engine(target, noisy_copy(target, 0.6))
    prompts = [[4, 2, 7] * 4, [5, 5, 1, 9] * 3, [3, 1, 4, 1, 5]]
    requests = [{"prompt_ids": p, "params": SamplingParams(max_tokens=24), "draft": d}
                for p in prompts for d in (LIVE, None)]
    requests = [{k: v for k, v in r.items() if v is not LIVE} for r in requests]
    batch = BatchEngine(engine, max_batch=4)
    first = batch.generate_many(requests)
    again = batch.generate_many(requests[:2])  # now in the traffic index
    for r, out in zip(requests + requests[:2], first + again):
        assert out.output_ids == hf_greedy(target, r["prompt_ids"], 24)
    by_source = [o.stats.accepted_by_source() for o in first + again]
    assert sum(s["suffix"] for s in by_source) > sum(s["draft"] for s in by_source) > 0
    assert min(o.stats.accepted_suffix for o in again) >= 20  # a repeat: nearly all of it from the traffic index
    assert all(o.stats.alpha_hat is None and o.record.rounds == []  # α̂ and record rounds are the draft's alone
               for r, o in zip(requests, first) if "draft" in r)


def test_sampled_sequences_follow_the_target_through_suffix_chains():
    """Point-mass proposals, accepted or rejected by the target's draws: every finished request joins the traffic
    index, so later requests with the same prompt are proposed earlier samples' outputs. The outputs are distributed
    as the target's (chi-square), while the chains are really proposed and really rejected."""
    target = tiny_llama(vocab=VOCAB, sharpness=4.0)
    prompt = [1, 2]
    params = {"max_tokens": 4, "temperature": 1.3, "top_p": 0.6}
    from osd.config import SuffixConfig

    engine = _engine(target, None, suffix=SuffixConfig(max_depth=4), record=False)
    requests = [{"prompt_ids": prompt, "params": SamplingParams(seed=seed, **params)} for seed in range(SAMPLES)]
    outs = BatchEngine(engine, max_batch=32).generate_many(requests)
    counts = {}
    for out in outs:
        counts[tuple(out.output_ids)] = counts.get(tuple(out.output_ids), 0) + 1
    assert_distributed_as_target(counts, SAMPLES, target, noisy_copy(target, noise=1.0).model, prompt,
                                 SamplingParams(**params))
    proposed, accepted = sum(o.stats.proposed for o in outs), sum(o.stats.accepted_suffix for o in outs)
    assert 0 < accepted < proposed, "both accept and reject paths must be exercised"


def test_suffix_chain_depth_follows_the_cost_table():
    """Under 'auto' a chain is cut where a wider verification costs more than its expected tokens bring."""
    target = tiny_llama(vocab=26, sharpness=3.0)
    prompt = [4, 2, 7] * 5

    def served(verify_ms):
        engine = _suffix_engine(target, None, speculation="auto")
        batch = BatchEngine(engine, max_batch=2, costs=BatchCosts(verify_ms), measure=False)
        out = batch.generate_many([{"prompt_ids": prompt, "params": SamplingParams(max_tokens=20)}])[0]
        assert out.output_ids == hf_greedy(target, prompt, 20)
        return out.stats

    flat = served({n: {1: 10.0, 7: 10.5} for n in (1, 2)})  # width nearly free: chains run deep
    steep = served({n: {1: 10.0, 7: 100.0} for n in (1, 2)})  # each extra row costs 1.5 forwards: no chains
    assert flat.accepted_suffix > 0 and flat.target_forwards < 20
    assert steep.proposed == 0 and steep.target_forwards == 20


def test_chain_payoff_holds_chains_back_where_they_measure_slower():
    from osd.decoding.batch_cost import ChainPayoff

    payoff = ChainPayoff(min_rounds=4, probe_every=8)
    assert payoff.allow(8)  # nothing measured yet: rounds with chains first ...
    for _ in range(4):
        payoff.observe(8, True, tokens=10, ms=100.0)
    assert not payoff.allow(8)  # ... then rounds without
    for _ in range(4):
        payoff.observe(8, True, tokens=10, ms=100.0)  # 0.10 tokens per ms with chains
        payoff.observe(8, False, tokens=8, ms=50.0)  # 0.16 without
    allowed = [payoff.allow(8) for _ in range(32)]
    assert sum(allowed) == 4  # only the probes, every 8th round
    assert all(payoff.allow(2) for _ in range(4))  # another batch size is measured apart
    for _ in range(64):  # traffic changed: chains now pay
        payoff.observe(8, True, tokens=30, ms=100.0)
    assert sum(payoff.allow(8) for _ in range(32)) == 28  # chains, but for a probe without them every 8th round


def test_chains_stop_where_the_rounds_that_carry_them_are_slower(monkeypatch):
    """A clock under which a forward costs its rows × width² ms (chains never pay): the engine measures that and
    stops proposing chains at that batch size but for probes; greedy output stays the target's."""
    import osd.decoding.batch_engine as be

    target = tiny_llama(vocab=26, sharpness=3.0)
    engine = _suffix_engine(target, None, speculation="auto")
    batch = BatchEngine(engine, max_batch=4, costs=BatchCosts({n: {1: 10.0, 9: 10.5} for n in (1, 2, 4)}),
                        measure=False)  # the table says chains are nearly free
    now = [0.0]
    forward = be.target_forward

    def timed_forward(model, cache, start, rows, **kw):
        now[0] += len(rows) * max(map(len, rows)) ** 2 / 1000  # seconds
        return forward(model, cache, start, rows, **kw)

    monkeypatch.setattr(be, "target_forward", timed_forward)
    batch.clock = lambda: now[0]
    prompts = [[4, 2, 7] * 4, [5, 5, 1, 9] * 3, [3, 1, 4, 1, 5] * 2, [6, 2] * 5]
    requests = [{"prompt_ids": p, "params": SamplingParams(max_tokens=40)} for p in prompts * 8]
    carried = []
    choose = batch._choose_chains
    monkeypatch.setattr(batch, "_choose_chains", lambda g: choose(g) or carried.append(
        (batch.active, any(r.chain for r in batch._slots))))
    outs = batch.generate_many(requests)
    for r, out in zip(requests, outs):
        assert out.output_ids == hf_greedy(target, r["prompt_ids"], 40)
    full = [chains for size, chains in carried if size == 4]  # a full batch: one bucket
    early, late = full[:8], full[24:]  # 8 rounds with chains, then (at least) 8 without, then the verdict
    assert all(early) and len(late) >= 16 and sum(late) <= len(late) / 8 + 1, full
