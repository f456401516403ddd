"""A node's answer to the fleet's class query, and the width a fleet message names."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from edgekd.client.app import for_message, handle_fleet_query
from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig

ANDROID_BUNDLE = Path(__file__).resolve().parents[1] / "data" / "bundles" / "android-w8"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity  # a Message needs a run outside one

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _ask(cfg: EdgeKDConfig, node_config: dict) -> str:
    query = Message(
        RecordDict({R.CONFIG: ConfigRecord({R.FLEET_QUERY: "class"})}),
        dst_node_id=7,
        message_type=MessageType.QUERY,
    )
    context = Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
    )
    reply = handle_fleet_query(cfg, query, context)
    return str(reply.content.config_records[R.CONFIG][R.FLEET_CLASS])


def test_a_simulated_node_answers_the_class_of_its_partition() -> None:
    cfg = EdgeKDConfig().with_overrides({"fleet.classes": "pi:0.25,jetson:0.75"})
    answers = [_ask(cfg, {R.PARTITION_ID: pid, R.NUM_PARTITIONS: 8}) for pid in range(8)]
    assert answers == ["pi"] * 2 + ["jetson"] * 6


def test_a_bundled_node_answers_the_class_of_its_bundles_profile() -> None:
    cfg = EdgeKDConfig().with_overrides({"fleet.classes": "pi:0.5,phone:0.5"})
    assert _ask(cfg, {"bundle": str(ANDROID_BUNDLE)}) == "phone"
    other = EdgeKDConfig().with_overrides({"fleet.classes": "pi:0.5,jetson:0.5"})
    with pytest.raises(ValueError, match="no class of fleet.classes 'pi:0.5,jetson:0.5' is a"):
        _ask(other, {"bundle": str(ANDROID_BUNDLE)})


def test_a_fleet_message_sets_the_students_width() -> None:
    cfg = EdgeKDConfig()
    named = Message(
        RecordDict({R.CONFIG: ConfigRecord({R.STUDENT_WIDTH: 32})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    plain = Message(RecordDict({R.CONFIG: ConfigRecord({})}), dst_node_id=7, message_type="train")
    assert for_message(cfg, named).model.student_width == 32
    assert for_message(cfg, plain) is cfg
    zero = Message(
        RecordDict({R.CONFIG: ConfigRecord({R.STUDENT_WIDTH: 0})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    with pytest.raises(ValueError, match="model.student-width must be >= 1, got 0"):
        for_message(cfg, zero)
