"""Payload codec: pruning masks as packed bits, INT8 values, INT8 update deltas.

Numpy only (no torch), so the onnxruntime and LiteRT clients use it too. A model state
``{name: array}`` becomes a Flower ``ArrayRecord`` whose keys are

=====================  =========  ===============================================
key                    dtype      content
=====================  =========  ===============================================
``{name}::mask``       uint8      ``np.packbits`` of the flattened (C-order) boolean
                                  mask, ``True`` = kept; ``ceil(n/8)`` bytes, zero
                                  padding bits. Only for arrays that have a mask.
``{name}::values``     float32 /  the kept entries in C order (all ``n`` entries when
                       int8       there is no mask); int8 when quantized, else float32.
                                  Non-float arrays travel as is, in their own dtype.
``{name}::scale``      float32    only when quantized: the symmetric scales, one per
                                  output channel (axis 0) for arrays of ≥ 2 dims, a
                                  single one for 1-D arrays (biases).
=====================  =========  ===============================================

INT8 is symmetric (Jacob et al. 2018): ``s_c = max|x_c| / 127`` (1.0 for an all-zero
channel), ``q = clamp(round(x/s_c), −127, 127)``, ``x̂ = q·s_c``, so ``|x̂ − x| ≤ s_c/2``.

Each entry is a raw little-endian buffer (``stype`` `RAW_STYPE`, 1-D ``shape``), not an
``.npy`` file: the 128-byte npy header per array would cost more than a small student's
pruned layer, and the decoder knows every shape from its reference state anyway. So
``len(Array.data)`` is the payload itself; Flower adds only the dtype/shape/stype
strings to each message. Flower's plain ``FedAvg`` cannot average such records
(``Array.numpy()`` refuses the stype): decode first, which also validates.

`encode_delta` sends ``new − old`` in INT8 (per-channel scales as above, no masks) or
INT4 (codes ``−7..7`` as ``{name}::nibbles``: two's-complement nibbles, two per byte,
low nibble first, a zero padding nibble; one scale per array, ``max|Δ|/7``, so most
codes are near 0 and the entropy stage shrinks them) with optional error feedback (Seide
et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD"): the
residual ``e`` left over by the last quantization is added before quantizing,
``c = Δ + e``, and the new residual is ``e' = c − Q(c)``, so quantization error is
delayed, never lost.

`encode_state_delta` is the lossless downlink: a node that holds the INT8 codes of an
earlier state receives only ``{name}::dcodes`` (int8), the change of every kept code
modulo 256 (codes are ``−127..127``, so ``old + d`` wrapped to int8 is exact), and
``{name}::scale`` only where the scales changed. It decodes to exactly the state
`encode_state` would have sent; between rounds most codes move by a few steps, so the
entropy stage shrinks it to about half.

`pack_record` is that entropy stage (Deep Compression's last step, Han et al. 2016, with
DEFLATE instead of Huffman tables): the whole record as one ``edgekd::packed`` array
(stype `PACKED_STYPE`), zlib level 9 of a JSON header ``[[key, dtype, nbytes], ...]``
followed by the buffers. `unpack_record` inflates it with a size cap.

Every decoding failure — a missing or unexpected key, a wrong dtype or stype, a
truncated buffer, padding bits set, a value count that disagrees with its mask, NaN or
Inf — raises `edgekd.wire.payload.PayloadError` with one line naming the array.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from edgekd.wire.payload import PayloadError, record_nbytes

RAW_STYPE = "edgekd.raw-le"  # raw little-endian bytes, shape from the reference state
PACKED_STYPE = "edgekd.zlib"  # a whole record, deflated (see `pack_record`)
PACKED_KEY = "edgekd::packed"
MASK_SUFFIX = "::mask"
VALUES_SUFFIX = "::values"
NIBBLES_SUFFIX = "::nibbles"
DCODES_SUFFIX = "::dcodes"
SCALE_SUFFIX = "::scale"
INT8_MAX = 127
INT4_MAX = 7
DELTA_BITS = (8, 4)

_FLOAT32 = np.dtype("<f4")
_INT8 = np.dtype("i1")
_UINT8 = np.dtype("u1")


# ---------------------------------------------------------------- quantization
def channel_scales(x: np.ndarray) -> np.ndarray:
    """Symmetric INT8 scales: per output channel (axis 0) for ≥ 2-D, one for ≤ 1-D."""
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    max_abs = np.abs(rows.astype(np.float64)).max(axis=1) if rows.size else np.zeros(len(rows))
    scales = np.where(max_abs > 0, max_abs / INT8_MAX, 1.0)
    return scales.astype(_FLOAT32)


def _channel_of(flat_index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Scale index of each flattened entry (0 everywhere for ≤ 1-D arrays)."""
    if len(shape) < 2:
        return np.zeros(flat_index.shape, dtype=np.intp)
    per_channel = int(np.prod(shape[1:]))
    return flat_index // max(per_channel, 1)


def _quantize(
    values: np.ndarray, scales: np.ndarray, channel: np.ndarray, limit: int = INT8_MAX
) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.rint(values.astype(np.float64) / scales[channel].astype(np.float64))
    return np.clip(np.nan_to_num(q), -limit, limit).astype(_INT8)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes in ``−7..7`` as two's-complement nibbles, two per byte, low nibble first."""
    nib = (np.asarray(q, dtype=np.int16) & 0xF).astype(_UINT8)
    if nib.size % 2:
        nib = np.append(nib, _UINT8.type(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(_UINT8)


def unpack_nibbles(packed: np.ndarray, n: int, key: str) -> np.ndarray:
    """Inverse of `pack_nibbles`; `PayloadError` on a set padding nibble or code −8."""
    both = np.empty(packed.size * 2, dtype=np.int16)
    both[0::2], both[1::2] = packed & 0xF, packed >> 4
    if both[n:].any():
        raise PayloadError(f"array '{key}' has its padding nibble set")
    codes = np.where(both[:n] >= 8, both[:n] - 16, both[:n])
    if np.any(codes == -8):
        raise PayloadError(f"array '{key}' holds code -8 (INT4 codes are -7..7)")
    return codes.astype(_INT8)


def _dequantize(q: np.ndarray, scales: np.ndarray, channel: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * scales[channel]).astype(np.float32)


# --------------------------------------------------------------------- arrays
def _raw(values: np.ndarray, dtype: np.dtype) -> Array:
    flat = np.ascontiguousarray(values, dtype=dtype.newbyteorder("<")).ravel()
    return Array(dtype=dtype.name, shape=(flat.size,), stype=RAW_STYPE, data=flat.tobytes())


def _read(record: ArrayRecord, key: str, dtype: np.dtype, count: int | None) -> np.ndarray:
    """The 1-D contents of ``record[key]``; ``count`` = expected entries (None: any)."""
    if key not in record:
        raise PayloadError(f"array '{key}' is missing")
    arr = record[key]
    if arr.stype != RAW_STYPE:
        raise PayloadError(f"array '{key}' has stype '{arr.stype}', expected '{RAW_STYPE}'")
    if arr.dtype != dtype.name:
        raise PayloadError(f"array '{key}' has dtype {arr.dtype}, expected {dtype.name}")
    nbytes = len(arr.data)
    if nbytes % dtype.itemsize:
        raise PayloadError(
            f"array '{key}' holds {nbytes} bytes, not a whole number of {dtype.name}"
        )
    n = nbytes // dtype.itemsize
    if count is not None and n != count:
        raise PayloadError(f"array '{key}' holds {n} entries, expected {count} (truncated?)")
    if tuple(arr.shape) != (n,):
        raise PayloadError(f"array '{key}' declares shape {tuple(arr.shape)} for {n} entries")
    values = np.frombuffer(arr.data, dtype=dtype.newbyteorder("<")).astype(dtype)
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise PayloadError(f"array '{key}' holds NaN or Inf")
    return values


def _check_names(record: ArrayRecord, expected: set[str]) -> None:
    unexpected = sorted(set(record.keys()) - expected)
    if unexpected:
        raise PayloadError(f"array '{unexpected[0]}' is not expected by the reference state")


def _is_float(x: np.ndarray) -> bool:
    return x.dtype.kind == "f"


# ---------------------------------------------------------------------- state
def encode_state(
    state: Mapping[str, np.ndarray],
    *,
    masks: Mapping[str, np.ndarray] | None = None,
    int8: bool = False,
    send_masks: bool = True,
) -> ArrayRecord:
    """Encode a model state; see the module docstring for the keys.

    ``masks`` (``True`` = kept) may cover any subset of the arrays; entries outside a
    mask are not sent and decode as 0. With ``int8`` every float array is quantized.
    ``send_masks=False`` leaves the ``::mask`` keys out: for a receiver that already
    holds the masks (a client replying to the server that made them, or a node that
    cached them), which then passes them to `decode_state`.
    """
    masks = masks or {}
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise ValueError(f"masks for arrays not in the state: {unknown}")
    record = ArrayRecord()
    for name, raw_value in state.items():
        value = np.asarray(raw_value)
        flat = value.ravel()
        index = np.arange(flat.size)
        if name in masks:
            mask = np.asarray(masks[name], dtype=bool)
            if mask.shape != value.shape:
                raise ValueError(f"mask '{name}' has shape {mask.shape}, array {value.shape}")
            if send_masks:
                record[name + MASK_SUFFIX] = _raw(np.packbits(mask.ravel()), _UINT8)
            index = np.flatnonzero(mask.ravel())
        kept = flat[index]
        if not _is_float(value):
            record[name + VALUES_SUFFIX] = _raw(kept, value.dtype)
        elif int8:
            scales = channel_scales(value)
            record[name + VALUES_SUFFIX] = _raw(
                _quantize(kept, scales, _channel_of(index, value.shape)), _INT8
            )
            record[name + SCALE_SUFFIX] = _raw(scales, _FLOAT32)
        else:
            record[name + VALUES_SUFFIX] = _raw(kept, _FLOAT32)
    return record


def decode_state(
    record: ArrayRecord,
    reference: Mapping[str, np.ndarray],
    *,
    known_masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[OrderedDict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(state, masks)`` from an `encode_state` record, shaped and typed as ``reference``.

    ``masks`` holds a boolean array for each array that was sent with one, or that
    ``known_masks`` covers when the record carries no mask for it (``send_masks=False``).
    """
    expected: set[str] = set()
    state: OrderedDict[str, np.ndarray] = OrderedDict()
    masks: dict[str, np.ndarray] = {}
    known = known_masks or {}
    for name, raw_ref in reference.items():
        ref = np.asarray(raw_ref)
        expected.add(name + VALUES_SUFFIX)
        index: np.ndarray | None = None
        if name + MASK_SUFFIX in record:
            expected.add(name + MASK_SUFFIX)
            mask = _unpack_mask(record, name + MASK_SUFFIX, ref.size)
            masks[name] = mask.reshape(ref.shape)
            index = np.flatnonzero(mask)
        elif name in known:
            mask = np.asarray(known[name], dtype=bool)
            if mask.shape != ref.shape:
                raise PayloadError(f"known mask '{name}' has shape {mask.shape}, not {ref.shape}")
            masks[name] = mask
            index = np.flatnonzero(mask.ravel())
        if _is_quantized(record, name):
            expected.add(name + SCALE_SUFFIX)
        out = np.zeros(ref.size, dtype=ref.dtype)
        out[slice(None) if index is None else index] = _decode_values(record, name, ref, index)
        state[name] = out.reshape(ref.shape)
    _check_names(record, expected)
    return state, masks


def _is_quantized(record: ArrayRecord, name: str) -> bool:
    key = name + VALUES_SUFFIX
    return key in record and record[key].dtype == _INT8.name


def _decode_values(
    record: ArrayRecord, name: str, ref: np.ndarray, index: np.ndarray | None
) -> np.ndarray:
    """The sent entries of ``name`` (all of them when ``index`` is None), dequantized."""
    key = name + VALUES_SUFFIX
    count = ref.size if index is None else index.size
    if not _is_float(ref):
        return _read(record, key, ref.dtype, count)
    if not _is_quantized(record, name):
        if key in record and record[key].dtype != _FLOAT32.name:
            raise PayloadError(
                f"array '{key}' has dtype {record[key].dtype}, expected int8 or float32"
            )
        return _read(record, key, _FLOAT32, count)
    scales = _read_scales(record, name + SCALE_SUFFIX, ref.shape)
    q = _read(record, key, _INT8, count)
    flat_index = np.arange(ref.size) if index is None else index
    return _dequantize(q, scales, _channel_of(flat_index, ref.shape))


def _unpack_mask(record: ArrayRecord, key: str, n: int) -> np.ndarray:
    packed = _read(record, key, _UINT8, (n + 7) // 8)
    bits = np.unpackbits(packed)
    if bits[n:].any():
        raise PayloadError(f"array '{key}' has padding bits set (not a mask of {n} entries)")
    return bits[:n].astype(bool)


def _read_scales(record: ArrayRecord, key: str, shape: tuple[int, ...]) -> np.ndarray:
    count = shape[0] if len(shape) >= 2 else 1
    scales = _read(record, key, _FLOAT32, count)
    if np.any(scales <= 0):
        raise PayloadError(f"array '{key}' holds a scale ≤ 0")
    return scales


# ------------------------------------------------------- lossless state delta
# What a node holds of an INT8 state: per float array, its flat INT8 codes (0 where
# pruned) and its per-channel scales.
Held = dict[str, tuple[np.ndarray, np.ndarray]]


def held_codes(
    state: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None = None
) -> Held:
    """The INT8 codes and scales `encode_state(int8=True)` sends for ``state``."""
    masks = masks or {}
    held: Held = {}
    for name, raw_value in state.items():
        value = np.asarray(raw_value)
        if not _is_float(value):
            continue
        index = _kept_index(masks.get(name), value.shape, name)
        flat_index = np.arange(value.size) if index is None else index
        scales = channel_scales(value)
        codes = np.zeros(value.size, dtype=_INT8)
        codes[flat_index] = _quantize(
            value.ravel()[flat_index], scales, _channel_of(flat_index, value.shape)
        )
        held[name] = (codes, scales)
    return held


def held_from_record(
    record: ArrayRecord, reference: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]
) -> Held:
    """The codes and scales of a decoded INT8 `encode_state` record (``masks`` as
    `decode_state` returned them)."""
    held: Held = {}
    for name, raw_ref in reference.items():
        ref = np.asarray(raw_ref)
        if not _is_float(ref) or not _is_quantized(record, name):
            continue
        index = _kept_index(masks.get(name), ref.shape, name)
        flat_index = np.arange(ref.size) if index is None else index
        codes = np.zeros(ref.size, dtype=_INT8)
        codes[flat_index] = _read(record, name + VALUES_SUFFIX, _INT8, flat_index.size)
        held[name] = (codes, _read_scales(record, name + SCALE_SUFFIX, ref.shape))
    return held


def encode_state_delta(
    state: Mapping[str, np.ndarray],
    base: Held,
    *,
    masks: Mapping[str, np.ndarray] | None = None,
    send_masks: bool = True,
) -> tuple[ArrayRecord, Held]:
    """``state`` in INT8 as the change of its codes from ``base``, and its own codes.

    Keys ``{name}::dcodes`` (int8: ``(q − q_base) mod 256`` at the kept entries),
    ``{name}::scale`` only where the scales differ from ``base``'s, and ``::mask`` as
    in `encode_state`. Non-float arrays travel as ``::values``.
    """
    masks = masks or {}
    held = held_codes(state, masks)
    record = ArrayRecord()
    for name, raw_value in state.items():
        value = np.asarray(raw_value)
        index = _kept_index(masks.get(name), value.shape, name)
        flat_index = np.arange(value.size) if index is None else index
        if name in masks and send_masks:
            record[name + MASK_SUFFIX] = _raw(np.packbits(np.asarray(masks[name]).ravel()), _UINT8)
        if not _is_float(value):
            record[name + VALUES_SUFFIX] = _raw(value.ravel()[flat_index], value.dtype)
            continue
        if name not in base or base[name][0].shape != (value.size,):
            raise ValueError(f"base codes do not cover '{name}' {value.shape}")
        codes, scales = held[name]
        old_codes, old_scales = base[name]
        change = codes[flat_index].astype(np.int16) - old_codes[flat_index].astype(np.int16)
        record[name + DCODES_SUFFIX] = _raw(((change + 128) % 256 - 128).astype(_INT8), _INT8)
        if old_scales.shape != scales.shape or not np.array_equal(old_scales, scales):
            record[name + SCALE_SUFFIX] = _raw(scales, _FLOAT32)
    return record, held


def decode_state_delta(
    record: ArrayRecord,
    reference: Mapping[str, np.ndarray],
    base: Held,
    *,
    known_masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[OrderedDict[str, np.ndarray], dict[str, np.ndarray], Held]:
    """``(state, masks, codes)`` from an `encode_state_delta` record against ``base``."""
    expected: set[str] = set()
    state: OrderedDict[str, np.ndarray] = OrderedDict()
    masks: dict[str, np.ndarray] = {}
    held: Held = {}
    known = known_masks or {}
    for name, raw_ref in reference.items():
        ref = np.asarray(raw_ref)
        index: np.ndarray | None = None
        if name + MASK_SUFFIX in record:
            expected.add(name + MASK_SUFFIX)
            masks[name] = _unpack_mask(record, name + MASK_SUFFIX, ref.size).reshape(ref.shape)
        elif name in known:
            masks[name] = np.asarray(known[name], dtype=bool)
            if masks[name].shape != ref.shape:
                raise PayloadError(f"known mask '{name}' has shape {masks[name].shape}")
        if name in masks:
            index = np.flatnonzero(masks[name].ravel())
        flat_index = np.arange(ref.size) if index is None else index
        out = np.zeros(ref.size, dtype=ref.dtype)
        if not _is_float(ref):
            expected.add(name + VALUES_SUFFIX)
            out[flat_index] = _read(record, name + VALUES_SUFFIX, ref.dtype, flat_index.size)
            state[name] = out.reshape(ref.shape)
            continue
        if name not in base or base[name][0].shape != (ref.size,):
            raise PayloadError(f"this node holds no codes for '{name}' {ref.shape}")
        old_codes, scales = base[name]
        expected.add(name + DCODES_SUFFIX)
        change = _read(record, name + DCODES_SUFFIX, _INT8, flat_index.size)
        summed = old_codes[flat_index].astype(np.int16) + change.astype(np.int16)
        kept = ((summed + 128) % 256 - 128).astype(_INT8)
        if np.any(kept == -128):
            raise PayloadError(f"array '{name}{DCODES_SUFFIX}' makes a code of -128")
        if name + SCALE_SUFFIX in record:
            expected.add(name + SCALE_SUFFIX)
            scales = _read_scales(record, name + SCALE_SUFFIX, ref.shape)
        codes = np.zeros(ref.size, dtype=_INT8)
        codes[flat_index] = kept
        out[flat_index] = _dequantize(kept, scales, _channel_of(flat_index, ref.shape))
        state[name] = out.reshape(ref.shape)
        held[name] = (codes, scales)
    _check_names(record, expected)
    return state, masks, held


# ---------------------------------------------------------------- entropy stage
def pack_record(record: ArrayRecord) -> ArrayRecord:
    """The whole record as one zlib-deflated ``edgekd::packed`` array."""
    header = json.dumps(
        [[key, arr.dtype, len(arr.data)] for key, arr in record.items()], separators=(",", ":")
    ).encode()
    blob = b"".join(
        [len(header).to_bytes(4, "little"), header] + [bytes(arr.data) for arr in record.values()]
    )
    data = zlib.compress(blob, 9)
    return ArrayRecord(
        {PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)}
    )


def is_packed(record: ArrayRecord) -> bool:
    return PACKED_KEY in record and record[PACKED_KEY].stype == PACKED_STYPE


def unpack_record(record: ArrayRecord, max_bytes: int) -> ArrayRecord:
    """Inverse of `pack_record`; refuses more than ``max_bytes`` inflated (a zip bomb) and
    anything that does not inflate or parse, with a `PayloadError`."""
    _check_names(record, {PACKED_KEY})
    packed = record[PACKED_KEY]
    inflater = zlib.decompressobj()
    try:
        blob = inflater.decompress(bytes(packed.data), max_bytes + 1)
    except zlib.error as exc:
        raise PayloadError(f"packed payload does not inflate: {exc}") from None
    if len(blob) > max_bytes or inflater.unconsumed_tail:
        raise PayloadError(f"packed payload inflates to more than {max_bytes} bytes")
    if not inflater.eof:
        raise PayloadError("packed payload is truncated")
    if inflater.unused_data:
        raise PayloadError("packed payload has trailing bytes")
    size = int.from_bytes(blob[:4], "little")
    entries = _array_entries(blob[4 : 4 + size], "packed payload")
    out, offset = ArrayRecord(), 4 + size
    for key, dtype, nbytes in entries:
        data = blob[offset : offset + nbytes]
        if len(data) != nbytes:
            raise PayloadError(f"packed payload: array '{key}' is truncated")
        count = nbytes // max(np.dtype(dtype).itemsize, 1)
        out[key] = Array(dtype=dtype, shape=(count,), stype=RAW_STYPE, data=data)
        offset += nbytes
    if offset != len(blob):
        raise PayloadError(f"packed payload: {len(blob) - offset} trailing bytes")
    return out


# A header lists a few dozen arrays; anything larger is not one of ours.
MAX_HEADER_BYTES = 1 << 16
# Elements a shape manifest may ask a node to allocate (1 GiB of float32).
MAX_MANIFEST_ELEMENTS = 1 << 28


def _json_header(raw: bytes | str, what: str) -> object:
    """Parsed JSON of at most `MAX_HEADER_BYTES`; `PayloadError` for anything else
    (json raises ValueError, RecursionError on deep nesting)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise PayloadError(f"{what}: header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"{what}: header does not parse: {type(exc).__name__}") from None


def _numeric_dtype(dtype: object, what: str) -> np.dtype:
    try:
        parsed = np.dtype(dtype)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise PayloadError(f"{what}: dtype {dtype!r} is not a numpy dtype") from None
    if parsed.kind not in "biuf" or parsed.itemsize == 0:
        raise PayloadError(f"{what}: dtype {dtype!r} is not numeric")
    return parsed


def _array_entries(raw: bytes | str, what: str) -> list[tuple[str, str, int]]:
    """``[[name, dtype, nbytes], ...]`` from a header, each field checked: a string, a
    numeric dtype, a non-negative int (not a bool, not ``Infinity``)."""
    parsed = _json_header(raw, what)
    if not isinstance(parsed, list):
        raise PayloadError(f"{what}: header is not a list of arrays")
    entries = []
    for entry in parsed:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise PayloadError(
                f"{what}: header entry {str(entry)[:60]} is not [name, dtype, bytes]"
            )
        key, dtype, nbytes = entry
        if not isinstance(key, str) or not isinstance(dtype, str):
            raise PayloadError(f"{what}: header entry {str(entry)[:60]} has a non-string name")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise PayloadError(f"{what}: array '{key}' claims {str(nbytes)[:30]} bytes")
        _numeric_dtype(dtype, f"{what}: array '{key}'")
        entries.append((key, dtype, nbytes))
    return entries


# ---------------------------------------------------------------------- delta
def encode_delta(
    new: Mapping[str, np.ndarray],
    old: Mapping[str, np.ndarray],
    *,
    error_feedback: Mapping[str, np.ndarray] | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
    bits: int = 8,
) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """INT8 (or INT4: ``bits=4``) update ``new − old`` (+ the residual
    ``error_feedback``), and the new residual.

    Keys ``{name}::values`` (int8; ``{name}::nibbles`` for INT4) and ``{name}::scale``
    (per channel ``max|Δ_c| / 127``; for INT4 one, ``max|Δ| / 7``). With ``masks`` (held by both
    sides: the server made them) only the kept entries travel, and the pruned ones
    decode to an exact 0 change. The residual is returned even without
    ``error_feedback``, so a client can start feeding it back; entries absent from
    ``error_feedback`` count as zero. Float arrays only.
    """
    if list(new) != list(old):
        raise ValueError("new and old states name different arrays")
    if bits not in DELTA_BITS:
        raise ValueError(f"delta bits must be one of {DELTA_BITS}, got {bits}")
    limit = INT8_MAX if bits == 8 else INT4_MAX
    masks = masks or {}
    record = ArrayRecord()
    residual: dict[str, np.ndarray] = {}
    for name, new_value in new.items():
        new_arr, old_arr = np.asarray(new_value), np.asarray(old[name])
        if not (_is_float(new_arr) and _is_float(old_arr)):
            raise ValueError(f"delta encoding needs float arrays; '{name}' is {new_arr.dtype}")
        if new_arr.shape != old_arr.shape:
            raise ValueError(f"'{name}': new shape {new_arr.shape} != old {old_arr.shape}")
        corrected = new_arr.astype(np.float32) - old_arr.astype(np.float32)
        if error_feedback is not None and name in error_feedback:
            corrected = corrected + np.asarray(error_feedback[name], dtype=np.float32)
        index = _kept_index(masks.get(name), corrected.shape, name)
        if index is not None:
            kept = np.zeros(corrected.size, dtype=bool)
            kept[index] = True
            corrected = np.where(kept.reshape(corrected.shape), corrected, np.float32(0))
        flat_index = np.arange(corrected.size) if index is None else index
        if bits == 8:
            scales = channel_scales(corrected)
            channel = _channel_of(flat_index, corrected.shape)
        else:  # one scale per array: its codes peak at 0 and deflate well
            scales = channel_scales(corrected.reshape(-1)) * np.float32(INT8_MAX / limit)
            channel = np.zeros(flat_index.shape, dtype=np.intp)
        q = _quantize(corrected.ravel()[flat_index], scales, channel, limit)
        if bits == 8:
            record[name + VALUES_SUFFIX] = _raw(q, _INT8)
        else:
            record[name + NIBBLES_SUFFIX] = _raw(pack_nibbles(q), _UINT8)
        record[name + SCALE_SUFFIX] = _raw(scales, _FLOAT32)
        dequantized = np.zeros(corrected.size, dtype=np.float32)
        dequantized[flat_index] = _dequantize(q, scales, channel)
        residual[name] = (corrected - dequantized.reshape(corrected.shape)).astype(np.float32)
    return record, residual


def decode_delta(
    record: ArrayRecord,
    old: Mapping[str, np.ndarray],
    *,
    masks: Mapping[str, np.ndarray] | None = None,
) -> OrderedDict[str, np.ndarray]:
    """``old + Q(Δ)``: the client's new state, in ``old``'s shapes and dtypes; with
    ``masks`` (the ones `encode_delta` was given) only kept entries change."""
    masks = masks or {}
    expected: set[str] = set()
    state: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, old_value in old.items():
        ref = np.asarray(old_value)
        if not _is_float(ref):
            raise PayloadError(f"array '{name}' is {ref.dtype}; deltas are float only")
        index = _kept_index(masks.get(name), ref.shape, name)
        flat_index = np.arange(ref.size) if index is None else index
        if name + NIBBLES_SUFFIX in record:
            key = name + NIBBLES_SUFFIX
            scales = _read_scales(record, name + SCALE_SUFFIX, (ref.size,))
            channel = np.zeros(flat_index.shape, dtype=np.intp)
            packed = _read(record, key, _UINT8, (flat_index.size + 1) // 2)
            q = unpack_nibbles(packed, flat_index.size, key)
        else:
            key = name + VALUES_SUFFIX
            scales = _read_scales(record, name + SCALE_SUFFIX, ref.shape)
            channel = _channel_of(flat_index, ref.shape)
            q = _read(record, key, _INT8, flat_index.size)
        expected.update((key, name + SCALE_SUFFIX))
        delta = np.zeros(ref.size, dtype=np.float32)
        delta[flat_index] = _dequantize(q, scales, channel)
        new_value = (ref.astype(np.float32) + delta.reshape(ref.shape)).astype(ref.dtype)
        if not np.all(np.isfinite(new_value)):
            raise PayloadError(f"array '{name}' is NaN or Inf after adding the delta")
        state[name] = new_value
    _check_names(record, expected)
    return state


def _kept_index(mask: np.ndarray | None, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"mask '{name}' has shape {mask.shape}, array {shape}")
    return np.flatnonzero(mask.ravel())


# ------------------------------------------------------------------- manifest
def shapes_manifest(state: Mapping[str, np.ndarray]) -> str:
    """``{name: [dtype, shape]}`` as compact JSON, for the round's ConfigRecord: a raw
    record carries 1-D buffers, so a node that has never seen this architecture (a
    filter-pruned or factorized student) learns the shapes from here."""
    return json.dumps(
        {name: [np.asarray(v).dtype.str, list(np.shape(v))] for name, v in state.items()},
        separators=(",", ":"),
    )


def reference_from_manifest(manifest: str) -> OrderedDict[str, np.ndarray]:
    """Zero arrays with the manifest's names, dtypes and shapes (for `decode_state`)."""
    entries = _json_header(manifest, "shape manifest")
    if not isinstance(entries, dict):
        raise PayloadError("shape manifest is not an object of {name: [dtype, shape]}")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    total = 0
    for name, entry in entries.items():
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            raise PayloadError(f"shape manifest: '{name}' is not [dtype, shape]")
        dtype, shape = entry
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise PayloadError(f"shape manifest: '{name}' has shape {str(shape)[:60]}")
        total += math.prod(shape)
        if total > MAX_MANIFEST_ELEMENTS:
            raise PayloadError(f"shape manifest asks for over {MAX_MANIFEST_ELEMENTS} elements")
        out[str(name)] = np.zeros(shape, dtype=_numeric_dtype(dtype, f"shape manifest: '{name}'"))
    return out


def is_encoded(record: ArrayRecord) -> bool:
    """Whether ``record`` was written by this codec (rather than plain Arrays)."""
    return any(arr.stype in (RAW_STYPE, PACKED_STYPE) for arr in record.values())


def inflate_limit(reference: Mapping[str, np.ndarray]) -> int:
    """The most bytes a packed payload for ``reference`` may inflate to: twice its FP32
    size (values, masks and scales fit well within) plus 64 KiB for the header."""
    return 2 * sum(np.asarray(v).nbytes for v in reference.values()) + 65536


# ------------------------------------------------------------------- artifact
ARTIFACT_MAGIC = b"EKD1"


def write_artifact(path: Path, record: ArrayRecord, state: Mapping[str, np.ndarray]) -> int:
    """Save an encoded student as one file and return its size in bytes.

    Layout: ``EKD1``, a little-endian uint32 header length, a JSON header (the shape
    manifest and, per array, key, dtype and byte count), then the raw buffers in
    order. Written to a temporary file and renamed, so a crash leaves no half file.
    """
    header = json.dumps(
        {
            "shapes": json.loads(shapes_manifest(state)),
            "arrays": [[key, arr.dtype, len(arr.data)] for key, arr in record.items()],
        },
        separators=(",", ":"),
    ).encode()
    blob = b"".join(
        [ARTIFACT_MAGIC, len(header).to_bytes(4, "little"), header]
        + [bytes(arr.data) for arr in record.values()]
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return len(blob)


def read_artifact(path: Path) -> tuple[OrderedDict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(state, masks)`` from a `write_artifact` file; `PayloadError` names what is wrong."""
    blob = path.read_bytes()
    if blob[:4] != ARTIFACT_MAGIC or len(blob) < 8:
        raise PayloadError(f"{path} is not an edgekd student artifact (bad magic)")
    size = int.from_bytes(blob[4:8], "little")
    header = _json_header(blob[8 : 8 + size], str(path))
    if not isinstance(header, dict) or not {"shapes", "arrays"} <= set(header):
        raise PayloadError(f"{path}: header lacks 'shapes' and 'arrays'")
    reference = reference_from_manifest(json.dumps(header["shapes"]))
    entries = _array_entries(json.dumps(header["arrays"]), str(path))
    record, offset = ArrayRecord(), 8 + size
    for key, dtype, nbytes in entries:
        data = blob[offset : offset + nbytes]
        if len(data) != nbytes:
            raise PayloadError(f"{path}: array '{key}' is truncated")
        count = nbytes // max(np.dtype(dtype).itemsize, 1)
        record[key] = Array(dtype=dtype, shape=(count,), stype=RAW_STYPE, data=data)
        offset += nbytes
    if offset != len(blob):
        raise PayloadError(f"{path}: {len(blob) - offset} trailing bytes")
    return decode_state(record, reference)


def encoded_nbytes(record: ArrayRecord) -> int:
    """Bytes of array data on the wire: ``Σ len(Array.data)``."""
    return record_nbytes(record)
