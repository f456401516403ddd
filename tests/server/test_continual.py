"""The continual federation against a fake Grid (no Ray): the strategy's task schedule, the
real client handler with per-node Contexts that persist across rounds, and the state each
node keeps (replay buffer, EWC Fisher, LwF snapshot, the proxy set) between rounds."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fakegrid import FakeGrid, node_contexts  # tests/server/fakegrid.py
from flwr.app import ConfigRecord, Context, Message, RecordDict

from edgekd.client.codec_mod import payload_codec_mod
from edgekd.client.continual_client import (
    META,
    PROXY_STATE,
    _make_regularizer,
    handle_continual_train,
    held_state,
)
from edgekd.continual import streams
from edgekd.continual.scenario import client_stream
from edgekd.continual.streams import task_client_split
from edgekd.core import records as R
from edgekd.core.config import PROXY_METHODS, EdgeKDConfig
from edgekd.core.round_settings import continual_round_config
from edgekd.learn.models import build_model, spec_for
from edgekd.server.continual import ContinualStrategy, TaskSchedule
from edgekd.server.continual_run import run_method
from edgekd.wire.payload import record_to_state, state_to_record

NODES = [11, 12]


class Federation:
    """Two simulated nodes: the real codec mod and continual handler, one Context per node
    kept across rounds (as the simulation engine keeps ``context.state``), and a record of
    each node's continual state after every round it trained."""

    def __init__(self, cfg: EdgeKDConfig, crash: set[tuple[int, int]] | None = None) -> None:
        self.cfg = cfg
        self.crash = crash or set()  # (round, node): the node loses its state and fails
        self.contexts = node_contexts(NODES, R.PARTITION_ID, R.NUM_PARTITIONS)
        self.states: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.tasks: dict[tuple[int, int], int] = {}
        self.received: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.examples: dict[tuple[int, int], int] = {}  # num-examples each reply reported
        self.grid = FakeGrid(NODES, self.reply)

    def reply(self, node: int, msg: Message) -> RecordDict | None:
        config = msg.content.config_records[R.CONFIG]
        rnd = int(config[R.ROUND])  # type: ignore[arg-type]
        context = self.contexts[node]
        if (rnd, node) in self.crash:
            context.state = RecordDict()  # a restarted device: its state is gone
            return None

        def handler(m: Message, c: Context) -> Message:
            self.received[rnd, node] = dict(record_to_state(m.content.array_records[R.ARRAYS]))
            return handle_continual_train(self.cfg, m, c)

        try:
            out = payload_codec_mod(msg, context, handler)
        except Exception:  # noqa: BLE001 - the real engine turns this into an error reply
            return None
        self.states[rnd, node] = copy.deepcopy(held_state(context))
        self.tasks[rnd, node] = int(context.state.config_records[META]["task"])  # type: ignore[arg-type]
        self.examples[rnd, node] = int(out.content.metric_records[R.METRICS][R.NUM_EXAMPLES])  # type: ignore[arg-type]
        return out.content


@pytest.fixture
def cfg(tmp_path: Path) -> EdgeKDConfig:
    """Two tiny class-incremental tasks, two rounds each, two IID nodes."""
    return EdgeKDConfig().with_overrides(
        {
            "continual.scenario": "class-incremental",
            "continual.tasks": 2,
            "continual.rounds-per-task": 2,
            "continual.samples-per-task": 200,
            "continual.buffer-size": 30,
            "continual.proxy-size": 40,
            "data.partition": "iid",
            "model.student-width": 4,
            "train.local-epochs": 1,
            "train.min-nodes": 2,
            "out-dir": str(tmp_path / "run"),
        }
    )


def _run(
    cfg: EdgeKDConfig, method: str, *, crash: set[tuple[int, int]] | None = None
) -> tuple[Federation, dict[str, Any], torch.nn.Module]:
    stream = client_stream(cfg)
    spec = spec_for(stream.input_shape, stream.num_classes, cfg.model.student_width)
    torch.manual_seed(0)
    initial = build_model(spec)
    proxy = None
    if method in PROXY_METHODS:  # any probabilities will do here: a fixed random "teacher"
        rng = np.random.default_rng(0)
        x = stream[0].x_test[: cfg.continual.proxy_size]
        probs = rng.dirichlet(np.ones(10), size=len(x)).astype(np.float32)
        proxy = state_to_record({R.PROXY_X: x, R.PROXY_PROBS: probs})
    fed = Federation(cfg, crash)
    summary, _, final = run_method(fed.grid, cfg, method, stream, spec, initial, proxy_record=proxy)
    return fed, summary, final


def test_task_schedule() -> None:
    schedule = TaskSchedule(tasks=3, rounds_per_task=2)
    assert schedule.num_rounds == 6
    assert [schedule.task_of(r) for r in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    assert [r for r in range(7) if schedule.ends_task(r)] == [2, 4, 6]
    with pytest.raises(ValueError, match="outside"):
        schedule.task_of(7)


def test_a_cosine_lr_decay_falls_over_each_task_and_restarts_with_the_next() -> None:
    assert [TaskSchedule(2, 4).lr_scale(r) for r in range(1, 9)] == [1.0] * 8
    cosine = TaskSchedule(2, 4, "cosine")
    scales = [cosine.lr_scale(r) for r in range(1, 9)]
    expected = [1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2]
    assert scales == pytest.approx(expected * 2)


def test_the_nodes_are_sent_the_tasks_decayed_learning_rate(cfg: EdgeKDConfig) -> None:
    # Execute
    fed, _, _ = _run(cfg.with_overrides({"continual.lr-decay": "cosine"}), "naive")

    # Assert: rounds 1-2 are task 0, 3-4 task 1: full lr, then half of it, in each task.
    sent = {
        int(m.content.config_records[R.CONFIG][R.ROUND]): m.content.config_records[R.CONFIG][R.LR]
        for m in fed.grid.sent
    }  # type: ignore[arg-type]
    lr = cfg.train.lr
    assert sent == pytest.approx({1: lr, 2: lr / 2, 3: lr, 4: lr / 2})


def test_the_task_advances_every_rounds_per_task_rounds(cfg: EdgeKDConfig) -> None:
    # Execute
    fed, summary, _ = _run(cfg, "naive")

    # Assert: every node is told task 0 in rounds 1-2 and task 1 in rounds 3-4.
    told = [
        (
            int(m.content.config_records[R.CONFIG][R.ROUND]),
            int(m.content.config_records[R.CONFIG][R.CL_TASK]),
        )  # type: ignore[arg-type]
        for m in fed.grid.sent
    ]
    assert sorted(told) == [(1, 0), (1, 0), (2, 0), (2, 0), (3, 1), (3, 1), (4, 1), (4, 1)]
    assert all(fed.tasks[r, n] == (r - 1) // 2 for r in range(1, 5) for n in NODES)
    # R has one row per task, scored after rounds 2 and 4; b comes from round 0.
    assert np.asarray(summary["matrix"]).shape == (2, 2)
    assert sorted(int(r) for r in summary["accuracy_per_round"]) == [0, 1, 2, 3, 4]
    assert summary["matrix"][0] == summary["accuracy_per_round"]["2"]
    assert summary["baseline"] == summary["accuracy_per_round"]["0"]


def test_a_node_with_no_share_of_a_task_replies_empty_and_learns_the_next(
    cfg: EdgeKDConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: node 12's Dirichlet share of task 1 is empty, as the partitioner's cache hands
    # it out (read-only). Seed 0's 10-node stream has such a node; it used to fail every
    # round from that task on.
    cfg = cfg.with_overrides({"continual.tasks": 3, "continual.rounds-per-task": 1})
    stream = client_stream(cfg)
    real = streams.partition_of

    def partition_of(labels: np.ndarray, spec: str, n: int, seed: int, pid: int) -> np.ndarray:
        share = real(labels, spec, n, seed, pid)
        empty = pid == 1 and set(np.unique(labels).tolist()) == set(stream[1].classes)
        return share[:0] if empty else share

    monkeypatch.setattr(streams, "partition_of", partition_of)

    # Execute
    fed, _, _ = _run(cfg, "lwf")

    # Assert: node 12 replies every round, with 0 examples for task 1 (the server counts that
    # as empty, not as a failure), and trains task 2 with both earlier tasks' classes seen.
    assert [fed.examples[r, 12] > 0 for r in (1, 2, 3)] == [True, False, True]
    assert all(fed.examples[r, 11] > 0 for r in (1, 2, 3))
    assert fed.tasks[3, 12] == 2
    seen = fed.states[3, 12]["seen_classes"].tolist()
    assert seen == sorted(stream[0].classes + stream[1].classes)


def test_replay_buffer_is_filled_at_the_task_change_and_survives_rounds(
    cfg: EdgeKDConfig,
) -> None:
    # Execute
    fed, _, _ = _run(cfg, "replay")

    # Assert: empty during task 0; at round 3 each node adds its own task-0 share (after_task
    # of task 0, run lazily) and the same buffer is still there after round 4.
    stream = client_stream(cfg)
    for i, node in enumerate(NODES):
        assert len(fed.states[1, node]["y"]) == 0 and len(fed.states[2, node]["y"]) == 0
        share = task_client_split(stream[0], "iid", i, len(NODES), cfg.seed)
        after = fed.states[3, node]
        assert int(after["n_seen"]) == len(share)
        assert len(after["y"]) == min(cfg.continual.buffer_size, len(share))
        assert set(after["y"].tolist()) <= set(stream[0].classes)
        later = fed.states[4, node]
        np.testing.assert_array_equal(later["x"], after["x"])
        np.testing.assert_array_equal(later["y"], after["y"])


def test_ewc_fisher_and_anchor_survive_between_rounds(cfg: EdgeKDConfig) -> None:
    # Execute
    fed, _, _ = _run(cfg, "ewc")

    # Assert: no Fisher while task 0 trains; at round 3 a positive Fisher anchored at the
    # global model the node received (the model at the end of task 0); unchanged in round 4.
    for node in NODES:
        assert fed.states[2, node] == {}
        third, fourth = fed.states[3, node], fed.states[4, node]
        fisher = [k for k in third if k.startswith("fisher.")]
        assert fisher and all(np.all(third[k] >= 0) for k in fisher)
        assert sum(float(third[k].sum()) for k in fisher) > 0
        for name, value in fed.received[3, node].items():
            if f"anchor.{name}" in third:
                np.testing.assert_array_equal(third[f"anchor.{name}"], value)
        assert third.keys() == fourth.keys()
        for key in third:
            np.testing.assert_array_equal(third[key], fourth[key])


def test_lwf_snapshot_is_taken_at_the_task_start_and_kept(cfg: EdgeKDConfig) -> None:
    # Execute
    fed, _, _ = _run(cfg, "lwf")

    # Assert: task 0 has no snapshot (nothing learned before it); from round 3 on the
    # snapshot is the model received in round 3, not the newer one of round 4.
    stream = client_stream(cfg)
    for node in NODES:
        assert [k for k in fed.states[2, node] if k.startswith("snapshot.")] == []
        assert fed.states[2, node]["seen_classes"].tolist() == []
        for rnd in (3, 4):
            state = fed.states[rnd, node]
            assert state["seen_classes"].tolist() == list(stream[0].classes)
            for name, value in fed.received[3, node].items():
                np.testing.assert_array_equal(state[f"snapshot.{name}"], value)
        assert any(
            not np.array_equal(fed.received[4, node][k], fed.received[3, node][k])
            for k in fed.received[3, node]
        )


def test_proxy_travels_once_per_node_and_again_after_a_lost_state(cfg: EdgeKDConfig) -> None:
    # Prepare: node 12 restarts in round 2 and loses everything it held.
    crash = {(2, NODES[1])}

    # Execute
    fed, _, _ = _run(cfg, "teacher-kd", crash=crash)

    # Assert
    with_proxy = [
        (int(m.content.config_records[R.CONFIG][R.ROUND]), m.metadata.dst_node_id)  # type: ignore[arg-type]
        for m in fed.grid.sent
        if R.PROXY in m.content.array_records
    ]
    assert sorted(with_proxy) == [(1, NODES[0]), (1, NODES[1]), (3, NODES[1])]
    assert PROXY_STATE in fed.contexts[NODES[1]].state.array_records
    assert (4, NODES[1]) in fed.states  # it trained again from its cache in round 4


@pytest.mark.parametrize("method", ["lwf-proxy", "replay-proxy"])
def test_the_same_proxy_comparators_get_the_proxy_set_and_carry_the_seen_classes(
    cfg: EdgeKDConfig, method: str
) -> None:
    # Execute
    fed, summary, _ = _run(cfg, method)

    # Assert: the proxy goes to each node once (round 1), the node keeps the classes of the
    # tasks that ended, and the run scores every task.
    with_proxy = sorted(
        (int(m.content.config_records[R.CONFIG][R.ROUND]), m.metadata.dst_node_id)  # type: ignore[arg-type]
        for m in fed.grid.sent
        if R.PROXY in m.content.array_records
    )
    assert with_proxy == [(1, NODES[0]), (1, NODES[1])]
    # lwf-proxy gets the inputs only: the teacher's probabilities are not shipped to it.
    sent = next(m for m in fed.grid.sent if R.PROXY in m.content.array_records)
    probs = sent.content.array_records[R.PROXY][R.PROXY_PROBS].numpy()
    assert probs.shape == ((len(probs), 0) if method == "lwf-proxy" else (len(probs), 10))
    stream = client_stream(cfg)
    for node in NODES:
        assert fed.states[2, node]["seen_classes"].tolist() == []
        assert fed.states[3, node]["seen_classes"].tolist() == list(stream[0].classes)
    assert np.asarray(summary["matrix"]).shape == (2, 2)


def test_teacher_kd_with_weight_zero_equals_naive_in_the_federation(cfg: EdgeKDConfig) -> None:
    # Prepare
    zero = cfg.with_overrides({"continual.weight": 0.0})

    # Execute
    _, naive, naive_model = _run(zero, "naive")
    _, kd, kd_model = _run(zero, "teacher-kd")

    # Assert: bit-identical students and accuracy matrices.
    for a, b in zip(naive_model.state_dict().values(), kd_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert naive["matrix"] == kd["matrix"]


def test_strategy_injects_the_task_and_keeps_rejecting_bad_updates(cfg: EdgeKDConfig) -> None:
    # Prepare: node 11 answers with NaN weights.
    stream = client_stream(cfg)
    spec = spec_for(stream.input_shape, stream.num_classes, cfg.model.student_width)
    torch.manual_seed(0)
    reference = {k: v.numpy().copy() for k, v in build_model(spec).state_dict().items()}
    fed = Federation(cfg)

    def reply(node: int, msg: Message) -> RecordDict | None:
        out = fed.reply(node, msg)
        if out is not None and node == NODES[0]:
            bad = {k: np.full_like(v, np.nan) for k, v in reference.items()}
            out = RecordDict({R.ARRAYS: state_to_record(bad), R.METRICS: out[R.METRICS]})
        return out

    fed.grid.reply = reply
    strategy = ContinualStrategy(
        schedule=TaskSchedule(2, 1),
        method="naive",
        run_tag="t",
        reference_state=reference,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
    )

    # Execute
    result = strategy.start(
        fed.grid,
        state_to_record(reference),
        num_rounds=2,
        train_config=ConfigRecord(dict(continual_round_config(cfg))),
    )

    # Assert
    assert [strategy.ledger[r].rejected for r in (1, 2)] == [1, 1]
    final = record_to_state(result.arrays)
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert [fed.tasks[r, NODES[1]] for r in (1, 2)] == [0, 1]


def test_a_round_record_says_why_a_node_failed(
    cfg: EdgeKDConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: node 12's share of task 1 cannot be cut (a partitioner error, as a node
    # with too few samples for its partition count meets it).
    real = streams.partition_of
    stream = client_stream(cfg)

    def partition_of(labels: np.ndarray, spec: str, n: int, seed: int, pid: int) -> np.ndarray:
        if pid == 1 and set(np.unique(labels).tolist()) == set(stream[1].classes):
            raise ValueError("this share cannot be cut")
        return real(labels, spec, n, seed, pid)

    monkeypatch.setattr(streams, "partition_of", partition_of)
    fed = Federation(cfg)

    def reply(node: int, msg: Message) -> RecordDict | None:
        out = fed.reply(node, msg)
        return out if out is not None else RecordDict()  # a reply with nothing in it

    fed.grid.reply = reply

    # Execute
    _, rounds, _ = run_method(
        fed.grid, cfg, "naive", stream, spec_for(stream.input_shape, 10, 4),
        build_model(spec_for(stream.input_shape, 10, 4)), proxy_record=None,
    )  # fmt: skip

    # Assert: rounds 3-4 (task 1) reject node 12's empty reply and say why; 1-2 are clean.
    assert [(r["round"], r["rejected"], len(r["reasons"])) for r in rounds] == [
        (0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 1, 1), (4, 1, 1),
    ]  # fmt: skip
    assert all(str(NODES[1]) in r["reasons"][0] for r in rounds[3:])


def test_lwf_and_lwf_proxy_take_their_own_weights(cfg: EdgeKDConfig) -> None:
    # Prepare: the round config as the server sends it, with two different weights
    tuned = cfg.with_overrides({"continual.weight": 1.5, "continual.lwf-proxy-weight": 0.25})
    config = ConfigRecord(dict(continual_round_config(tuned)))
    config[R.CL_METHOD] = "lwf"
    proxy = (np.zeros((4, 1, 40), dtype=np.float32), np.full((4, 10), 0.1, dtype=np.float32))

    # Execute
    lwf = _make_regularizer(config, None, 0, 0)
    config[R.CL_METHOD] = "lwf-proxy"
    lwf_proxy = _make_regularizer(config, proxy, 0, 0)

    # Assert
    assert (lwf.name, lwf.weight) == ("lwf", 1.5)  # type: ignore[attr-defined]
    assert (lwf_proxy.name, lwf_proxy.weight) == ("lwf-proxy", 0.25)  # type: ignore[attr-defined]


def test_the_continual_server_step_honours_the_server_learning_rate(cfg: EdgeKDConfig) -> None:
    # Prepare: one task of one round, at server lr 1 (plain FedAvg) and 0.5 (FedAvgM).
    one = cfg.with_overrides({"continual.tasks": 1, "continual.rounds-per-task": 1})
    half = one.with_overrides({"train.server-lr": 0.5})

    # Execute
    _, _, full_step = _run(one, "naive")
    fed, _, half_step = _run(half, "naive")

    # Assert: the nodes trained from the same start; the server moved half as far.
    start = {k: torch.from_numpy(v) for k, v in fed.received[1, NODES[0]].items()}
    for name, value in half_step.state_dict().items():
        full = full_step.state_dict()[name]
        expected = start[name] + 0.5 * (full - start[name])
        assert torch.allclose(value, expected, atol=1e-6), name
    assert not torch.allclose(full_step.state_dict()["head.weight"], start["head.weight"])
