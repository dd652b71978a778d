"""Per-cluster training without Ray: the backlog scheduler, one TrainerLoop per cluster behind
ClusterTrainers, new clusters starting from the global draft, and the cap on live loops."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from support.tiny import noisy_copy, tiny_llama
from support.tiny_tokenizer import char_tokenizer

from osd.config import EngineConfig, SamplingParams
from osd.data.buffer import BufferConfig, RecordBuffer
from osd.decoding.engine import SpeculativeEngine
from osd.registry import DraftRegistry, FileStore
from trainers.clusters import ClusterTrainers
from trainers.config import DistillConfig, TrainerSettings
from trainers.loop import TrainerLoop
from trainers.scheduler import BacklogScheduler


def test_scheduler_prefers_big_backlogs_but_serves_every_one():
    s = BacklogScheduler(aging=0.25)
    picks = [s.pick({"big": 40, "small": 4, "idle": 0}) for _ in range(60)]
    assert picks.count("big") > 40 and "small" in picks and "idle" not in picks
    gaps = [b - a for a, b in zip(*[[i for i, p in enumerate(picks) if p == "small"]] * 2)]
    first = picks.index("small")
    assert first <= 40 and all(g <= 40 for g in gaps)  # (40 / 4 - 1) / 0.25 = 36 passes at most
    assert s.pick({"a": 0}) is None
    assert BacklogScheduler().pick({"b": 3, "a": 3}) == "a"  # ties: deterministic


def test_scheduler_validates():
    with pytest.raises(ValueError, match="aging"):
        BacklogScheduler(aging=0)


@pytest.fixture
def stack(redis_url, tmp_path):
    tokenizer = char_tokenizer(64)
    target = tiny_llama(vocab=64, sharpness=3.0)
    draft = noisy_copy(target, noise=0.6)
    engine = SpeculativeEngine(target, tokenizer, draft, EngineConfig(speculation="always", gamma=3))
    bconf = BufferConfig(redis_url=redis_url)
    registry = DraftRegistry(FileStore(tmp_path / "registry"))
    settings = TrainerSettings(poll_interval_s=0.05, read_count=8, flush_idle_s=0.01, pause_when_busy=False,
                               discovery_interval_s=0.01)
    distill = DistillConfig(update_interval=3, holdout_fraction=0.25, batch_size=4, gate_margin=1.0, lr=3e-3)
    made = []

    def make_loop(cluster: str) -> TrainerLoop:
        made.append(cluster)
        return TrainerLoop(noisy_copy(target, noise=0.6), RecordBuffer(bconf), registry, distill, settings,
                           cluster=cluster)

    def push(cluster: str, n: int) -> None:
        with RecordBuffer(bconf) as producer:
            for i in range(n):
                gen = engine.generate(tokenizer(f"{cluster} {i}: hello").input_ids, SamplingParams(max_tokens=8),
                                      cluster=cluster)
                producer.push(gen.record)

    return dict(make_loop=make_loop, bconf=bconf, registry=registry, settings=settings, push=push, made=made,
                draft=draft)


def run_until_settled(trainers: ClusterTrainers, expected: dict[str, int], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = trainers.status()
        acked = {c: s["acked"] for c, s in status["clusters"].items()}
        if all(acked.get(c, 0) >= n for c, n in expected.items()) and not status["records_pending"]:
            return status
        assert time.monotonic() < deadline, status
        trainers.step()


def test_every_cluster_gets_its_own_lineage_and_nothing_is_lost(stack):
    stack["push"]("global", 8)
    stack["push"]("math", 8)
    trainers = ClusterTrainers(stack["make_loop"], RecordBuffer(stack["bconf"]), stack["settings"])
    status = run_until_settled(trainers, {"global": 8, "math": 8})
    assert sorted(stack["made"]) == ["global", "math"]  # discovered from the buffer's streams
    registry = stack["registry"]
    assert registry.live("global").version >= 1 and registry.live("math").version >= 1
    assert status["acked"] == 16 and status["updates"] == sum(s["updates"] for s in status["clusters"].values())
    for cluster in ("global", "math"):
        stats = RecordBuffer(stack["bconf"]).stats(cluster)
        assert (stats.pending, stats.lag) == (0, 0)
    trainers.close()


def test_a_new_cluster_starts_from_the_global_draft(stack):
    registry = stack["registry"]
    state = {k: v + 0.01 for k, v in stack["draft"].model.state_dict().items()}  # a distinct "global v1"
    registry.publish("global", state, parent=0)
    loop = stack["make_loop"]("code")
    assert loop.live.version == 0 and loop.base_version == 1
    held = loop.holder.draft.model.state_dict()
    assert all(torch.equal(held[k], v) for k, v in state.items())
    loop.close()


def test_the_cap_closes_the_coldest_loop_and_its_records_come_back(stack):
    stack["push"]("global", 5)
    stack["push"]("math", 5)
    stack["push"]("code", 5)
    settings = stack["settings"].model_copy(update={"max_clusters": 1})
    trainers = ClusterTrainers(stack["make_loop"], RecordBuffer(stack["bconf"]), settings)
    deadline = time.monotonic() + 180
    done = set()
    while done != {"global", "math", "code"}:
        assert time.monotonic() < deadline, (done, trainers.status())
        trainers.step()
        for cluster in ("global", "math", "code"):
            s = RecordBuffer(stack["bconf"]).stats(cluster)
            if s.lag == 0 and s.pending == 0:
                done.add(cluster)
        assert len(trainers.loops) <= 1
    assert trainers.evictions >= 2
    trainers.close()


def test_shared_base_mode_trains_publishes_and_serves_adapters(redis_url, tmp_path):
    """cluster_drafts='lora': trainers publish LoRA adapters (a delta on the initial draft); a replica
    holds one base and hot-swaps each cluster's adapter; greedy output stays the target's."""
    from osd.data.recorder import Recorder
    from osd.models.adapters import AdapterSpec, SharedBaseDrafts
    from osd.serving.core import ServingCore

    tokenizer = char_tokenizer(64)
    target = tiny_llama(vocab=64, sharpness=3.0)
    draft = noisy_copy(target, noise=0.6)
    distill = DistillConfig(mode="lora", lora_rank=4, update_interval=3, holdout_fraction=0.25, batch_size=4,
                            gate_margin=1.0, lr=1e-2)
    shared = SharedBaseDrafts(noisy_copy(target, noise=0.6), AdapterSpec.from_distill_config(distill))
    engine = SpeculativeEngine(target, tokenizer, None, EngineConfig(speculation="always", gamma=3))
    reference = SpeculativeEngine(target, tokenizer, None, EngineConfig(speculation="always"))
    bconf = BufferConfig(redis_url=redis_url)
    registry = DraftRegistry(FileStore(tmp_path / "registry"))
    recorder = Recorder(RecordBuffer(bconf))
    core = ServingCore(engine, "tiny", recorder=recorder, registry=registry, shared=shared)
    settings = TrainerSettings(poll_interval_s=0.01, read_count=8, flush_idle_s=0.01, pause_when_busy=False,
                               discovery_interval_s=0.01)
    trainers = ClusterTrainers(
        lambda c: TrainerLoop(copy.deepcopy(draft), RecordBuffer(bconf), registry, distill, settings, cluster=c,
                              publish_adapters=True), RecordBuffer(bconf), settings)
    try:
        for i in range(12):
            cluster = ("math", "code")[i % 2]
            core.complete({"prompt": f"{cluster} {i}: hi", "max_tokens": 8, "temperature": 0,
                           "osd": {"cluster": cluster}})
        assert recorder.flush(timeout_s=10)
        while trainers.step():
            pass
        for cluster in ("math", "code"):
            manifest = registry.live(cluster)
            assert manifest is not None and manifest.meta["adapter_format"] == "lora-v1"
            state = registry.load_validated(cluster, manifest.version, shared.adapter_specs())
            assert all("lora_" in name for name in state)  # adapters only, never whole weights
            core.sync_from_registry(cluster=cluster)
        held = {c: core.live_draft(c) for c in ("math", "code")}
        assert {c: (d.lineage, d.version) for c, d in held.items()} == {
            c: (c, registry.live(c).version) for c in ("math", "code")}
        memory = shared.memory_bytes()
        # rank 4 on a 32-wide toy model: ~18% of the base each (a SmolLM2 2-layer draft: 0.5%)
        assert len(memory["adapters"]) == 2 and max(memory["adapters"].values()) < 0.25 * memory["base"]
        prompt = core.encode_prompt("math 99: hi")
        resp = core.complete({"prompt": prompt, "max_tokens": 16, "temperature": 0, "model": "tiny:math"})
        assert resp["osd"]["draft_cluster"] == "math" and resp["osd"]["proposed"] > 0
        assert resp["choices"][0]["text"] == reference.generate(prompt, SamplingParams(max_tokens=16)).text
    finally:
        trainers.close()
        recorder.close()
