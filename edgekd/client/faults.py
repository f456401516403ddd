"""Fault drills: a node that corrupts its own training updates on purpose.

Started with ``flower-supernode --node-config "fault='scale:1e6'"`` (or ``'nan'``, or
``'examples:1e9'``), a node sends its update scaled by k (``received + k·(trained −
received)``, a crude model-poisoning attack), with NaN in its first floating-point
array, or claiming n training examples; ``'delay:<s>'`` holds each training reply s
seconds (a straggler, or a node that dies with its round in flight). Operators use
it to check, on their own deployment, that the server rejects NaN and inflated counts
and that the update bound and robust aggregation (``train.norm-bound``,
``train.aggregation``) hold.

In a simulation the run's ``faults`` key (``edgekd simulate --faults
"scale:1e6=0.1,nan=0.05,examples:1e9=0.05"``) gives a share of the nodes each fault
from round 1: the partitions are shuffled with the run's seed and dealt out in order,
``round(share · N)`` to each fault (`planned_fault`). With neither, the mod does
nothing.

It sits inside the payload codec mod, so it sees and returns plain arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from edgekd.core import records as R
from edgekd.core.config import parse_fault, parse_fault_plan
from edgekd.wire.payload import record_to_state, state_to_record

TRAIN = "train"


def planned_fault(plan: str, partition_id: int, num_partitions: int, seed: int) -> str:
    """The fault ``plan`` deals to one partition: the partitions in a seeded shuffle,
    the first ``round(share · N)`` to the first fault, the next to the second, ..."""
    order = list(np.random.default_rng(seed).permutation(num_partitions))
    position, start = order.index(partition_id), 0
    for fault, share in parse_fault_plan(plan):
        count = int(round(share * num_partitions))
        if start <= position < start + count:
            return fault
        start += count
    return ""


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


def make_fault_mod(plan: Callable[[Context], tuple[str, int]]) -> Mod:
    """The drill mod; ``plan(context)`` gives the run's ``faults`` spec and seed."""

    def fault_injection_mod(
        msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        fault = str(context.node_config.get(R.FAULT, ""))
        spec, seed = plan(context)
        if not fault and spec and R.PARTITION_ID in context.node_config:
            node = context.node_config
            fault = planned_fault(
                spec, int(node[R.PARTITION_ID]), int(node[R.NUM_PARTITIONS]), seed
            )
        kind, factor = parse_fault(fault)
        received_record = msg.content.array_records.get(R.ARRAYS) if msg.has_content() else None
        received = record_to_state(received_record) if received_record is not None else None
        if kind == "delay" and msg.metadata.message_type == TRAIN:
            time.sleep(factor)  # a straggler: the reply comes late (or, killed, never)
        reply = call_next(msg, context)
        if (
            kind in ("", "delay")
            or received is None
            or msg.metadata.message_type != TRAIN
            or not reply.has_content()
            or R.ARRAYS not in reply.content.array_records
        ):
            return reply
        content = dict(reply.content.items())
        if kind == "examples":
            metrics = reply.content.metric_records[R.METRICS]
            content[R.METRICS] = MetricRecord({**dict(metrics.items()), R.NUM_EXAMPLES: factor})
        else:
            trained = record_to_state(reply.content.array_records[R.ARRAYS])
            content[R.ARRAYS] = state_to_record(corrupt_update(trained, received, kind, factor))
        reply.content = RecordDict(content)
        return reply

    return fault_injection_mod


# Inert unless the node config names a fault: what a ClientApp without a run plan uses.
fault_injection_mod = make_fault_mod(lambda _context: ("", 0))
