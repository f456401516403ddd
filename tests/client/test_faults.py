"""The fault-drill mod: inert by default, scales or NaNs a training update on request."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from edgekd.client.faults import fault_injection_mod, parse_fault
from edgekd.common import records as R
from edgekd.payload import record_to_state, state_to_record

RECEIVED = {"w": np.ones(3, np.float32), "steps": np.array([2], np.int64)}
TRAINED = {"w": np.array([1.5, 1.0, 0.0], np.float32), "steps": np.array([3], np.int64)}


def _run(fault: str | None) -> dict[str, np.ndarray]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    node_config = {} if fault is None else {R.FAULT: fault}
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )
    msg = Message(
        RecordDict({R.ARRAYS: state_to_record(RECEIVED)}), dst_node_id=1, message_type="train"
    )

    def handler(m: Message, c: Context) -> Message:
        content = {R.ARRAYS: state_to_record(TRAINED), R.METRICS: MetricRecord({"n": 1})}
        return Message(RecordDict(content), reply_to=m)

    reply = fault_injection_mod(msg, context, handler)
    return record_to_state(reply.content.array_records[R.ARRAYS])


def test_no_fault_leaves_the_update_alone() -> None:
    np.testing.assert_array_equal(_run(None)["w"], TRAINED["w"])


def test_scale_multiplies_the_change_not_the_weights() -> None:
    out = _run("scale:1e6")
    np.testing.assert_allclose(out["w"], [1 + 0.5e6, 1.0, 1 - 1e6])
    np.testing.assert_array_equal(out["steps"], TRAINED["steps"])  # integers untouched


def test_nan_poisons_a_float_array() -> None:
    assert np.isnan(_run("nan")["w"]).all()


@pytest.mark.parametrize("spec", ["scale:", "scale:x", "explode", "nan:1"])
def test_a_malformed_fault_is_named(spec: str) -> None:
    with pytest.raises(ValueError, match="node config fault"):
        parse_fault(spec)
