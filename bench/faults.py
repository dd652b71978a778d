"""`osd bench faults`: steady traffic through the real deployment while one fault at a time hits it.

Faults, in run order (each on the same deployment, after the previous one has settled):

- ``replica``: SIGKILL of a Serve replica that is generating (streams are in flight: half the
  clients stream). Serve replaces it; the replacement claims the dead one's spool directory.
- ``trainer``: SIGKILL of the trainer actor's process. Ray restarts it (``max_restarts=-1``); it
  re-reads the entries it left pending (trainers/loop.py).
- ``redis``: SIGKILL of the buffer's redis-server, restarted on the same port and AOF after
  ``--fault-hold`` seconds. Replicas spool records meanwhile (osd/data/recorder.py).
- ``corrupt_draft``: a new draft version made live whose stored bytes are damaged (a copy of the
  live version with bytes flipped, so its sha256 no longer matches), or, with no stored version
  yet, one whose tensors do not fit the replicas' draft. Replicas must refuse it and keep serving
  what they serve; the trainer, which cannot load it either, rejects it (marked bad, the pointer
  back); if nothing has within ``max_hold_s``, the bench does, as an operator would.
- ``full_spool``: Redis killed for longer than the replicas' record backlog lasts
  (``recorder_capacity``, small here so it fills in seconds): the oldest records are dropped.
  This one loses records by design (a bounded backlog); the aim is that every loss is counted.

Per fault: clients send greedy chat completions (``max_tokens`` small) in a closed loop; the fault
is injected once at least ``lead`` requests succeeded; held (``hold``) and healed; traffic goes on
until the system is back at full strength (``healthy``) and a few more requests succeeded; then
traffic stops and the bench waits until every record is pushed and acked. Then it counts:

- requests sent / succeeded / failed, the failures' client-visible errors (deduplicated), whether
  each failed request was in flight at the fault, and whether its error was *clean* (an HTTP
  status with an OpenAI-shaped JSON error, or an in-band SSE error event) or not (a cut stream,
  a reset connection, a non-JSON body);
- records: every successful response names its training record (the response id is the record's
  request id), so *produced* = succeeded requests, *stored* = those found in the Redis stream,
  *acked* = delivered to the trainers' group and acknowledged, *lost* = produced but not stored,
  *dropped* = what the live replicas' recorders counted as dropped; the trainer's counters
  (summed over its incarnations) give *trained*;
- drafts served per version (the responses' ``osd.draft_version``);
- time to recover: fault -> the first successful request sent after it, and fault -> full strength.

Aims (issue 17): 0 records lost (full_spool: none lost silently); failed requests only those in
flight on a killed replica, each with a clean error; serving recovers within 30 s.

The core (:class:`Traffic`, :func:`run_fault`, the tallies) talks to a :class:`System`; the command
drives :class:`RaySystem` (the osd Serve app on a local Ray, bench/serve.py's deployment), the
tests a ServingCore under uvicorn.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import httpx
import redis

from bench.report import environment, table, update_doc_section, write_json
from osd.data.buffer import BufferConfig
from osd.data.codec import RecordDecodeError, decode_record
from osd.data.redis_server import EmbeddedRedis

FAULTS = ("replica", "trainer", "redis", "corrupt_draft", "full_spool")
RECOVER_AIM_S = 30.0
AIMS = ("no_records_lost", "failures_only_in_flight", "failures_clean", "recovered_within_30s")
CLUSTER = "global"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- traffic


@dataclass
class Sent:
    """One request as its client saw it; times in seconds on the Traffic's clock."""

    index: int
    client: int
    stream: bool
    start_s: float
    end_s: float
    ok: bool
    status: int | None = None
    request_id: str | None = None  # the response id's hex part: the training record's request_id
    draft_version: int | None = None
    chunks: int = 0  # SSE data chunks received (streams): > 0 on a failed stream = it failed mid-stream
    error: str | None = None
    clean: bool | None = None  # failed with an HTTP status + OpenAI-shaped error, or an in-band SSE error


def _record_id(response_id: str | None) -> str | None:
    return response_id.split("-", 1)[1] if response_id and "-" in response_id else response_id


def _http_error(resp: httpx.Response) -> tuple[str, bool]:
    """(message, clean): clean when the body is OpenAI's {"error": {"message": ...}}."""
    try:
        message = resp.json()["error"]["message"]
        return f"HTTP {resp.status_code}: {message}", True
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code} (not a JSON error): {resp.text[:160]!r}", False


def send_one(http: httpx.Client, body: dict, stream: bool) -> dict:
    """POST one chat completion (streamed or not); the Sent fields it fills. Never raises."""
    if not stream:
        try:
            resp = http.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "clean": False}
        if resp.status_code != 200:
            message, clean = _http_error(resp)
            return {"ok": False, "status": resp.status_code, "error": message, "clean": clean}
        try:
            data = resp.json()
            return {"ok": True, "status": 200, "request_id": _record_id(data["id"]),
                    "draft_version": (data.get("osd") or {}).get("draft_version")}
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "status": 200, "error": f"unreadable response ({e!r})", "clean": False}
    out: dict = {"ok": False, "chunks": 0}
    try:
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
            out["status"] = resp.status_code
            if resp.status_code != 200:
                resp.read()
                out["error"], out["clean"] = _http_error(resp)
                return out
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    out["ok"] = out.get("error") is None
                    return out
                chunk = json.loads(payload)
                if "error" in chunk:  # in-band: the 200 was already sent
                    out["error"], out["clean"] = f"SSE error: {chunk['error'].get('message')}", True
                    continue
                out["chunks"] += 1
                out["request_id"] = _record_id(chunk.get("id"))
                if chunk.get("osd"):
                    out["draft_version"] = chunk["osd"].get("draft_version")
        out |= {"error": f"stream ended without [DONE] after {out['chunks']} chunks", "clean": False}
    except (httpx.HTTPError, ValueError) as e:
        out |= {"error": f"stream cut after {out['chunks']} chunks: {type(e).__name__}: {e}", "clean": False}
    return out


class Traffic:
    """Closed-loop clients: each sends its next request as soon as the previous one ended, until
    ``stop()``. Even-numbered clients stream (so a killed replica has streams in flight), odd ones
    do not. Question i goes to request i (mod the list)."""

    def __init__(self, url: str, questions: Sequence[dict], clients: int = 4, max_tokens: int = 16,
                 request_timeout_s: float = 120.0, think_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if clients < 1 or not questions:
            raise ValueError("need clients >= 1 and at least one question")
        self.url, self.questions, self.clients = url.rstrip("/"), list(questions), clients
        self.think_s = think_s  # pause between a client's requests (0: back to back)
        self.max_tokens, self.request_timeout_s, self.clock = max_tokens, request_timeout_s, clock
        self.results: list[Sent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._issued = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> Traffic:
        self._threads = [threading.Thread(target=self._client, args=(c,), name=f"faults-client-{c}", daemon=True)
                         for c in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """No new requests; wait (bounded) for those in flight."""
        self._stop.set()
        deadline = self.clock() + (timeout_s if timeout_s is not None else self.request_timeout_s + 5)
        for t in self._threads:
            t.join(max(0.0, deadline - self.clock()))

    def snapshot(self) -> list[Sent]:
        with self._lock:
            return list(self.results)

    def ok_since(self, t: float) -> int:
        """Successful requests sent at or after ``t``."""
        return sum(1 for r in self.snapshot() if r.ok and r.start_s >= t)

    def _client(self, client: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.request_timeout_s) as http:
            while not self._stop.is_set():
                with self._lock:
                    index, self._issued = self._issued, self._issued + 1
                q = self.questions[index % len(self.questions)]
                body = {"messages": [{"role": "user", "content": q["turns"][0]}], "max_tokens": self.max_tokens,
                        "temperature": 0}
                start = self.clock()
                fields = send_one(http, body, stream=client % 2 == 0)
                with self._lock:
                    self.results.append(Sent(index, client, client % 2 == 0, start, self.clock(), **fields))
                self._stop.wait(self.think_s if fields["ok"] else max(self.think_s, 0.2))  # no hot loop on errors


# --------------------------------------------------------------------------- the system under test


class System(Protocol):
    """What the faults and the counting need from a deployment."""

    url: str
    redis: EmbeddedRedis  # the buffer's server, which this process may kill and restart
    buffer_config: BufferConfig  # stream keys and the trainers' group
    has_trainer: bool  # records must also be acked before a fault counts as settled

    def replicas(self) -> list[dict]: ...  # one status per live replica (OsdServer.status's shape)

    def trainer(self) -> dict | None: ...  # the trainer's status, None if none (or unreachable now)

    def kill_replica(self, status: dict) -> int: ...  # SIGKILL; returns the pid

    def kill_trainer(self) -> int: ...  # SIGKILL; returns the pid

    def registry(self): ...  # the draft registry replicas read, or None


def _sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _ray_actor_pid(actor_name: str) -> int | None:
    # The public ray.util.state API asks the dashboard, which the bench's Ray does not run; the
    # GCS actor table (what it reads) carries the pid too.
    from ray._private import state

    for info in state.actors().values():
        if info["Name"] == actor_name and info["State"] == "ALIVE":
            return int(info["Pid"])
    return None


class RaySystem:
    """The osd Serve app deployed by bench/serve.py's ``deployed_endpoint`` on a local Ray."""

    def __init__(self, url: str, app_name: str, redis_server: EmbeddedRedis, config, timeout_s: float = 10.0) -> None:
        from ray import serve

        from actors.serve_app import SERVER_DEPLOYMENT, TRAINER_DEPLOYMENT

        self.url, self.redis, self.config, self.timeout_s = url, redis_server, config, timeout_s
        self.buffer_config = config.buffer_config()
        self.server = serve.get_deployment_handle(SERVER_DEPLOYMENT, app_name)
        self.has_trainer = config.trainer.enabled
        self.supervisor = serve.get_deployment_handle(TRAINER_DEPLOYMENT, app_name) if self.has_trainer else None
        self._registry = None

    def replicas(self) -> list[dict]:
        try:
            results = self.server.broadcast("status").results(timeout_s=self.timeout_s, return_exceptions=True)
        except Exception:  # noqa: BLE001 - no replica reachable now (all restarting)
            return []
        return [r for r in results if isinstance(r, dict)]

    def trainer(self) -> dict | None:
        if self.supervisor is None:
            return None
        try:
            return self.supervisor.status.remote().result(timeout_s=self.timeout_s)
        except Exception:  # noqa: BLE001 - restarting: Ray queues the call; we do not wait for it here
            return None

    def kill_replica(self, status: dict) -> int:
        pid = _ray_actor_pid(status["actor_name"])
        if pid is None:
            raise RuntimeError(f"no live Ray actor named {status['actor_name']!r}")
        _sigkill(pid)
        return pid

    def kill_trainer(self) -> int:
        status = self.trainer()
        if status is None:
            raise RuntimeError("the trainer did not answer; cannot find its pid")
        _sigkill(int(status["pid"]))
        return int(status["pid"])

    def registry(self):
        if self._registry is None:
            from osd.registry import DraftRegistry

            self._registry = DraftRegistry.from_config(self.config.registry_config())
        return self._registry


def total(replicas: Sequence[dict], key: str) -> int:
    return sum(int(r["recorder"][key]) for r in replicas)


# --------------------------------------------------------------------------- faults


class Fault:
    """One fault: ``inject`` at the fault time; ``held`` says the fault has done its work (polled from
    ``min_hold_s`` to ``max_hold_s``); ``heal`` undoes it (None: the system heals itself); ``healthy``
    says the system is at full strength again. ``details`` carries what inject/heal learnt."""

    name = "fault"
    text = ""
    heals = False

    def inject(self, system: System) -> dict:
        raise NotImplementedError

    def held(self, system: System, details: dict) -> bool:
        return True

    def heal(self, system: System, details: dict) -> None:
        pass

    def healthy(self, system: System, details: dict) -> bool:
        return True


class KillReplica(Fault):
    name, text = "replica", "SIGKILL of a generating Serve replica"

    def inject(self, system: System) -> dict:
        replicas = system.replicas()
        if not replicas:
            raise RuntimeError("no replica answered")
        victim = max(replicas, key=lambda r: (r.get("running", 0) + r.get("waiting", 0)))
        pid = system.kill_replica(victim)
        return {"victim": victim["replica"], "pid": pid, "replicas": len(replicas),
                "victim_load": {"running": victim.get("running"), "waiting": victim.get("waiting")}}

    def healthy(self, system: System, details: dict) -> bool:
        replicas = system.replicas()
        return (len(replicas) >= details["replicas"] and details["victim"] not in {r["replica"] for r in replicas})


class KillTrainer(Fault):
    name, text = "trainer", "SIGKILL of the trainer actor"

    def inject(self, system: System) -> dict:
        return {"pid": system.kill_trainer()}

    def healthy(self, system: System, details: dict) -> bool:
        status = system.trainer()
        return bool(status and status["pid"] != details["pid"] and status.get("running", True))


class KillRedis(Fault):
    """SIGKILL of redis-server; restarted after the hold (same port, same AOF)."""

    name, text, heals = "redis", "SIGKILL of Redis, restarted", True

    def inject(self, system: System) -> dict:
        pid = system.redis.pid
        system.redis.stop(graceful=False)
        return {"pid": pid}

    def heal(self, system: System, details: dict) -> None:
        system.redis.start()

    def healthy(self, system: System, details: dict) -> bool:
        replicas = system.replicas()
        return bool(replicas) and all(r["recorder"]["buffer_available"] and not r["recorder"]["queued"]
                                      for r in replicas)


class FullSpool(KillRedis):
    """Redis down until the replicas' bounded backlogs overflow (their dropped counters rise)."""

    name, text = "full_spool", "Redis down until the record backlog overflows"

    def inject(self, system: System) -> dict:
        dropped = total(system.replicas(), "dropped")
        return super().inject(system) | {"dropped_before": dropped}

    def held(self, system: System, details: dict) -> bool:
        return total(system.replicas(), "dropped") > details["dropped_before"]


def _damage(store, cluster: str, version: int) -> None:
    """Flip bytes in the middle of a stored version's weights (Redis or file store)."""
    def flip(raw: bytes) -> bytes:
        data = bytearray(raw)
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 64)):
            data[i] ^= 0xFF
        return bytes(data)

    if hasattr(store, "client"):  # RedisStore
        key = store.key(cluster, f"v{version}", "weights")
        store.client.set(key, flip(store.client.get(key)))
    else:  # FileStore
        path = store.weights_path(cluster, version)
        path.write_bytes(flip(path.read_bytes()))


class CorruptDraft(Fault):
    """A damaged version made live. Replicas must refuse it and keep serving theirs; the trainer, which
    cannot load it either, rejects it (marked bad, the live pointer back on the version it replaced:
    trainers/loop.py). Held until it is marked bad (or ``max_hold_s``); then, if nothing has rejected it,
    the bench does, as an operator would."""

    name, text, heals = "corrupt_draft", "a corrupt draft published live", True

    def inject(self, system: System) -> dict:
        import torch

        registry = system.registry()
        live = registry.live(CLUSTER)
        served = sorted({r["drafts"].get(CLUSTER) for r in system.replicas()} - {None})
        if live is not None:  # the live bytes, damaged after a correct publish: a bad disk or a bad copy
            _, state = registry.get(CLUSTER, live.version)
            manifest = registry.publish(CLUSTER, state, parent=live.version, make_live=False,
                                        meta={"origin": "osd bench faults: damaged bytes"})
            _damage(registry.store, CLUSTER, manifest.version)
            registry.store.set_live(CLUSTER, manifest.version)  # what a buggy publisher would do
            kind = "damaged bytes (sha256 mismatch)"
        else:  # nothing stored to copy: a draft built for another model
            manifest = registry.publish(CLUSTER, {"model.embed_tokens.weight": torch.zeros(3, 5)},
                                        meta={"origin": "osd bench faults: wrong shapes"})
            kind = "tensors that do not fit the draft"
        return {"version": manifest.version, "previous": live.version if live else 0, "served_before": served,
                "kind": kind, "refusals": []}

    def held(self, system: System, details: dict) -> bool:
        """Note the replicas' refusals (sync errors naming the version); done once it is marked bad."""
        errors = {e for r in system.replicas() for e in r.get("sync_errors", {}).values()
                  if f"v{details['version']}" in e}
        details["refusals"] = sorted(errors | set(details["refusals"]))
        return details["version"] in system.registry().bad_versions(CLUSTER)

    def heal(self, system: System, details: dict) -> None:
        registry = system.registry()
        if (reason := registry.bad_versions(CLUSTER).get(details["version"])) is not None:
            details["rejected_by"] = reason  # the system healed itself
        else:
            details["rejected_by"] = "the bench (as an operator): nothing else rejected it"
            try:
                registry.reject(CLUSTER, details["version"], "osd bench faults: corrupt draft",
                                to_version=details["previous"] or None)
            except Exception as e:  # noqa: BLE001 - v0 is not stored: mark it bad; the next promotion replaces it
                registry.mark_bad(CLUSTER, details["version"], "osd bench faults: corrupt draft")
                details["heal_note"] = f"{type(e).__name__}: {e}"
        details["live_after"] = m.version if (m := registry.live(CLUSTER)) else 0

    def healthy(self, system: System, details: dict) -> bool:
        replicas = system.replicas()
        return bool(replicas) and all(not r.get("sync_errors") and r["drafts"].get(CLUSTER) != details["version"]
                                      for r in replicas)


FAULT_CLASSES: dict[str, type[Fault]] = {f.name: f for f in (KillReplica, KillTrainer, KillRedis, CorruptDraft,
                                                               FullSpool)}


# --------------------------------------------------------------------------- counting


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def record_states(redis_url: str, config: BufferConfig) -> dict[str, str]:
    """request_id -> "acked" | "pending" | "undelivered" for every record in the buffer's streams
    (all clusters), read straight from Redis: XRANGE, the group's last-delivered id and XPENDING."""
    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    states: dict[str, str] = {}
    try:
        for key in client.scan_iter(match=config.stream_prefix + "*", _type="stream"):
            group = next((g for g in client.xinfo_groups(key) if g["name"] == config.group.encode()), None)
            last = _stream_id(group["last-delivered-id"].decode()) if group else (0, 0)
            pending = ({p["message_id"].decode() for p in client.xpending_range(key, config.group, "-", "+", 1_000_000)}
                       if group else set())
            after = "-"
            while entries := client.xrange(key, after, "+", count=256):
                for raw_id, fields in entries:
                    entry_id = raw_id.decode()
                    try:
                        request_id = decode_record(fields[b"rec"]).request_id
                    except (RecordDecodeError, KeyError):
                        continue
                    states[request_id] = ("pending" if entry_id in pending else
                                          "acked" if _stream_id(entry_id) <= last else "undelivered")
                after = "(" + entries[-1][0].decode()
    finally:
        client.close()
    return states


def _normalise(error: str) -> str:
    """One line per kind of error: ids, numbers and addresses blanked."""
    error = re.sub(r"[0-9a-f]{12,}", "…", error)
    error = re.sub(r"\d+(\.\d+)?", "N", error)
    return error[:200]


def tally_requests(results: Sequence[Sent], t_fault: float | None) -> dict:
    """Requests sent / ok / failed, the failures' errors (deduplicated), which failures were in flight at
    the fault, versions served, and the time from the fault to the first ok request sent after it."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    in_flight = [r for r in failed if t_fault is not None and r.start_s <= t_fault <= r.end_s]
    after = [r.end_s - t_fault for r in ok if t_fault is not None and r.start_s >= t_fault]
    latencies = sorted(r.end_s - r.start_s for r in ok)
    return {
        "sent": len(results), "ok": len(ok), "failed": len(failed),
        "failed_in_flight": len(in_flight), "failed_after_fault": len(failed) - len(in_flight),
        "failed_unclean": sum(1 for r in failed if not r.clean),
        "failed_streams_mid_stream": sum(1 for r in failed if r.stream and r.chunks > 0),
        "errors": dict(Counter(_normalise(r.error or "?") for r in failed).most_common()),
        "versions": {str(v): n for v, n in sorted(Counter(r.draft_version for r in ok).items(),
                                                  key=lambda kv: (kv[0] is None, kv[0] or 0))},
        "first_ok_after_s": min(after) if after else None,
        "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
    }


def tally_records(results: Sequence[Sent], states: dict[str, str]) -> dict:
    """Produced (= ok responses: each names its record) / stored / acked / lost; records of failed
    requests that still reached the buffer count as ``stored_from_failed``."""
    produced = [r.request_id for r in results if r.ok and r.request_id]
    stored = [rid for rid in produced if rid in states]
    failed_ids = {r.request_id for r in results if not r.ok and r.request_id}
    return {"produced": len(produced), "stored": len(stored),
            "acked": sum(1 for rid in produced if states.get(rid) == "acked"),
            "pending": sum(1 for rid in produced if states.get(rid) == "pending"),
            "undelivered": sum(1 for rid in produced if states.get(rid) == "undelivered"),
            "lost": len(produced) - len(stored), "lost_ids": sorted(set(produced) - set(states))[:20],
            "stored_from_failed": len(failed_ids & states.keys())}


TRAINER_KEYS = ("records_read", "records_trained", "records_recovered", "records_reclaimed", "acked", "updates",
                "promotions", "rejections", "errors")


class TrainerTally:
    """The trainer's counters summed over its incarnations: each pid's counters start at 0 (a restart
    begins afresh), except the first one seen, which starts at its baseline."""

    def __init__(self) -> None:
        self.first: dict[int, dict] = {}
        self.last: dict[int, dict] = {}
        self.baseline_pid: int | None = None

    def sample(self, status: dict | None) -> None:
        if not status or "pid" not in status:
            return
        pid = int(status["pid"])
        if self.baseline_pid is None:
            self.baseline_pid = pid
        self.first.setdefault(pid, status if pid == self.baseline_pid else {})
        self.last[pid] = status

    def delta(self) -> dict | None:
        if not self.last:
            return None
        out = {k: sum(int(self.last[p].get(k, 0)) - int(self.first[p].get(k, 0)) for p in self.last)
               for k in TRAINER_KEYS}
        latest = self.last[list(self.last)[-1]]
        return out | {"incarnations": len(self.last), "live_version": latest.get("live_version"),
                      "last_error": latest.get("last_error")}


def buffer_settled(system: System) -> bool:
    """Every record pushed (no replica holds one) and, with a trainer, every one delivered and acked."""
    replicas = system.replicas()
    if not replicas or any(r["recorder"]["queued"] for r in replicas):
        return False
    if not system.has_trainer:
        return True
    cfg = system.buffer_config
    client = redis.Redis.from_url(system.redis.url, socket_timeout=5)
    try:
        for key in client.scan_iter(match=cfg.stream_prefix + "*", _type="stream"):
            group = next((g for g in client.xinfo_groups(key) if g["name"] == cfg.group.encode()), None)
            if group is None or group["pending"]:
                return False
            newest = client.xrevrange(key, "+", "-", count=1)
            if newest and newest[0][0] != group["last-delivered-id"]:
                return False
    finally:
        client.close()
    return True


# --------------------------------------------------------------------------- one fault, end to end


@dataclass
class Timing:
    lead_requests: int = 2  # ok requests before the fault
    lead_timeout_s: float = 60.0
    min_hold_s: float = 3.0  # a fault with heal() lasts at least this long ...
    max_hold_s: float = 60.0  # ... and at most this long
    recover_timeout_s: float = 120.0  # full strength within this, or it is reported as not recovered
    tail_requests: int = 2  # ok requests sent after full strength before traffic stops
    tail_timeout_s: float = 60.0
    settle_timeout_s: float = 120.0
    poll_s: float = 0.5


def _wait(predicate: Callable[[], bool], timeout_s: float, poll_s: float, on_poll: Callable[[], None] | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if on_poll is not None:
            on_poll()
        try:
            if predicate():
                return True
        except Exception as e:  # noqa: BLE001 - a status call failing mid-fault is no answer yet
            log.debug("poll failed: %s", e)
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def run_fault(system: System, fault: Fault, traffic: Traffic, timing: Timing,
              say: Callable[[str], None] = print) -> dict:
    """Traffic, the fault, its heal, recovery, settling, counting: one result row (see the module docstring)."""
    clock = traffic.clock
    trainer = TrainerTally()

    def sample() -> None:
        trainer.sample(system.trainer())

    sample()
    before = {r["replica"]: r["recorder"] for r in system.replicas()}
    t_start = clock()
    traffic.start()
    details: dict = {}
    t_fault = t_heal = healthy_at = None
    try:
        if not _wait(lambda: traffic.ok_since(t_start) >= timing.lead_requests, timing.lead_timeout_s, timing.poll_s):
            raise RuntimeError(f"no {timing.lead_requests} ok requests within {timing.lead_timeout_s:.0f}s before "
                               f"the fault: {tally_requests(traffic.snapshot(), None)['errors']}")
        sample()
        t_fault = clock()
        details = fault.inject(system)
        say(f"[{fault.name}] injected at +{t_fault - t_start:.1f}s: {details}")
        if fault.heals:
            time.sleep(timing.min_hold_s)
            held = _wait(lambda: fault.held(system, details), max(0.0, timing.max_hold_s - timing.min_hold_s),
                         timing.poll_s)
            details["held"] = held
            t_heal = clock()
            fault.heal(system, details)
            say(f"[{fault.name}] healed after {t_heal - t_fault:.1f}s (fault took effect: {held})")
        if _wait(lambda: fault.healthy(system, details), timing.recover_timeout_s, timing.poll_s, sample):
            healthy_at = clock()
            say(f"[{fault.name}] full strength {healthy_at - t_fault:.1f}s after the fault")
        else:
            say(f"[{fault.name}] not at full strength {timing.recover_timeout_s:.0f}s after the fault")
        since = healthy_at if healthy_at is not None else clock()
        _wait(lambda: traffic.ok_since(since) >= timing.tail_requests, timing.tail_timeout_s, timing.poll_s, sample)
    except Exception as e:  # noqa: BLE001 - reported in the row; the next fault still runs
        details["error"] = f"{type(e).__name__}: {e}"
        say(f"[{fault.name}] failed: {details['error']}")
    finally:
        traffic.stop()
        if t_heal is None and fault.heals and t_fault is not None:  # never leave Redis down or a bad draft live
            try:
                fault.heal(system, details)
            except Exception as e:  # noqa: BLE001
                details["heal_error"] = f"{type(e).__name__}: {e}"
    t_stop = clock()
    settled = _wait(lambda: buffer_settled(system), timing.settle_timeout_s, 1.0, sample)
    sample()
    results = traffic.snapshot()
    after = {r["replica"]: r["recorder"] for r in system.replicas()}
    recorder = {k: sum(int(v[k]) - int(before.get(rid, {}).get(k, 0)) for rid, v in after.items())
                for k in ("submitted", "pushed", "dropped", "push_failures")}
    return {
        "fault": fault.name, "what": fault.text, "details": details,
        "requests": tally_requests(results, t_fault),
        "records": tally_records(results, record_states(system.redis.url, system.buffer_config)),
        "recorder": recorder, "trainer": trainer.delta(),
        "fault_at_s": None if t_fault is None else t_fault - t_start,
        "healed_after_s": None if t_heal is None or t_fault is None else t_heal - t_fault,
        "full_strength_after_s": None if healthy_at is None or t_fault is None else healthy_at - t_fault,
        "traffic_s": t_stop - t_start, "settled": settled, "settle_s": clock() - t_stop,
        "sent": [asdict(r) for r in results],
    }


def aims(row: dict) -> dict:
    """Which of the issue's aims a fault row meets."""
    req, rec = row["requests"], row["records"]
    if row["fault"] == "full_spool":  # a bounded backlog drops by design: every loss must be counted
        no_loss = rec["lost"] <= row["recorder"]["dropped"]
    else:
        no_loss = rec["lost"] == 0
    killed_replica = row["fault"] == "replica"
    first = req["first_ok_after_s"]
    return {"no_records_lost": no_loss and row["settled"],
            "failures_only_in_flight": req["failed_after_fault"] == 0 and (killed_replica or req["failed"] == 0),
            "failures_clean": req["failed_unclean"] == 0,
            "recovered_within_30s": first is not None and first <= RECOVER_AIM_S and "error" not in row["details"]}


# --------------------------------------------------------------------------- report


def _fmt_s(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def render_markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    rows, errors = [], []
    for row in result["faults"]:
        req, rec, a, t = row["requests"], row["records"], row["aims"], row["trainer"] or {}
        versions = ", ".join(f"v{v}: {n}" for v, n in req["versions"].items()) or "–"
        rows.append([row["fault"], req["sent"], req["ok"], f"{req['failed']} ({req['failed_in_flight']} in flight)",
                     rec["produced"], rec["stored"], rec["acked"], t.get("records_trained", "–"), rec["lost"],
                     row["recorder"]["dropped"], versions, _fmt_s(req["latency_p50_s"]),
                     _fmt_s(req["first_ok_after_s"]), _fmt_s(row["full_strength_after_s"]),
                     " ".join("✓" if a[k] else "✗" for k in AIMS)])
        for message, n in req["errors"].items():
            errors.append(f"- `{row['fault']}` ×{n}: {message}")
        if "error" in row["details"]:
            errors.append(f"- `{row['fault']}`: the bench itself failed: {row['details']['error']}")
    lines = [
        f"## Faults with nothing lost (`osd bench faults`, {env['date']})",
        "",
        (f"Steady traffic ({cfg['clients']} closed-loop clients, half of them streaming, greedy chat completions of "
         f"max_tokens={cfg['max_tokens']}) through the osd Serve app on a local Ray ({cfg['replicas']} replicas, "
         f"{cfg['replica_threads']} torch thread each, the trainer training under load, update every "
         f"{cfg['update_interval']} records; target `{cfg['target']}`; an embedded Redis with AOF), one fault at a "
         f"time. Replicas' record backlog (`recorder_capacity`) is {cfg['recorder_capacity']} so that `full_spool` "
         f"fills it in seconds; Redis stays down {cfg['hold_s']:.0f} s in `redis`. Produced = successful responses "
         "(each names its training record); stored = found in the Redis stream; acked = acknowledged by the "
         "trainers' group; trained = the trainer's counter over its incarnations (a record re-read after a trainer "
         "restart counts again); lost = produced, not stored; dropped = counted by the replicas' recorders. "
         "Recovery: fault → the first successful request sent after it, and fault → full strength (replica "
         "replaced, trainer back, recorders drained, replicas off the corrupt version); p50 latency of the "
         "window's successful requests for scale. Aims ✓/✗: 0 records lost (full_spool: none lost uncounted) · "
         "failures only in flight on a killed replica · each failure with a clean error (an HTTP status with an "
         f"OpenAI-shaped JSON error, or an in-band SSE error event) · serving back within {RECOVER_AIM_S:.0f} s. torch {env['torch']} on {env['cpu_count']} cores; "
         f"{result['total_s'] / 60:.1f} min in all."),
        "",
        table(["fault", "sent", "ok", "failed", "produced", "stored", "acked", "trained", "lost", "dropped",
               "drafts served", "p50 latency (s)", "first ok after (s)", "full strength after (s)", "aims"], rows),
    ]
    if errors:
        lines += ["", "Client-visible errors (deduplicated; N = a number):", "", *errors]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def add_bench_faults_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "bench faults (uses --questions, --max-tokens (16), the model args, --replica-threads, --trainer-threads, "
        "--update-interval, --steps-per-update, --request-timeout, --deploy-timeout)")
    g.add_argument("--faults", default=",".join(FAULTS), help=f"subset of {','.join(FAULTS)}, run in that order")
    g.add_argument("--fault-clients", type=int, default=4, help="closed-loop clients (even ones stream)")
    g.add_argument("--fault-replicas", type=int, default=2, help="serving replicas (0.5 CPU each)")
    g.add_argument("--fault-capacity", type=int, default=6,
                   help="recorder_capacity per replica (small, so full_spool overflows it in seconds)")
    g.add_argument("--fault-hold", type=float, default=5.0, help="seconds Redis stays down in the 'redis' fault")
    g.add_argument("--fault-recover-timeout", type=float, default=180.0,
                   help="bound on waiting for full strength after a fault")
    g.add_argument("--fault-settle-timeout", type=float, default=120.0,
                   help="bound on waiting for every record to be pushed and acked after a fault")


def fault_app_config(args: argparse.Namespace, redis_url: str, spool_dir: str):
    from actors.config import OsdAppConfig, TrainerSettings
    from cli.models import model_configs
    from trainers.config import DistillConfig

    models, _ = model_configs(args, torch_threads=0)
    distill = {"update_interval": args.update_interval, "steps_per_update": args.steps_per_update or 1}
    return OsdAppConfig(
        model_name="osd", models=models, redis_url=redis_url,  # the service's default engine config
        distill=DistillConfig(**distill),
        num_replicas=args.fault_replicas, replica_num_cpus=0.5, replica_torch_threads=args.replica_threads,
        max_ongoing_requests=8, spool_dir=spool_dir, recorder_capacity=args.fault_capacity,
        trainer=TrainerSettings(num_cpus=0.5, torch_threads=args.trainer_threads, pause_when_busy=False,
                                poll_interval_s=0.2, flush_idle_s=2.0, reclaim_interval_s=5.0),
    )


def run_faults_bench(args: argparse.Namespace) -> dict:
    import tempfile

    from bench.serve import APP_NAME, deployed_endpoint
    from osd.data.workloads import load_questions, spread_across_categories

    logging.getLogger("httpx").setLevel(logging.WARNING)
    names = [f for f in args.faults.split(",") if f]
    if unknown := set(names) - set(FAULTS):
        raise ValueError(f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    if args.redis_url:
        raise ValueError("osd bench faults kills and restarts its own embedded Redis; drop --redis-url")
    questions = spread_across_categories(load_questions(args.data), args.questions)

    def say(text: str) -> None:
        print(text, flush=True)

    timing = Timing(min_hold_s=args.fault_hold, recover_timeout_s=args.fault_recover_timeout,
                    settle_timeout_s=args.fault_settle_timeout)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="osd-faults-") as tmp, EmbeddedRedis() as server:
        config = fault_app_config(args, server.url, f"{tmp}/spool")
        own = argparse.Namespace(**{**vars(args), "redis_url": server.url})  # so deployed_endpoint starts no other
        with deployed_endpoint(own, args.fault_clients, say, config_builder=lambda *_: config) as (url, control, info):
            if control is not None:
                control.set_mode("training")  # deployed_endpoint leaves it paused
            system = RaySystem(url, APP_NAME, server, config)
            for name in names:
                fault = FAULT_CLASSES[name]()
                hold = timing if name != "full_spool" else Timing(**{**asdict(timing), "min_hold_s": 1.0})
                say(f"--- {name}: {fault.text}")
                row = run_fault(system, fault, Traffic(url, questions, args.fault_clients, args.max_tokens,
                                                       args.request_timeout), hold, say)
                row["aims"] = aims(row)
                say(f"[{name}] requests {row['requests']['ok']}/{row['requests']['sent']} ok; records "
                    f"{row['records']} ; recorder {row['recorder']}; trainer {row['trainer']}; aims {row['aims']}")
                rows.append(row)
    result = {"benchmark": "faults", "environment": environment(),
              "config": {"faults": names, "clients": args.fault_clients, "replicas": args.fault_replicas,
                         "max_tokens": args.max_tokens, "questions": len(questions), "target": args.target,
                         "draft": args.draft, "replica_threads": args.replica_threads,
                         "trainer_threads": args.trainer_threads, "update_interval": args.update_interval,
                         "recorder_capacity": args.fault_capacity, "hold_s": args.fault_hold,
                         "timing": asdict(timing)},
              "deployment": info, "total_s": time.perf_counter() - started, "faults": rows,
              "aims_met": {k: all(r["aims"][k] for r in rows) for k in rows[0]["aims"]} if rows else {}}
    path = write_json(args.out, "faults", result)
    markdown = render_markdown(result)
    print("\n" + markdown + f"\n\nresults: {path}\ntable:   {update_doc_section(args.doc, 'faults', markdown)}")
    return result


__all__ = ["FAULTS", "Fault", "RaySystem", "Sent", "System", "Timing", "Traffic", "TrainerTally", "aims",
           "buffer_settled", "record_states", "render_markdown", "run_fault", "run_faults_bench", "send_one",
           "tally_records", "tally_requests"]
