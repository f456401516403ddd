"""Continual runs resume: the whole continual server (`run_continual`) against a fake Grid
whose nodes run the real ClientApp, killed mid-run and resumed on *fresh* nodes (their
state is gone, as after a restart), must end bit-identical to an uninterrupted run; a
resume under another config, with another teacher or without a complete method's
report is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakegrid import FakeGrid, node_contexts  # tests/server/fakegrid.py
from flwr.app import Message, MessageType, RecordDict

from edgekd.client.app import make_client_app
from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig
from edgekd.learn.models import load_checkpoint, save_checkpoint
from edgekd.server.checkpoint import ResumeError, load_run_checkpoint
from edgekd.server.continual_run import run_continual

NODES = [31, 32]


class ServerKilled(RuntimeError):
    """Stands for the server process dying while it waits for a training reply."""


class Nodes:
    """Two nodes with the real ClientApp and their own Contexts; a new ``Nodes`` is a
    restarted federation (no state). ``kill_after`` training replies, the server dies."""

    def __init__(self, cfg: EdgeKDConfig, kill_after: int | None = None) -> None:
        self.app = make_client_app(cfg)
        self.contexts = node_contexts(NODES, R.PARTITION_ID, R.NUM_PARTITIONS)
        self.kill_after, self.trained, self.history = kill_after, 0, 0
        self.grid = FakeGrid(NODES, self.reply)

    def reply(self, node: int, msg: Message) -> RecordDict | None:
        if msg.metadata.message_type == MessageType.TRAIN:
            if self.kill_after is not None and self.trained >= self.kill_after:
                raise ServerKilled(f"server gone after {self.trained} training replies")
            self.trained += 1
            self.history += R.HISTORY in msg.content.array_records
        return self.app(msg, self.contexts[node]).content


def _cfg(out_dir: Path, **extra: object) -> EdgeKDConfig:
    """Three tiny class-incremental tasks, two rounds each, two IID nodes."""
    return EdgeKDConfig().with_overrides(
        {
            "continual.scenario": "class-incremental",
            "continual.tasks": 3,
            "continual.rounds-per-task": 2,
            "continual.samples-per-task": 150,
            "continual.buffer-size": 20,
            "continual.proxy-size": 40,
            "data.partition": "iid",
            "model.teacher-width": 4,
            "model.teacher-epochs": 2,
            "model.student-width": 4,
            "train.local-epochs": 1,
            "train.min-nodes": 2,
            "out-dir": str(out_dir),
            **extra,
        }
    )


def _student(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(str(path))
    return dict(model.state_dict())


def _assert_same_student(got: Path, expected: Path) -> None:
    a, b = _student(got), _student(expected)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("ewc", {}),
        ("lwf", {}),
        ("replay", {}),
        ("teacher-kd", {}),
        ("naive", {"train.server-momentum": 0.5}),  # FedAvgM's buffer goes on too
    ],
)
def test_a_method_resumed_mid_task_on_fresh_nodes_equals_the_uninterrupted_run(
    tmp_path: Path, method: str, extra: dict[str, object]
) -> None:
    # Prepare: the reference run, and one whose server dies in round 4 (task 1), after
    # three complete rounds (6 training replies).
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    settings = {"continual.method": method, **extra}
    run_continual(Nodes(_cfg(whole, **settings)).grid, _cfg(whole, **settings), show_progress=False)
    cfg = _cfg(broken, **settings)
    with pytest.raises(ServerKilled):
        run_continual(Nodes(cfg, kill_after=7).grid, cfg, show_progress=False)
    assert load_run_checkpoint(broken).round == 3
    assert not (broken / "report.json").exists()

    # Execute: a new server and new nodes, which hold no state.
    fresh = Nodes(cfg)
    run_continual(fresh.grid, _cfg(broken, resume=True, **settings), show_progress=False)

    # Assert: each fresh node got the history once (round 4) and rebuilt its state from it.
    assert fresh.history == len(NODES)
    _assert_same_student(broken / "student.pt", whole / "student.pt")
    got = json.loads((broken / "report.json").read_text())
    expected = json.loads((whole / "report.json").read_text())
    assert got["continual"][method]["matrix"] == expected["continual"][method]["matrix"]
    assert [r["round"] for r in got["rounds"]] == list(range(7))
    assert [r["task_accuracy"] for r in got["rounds"]] == [
        r["task_accuracy"] for r in expected["rounds"]
    ]


def test_without_the_history_a_fresh_node_would_not_rebuild_its_state(tmp_path: Path) -> None:
    # Prepare: the same interrupted EWC run, resumed on nodes that drop the history.
    cfg = _cfg(tmp_path / "broken", **{"continual.method": "ewc"})
    whole = _cfg(tmp_path / "whole", **{"continual.method": "ewc"})
    run_continual(Nodes(whole).grid, whole, show_progress=False)
    with pytest.raises(ServerKilled):
        run_continual(Nodes(cfg, kill_after=7).grid, cfg, show_progress=False)
    fresh = Nodes(cfg)
    answer = fresh.grid.reply

    def drop_history(node: int, msg: Message) -> RecordDict | None:
        if R.HISTORY in msg.content.array_records:
            del msg.content.array_records[R.HISTORY]
        return answer(node, msg)

    fresh.grid.reply = drop_history

    # Execute
    run_continual(
        fresh.grid,
        _cfg(tmp_path / "broken", resume=True, **{"continual.method": "ewc"}),
        show_progress=False,
    )

    # Assert: the test above can fail: without the history the student differs.
    a, b = _student(tmp_path / "broken" / "student.pt"), _student(tmp_path / "whole" / "student.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_comparison_resumed_in_its_second_method_keeps_the_first(tmp_path: Path) -> None:
    # Prepare: all seven methods; the server dies in the second (lwf-proxy), round 3.
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_continual(
        Nodes(_cfg(whole, **{"continual.method": "all"})).grid,
        _cfg(whole, **{"continual.method": "all"}),
        show_progress=False,
    )
    cfg = _cfg(broken, **{"continual.method": "all"})
    with pytest.raises(ServerKilled):
        run_continual(Nodes(cfg, kill_after=12 + 5).grid, cfg, show_progress=False)
    first = (broken / "teacher-kd" / "report.json").read_bytes()
    assert not (broken / "lwf-proxy" / "report.json").exists()

    # Execute
    run_continual(
        Nodes(cfg).grid,
        _cfg(broken, resume=True, **{"continual.method": "all"}),
        show_progress=False,
    )

    # Assert: the first method's report is the one written before the crash; every
    # method's matrix equals the uninterrupted run's.
    assert (broken / "teacher-kd" / "report.json").read_bytes() == first
    got = json.loads((broken / "continual.json").read_text())["continual"]
    expected = json.loads((whole / "continual.json").read_text())["continual"]
    assert got.keys() == expected.keys()
    for method in expected:
        assert got[method]["matrix"] == expected[method]["matrix"], method
        _assert_same_student(broken / method / "student.pt", whole / method / "student.pt")


@pytest.fixture
def interrupted(tmp_path: Path) -> Path:
    """An EWC run killed after round 3, with its teacher and checkpoint on disk."""
    cfg = _cfg(tmp_path / "run", **{"continual.method": "ewc"})
    with pytest.raises(ServerKilled):
        run_continual(Nodes(cfg, kill_after=6).grid, cfg, show_progress=False)
    return tmp_path / "run"


def test_resume_under_another_config_is_refused_and_writes_nothing(interrupted: Path) -> None:
    # Prepare
    before = {p.name: p.read_bytes() for p in interrupted.iterdir() if p.is_file()}
    cfg = _cfg(interrupted, resume=True, **{"continual.method": "ewc", "continual.weight": 3.0})

    # Execute / Assert
    with pytest.raises(ResumeError, match=r"continual.weight: 1.0 -> 3.0"):
        run_continual(Nodes(cfg).grid, cfg, show_progress=False)
    assert {p.name: p.read_bytes() for p in interrupted.iterdir() if p.is_file()} == before


def test_resume_with_another_teacher_is_refused(interrupted: Path) -> None:
    # Prepare: teacher.pt replaced by another model of the same shape.
    model, spec = load_checkpoint(str(interrupted / "teacher.pt"))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(model, spec, str(interrupted / "teacher.pt"))
    cfg = _cfg(interrupted, resume=True, **{"continual.method": "ewc"})

    # Execute / Assert
    with pytest.raises(ResumeError, match="not the teacher the checkpoint was made with"):
        run_continual(Nodes(cfg).grid, cfg, show_progress=False)


def test_resume_without_a_checkpoint_or_a_complete_methods_report_is_refused(
    tmp_path: Path,
) -> None:
    # Prepare: a folder with no checkpoint; a complete run whose report was deleted.
    cfg = _cfg(tmp_path / "empty", resume=True)
    (tmp_path / "empty").mkdir()
    done = _cfg(tmp_path / "done", **{"continual.method": "naive"})
    run_continual(Nodes(done).grid, done, show_progress=False)
    (tmp_path / "done" / "report.json").unlink()
    again = _cfg(tmp_path / "done", resume=True, **{"continual.method": "naive"})

    # Execute / Assert
    with pytest.raises(ResumeError, match="no checkpoint to resume from"):
        run_continual(Nodes(cfg).grid, cfg, show_progress=False)
    with pytest.raises(ResumeError, match=r"naive is complete, but its report is missing"):
        run_continual(Nodes(again).grid, again, show_progress=False)
    assert load_run_checkpoint(tmp_path / "done").round == 6  # the checkpoint is still there
