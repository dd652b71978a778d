"""The record codec: exact round trips, and every malformed input refused with RecordDecodeError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osd.data.codec import (
    CODEC_VERSION,
    MAGIC,
    RecordDecodeError,
    decode_record,
    encode_record,
)
from osd.data.records import DraftRound, TrainingRecord


def make_record(T: int = 5, k: int = 8, P: int = 4, vocab: int = 512, seed: int = 0, **kw) -> TrainingRecord:
    g = torch.Generator().manual_seed(seed)
    kw = {"request_id": f"req-{seed}", "created_at": 1.7e9 + seed, **kw}  # deterministic bytes
    return TrainingRecord(
        prompt_ids=torch.randint(0, vocab, (P,), generator=g).tolist(),
        output_ids=torch.randint(0, vocab, (T,), generator=g).tolist(),
        teacher_token_ids=torch.randint(0, vocab, (T, k), generator=g, dtype=torch.int32),  # [T, k] int32
        teacher_logprobs=torch.randn(T, k, generator=g).half(),  # [T, k] float16
        teacher_logsumexp=torch.randn(T, generator=g) * 10,  # [T] float32
        **kw,
    )


def assert_same(a: TrainingRecord, b: TrainingRecord) -> None:
    assert a.prompt_ids == b.prompt_ids and a.output_ids == b.output_ids
    for name, dtype in [("teacher_token_ids", torch.int32), ("teacher_logprobs", torch.float16),
                        ("teacher_logsumexp", torch.float32)]:
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == dtype and x.shape == y.shape, name
        # Bitwise: NaN and -inf log-probs must survive too.
        assert torch.equal(x.to(dtype).reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name
    assert (a.rounds, a.cluster, a.draft_version, a.request_id, a.created_at) == \
           (b.rounds, b.cluster, b.draft_version, b.request_id, b.created_at)


@st.composite
def records(draw) -> TrainingRecord:
    T = draw(st.integers(0, 40))
    k = draw(st.integers(1, 64))
    P = draw(st.integers(0, 50))
    # 512 and 49152 take the uint16 wire path; 2**31-1 forces int32.
    vocab = draw(st.sampled_from([512, 49152, 2**31 - 1]))
    rec = make_record(T, k, P, vocab=vocab, seed=draw(st.integers(0, 2**32 - 1)))
    if T and draw(st.booleans()):  # special floats: masked tokens give -inf log-probs
        rec.teacher_logprobs[0, 0] = float("-inf")
        rec.teacher_logprobs[-1, -1] = float("nan")
    rec.rounds = draw(st.lists(st.builds(DraftRound, start=st.integers(0, 100),
                                         proposed=st.lists(st.integers(0, 2**31 - 1), max_size=8),
                                         num_accepted=st.integers(0, 8)), max_size=6))
    rec.cluster = draw(st.text(min_size=1, max_size=20))
    rec.draft_version = draw(st.integers(0, 2**53))
    rec.request_id = draw(st.text(max_size=40))
    rec.created_at = draw(st.floats(allow_nan=False, allow_infinity=False))
    return rec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records())
def test_round_trip(rec):
    assert_same(rec, decode_record(encode_record(rec)))


def test_decode_accepts_bytearray_and_memoryview():
    rec = make_record()
    data = encode_record(rec)
    assert_same(rec, decode_record(bytearray(data)))
    assert_same(rec, decode_record(memoryview(data)))


def test_encode_normalises_dtypes():
    # The engine may hand over int64 topk indices and fp32 log-probs; the wire fixes the schema.
    rec = make_record(T=3, k=4)
    rec.teacher_token_ids = rec.teacher_token_ids.long()
    rec.teacher_logprobs = rec.teacher_logprobs.float()
    out = decode_record(encode_record(rec))
    assert out.teacher_token_ids.dtype == torch.int32 and out.teacher_logprobs.dtype == torch.float16
    assert torch.equal(out.teacher_token_ids.long(), rec.teacher_token_ids)


def test_bytes_per_position_k64():
    short, long = make_record(T=10, k=64, vocab=49152), make_record(T=110, k=64, vocab=49152)
    per_pos = (len(encode_record(long)) - len(encode_record(short))) / 100
    # uint16 ids + fp16 log-probs + fp32 lse + uint16 output id; the fraction is JSON offsets
    # gaining digits.
    assert 64 * 2 + 64 * 2 + 4 + 2 <= per_pos < 263
    wide, wide_short = make_record(T=110, k=64, vocab=2**31 - 1), make_record(T=10, k=64, vocab=2**31 - 1)
    assert 64 * 4 + 64 * 2 + 4 + 4 <= (len(encode_record(wide)) - len(encode_record(wide_short))) / 100 < 393
    assert len(encode_record(make_record(T=0, k=64, P=0))) < 600  # fixed overhead: prefix + JSON header


# -- refusals --------------------------------------------------------------------------------


def _split(data: bytes) -> tuple[int, dict, bytes]:
    _, version, hlen = struct.unpack_from("<4sHI", data)
    return version, json.loads(data[10:10 + hlen]), data[10 + hlen:]


def _join(header: dict, payload: bytes, version: int = CODEC_VERSION, magic: bytes = MAGIC) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sHI", magic, version, len(h)) + h + payload


def _mutated(mutate) -> bytes:
    _, header, payload = _split(encode_record(make_record(T=3, k=4)))
    payload = mutate(header, payload) or payload
    return _join(header, payload)


def _arr(header: dict, name: str) -> dict:
    return next(a for a in header["arrays"] if a["name"] == name)


def test_every_truncation_is_refused():
    data = encode_record(make_record(T=2, k=3, P=2))
    for cut in range(len(data)):
        with pytest.raises(RecordDecodeError):
            decode_record(data[:cut])


@pytest.mark.parametrize("data, match", [
    (b"", "truncated"),
    (b"PK\x03\x04" + b"\0" * 40, "magic"),  # a zip file
    (b"\x80\x04\x95" + b"\0" * 40, "magic"),  # a pickle stream
    (_join({}, b"", version=3), "version 3"),
    (_join({}, b"", magic=b"OSDX"), "magic"),
    (struct.pack("<4sHI", MAGIC, 1, 5) + b"\xff\xfe{}!!", "UTF-8 JSON"),
    (_join([1, 2], b""), "JSON object"),  # type: ignore[arg-type]
    (_join({"arrays": []}, b""), "lacks arrays"),
])
def test_foreign_bytes_refused(data, match):
    with pytest.raises(RecordDecodeError, match=match):
        decode_record(data)


def _set(path, value):
    def mutate(header, payload):
        target = _arr(header, path[0]) if path[0] in ("teacher_logprobs", "teacher_token_ids", "teacher_logsumexp",
                                                      "prompt_ids", "output_ids") else header
        target[path[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate, match", [
    (_set(["teacher_logprobs", "dtype"], "float64"), "dtype"),
    (_set(["teacher_logprobs", "shape"], [3, 2]), "needs 12 bytes"),
    (_set(["teacher_logsumexp", "shape"], [3, 1]), "expected 1 dims"),
    (_set(["teacher_token_ids", "offset"], 0), "gap or overlap"),
    (_set(["teacher_token_ids", "shape"], [-3, 4]), "non-negative"),
    (_set(["cluster"], 7), "cluster"),
    (_set(["draft_version"], True), "draft_version"),
    (_set(["rounds"], [[0, 1]]), "round must be"),
    (_set(["arrays"], "nope"), "arrays"),
    (lambda h, p: p + b"\0", "trailing"),
    (lambda h, p: h.pop("request_id") and None, "request_id"),
    (lambda h, p: h["arrays"].append(dict(h["arrays"][0])) and None, "twice"),
])
def test_corrupt_header_refused(mutate, match):
    with pytest.raises(RecordDecodeError, match=match):
        decode_record(_mutated(mutate))


def test_inconsistent_shapes_refused():
    # Self-consistent descriptors, but teacher rows disagree with the number of outputs.
    rec, other = make_record(T=3, k=4), make_record(T=2, k=4)
    _, h3, p3 = _split(encode_record(rec))
    _, h2, p2 = _split(encode_record(other))
    out_desc, out2 = _arr(h3, "output_ids"), _arr(h2, "output_ids")
    payload = p3[:out_desc["offset"]] + p2[out2["offset"]:out2["offset"] + out2["nbytes"]] + p3[out_desc["offset"] + out_desc["nbytes"]:]
    out_desc.update(shape=[2], nbytes=out2["nbytes"])
    shift = out2["nbytes"] - 6
    for a in h3["arrays"]:
        if a["offset"] > out_desc["offset"]:
            a["offset"] += shift
    with pytest.raises(RecordDecodeError, match="inconsistent shapes"):
        decode_record(_join(h3, payload))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_decode_error(blob):
    for data in (blob, MAGIC + struct.pack("<H", CODEC_VERSION) + blob):
        with pytest.raises(RecordDecodeError):
            decode_record(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_bit_flips_never_crash_differently(data):
    # A flipped bit in the payload may still decode (a different float); anything else
    # must be a RecordDecodeError, the one exception the buffer dead-letters on.
    raw = bytearray(encode_record(make_record(T=3, k=4)))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        decode_record(bytes(raw))
    except RecordDecodeError:
        pass


def test_encode_refuses_bad_records():
    rec = make_record(T=3, k=4)
    rec.teacher_logprobs = rec.teacher_logprobs[:, :3]
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        encode_record(rec)
    rec = make_record(T=3, k=4)
    rec.output_ids = [0, 1, 2**40]
    with pytest.raises(ValueError, match="int32"):
        encode_record(rec)


# -- version 2: the eagle head's target features -------------------------------------------------


def test_features_round_trip_and_a_record_without_them_stays_version_1():
    plain = make_record(T=3, P=5)
    assert struct.unpack_from("<4sH", encode_record(plain))[1] == 1  # version-1 readers keep reading these
    features = torch.randn(5 + 3 - 1 - 2, 12).half()  # positions 2 .. P+T-2
    rec = make_record(T=3, P=5, target_features=features, feature_start=2)
    data = encode_record(rec)
    assert struct.unpack_from("<4sH", data)[1] == 2
    back = decode_record(data)
    assert_same(rec, back)
    assert back.feature_start == 2 and back.target_features.dtype == torch.float16
    assert torch.equal(back.target_features, features)
    assert len(data) - len(encode_record(plain)) == features.numel() * 2 + len(',"feature_start":2') + len(
        json.dumps(_arr(json.loads(data[10:10 + struct.unpack_from("<I", data, 6)[0]]), "target_features"),
                   separators=(",", ":"))) + 1  # the features' bytes, the header field and the descriptor


def test_features_of_the_wrong_length_or_in_a_version_1_record_are_refused():
    with pytest.raises(ValueError, match="target_features"):
        make_record(T=3, P=5, target_features=torch.zeros(4, 12).half(), feature_start=2)  # needs 5 rows
    data = encode_record(make_record(T=3, P=5, target_features=torch.zeros(7, 12).half()))
    as_v1 = data[:4] + struct.pack("<H", 1) + data[6:]
    with pytest.raises(RecordDecodeError, match="version 1"):
        decode_record(as_v1)
