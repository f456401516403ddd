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

`encode_delta` sends ``new − old`` in INT8 (per-channel scales as above, no masks) with
optional error feedback (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD"): the residual ``e`` left over by the last quantization is
added before quantizing, ``c = Δ + e``, and the new residual is ``e' = c − Q(c)``, so
quantization error is delayed, never lost.

Every decoding failure — a missing or unexpected key, a wrong dtype or stype, a
truncated buffer, padding bits set, a value count that disagrees with its mask, NaN or
Inf — raises `edgekd.payload.PayloadError` with one line naming the array.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from edgekd.payload import PayloadError, record_nbytes

RAW_STYPE = "edgekd.raw-le"  # raw little-endian bytes, shape from the reference state
MASK_SUFFIX = "::mask"
VALUES_SUFFIX = "::values"
SCALE_SUFFIX = "::scale"
INT8_MAX = 127

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


def _quantize(values: np.ndarray, scales: np.ndarray, channel: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.rint(values.astype(np.float64) / scales[channel].astype(np.float64))
    return np.clip(np.nan_to_num(q), -INT8_MAX, INT8_MAX).astype(_INT8)


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


# ---------------------------------------------------------------------- delta
def encode_delta(
    new: Mapping[str, np.ndarray],
    old: Mapping[str, np.ndarray],
    *,
    error_feedback: Mapping[str, np.ndarray] | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """INT8 update ``new − old`` (+ the residual ``error_feedback``), and the new residual.

    Keys ``{name}::values`` (int8) and ``{name}::scale``. With ``masks`` (held by both
    sides: the server made them) only the kept entries travel, and the pruned ones
    decode to an exact 0 change. The residual is returned even without
    ``error_feedback``, so a client can start feeding it back; entries absent from
    ``error_feedback`` count as zero. Float arrays only.
    """
    if list(new) != list(old):
        raise ValueError("new and old states name different arrays")
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
        scales = channel_scales(corrected)
        flat_index = np.arange(corrected.size) if index is None else index
        channel = _channel_of(flat_index, corrected.shape)
        q = _quantize(corrected.ravel()[flat_index], scales, channel)
        record[name + VALUES_SUFFIX] = _raw(q, _INT8)
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
        expected.update((name + VALUES_SUFFIX, name + SCALE_SUFFIX))
        index = _kept_index(masks.get(name), ref.shape, name)
        flat_index = np.arange(ref.size) if index is None else index
        scales = _read_scales(record, name + SCALE_SUFFIX, ref.shape)
        q = _read(record, name + VALUES_SUFFIX, _INT8, flat_index.size)
        delta = np.zeros(ref.size, dtype=np.float32)
        delta[flat_index] = _dequantize(q, scales, _channel_of(flat_index, ref.shape))
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
    try:
        entries = json.loads(manifest)
        return OrderedDict(
            (str(name), np.zeros([int(d) for d in shape], dtype=np.dtype(dtype)))
            for name, (dtype, shape) in entries.items()
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise PayloadError(f"shape manifest does not parse: {exc}") from None


def is_encoded(record: ArrayRecord) -> bool:
    """Whether ``record`` was written by this codec (rather than plain Arrays)."""
    return any(arr.stype == RAW_STYPE for arr in record.values())


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
    try:
        header = json.loads(blob[8 : 8 + size])
        reference = reference_from_manifest(json.dumps(header["shapes"]))
        entries = [(str(k), str(d), int(n)) for k, d, n in header["arrays"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise PayloadError(f"{path}: header does not parse: {exc}") from None
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
