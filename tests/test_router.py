"""The query-cluster router: stability, shared Redis state, outages, purity on Spec-Bench."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time

import numpy as np
import pytest
import redis
import torch
from pydantic import ValidationError

from osd.router import (
    DISABLED_CLUSTER,
    FeatureExtractor,
    Router,
    RouterConfig,
    purity,
    strip_template,
    template_affixes,
)

VOCAB, DIM, KINDS = 512, 32, 4


def tiny_embeddings() -> torch.Tensor:
    """[VOCAB, DIM]: token t leans towards direction t % KINDS, so each synthetic kind has its own mean."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(KINDS, DIM, generator=g)
    return 0.5 * torch.randn(VOCAB, DIM, generator=g) + dirs[torch.arange(VOCAB) % KINDS]


def synthetic_prompts(n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """n distinct prompts of KINDS kinds (tokens t with t % KINDS == kind), 8-40 tokens each."""
    rng = random.Random(seed)
    prompts, kinds, seen = [], [], set()
    while len(prompts) < n:
        kind = rng.randrange(KINDS)
        ids = [kind + KINDS * rng.randrange(VOCAB // KINDS) for _ in range(rng.randint(8, 40))]
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            prompts.append(ids)
            kinds.append(kind)
    return prompts, kinds


@pytest.fixture(scope="module")
def emb() -> torch.Tensor:
    return tiny_embeddings()


CFG = RouterConfig(num_clusters=KINDS, retry_interval_s=0.2, socket_timeout_s=0.5)


# ---------------------------------------------------------------------------- plain logic

def test_purity_function():
    assert purity(["a", "a", "b", "b"], ["x", "x", "y", "y"]) == 1.0
    assert purity(["a", "a", "a", "b"], ["x", "y", "x", "y"]) == 0.75  # a's majority is x: 2 of its 3
    with pytest.raises(ValueError, match="3 assignments but 2 labels"):
        purity(["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="at least one"):
        purity([], [])


def test_config_validation_errors_name_the_field():
    for bad, field in [({"num_clusters": 0}, "num_clusters"), ({"features": "tfidf"}, "features"),
                       ({"new_cluster_distance": 2.5}, "new_cluster_distance"),
                       ({"assignment_cache_size": 1}, "assignment_cache_size"),
                       ({"redis_prefix": "has space"}, "redis_prefix"), ({"socket_timeout_s": 0}, "socket_timeout_s"),
                       ({"num_clusters": 4, "typo": 1}, "typo")]:
        with pytest.raises(ValidationError, match=field):
            RouterConfig(**bad)
    assert all(f.description for f in RouterConfig.model_fields.values())


def test_router_argument_errors_say_what_to_do(emb):
    with pytest.raises(ValueError, match="needs the target's input embeddings.*features='ngram'"):
        Router(RouterConfig(features="embedding"), None)
    with pytest.raises(ValueError, match=r"\[vocab, hidden\]"):
        Router(RouterConfig(), emb[0])
    router = Router(CFG, emb)
    with pytest.raises(ValueError, match="empty"):
        router.route([])
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        router.route([1, VOCAB])
    assert Router(RouterConfig(features="ngram"), None).route([1, 2, 3]) == "c0"  # ngram needs no embeddings


def test_disabled_routes_everything_to_global(emb):
    router = Router(RouterConfig(enabled=False), emb)
    assert router.route([1, 2, 3]) == DISABLED_CLUSTER == "global"
    assert router.clusters() == []


def test_ids_are_stable_strings_opened_in_order_up_to_k(emb):
    prompts, kinds = synthetic_prompts(200)
    router = Router(CFG, emb)
    ids = [router.route(p) for p in prompts]
    assert router.clusters() == [f"c{i}" for i in range(KINDS)]
    first_seen = list(dict.fromkeys(ids))
    assert first_seen == sorted(first_seen, key=lambda c: int(c[1:]))  # opened c0, c1, ... in that order
    assert purity(ids, [str(k) for k in kinds]) == 1.0  # well-separated synthetic kinds
    assert sum(router.stats()["points"].values()) == len(prompts)


def test_strip_template():
    template = ([1, 2, 3], [9, 8])
    assert strip_template([1, 2, 3, 50, 51, 9, 8], template) == [50, 51]
    assert strip_template([7, 50, 9, 8], template) == [7, 50]  # another system prompt: the prefix stays
    assert strip_template([1, 2, 3, 9, 8], template) == [1, 2, 3, 9, 8]  # nothing left: keep it all
    assert strip_template([5, 6], None) == [5, 6]


def test_features_are_unit_and_length_aware(emb):
    fx = FeatureExtractor(RouterConfig(), emb)
    short, long = fx([0, 4, 8] * 3), fx([0, 4, 8] * 300)  # same mean embedding, 100x longer
    assert short.shape == (DIM + 1,) and abs(float(short.norm()) - 1) < 1e-5
    assert float(short @ long) < 0.9  # length alone moves the point
    ng = FeatureExtractor(RouterConfig(features="ngram", ngram_buckets=256), None)
    assert ng([1, 2, 3]).shape == (257,) and not torch.equal(ng([1, 2, 3]), ng([3, 2, 1]))  # bigrams see order


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_same_prompt_same_id_after_centroids_moved(backend, emb, request):
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    prompts, _ = synthetic_prompts(400, seed=1)
    router = Router(CFG, emb, url)
    first = {i: router.route(prompts[i]) for i in range(40)}
    before = router._state.centroids.clone()
    for p in prompts[40:]:
        router.route(p)
    assert not torch.equal(before, router._state.centroids)  # the centroids did drift
    assert {i: router.route(prompts[i]) for i in range(40)} == first
    if url:  # and not just from this replica's LRU: a fresh replica sees the stored assignments
        with Router(CFG, emb, url) as other:
            assert {i: other.route(prompts[i]) for i in range(40)} == first


def test_redis_state_is_json_plus_raw_float32(emb, redis_url):
    prompts, _ = synthetic_prompts(50)
    with Router(CFG, emb, redis_url) as router:
        for p in prompts:
            router.route(p)
        state = router._state
    client = redis.Redis.from_url(redis_url)
    header = json.loads(client.get("osd:router:state"))
    assert header["dtype"] == "float32-le" and header["dim"] == DIM + 1 and header["ids"] == list(state.ids)
    assert sum(header["counts"]) == 50 and header["version"] == 50
    for i, cid in enumerate(state.ids):
        raw = client.hget("osd:router:centroids", cid)
        assert len(raw) == 4 * (DIM + 1)
        assert np.array_equal(np.frombuffer(raw, dtype="<f4"), state.centroids[i].numpy())
    client.close()


def test_assignment_memory_in_redis_is_bounded(emb, redis_url):
    prompts, _ = synthetic_prompts(300)
    cfg = CFG.model_copy(update={"assignment_cache_size": 40})
    with Router(cfg, emb, redis_url) as router:
        for p in prompts:
            router.route(p)
        recent = [router.route(p) for p in prompts[-15:]]
    client = redis.Redis.from_url(redis_url)
    keys = client.keys("osd:router:assign:*")
    assert len(keys) <= 2 and sum(client.hlen(k) for k in keys) <= 40
    client.close()
    with Router(cfg, emb, redis_url) as fresh:  # the newest assignments survived the rotations
        assert [fresh.route(p) for p in prompts[-15:]] == recent


def test_other_feature_settings_on_the_same_prefix_are_refused(emb, redis_url):
    with Router(CFG, emb, redis_url) as router:
        router.route([1, 2, 3])
    with pytest.raises(ValueError, match="another redis_prefix"):
        Router(RouterConfig(features="ngram"), None, redis_url)
    with Router(RouterConfig(features="ngram", redis_prefix="osd:router2"), None, redis_url) as other:
        assert other.route([1, 2, 3]) == "c0"


def test_flushed_or_corrupt_redis_state_never_crashes_routing(emb, redis_url, caplog):
    prompts, _ = synthetic_prompts(80, seed=9)
    client = redis.Redis.from_url(redis_url)
    with Router(CFG, emb, redis_url) as router:
        for p in prompts[:40]:
            router.route(p)
        client.flushall()  # Redis is the truth: a wiped state starts over, ids from c0 again
        caplog.set_level(logging.WARNING, logger="osd.router")
        assert router.route(prompts[40]) == "c0" and router.clusters() == ["c0"]
        assert any("vanished" in r.message for r in caplog.records)
        client.set("osd:router:state", b"\x80not json")  # e.g. a pickle someone wrote
        assert router.route(prompts[41]) == "c0"  # answered from the cached state
        assert router.stats()["redis_up"] is False
    client.close()


# ---------------------------------------------------------------------------- replicas

def test_two_replicas_interleaved_route_like_one_router(emb, redis_url):
    prompts, _ = synthetic_prompts(240, seed=2)
    stream = prompts + prompts[:60]  # repeats too
    random.Random(3).shuffle(stream)
    reference = Router(CFG, emb)  # one in-memory router seeing the same order
    expected = [reference.route(p) for p in stream]
    rng = random.Random(4)
    with Router(CFG, emb, redis_url) as a, Router(CFG, emb, redis_url) as b:
        got = [rng.choice((a, b)).route(p) for p in stream]  # each update lands on the other's state
        assert got == expected
        assert [a.route(p) for p in prompts] == [b.route(p) for p in prompts]
        assert a.stats()["points"] == b.stats()["points"] == reference.stats()["points"]


def test_two_replicas_concurrent_updates_are_not_lost(emb, redis_url):
    prompts, _ = synthetic_prompts(300, seed=5)
    shared = prompts[:100]  # both replicas route these at the same time
    a, b = Router(CFG, emb, redis_url), Router(CFG, emb, redis_url)
    streams = {a: prompts[100:200] + shared, b: prompts[200:] + shared[::-1]}
    errors = []

    def work(router):
        try:
            for p in streams[router]:
                router.route(p)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert [a.route(p) for p in prompts] == [b.route(p) for p in prompts]
    # Every distinct prompt counted exactly once: no replica overwrote the other's update.
    assert sum(a.stats()["points"].values()) == sum(b.stats()["points"].values()) == len(prompts)
    assert a.stats()["version"] == len(prompts)
    a.close(), b.close()


def test_restart_keeps_assignments(emb, redis_url):
    prompts, _ = synthetic_prompts(150, seed=6)
    with Router(CFG, emb, redis_url) as first:
        ids = [first.route(p) for p in prompts]
        clusters, stats = first.clusters(), first.stats()["points"]
    with Router(CFG, emb, redis_url) as second:
        assert second.clusters() == clusters and second.stats()["points"] == stats
        assert [second.route(p) for p in reversed(prompts)] == ids[::-1]
        assert second.stats()["points"] == stats  # known prompts are not counted again


def test_redis_restart_keeps_state(emb, redis_url, redis_server):
    prompts, _ = synthetic_prompts(60, seed=7)
    with Router(CFG, emb, redis_url) as router:
        ids = [router.route(p) for p in prompts]
    redis_server.restart()  # AOF replay
    with Router(CFG, emb, redis_server.url) as router:
        assert [router.route(p) for p in prompts] == ids


# ---------------------------------------------------------------------------- Redis down

def test_redis_down_routes_from_cache_then_writes_back(emb, redis_url, redis_server, caplog):
    prompts, _ = synthetic_prompts(200, seed=8)
    known, new = prompts[:120], prompts[120:]
    router = Router(CFG, emb, redis_url)
    ids = [router.route(p) for p in known]
    redis_server.stop()
    try:
        caplog.set_level(logging.WARNING, logger="osd.router")
        t0 = time.monotonic()
        assert [router.route(p) for p in known] == ids
        offline = []
        for p in new[:40]:
            t1 = time.monotonic()
            offline.append(router.route(p))
            assert time.monotonic() - t1 < 1.5  # one short connect attempt at most
            time.sleep(0.01)  # spans several retry intervals: retries fail quietly
        assert time.monotonic() - t0 < 6
        assert set(offline) <= set(router.clusters())  # nearest cached centroid, no new ids
        stats = router.stats()
        assert not stats["redis_up"] and stats["offline_routes"] == 40
        assert sum("unreachable" in r.message for r in caplog.records) == 1  # logged once per outage
    finally:
        redis_server.start()
    time.sleep(CFG.retry_interval_s)
    router.route(new[40])  # back online: learns again and writes back what it handed out
    assert router.stats()["redis_up"]
    with Router(CFG, emb, redis_server.url) as fresh:
        assert [fresh.route(p) for p in new[:40]] == offline
        assert [fresh.route(p) for p in known] == ids
    router.close()


def test_no_redis_at_all_answers_fast(emb):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    t0 = time.monotonic()
    router = Router(CFG, emb, f"redis://127.0.0.1:{port}/0")
    prompts, _ = synthetic_prompts(20)
    assert {router.route(p) for p in prompts} == {"c0"}  # no state yet: the id the first cluster gets
    assert time.monotonic() - t0 < 5
    assert router.stats()["redis_up"] is False and router.clusters() == []


# ---------------------------------------------------------------------------- Spec-Bench purity

KINDS_5 = ["translation", "summarization", "math_reasoning", "qa", "coding"]  # coding: MT-bench's 10


@pytest.fixture(scope="module")
def smollm2_spec_bench():
    """(embeddings [V, d], template, prompt ids by question, categories): reads only the embedding matrix."""
    from safetensors import safe_open

    from osd.data.workloads import chat_prompt_ids, load_questions
    from osd.models.loading import load_tokenizer, resolve_model_path

    path = resolve_model_path("smollm2")
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        embeddings = f.get_tensor("model.embed_tokens.weight")
    tokenizer = load_tokenizer("smollm2")
    rows = load_questions(categories=KINDS_5 + ["rag"])
    prompts = [chat_prompt_ids(tokenizer, r["turns"][0]) for r in rows]
    return embeddings, template_affixes(tokenizer), prompts, [r["category"] for r in rows], tokenizer


def _shuffled_purity(router: Router, prompts, labels, kinds, seed) -> float:
    order = [i for i, c in enumerate(labels) if c in kinds]
    random.Random(seed).shuffle(order)
    return purity([router.route(prompts[i]) for i in order], [labels[i] for i in order])


@pytest.mark.smollm2
def test_template_affixes_of_smollm2(smollm2_spec_bench):
    _, (prefix, suffix), _, _, tokenizer = smollm2_spec_bench
    assert (len(prefix), len(suffix)) == (24, 6)
    from osd.data.workloads import chat_prompt_ids
    text = "Translate German to English: Guten Morgen"
    assert strip_template(chat_prompt_ids(tokenizer, text), (prefix, suffix)) == tokenizer.encode(text)


@pytest.mark.smollm2
def test_spec_bench_kinds_land_in_their_own_clusters(smollm2_spec_bench, redis_url):
    # Measured over 20 shuffled orders (k = 5, defaults): mean 0.959, worst 0.924; these three
    # orders 0.964 / 0.955 / 0.967. The plain mean (template kept, no length) at its best: 0.84.
    embeddings, template, prompts, labels, _ = smollm2_spec_bench
    cfg = RouterConfig(num_clusters=5)
    scores = [_shuffled_purity(Router(cfg, embeddings, template=template), prompts, labels, KINDS_5, seed)
              for seed in range(3)]
    assert min(scores) >= 0.9, scores
    # Through Redis the same order gives the same clusters as in memory (shared state is exact).
    with Router(cfg, embeddings, redis_url, template=template) as shared:
        assert _shuffled_purity(shared, prompts, labels, KINDS_5, seed=0) == scores[0]
    # rag and summarization are both long documents: inseparable by these features (purity
    # caps at ~0.8 with both), so only check that adding rag costs no more than that merge.
    six = _shuffled_purity(Router(RouterConfig(num_clusters=6), embeddings, template=template),
                           prompts, labels, KINDS_5 + ["rag"], seed=0)
    assert six >= 0.72, six


@pytest.mark.smollm2
def test_spec_bench_ngram_features_without_embeddings(smollm2_spec_bench):
    # Measured over 20 orders (k = 5, defaults): mean 0.82, worst 0.69 (two kinds share a
    # cluster); order 0 gives 0.915. Weaker than the embedding features, but no model needed.
    _, template, prompts, labels, _ = smollm2_spec_bench
    router = Router(RouterConfig(num_clusters=5, features="ngram"), None, template=template)
    assert _shuffled_purity(router, prompts, labels, KINDS_5, seed=0) >= 0.85
