"""A swap that makes things worse is undone by itself (osd/serving/swap_watch.py).

The decision rule on made-up totals; the registry's bad marks and its idempotent reject on both
stores; and a replica over a tiny target with a real Redis registry and dashboard: a good v1, then
a v2 that the promotion gate passed offline but whose bytes were scrambled on the way to the
registry (the weight-sync corruption SGLang users saw) is rolled back by the replica itself,
marked bad, shown on the dashboard and never loaded again; a swap to an equally good draft stays.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from support.tiny import noisy_copy, random_prompts, tiny_llama
from support.tiny_tokenizer import char_tokenizer

from osd.config import EngineConfig
from osd.data.recorder import Recorder
from osd.decoding.engine import SpecStats, SpeculativeEngine
from osd.registry import (
    BadDraftError,
    DraftRegistry,
    FileStore,
    RedisStore,
    RollbackError,
)
from osd.serving.core import ServingCore
from osd.serving.dashboard import DashboardStore
from osd.serving.http import build_app
from osd.serving.swap_watch import AutoRollbackConfig, SwapWatch, Verdict
from trainers.gate import PromotionGate

WATCH = AutoRollbackConfig(min_requests=6, min_draft_positions=40, margin=0.25)


def stats(alpha: float, tokens_per_forward: float, positions: int = 20, forwards: int = 10) -> SpecStats:
    """One request's stats with the given α̂ and tokens per target forward."""
    return SpecStats(beta_sum=alpha * positions, beta_count=positions, target_forwards=forwards,
                     output_tokens=round(tokens_per_forward * forwards))


def feed(watch: SwapWatch, version: int, alpha: float, tpf: float, n: int, cluster: str = "global") -> list[Verdict]:
    return [v for _ in range(n) if (v := watch.observe(cluster, version, stats(alpha, tpf))) is not None]


# --------------------------------------------------------------------------- the decision rule


def test_nothing_is_judged_before_both_minimums():
    watch = SwapWatch(WATCH)
    assert feed(watch, 1, 0.8, 2.5, 6) == []  # the first version has nothing to be compared with
    watch.swapped("global", 2)
    assert feed(watch, 2, 0.1, 1.1, 5) == []  # 5 of 6 requests
    few = SwapWatch(WATCH.model_copy(update={"min_draft_positions": 1000}))
    feed(few, 1, 0.8, 2.5, 100)
    few.swapped("global", 2)
    assert feed(few, 2, 0.1, 1.1, 49) == []  # requests enough, draft positions not (49 x 20 < 1000)
    [verdict] = feed(few, 2, 0.1, 1.1, 1)
    assert verdict.new.requests == verdict.old.requests == 50  # v1's newest requests that are just enough


def test_as_good_is_kept_and_a_clear_drop_is_rolled_back_once():
    watch = SwapWatch(WATCH)
    feed(watch, 1, 0.80, 2.5, 10)
    watch.swapped("global", 2)
    [kept] = feed(watch, 2, 0.78, 2.4, 10)  # a little worse, well within the margin
    assert not kept.roll_back and (kept.version, kept.baseline_version) == (2, 1)
    watch.swapped("global", 3)  # v2 proved itself: it is the baseline now
    [bad] = feed(watch, 3, 0.20, 1.2, 10)
    assert bad.roll_back and (bad.version, bad.baseline_version) == (3, 2)
    assert bad.new.requests == 6 and bad.old.requests == 6 and "v2" in bad.reason
    assert bad.old.alpha == pytest.approx(0.78) and bad.new.tokens_per_forward == pytest.approx(1.2)


def test_one_signal_falling_alone_is_not_enough():
    watch = SwapWatch(WATCH)
    feed(watch, 1, 0.80, 2.5, 6)
    watch.swapped("global", 2)
    [alpha_only] = feed(watch, 2, 0.30, 2.4, 6)  # e.g. suffix candidates carry the tokens per forward
    assert not alpha_only.roll_back
    watch.swapped("global", 3)
    [speed_only] = feed(watch, 3, 0.79, 1.3, 6)  # e.g. traffic with fewer repeats; the draft is as good
    assert not speed_only.roll_back


def test_rollbacks_stragglers_and_an_unjudged_version():
    watch = SwapWatch(WATCH)
    feed(watch, 1, 0.8, 2.5, 6)
    watch.swapped("global", 2)
    feed(watch, 2, 0.8, 2.5, 2)
    watch.swapped("global", 3)  # v2 went before it was judged: v3 is judged against v1, the last proven one
    assert feed(watch, 2, 0.0, 1.0, 3) == []  # v2's requests still finishing count for no one
    [bad] = feed(watch, 3, 0.1, 1.1, 6)
    assert bad.roll_back and bad.baseline_version == 1
    watch.swapped("global", 1)  # the rollback itself is never judged...
    assert feed(watch, 1, 0.8, 2.5, 20) == []
    watch.swapped("global", 4)  # ...and the rejected v3 never becomes a baseline
    [verdict] = feed(watch, 4, 0.8, 2.5, 6)
    assert verdict.baseline_version == 1 and not verdict.roll_back
    other = feed(watch, 7, 0.1, 1.0, 6, cluster="math")  # lineages are separate
    assert other == []


def test_a_version_rolled_away_from_is_no_baseline():
    watch = SwapWatch(WATCH)
    feed(watch, 1, 0.8, 2.5, 6)
    watch.swapped("global", 2)
    feed(watch, 2, 0.9, 2.8, 6)  # kept: v2 is the baseline once it goes
    watch.swapped("global", 1)  # an admin rolled v2 back, for reasons of their own
    watch.swapped("global", 3)  # before v1 served enough again: nothing trusted to compare v3 with
    assert feed(watch, 3, 0.1, 1.1, 20) == []


def test_config_validates_its_ranges():
    with pytest.raises(ValueError, match="margin"):
        AutoRollbackConfig(margin=1.0)
    with pytest.raises(ValueError, match="min_requests"):
        AutoRollbackConfig(min_requests=0)


# --------------------------------------------------------------------------- the registry's bad marks


@pytest.fixture(params=["file", "redis"])
def registry(request, tmp_path) -> DraftRegistry:
    if request.param == "file":
        return DraftRegistry(FileStore(tmp_path / "drafts"))
    return DraftRegistry(RedisStore(request.getfixturevalue("redis_url")))


def small(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), float(seed))}


def test_reject_marks_bad_and_rolls_back_once(registry):
    v1 = registry.publish("global", small(1)).version
    v2 = registry.publish("global", small(2), parent=v1).version
    moved = registry.reject("global", v2, "served worse", to_version=v1)
    assert moved is not None and moved.version == v1 and registry.live("global").version == v1
    assert registry.reject("global", v2, "a second replica, same verdict", to_version=v1) is None  # no-op
    assert registry.bad_versions("global") == {v2: "served worse"}  # the first reason stays
    with pytest.raises(BadDraftError, match="marked bad"):
        registry.promote("global", v2)
    with pytest.raises(BadDraftError, match="served worse"):
        registry.rollback("global", to_version=v2)
    v3 = registry.publish("global", small(3), parent=v2).version
    assert registry.rollback("global").version == v1  # v3's parent v2 is bad: skipped
    # A verdict arriving after a newer promotion marks the version but leaves the pointer alone.
    registry.promote("global", v3)
    assert registry.reject("global", v1, "late verdict") is None and registry.live("global").version == v3


def test_reject_with_nothing_stored_to_go_back_to_leaves_no_mark(registry):
    v1 = registry.publish("global", small(1), parent=0).version
    with pytest.raises(RollbackError, match="v0"):
        registry.reject("global", v1, "worse than the initial draft", to_version=0)
    assert registry.bad_versions("global") == {} and registry.live("global").version == v1


def test_concurrent_rejects_move_the_pointer_once(registry):
    v1 = registry.publish("global", small(1)).version
    v2 = registry.publish("global", small(2), parent=v1).version
    results, start = [], threading.Barrier(4)

    def replica():
        start.wait()
        results.append(registry.reject("global", v2, "worse", to_version=v1))

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1 and registry.live("global").version == v1


# --------------------------------------------------------------------------- a replica undoes a bad swap


class ListSink:
    def __init__(self):
        self.records = []

    def push(self, record):
        self.records.append(record)
        return str(len(self.records))


@pytest.fixture(scope="module")
def target():
    # Peaked like a real LM's next-token distributions (top token ~0.5): at the other tests' sharpness 3
    # they are nearly uniform (top ~0.03), and any draft, a scrambled one too, overlaps them by α̂ > 0.8.
    return tiny_llama(vocab=64, sharpness=30.0)


@pytest.fixture
def replica(target, redis_url):
    """A ServingCore over the tiny target with a Redis registry, dashboard and a record sink."""
    sink = ListSink()
    recorder = Recorder(sink)
    dashboard = DashboardStore(redis.Redis.from_url(redis_url))
    registry = DraftRegistry(RedisStore(redis_url))
    engine = SpeculativeEngine(target, char_tokenizer(64), noisy_copy(target, noise=0.3),
                               EngineConfig(speculation="always", gamma=4))
    core = ServingCore(engine, "tiny", recorder=recorder, registry=registry, dashboard=dashboard,
                       auto_rollback=WATCH)
    yield core, sink
    recorder.close()
    dashboard.close()


PROMPTS = random_prompts(100, 64, seed=3)


def serve(core: ServingCore, n: int, start: int = 0) -> list[int]:
    """n greedy requests (prompts start, start + 1, ...); the draft versions that served them."""
    return [core.complete({"model": "tiny", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 16,
                           "temperature": 0})["osd"]["draft_version"] for i in range(start, start + n)]


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_bad_version_that_passed_the_gate_is_rolled_back_by_the_replica(replica, target):
    core, sink = replica
    registry = core.registry
    v1 = registry.publish("global", noisy_copy(target, noise=0.3, seed=1).model.state_dict(), parent=0).version
    assert core.sync_from_registry().version == v1
    assert set(serve(core, 8)) == {v1}

    # The trainer's candidate beats v1 on held-out records: the gate promotes it...
    candidate = noisy_copy(target, noise=0.1, seed=2)
    assert core.recorder.flush(5) and len(sink.records) >= 8
    decision = PromotionGate().decide(candidate, core.live_draft().draft, sink.records)
    assert decision.promote, decision.reason
    # ...but the bytes that reach the registry are scrambled on the way (the LM head's rows shuffled):
    # same names, shapes and dtypes, a checksum over what was stored, so every replica loads them.
    state = dict(candidate.model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"][torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    v2 = registry.publish("global", state, parent=v1, gate_alpha=decision.candidate_alpha).version
    assert core.sync_from_registry().version == v2

    served = serve(core, WATCH.min_requests, start=8)
    assert served == [v2] * WATCH.min_requests  # judged after the last of these
    wait_for(lambda: core.live_draft().version == v1)

    assert registry.live("global").version == v1
    assert list(registry.bad_versions("global")) == [v2]
    assert "auto rollback" in registry.bad_versions("global")[v2]
    assert core.drafts_info()["clusters"]["global"]["bad_versions"] == {str(v2): registry.bad_versions("global")[v2]}
    assert set(serve(core, 2, start=20)) == {v1}
    assert core.dashboard.flush(5)
    swaps = core.dashboard.data().swaps
    assert (swaps[-1].version, swaps[-1].kind) == (v1, "auto_rollback")
    assert core.dashboard.trainer_counters()["global"]["auto_rollbacks"] == 1
    assert "osd:draft_auto_rollbacks_total{cluster=\"global\"} 1.0" in core.metrics_text()

    # Never again: not by a sync (even if the pointer were forced back), not by the admin route.
    assert core.sync_from_registry() is None
    registry.store.set_live("global", v2)
    with pytest.raises(BadDraftError, match="marked bad"):
        core.sync_from_registry()
    assert core.live_draft().version == v1
    registry.store.set_live("global", v1)
    with TestClient(build_app(core)) as http:
        r = http.post("/admin/drafts/global/rollback", json={"to_version": v2})
    assert r.status_code == 409 and "marked bad" in r.json()["error"]["message"]
    assert registry.live("global").version == v1


def test_a_good_swap_stays(replica, target):
    core, _ = replica
    registry = core.registry
    v1 = registry.publish("global", noisy_copy(target, noise=0.3, seed=1).model.state_dict(), parent=0).version
    core.sync_from_registry()
    serve(core, WATCH.min_requests)
    verdicts = []
    observe = core.watch.observe

    def spy(*args):
        verdicts.append(observe(*args))
        return verdicts[-1]

    core.watch.observe = spy
    v2 = registry.publish("global", noisy_copy(target, noise=0.3, seed=3).model.state_dict(), parent=v1).version
    core.sync_from_registry()
    assert serve(core, WATCH.min_requests + 2, start=50) == [v2] * (WATCH.min_requests + 2)
    [verdict] = [v for v in verdicts if v is not None]
    assert not verdict.roll_back and verdict.version == v2, verdict.reason
    assert registry.live("global").version == v2 == core.live_draft().version
    assert registry.bad_versions("global") == {}


def test_a_failed_rollback_never_breaks_serving_and_is_tried_again(replica, target, monkeypatch):
    core, _ = replica
    registry = core.registry
    v1 = registry.publish("global", noisy_copy(target, noise=0.3, seed=1).model.state_dict()).version
    core.sync_from_registry()
    serve(core, WATCH.min_requests)
    bad = dict(noisy_copy(target, noise=0.3, seed=1).model.state_dict())
    bad["lm_head.weight"] = bad["lm_head.weight"].flip(0)
    v2 = registry.publish("global", bad, parent=v1).version
    core.sync_from_registry()
    calls = []

    def down(*args, **kwargs):
        calls.append(args)
        raise redis.ConnectionError("Redis is down")

    monkeypatch.setattr(registry, "reject", down)
    assert serve(core, WATCH.min_requests) == [v2] * WATCH.min_requests  # served on
    wait_for(lambda: len(calls) == 1)
    monkeypatch.undo()  # Redis is back: the watch judges v2 again on its next requests, and acts
    wait_for(lambda: core.watch._lineages["global"].watching is not None)
    serve(core, WATCH.min_requests)
    wait_for(lambda: core.live_draft().version == v1)
    assert list(registry.bad_versions("global")) == [v2]


def test_requests_that_decoded_nothing_are_no_evidence():
    watch = SwapWatch(WATCH)
    feed(watch, 1, 0.8, 2.5, 6)
    watch.swapped("global", 2)
    for _ in range(20):  # e.g. prompts scored with max_tokens 0
        assert watch.observe("global", 2, SpecStats(output_tokens=1)) is None
    assert len(feed(watch, 2, 0.1, 1.1, 6)) == 1


def test_the_trainer_follows_an_auto_rollback_as_it_follows_an_admin_one(target, redis_url, caplog):
    from osd.data.buffer import BufferConfig, RecordBuffer
    from trainers.loop import TrainerLoop

    registry = DraftRegistry(RedisStore(redis_url))
    good = noisy_copy(target, noise=0.3, seed=1).model.state_dict()
    v1 = registry.publish("global", good, parent=0).version
    scrambled = dict(good)
    scrambled["lm_head.weight"] = scrambled["lm_head.weight"].flip(0)
    v2 = registry.publish("global", scrambled, parent=v1).version
    loop = TrainerLoop(noisy_copy(target, noise=0.3), RecordBuffer(BufferConfig(redis_url=redis_url)), registry)
    try:
        assert loop.live.version == v2  # started from what replicas serve
        registry.reject("global", v2, "served worse", to_version=v1)  # what a replica's watch does
        loop._follow_registry()  # what the loop does before every gate decision
        assert loop.live.version == v1  # the next candidate is judged against v1 and published on top of it
        assert torch.equal(loop.holder.draft.model.lm_head.weight, good["lm_head.weight"])
        assert "marked v2 bad (served worse)" in caplog.text
    finally:
        loop.close()
