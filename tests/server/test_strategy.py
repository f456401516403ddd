"""EdgeKDStrategy against a fake Grid (no Ray): soft-target shipping, validation,
byte accounting."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from edgekd.common import records as R
from edgekd.payload import record_nbytes, record_to_state, state_to_record
from edgekd.server.strategy import EdgeKDStrategy

Reply = Callable[[int, Message], RecordDict | None]


class FakeGrid(Grid):
    """Answers every message with ``reply(node, msg)``; None becomes an error reply."""

    def __init__(self, nodes: list[int], reply: Reply) -> None:
        self.nodes, self.reply, self.sent = nodes, reply, []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            content = self.reply(node, msg)
            reply = _reply(msg, node, content)
            out.append(reply)
        return out

    # The strategy never calls these.
    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def _reply(msg: Message, node: int, content: RecordDict | None) -> Message:
    if content is None:
        return Message(Error(code=0, reason="client crashed"), reply_to=msg)
    return Message(content, reply_to=msg)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages read the run's identity from process state that a ServerApp sets."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


REFERENCE = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _update(value: float, n: int = 10) -> RecordDict:
    state = {k: np.full_like(v, value) for k, v in REFERENCE.items()}
    return RecordDict(
        {R.ARRAYS: state_to_record(state), R.METRICS: MetricRecord({R.NUM_EXAMPLES: n})}
    )


def _strategy(**kwargs: object) -> EdgeKDStrategy:
    return EdgeKDStrategy(
        reference_state=REFERENCE,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        **kwargs,  # type: ignore[arg-type]
    )


def test_teacher_is_shipped_once_per_node_and_counted() -> None:
    # Prepare
    teacher = ArrayRecord({R.TEACHER_ONNX: Array(np.arange(100, dtype=np.uint8))})
    strategy = _strategy(teacher_record=teacher)
    grid = FakeGrid([1, 2], lambda node, msg: _update(1.0))

    # Execute
    strategy.start(grid, state_to_record(REFERENCE), num_rounds=2, train_config=ConfigRecord())

    # Assert
    first, second = grid.sent[:2], grid.sent[2:]
    assert all(R.TEACHER in m.content.array_records for m in first)
    assert not any(R.TEACHER in m.content.array_records for m in second)
    # Wire sizes: the array data plus its small .npy header, per array.
    model_bytes = record_nbytes(state_to_record(REFERENCE))
    teacher_bytes = record_nbytes(teacher)
    assert sum(v.nbytes for v in REFERENCE.values()) < model_bytes < 400
    assert 100 < teacher_bytes < 300
    assert strategy.ledger[1].bytes_down == 2 * (model_bytes + teacher_bytes)
    assert strategy.ledger[2].bytes_down == 2 * model_bytes
    assert strategy.ledger[1].bytes_up == 2 * model_bytes
    assert (strategy.ledger[1].messages, strategy.ledger[2].messages) == (2, 2)


def test_nan_and_misshapen_updates_are_rejected_and_the_rest_averaged() -> None:
    # Prepare
    def reply(node: int, msg: Message) -> RecordDict | None:
        if node == 1:
            return _update(float("nan"))
        if node == 2:
            bad = _update(1.0)
            bad[R.ARRAYS]["w"] = Array(np.zeros((3, 3), dtype=np.float32))
            return bad
        if node == 3:
            return None  # the client raised
        return _update(2.0, n=10) if node == 4 else _update(4.0, n=30)

    strategy = _strategy()
    grid = FakeGrid([1, 2, 3, 4, 5], reply)

    # Execute
    result = strategy.start(
        grid, state_to_record(REFERENCE), num_rounds=1, train_config=ConfigRecord()
    )

    # Assert
    ledger = strategy.ledger[1]
    assert (ledger.replies, ledger.rejected, ledger.failures) == (5, 2, 1)
    assert any("NaN" in r for r in ledger.reasons)
    assert any("shape (3, 3)" in r for r in ledger.reasons)
    final = record_to_state(result.arrays)
    np.testing.assert_allclose(final["w"], 3.5)  # (2*10 + 4*30) / 40
    assert result.train_metrics_clientapp[1]["rejected"] == 2


def test_round_with_only_bad_updates_keeps_the_model() -> None:
    strategy = _strategy()
    grid = FakeGrid([1, 2], lambda node, msg: _update(float("inf")))
    start = {k: v + 0.5 for k, v in REFERENCE.items()}
    result = strategy.start(grid, state_to_record(start), num_rounds=1, train_config=ConfigRecord())
    assert strategy.ledger[1].rejected == 2
    assert len(result.arrays) == 0  # nothing aggregated: the app keeps the previous model


def test_missing_nodes_do_not_block_a_round_forever() -> None:
    # Prepare: the round asks for 5 nodes, only 2 ever connect.
    strategy = EdgeKDStrategy(
        reference_state=REFERENCE,
        fraction_evaluate=0.0,
        min_train_nodes=5,
        min_available_nodes=5,
        node_wait=0.2,
    )
    grid = FakeGrid([1, 2], lambda node, msg: _update(1.0))

    # Execute
    result = strategy.start(
        grid, state_to_record(REFERENCE), num_rounds=2, train_config=ConfigRecord()
    )

    # Assert: both rounds ran with the two nodes, and the minimum is restored after.
    assert [strategy.ledger[r].replies for r in (1, 2)] == [2, 2]
    assert strategy.min_available_nodes == 5
    np.testing.assert_allclose(record_to_state(result.arrays)["w"], 1.0)


def test_no_node_at_all_is_an_error() -> None:
    strategy = EdgeKDStrategy(reference_state=REFERENCE, fraction_evaluate=0.0, node_wait=0.1)
    with pytest.raises(RuntimeError, match="no node connected"):
        strategy.start(FakeGrid([], lambda n, m: None), state_to_record(REFERENCE), num_rounds=1)


def test_fedavg_equivalent_bytes_count_every_transfer() -> None:
    from edgekd.server.app import communication

    rounds = [
        {"messages": 0, "replies": 0, "failures": 0, "bytes_down": 0, "bytes_up": 0},
        {"messages": 3, "replies": 3, "failures": 1, "bytes_down": 30, "bytes_up": 20},
        {"messages": 3, "replies": 3, "failures": 0, "bytes_down": 30, "bytes_up": 30},
    ]
    comm = communication(rounds, student_params=10, teacher_params=100)
    assert comm["fp32_fedavg_bytes"] == 4 * 10 * (6 + 5)
    assert comm["teacher_fedavg_bytes"] == 4 * 100 * 11
    assert (comm["bytes_down"], comm["bytes_up"]) == (60, 50)
