"""Checkpoints and resume: the whole server (`run_edgekd`) against a fake Grid whose
nodes run the real ClientApp, interrupted after round 2 and resumed from its checkpoint.
In one process the resumed run is bit-identical to an uninterrupted one: the
checkpoint carries the student, the pruning state and the RNG states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fakegrid import FakeGrid, node_contexts  # tests/server/fakegrid.py
from flwr.app import Message, RecordDict

from edgekd.client.app import make_client_app
from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig
from edgekd.learn.models import load_checkpoint
from edgekd.server.checkpoint import (
    CHECKPOINT_FILE,
    ResumeError,
    RunCheckpoint,
    capture_rng,
    load_run_checkpoint,
    restore_rng,
    save_run_checkpoint,
)
from edgekd.server.pipeline import run_edgekd

NODES = [21, 22]


class ServerKilled(RuntimeError):
    """Stands for the server process dying before it sends round ``kill_at``."""


def _federation(cfg: EdgeKDConfig, kill_at: int | None = None) -> FakeGrid:
    app = make_client_app(cfg)
    contexts = node_contexts(NODES, R.PARTITION_ID, R.NUM_PARTITIONS)

    def reply(node: int, msg: Message) -> RecordDict | None:
        rnd = int(msg.content.config_records[R.CONFIG][R.ROUND])  # type: ignore[arg-type]
        if kill_at is not None and rnd >= kill_at:
            raise ServerKilled(f"server gone before round {rnd}")
        return app(msg, contexts[node]).content

    return FakeGrid(NODES, reply)


def _cfg(out_dir: Path, **extra: object) -> EdgeKDConfig:
    return EdgeKDConfig().with_overrides(
        {
            "data.num-samples": 800,
            "data.partition": "iid",
            "model.teacher-width": 8,
            "model.student-width": 4,
            "model.teacher-epochs": 2,
            "train.warm-start-epochs": 1,
            "train.num-rounds": 4,
            "train.local-epochs": 1,
            "train.fraction-evaluate": 0.0,
            "kd.soft-targets": "proxy",
            "kd.proxy-size": 100,
            # Movement pruning keeps W0 and masks across rounds: the resumed server
            # must carry both on.
            "compression.prune": "movement:0.5",
            "compression.end-round": 3,
            "out-dir": str(out_dir),
            **extra,
        }
    )


def _student(out_dir: Path) -> dict[str, np.ndarray]:
    model, _ = load_checkpoint(str(out_dir / "student.pt"))
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    # Prepare: the reference run, and a run whose server dies before round 3.
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_edgekd(_federation(_cfg(whole)), _cfg(whole), show_progress=False)
    with pytest.raises(ServerKilled):
        run_edgekd(_federation(_cfg(broken), kill_at=3), _cfg(broken), show_progress=False)
    assert load_run_checkpoint(broken).round == 2
    assert not (broken / "report.json").exists()

    # Execute: a new server process would do exactly this.
    run_edgekd(_federation(_cfg(broken)), _cfg(broken, resume=True), show_progress=False)

    # Assert
    expected, got = _student(whole), _student(broken)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    report = json.loads((broken / "report.json").read_text())
    reference = json.loads((whole / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2, 3, 4]
    assert report["student"]["accuracy"] == reference["student"]["accuracy"]
    assert report["student"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert load_run_checkpoint(broken).round == 4


def test_a_resumed_run_carries_the_server_momentum_on(tmp_path: Path) -> None:
    # Prepare: FedAvgM (configs/device-adapted.toml's server step); no pruning, for speed.
    momentum = {"train.server-momentum": 0.5, "compression.prune": "", "train.num-rounds": 3}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_edgekd(_federation(_cfg(whole, **momentum)), _cfg(whole, **momentum), show_progress=False)
    with pytest.raises(ServerKilled):
        run_edgekd(
            _federation(_cfg(broken, **momentum), kill_at=3),
            _cfg(broken, **momentum),
            show_progress=False,
        )
    saved = load_run_checkpoint(broken)
    assert saved.round == 2 and any(k.startswith("server-momentum/") for k in saved.arrays)

    # Execute
    resumed = _cfg(broken, **momentum, resume=True)
    run_edgekd(_federation(resumed), resumed, show_progress=False)

    # Assert: round 3's server step used the momentum of rounds 1-2, as the whole run did.
    expected, got = _student(whole), _student(broken)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


LEAN = {
    "compression.start-round": 0,  # pruned on the server before round 1
    "compression.quantize": "int8",
    "compression.download": "delta",
    "compression.upload": "int4-delta",  # no error feedback: nodes restart with no state
    "compression.entropy": "zlib",
}


@pytest.mark.slow
def test_a_resumed_run_on_the_lean_wire_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    # Prepare: the restarted server knows no node's state, so it sends whole states
    # again; the downlink is lossless, so the nodes decode the same students.
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_edgekd(_federation(_cfg(whole, **LEAN)), _cfg(whole, **LEAN), show_progress=False)
    with pytest.raises(ServerKilled):
        run_edgekd(
            _federation(_cfg(broken, **LEAN), kill_at=3), _cfg(broken, **LEAN), show_progress=False
        )

    # Execute
    cfg = _cfg(broken, resume=True, **LEAN)
    run_edgekd(_federation(cfg), cfg, show_progress=False)

    # Assert
    expected, got = _student(whole), _student(broken)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    report = json.loads((whole / "report.json").read_text())
    assert [round(r["sparsity"], 2) for r in report["rounds"]] == [0.5] * 5  # from round 0
    assert sum(r["rejected"] + r["failures"] for r in report["rounds"]) == 0
    resumed = json.loads((broken / "report.json").read_text())["rounds"]
    assert resumed[3]["bytes_down"] > resumed[4]["bytes_down"]  # whole states, then deltas


def test_resume_refuses_another_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    save_run_checkpoint(
        tmp_path,
        RunCheckpoint(
            round=1,
            state={"w": np.zeros(2, np.float32)},
            rounds=[],
            teacher_sha256="x",
            config={**cfg.to_flat(), "kd.temperature": 9.0},
        ),
    )
    with pytest.raises(ResumeError, match=r"kd.temperature: 9.0 -> 4.0"):
        run_edgekd(_federation(cfg), _cfg(tmp_path, resume=True), show_progress=False)


def test_resume_without_a_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match=CHECKPOINT_FILE):
        run_edgekd(_federation(_cfg(tmp_path)), _cfg(tmp_path, resume=True), show_progress=False)


def test_checkpoint_round_trips_and_a_corrupt_one_is_named(tmp_path: Path) -> None:
    # Prepare
    rng = capture_rng()
    expected = float(np.random.rand())
    ckpt = RunCheckpoint(
        round=3,
        state={"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3)},
        rounds=[{"round": 0, "accuracy": 0.5}],
        teacher_sha256="abc",
        config={"seed": 1},
        pruner={"mask/head.weight": np.array([[True, False, True]] * 2)},
        pruner_initial_round=1,
        rng=rng,
        extra={"structure": {"rank": 2}},
    )

    # Execute
    path = save_run_checkpoint(tmp_path, ckpt)
    back = load_run_checkpoint(tmp_path)
    restore_rng(back.rng)

    # Assert
    assert float(np.random.rand()) == expected  # the RNG continues where it was captured
    assert (back.round, back.rounds, back.teacher_sha256, back.extra) == (
        3,
        ckpt.rounds,
        "abc",
        ckpt.extra,
    )
    np.testing.assert_array_equal(back.state["head.weight"], ckpt.state["head.weight"])
    np.testing.assert_array_equal(back.pruner["mask/head.weight"], ckpt.pruner["mask/head.weight"])
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temp file left
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ResumeError, match="unreadable checkpoint"):
        load_run_checkpoint(tmp_path)
