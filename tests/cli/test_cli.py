"""`edgekd simulate` input errors: non-zero exit, one line naming the problem, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgekd.learn.models import build_model, save_checkpoint, spec_for


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekd.cli", "simulate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--num-clients", "0"], "--num-clients must be >= 1"),
        (["--partition", "dirichlet:0"], "'dirichlet:0' needs alpha > 0"),
        (["--set", "kd.temprature=3"], "unknown config key 'kd.temprature'"),
        (["--set", "novalue"], "--set expects key=value"),
        (["--config", "missing.toml"], "config file not found: missing.toml"),
        (["--dataset", "mnist", "--data-dir", "nowhere"], "nowhere"),
        (["--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
        (["--set", "sim.client-cpus=0"], "sim.client-cpus must be > 0"),
        (
            ["--num-clients", "600", "--set", "data.num-samples=1000"],
            "600 nodes share the device pool of 500 samples",
        ),
    ],
)
def test_bad_input_exits_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    result = _run(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_teacher_of_another_architecture_is_refused(tmp_path: Path) -> None:
    spec = spec_for((1, 8, 8), 10, 4)  # a digits teacher, offered for mnist1d
    save_checkpoint(build_model(spec), spec, str(tmp_path / "t.pt"))
    result = _run(
        "--teacher", str(tmp_path / "t.pt"), "--set", "data.num-samples=500", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "another architecture" in result.stderr and "cnn2d" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_toml_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("kd = [unclosed")
    result = _run("--config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.toml is not valid TOML" in result.stderr


def test_inspect_rejects_a_corrupt_student(tmp_path: Path) -> None:
    spec = spec_for((1, 40), 10, 4)
    save_checkpoint(build_model(spec), spec, str(tmp_path / "t.pt"))
    (tmp_path / "s.onnx").write_bytes(b"garbage")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgekd.cli",
            "inspect",
            "--teacher",
            str(tmp_path / "t.pt"),
            "--student",
            str(tmp_path / "s.onnx"),
            "--set",
            "data.num-samples=500",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "s.onnx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_inspect_needs_models(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgekd.cli", "inspect"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert "give --teacher and --student, or --run RUN_DIR" in result.stderr
