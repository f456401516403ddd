"""ClientApp mod that speaks the payload codec, so the handlers see plain arrays.

Flower mods are middleware (``mod(msg, context, call_next)``). This one, on the way
in, decodes the student from `edgekd.wire.codec` (shape manifest from the config; INT8
values dequantized; masks unpacked, or taken from this node's cache when the server
knows the node already holds that mask version) and hands the masks to the handler
as the ``R.MASKS`` record. On the way out it encodes the trained student the way the
server asked (``compression.upload``): FP32 kept values, or an INT8 delta against the
state it received, optionally with error feedback whose residual stays on the node
(``context.state``). Numpy only: onnxruntime and LiteRT nodes use it too.

With downlink deltas the node keeps the INT8 codes of the last state it decoded
(``context.state``) and rebuilds the next one from the change of its codes; a delta
against a state it does not hold fails the message with a `PayloadError`, and the
server sends the whole state next time. Packed (zlib) payloads are inflated first, and
the reply is packed when the server asks for it (``compression.entropy``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from edgekd.core import records as R
from edgekd.wire.codec import (
    MASK_SUFFIX,
    Held,
    decode_state,
    decode_state_delta,
    encode_delta,
    encode_state,
    held_from_record,
    inflate_limit,
    is_encoded,
    is_packed,
    pack_record,
    reference_from_manifest,
    unpack_record,
)
from edgekd.wire.payload import PayloadError, record_to_state, state_to_record

_MASKS_STATE = "edgekd.masks"  # context.state keys: the cached masks and their version
_MASKS_VERSION = "edgekd.masks-version"
_RESIDUAL_STATE = "edgekd.residual"  # error-feedback residual of the last upload
_HELD_STATE = "edgekd.held-codes"  # INT8 codes + scales of the last state decoded
_HELD_VERSION = "edgekd.held-version"
_CODES, _SCALES = "::codes", "::scales"


def payload_codec_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if not msg.has_content():
        return call_next(msg, context)
    record = msg.content.array_records.get(R.ARRAYS)
    if record is None or not is_encoded(record):
        return call_next(msg, context)
    config = msg.content.config_records.get(R.CONFIG, ConfigRecord())
    reference = reference_from_manifest(str(config.get(R.SHAPES, "{}")))
    if is_packed(record):
        record = unpack_record(record, inflate_limit(reference))
    version = str(config.get(R.MASK_VERSION, ""))
    carries_masks = any(key.endswith(MASK_SUFFIX) for key in record.keys())
    known = None
    if version and not carries_masks:
        known = _cached_masks(context, version)
    state_id = str(config.get(R.STATE_VERSION, ""))
    base_id = str(config.get(R.BASE_VERSION, ""))
    if base_id:
        base = _held_codes(context, base_id)
        received, masks, held = decode_state_delta(record, reference, base, known_masks=known)
    else:
        received, masks = decode_state(record, reference, known_masks=known)
        held = held_from_record(record, reference, masks) if state_id else {}
    if state_id:
        _keep_held_codes(context, state_id, held)
    if version and carries_masks:
        _cache_masks(context, version, masks)
    content = dict(msg.content.items())
    content[R.ARRAYS] = state_to_record(received)
    content[R.MASKS] = ArrayRecord(
        OrderedDict((k, Array(m.astype(np.uint8))) for k, m in masks.items())
    )
    msg.content = RecordDict(content)
    reply = call_next(msg, context)
    if not reply.has_content() or R.ARRAYS not in reply.content.array_records:
        return reply
    trained = record_to_state(reply.content.array_records[R.ARRAYS])
    upload = str(config.get(R.UPLOAD, "fp32"))
    if upload == "fp32":
        encoded = encode_state(trained, masks=masks, send_masks=False)
    else:
        bits = 4 if upload.startswith("int4-") else 8
        feedback = upload.endswith("-ef")
        encoded, residual = encode_delta(
            trained,
            received,
            error_feedback=_residual(context, received) if feedback else None,
            masks=masks,
            bits=bits,
        )
        if feedback:
            context.state[_RESIDUAL_STATE] = state_to_record(residual)
    if str(config.get(R.ENTROPY, "none")) == "zlib":
        encoded = pack_record(encoded)
    out = dict(reply.content.items())
    out[R.ARRAYS] = encoded
    reply.content = RecordDict(out)
    return reply


def masks_from_message(content: RecordDict) -> dict[str, np.ndarray]:
    """The masks the mod decoded for this round (empty when nothing is pruned)."""
    record = content.array_records.get(R.MASKS)
    if record is None:
        return {}
    return {k: v.astype(bool) for k, v in record_to_state(record).items()}


def _cached_masks(context: Context, version: str) -> dict[str, np.ndarray]:
    cached = context.state.config_records.get(_MASKS_VERSION, ConfigRecord()).get("version")
    if cached != version or _MASKS_STATE not in context.state.array_records:
        raise PayloadError(
            f"the server sent no masks and this node does not hold version {version[:12]}"
        )
    return masks_from_message(RecordDict({R.MASKS: context.state.array_records[_MASKS_STATE]}))


def _cache_masks(context: Context, version: str, masks: dict[str, np.ndarray]) -> None:
    context.state[_MASKS_STATE] = ArrayRecord(
        OrderedDict((k, Array(m.astype(np.uint8))) for k, m in masks.items())
    )
    context.state[_MASKS_VERSION] = ConfigRecord({"version": version})


def _residual(
    context: Context, received: OrderedDict[str, np.ndarray]
) -> dict[str, np.ndarray] | None:
    """The last residual, if it still fits the student's shapes."""
    record = context.state.array_records.get(_RESIDUAL_STATE)
    if record is None:
        return None
    residual = record_to_state(record)
    if list(residual) != list(received) or any(
        residual[k].shape != received[k].shape for k in received
    ):
        return None
    return dict(residual)


def _held_codes(context: Context, version: str) -> Held:
    """The codes of the state ``version`` this node decoded last; `PayloadError` if it
    holds another (it restarted, or missed a message the server thinks it got)."""
    held = context.state.config_records.get(_HELD_VERSION, ConfigRecord()).get("version")
    if held != version or _HELD_STATE not in context.state.array_records:
        raise PayloadError(
            f"the server sent a change against state {version[:12]}, which this node "
            "does not hold; it will send the whole state next time"
        )
    arrays = record_to_state(context.state.array_records[_HELD_STATE])
    names = [k[: -len(_CODES)] for k in arrays if k.endswith(_CODES)]
    return {n: (arrays[n + _CODES], arrays[n + _SCALES]) for n in names}


def _keep_held_codes(context: Context, version: str, held: Held) -> None:
    arrays: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, (codes, scales) in held.items():
        arrays[name + _CODES], arrays[name + _SCALES] = codes, scales
    context.state[_HELD_STATE] = state_to_record(arrays)
    context.state[_HELD_VERSION] = ConfigRecord({"version": version})
