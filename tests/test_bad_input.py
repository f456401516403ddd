"""Bad input of every kind exits 2 with one line naming the problem, and no command
destroys or rewrites what a finished run or a bundle holds."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekd.cli.main import main
from edgekd.core.config import EdgeKDConfig
from edgekd.server.checkpoint import RunCheckpoint, save_run_checkpoint

DATA = Path(__file__).resolve().parent / "data"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekd: error: "), err
    return lines[0]


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    """A run folder as `edgekd simulate` leaves it (the files that mark a run)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(DATA / "student_w16_default.pt", run / "student.pt")
    (run / "report.json").write_text(json.dumps({"config": {"seed": 42}, "student": {}}))
    (run / "rounds.jsonl").write_text('{"round": 0}\n')
    save_run_checkpoint(
        run,
        RunCheckpoint(
            round=2,
            state={"w": np.zeros(3, np.float32)},
            rounds=[{"round": 0}, {"round": 1}, {"round": 2}],
            teacher_sha256="0" * 64,
            config=EdgeKDConfig(out_dir=str(run)).to_flat(),
        ),
    )
    return run


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
        (["--seed", str(2**64)], "seed must be in [0, 2**32)"),
        (["--set", "train.lr=inf"], "train.lr must be a finite number, got inf"),
        (["--set", "kd.temperature=nan"], "kd.temperature must be a finite number"),
        (["--set", "train.aggregation=trimmed-mean:0"], "beta 0 trims nothing"),
        (["--set", "train.max-examples=0"], "train.max-examples must be >= 1"),
    ],
)
def test_simulate_refuses_bad_values(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    line = _one_line_exit_2(["simulate", "--out", str(tmp_path / "r"), *argv], capsys)
    assert needle in line
    assert not (tmp_path / "r").exists()


def test_simulate_refuses_a_finished_run_and_changes_no_file(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _digest(finished_run)

    line = _one_line_exit_2(["simulate", "--out", str(finished_run)], capsys)

    assert "already holds a run (report.json, checkpoint.npz, rounds.jsonl" in line
    assert "--force" in line
    assert _digest(finished_run) == before


def test_simulate_refuses_an_unwritable_out_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("x")

    line = _one_line_exit_2(["simulate", "--out", str(tmp_path / "a-file" / "run")], capsys)

    assert "--out" in line and "is not writable" in line


def test_server_start_refuses_a_finished_run_and_config_drift_before_writing(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _digest(finished_run)

    line = _one_line_exit_2(["server", "start", "--insecure", "--out", str(finished_run)], capsys)
    assert "already holds a run" in line

    resume = ["server", "start", "--insecure", "--resume", str(finished_run)]
    line = _one_line_exit_2([*resume, "--set", "train.lr=0.5"], capsys)
    assert "started with another config (train.lr: 0.01 -> 0.5)" in line
    assert not (finished_run / "superlink.log").exists()  # no process was started
    assert _digest(finished_run) == before


@pytest.mark.parametrize("damage", ["empty", "not-a-zip", "meta"])
def test_server_start_names_a_broken_checkpoint(
    finished_run: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = finished_run / "checkpoint.npz"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "not-a-zip":
        path.write_bytes(b"PK\x03\x04 truncated")
    else:  # metadata without its fields
        meta = np.frombuffer(json.dumps({"format": 1, "round": "two"}).encode(), np.uint8)
        np.savez(path, **{"__meta__": meta})

    line = _one_line_exit_2(
        ["server", "start", "--insecure", "--resume", str(finished_run)], capsys
    )

    assert "checkpoint.npz" in line and ("unreadable" in line or "malformed" in line)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bootstrap", "-5"], "--bootstrap must be >= 1, got -5"),
        (["--out", "/proc/edgekd-no/such"], "--out /proc/edgekd-no/such is not writable"),
    ],
)
def test_inspect_refuses_bad_flags(
    argv: list[str], needle: str, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _one_line_exit_2(["inspect", "--run", str(finished_run), *argv], capsys)
    assert needle in line


@pytest.mark.parametrize("report", ['{"config": {"seed": 4', '{"student": {}}', '{"config": 3}'])
def test_inspect_names_a_report_without_a_config(
    report: str, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (finished_run / "report.json").write_text(report)

    line = _one_line_exit_2(["inspect", "--run", str(finished_run)], capsys)

    assert "report.json" in line and "config" in line


@pytest.fixture(scope="module")
def pi_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgekd.deploy.bundle import build_bundle

    root = tmp_path_factory.mktemp("pi")
    return build_bundle(DATA / "student_w16_default.pt", "raspberry-pi", root / "bundle")


def _reseal(bundle: Path, name: str, data: bytes) -> None:
    """Replace a file and its manifest sha256, as an attacker without a signature would."""
    (bundle / name).write_bytes(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("entry", "the entry of file step_params.npz is not an object"),
        ("model", "student_int8.onnx: the runtime cannot load or run it"),
        ("parity", "parity.npz: unreadable"),
        ("reference", "student_fp32.onnx: cannot be run here"),
    ],
)
def test_deploy_check_names_a_damaged_bundle(
    pi_bundle: Path, damage: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = Path(shutil.copytree(pi_bundle, tmp_path / "bundle"))
    noise = np.random.default_rng(0).bytes(4096)
    if damage == "entry":
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"]["step_params.npz"] = "not an object"
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    else:
        name = {"model": "student_int8.onnx", "parity": "parity.npz"}.get(
            damage, "student_fp32.onnx"
        )
        _reseal(bundle, name, noise)

    line = _one_line_exit_2(["deploy", "check", str(bundle), "--threads", "1"], capsys)

    assert needle in line


def test_no_traceback_reaches_the_terminal(tmp_path: Path) -> None:
    """The same through a real process: exit 2, one line on stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "edgekd.cli", "simulate", "--seed", "-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["edgekd: error: seed must be in [0, 2**32), got -1"]
