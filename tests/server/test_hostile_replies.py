"""One malformed or hostile reply is one rejected reply: never the round or the run
(`edgekd.server.replies` and `EdgeKDStrategy`, against a fake Grid)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from fakegrid import FakeGrid  # tests/server/fakegrid.py
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from edgekd.core import records as R
from edgekd.server.federation import robust_aggregator
from edgekd.server.replies import bounded_weights, clip_update_norms
from edgekd.server.strategy import EdgeKDStrategy
from edgekd.wire.payload import record_to_state, state_to_record

REFERENCE = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
HONEST = 1.0


def _content(value: float = HONEST, **metrics: object) -> RecordDict:
    state = {k: np.full_like(v, value) for k, v in REFERENCE.items()}
    values = {R.TRAIN_LOSS: 1.0, "temperature": 4.0, R.NUM_EXAMPLES: 10, **metrics}
    return RecordDict({R.ARRAYS: state_to_record(state), R.METRICS: MetricRecord(values)})


def _extra_metric_record() -> RecordDict:
    content = _content()
    content["other"] = MetricRecord({"x": 1.0})
    return content


def _extra_array_record() -> RecordDict:
    content = _content()
    content["other"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    return content


def _config_record() -> RecordDict:
    content = _content()
    content["cfg"] = ConfigRecord({"x": 1})
    return content


def _run(
    bad: Callable[[], RecordDict], *, rounds: int = 2, aggregation: str = "fedavg", **kw: object
) -> tuple[EdgeKDStrategy, dict[str, np.ndarray]]:
    """Three honest nodes and node 4 sending ``bad()`` every round."""
    strategy = EdgeKDStrategy(
        reference_state=REFERENCE,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        aggregator=robust_aggregator(aggregation),
        **kw,  # type: ignore[arg-type]
    )
    grid = FakeGrid([1, 2, 3, 4], lambda node, msg: bad() if node == 4 else _content())
    result = strategy.start(
        grid, state_to_record(REFERENCE), num_rounds=rounds, train_config=ConfigRecord()
    )
    return strategy, dict(record_to_state(result.arrays))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: _content(extra=1.0), "unexpected ['extra']"),
        (lambda: _content(**{R.TRAIN_LOSS: [1.0, 2.0]}), "is list, not a number"),
        (lambda: _content(**{R.TRAIN_LOSS: float("nan")}), "metric 'train-loss' is nan"),
        (_extra_metric_record, "metric records ['metrics', 'other']"),
        (_extra_array_record, "array records ['arrays', 'other']"),
        (_config_record, "unexpected config records ['cfg']"),
        (lambda: _content(**{R.NUM_EXAMPLES: -30}), "num-examples -30 is not"),
        (lambda: _content(**{R.NUM_EXAMPLES: float("nan")}), "metric 'num-examples' is nan"),
        (lambda: _content(**{R.NUM_EXAMPLES: float("inf")}), "metric 'num-examples' is inf"),
        (lambda: _content(**{R.NUM_EXAMPLES: 10**9}), "not a whole number in [1, 1000000]"),
        (lambda: _content(**{R.NUM_EXAMPLES: 2.5}), "num-examples 2.5 is not"),
        (lambda: _content(**{"updates-torch": 2}), "metric 'updates-torch' is 2, not 1"),
        (
            lambda: _content(**{"updates-torch": 1, "updates-litert": 1}),
            "unexpected ['updates-torch']",
        ),
    ],
)
def test_a_malformed_reply_is_rejected_every_round_and_the_rest_averaged(
    bad: Callable[[], RecordDict], reason: str
) -> None:
    # Execute
    strategy, final = _run(bad)

    # Assert: the run finished, node 4 was rejected in both rounds, the rest averaged.
    for rnd in (1, 2):
        ledger = strategy.ledger[rnd]
        assert (ledger.replies, ledger.rejected, ledger.skipped) == (4, 1, 0)
        assert any(reason in r for r in ledger.reasons), ledger.reasons
    np.testing.assert_allclose(final["w"], HONEST)


@pytest.mark.parametrize("aggregation", ["fedavg", "median", "trimmed-mean:0.2"])
def test_every_node_claiming_zero_examples_skips_the_round_not_the_run(aggregation: str) -> None:
    strategy = EdgeKDStrategy(
        reference_state=REFERENCE,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        aggregator=robust_aggregator(aggregation),
    )
    grid = FakeGrid([1, 2, 3], lambda node, msg: _content(**{R.NUM_EXAMPLES: 0}))

    result = strategy.start(grid, state_to_record(REFERENCE), num_rounds=2)

    assert [strategy.ledger[r].skipped for r in (1, 2)] == [1, 1]
    assert (strategy.ledger[1].empty, strategy.ledger[1].rejected) == (3, 0)
    assert result.arrays is not None


def test_a_node_with_an_empty_share_is_counted_not_rejected_and_not_averaged() -> None:
    # A fleet of thousands splitting a small pool leaves honest nodes with no examples:
    # their replies are valid, carry no weight, and are not reported as attacks.
    strategy, final = _run(lambda: _content(100.0, **{R.NUM_EXAMPLES: 0}))

    for rnd in (1, 2):
        ledger = strategy.ledger[rnd]
        assert (ledger.replies, ledger.empty, ledger.rejected, ledger.skipped) == (4, 1, 0, 0)
        assert ledger.reasons == []
    np.testing.assert_allclose(final["w"], HONEST)


def test_updates_are_counted_by_the_backend_their_node_names() -> None:
    # Prepare: nodes 1-3 say nothing (a continual or older node), node 4 trained on LiteRT
    strategy, final = _run(lambda: _content(**{R.BACKEND_METRICS["litert"]: 1}))

    # Assert: counted, never averaged into the metrics, and the round as usual
    for rnd in (1, 2):
        ledger = strategy.ledger[rnd]
        assert (ledger.updates_litert, ledger.updates_torch, ledger.rejected) == (1, 0, 0)
        assert "updates_litert" in ledger.counters()
    np.testing.assert_allclose(final["w"], HONEST)


def test_inflated_examples_within_the_bound_are_capped_at_ten_medians() -> None:
    # Prepare: three honest nodes at 1.0 with 10 examples; node 4 claims 900 000 at 100.0.
    def bad() -> RecordDict:
        return _content(100.0, **{R.NUM_EXAMPLES: 900_000})

    # Execute
    strategy, final = _run(bad, rounds=1)

    # Assert: weight 100 (10 x median 10), not 900 000: (3*10*1 + 100*100) / 130
    assert strategy.ledger[1].rejected == 0
    np.testing.assert_allclose(final["w"], (30 + 100 * 100) / 130, rtol=1e-5)


def test_a_scaled_update_is_clipped_to_the_norm_bound() -> None:
    # Execute: node 4 sends its change times 1e6; the bound is 3 median norms.
    strategy, final = _run(lambda: _content(1e6), rounds=1, norm_bound=3.0)

    # Assert: its change is cut to 3x an honest one: (3*1 + 3) / 4 = 1.5, not 250 000.
    assert strategy.ledger[1].clipped == 1
    np.testing.assert_allclose(final["w"], 1.5, rtol=1e-5)


def test_trimmed_mean_trims_one_at_each_end_where_beta_alone_trims_none() -> None:
    # Execute: beta 0.2 of 4 updates is 0.8: FedTrimmedAvg would trim nothing.
    strategy, final = _run(lambda: _content(1e6), rounds=1, aggregation="trimmed-mean:0.2")

    # Assert
    assert strategy.ledger[1].rejected == 0
    np.testing.assert_allclose(final["w"], HONEST)


@pytest.mark.parametrize(
    "post", ["raises", "nan"], ids=["step raises (DivergenceError)", "step returns NaN"]
)
def test_a_failed_server_step_keeps_the_previous_student(post: str) -> None:
    class DivergenceError(RuntimeError):
        pass

    def step(rnd: int, arrays: ArrayRecord, masks: object) -> ArrayRecord:
        if post == "raises":
            raise DivergenceError("server distillation diverged")
        return state_to_record({k: np.full_like(v, np.nan) for k, v in REFERENCE.items()})

    strategy, final = _run(_content, rounds=2, post_aggregate=step)

    assert [strategy.ledger[r].skipped for r in (1, 2)] == [1, 1]
    assert any("aggregation:" in r for r in strategy.ledger[1].reasons)
    np.testing.assert_array_equal(final["w"], REFERENCE["w"])


def test_an_aggregator_that_raises_skips_the_round() -> None:
    from flwr.serverapp.strategy import FedAvg

    class Broken(FedAvg):
        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            raise ZeroDivisionError("division by zero")

    strategy = EdgeKDStrategy(
        reference_state=REFERENCE,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        aggregator=Broken(),
    )
    grid = FakeGrid([1, 2], lambda node, msg: _content())

    result = strategy.start(grid, state_to_record(REFERENCE), num_rounds=2)

    assert strategy.ledger[2].skipped == 1
    assert "ZeroDivisionError" in strategy.ledger[1].reasons[-1]
    assert result.arrays is not None


def test_evaluation_replies_are_validated_too() -> None:
    # Prepare: node 3 claims 1e9 evaluation examples at accuracy 0.99999; node 4 an
    # accuracy above 1; nodes 1 and 2 score 0.5.
    def reply(node: int, msg: Message) -> RecordDict | None:
        if msg.metadata.message_type != "evaluate":
            return _content()
        accuracy, examples = {3: (0.99999, 10**9), 4: (1.5, 10)}.get(node, (0.5, 10))
        values = {R.ACCURACY: accuracy, R.LOSS: 1.0, R.NUM_EXAMPLES: examples}
        return RecordDict({R.METRICS: MetricRecord(values)})

    strategy = EdgeKDStrategy(
        reference_state=REFERENCE,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    grid = FakeGrid([1, 2, 3, 4], reply)

    # Execute
    result = strategy.start(grid, state_to_record(REFERENCE), num_rounds=1)

    # Assert
    assert strategy.ledger[1].eval_rejected == 2
    assert result.evaluate_metrics_clientapp[1][R.ACCURACY] == pytest.approx(0.5)


def test_bounds_themselves() -> None:
    assert bounded_weights([10, 12, 8, 900_000]) == [10, 12, 8, 110]
    base = {"w": np.zeros(4, np.float32)}
    updates = [{"w": np.full(4, v, np.float32)} for v in (1.0, 1.0, 1.0, 100.0)]
    clipped, scales = clip_update_norms(updates, base, 3.0)
    assert scales[:3] == [1.0, 1.0, 1.0] and math.isclose(scales[3], 0.03, rel_tol=1e-6)
    np.testing.assert_allclose(clipped[3]["w"], 3.0, rtol=1e-6)
    unchanged, _ = clip_update_norms(updates, base, 0.0)
    np.testing.assert_array_equal(unchanged[3]["w"], 100.0)
