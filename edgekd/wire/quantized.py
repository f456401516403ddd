"""INT8 states: per-channel symmetric quantization, INT4 nibbles, sparse masks as
packed bits, `encode_state` / `decode_state`, and the INT8 codes a node holds
(`held_codes`, `held_from_record`) for the lossless state delta."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord

from edgekd.wire.payload import PayloadError
from edgekd.wire.raw import (
    FLOAT32,
    INT8,
    INT8_MAX,
    MASK_SUFFIX,
    SCALE_SUFFIX,
    UINT8,
    VALUES_SUFFIX,
    check_names,
    is_float,
    raw_array,
    read_array,
)


# ---------------------------------------------------------------- quantization
def channel_scales(x: np.ndarray) -> np.ndarray:
    """Symmetric INT8 scales: per output channel (axis 0) for ≥ 2-D, one for ≤ 1-D."""
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    max_abs = np.abs(rows.astype(np.float64)).max(axis=1) if rows.size else np.zeros(len(rows))
    scales = np.where(max_abs > 0, max_abs / INT8_MAX, 1.0)
    return scales.astype(FLOAT32)


def channel_of(flat_index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Scale index of each flattened entry (0 everywhere for ≤ 1-D arrays)."""
    if len(shape) < 2:
        return np.zeros(flat_index.shape, dtype=np.intp)
    per_channel = int(np.prod(shape[1:]))
    return flat_index // max(per_channel, 1)


def quantize(
    values: np.ndarray, scales: np.ndarray, channel: np.ndarray, limit: int = INT8_MAX
) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.rint(values.astype(np.float64) / scales[channel].astype(np.float64))
    return np.clip(np.nan_to_num(q), -limit, limit).astype(INT8)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes in ``−7..7`` as two's-complement nibbles, two per byte, low nibble first."""
    nib = (np.asarray(q, dtype=np.int16) & 0xF).astype(UINT8)
    if nib.size % 2:
        nib = np.append(nib, UINT8.type(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(UINT8)


def unpack_nibbles(packed: np.ndarray, n: int, key: str) -> np.ndarray:
    """Inverse of `pack_nibbles`; `PayloadError` on a set padding nibble or code −8."""
    both = np.empty(packed.size * 2, dtype=np.int16)
    both[0::2], both[1::2] = packed & 0xF, packed >> 4
    if both[n:].any():
        raise PayloadError(f"array '{key}' has its padding nibble set")
    codes = np.where(both[:n] >= 8, both[:n] - 16, both[:n])
    if np.any(codes == -8):
        raise PayloadError(f"array '{key}' holds code -8 (INT4 codes are -7..7)")
    return codes.astype(INT8)


def dequantize(q: np.ndarray, scales: np.ndarray, channel: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * scales[channel]).astype(np.float32)


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
                record[name + MASK_SUFFIX] = raw_array(np.packbits(mask.ravel()), UINT8)
            index = np.flatnonzero(mask.ravel())
        kept = flat[index]
        if not is_float(value):
            record[name + VALUES_SUFFIX] = raw_array(kept, value.dtype)
        elif int8:
            scales = channel_scales(value)
            record[name + VALUES_SUFFIX] = raw_array(
                quantize(kept, scales, channel_of(index, value.shape)), INT8
            )
            record[name + SCALE_SUFFIX] = raw_array(scales, FLOAT32)
        else:
            record[name + VALUES_SUFFIX] = raw_array(kept, FLOAT32)
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
            mask = unpack_mask(record, name + MASK_SUFFIX, ref.size)
            masks[name] = mask.reshape(ref.shape)
            index = np.flatnonzero(mask)
        elif name in known:
            mask = np.asarray(known[name], dtype=bool)
            if mask.shape != ref.shape:
                raise PayloadError(f"known mask '{name}' has shape {mask.shape}, not {ref.shape}")
            masks[name] = mask
            index = np.flatnonzero(mask.ravel())
        if is_quantized(record, name):
            expected.add(name + SCALE_SUFFIX)
        out = np.zeros(ref.size, dtype=ref.dtype)
        out[slice(None) if index is None else index] = _decode_values(record, name, ref, index)
        state[name] = out.reshape(ref.shape)
    check_names(record, expected)
    return state, masks


def is_quantized(record: ArrayRecord, name: str) -> bool:
    key = name + VALUES_SUFFIX
    return key in record and record[key].dtype == INT8.name


def _decode_values(
    record: ArrayRecord, name: str, ref: np.ndarray, index: np.ndarray | None
) -> np.ndarray:
    """The sent entries of ``name`` (all of them when ``index`` is None), dequantized."""
    key = name + VALUES_SUFFIX
    count = ref.size if index is None else index.size
    if not is_float(ref):
        return read_array(record, key, ref.dtype, count)
    if not is_quantized(record, name):
        if key in record and record[key].dtype != FLOAT32.name:
            raise PayloadError(
                f"array '{key}' has dtype {record[key].dtype}, expected int8 or float32"
            )
        return read_array(record, key, FLOAT32, count)
    scales = read_scales(record, name + SCALE_SUFFIX, ref.shape)
    q = read_array(record, key, INT8, count)
    flat_index = np.arange(ref.size) if index is None else index
    return dequantize(q, scales, channel_of(flat_index, ref.shape))


def unpack_mask(record: ArrayRecord, key: str, n: int) -> np.ndarray:
    packed = read_array(record, key, UINT8, (n + 7) // 8)
    bits = np.unpackbits(packed)
    if bits[n:].any():
        raise PayloadError(f"array '{key}' has padding bits set (not a mask of {n} entries)")
    return bits[:n].astype(bool)


def read_scales(record: ArrayRecord, key: str, shape: tuple[int, ...]) -> np.ndarray:
    count = shape[0] if len(shape) >= 2 else 1
    scales = read_array(record, key, FLOAT32, count)
    if np.any(scales <= 0):
        raise PayloadError(f"array '{key}' holds a scale ≤ 0")
    return scales


# ---------------------------------------------------------------- held codes
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
        if not is_float(value):
            continue
        index = kept_index(masks.get(name), value.shape, name)
        flat_index = np.arange(value.size) if index is None else index
        scales = channel_scales(value)
        codes = np.zeros(value.size, dtype=INT8)
        codes[flat_index] = quantize(
            value.ravel()[flat_index], scales, channel_of(flat_index, value.shape)
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
        if not is_float(ref) or not is_quantized(record, name):
            continue
        index = kept_index(masks.get(name), ref.shape, name)
        flat_index = np.arange(ref.size) if index is None else index
        codes = np.zeros(ref.size, dtype=INT8)
        codes[flat_index] = read_array(record, name + VALUES_SUFFIX, INT8, flat_index.size)
        held[name] = (codes, read_scales(record, name + SCALE_SUFFIX, ref.shape))
    return held


def kept_index(mask: np.ndarray | None, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"mask '{name}' has shape {mask.shape}, array {shape}")
    return np.flatnonzero(mask.ravel())
