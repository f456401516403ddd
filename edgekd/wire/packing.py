"""The entropy stage (`pack_record` / `unpack_record`: a whole record zlib-deflated),
total parsing of JSON headers, and the shape manifest a node decodes against."""

from __future__ import annotations

import json
import math
import zlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from edgekd.wire.payload import PayloadError
from edgekd.wire.raw import PACKED_KEY, PACKED_STYPE, RAW_STYPE, check_names


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
    check_names(record, {PACKED_KEY})
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
    entries = array_entries(blob[4 : 4 + size], "packed payload")
    return raw_arrays(blob, 4 + size, entries, "packed payload")


def raw_arrays(
    blob: bytes, offset: int, entries: list[tuple[str, str, int]], what: str
) -> ArrayRecord:
    """The raw arrays ``entries`` (key, dtype, byte count) laid end to end in ``blob``
    from ``offset`` on, which they must fill exactly; `PayloadError` names ``what``."""
    out = ArrayRecord()
    for key, dtype, nbytes in entries:
        data = blob[offset : offset + nbytes]
        if len(data) != nbytes:
            raise PayloadError(f"{what}: array '{key}' is truncated")
        count = nbytes // max(np.dtype(dtype).itemsize, 1)
        out[key] = Array(dtype=dtype, shape=(count,), stype=RAW_STYPE, data=data)
        offset += nbytes
    if offset != len(blob):
        raise PayloadError(f"{what}: {len(blob) - offset} trailing bytes")
    return out


# A header lists a few dozen arrays; anything larger is not one of ours.
MAX_HEADER_BYTES = 1 << 16
# Elements a shape manifest may ask a node to allocate (1 GiB of float32).
MAX_MANIFEST_ELEMENTS = 1 << 28


def json_header(raw: bytes | str, what: str) -> object:
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


def array_entries(raw: bytes | str, what: str) -> list[tuple[str, str, int]]:
    """``[[name, dtype, nbytes], ...]`` from a header, each field checked: a string, a
    numeric dtype, a non-negative int (not a bool, not ``Infinity``)."""
    parsed = json_header(raw, what)
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
    entries = json_header(manifest, "shape manifest")
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
