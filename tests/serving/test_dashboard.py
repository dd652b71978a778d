"""The drift dashboard's history store against a real Redis: moving averages, retention, two
replicas sharing one history, Redis outages; the table and series it builds; the measured
speedup against the target alone, from what a real ServingCore posts."""

from __future__ import annotations

import json

import pytest
import redis

from osd.serving.dashboard import (
    DashboardConfig,
    DashboardStore,
    request_series,
    target_step_s,
)
from osd.serving.dashboard_schema import DashboardData


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store_factory(redis_url):
    made = []

    def make(config: DashboardConfig | None = None, clock=None) -> DashboardStore:
        client = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=0.5)
        store = DashboardStore(client, config, **({"clock": clock} if clock else {}))
        made.append(store)
        return store

    yield make
    for store in made:
        store.close(timeout_s=1.0)


def post(store, cluster, alphas, version=0, tokens=10, forwards=5, seconds=0.5):
    for a in alphas:
        store.post_request(cluster, version, a, tokens, forwards, seconds)


def test_moving_averages_are_per_cluster_and_over_the_last_window():
    points = [dict(t=i, cluster="a" if i % 3 else "b", version=0, alpha=i / 10, tokens=i + 1, forwards=2,
                   seconds=0.5) for i in range(10)]
    points.append(dict(t=10, cluster="a", version=1, alpha=None, tokens=4, forwards=4, seconds=1.0))
    series = request_series(points, window=3)
    a = [p for p in points if p["cluster"] == "a"]  # t = 1, 2, 4, 5, 7, 8, 10
    assert [p.t for p in series["a"]] == [p["t"] for p in a]
    assert series["a"][0].alpha_ma == pytest.approx(0.1)
    assert series["a"][4].alpha_ma == pytest.approx((0.4 + 0.5 + 0.7) / 3)  # window of 3: t = 4, 5, 7
    assert series["a"][-1].alpha is None  # served without a draft: skipped by the α̂ average
    assert series["a"][-1].alpha_ma == pytest.approx((0.7 + 0.8) / 2)
    assert series["a"][-1].tokens_per_forward_ma == pytest.approx((8 + 9 + 4) / (2 + 2 + 4))
    assert series["a"][-1].tokens_per_s_ma == pytest.approx((8 + 9 + 4) / (0.5 + 0.5 + 1.0))
    assert [p.t for p in series["b"]] == [0, 3, 6, 9]


def test_accepted_token_shares_by_source_are_ratios_of_sums_over_the_window(store_factory):
    store = store_factory(DashboardConfig(window=2))
    store.post_request("a", 0, 0.5, 10, 5, 0.5)  # posted without a split (as before suffix speculation)
    store.post_request("a", 0, 0.5, 10, 5, 0.5, accepted={"draft": 6, "suffix": 0, "both": 2})
    store.post_request("a", 0, 0.5, 10, 5, 0.5, accepted={"draft": 0, "suffix": 8, "both": 0})
    store.post_request("a", 0, None, 10, 10, 0.5, accepted={"draft": 0, "suffix": 0, "both": 0})
    store.post_request("b", 0, None, 10, 10, 0.5, accepted={"draft": 0, "suffix": 0, "both": 0})
    assert store.flush()
    data = store.data()
    DashboardData.model_validate_json(data.model_dump_json())
    shares = [p.source_share_ma.model_dump() if p.source_share_ma else None for p in data.series["a"]]
    assert shares[0] is None  # nothing accepted in the window (the point carries no split)
    assert shares[1] == pytest.approx({"draft": 0.75, "suffix": 0.0, "both": 0.25})
    assert shares[2] == pytest.approx({"draft": 6 / 16, "suffix": 8 / 16, "both": 2 / 16})  # tokens weigh, not requests
    assert shares[3] == pytest.approx({"draft": 0.0, "suffix": 1.0, "both": 0.0})  # window of 2: the last two
    assert data.series["b"][0].source_share_ma is None


def test_speedup_against_the_target_alone_is_a_ratio_of_sums_over_the_window(store_factory):
    """speedup = Σ tokens × target_step_s / Σ (seconds − prefill_s) over the window's requests that
    carry both; the others (no measured step, or posted before prefill_s existed) are left out, and a
    cluster with none has no speedup (null, never 0)."""
    store = store_factory(DashboardConfig(window=3))
    store.post_request("a", 0, 0.5, 10, 5, 0.5, prefill_s=0.1, target_step_s=0.02)  # 0.2 s alone / 0.4 s
    store.post_request("a", 0, 0.5, 30, 10, 1.0, prefill_s=0.2, target_step_s=0.04)  # 1.2 s alone / 0.8 s
    store.post_request("a", 0, 0.5, 40, 10, 2.0, target_step_s=0.04)  # no prefill_s (an older replica): skipped
    store.post_request("a", 0, None, 20, 20, 0.6, prefill_s=0.1, target_step_s=0.05)  # plain: 1.0 s alone / 0.5 s
    store.post_request("a", 0, 0.5, 10, 5, 0.5, prefill_s=0.1)  # step not measured: skipped
    store.post_request("b", 0, 0.5, 10, 5, 0.5, prefill_s=0.1, target_step_s=None)
    assert store.flush()
    data = store.data()
    DashboardData.model_validate_json(data.model_dump_json())
    a = data.series["a"]
    assert [p.speedup for p in a] == pytest.approx([0.2 / 0.4, 1.2 / 0.8, None, 1.0 / 0.5, None])
    assert a[0].speedup_ma == pytest.approx(0.5)
    assert a[1].speedup_ma == pytest.approx((0.2 + 1.2) / (0.4 + 0.8))
    assert a[2].speedup_ma == pytest.approx((0.2 + 1.2) / (0.4 + 0.8))  # the third point adds nothing
    assert a[3].speedup_ma == pytest.approx((1.2 + 1.0) / (0.8 + 0.5))  # window of 3: the first one left
    assert a[4].speedup_ma == pytest.approx(1.0 / 0.5)  # window: points 3, 4, 5; only 4 is measured
    assert [p.target_step_s for p in a] == [0.02, 0.04, 0.04, 0.05, None]
    rows = {r.cluster: r for r in data.clusters}
    assert rows["a"].speedup_now == pytest.approx(2.0) and rows["a"].target_step_s == 0.05  # the latest measured
    assert rows["b"].speedup_now is None and rows["b"].target_step_s is None
    assert data.series["b"][0].speedup is None and data.series["b"][0].speedup_ma is None


def _serving_engine(kind: str):
    from support.tiny import noisy_copy, tiny_llama
    from support.tiny_tokenizer import char_tokenizer

    from osd.config import EngineConfig, SuffixConfig, TreeConfig
    from osd.decoding.engine import SpeculativeEngine
    from osd.decoding.tree_engine import TreeSpeculativeEngine

    target = tiny_llama(vocab=64, sharpness=3.0)
    draft = noisy_copy(target, noise=0.6)
    if kind == "fused":  # the service's default shape; a given curve stands in for the start-up measurement
        return TreeSpeculativeEngine(target, char_tokenizer(64), draft, EngineConfig(suffix=SuffixConfig()),
                                     TreeConfig(), cost_curve={1: 1.5, 2: 1.6, 64: 4.0})
    return SpeculativeEngine(target, char_tokenizer(64), draft, EngineConfig(speculation=kind, gamma=3))


@pytest.mark.parametrize("kind", ["auto", "fused", "always"])
def test_a_replica_posts_what_the_speedup_needs(store_factory, redis_url, kind):
    """A real ServingCore posts each request's prefill time and the target's single-token step as it
    measured it: a chain in 'auto' from its governor's plain rounds, a fused tree from its cost curve
    T(1); a chain in 'always' times no single-token step, so its speedup stays unknown (null)."""
    from osd.serving.core import ServingCore

    engine = _serving_engine(kind)
    store = store_factory(DashboardConfig(window=50))
    core = ServingCore(engine, "tiny", dashboard=store)
    outputs = [core.complete({"prompt": f"request {i}: the quick brown fox", "max_tokens": 16, "temperature": 0})
               for i in range(4)]
    assert store.flush()
    raw = [json.loads(f[b"j"]) for _, f in redis.Redis.from_url(redis_url).xrange("osd:dash:requests")]
    assert [p["tokens"] for p in raw] == [o["usage"]["completion_tokens"] for o in outputs]
    assert all(0 < p["prefill_s"] < p["seconds"] for p in raw)
    draft = core.live_draft().draft
    step = target_step_s(engine, draft)
    if kind == "always":
        assert step is None and all(p["target_step_s"] is None for p in raw)
        (row,) = store.data().clusters
        assert row.speedup_now is None and row.target_step_s is None
        return
    if kind == "fused":
        assert step == 1.5 / 1000 and all(p["target_step_s"] == step for p in raw)
    else:  # the governor's moving average of its plain rounds' forwards, as /health shows it
        assert step == engine.governor(draft).describe()["verify_ms"][1] / 1000 > 0
        assert raw[-1]["target_step_s"] == step  # nothing ran since the last request
    data = store.data()
    measured = [p for p in raw if p["target_step_s"] is not None]
    expected = (sum(p["tokens"] * p["target_step_s"] for p in measured)
                / sum(p["seconds"] - p["prefill_s"] for p in measured))
    assert data.series["global"][-1].speedup_ma == pytest.approx(expected)
    assert expected > 0 and data.clusters[0].speedup_now == pytest.approx(expected)


def test_history_round_trips_through_redis_and_builds_the_table(store_factory):
    clock = Clock()
    store = store_factory(DashboardConfig(window=4), clock)
    post(store, "math", [0.1, 0.2])
    clock.t += 3600 + 1
    post(store, "math", [0.5, 0.6, 0.7, 0.8, 0.9])
    post(store, "code", [0.3], version=2)
    store.post_trainer("math", update=1, loss=0.5, alpha_candidate=0.6, alpha_live=0.4, promoted=True, version=2)
    store.post_swap("math", 2, "promoted")
    store.post_backlog("math", length=10, pending=2, lag=3)
    assert store.flush()

    data = store.data(live_versions={"math": 2, "fresh": None})
    DashboardData.model_validate_json(data.model_dump_json())  # the JSON validates as the schema
    assert data.window == 4 and set(data.series) == {"math", "code"}
    assert [round(p.alpha, 3) for p in data.series["math"]] == [0.1, 0.2, 0.5, 0.6, 0.7, 0.8, 0.9]
    rows = {r.cluster: r for r in data.clusters}
    assert set(rows) == {"math", "code", "fresh"}
    assert rows["math"].alpha_now == pytest.approx((0.6 + 0.7 + 0.8 + 0.9) / 4)
    assert rows["math"].alpha_hour_ago == pytest.approx(0.15)  # the last point at least an hour old
    assert rows["math"].live_version == 2 and rows["math"].requests == 7 and rows["math"].last_update == clock.t
    assert rows["code"].alpha_hour_ago is None and rows["fresh"].requests == 0
    assert [(s.cluster, s.version, s.kind) for s in data.swaps] == [("math", 2, "promoted")]
    assert data.trainer[0].alpha_candidate == 0.6 and data.backlog[0].lag == 3
    counters = store.trainer_counters()["math"]
    assert (counters["updates"], counters["promotions"], counters["alpha_live"]) == (1, 1, 0.4)


def test_two_replicas_share_one_history(store_factory):
    a, b = store_factory(), store_factory()
    post(a, "global", [0.2, 0.4])
    post(b, "global", [0.6])
    assert a.flush() and b.flush()
    assert [p.alpha for p in a.data().series["global"]] == [p.alpha for p in b.data().series["global"]]
    assert len(b.data().series["global"]) == 3


def test_retention_trims_by_entry_id_and_reads_are_capped(store_factory, redis_url):
    client = redis.Redis.from_url(redis_url)
    old = json.dumps(dict(t=1.0, cluster="global", version=0, alpha=0.5, tokens=1, forwards=1, seconds=0.1))
    client.xadd("osd:dash:requests", {"j": old}, id="1000-0")  # 1970: far past any retention
    store = store_factory(DashboardConfig(retention_s=3600, max_read=20))
    post(store, "global", [0.9] * 30)
    assert store.flush()
    assert client.xlen("osd:dash:requests") == 30  # the old point went with the next write
    data = store.data()
    assert len(data.series["global"]) == 20 and all(p.alpha == 0.9 for p in data.series["global"])


def test_unreadable_points_are_skipped(store_factory, redis_url):
    redis.Redis.from_url(redis_url).xadd("osd:dash:requests", {"j": b"{not json"})
    store = store_factory()
    post(store, "global", [0.3])
    assert store.flush()
    assert [p.alpha for p in store.data().series["global"]] == [0.3]


def test_redis_outage_holds_points_then_writes_them_and_counts_overflow(redis_server, store_factory):
    store = store_factory(DashboardConfig(queue_size=5))
    post(store, "global", [0.1])
    assert store.flush()
    redis_server.stop()
    try:
        post(store, "global", [0.2, 0.3])
        assert not store.flush(timeout_s=0.5)  # held, not lost
        with pytest.raises(redis.RedisError):
            store.data()
        post(store, "global", [0.4, 0.5, 0.6, 0.7, 0.8])  # 7 waiting, room for 5: the 2 oldest go
    finally:
        redis_server.restart()
    assert store.flush(timeout_s=15)
    assert store.dropped == 2
    assert [p.alpha for p in store.data().series["global"]] == [0.1, 0.4, 0.5, 0.6, 0.7, 0.8]
