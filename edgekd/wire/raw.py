"""The codec's vocabulary: record keys, stypes, INT8/INT4 limits, and the raw
little-endian `Array` buffers every codec record is made of (`raw_array` writes one,
`read_array` reads one back with every check that can fail on the wire)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from edgekd.wire.payload import PayloadError

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

FLOAT32 = np.dtype("<f4")
INT8 = np.dtype("i1")
UINT8 = np.dtype("u1")


def raw_array(values: np.ndarray, dtype: np.dtype) -> Array:
    flat = np.ascontiguousarray(values, dtype=dtype.newbyteorder("<")).ravel()
    return Array(dtype=dtype.name, shape=(flat.size,), stype=RAW_STYPE, data=flat.tobytes())


def read_array(record: ArrayRecord, key: str, dtype: np.dtype, count: int | None) -> np.ndarray:
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


def check_names(record: ArrayRecord, expected: set[str]) -> None:
    unexpected = sorted(set(record.keys()) - expected)
    if unexpected:
        raise PayloadError(f"array '{unexpected[0]}' is not expected by the reference state")


def is_float(x: np.ndarray) -> bool:
    return x.dtype.kind == "f"
