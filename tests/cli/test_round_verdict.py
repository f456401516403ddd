"""The verdict `edgekd simulate` gives on its run folder's rounds: a warning for skipped
rounds, exit code 1 when a run skipped all of them, with the reason a node gave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekd.cli.main import round_verdict

RAY_ERROR = "ray::ClientAppActor.run()\n  File x\nMessage: The number of partitions needs"


def _write(path: Path, skipped: list[int], reasons: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rounds = [{"round": 0, "skipped": 0, "failures": 0, "rejected": 0}] + [
        {"round": i + 1, "skipped": s, "failures": 2 * s, "rejected": 0, "reasons": reasons or []}
        for i, s in enumerate(skipped)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rounds))


def test_a_run_that_skipped_every_round_fails_naming_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "rounds.jsonl", [1, 1, 1], [f"node 7: {RAY_ERROR}"])
    assert round_verdict(tmp_path) == 1
    err = capsys.readouterr().err
    assert "error: 3 of 3 rounds skipped" in err and "6 failed" in err
    assert "never left its starting point" in err
    assert "first reason: Message: The number of partitions needs" in err


def test_some_skipped_rounds_warn_and_a_clean_run_says_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "naive" / "rounds.jsonl", [0, 1, 0])  # a method's folder of `all`
    _write(tmp_path / "ewc" / "rounds.jsonl", [0, 0, 0])
    assert round_verdict(tmp_path) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning: 1 of 3 rounds skipped" in err[0]
    assert str(tmp_path / "naive" / "rounds.jsonl") in err[0]
    _write(tmp_path / "naive" / "rounds.jsonl", [0, 0, 0])
    assert round_verdict(tmp_path) == 0
    assert capsys.readouterr().err == ""
