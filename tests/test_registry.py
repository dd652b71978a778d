"""Draft registry: every behaviour runs against both stores (a directory and a real redis-server)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from osd.registry import (
    CorruptDraftError,
    DraftMismatchError,
    DraftNotFoundError,
    DraftRegistry,
    FileStore,
    RedisStore,
    RegistryConfig,
    RollbackError,
    tensor_specs,
)


def small_state_dict(seed: int = 0, shape: tuple[int, ...] = (4, 8)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(shape, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(shape, generator=g),
        "model.norm.weight": torch.randn(shape[-1], generator=g).to(torch.float16),
        "step": torch.tensor([seed], dtype=torch.int64),
    }


@dataclass
class Backend:
    name: str
    new: Callable[..., DraftRegistry]  # new(max_versions_kept=None): a fresh registry object on the same storage
    flip_byte: Callable[[str, int], None]  # corrupt the stored weights of (cluster, version) in place


@pytest.fixture(params=["file", "redis"])
def backend(request, tmp_path) -> Backend:
    if request.param == "file":
        root = tmp_path / "drafts"

        def new(max_versions_kept=None):
            return DraftRegistry.from_config(RegistryConfig(backend="file", path=root, max_versions_kept=max_versions_kept))

        def flip_byte(cluster, version):
            p = FileStore(root).weights_path(cluster, version)
            data = bytearray(p.read_bytes())
            data[-1] ^= 0xFF  # in the tensor data, so the header still parses: only the checksum can catch it
            p.write_bytes(bytes(data))

    else:
        url = request.getfixturevalue("redis_url")

        def new(max_versions_kept=None):
            return DraftRegistry.from_config(RegistryConfig(backend="redis", redis_url=url, max_versions_kept=max_versions_kept))

        def flip_byte(cluster, version):
            store = RedisStore(url)
            key = store.key(cluster, f"v{version}", "weights")
            data = bytearray(store.client.get(key))
            data[-1] ^= 0xFF
            store.client.set(key, bytes(data))

    return Backend(request.param, new, flip_byte)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


# --------------------------------------------------------------------------- round trip


def test_publish_live_get_round_trip(backend):
    reg = backend.new()
    sd = small_state_dict()
    m = reg.publish("math", sd, parent=0, loss=1.25, gate_alpha=0.4, meta={"draft": "first-2-layers", "layers": 2})

    assert m.version == 1 and m.parent == 0 and m.cluster == "math"
    assert m.tensors["model.norm.weight"] == ([8], "float16")
    assert reg.live("math") == m
    got_manifest, got = reg.get("math", 1)
    assert got_manifest == m
    assert got_manifest.meta == {"draft": "first-2-layers", "layers": 2}
    assert_same_tensors(got, sd)
    assert reg.clusters() == ["math"]
    assert reg.live("code") is None  # no draft yet: serve the initial one (v0)


def test_tied_weights_are_stored(backend):
    # Tied embeddings share storage, which safetensors refuses unless we copy one of them.
    w = torch.randn(4, 8)
    reg = backend.new()
    reg.publish("c", {"embed.weight": w, "lm_head.weight": w})
    _, got = reg.get("c", 1)
    assert torch.equal(got["embed.weight"], w) and torch.equal(got["lm_head.weight"], w)


def test_versions_increase_per_cluster(backend):
    reg = backend.new()
    for i in range(3):
        reg.publish("math", small_state_dict(i), parent=i)
    candidate = reg.publish("math", small_state_dict(9), parent=3, make_live=False)
    other = reg.publish("code", small_state_dict(5))

    assert [m.version for m in reg.versions("math")] == [1, 2, 3, 4]
    assert candidate.version == 4
    assert reg.live("math").version == 3  # the unpromoted candidate did not go live
    assert other.version == 1  # lineages are per cluster
    assert reg.clusters() == ["code", "math"]


# --------------------------------------------------------------------------- rollback


def test_rollback_walks_parents_and_stops_at_first(backend):
    reg = backend.new()
    reg.publish("math", small_state_dict(1))  # v1, no parent
    reg.publish("math", small_state_dict(2), parent=1)
    reg.publish("math", small_state_dict(3), parent=2)

    assert reg.rollback("math").version == 2
    assert reg.live("math").version == 2
    assert reg.rollback("math").version == 1
    with pytest.raises(RollbackError, match="v1"):
        reg.rollback("math")
    assert reg.live("math").version == 1  # a refused rollback leaves the pointer alone
    assert [m.version for m in reg.versions("math")] == [1, 2, 3]  # rollback never deletes

    assert reg.rollback("math", to_version=3).version == 3  # explicit target
    with pytest.raises(RollbackError, match="not stored"):
        reg.rollback("math", to_version=7)


def test_rollback_without_parent_skips_unpromoted_candidates(backend):
    reg = backend.new()
    reg.publish("math", small_state_dict(1))  # v1 live
    reg.publish("math", small_state_dict(2), make_live=False)  # v2: rejected by the gate
    reg.publish("math", small_state_dict(3))  # v3 live, lineage unknown
    assert reg.rollback("math").version == 1


def test_rollback_with_nothing_live_is_refused(backend):
    with pytest.raises(RollbackError, match="no live draft"):
        backend.new().rollback("math")


# --------------------------------------------------------------------------- corruption


def test_flipped_byte_is_refused_and_live_stays_good(backend):
    reg = backend.new()
    good = reg.publish("math", small_state_dict(1))
    reg.publish("math", small_state_dict(2), parent=1, make_live=False)
    backend.flip_byte("math", 2)

    with pytest.raises(CorruptDraftError, match=r"'math' v2: sha256"):
        reg.get("math", 2)
    with pytest.raises(CorruptDraftError):
        reg.promote("math", 2)
    with pytest.raises(CorruptDraftError):
        reg.load_validated("math", 2, tensor_specs(small_state_dict()))
    assert reg.live("math") == good
    assert_same_tensors(reg.get("math", 1)[1], small_state_dict(1))


def test_corrupted_while_publishing_never_goes_live(backend, monkeypatch):
    reg = backend.new()
    good = reg.publish("math", small_state_dict(1))
    put = reg.store.put

    def bad_put(cluster, version, weights, manifest_json):  # a write that rots on the way to storage
        put(cluster, version, weights[:-1] + bytes([weights[-1] ^ 0xFF]), manifest_json)

    monkeypatch.setattr(reg.store, "put", bad_put)
    with pytest.raises(CorruptDraftError, match="v2"):
        reg.publish("math", small_state_dict(2), parent=1)
    assert reg.live("math") == good


def test_unreadable_safetensors_is_refused(backend):
    reg = backend.new()
    m = reg.publish("math", small_state_dict(1), make_live=False)
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
    import hashlib

    forged = m.model_copy(update={"sha256": hashlib.sha256(garbage).hexdigest(), "num_bytes": len(garbage)})
    reg.store.put("math", 1, garbage, forged.model_dump_json())  # checksum matches; content does not parse
    with pytest.raises(CorruptDraftError, match="not readable safetensors"):
        reg.get("math", 1)


# --------------------------------------------------------------------------- validation against the live model


def test_load_validated_refuses_shape_dtype_and_name_mismatch(backend):
    reg = backend.new()
    reference = {k: (t.shape, t.dtype) for k, t in small_state_dict().items()}  # torch.Size / torch.dtype accepted

    reg.publish("math", small_state_dict(1))
    assert_same_tensors(reg.load_validated("math", 1, reference), small_state_dict(1))

    reg.publish("math", small_state_dict(2, shape=(4, 9)))
    with pytest.raises(DraftMismatchError, match=r"model.embed_tokens.weight: \[4, 9\] float32 vs expected \[4, 8\]"):
        reg.load_validated("math", 2, reference)

    sd = small_state_dict(3)
    sd["model.norm.weight"] = sd["model.norm.weight"].float()  # another float dtype: cast, not refused
    reg.publish("math", sd)
    loaded = reg.load_validated("math", 3, reference)
    assert loaded["model.norm.weight"].dtype == reference["model.norm.weight"][1]
    assert_same_tensors(loaded, small_state_dict(3))
    sd = small_state_dict(3)
    sd["step"] = sd["step"].float()  # an integer tensor turned float: refused
    reg.publish("math", sd)
    with pytest.raises(DraftMismatchError, match=r"step: \[1\] float32 vs expected \[1\] int64"):
        reg.load_validated("math", 4, reference)

    sd = small_state_dict(4)
    del sd["step"]
    reg.publish("math", sd)
    with pytest.raises(DraftMismatchError, match=r"missing 1 tensor\(s\): \['step'\]"):
        reg.load_validated("math", 5, reference)


# --------------------------------------------------------------------------- pruning


def test_pruning_keeps_live_and_newest(backend):
    reg = backend.new(max_versions_kept=2)
    reg.publish("math", small_state_dict(1))  # v1 live
    for i in range(2, 6):
        reg.publish("math", small_state_dict(i), make_live=False)

    assert [m.version for m in reg.versions("math")] == [1, 4, 5]
    assert reg.live("math").version == 1
    assert_same_tensors(reg.get("math", 1)[1], small_state_dict(1))
    with pytest.raises(DraftNotFoundError):
        reg.get("math", 2)
    assert reg.publish("math", small_state_dict(6)).version == 6  # pruned numbers are never reused
    assert [m.version for m in reg.versions("math")] == [5, 6]  # v1 is no longer live: pruned


# --------------------------------------------------------------------------- concurrency


def test_concurrent_publishers_never_share_a_version(backend):
    registries = [backend.new(), backend.new()]  # two independent objects on one storage
    per_thread = 8
    start = threading.Barrier(len(registries))
    got: list[list[int]] = [[] for _ in registries]
    errors: list[BaseException] = []

    def publish_many(i: int) -> None:
        try:
            start.wait(timeout=10)
            for j in range(per_thread):
                got[i].append(registries[i].publish("math", small_state_dict(j)).version)
        except BaseException as e:  # surfaced below; an exception in a thread would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=publish_many, args=(i,)) for i in range(len(registries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    versions = got[0] + got[1]
    assert sorted(versions) == list(range(1, 2 * per_thread + 1))
    assert [m.version for m in registries[0].versions("math")] == list(range(1, 2 * per_thread + 1))


# --------------------------------------------------------------------------- config


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="needs `path`"):
        RegistryConfig(backend="file")
    with pytest.raises(ValueError, match="needs `redis_url`"):
        RegistryConfig(backend="redis")
    with pytest.raises(ValueError):
        RegistryConfig(backend="file", path=tmp_path, max_versions_kept=0)
    with pytest.raises(ValueError):
        RegistryConfig(backend="file", path=tmp_path, bogus=1)
    assert all(f.description for f in RegistryConfig.model_fields.values())


def test_bad_cluster_name_is_refused(tmp_path):
    reg = DraftRegistry(FileStore(tmp_path))
    with pytest.raises(ValueError, match="invalid cluster name"):
        reg.publish("../etc", small_state_dict())
