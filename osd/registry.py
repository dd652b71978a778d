"""The draft registry: versioned draft weights, one lineage per query cluster.

A draft version is a state dict serialized as safetensors bytes (never pickle) plus a
``DraftManifest`` that names its parent, the gate's estimate of its acceptance rate and
the sha256 of the bytes. Each cluster has a *live pointer*: the version serving replicas
should run. Publishing, promoting and rolling back only move that pointer; stored
versions are immutable and are removed only by pruning, which never touches the live one.

Version numbers grow monotonically per cluster from 1 and are never reused, even after
pruning. Version 0 conventionally means "the initial draft built from the target"; it is
not stored here (a replica rebuilds it from the target model).

A version can be *marked bad* (``mark_bad``, or ``reject`` when a replica found it serving
worse than its predecessor: osd/serving/swap_watch.py). A bad version is never made live
again: ``promote`` refuses it, a default rollback skips it, replicas refuse to load it. Marks
are kept beside the live pointer, not in the manifest, which stays immutable.

Two stores sit behind one small interface (``DraftStore``): ``FileStore`` (a directory,
for one machine or a shared filesystem) and ``RedisStore`` (for a Ray cluster, where
every node already reaches the buffer's Redis).

Readers never trust the bytes: ``get`` checks size and sha256 and parses the safetensors
header before returning anything, and ``load_validated`` also checks names, shapes and
dtypes against the replica's live model, so a replica can refuse a bad draft and keep
serving the one it has (DESIGN.md § Ray, "Swap drafts atomically").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator, Literal, Mapping, Protocol, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MANIFEST_SCHEMA_VERSION = 1

# Cluster names become path components and Redis key segments: keep them boring.
CLUSTER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

# A Redis string value cannot exceed 512 MiB.
_REDIS_MAX_VALUE = 512 * 1024 * 1024

TensorSpecs = dict[str, tuple[list[int], str]]  # name -> (shape, dtype name, e.g. "float32")


class RegistryError(Exception):
    """Base class for draft-registry errors."""


class DraftNotFoundError(RegistryError, LookupError):
    """The requested cluster/version is not in the registry."""


class CorruptDraftError(RegistryError):
    """Stored bytes do not match their manifest (checksum, size) or are not valid safetensors."""


class DraftMismatchError(RegistryError):
    """A draft's tensor names/shapes/dtypes differ from what the serving model expects."""


class RollbackError(RegistryError):
    """There is no version to roll back to."""


class BadDraftError(RegistryError):
    """The version was marked bad (``DraftRegistry.mark_bad``): it must not be served or made live."""


class DraftManifest(BaseModel):
    """What a stored draft version is, where it came from and how to check its bytes."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    cluster: str
    version: int = Field(ge=1, description="Per-cluster version, from 1, never reused.")
    parent: int | None = Field(None, ge=0, description="Version this draft was trained from; 0 = initial draft.")
    loss: float | None = Field(None, description="Training loss when the draft was published.")
    gate_alpha: float | None = Field(None, description="Estimated acceptance rate at the promotion gate.")
    created_at: float = Field(description="Unix time of publication.")
    sha256: str = Field(description="Hex sha256 of the safetensors bytes.")
    num_bytes: int = Field(ge=0, description="Length of the safetensors bytes.")
    tensors: TensorSpecs = Field(description="name -> (shape, dtype) of every tensor.")
    meta: dict[str, str | float | int] = Field(default_factory=dict, description="Free-form: draft construction, base model, ...")


class RegistryConfig(BaseModel):
    """Where draft versions live and how many to keep."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["file", "redis"] = Field("file", description="Storage backend: a directory or a Redis server.")
    path: Path | None = Field(None, description="Root directory for backend=file (<path>/<cluster>/v<N>.safetensors).")
    redis_url: str | None = Field(None, description="redis:// URL for backend=redis, e.g. EmbeddedRedis(...).url.")
    key_prefix: str = Field("osd:drafts", min_length=1, description="Prefix of every Redis key the registry writes.")
    max_versions_kept: int | None = Field(
        20, ge=1, description="Per cluster, keep the newest N versions plus the live one; None keeps all."
    )

    @model_validator(mode="after")
    def _backend_needs_location(self) -> RegistryConfig:
        if self.backend == "file" and self.path is None:
            raise ValueError("registry backend 'file' needs `path` (a directory for the draft versions)")
        if self.backend == "redis" and not self.redis_url:
            raise ValueError(
                "registry backend 'redis' needs `redis_url`; start osd.data.redis_server.EmbeddedRedis and pass its .url"
            )
        return self


# --------------------------------------------------------------------------- stores


class DraftStore(Protocol):
    """Raw storage for draft versions. Versions are written once; only the live pointer moves.

    ``put`` must make a version visible atomically: a reader sees the manifest only once
    the weights are fully written.
    """

    def next_version(self, cluster: str) -> int: ...  # reserve a fresh number; never reused
    def put(self, cluster: str, version: int, weights: bytes, manifest_json: str) -> None: ...
    def get_weights(self, cluster: str, version: int) -> bytes | None: ...
    def get_manifest(self, cluster: str, version: int) -> str | None: ...
    def delete(self, cluster: str, version: int) -> None: ...
    def versions(self, cluster: str) -> list[int]: ...  # ascending
    def clusters(self) -> list[str]: ...
    def get_live(self, cluster: str) -> int | None: ...
    def set_live(self, cluster: str, version: int) -> None: ...  # also records it as promoted
    def set_live_if(self, cluster: str, expected: int, version: int) -> bool: ...  # atomic: only if live == expected
    def promoted(self, cluster: str) -> list[int]: ...  # every version ever made live, ascending
    def mark_bad(self, cluster: str, version: int, note: str) -> None: ...  # the first note of a version stays
    def bad(self, cluster: str) -> dict[int, str]: ...  # version -> note


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + os.replace, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class FileStore:
    """``<root>/<cluster>/v<N>.safetensors`` + ``v<N>.json``, ``live.json`` and a version counter.

    The counter and the live pointer are read-modify-write, so they are updated under an
    ``flock`` on ``<cluster>/.lock``; that serialises threads and processes on one host
    (and on shared filesystems that honour flock).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, cluster: str) -> Path:
        d = self.root / cluster
        d.mkdir(exist_ok=True)
        return d

    def weights_path(self, cluster: str, version: int) -> Path:
        return self.root / cluster / f"v{version}.safetensors"

    def manifest_path(self, cluster: str, version: int) -> Path:
        return self.root / cluster / f"v{version}.json"

    @contextlib.contextmanager
    def _locked(self, cluster: str) -> Iterator[Path]:
        d = self._dir(cluster)
        # A fresh open() per call: flock locks belong to the open file description, so
        # two threads of one process exclude each other too.
        with open(d / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield d
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def next_version(self, cluster: str) -> int:
        with self._locked(cluster) as d:
            counter = d / "counter"
            last = int(counter.read_text()) if counter.exists() else 0
            _atomic_write(counter, str(last + 1).encode())
            return last + 1

    def put(self, cluster: str, version: int, weights: bytes, manifest_json: str) -> None:
        self._dir(cluster)
        # Weights first: the manifest's presence is what makes a version exist.
        _atomic_write(self.weights_path(cluster, version), weights)
        _atomic_write(self.manifest_path(cluster, version), manifest_json.encode())

    def get_weights(self, cluster: str, version: int) -> bytes | None:
        try:
            return self.weights_path(cluster, version).read_bytes()
        except FileNotFoundError:
            return None

    def get_manifest(self, cluster: str, version: int) -> str | None:
        try:
            return self.manifest_path(cluster, version).read_text()
        except FileNotFoundError:
            return None

    def delete(self, cluster: str, version: int) -> None:
        # Manifest first, so the version disappears before its weights do.
        for p in (self.manifest_path(cluster, version), self.weights_path(cluster, version)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def versions(self, cluster: str) -> list[int]:
        d = self.root / cluster
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"v(\d+)\.json", p.name)))

    def clusters(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and CLUSTER_RE.match(p.name) and self.versions(p.name)
        )

    def _read_live(self, cluster: str) -> dict:
        try:
            return json.loads((self.root / cluster / "live.json").read_text())
        except FileNotFoundError:
            return {"version": None, "promoted": []}

    def get_live(self, cluster: str) -> int | None:
        return self._read_live(cluster)["version"]

    def set_live(self, cluster: str, version: int) -> None:
        with self._locked(cluster) as d:
            live = self._read_live(cluster)
            promoted = sorted(set(live["promoted"]) | {version})
            _atomic_write(d / "live.json", json.dumps({"version": version, "promoted": promoted}).encode())

    def set_live_if(self, cluster: str, expected: int, version: int) -> bool:
        with self._locked(cluster) as d:
            live = self._read_live(cluster)
            if live["version"] != expected:
                return False
            promoted = sorted(set(live["promoted"]) | {version})
            _atomic_write(d / "live.json", json.dumps({"version": version, "promoted": promoted}).encode())
            return True

    def promoted(self, cluster: str) -> list[int]:
        return sorted(self._read_live(cluster)["promoted"])

    def mark_bad(self, cluster: str, version: int, note: str) -> None:
        with self._locked(cluster) as d:
            bad = {str(v): n for v, n in self.bad(cluster).items()}
            if str(version) not in bad:
                _atomic_write(d / "bad.json", json.dumps(bad | {str(version): note}).encode())

    def bad(self, cluster: str) -> dict[int, str]:
        try:
            return {int(v): n for v, n in json.loads((self.root / cluster / "bad.json").read_text()).items()}
        except FileNotFoundError:
            return {}


class RedisStore:
    """Keys under ``{prefix}:{cluster}:``: ``v{N}:weights``, ``v{N}:manifest``, ``live``,
    ``counter`` (INCR, so concurrent publishers never collide), ``versions`` (sorted set),
    ``promoted`` (set) and ``bad`` (hash: version -> note); ``{prefix}:clusters`` is the set
    of cluster names."""

    def __init__(self, url: str, prefix: str = "osd:drafts") -> None:
        import redis  # local import: the file backend must not need a Redis client

        self.prefix = prefix
        self.client = redis.Redis.from_url(url)

    def key(self, cluster: str, *parts: str) -> str:
        return ":".join((self.prefix, cluster, *parts))

    def next_version(self, cluster: str) -> int:
        return int(self.client.incr(self.key(cluster, "counter")))

    def put(self, cluster: str, version: int, weights: bytes, manifest_json: str) -> None:
        if len(weights) > _REDIS_MAX_VALUE:
            raise RegistryError(
                f"draft for cluster {cluster!r} is {len(weights) / 2**20:.0f} MiB; a Redis value holds at most "
                "512 MiB. Use backend='file' on a shared filesystem, or store the draft in a smaller dtype."
            )
        v = f"v{version}"
        # MULTI/EXEC: the manifest and the version index appear together with the weights.
        with self.client.pipeline(transaction=True) as p:
            p.set(self.key(cluster, v, "weights"), weights)
            p.set(self.key(cluster, v, "manifest"), manifest_json)
            p.zadd(self.key(cluster, "versions"), {str(version): version})
            p.sadd(f"{self.prefix}:clusters", cluster)
            p.execute()

    def get_weights(self, cluster: str, version: int) -> bytes | None:
        return self.client.get(self.key(cluster, f"v{version}", "weights"))

    def get_manifest(self, cluster: str, version: int) -> str | None:
        raw = self.client.get(self.key(cluster, f"v{version}", "manifest"))
        return None if raw is None else raw.decode()

    def delete(self, cluster: str, version: int) -> None:
        v = f"v{version}"
        with self.client.pipeline(transaction=True) as p:
            p.zrem(self.key(cluster, "versions"), str(version))
            p.delete(self.key(cluster, v, "manifest"), self.key(cluster, v, "weights"))
            p.execute()

    def versions(self, cluster: str) -> list[int]:
        return sorted(int(v) for v in self.client.zrange(self.key(cluster, "versions"), 0, -1))

    def clusters(self) -> list[str]:
        return sorted(c.decode() for c in self.client.smembers(f"{self.prefix}:clusters"))

    def get_live(self, cluster: str) -> int | None:
        raw = self.client.get(self.key(cluster, "live"))
        return None if raw is None else int(raw)

    def set_live(self, cluster: str, version: int) -> None:
        with self.client.pipeline(transaction=True) as p:
            p.set(self.key(cluster, "live"), version)
            p.sadd(self.key(cluster, "promoted"), version)
            p.execute()

    def set_live_if(self, cluster: str, expected: int, version: int) -> bool:
        import redis

        key = self.key(cluster, "live")
        with self.client.pipeline(transaction=True) as p:
            try:
                p.watch(key)  # EXEC fails if anyone writes the pointer between this read and it
                current = p.get(key)
                if current is None or int(current) != expected:
                    return False
                p.multi()
                p.set(key, version)
                p.sadd(self.key(cluster, "promoted"), version)
                p.execute()
                return True
            except redis.WatchError:  # it moved meanwhile: not ours to move any more
                return False

    def promoted(self, cluster: str) -> list[int]:
        return sorted(int(v) for v in self.client.smembers(self.key(cluster, "promoted")))

    def mark_bad(self, cluster: str, version: int, note: str) -> None:
        self.client.hsetnx(self.key(cluster, "bad"), str(version), note)

    def bad(self, cluster: str) -> dict[int, str]:
        return {int(v): n.decode() for v, n in self.client.hgetall(self.key(cluster, "bad")).items()}


# --------------------------------------------------------------------------- helpers


FLOAT_DTYPES = {"float64", "float32", "bfloat16", "float16"}


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_specs(state_dict: Mapping[str, torch.Tensor]) -> TensorSpecs:
    """name -> (shape, dtype name): what a replica passes to ``load_validated`` for its live draft."""
    return {k: (list(t.shape), _dtype_name(t.dtype)) for k, t in state_dict.items()}


def normalize_specs(specs: Mapping[str, tuple[Sequence[int], torch.dtype | str]]) -> TensorSpecs:
    return {k: ([int(s) for s in shape], _dtype_name(dtype)) for k, (shape, dtype) in specs.items()}


def spec_diff(got: TensorSpecs, want: TensorSpecs, limit: int = 5) -> list[str]:
    """Human-readable differences between two spec dicts (empty when they match)."""
    problems = []
    if missing := sorted(want.keys() - got.keys()):
        problems.append(f"missing {len(missing)} tensor(s): {missing[:limit]}")
    if extra := sorted(got.keys() - want.keys()):
        problems.append(f"unexpected {len(extra)} tensor(s): {extra[:limit]}")
    bad = [
        f"{k}: {got[k][0]} {got[k][1]} vs expected {want[k][0]} {want[k][1]}"
        for k in sorted(got.keys() & want.keys())
        if list(got[k][0]) != list(want[k][0]) or got[k][1] != want[k][1]
    ]
    if bad:
        problems.append(f"{len(bad)} shape/dtype mismatch(es): {bad[:limit]}")
    return problems


def _saveable(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage: what ``safetensors.torch.save`` accepts.

    Tied weights (embeddings == LM head) share storage and safetensors refuses them, so
    every tensor after the first on a storage is cloned; loading still fills both keys.
    """
    if not state_dict:
        raise ValueError("refusing to publish an empty state dict")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _check_cluster(cluster: str) -> str:
    if not CLUSTER_RE.match(cluster):
        raise ValueError(
            f"invalid cluster name {cluster!r}: use 1-128 characters from [A-Za-z0-9_.-], not starting with '.' or '-'"
        )
    return cluster


# --------------------------------------------------------------------------- registry


class DraftRegistry:
    """Publish, verify, promote and roll back draft versions, one lineage per cluster.

    Several processes may share one store (trainer publishing, replicas reading). Moving
    the live pointer is last-writer-wins: give each cluster one publisher (its trainer).
    """

    def __init__(self, store: DraftStore, max_versions_kept: int | None = None) -> None:
        if max_versions_kept is not None and max_versions_kept < 1:
            raise ValueError(f"max_versions_kept must be >= 1 or None, got {max_versions_kept}")
        self.store = store
        self.max_versions_kept = max_versions_kept

    @classmethod
    def from_config(cls, config: RegistryConfig) -> DraftRegistry:
        if config.backend == "file":
            store: DraftStore = FileStore(config.path)  # type: ignore[arg-type]  # validated non-None
        else:
            store = RedisStore(config.redis_url, config.key_prefix)  # type: ignore[arg-type]
        return cls(store, config.max_versions_kept)

    # ---- writing

    def publish(
        self,
        cluster: str,
        state_dict: Mapping[str, torch.Tensor],
        parent: int | None = None,
        loss: float | None = None,
        gate_alpha: float | None = None,
        meta: Mapping[str, str | float | int] | None = None,
        make_live: bool = True,
    ) -> DraftManifest:
        """Store a new version (and by default make it live); returns its manifest.

        With ``make_live`` the stored bytes are read back and verified before the live
        pointer moves, so the pointer never lands on bytes nobody has checked.
        """
        _check_cluster(cluster)
        tensors = _saveable(state_dict)
        weights = st_save(tensors)
        version = self.store.next_version(cluster)
        if parent is not None and parent >= version:
            raise ValueError(f"parent v{parent} must be older than the new version v{version} of cluster {cluster!r}")
        manifest = DraftManifest(
            cluster=cluster,
            version=version,
            parent=parent,
            loss=loss,
            gate_alpha=gate_alpha,
            created_at=time.time(),
            sha256=hashlib.sha256(weights).hexdigest(),
            num_bytes=len(weights),
            tensors=tensor_specs(tensors),
            meta=dict(meta or {}),
        )
        self.store.put(cluster, version, weights, manifest.model_dump_json())
        if make_live:
            self.promote(cluster, version)
        self.prune(cluster)
        return manifest

    def promote(self, cluster: str, version: int) -> DraftManifest:
        """Verify a stored version and make it live. Raises CorruptDraftError, or BadDraftError for a
        version marked bad, without moving the pointer."""
        self._refuse_bad(cluster, version)
        manifest, _ = self.get(cluster, version)
        self.store.set_live(cluster, version)
        return manifest

    def _refuse_bad(self, cluster: str, version: int) -> None:
        if (note := self.bad_versions(cluster).get(version)) is not None:
            raise BadDraftError(
                f"draft cluster {cluster!r} v{version} is marked bad ({note}); it is never made live again. "
                f"Roll back to another version (stored: {self.store.versions(cluster)}) or publish a new one."
            )

    def rollback(self, cluster: str, to_version: int | None = None) -> DraftManifest:
        """Move the live pointer back (nothing is deleted); returns the new live manifest.

        Default target: the live version's parent if it is still stored, else the newest
        stored version older than the live one that was ever live (so candidates the gate
        rejected are never picked); versions marked bad are skipped. The target is verified
        before the pointer moves; a bad ``to_version`` raises BadDraftError.
        """
        _check_cluster(cluster)
        if to_version is None:
            live = self.live(cluster)
            if live is None:
                raise RollbackError(f"cluster {cluster!r} has no live draft; publish one before rolling back")
            to_version = self._rollback_target(live)
        elif self.store.get_manifest(cluster, to_version) is None:
            raise RollbackError(
                f"cannot roll cluster {cluster!r} back to v{to_version}: not stored "
                f"(stored: {self.store.versions(cluster)})"
            )
        return self.promote(cluster, to_version)

    def _rollback_target(self, live: DraftManifest) -> int:
        stored = set(self.store.versions(live.cluster)) - set(self.bad_versions(live.cluster))
        if live.parent is not None and live.parent in stored:
            return live.parent
        earlier = [v for v in self.store.promoted(live.cluster) if v < live.version and v in stored]
        if earlier:
            return max(earlier)
        hint = (
            " Its parent is v0, the initial draft built from the target, which is not stored: rebuild it from the target."
            if live.parent == 0
            else ""
        )
        raise RollbackError(
            f"cluster {live.cluster!r} is at v{live.version} and has no earlier stored version that was live "
            f"(and is not marked bad) to roll back to (parent: {live.parent}).{hint} Pass to_version= to pick "
            f"one of {sorted(stored)} explicitly."
        )

    def mark_bad(self, cluster: str, version: int, reason: str) -> None:
        """Record that ``version`` must never be served or made live again. Idempotent: the first
        reason stays. It does not move the live pointer (``reject`` does)."""
        note = json.dumps({"reason": reason, "marked_at": time.time()})
        self.store.mark_bad(_check_cluster(cluster), version, note)

    def bad_versions(self, cluster: str) -> dict[int, str]:
        """version -> the reason it was marked bad."""
        out = {}
        for version, note in self.store.bad(_check_cluster(cluster)).items():
            try:
                out[version] = str(json.loads(note)["reason"])
            except (ValueError, KeyError, TypeError):  # a hand-written mark: its text is the reason
                out[version] = note
        return out

    def reject(self, cluster: str, version: int, reason: str, to_version: int | None = None) -> DraftManifest | None:
        """Mark ``version`` bad and, if it is still live, roll back to ``to_version`` (default: as
        ``rollback``). Returns the new live manifest when this call moved the pointer, None when
        ``version`` was no longer live (another replica, an admin or a newer promotion got there
        first): several replicas judging one version at once roll it back once.

        The target is resolved and verified before anything is written, so a refused reject
        (RollbackError: nothing stored to go back to; CorruptDraftError) leaves no mark; the
        pointer moves by compare-and-set, so it never overwrites a version promoted meanwhile.
        """
        live = self.live(cluster)
        if live is None or live.version != version:
            self.mark_bad(cluster, version, reason)
            return None
        if to_version is None:
            to_version = self._rollback_target(live)
        elif self.store.get_manifest(cluster, to_version) is None:
            raise RollbackError(
                f"cannot roll cluster {cluster!r} back from v{version} to v{to_version}: not stored"
                + (" (v0, the initial draft, never is)" if to_version == 0 else "")
            )
        self._refuse_bad(cluster, to_version)
        target, _ = self.get(cluster, to_version)
        self.mark_bad(cluster, version, reason)
        return target if self.store.set_live_if(cluster, version, to_version) else None

    def prune(self, cluster: str) -> list[int]:
        """Delete all but the newest ``max_versions_kept`` versions, always keeping the live one."""
        if self.max_versions_kept is None:
            return []
        versions = self.store.versions(cluster)
        keep = set(versions[-self.max_versions_kept :])
        live = self.store.get_live(cluster)
        if live is not None:
            keep.add(live)
        doomed = [v for v in versions if v not in keep]
        for v in doomed:
            self.store.delete(cluster, v)
        return doomed

    # ---- reading

    def clusters(self) -> list[str]:
        return self.store.clusters()

    def manifest(self, cluster: str, version: int) -> DraftManifest:
        raw = self.store.get_manifest(_check_cluster(cluster), version)
        if raw is None:
            raise DraftNotFoundError(
                f"cluster {cluster!r} has no stored v{version} (stored: {self.store.versions(cluster)})"
            )
        try:
            return DraftManifest.model_validate_json(raw)
        except ValueError as e:
            raise CorruptDraftError(f"manifest of cluster {cluster!r} v{version} is unreadable: {e}") from e

    def live(self, cluster: str) -> DraftManifest | None:
        """The live version's manifest, or None if the cluster has none (serve the initial draft, v0)."""
        version = self.store.get_live(_check_cluster(cluster))
        return None if version is None else self.manifest(cluster, version)

    def versions(self, cluster: str) -> list[DraftManifest]:
        """Manifests of every stored version, oldest first."""
        out = []
        for v in self.store.versions(_check_cluster(cluster)):
            with contextlib.suppress(DraftNotFoundError):  # pruned between listing and reading
                out.append(self.manifest(cluster, v))
        return out

    def get(self, cluster: str, version: int) -> tuple[DraftManifest, dict[str, torch.Tensor]]:
        """Manifest and state dict of a version, after checking size, sha256 and tensor specs."""
        manifest = self.manifest(cluster, version)
        where = f"draft cluster {cluster!r} v{version}"
        weights = self.store.get_weights(cluster, version)
        if weights is None:
            raise CorruptDraftError(f"{where} has a manifest but no weights; roll back or republish it")
        if len(weights) != manifest.num_bytes:
            raise CorruptDraftError(
                f"{where}: weights are {len(weights)} bytes, manifest says {manifest.num_bytes} (truncated?); "
                "refusing it - keep the live draft and republish"
            )
        digest = hashlib.sha256(weights).hexdigest()
        if digest != manifest.sha256:
            raise CorruptDraftError(
                f"{where}: sha256 {digest[:16]}... does not match manifest {manifest.sha256[:16]}...; "
                "refusing it - keep the live draft and republish"
            )
        try:
            state_dict = st_load(weights)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CorruptDraftError(f"{where}: weights are not readable safetensors ({e}); republish it") from e
        if problems := spec_diff(tensor_specs(state_dict), normalize_specs(manifest.tensors)):
            raise CorruptDraftError(f"{where}: tensors disagree with the manifest: {'; '.join(problems)}")
        return manifest, state_dict

    def load_validated(
        self,
        cluster: str,
        version: int,
        reference_shapes: Mapping[str, tuple[Sequence[int], torch.dtype | str]],
    ) -> dict[str, torch.Tensor]:
        """The state dict of a version, only if it fits the serving model exactly.

        ``reference_shapes`` is ``tensor_specs(live_model.state_dict())``. Float tensors
        published in another float dtype come back cast to the reference's. Raises
        DraftMismatchError (names/shapes differ, or a non-float dtype does) or CorruptDraftError;
        either way the caller should keep its live draft.
        """
        want = normalize_specs(reference_shapes)
        got = normalize_specs(self.manifest(cluster, version).tensors)
        # A float tensor published in another float dtype is cast, not refused: a trainer and replicas
        # that resolved dtype 'auto' differently (a bf16 GPU trainer, fp32 CPU replicas), or versions
        # published before a dtype change, still fit.
        cast = {k for k in got.keys() & want.keys() if got[k][0] == want[k][0] and got[k][1] != want[k][1]
                and got[k][1] in FLOAT_DTYPES and want[k][1] in FLOAT_DTYPES}
        got |= {k: want[k] for k in cast}
        # Check the manifest first: a mismatched draft is refused without reading its bytes.
        if problems := spec_diff(got, want):
            raise DraftMismatchError(
                f"draft cluster {cluster!r} v{version} does not fit the serving model: {'; '.join(problems)}. "
                "Keep the live draft; was it built for another target or draft construction?"
            )
        _, state_dict = self.get(cluster, version)
        return {k: v.to(getattr(torch, want[k][1])) if k in cast else v for k, v in state_dict.items()}
