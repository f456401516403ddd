"""`edgekd simulate --scenario ...` input errors (one line, exit 2, before Ray starts) and the
comparison table it prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekd.cli.main import continual_table, main
from edgekd.learn.models import build_model, save_checkpoint, spec_for


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tasks", "3"], "need --scenario"),
        (["--cl-method", "ewc"], "need --scenario"),
        (["--scenario", "class-incremental", "--rounds", "4"], "--rounds-per-task"),
        (["--scenario", "class-incremental", "--baseline"], "--baseline does not apply"),
        (["--scenario", "class-incremental", "--tasks", "11"], "continual.tasks must be <= 10"),
        (["--scenario", "domain-incremental", "--rounds-per-task", "0"], "rounds-per-task"),
        (["--scenario", "class-incremental", "--dataset", "digits"], "mnist1d only"),
        (
            ["--scenario", "class-incremental", "--num-clients", "400"]
            + ["--set", "continual.samples-per-task=200"],
            "400 nodes share a task's training split of 151 samples",
        ),
        (
            ["--scenario", "class-incremental", "--partition", "pathological:3"],
            "a task of this stream holds 2",
        ),
    ],
)
def test_bad_continual_input_exits_with_one_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_teacher_of_another_architecture_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for((1, 8, 8), 10, 4)  # a digits teacher, offered for an mnist1d stream
    save_checkpoint(build_model(spec), spec, str(tmp_path / "t.pt"))
    monkeypatch.chdir(tmp_path)
    args = ["--scenario", "class-incremental", "--teacher", str(tmp_path / "t.pt")]
    code = main(["simulate", *args, "--set", "continual.samples-per-task=100"])
    assert code == 2
    assert "another architecture" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made


def test_continual_table_is_markdown_with_one_row_per_method() -> None:
    table = continual_table(
        {
            "teacher-kd": {
                "avg_accuracy": 0.7,
                "forgetting": 0.1,
                "bwt": -0.1,
                "fwt": 0.2,
                "wall_time": 12.3,
            },
            "naive": {"avg_accuracy": 0.1, "forgetting": None, "bwt": None, "fwt": None},
        }
    ).splitlines()
    assert table[0].startswith("| method | avg accuracy | forgetting | BWT | FWT |")
    assert table[2] == "| teacher-kd | 0.700 | 0.100 | -0.100 | 0.200 | 12 |"
    assert table[3] == "| naive | 0.100 | n/a | n/a | n/a | 0 |"
