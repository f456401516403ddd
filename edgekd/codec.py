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

from collections import OrderedDict
from collections.abc import Mapping

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
) -> ArrayRecord:
    """Encode a model state; see the module docstring for the keys.

    ``masks`` (``True`` = kept) may cover any subset of the arrays; entries outside a
    mask are not sent and decode as 0. With ``int8`` every float array is quantized.
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
    record: ArrayRecord, reference: Mapping[str, np.ndarray]
) -> tuple[OrderedDict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(state, masks)`` from an `encode_state` record, shaped and typed as ``reference``.

    ``masks`` holds a boolean array for each array that was sent with one.
    """
    expected: set[str] = set()
    state: OrderedDict[str, np.ndarray] = OrderedDict()
    masks: dict[str, np.ndarray] = {}
    for name, raw_ref in reference.items():
        ref = np.asarray(raw_ref)
        expected.add(name + VALUES_SUFFIX)
        index: np.ndarray | None = None
        if name + MASK_SUFFIX in record:
            expected.add(name + MASK_SUFFIX)
            mask = _unpack_mask(record, name + MASK_SUFFIX, ref.size)
            masks[name] = mask.reshape(ref.shape)
            index = np.flatnonzero(mask)
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
) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """INT8 update ``new − old`` (+ the residual ``error_feedback``), and the new residual.

    Keys ``{name}::values`` (int8, every entry) and ``{name}::scale``. The residual is
    returned even without ``error_feedback``, so a client can start feeding it back;
    entries absent from ``error_feedback`` count as zero. Float arrays only.
    """
    if list(new) != list(old):
        raise ValueError("new and old states name different arrays")
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
        scales = channel_scales(corrected)
        channel = _channel_of(np.arange(corrected.size), corrected.shape)
        q = _quantize(corrected.ravel(), scales, channel)
        record[name + VALUES_SUFFIX] = _raw(q, _INT8)
        record[name + SCALE_SUFFIX] = _raw(scales, _FLOAT32)
        dequantized = _dequantize(q, scales, channel).reshape(corrected.shape)
        residual[name] = (corrected - dequantized).astype(np.float32)
    return record, residual


def decode_delta(
    record: ArrayRecord, old: Mapping[str, np.ndarray]
) -> OrderedDict[str, np.ndarray]:
    """``old + Q(Δ)``: the client's new state, in ``old``'s shapes and dtypes."""
    expected: set[str] = set()
    state: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, old_value in old.items():
        ref = np.asarray(old_value)
        if not _is_float(ref):
            raise PayloadError(f"array '{name}' is {ref.dtype}; deltas are float only")
        expected.update((name + VALUES_SUFFIX, name + SCALE_SUFFIX))
        scales = _read_scales(record, name + SCALE_SUFFIX, ref.shape)
        q = _read(record, name + VALUES_SUFFIX, _INT8, ref.size)
        delta = _dequantize(q, scales, _channel_of(np.arange(ref.size), ref.shape))
        new_value = (ref.astype(np.float32) + delta.reshape(ref.shape)).astype(ref.dtype)
        if not np.all(np.isfinite(new_value)):
            raise PayloadError(f"array '{name}' is NaN or Inf after adding the delta")
        state[name] = new_value
    _check_names(record, expected)
    return state


def encoded_nbytes(record: ArrayRecord) -> int:
    """Bytes of array data on the wire: ``Σ len(Array.data)``."""
    return record_nbytes(record)
