"""`edgekd simulate --scenario ...` end to end on Flower's Ray simulation engine (tiny, seeded):
all seven methods on a two-task class-incremental stream, one round per task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edgekd.cli.main import main
from edgekd.core.config import CONTINUAL_METHODS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A teacher that learns in seconds, 3 clients, 1 000 samples (5 classes) a task.
SMALL_KEYS = (
    "continual.samples-per-task=1000",
    "continual.proxy-size=200",
    "model.teacher-epochs=30",
    "model.teacher-width=16",
    "train.local-epochs=2",
)
SMALL = [arg for key in SMALL_KEYS for arg in ("--set", key)]


def test_simulate_continual_writes_every_methods_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = tmp_path / "run"

    # Execute
    code = main(
        [
            "simulate",
            "--scenario",
            "class-incremental",
            "--tasks",
            "2",
            "--rounds-per-task",
            "1",
            "--cl-method",
            "all",
            "--num-clients",
            "3",
            "--partition",
            "iid",
            "--seed",
            "0",
            "--out",
            str(out),
            *SMALL,
        ]
    )

    # Assert
    assert code == 0
    comparison = json.loads((out / "continual.json").read_text())
    assert list(comparison["continual"]) == list(CONTINUAL_METHODS)
    assert comparison["teacher"]["avg_accuracy"] > 0.5  # it learned both tasks (chance 0.2)
    printed = capsys.readouterr().out
    assert "| method | avg accuracy | forgetting | BWT | FWT | wall time (s) |" in printed
    for method in CONTINUAL_METHODS:
        report = json.loads((out / method / "report.json").read_text())
        block = report["continual"][method]
        matrix = block["matrix"]
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
        for key in ("avg_accuracy", "forgetting", "bwt", "fwt", "wall_time"):
            assert math.isfinite(block[key]), (method, key)
        assert block["avg_accuracy"] == pytest.approx(sum(matrix[1]) / 2)
        assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
        assert [r["task"] for r in report["rounds"]] == [None, 0, 1]
        assert sum(r["failures"] + r["rejected"] for r in report["rounds"]) == 0
        assert report["config"]["continual.method"] == method
        for name in (
            "rounds.jsonl",
            "student.pt",
            "continual_matrix.png",
            "continual_accuracy.png",
        ):
            assert (out / method / name).stat().st_size > 0, (method, name)
        # Every method learned something of the first task (chance: 0.2, five classes).
        assert matrix[0][0] > 0.3, method
    # Round 2 is each node's first round of task 1. EWC's Fisher and LwF's seen classes come
    # from task 0's after_task, run lazily there on what the node kept in context.state in
    # round 1 (its run and task): a penalty above 0 means that state survived in Ray's node
    # state; a fresh state would start task 1 without one, as naive fine-tuning does.
    for method in ("ewc", "lwf", "lwf-proxy"):
        rounds = json.loads((out / method / "report.json").read_text())["rounds"]
        assert rounds[1]["penalty"] == 0.0 and rounds[2]["penalty"] > 0.0, method
    replay, from_proxy, naive = (
        comparison["continual"][m]["matrix"][1] for m in ("replay", "replay-proxy", "naive")
    )
    assert replay != naive  # the buffer of task-0 samples was replayed in round 2
    assert from_proxy != naive  # and the proxy samples the teacher labels 0 or 1
    kd = json.loads((out / "teacher-kd" / "report.json").read_text())
    # The proxy set went to each of the 3 nodes in round 1 only.
    assert kd["rounds"][1]["bytes_down"] > kd["rounds"][2]["bytes_down"]
