"""`osd bench faults`' parts: the tallies and the table on made-up requests, then two real faults (Redis
SIGKILLed and restarted; Redis down until the record backlog overflows) against a ServingCore + Recorder +
RecordBuffer under uvicorn with the tiny model. The whole command (a Ray deployment of SmolLM2, five
faults) runs as `make bench-faults`."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from support.http_server import serving
from support.tiny import noisy_copy, tiny_engine, tiny_llama

from bench.faults import (
    CorruptDraft,
    FullSpool,
    KillRedis,
    Sent,
    Timing,
    Traffic,
    TrainerTally,
    aims,
    render_markdown,
    run_fault,
    tally_records,
    tally_requests,
)
from cli.main import build_parser
from osd.data.buffer import BufferConfig, RecordBuffer
from osd.data.recorder import Recorder
from osd.registry import CorruptDraftError, DraftRegistry, FileStore
from osd.serving.core import ServingCore
from osd.serving.http import build_app
from trainers.config import DistillConfig, TrainerSettings
from trainers.loop import TrainerLoop

QUESTIONS = [{"turns": [f"why is the sky blue {i}?"]} for i in range(4)]


def test_tallies_aims_and_table():
    sent = [Sent(0, 0, True, 0.0, 1.0, True, 200, "a", 0, 3),
            Sent(1, 1, False, 0.5, 2.5, False, 500, error="HTTP 500: replica 1234abcd5678ef90 died", clean=True),
            Sent(2, 0, True, 1.5, 3.0, False, 200, "c", chunks=2, error="stream cut after 2 chunks: RemoteProtocolError",
                 clean=False),
            Sent(3, 1, False, 3.0, 4.0, True, 200, "d", 1),
            Sent(4, 0, True, 2.5, 5.0, True, 200, "e", 1)]
    req = tally_requests(sent, t_fault=2.0)
    assert (req["sent"], req["ok"], req["failed"], req["failed_in_flight"], req["failed_after_fault"]) == (5, 3, 2, 2, 0)
    assert req["failed_unclean"] == 1 and req["failed_streams_mid_stream"] == 1
    assert req["versions"] == {"0": 1, "1": 2} and req["first_ok_after_s"] == 2.0  # request 4: sent 2.5, done 5.0
    assert "HTTP N: replica … died" in req["errors"]
    rec = tally_records(sent, {"a": "acked", "d": "pending", "c": "acked"})
    assert (rec["produced"], rec["stored"], rec["acked"], rec["pending"], rec["lost"]) == (3, 2, 1, 1, 1)
    assert rec["lost_ids"] == ["e"] and rec["stored_from_failed"] == 1

    trainer = TrainerTally()  # counters of a killed incarnation and its restart add up
    trainer.sample({"pid": 1, "records_trained": 10, "updates": 2})
    trainer.sample({"pid": 1, "records_trained": 14, "updates": 3})
    trainer.sample({"pid": 2, "records_trained": 5, "updates": 1})
    assert trainer.delta()["records_trained"] == 9 and trainer.delta()["incarnations"] == 2

    row = {"fault": "replica", "details": {}, "requests": req, "records": rec, "settled": True,
           "recorder": {"dropped": 0}, "trainer": trainer.delta(), "full_strength_after_s": 20.0}
    row["aims"] = aims(row)
    assert row["aims"] == {"no_records_lost": False, "failures_only_in_flight": True, "failures_clean": False,
                           "recovered_within_30s": True}
    spool = {**row, "fault": "full_spool", "recorder": {"dropped": 1}}
    assert aims(spool)["no_records_lost"]  # a loss the recorder counted is no silent loss
    md = render_markdown({"config": {"clients": 4, "max_tokens": 16, "replicas": 2, "replica_threads": 1,
                                     "update_interval": 4, "target": "t", "recorder_capacity": 6, "hold_s": 5},
                          "environment": {"date": "d", "torch": "t", "cpu_count": 2}, "total_s": 60,
                          "faults": [row]})
    assert "| replica | 5 | 3 | 2 (2 in flight) | 3 | 2 | 1 | 9 | 1 | 0 | v0: 1, v1: 2 | 1.0 | 2.0 | 20.0 | ✗ ✓ ✗ ✓ |" in md
    assert "stream cut after N chunks" in md


def test_cli_registers_the_command():
    args = build_parser().parse_args(["bench", "faults", "--faults", "redis,full_spool", "--fault-capacity", "3"])
    assert args.which == "faults" and args.faults == "redis,full_spool" and args.fault_capacity == 3


class LocalSystem:
    """One in-process 'replica': a ServingCore with a Recorder on a real Redis, no trainer."""

    has_trainer = False

    def __init__(self, url: str, server, buffer: RecordBuffer, recorder: Recorder, core: ServingCore) -> None:
        self.url, self.redis, self.recorder, self.core = url, server, recorder, core
        self.buffer_config = buffer.config

    def replicas(self) -> list[dict]:
        return [{"replica": "local", "recorder": asdict(self.recorder.stats()), "drafts": self.core.health()["drafts"],
                 "sync_errors": {}, **self.core.load()}]

    def trainer(self) -> None:
        return None

    def registry(self) -> None:
        return None


@pytest.fixture
def local(redis_server, redis_url, tmp_path):
    def make(capacity: int):
        buffer = RecordBuffer(BufferConfig(redis_url=redis_url, socket_timeout_s=1.0, socket_connect_timeout_s=0.3))
        recorder = Recorder(buffer, capacity, spool_dir=tmp_path / f"spool-{capacity}", backoff_max_s=0.5)
        core = ServingCore(tiny_engine(), "tiny", recorder=recorder, buffer=buffer)
        made.append((buffer, recorder))
        return core, lambda url: LocalSystem(url, redis_server, buffer, recorder, core)

    made = []
    yield make
    for buffer, recorder in made:
        recorder.close(timeout_s=1.0)
        buffer.close()
    if not redis_server.running:
        redis_server.start()


FAST = Timing(lead_requests=2, lead_timeout_s=20, min_hold_s=1.0, max_hold_s=10, recover_timeout_s=15,
              tail_requests=2, tail_timeout_s=10, settle_timeout_s=15, poll_s=0.1)


@pytest.mark.timeout(60)
def test_redis_sigkill_and_restart_loses_no_record(local):
    core, system = local(capacity=10_000)
    with serving(build_app(core)) as base:
        row = run_fault(system(base), KillRedis(), Traffic(base, QUESTIONS, clients=2, max_tokens=4, think_s=0.05),
                        FAST, say=lambda _: None)
    req, rec = row["requests"], row["records"]
    assert "error" not in row["details"] and row["settled"]
    assert req["failed"] == 0 and req["ok"] >= 4, req["errors"]  # serving never failed a request for Redis
    assert row["recorder"]["push_failures"] >= 1, "records were submitted while Redis was down"
    assert rec["produced"] == req["ok"] and rec["lost"] == 0 and rec["stored"] == rec["produced"]
    assert row["full_strength_after_s"] is not None and req["first_ok_after_s"] < 5
    assert all(aims(row).values()), aims(row)


@pytest.mark.timeout(60)
def test_a_full_backlog_drops_the_oldest_and_counts_every_loss(local):
    core, system = local(capacity=3)
    with serving(build_app(core)) as base:
        row = run_fault(system(base), FullSpool(), Traffic(base, QUESTIONS, clients=2, max_tokens=4, think_s=0.05),
                        FAST, say=lambda _: None)
    req, rec = row["requests"], row["records"]
    assert row["details"]["held"] and row["settled"] and req["failed"] == 0
    assert row["recorder"]["dropped"] >= 1 and rec["lost"] == row["recorder"]["dropped"]  # counted, none silent
    assert rec["stored"] == rec["produced"] - rec["lost"] and aims(row)["no_records_lost"]


class RegistryOnly:
    def __init__(self, registry: DraftRegistry) -> None:
        self._registry = registry

    def registry(self) -> DraftRegistry:
        return self._registry

    def replicas(self) -> list[dict]:
        return []


@pytest.mark.timeout(60)
def test_a_corrupt_live_draft_is_rejected_by_the_trainer(make_buffer, tmp_path):
    """corrupt_draft's injection (the live version's bytes, damaged, made live) against a TrainerLoop: the
    loop cannot load it, so it marks it bad and puts the pointer back, instead of failing every update."""
    registry = DraftRegistry(FileStore(tmp_path / "registry"))
    loop = TrainerLoop(noisy_copy(tiny_llama(vocab=64), noise=0.6), make_buffer(), registry,
                       DistillConfig(update_interval=3), TrainerSettings(pause_when_busy=False))
    v1 = registry.publish("global", loop.distiller.export_state_dict(), parent=0).version
    loop._follow_registry()
    assert loop.live.version == v1
    fault, system = CorruptDraft(), RegistryOnly(registry)
    details = fault.inject(system)
    assert details["kind"].startswith("damaged bytes") and registry.live("global").version == details["version"]
    loop._follow_registry()  # an update's first step: raised CorruptDraftError before the fix
    assert registry.live("global").version == v1 == loop.live.version
    assert "sha256" in registry.bad_versions("global")[details["version"]]
    assert fault.held(system, details)
    fault.heal(system, details)
    assert details["rejected_by"].startswith("the trainer could not load it") and details["live_after"] == v1
    loop._follow_registry()  # nothing left to do
    loop.close()


def test_a_replica_refuses_a_corrupt_live_draft_once_and_keeps_serving_its_own(tmp_path):
    """corrupt_draft against a ServingCore: refused with the checksum error, the live draft kept, and later
    polls refuse it again without fetching its bytes (68 MB a poll for the SmolLM2 self-draft in bf16)."""
    registry = DraftRegistry(FileStore(tmp_path / "registry"))
    engine = tiny_engine()
    core = ServingCore(engine, "tiny", registry=registry)
    registry.publish("global", {k: v.clone() for k, v in engine.draft.published_module.state_dict().items()})
    assert core.sync_from_registry().version == 1
    details = CorruptDraft().inject(RegistryOnly(registry))
    fetches = []
    get_weights = registry.store.get_weights
    registry.store.get_weights = lambda *a: fetches.append(a) or get_weights(*a)
    for _ in range(3):
        with pytest.raises(CorruptDraftError, match="sha256"):
            core.sync_from_registry()
    assert len(fetches) == 1 and core.live_draft("global").version == 1
    registry.reject("global", details["version"], "test", to_version=1)
    assert core.sync_from_registry() is None and core.live_draft("global").version == 1
