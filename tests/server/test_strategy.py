"""EdgeKDStrategy against a fake Grid (no Ray): soft-target shipping, validation,
byte accounting."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fakegrid import FakeGrid, Reply  # tests/server/fakegrid.py
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from edgekd.core import records as R
from edgekd.server.node_wire import WireFormat
from edgekd.server.strategy import EdgeKDStrategy
from edgekd.wire.payload import PayloadError, record_nbytes, record_to_state, state_to_record

REFERENCE = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _metrics(n: int = 10) -> MetricRecord:
    """What a training node reports (edgekd.server.replies.TRAIN_METRIC_KEYS)."""
    return MetricRecord({R.TRAIN_LOSS: 1.0, "temperature": 4.0, R.NUM_EXAMPLES: n})


def _update(value: float, n: int = 10) -> RecordDict:
    state = {k: np.full_like(v, value) for k, v in REFERENCE.items()}
    return RecordDict({R.ARRAYS: state_to_record(state), R.METRICS: _metrics(n)})


def _strategy(**kwargs: object) -> EdgeKDStrategy:
    kwargs.setdefault("reference_state", REFERENCE)
    return EdgeKDStrategy(
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
    # Down: the codec's raw buffers (no header); up: these fake nodes reply with plain
    # Arrays, each array's data plus its small .npy header.
    down_bytes = sum(v.nbytes for v in REFERENCE.values())
    up_bytes = record_nbytes(state_to_record(REFERENCE))
    teacher_bytes = record_nbytes(teacher)
    assert down_bytes < up_bytes < 400
    assert 100 < teacher_bytes < 300
    assert strategy.ledger[1].bytes_down == 2 * (down_bytes + teacher_bytes)
    assert strategy.ledger[2].bytes_down == 2 * down_bytes
    assert strategy.ledger[1].bytes_up == 2 * up_bytes
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
    assert strategy.ledger[1].skipped == 1
    # Nothing aggregated: the global student is the one the round started from.
    np.testing.assert_array_equal(record_to_state(result.arrays)["w"], start["w"])


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
    from edgekd.server.outputs import communication

    rounds = [
        {"messages": 0, "replies": 0, "failures": 0, "bytes_down": 0, "bytes_up": 0},
        {"messages": 3, "replies": 3, "failures": 1, "bytes_down": 30, "bytes_up": 20},
        {"messages": 3, "replies": 3, "failures": 0, "bytes_down": 30, "bytes_up": 30},
    ]
    comm = communication(rounds, student_params=10, teacher_params=100)
    assert comm["fp32_fedavg_bytes"] == 4 * 10 * (6 + 5)
    assert comm["teacher_fedavg_bytes"] == 4 * 100 * 11
    assert (comm["bytes_down"], comm["bytes_up"]) == (60, 50)


# ------------------------------------------------------- compressed wire format
BIG = {"w": np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6), "b": np.ones(4, np.float32)}
PRUNE = {"w": np.abs(BIG["w"]) > 0.5}  # keeps 12 of 24


def _pruning_step(server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
    state = record_to_state(arrays)
    state["w"] = np.where(PRUNE["w"], state["w"], 0).astype(np.float32)
    return state_to_record(state), dict(PRUNE)


def _compressed_strategy(*, prune: bool = True, **wire: object) -> EdgeKDStrategy:
    return _strategy(
        reference_state=BIG,
        prepare_round=_pruning_step if prune else None,
        wire=WireFormat(**wire),  # type: ignore[arg-type]
    )


def _node(handler: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Reply:
    """A node that runs the real codec mod around ``handler`` (state -> new state), with a
    Context that persists between rounds like a SuperNode's."""
    from flwr.app import Context

    from edgekd.client.codec_mod import payload_codec_mod

    contexts: dict[int, Context] = {}

    def reply(node: int, msg: Message) -> RecordDict | None:
        context = contexts.setdefault(node, Context(1, node, {}, RecordDict(), {}))

        def call_next(inner: Message, _ctx: Context) -> Message:
            state = record_to_state(inner.content[R.ARRAYS])
            return Message(
                RecordDict(
                    {
                        R.ARRAYS: state_to_record(handler(state)),
                        R.METRICS: _metrics(),
                    }
                ),
                reply_to=inner,
            )

        try:
            return payload_codec_mod(msg, context, call_next).content
        except Exception:  # noqa: BLE001 - a raising ClientApp becomes an error reply
            return None

    return reply


@pytest.mark.parametrize("upload", ["fp32", "int8-delta", "int8-delta-ef"])
def test_pruned_weights_are_exactly_zero_after_aggregation(upload: str) -> None:
    # Prepare: nodes that push every weight, pruned or not, to 0.3
    strategy = _compressed_strategy(int8=True, upload=upload)
    grid = FakeGrid([1, 2, 3], _node(lambda s: {k: np.full_like(v, 0.3) for k, v in s.items()}))

    # Execute
    result = strategy.start(grid, state_to_record(BIG), num_rounds=2, train_config=ConfigRecord())

    # Assert
    final = record_to_state(result.arrays)
    assert np.all(final["w"][~PRUNE["w"]] == 0.0)
    step = np.abs(BIG["w"]).max() / 127  # kept values within half an INT8 step
    np.testing.assert_allclose(final["w"][PRUNE["w"]], 0.3, atol=step)
    assert strategy.ledger[2].rejected == 0 and strategy.ledger[2].failures == 0


def test_masks_travel_once_per_node_and_again_after_a_failure() -> None:
    # Prepare: node 2 crashes in round 1 (so it may not have cached the masks)
    good = _node(lambda s: s)
    seen: dict[int, dict[int, bool]] = {1: {}, 2: {}}  # round -> node -> carried masks

    def reply(node: int, msg: Message) -> RecordDict | None:
        server_round = int(msg.content.config_records[R.CONFIG][R.ROUND])
        keys = msg.content.array_records[R.ARRAYS].keys()
        seen[server_round][node] = any(k.endswith("::mask") for k in keys)
        if node == 2 and server_round == 1:
            return None
        return good(node, msg)

    strategy = _compressed_strategy(int8=True)
    grid = FakeGrid([1, 2], reply)

    # Execute
    strategy.start(grid, state_to_record(BIG), num_rounds=2, train_config=ConfigRecord())

    # Assert
    assert seen == {1: {1: True, 2: True}, 2: {1: False, 2: True}}
    assert strategy.ledger[2].failures == 0
    assert strategy.ledger[2].bytes_down < strategy.ledger[1].bytes_down


def test_a_corrupt_payload_is_rejected_and_the_round_goes_on() -> None:
    # Prepare: node 1's upload is truncated on the way, node 2's holds a NaN scale
    good = _node(lambda s: {k: v + 0.1 for k, v in s.items()})

    def reply(node: int, msg: Message) -> RecordDict | None:
        content = good(node, msg)
        assert content is not None
        arrays = content[R.ARRAYS]
        if node == 1:
            arr = arrays["w::values"]
            arrays["w::values"] = Array(
                dtype=arr.dtype, shape=(3,), stype=arr.stype, data=arr.data[:3]
            )
        if node == 2:
            arr = arrays["b::scale"]
            nan = np.array([np.nan], dtype="<f4").tobytes()
            arrays["b::scale"] = Array(dtype=arr.dtype, shape=(1,), stype=arr.stype, data=nan)
        return content

    strategy = _compressed_strategy(int8=True, upload="int8-delta")
    grid = FakeGrid([1, 2, 3], reply)

    # Execute
    result = strategy.start(grid, state_to_record(BIG), num_rounds=1, train_config=ConfigRecord())

    # Assert
    ledger = strategy.ledger[1]
    assert (ledger.replies, ledger.rejected) == (3, 2)
    assert any("truncated" in r for r in ledger.reasons)
    assert any("NaN" in r for r in ledger.reasons)
    final = record_to_state(result.arrays)
    np.testing.assert_allclose(final["b"], 1.1, atol=1.1 / 127)  # node 3 alone


def test_an_upload_with_its_own_mask_cannot_unprune_weights() -> None:
    # Prepare: node 1 re-encodes its update with an all-kept mask of its own, pushing
    # every weight (pruned ones too) to 0.3; node 2 is honest.
    from edgekd.wire.codec import encode_state

    good = _node(lambda s: {k: np.full_like(v, 0.3) for k, v in s.items()})

    def reply(node: int, msg: Message) -> RecordDict | None:
        content = good(node, msg)
        assert content is not None
        if node == 1:
            everything = {k: np.full_like(v, 0.3) for k, v in BIG.items()}
            mine = {"w": np.ones_like(PRUNE["w"])}
            content[R.ARRAYS] = encode_state(everything, masks=mine)
        return content

    strategy = _compressed_strategy(int8=False, upload="fp32")
    grid = FakeGrid([1, 2], reply)

    # Execute
    result = strategy.start(grid, state_to_record(BIG), num_rounds=1, train_config=ConfigRecord())

    # Assert
    assert strategy.ledger[1].rejected == 1
    assert any("may not carry pruning masks" in r for r in strategy.ledger[1].reasons)
    assert np.all(record_to_state(result.arrays)["w"][~PRUNE["w"]] == 0.0)


def test_updates_smaller_than_an_int8_step_still_accumulate() -> None:
    # Prepare: every node nudges every weight by 0.001, an eighth of the INT8 step
    strategy = _compressed_strategy(int8=True, upload="int8-delta", prune=False)
    grid = FakeGrid([1, 2], _node(lambda s: {k: v + 0.001 for k, v in s.items()}))

    # Execute
    result = strategy.start(grid, state_to_record(BIG), num_rounds=6, train_config=ConfigRecord())

    # Assert: the FP32 master moved 6 × 0.001 (rounding each round would leave it still)
    moved = record_to_state(result.arrays)["w"] - BIG["w"]
    np.testing.assert_allclose(moved, 0.006, atol=0.001)


@pytest.mark.parametrize("aggregation", ["fedavg", "median", "trimmed-mean:0.2"])
def test_robust_aggregation_resists_a_scaled_update_and_nan_is_always_rejected(
    aggregation: str,
) -> None:
    # Prepare: four honest nodes near 1.0, one sending its update scaled by 1e6, one NaN
    from edgekd.server.federation import robust_aggregator

    def reply(node: int, msg: Message) -> RecordDict | None:
        if node == 5:
            return _update(1e6)
        if node == 6:
            return _update(float("nan"))
        return _update(0.9 + 0.05 * node)

    strategy = _strategy(aggregator=robust_aggregator(aggregation))
    grid = FakeGrid([1, 2, 3, 4, 5, 6], reply)

    # Execute
    result = strategy.start(
        grid, state_to_record(REFERENCE), num_rounds=1, train_config=ConfigRecord()
    )

    # Assert
    assert strategy.ledger[1].rejected == 1  # the NaN node, whatever the aggregation
    w = record_to_state(result.arrays)["w"]
    if aggregation == "fedavg":
        assert np.all(w > 1e5)  # one poisoned update dominates the mean
    else:
        np.testing.assert_allclose(w, 1.05, atol=0.06)


@pytest.mark.parametrize(("valid", "aggregated"), [(1, False), (2, True)])
def test_a_round_needs_min_fraction_of_valid_updates(valid: int, aggregated: bool) -> None:
    # Prepare: four nodes asked; `valid` answer with 1.0, one crashes, the rest send NaN.
    def reply(node: int, msg: Message) -> RecordDict | None:
        if node == 4:
            return None
        return _update(1.0 if node <= valid else float("nan"))

    strategy = _strategy(min_fraction=0.5)

    # Execute
    result = strategy.start(FakeGrid([1, 2, 3, 4], reply), state_to_record(REFERENCE), num_rounds=1)

    # Assert: 0.5 of 4 asked means 2 valid updates.
    ledger = strategy.ledger[1]
    assert (ledger.messages, ledger.failures, ledger.rejected) == (4, 1, 3 - valid)
    assert ledger.skipped == (0 if aggregated else 1)
    np.testing.assert_array_equal(record_to_state(result.arrays)["w"], 1.0 if aggregated else 0.0)


def test_start_from_a_later_round_calls_back_after_each_round() -> None:
    # Prepare
    strategy = _strategy()
    grid = FakeGrid(
        [1], lambda node, msg: _update(float(msg.content.config_records[R.CONFIG][R.ROUND]))
    )
    seen: list[tuple[int, float]] = []
    evaluated: list[int] = []

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated.append(rnd)
        return MetricRecord({R.ACCURACY: 0.0})

    # Execute
    strategy.start(
        grid,
        state_to_record(REFERENCE),
        num_rounds=4,
        evaluate_fn=evaluate,
        first_round=3,
        on_round_end=lambda rnd, arrays, _: seen.append(
            (rnd, float(record_to_state(arrays)["w"][0, 0]))
        ),
    )

    # Assert: rounds 3 and 4 only, no round-0 evaluation, each round's own aggregate.
    assert seen == [(3, 3.0), (4, 4.0)]
    assert evaluated == [3, 4]
    assert sorted(strategy.ledger) == [3, 4]


def _run_recording_states(**wire: object) -> tuple[EdgeKDStrategy, list, list]:
    """3 rounds of 3 nodes that add 0.01 to what they get: every state a handler got,
    and (base version, packed?, array keys) of every message as it arrived."""
    from edgekd.wire.codec import is_packed, unpack_record

    got: list[dict[str, np.ndarray]] = []
    arrived: list[tuple[str, bool, list[str]]] = []

    def handler(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        got.append(state)
        return {k: v + 0.01 for k, v in state.items()}

    node = _node(handler)

    def reply(node_id: int, msg: Message) -> RecordDict | None:
        record = msg.content.array_records[R.ARRAYS]
        packed = is_packed(record)
        keys = list((unpack_record(record, 1 << 20) if packed else record).keys())
        base = str(msg.content.config_records[R.CONFIG].get(R.BASE_VERSION, ""))
        arrived.append((base, packed, keys))
        return node(node_id, msg)

    strategy = _compressed_strategy(int8=True, upload="int4-delta-ef", **wire)
    strategy.fraction_evaluate = 1.0  # evaluation messages carry the student too
    grid = FakeGrid([1, 2, 3], reply)
    strategy.start(grid, state_to_record(BIG), num_rounds=3, train_config=ConfigRecord())
    return strategy, got, arrived


def test_downlink_deltas_rebuild_exactly_the_int8_states_nodes_would_get_whole() -> None:
    # Execute: the same run with whole INT8 states, and with code changes + zlib
    whole, whole_got, _ = _run_recording_states()
    delta, delta_got, arrived = _run_recording_states(download="delta", entropy="zlib")

    # Assert: every node decoded bit-identical students, train and evaluate alike
    assert len(whole_got) == len(delta_got) == 9 + 9  # 3 rounds x 3 nodes x (train, eval)
    for a, b in zip(whole_got, delta_got, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # (bytes: a 28-value student is all zlib header; see test_codec for real sizes)
    assert delta.ledger[3].rejected == delta.ledger[3].failures == 0
    assert all(packed for _, packed, _ in arrived)
    assert [base == "" for base, _, _ in arrived[:3]] == [True] * 3  # first contact
    assert "w::values" in arrived[0][2] and "w::dcodes" not in arrived[0][2]
    assert all(base != "" for base, _, _ in arrived[3:])
    assert all("w::dcodes" in keys and "w::values" not in keys for _, _, keys in arrived[3:])


def test_a_node_that_lost_its_state_is_refused_a_delta_and_gets_the_whole_state_next() -> None:
    # Prepare: node 2 restarts before round 2 (a fresh Context: no codes held)
    from flwr.app import Context

    from edgekd.client.codec_mod import payload_codec_mod

    good = _node(lambda s: s)
    bases: dict[int, dict[int, str]] = {}

    def reply(node: int, msg: Message) -> RecordDict | None:
        config = msg.content.config_records[R.CONFIG]
        bases.setdefault(int(config[R.ROUND]), {})[node] = str(config[R.BASE_VERSION])
        if node == 2 and int(config[R.ROUND]) == 2:
            fresh = Context(1, node, {}, RecordDict(), {})
            return payload_codec_mod(msg, fresh, lambda m, c: m).content  # raises
        return good(node, msg)

    def guarded(node: int, msg: Message) -> RecordDict | None:
        try:
            return reply(node, msg)
        except PayloadError as exc:
            assert "does not hold" in str(exc)
            return None

    strategy = _compressed_strategy(int8=True, upload="int8-delta", download="delta")
    grid = FakeGrid([1, 2], guarded)

    # Execute
    strategy.start(grid, state_to_record(BIG), num_rounds=3, train_config=ConfigRecord())

    # Assert: round 2 tried a delta to node 2 and failed; round 3 sent it the whole state
    assert bases[1] == {1: "", 2: ""}
    assert bases[2][1] != "" and bases[2][2] != ""
    assert strategy.ledger[2].failures == 1
    assert bases[3][1] != "" and bases[3][2] == ""
    assert strategy.ledger[3].failures == 0 and strategy.ledger[3].rejected == 0


def test_a_packed_reply_that_does_not_inflate_is_rejected_and_the_round_goes_on() -> None:
    # Prepare: node 1's deflated upload loses its tail on the way
    from edgekd.wire.codec import PACKED_KEY

    good = _node(lambda s: {k: v + 0.1 for k, v in s.items()})

    def reply(node: int, msg: Message) -> RecordDict | None:
        content = good(node, msg)
        assert content is not None
        if node == 1:
            arr = content[R.ARRAYS][PACKED_KEY]
            cut = arr.data[: len(arr.data) // 2]
            content[R.ARRAYS][PACKED_KEY] = Array(
                dtype=arr.dtype, shape=(len(cut),), stype=arr.stype, data=cut
            )
        return content

    strategy = _compressed_strategy(int8=True, upload="int4-delta-ef", entropy="zlib")
    grid = FakeGrid([1, 2], reply)

    # Execute
    result = strategy.start(grid, state_to_record(BIG), num_rounds=1, train_config=ConfigRecord())

    # Assert
    ledger = strategy.ledger[1]
    assert (ledger.replies, ledger.rejected) == (2, 1)
    assert any("node 1: packed payload is truncated" in r for r in ledger.reasons)
    np.testing.assert_allclose(record_to_state(result.arrays)["b"], 1.1, atol=0.1 / 7)


class _ReversedGrid(FakeGrid):
    """Answers in the reverse order of the messages: the last node finished first."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))


def test_the_average_does_not_depend_on_the_order_replies_arrive_in() -> None:
    # Prepare: float32 sums that round differently in different orders, a third of
    # each: (1e8 - 1e8) + 1 = 1/3, but (1 - 1e8) + 1e8 = 0
    values = {1: 1e8, 2: -1e8, 3: 1.0}

    def reply(node: int, _msg: Message) -> RecordDict:
        return _update(values[node])

    averages = []
    for grid in (FakeGrid([1, 2, 3], reply), _ReversedGrid([1, 2, 3], reply)):
        # Execute
        result = _strategy().start(grid, state_to_record(REFERENCE), num_rounds=1)
        averages.append(record_to_state(result.arrays))

    # Assert: bit for bit
    for name in REFERENCE:
        assert averages[0][name].tobytes() == averages[1][name].tobytes()


def test_server_momentum_steps_against_the_round_s_own_global() -> None:
    # Prepare: every node moves every weight by +1 from what it was sent; a server step
    # of lr 1, momentum 0.5 (FedAvgM) makes the global move 1, 1.5, 1.75 ...
    from edgekd.server.federation import robust_aggregator

    aggregator = robust_aggregator("fedavg", server_lr=1.0, server_momentum=0.5)
    seen: list[float] = []

    def post(server_round: int, arrays: ArrayRecord, masks: object) -> ArrayRecord:
        seen.append(float(record_to_state(arrays)["w"][0, 0]))
        state = record_to_state(arrays)
        return state_to_record({k: v - 0.25 for k, v in state.items()})  # a server step after

    strategy = _strategy(aggregator=aggregator, post_aggregate=post)
    grid = FakeGrid([1, 2], _node(lambda s: {k: v + 1.0 for k, v in s.items()}))
    # Execute
    strategy.start(grid, state_to_record(REFERENCE), num_rounds=3, train_config=ConfigRecord())
    # Assert: each round's move is taken from the global after the previous post step
    # (v1 = 1, v2 = 1.5, v3 = 1.75), never from FedAvgM's own last average
    assert seen == pytest.approx([1.0, 0.75 + 1.5, 0.75 + 1.5 - 0.25 + 1.75])
    assert robust_aggregator("fedavg") is None


@pytest.mark.parametrize(("cap", "expected"), [(50, 50), (0, 2500), (5000, 2500)])
def test_federated_evaluation_asks_at_most_max_evaluate_nodes(cap: int, expected: int) -> None:
    # 10 000 nodes at fraction-evaluate 0.25 would be 2 500 evaluations a round.
    strategy = EdgeKDStrategy(
        reference_state=REFERENCE,
        fraction_evaluate=0.25,
        min_evaluate_nodes=2,
        min_available_nodes=1,
        max_evaluate_nodes=cap,
    )
    grid = FakeGrid(list(range(1, 10_001)), lambda node, msg: _update(1.0))

    messages = list(
        strategy.configure_evaluate(1, state_to_record(REFERENCE), ConfigRecord(), grid)
    )

    assert len(messages) == expected
    assert len({m.metadata.dst_node_id for m in messages}) == expected
    assert strategy.fraction_evaluate == 0.25  # restored for the next round
