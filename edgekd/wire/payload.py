"""Conversion between model state (name → numpy array) and Flower's ArrayRecord.

Torch-free on purpose: onnxruntime and LiteRT clients use it too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from edgekd.core.errors import EdgeKDError


class PayloadError(EdgeKDError, ValueError):
    """An update does not decode, has the wrong shapes or dtypes, or holds NaN/Inf."""


def state_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict((name, Array(np.ascontiguousarray(v))) for name, v in state.items())
    )


def record_to_state(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((name, arr.numpy()) for name, arr in record.items())


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of array data the record carries on the wire (headers excluded)."""
    return sum(len(arr.data) for arr in record.values())


def check_update(record: ArrayRecord, reference: Mapping[str, np.ndarray]) -> None:
    """Reject an update whose names, shapes or dtypes differ from ``reference``, or
    that holds NaN/Inf, with a `PayloadError` naming the first offending array."""
    names = list(record.keys())
    if names != list(reference.keys()):
        missing = sorted(set(reference) - set(names))
        extra = sorted(set(names) - set(reference))
        raise PayloadError(f"array names differ (missing {missing}, unexpected {extra})")
    for name, arr in record.items():
        try:
            value = arr.numpy()
        except Exception as exc:  # noqa: BLE001 - any decode failure rejects the update
            raise PayloadError(f"array '{name}' does not decode: {exc}") from None
        ref = reference[name]
        if value.shape != ref.shape:
            raise PayloadError(f"array '{name}' has shape {value.shape}, expected {ref.shape}")
        if value.dtype != ref.dtype:
            raise PayloadError(f"array '{name}' has dtype {value.dtype}, expected {ref.dtype}")
        if not np.all(np.isfinite(value)):
            raise PayloadError(f"array '{name}' holds NaN or Inf")
