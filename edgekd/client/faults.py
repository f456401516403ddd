"""Fault drills: a node that corrupts its own training updates on purpose.

Started with ``flower-supernode --node-config "fault='scale:1e6'"`` (or ``'nan'``), a
node sends its update scaled by k (``received + k·(trained − received)``, a crude
model-poisoning attack) or with NaN in its first floating-point array. Operators use
it to check, on their own deployment, that the server rejects NaN and that the
robust aggregation (``train.aggregation``) holds against a poisoned update. With no
``fault`` in the node config the mod does nothing.

It sits inside the payload codec mod, so it sees and returns plain arrays.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from edgekd.common import records as R
from edgekd.payload import record_to_state, state_to_record

TRAIN = "train"


def parse_fault(spec: str) -> tuple[str, float]:
    """``"scale:<k>"`` -> ("scale", k); ``"nan"`` -> ("nan", 0); ``""`` -> ("", 0)."""
    kind, _, value = spec.partition(":")
    if kind == "scale":
        try:
            return kind, float(value)
        except ValueError:
            raise ValueError(f"node config fault: '{spec}' needs a number: scale:1e6") from None
    if kind in ("", "nan") and not value:
        return kind, 0.0
    raise ValueError(f"node config fault: unknown '{spec}' (use scale:<k> or nan)")


def corrupt_update(
    trained: dict[str, np.ndarray], received: dict[str, np.ndarray], kind: str, factor: float
) -> dict[str, np.ndarray]:
    """The update as a faulty node would send it (see the module docstring)."""
    out = dict(trained)
    floats = [k for k, v in trained.items() if v.dtype.kind == "f" and k in received]
    if kind == "scale":
        for name in floats:
            delta = trained[name] - received[name]
            out[name] = (received[name] + factor * delta).astype(trained[name].dtype)
    elif kind == "nan" and floats:
        out[floats[0]] = np.full_like(trained[floats[0]], np.nan)
    return out


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    kind, factor = parse_fault(str(context.node_config.get(R.FAULT, "")))
    received_record = msg.content.array_records.get(R.ARRAYS) if msg.has_content() else None
    received = record_to_state(received_record) if received_record is not None else None
    reply = call_next(msg, context)
    if (
        not kind
        or received is None
        or msg.metadata.message_type != TRAIN
        or not reply.has_content()
        or R.ARRAYS not in reply.content.array_records
    ):
        return reply
    trained = record_to_state(reply.content.array_records[R.ARRAYS])
    content = dict(reply.content.items())
    content[R.ARRAYS] = state_to_record(corrupt_update(trained, received, kind, factor))
    reply.content = RecordDict(content)
    return reply
