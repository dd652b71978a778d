"""Wire format of a TrainingRecord: versioned, self-describing, no pickle.

Layout (integers little-endian)::

    b"OSDR" | u16 version | u32 header_len | header: UTF-8 JSON | payload: raw arrays

The header holds the scalars (cluster, draft_version, request_id, created_at), the
rounds as ``[start, num_accepted, [proposed...]]`` lists, and one descriptor per array:
``{"name", "dtype", "shape", "offset", "nbytes"}`` with ``offset`` counted from the
payload start. The payload is the arrays' little-endian bytes, back to back; the
descriptors must tile it exactly, so truncation or trailing junk is always detected.

Token-id arrays are stored as ``uint16`` when every id fits (SmolLM2's 49152-token vocab
does) and as ``int32`` otherwise; the header names the dtype and decoding always returns
int32. With k=64 that is 64·2 (ids) + 64·2 (fp16 log-probs) + 4 (fp32 logsumexp) + 2
(the output id) = 262 B per emitted position, instead of 390 B with int32 ids.

Version 2 adds the eagle head's target features (an optional ``target_features`` fp16 array
and ``feature_start`` in the header): F·2 bytes per position they cover, 3·576·2 = 3456 B on
SmolLM2, which is why only eagle-drafted records carry them and only over the output and a
bounded stretch of prompt (EngineConfig.record_features, feature_context). A record without
features is still written as version 1, so consumers that read only version 1 keep working.

Everything read from the wire is untrusted: any malformed input raises
:class:`RecordDecodeError`, never another exception, so the buffer can dead-letter it.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import torch

from osd.data.records import DraftRound, TrainingRecord

MAGIC = b"OSDR"
CODEC_VERSION = 2  # written when a record carries target features; version 1 otherwise
SUPPORTED_VERSIONS = frozenset({1, 2})
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_MAX_HEADER = 64 << 20  # a sanity bound, far above any real header

# Explicit little-endian wire dtypes; decoding converts to the record's native dtypes.
_WIRE = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_NATIVE = {torch.int32: np.int32, torch.float16: np.float16, torch.float32: np.float32}
_IDS = ("uint16", "int32")
# name -> (allowed wire dtypes, ndim)
_SCHEMA = {
    "prompt_ids": (_IDS, 1),
    "output_ids": (_IDS, 1),
    "teacher_token_ids": (_IDS, 2),
    "teacher_logprobs": (("float16",), 2),
    "teacher_logsumexp": (("float32",), 1),
    "target_features": (("float16",), 2),  # version 2, optional
}
_OPTIONAL = frozenset({"target_features"})
_INT32_MAX = 2**31 - 1


class RecordDecodeError(ValueError):
    """Bytes that are not a valid encoded TrainingRecord (truncated, foreign, corrupt, or a
    version this osd cannot read)."""


# -- encoding ------------------------------------------------------------------------------


def _ids_wire(ids: Any, name: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids, dtype=np.int64)
    if a.size == 0 or (a.min() >= 0 and a.max() <= 0xFFFF):
        return a.astype(_WIRE["uint16"])
    if a.min() < -_INT32_MAX - 1 or a.max() > _INT32_MAX:
        raise ValueError(f"{name} holds ids outside int32 range; cannot encode")
    return a.astype(_WIRE["int32"])


def _float_wire(t: torch.Tensor, dtype: torch.dtype, wire: str) -> np.ndarray:
    # Through torch first: numpy has no bfloat16, and the record's dtypes are torch's.
    return t.detach().to("cpu", dtype).contiguous().numpy().astype(_WIRE[wire], copy=False)


def encode_record(rec: TrainingRecord) -> bytes:
    """Encode ``rec`` (tensors may live on any device, in any dtype castable to the schema)."""
    ids, lp, lse = rec.teacher_token_ids, rec.teacher_logprobs, rec.teacher_logsumexp
    if ids.dim() != 2 or tuple(lp.shape) != tuple(ids.shape):
        raise ValueError(f"teacher_token_ids {tuple(ids.shape)} and teacher_logprobs {tuple(lp.shape)} "
                         "must both be [T, k]")
    if not math.isfinite(rec.created_at):
        raise ValueError(f"created_at must be finite, got {rec.created_at}")
    arrays = {
        "prompt_ids": _ids_wire(rec.prompt_ids, "prompt_ids"),  # [P]
        "output_ids": _ids_wire(rec.output_ids, "output_ids"),  # [T]
        "teacher_token_ids": _ids_wire(ids, "teacher_token_ids"),  # [T, k]
        "teacher_logprobs": _float_wire(lp, torch.float16, "float16"),  # [T, k]
        "teacher_logsumexp": _float_wire(lse, torch.float32, "float32"),  # [T]
    }
    if rec.target_features is not None:
        arrays["target_features"] = _float_wire(rec.target_features, torch.float16, "float16")  # [rows, F]
    descs, chunks, offset = [], [], 0
    for name, a in arrays.items():
        raw = a.tobytes()
        descs.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    header = {
        "cluster": rec.cluster,
        "draft_version": int(rec.draft_version),
        "request_id": rec.request_id,
        "created_at": float(rec.created_at),
        "rounds": [[int(r.start), int(r.num_accepted), [int(t) for t in r.proposed]] for r in rec.rounds],
        "arrays": descs,
    }
    version = 1
    if rec.target_features is not None:
        header["feature_start"] = int(rec.feature_start)
        version = CODEC_VERSION
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return b"".join([_PREFIX.pack(MAGIC, version, len(hbytes)), hbytes, *chunks])


# -- decoding ------------------------------------------------------------------------------


def _get(obj: dict, key: str, types: type | tuple[type, ...], where: str = "header") -> Any:
    if key not in obj:
        raise RecordDecodeError(f"{where} lacks field {key!r}")
    v = obj[key]
    # bool is an int in Python; a JSON true where a count belongs is corruption.
    if isinstance(v, bool) or not isinstance(v, types):
        raise RecordDecodeError(f"{where} field {key!r} has type {type(v).__name__}, expected {types}")
    return v


def _nonneg_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise RecordDecodeError(f"{what} must be a non-negative integer, got {v!r}")
    return v


def _read_arrays(header: dict, payload: memoryview, version: int) -> dict[str, np.ndarray]:
    descs = _get(header, "arrays", list)
    out: dict[str, np.ndarray] = {}
    spans = []
    for d in descs:
        if not isinstance(d, dict):
            raise RecordDecodeError(f"array descriptor is not an object: {d!r}")
        name = _get(d, "name", str, "array descriptor")
        if name not in _SCHEMA or (version == 1 and name in _OPTIONAL):
            raise RecordDecodeError(f"unknown array {name!r} in a version {version} record")
        if name in out:
            raise RecordDecodeError(f"array {name!r} appears twice")
        allowed, ndim = _SCHEMA[name]
        dtype = _get(d, "dtype", str, name)
        if dtype not in allowed:
            raise RecordDecodeError(f"array {name!r} has dtype {dtype!r}; allowed: {list(allowed)}")
        shape = [_nonneg_int(s, f"{name} shape entry") for s in _get(d, "shape", list, name)]
        if len(shape) != ndim:
            raise RecordDecodeError(f"array {name!r} has shape {shape}; expected {ndim} dims")
        offset = _nonneg_int(d.get("offset"), f"{name} offset")
        nbytes = _nonneg_int(d.get("nbytes"), f"{name} nbytes")
        wire = _WIRE[dtype]
        count = math.prod(shape)
        if count * wire.itemsize != nbytes:
            raise RecordDecodeError(f"array {name!r}: shape {shape} of {dtype} needs {count * wire.itemsize} bytes, "
                                    f"descriptor says {nbytes}")
        if offset + nbytes > len(payload):
            raise RecordDecodeError(f"array {name!r} spans payload bytes [{offset}, {offset + nbytes}) but the payload "
                                    f"has {len(payload)}: truncated record")
        spans.append((offset, nbytes, name))
        # frombuffer refuses offset == len(payload) even for count 0, hence the empty case.
        arr = np.frombuffer(payload, dtype=wire, count=count, offset=offset) if count else np.empty(0, wire)
        out[name] = arr.reshape(shape)
    missing = set(_SCHEMA) - _OPTIONAL - set(out)
    if missing:
        raise RecordDecodeError(f"record lacks arrays {sorted(missing)}")
    # The descriptors must tile the payload: no overlaps, no gaps, no trailing bytes.
    cursor = 0
    for offset, nbytes, name in sorted(spans):
        if offset != cursor:
            raise RecordDecodeError(f"array {name!r} starts at payload byte {offset}, expected {cursor} (gap or overlap)")
        cursor += nbytes
    if cursor != len(payload):
        raise RecordDecodeError(f"payload has {len(payload) - cursor} trailing bytes after the arrays")
    return out


def _read_rounds(header: dict) -> list[DraftRound]:
    rounds = []
    for r in _get(header, "rounds", list):
        if not (isinstance(r, list) and len(r) == 3 and isinstance(r[2], list)):
            raise RecordDecodeError(f"round must be [start, num_accepted, [proposed...]], got {r!r}")
        start = _nonneg_int(r[0], "round start")
        num_accepted = _nonneg_int(r[1], "round num_accepted")
        proposed = [_nonneg_int(t, "proposed token id") for t in r[2]]
        rounds.append(DraftRound(start=start, proposed=proposed, num_accepted=num_accepted))
    return rounds


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # astype copies into native-endian, writable memory that torch may own. Empty arrays get
    # torch.empty: from_numpy gives them zero strides, on which e.g. ``.view(dtype)`` fails.
    if a.size == 0:
        return torch.empty(a.shape, dtype=dtype)
    return torch.from_numpy(a.astype(_NATIVE[dtype]))


def _decode(data: bytes | bytearray | memoryview) -> TrainingRecord:
    buf = memoryview(data).cast("B")
    if len(buf) < _PREFIX.size:
        raise RecordDecodeError(f"truncated record: {len(buf)} bytes, the fixed prefix alone is {_PREFIX.size}")
    magic, version, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise RecordDecodeError(f"not an osd training record: magic {magic!r}, expected {MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        raise RecordDecodeError(f"record format version {version} is not readable by this osd "
                                f"(reads {sorted(SUPPORTED_VERSIONS)}): upgrade osd on the consumer")
    hend = _PREFIX.size + hlen
    if hlen > _MAX_HEADER or hend > len(buf):
        raise RecordDecodeError(f"truncated record: header claims {hlen} bytes, {len(buf) - _PREFIX.size} remain")
    try:
        header = json.loads(bytes(buf[_PREFIX.size:hend]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordDecodeError(f"record header is not UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise RecordDecodeError(f"record header must be a JSON object, got {type(header).__name__}")

    a = _read_arrays(header, buf[hend:], version)
    T = a["output_ids"].shape[0]
    if a["teacher_token_ids"].shape != a["teacher_logprobs"].shape or a["teacher_token_ids"].shape[0] != T:
        raise RecordDecodeError(f"inconsistent shapes: output_ids [{T}], teacher_token_ids "
                                f"{list(a['teacher_token_ids'].shape)}, teacher_logprobs {list(a['teacher_logprobs'].shape)}")
    if a["teacher_logsumexp"].shape != (T,):
        raise RecordDecodeError(f"inconsistent shapes: teacher_logsumexp {list(a['teacher_logsumexp'].shape)}, expected [{T}]")
    try:
        return TrainingRecord(
            prompt_ids=a["prompt_ids"].astype(np.int64).tolist(),
            output_ids=a["output_ids"].astype(np.int64).tolist(),
            teacher_token_ids=_tensor(a["teacher_token_ids"], torch.int32),  # [T, k] int32
            teacher_logprobs=_tensor(a["teacher_logprobs"], torch.float16),  # [T, k] float16
            teacher_logsumexp=_tensor(a["teacher_logsumexp"], torch.float32),  # [T] float32
            rounds=_read_rounds(header),
            cluster=_get(header, "cluster", str),
            draft_version=_get(header, "draft_version", int),
            request_id=_get(header, "request_id", str),
            created_at=float(_get(header, "created_at", (int, float))),
            target_features=_tensor(a["target_features"], torch.float16) if "target_features" in a else None,
            feature_start=_nonneg_int(header.get("feature_start", 0), "feature_start"),
        )
    except RecordDecodeError:
        raise
    except ValueError as e:  # TrainingRecord's own invariants
        raise RecordDecodeError(f"decoded fields violate TrainingRecord invariants: {e}") from e


def decode_record(data: bytes | bytearray | memoryview) -> TrainingRecord:
    """Decode bytes from :func:`encode_record`; raises :class:`RecordDecodeError` on anything else."""
    try:
        return _decode(data)
    except RecordDecodeError:
        raise
    except Exception as e:  # untrusted input: a gap in the checks above must not crash a trainer
        raise RecordDecodeError(f"malformed record ({type(e).__name__}: {e})") from e
