"""The fault-drill mod: inert by default, scales or NaNs a training update on request."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from edgekd.client.faults import (
    fault_injection_mod,
    make_fault_mod,
    parse_fault,
    planned_fault,
)
from edgekd.core import records as R
from edgekd.wire.payload import record_to_state, state_to_record

RECEIVED = {"w": np.ones(3, np.float32), "steps": np.array([2], np.int64)}
TRAINED = {"w": np.array([1.5, 1.0, 0.0], np.float32), "steps": np.array([3], np.int64)}


def _reply(mod, node_config: dict) -> Message:  # type: ignore[no-untyped-def]
    """``mod`` around a handler that trains RECEIVED into TRAINED on 10 examples."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )
    msg = Message(
        RecordDict({R.ARRAYS: state_to_record(RECEIVED)}), dst_node_id=1, message_type="train"
    )

    def handler(m: Message, c: Context) -> Message:
        metrics = MetricRecord({R.NUM_EXAMPLES: 10})
        return Message(
            RecordDict({R.ARRAYS: state_to_record(TRAINED), R.METRICS: metrics}), reply_to=m
        )

    return mod(msg, context, handler)


def _run(fault: str | None) -> dict[str, np.ndarray]:
    reply = _reply(fault_injection_mod, {} if fault is None else {R.FAULT: fault})
    return record_to_state(reply.content.array_records[R.ARRAYS])


def test_no_fault_leaves_the_update_alone() -> None:
    np.testing.assert_array_equal(_run(None)["w"], TRAINED["w"])


def test_scale_multiplies_the_change_not_the_weights() -> None:
    out = _run("scale:1e6")
    np.testing.assert_allclose(out["w"], [1 + 0.5e6, 1.0, 1 - 1e6])
    np.testing.assert_array_equal(out["steps"], TRAINED["steps"])  # integers untouched


def test_nan_poisons_a_float_array() -> None:
    assert np.isnan(_run("nan")["w"]).all()


@pytest.mark.parametrize("spec", ["scale:", "scale:x", "explode", "nan:1", "examples:many"])
def test_a_malformed_fault_is_named(spec: str) -> None:
    with pytest.raises(ValueError, match=f"fault '{spec}'"):
        parse_fault(spec)


def test_examples_fault_inflates_the_count_and_leaves_the_arrays() -> None:
    mod = make_fault_mod(lambda _context: ("", 0))
    reply = _reply(mod, {R.FAULT: "examples:1e9"})
    assert reply.content.metric_records[R.METRICS][R.NUM_EXAMPLES] == 1e9
    got = record_to_state(reply.content.array_records[R.ARRAYS])
    np.testing.assert_array_equal(got["w"], TRAINED["w"])


def test_a_plan_deals_each_fault_to_its_share_of_the_partitions() -> None:
    plan = "scale:1e6=0.1,nan=0.05,examples:1e9=0.05"
    dealt = [planned_fault(plan, i, 20, seed=42) for i in range(20)]
    assert sorted(dealt) == [""] * 16 + ["examples:1e9", "nan", "scale:1e6", "scale:1e6"]
    assert dealt == [planned_fault(plan, i, 20, seed=42) for i in range(20)]  # seeded
    assert dealt != [planned_fault(plan, i, 20, seed=0) for i in range(20)]


def test_the_mod_follows_the_run_plan_by_partition() -> None:
    plan = "nan=0.5"
    mod = make_fault_mod(lambda _context: (plan, 7))
    poisoned = [planned_fault(plan, i, 4, seed=7) == "nan" for i in range(4)]
    for partition, expected in enumerate(poisoned):
        node = {R.PARTITION_ID: partition, R.NUM_PARTITIONS: 4}
        got = record_to_state(_reply(mod, node).content.array_records[R.ARRAYS])
        assert bool(np.isnan(got["w"]).all()) == expected
    assert sum(poisoned) == 2


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("nan", "is not FAULT=SHARE"),
        ("nan=0", "share in \\(0, 1\\]"),
        ("nan=0.7,scale:2=0.5", "add up to more than 1"),
        ("boom=0.1", "unknown fault 'boom'"),
    ],
)
def test_a_malformed_plan_is_named(plan: str, message: str) -> None:
    from edgekd.core.config import ConfigError, EdgeKDConfig

    with pytest.raises(ConfigError, match=message):
        EdgeKDConfig().with_overrides({"faults": plan})
