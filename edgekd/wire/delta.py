"""Deltas: `encode_state_delta` (lossless downlink, the change of held INT8 codes) and
`encode_delta` (INT8 / INT4 update ``new − old`` with error feedback), and their decoders."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord

from edgekd.wire.payload import PayloadError
from edgekd.wire.quantized import (
    Held,
    channel_of,
    channel_scales,
    dequantize,
    held_codes,
    kept_index,
    pack_nibbles,
    quantize,
    read_scales,
    unpack_mask,
    unpack_nibbles,
)
from edgekd.wire.raw import (
    DCODES_SUFFIX,
    DELTA_BITS,
    FLOAT32,
    INT4_MAX,
    INT8,
    INT8_MAX,
    MASK_SUFFIX,
    NIBBLES_SUFFIX,
    SCALE_SUFFIX,
    UINT8,
    VALUES_SUFFIX,
    check_names,
    is_float,
    raw_array,
    read_array,
)


# ------------------------------------------------------- lossless state delta
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
        index = kept_index(masks.get(name), value.shape, name)
        flat_index = np.arange(value.size) if index is None else index
        if name in masks and send_masks:
            record[name + MASK_SUFFIX] = raw_array(
                np.packbits(np.asarray(masks[name]).ravel()), UINT8
            )
        if not is_float(value):
            record[name + VALUES_SUFFIX] = raw_array(value.ravel()[flat_index], value.dtype)
            continue
        if name not in base or base[name][0].shape != (value.size,):
            raise ValueError(f"base codes do not cover '{name}' {value.shape}")
        codes, scales = held[name]
        old_codes, old_scales = base[name]
        change = codes[flat_index].astype(np.int16) - old_codes[flat_index].astype(np.int16)
        record[name + DCODES_SUFFIX] = raw_array(((change + 128) % 256 - 128).astype(INT8), INT8)
        if old_scales.shape != scales.shape or not np.array_equal(old_scales, scales):
            record[name + SCALE_SUFFIX] = raw_array(scales, FLOAT32)
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
            masks[name] = unpack_mask(record, name + MASK_SUFFIX, ref.size).reshape(ref.shape)
        elif name in known:
            masks[name] = np.asarray(known[name], dtype=bool)
            if masks[name].shape != ref.shape:
                raise PayloadError(f"known mask '{name}' has shape {masks[name].shape}")
        if name in masks:
            index = np.flatnonzero(masks[name].ravel())
        flat_index = np.arange(ref.size) if index is None else index
        out = np.zeros(ref.size, dtype=ref.dtype)
        if not is_float(ref):
            expected.add(name + VALUES_SUFFIX)
            out[flat_index] = read_array(record, name + VALUES_SUFFIX, ref.dtype, flat_index.size)
            state[name] = out.reshape(ref.shape)
            continue
        if name not in base or base[name][0].shape != (ref.size,):
            raise PayloadError(f"this node holds no codes for '{name}' {ref.shape}")
        old_codes, scales = base[name]
        expected.add(name + DCODES_SUFFIX)
        change = read_array(record, name + DCODES_SUFFIX, INT8, flat_index.size)
        summed = old_codes[flat_index].astype(np.int16) + change.astype(np.int16)
        kept = ((summed + 128) % 256 - 128).astype(INT8)
        if np.any(kept == -128):
            raise PayloadError(f"array '{name}{DCODES_SUFFIX}' makes a code of -128")
        if name + SCALE_SUFFIX in record:
            expected.add(name + SCALE_SUFFIX)
            scales = read_scales(record, name + SCALE_SUFFIX, ref.shape)
        codes = np.zeros(ref.size, dtype=INT8)
        codes[flat_index] = kept
        out[flat_index] = dequantize(kept, scales, channel_of(flat_index, ref.shape))
        state[name] = out.reshape(ref.shape)
        held[name] = (codes, scales)
    check_names(record, expected)
    return state, masks, held


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
        if not (is_float(new_arr) and is_float(old_arr)):
            raise ValueError(f"delta encoding needs float arrays; '{name}' is {new_arr.dtype}")
        if new_arr.shape != old_arr.shape:
            raise ValueError(f"'{name}': new shape {new_arr.shape} != old {old_arr.shape}")
        corrected = new_arr.astype(np.float32) - old_arr.astype(np.float32)
        if error_feedback is not None and name in error_feedback:
            corrected = corrected + np.asarray(error_feedback[name], dtype=np.float32)
        index = kept_index(masks.get(name), corrected.shape, name)
        if index is not None:
            kept = np.zeros(corrected.size, dtype=bool)
            kept[index] = True
            corrected = np.where(kept.reshape(corrected.shape), corrected, np.float32(0))
        flat_index = np.arange(corrected.size) if index is None else index
        if bits == 8:
            scales = channel_scales(corrected)
            channel = channel_of(flat_index, corrected.shape)
        else:  # one scale per array: its codes peak at 0 and deflate well
            scales = channel_scales(corrected.reshape(-1)) * np.float32(INT8_MAX / limit)
            channel = np.zeros(flat_index.shape, dtype=np.intp)
        q = quantize(corrected.ravel()[flat_index], scales, channel, limit)
        if bits == 8:
            record[name + VALUES_SUFFIX] = raw_array(q, INT8)
        else:
            record[name + NIBBLES_SUFFIX] = raw_array(pack_nibbles(q), UINT8)
        record[name + SCALE_SUFFIX] = raw_array(scales, FLOAT32)
        dequantized = np.zeros(corrected.size, dtype=np.float32)
        dequantized[flat_index] = dequantize(q, scales, channel)
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
        if not is_float(ref):
            raise PayloadError(f"array '{name}' is {ref.dtype}; deltas are float only")
        index = kept_index(masks.get(name), ref.shape, name)
        flat_index = np.arange(ref.size) if index is None else index
        if name + NIBBLES_SUFFIX in record:
            key = name + NIBBLES_SUFFIX
            scales = read_scales(record, name + SCALE_SUFFIX, (ref.size,))
            channel = np.zeros(flat_index.shape, dtype=np.intp)
            packed = read_array(record, key, UINT8, (flat_index.size + 1) // 2)
            q = unpack_nibbles(packed, flat_index.size, key)
        else:
            key = name + VALUES_SUFFIX
            scales = read_scales(record, name + SCALE_SUFFIX, ref.shape)
            channel = channel_of(flat_index, ref.shape)
            q = read_array(record, key, INT8, flat_index.size)
        expected.update((key, name + SCALE_SUFFIX))
        delta = np.zeros(ref.size, dtype=np.float32)
        delta[flat_index] = dequantize(q, scales, channel)
        new_value = (ref.astype(np.float32) + delta.reshape(ref.shape)).astype(ref.dtype)
        if not np.all(np.isfinite(new_value)):
            raise PayloadError(f"array '{name}' is NaN or Inf after adding the delta")
        state[name] = new_value
    check_names(record, expected)
    return state
