"""Payload codec: exact masks, INT8 values within half a step, INT8 deltas with error
feedback, one-line PayloadErrors naming the array, and the wire size it buys."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from edgekd.wire.codec import (
    PACKED_KEY,
    decode_delta,
    decode_state,
    decode_state_delta,
    encode_delta,
    encode_state,
    encode_state_delta,
    encoded_nbytes,
    held_codes,
    held_from_record,
    pack_nibbles,
    pack_record,
    unpack_nibbles,
    unpack_record,
)
from edgekd.wire.payload import PayloadError


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(8, 3, 5)).astype(np.float32),
        "conv.bias": rng.normal(size=8).astype(np.float32),
        "head.weight": rng.normal(size=(10, 40)).astype(np.float32),
        "head.bias": rng.normal(size=10).astype(np.float32),
    }


def _magnitude_masks(state: dict[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    masks = {}
    for name, value in state.items():
        if name.endswith(".weight"):
            threshold = np.quantile(np.abs(value), sparsity)
            masks[name] = np.abs(value) > threshold
    return masks


def _half_step(scales: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    per_channel = scales.reshape((-1,) + (1,) * (len(shape) - 1)) if len(shape) >= 2 else scales
    return np.broadcast_to(per_channel / 2, shape)


def test_masks_round_trip_exactly_and_values_within_half_a_step() -> None:
    state = _state()
    masks = _magnitude_masks(state, 0.8)
    for name, mask in masks.items():
        state[name] = np.where(mask, state[name], 0.0).astype(np.float32)

    record = encode_state(state, masks=masks, int8=True)
    decoded, decoded_masks = decode_state(record, state)

    assert sorted(record.keys()) == sorted(
        [f"{n}::{part}" for n in masks for part in ("mask", "values", "scale")]
        + [f"{n}::{part}" for n in ("conv.bias", "head.bias") for part in ("values", "scale")]
    )
    assert decoded_masks.keys() == masks.keys()
    for name, mask in masks.items():
        assert np.array_equal(decoded_masks[name], mask)
        assert np.all(decoded[name][~mask] == 0.0)
    for name, value in state.items():
        scales = np.frombuffer(record[f"{name}::scale"].data, dtype="<f4")
        assert decoded[name].dtype == np.float32 and decoded[name].shape == value.shape
        assert np.all(np.abs(decoded[name] - value) <= _half_step(scales, value.shape) * (1 + 1e-6))


def test_dense_float32_round_trips_bit_exactly_and_other_dtypes_pass_through() -> None:
    state = {**_state(), "bn.num_batches_tracked": np.array(7, dtype=np.int64)}

    decoded, masks = decode_state(encode_state(state), state)

    assert masks == {}
    for name, value in state.items():
        assert decoded[name].dtype == value.dtype
        assert np.array_equal(decoded[name], value)


def test_int8_with_masks_is_at_most_an_eighth_of_dense_float32() -> None:
    # the default student (cnn1d, width 16): 3 274 float32 parameters
    rng = np.random.default_rng(0)
    shapes = {
        "features.0.weight": (16, 1, 5),
        "features.0.bias": (16,),
        "features.2.weight": (16, 16, 3),
        "features.2.bias": (16,),
        "features.4.weight": (16, 16, 3),
        "features.4.bias": (16,),
        "head.weight": (10, 160),
        "head.bias": (10,),
    }
    state = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    masks = _magnitude_masks(state, 0.8)

    dense = encoded_nbytes(encode_state(state))
    compact = encoded_nbytes(encode_state(state, masks=masks, int8=True))

    kept = sum(int(m.sum()) for m in masks.values())
    assert dense == 4 * 3274 == 13096
    # packed masks 10+96+96+200 B, one int8 per kept weight, int8 biases 58 B,
    # float32 scales: one per output channel (58) and one per bias (4)
    assert compact == 402 + kept + 58 + 4 * (58 + 4) == 1352
    assert compact <= dense / 8  # 1352 ≤ 1637: a ratio of 0.103


def test_encoded_nbytes_is_the_sum_of_the_array_buffers() -> None:
    record = encode_state(_state(), int8=True)

    assert encoded_nbytes(record) == sum(len(arr.data) for arr in record.values())


def _tamper(record: ArrayRecord, key: str, array: Array | None) -> ArrayRecord:
    items = {k: v for k, v in record.items() if k != key}
    if array is not None:
        items[key] = array
    return ArrayRecord(items)


def _raw(values: np.ndarray) -> Array:
    return Array(
        dtype=values.dtype.name, shape=(values.size,), stype="edgekd.raw-le", data=values.tobytes()
    )


def test_truncated_mask_is_rejected_naming_the_array() -> None:
    state = _state()
    record = encode_state(state, masks=_magnitude_masks(state, 0.5), int8=True)
    packed = np.frombuffer(record["head.weight::mask"].data, dtype=np.uint8)

    bad = _tamper(record, "head.weight::mask", _raw(packed[:-1].copy()))

    with pytest.raises(PayloadError, match=r"'head.weight::mask' holds 49 entries, expected 50"):
        decode_state(bad, state)


def test_nan_values_are_rejected_naming_the_array() -> None:
    state = _state()
    poisoned = {**state, "conv.bias": np.full(8, np.nan, dtype=np.float32)}

    with pytest.raises(PayloadError, match=r"'conv.bias::values' holds NaN or Inf"):
        decode_state(encode_state(poisoned), state)


def test_misshapen_payload_is_rejected_naming_the_array() -> None:
    state = _state()
    record = encode_state(state, int8=True)
    reference = {**state, "head.weight": np.zeros((10, 41), dtype=np.float32)}

    with pytest.raises(
        PayloadError, match=r"'head.weight::values' holds 400 entries, expected 410"
    ):
        decode_state(record, reference)


@pytest.mark.parametrize(
    ("key", "replacement", "message"),
    [
        ("conv.bias::scale", None, r"'conv.bias::scale' is missing"),
        ("extra::values", np.zeros(1, np.float32), r"'extra::values' is not expected"),
        ("conv.bias::values", np.zeros(8, np.int16), r"'conv.bias::values' has dtype int16"),
        ("conv.bias::values", np.zeros(8, np.float32), r"'conv.bias::scale' is not expected"),
        ("conv.bias::scale", np.array([-1.0], np.float32), r"'conv.bias::scale' holds a scale ≤ 0"),
    ],
)
def test_malformed_entries_are_rejected_naming_the_array(
    key: str, replacement: np.ndarray | None, message: str
) -> None:
    state = _state()
    record = encode_state(state, int8=True)

    bad = _tamper(record, key, None if replacement is None else _raw(replacement))

    with pytest.raises(PayloadError, match=message):
        decode_state(bad, state)


def test_a_plain_npy_record_is_rejected_not_misread() -> None:
    state = _state()
    record = ArrayRecord({f"{n}::values": Array(v) for n, v in state.items()})

    with pytest.raises(PayloadError, match=r"'conv.weight::values' has stype 'numpy.ndarray'"):
        decode_state(record, state)


def test_padding_bits_of_a_mask_must_be_zero() -> None:
    state = {"w": np.ones(5, dtype=np.float32)}
    record = encode_state(state, masks={"w": np.ones(5, dtype=bool)})

    bad = _tamper(record, "w::mask", _raw(np.array([0xFF], dtype=np.uint8)))

    with pytest.raises(PayloadError, match=r"'w::mask' has padding bits set"):
        decode_state(bad, state)


def test_delta_round_trip_within_half_a_step() -> None:
    old = _state(0)
    new = {
        n: v + 0.01 * np.random.default_rng(1).normal(size=v.shape).astype(np.float32)
        for n, v in old.items()
    }

    record, residual = encode_delta(new, old)
    decoded = decode_delta(record, old)

    assert sorted(record.keys()) == sorted(f"{n}::{p}" for n in old for p in ("values", "scale"))
    for name in old:
        scales = np.frombuffer(record[f"{name}::scale"].data, dtype="<f4")
        half = _half_step(scales, old[name].shape)
        assert np.all(np.abs(decoded[name] - new[name]) <= half * (1 + 1e-5) + 1e-7)
        assert np.all(np.abs(residual[name]) <= half * (1 + 1e-6))
        np.testing.assert_allclose(
            new[name] - old[name] - residual[name], decoded[name] - old[name], atol=1e-6
        )


def test_error_feedback_carries_the_quantization_error_to_the_next_round() -> None:
    # Σ_t Q(Δ_t + e_{t−1}) = Σ_t Δ_t − e_T: with feedback the sent updates add up to the
    # true ones up to one residual; without it the per-round errors accumulate.
    rng = np.random.default_rng(0)
    zero = {"w": np.zeros((4, 50), dtype=np.float32)}
    deltas = [
        {"w": (rng.normal(size=(4, 50)) * [[1.0], [1e-3], [1e-3], [1e-3]]).astype(np.float32)}
        for _ in range(20)
    ]
    sent_ef, sent_plain = np.zeros((4, 50)), np.zeros((4, 50))
    residual: dict[str, np.ndarray] | None = {}

    for delta in deltas:
        record, residual = encode_delta(delta, zero, error_feedback=residual)
        sent_ef += decode_delta(record, zero)["w"]
        plain_record, _ = encode_delta(delta, zero)
        sent_plain += decode_delta(plain_record, zero)["w"]

    true = sum(d["w"].astype(np.float64) for d in deltas)
    assert residual is not None
    np.testing.assert_allclose(sent_ef, true - residual["w"], atol=1e-5)
    assert np.abs(sent_ef - true).max() < np.abs(sent_plain - true).max()


def test_artifact_round_trips_and_a_truncated_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    from edgekd.wire.codec import read_artifact, write_artifact

    state = _state()
    masks = _magnitude_masks(state, 0.8)
    record = encode_state(state, masks=masks, int8=True)
    path = tmp_path / "student.ekd"

    # Execute
    size = write_artifact(path, record, state)
    decoded, decoded_masks = read_artifact(path)

    # Assert
    assert size == path.stat().st_size < sum(v.nbytes for v in state.values()) / 2
    reference, _ = decode_state(record, state)
    for name in state:
        np.testing.assert_array_equal(decoded[name], reference[name])
    assert all(np.array_equal(decoded_masks[k], np.asarray(masks[k])) for k in masks)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(PayloadError, match="truncated|trailing"):
        read_artifact(path)


# ------------------------------------------------------------------------- INT4
def test_int4_nibbles_round_trip_and_bad_nibbles_are_rejected() -> None:
    codes = np.array([-7, -1, 0, 1, 7, 3, -4], dtype=np.int8)

    packed = pack_nibbles(codes)

    assert packed.size == 4
    np.testing.assert_array_equal(unpack_nibbles(packed, 7, "k"), codes)
    padded = packed.copy()
    padded[-1] |= 0x10  # the unused high nibble of the last byte
    with pytest.raises(PayloadError, match="'k' has its padding nibble set"):
        unpack_nibbles(padded, 7, "k")
    minus_eight = packed.copy()
    minus_eight[0] = (minus_eight[0] & 0xF0) | 0x8
    with pytest.raises(PayloadError, match="code -8"):
        unpack_nibbles(minus_eight, 7, "k")


def test_int4_delta_is_within_half_a_step_and_the_residual_holds_the_rest() -> None:
    old = _state(0)
    rng = np.random.default_rng(1)
    new = {n: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for n, v in old.items()}

    record, residual = encode_delta(new, old, bits=4)
    decoded = decode_delta(record, old)
    int8_record, _ = encode_delta(new, old)

    assert sorted(record.keys()) == sorted(f"{n}::{p}" for n in old for p in ("nibbles", "scale"))
    for name in old:
        step = np.abs(new[name] - old[name]).max() / 7
        assert np.abs(decoded[name] - new[name]).max() <= step / 2 * (1 + 1e-5)
        np.testing.assert_allclose(decoded[name] + residual[name], new[name], atol=1e-6)
    # half the value bytes, and one scale per array instead of one per channel
    assert encoded_nbytes(record) < 0.55 * encoded_nbytes(int8_record)


def test_int4_delta_with_masks_sends_only_kept_entries() -> None:
    old = _state(0)
    masks = _magnitude_masks(old, 0.75)
    new = {n: v + 0.5 for n, v in old.items()}

    record, _ = encode_delta(new, old, masks=masks, bits=4)
    decoded = decode_delta(record, old, masks=masks)

    assert record["head.weight::nibbles"].shape == ((int(masks["head.weight"].sum()) + 1) // 2,)
    for name, mask in masks.items():
        np.testing.assert_array_equal(decoded[name][~mask], old[name][~mask])
    with pytest.raises(PayloadError, match="conv.weight::nibbles.*truncated"):
        decode_delta(record, old)  # without the masks the counts disagree


# ----------------------------------------------------------- lossless state delta
def _next_round(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (v + 0.02 * rng.normal(size=v.shape)).astype(np.float32) for n, v in state.items()}


def _masked(state: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        n: np.where(masks[n], v, 0).astype(np.float32) if n in masks else v
        for n, v in state.items()
    }


def test_state_delta_decodes_to_exactly_the_int8_state_even_when_masks_shrink() -> None:
    # Prepare: round 1 at 50 % sparsity (sent whole), round 2 at 80 % (sent as a delta)
    first = _state(0)
    masks1 = _magnitude_masks(first, 0.5)
    first = _masked(first, masks1)
    full = encode_state(first, masks=masks1, int8=True)
    _, node_masks = decode_state(full, first)
    node_codes = held_from_record(full, first, node_masks)
    second = _next_round(first, 1)
    masks2 = {n: m & _magnitude_masks(second, 0.8)[n] for n, m in masks1.items()}
    second = _masked(second, masks2)

    # Execute
    record, server_codes = encode_state_delta(second, node_codes, masks=masks2)
    decoded, masks, codes = decode_state_delta(record, second, node_codes)

    # Assert: bit-equal to what the whole INT8 state would have decoded to
    expected, _ = decode_state(encode_state(second, masks=masks2, int8=True), second)
    for name in second:
        np.testing.assert_array_equal(decoded[name], expected[name])
        np.testing.assert_array_equal(codes[name][0], server_codes[name][0])
    assert all(np.array_equal(masks[n], masks2[n]) for n in masks2)
    assert (
        held_codes(second, masks2)["head.weight"][0].tobytes() == codes["head.weight"][0].tobytes()
    )


def test_state_delta_omits_unchanged_scales_and_deflates_to_under_half_the_state() -> None:
    state = _state(0)
    base = held_codes(state)
    nudged = {n: v * np.float32(1.0) for n, v in state.items()}
    nudged["head.weight"] = nudged["head.weight"].copy()
    nudged["head.weight"][0, 1] += 0.01  # one value moves; no channel maximum does

    record, _ = encode_state_delta(nudged, base)
    big = {"w": np.random.default_rng(2).normal(size=(48, 200)).astype(np.float32)}
    moved = _next_round(big, 3)
    moved_record, _ = encode_state_delta(moved, held_codes(big))

    assert not any(k.endswith("::scale") for k in record.keys())
    decoded, _, _ = decode_state_delta(record, nudged, base)
    expected, _ = decode_state(encode_state(nudged, int8=True), nudged)
    np.testing.assert_array_equal(decoded["head.weight"], expected["head.weight"])
    whole = encoded_nbytes(encode_state(moved, int8=True))
    assert encoded_nbytes(pack_record(moved_record)) < 0.5 * whole


def test_state_delta_against_other_codes_or_to_an_invalid_code_is_refused() -> None:
    state = _state(0)
    base = held_codes(state)
    record, _ = encode_state_delta(_next_round(state, 1), base)

    with pytest.raises(PayloadError, match="holds no codes for 'conv.bias'"):
        decode_state_delta(record, state, {k: v for k, v in base.items() if k != "conv.bias"})
    codes, scales = base["head.bias"]
    at_max = {**base, "head.bias": (np.full_like(codes, 127), scales)}
    bump = ArrayRecord(dict(record.items()))
    bump["head.bias::dcodes"] = _raw(np.ones(10, dtype=np.int8))
    with pytest.raises(PayloadError, match="head.bias::dcodes' makes a code of -128"):
        decode_state_delta(bump, state, at_max)


# ------------------------------------------------------------------ entropy stage
def test_packed_record_round_trips_and_is_smaller() -> None:
    state = _state(0)
    record, _ = encode_state_delta(_next_round(state, 1), held_codes(state))

    packed = pack_record(record)
    unpacked = unpack_record(packed, max_bytes=1 << 20)

    assert list(packed.keys()) == [PACKED_KEY]
    assert encoded_nbytes(packed) < encoded_nbytes(record)
    assert list(unpacked.keys()) == list(record.keys())
    for key, arr in record.items():
        assert bytes(unpacked[key].data) == bytes(arr.data)
        assert (unpacked[key].dtype, unpacked[key].stype) == (arr.dtype, arr.stype)


def _with_header(header: bytes) -> bytes:
    """A deflated packed payload whose header is ``header`` and whose body is empty."""
    import zlib

    return zlib.compress(len(header).to_bytes(4, "little") + header)


def _packed_blob(data: bytes) -> ArrayRecord:
    from edgekd.wire.codec import PACKED_STYPE

    return ArrayRecord(
        {PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)}
    )


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (lambda good: good[: len(good) // 2], "truncated"),
        (lambda good: good + b"junk", "trailing bytes"),
        (lambda good: b"\x00" + good, "does not inflate"),
        (lambda good: __import__("zlib").compress(b"\x05\x00\x00\x00[[1]]"), "header"),
        (lambda good: __import__("zlib").compress(bytes(1 << 18)), "more than 131072 bytes"),
        (lambda good: _with_header(b'[["w","<f4",Infinity]]'), "claims inf bytes"),
        (lambda good: _with_header(b'[["w","<f4",1e400]]'), "claims inf bytes"),
        (lambda good: _with_header(b'[["w","<f4",true]]'), "claims True bytes"),
        (lambda good: _with_header(b"[" * 5000 + b"]" * 5000), "RecursionError"),
        (lambda good: _with_header(b'[["w","object",4]]'), "is not numeric"),
        (lambda good: _with_header(b'{"w": 1}'), "not a list of arrays"),
        (lambda good: _with_header(b" " * 70000 + b"[]"), "exceeds 65536"),
    ],
)
def test_a_corrupt_packed_payload_is_refused(blob, message: str) -> None:  # type: ignore[no-untyped-def]
    good = bytes(pack_record(encode_state(_state(0)))[PACKED_KEY].data)

    with pytest.raises(PayloadError, match=message):
        unpack_record(_packed_blob(blob(good)), max_bytes=1 << 17)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ('{"w": ["<f4", [1e400]]}', "has shape"),
        ('{"w": ["<f4", [-1]]}', "has shape"),
        ('{"w": ["<f4", [65536, 65536]]}', "over 268435456 elements"),
        ('{"w": ["O", [2]]}', "is not numeric"),
        ('["w"]', "is not an object"),
        ("[" * 5000, "does not parse"),
    ],
)
def test_a_hostile_shape_manifest_is_refused(manifest: str, message: str) -> None:
    from edgekd.wire.codec import reference_from_manifest

    with pytest.raises(PayloadError, match=message):
        reference_from_manifest(manifest)
