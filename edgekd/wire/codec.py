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

This module is the public facade; the code lives in `edgekd.wire` by concept:
`edgekd.wire.raw` (keys, stypes, raw buffers), `edgekd.wire.quantized` (INT8, nibbles,
masks, `encode_state`, held codes), `edgekd.wire.delta` (state and update deltas),
`edgekd.wire.packing` (entropy stage, headers, shape manifest) and
`edgekd.wire.artifact` (the student file).
"""

from __future__ import annotations

from edgekd.wire.artifact import ARTIFACT_MAGIC, encoded_nbytes, read_artifact, write_artifact
from edgekd.wire.delta import decode_delta, decode_state_delta, encode_delta, encode_state_delta
from edgekd.wire.packing import (
    MAX_HEADER_BYTES,
    MAX_MANIFEST_ELEMENTS,
    inflate_limit,
    is_encoded,
    is_packed,
    pack_record,
    reference_from_manifest,
    shapes_manifest,
    unpack_record,
)
from edgekd.wire.quantized import (
    Held,
    channel_scales,
    decode_state,
    encode_state,
    held_codes,
    held_from_record,
    pack_nibbles,
    unpack_nibbles,
)
from edgekd.wire.raw import (
    DCODES_SUFFIX,
    DELTA_BITS,
    INT4_MAX,
    INT8_MAX,
    MASK_SUFFIX,
    NIBBLES_SUFFIX,
    PACKED_KEY,
    PACKED_STYPE,
    RAW_STYPE,
    SCALE_SUFFIX,
    VALUES_SUFFIX,
)

__all__ = [
    "ARTIFACT_MAGIC",
    "DCODES_SUFFIX",
    "DELTA_BITS",
    "INT4_MAX",
    "INT8_MAX",
    "MASK_SUFFIX",
    "MAX_HEADER_BYTES",
    "MAX_MANIFEST_ELEMENTS",
    "NIBBLES_SUFFIX",
    "PACKED_KEY",
    "PACKED_STYPE",
    "RAW_STYPE",
    "SCALE_SUFFIX",
    "VALUES_SUFFIX",
    "Held",
    "channel_scales",
    "decode_delta",
    "decode_state",
    "decode_state_delta",
    "encode_delta",
    "encode_state",
    "encode_state_delta",
    "encoded_nbytes",
    "held_codes",
    "held_from_record",
    "inflate_limit",
    "is_encoded",
    "is_packed",
    "pack_nibbles",
    "pack_record",
    "read_artifact",
    "reference_from_manifest",
    "shapes_manifest",
    "unpack_nibbles",
    "unpack_record",
    "write_artifact",
]
