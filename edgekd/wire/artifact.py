"""An encoded student as one file: ``EKD1``, a JSON header, the raw buffers."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from edgekd.wire.packing import (
    array_entries,
    json_header,
    raw_arrays,
    reference_from_manifest,
    shapes_manifest,
)
from edgekd.wire.payload import PayloadError, record_nbytes
from edgekd.wire.quantized import decode_state

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
    header = json_header(blob[8 : 8 + size], str(path))
    if not isinstance(header, dict) or not {"shapes", "arrays"} <= set(header):
        raise PayloadError(f"{path}: header lacks 'shapes' and 'arrays'")
    reference = reference_from_manifest(json.dumps(header["shapes"]))
    entries = array_entries(json.dumps(header["arrays"]), str(path))
    return decode_state(raw_arrays(blob, 8 + size, entries, str(path)), reference)


def encoded_nbytes(record: ArrayRecord) -> int:
    """Bytes of array data on the wire: ``Σ len(Array.data)``."""
    return record_nbytes(record)
