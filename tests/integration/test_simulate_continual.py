"""`edgekd simulate --scenario ...` end to end on Flower's Ray simulation engine (tiny, seeded):
all seven methods on a two-task class-incremental stream, one round per task; and a run
interrupted with Ctrl-C that resumes on fresh nodes."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from processes import BIN_DIR, flower_env_for, kill_tagged  # tests/integration/processes.py

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


RESUME_ARGS = [
    "simulate",
    "--scenario",
    "class-incremental",
    "--tasks",
    "3",
    "--rounds-per-task",
    "2",
    "--cl-method",
    "ewc",
    "--num-clients",
    "3",
    "--partition",
    "iid",
    "--seed",
    "0",
    *SMALL,
    "--set",
    "train.local-epochs=30",  # about 2 s a round here: time to interrupt mid-run
]


def _checkpoint_round(out: Path) -> int:
    from edgekd.server.checkpoint import ResumeError, load_run_checkpoint

    try:
        return load_run_checkpoint(out).round
    except ResumeError:  # not written yet
        return 0


def test_an_interrupted_continual_simulation_resumes_on_fresh_ray_nodes(tmp_path: Path) -> None:
    # Prepare: the reference run; then a real `edgekd simulate` process, stopped with
    # Ctrl-C (SIGINT) once it has checkpointed round 2 of 6, which takes Ray's nodes
    # and their EWC state (Fisher, anchor) with it.
    tag = uuid.uuid4().hex
    env = flower_env_for(tmp_path / "cache", tag)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main([*RESUME_ARGS, "--out", str(whole)]) == 0
    command = [str(BIN_DIR / "edgekd"), *RESUME_ARGS, "--out", str(broken)]
    try:
        with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL) as run:
            deadline = time.monotonic() + 300
            while _checkpoint_round(broken) < 2 and run.poll() is None:
                assert time.monotonic() < deadline, "no checkpoint of round 2 in 300 s"
                time.sleep(0.2)
            run.send_signal(signal.SIGINT)
            run.wait(timeout=60)
    finally:
        kill_tagged(tag)
    stopped_at = _checkpoint_round(broken)
    assert 2 <= stopped_at < 6, f"the run was not interrupted mid-way (round {stopped_at})"
    assert not (broken / "report.json").exists()
    assert run.returncode == 130, f"Ctrl-C ended the run with status {run.returncode}"

    # Execute
    code = main([*RESUME_ARGS, "--out", str(broken), "--set", "resume=true"])

    # Assert: the same accuracy matrix and rounds as the uninterrupted run; the nodes
    # that the resumed server met got the task-start history, so the EWC penalty of
    # every later round is on (a node that started over would have none in task 1).
    assert code == 0
    got = json.loads((broken / "report.json").read_text())
    expected = json.loads((whole / "report.json").read_text())
    got_matrix, expected_matrix = (
        [v for row in r["continual"]["ewc"]["matrix"] for v in row] for r in (got, expected)
    )
    assert got_matrix == pytest.approx(expected_matrix, abs=0.005)
    assert [r["round"] for r in got["rounds"]] == list(range(7))
    assert all(r["penalty"] > 0 for r in got["rounds"][3:])
    assert (
        got["rounds"][stopped_at + 1]["bytes_down"]
        > expected["rounds"][stopped_at + 1]["bytes_down"]
    )
