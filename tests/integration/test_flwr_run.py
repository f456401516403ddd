"""`flwr run .` end to end on Flower's local simulation runtime (real processes).

`flwr run` submits the run to a managed local SuperLink and returns at once, so the
test polls `flwr ls --run-id` until the run is finished, then reads the report.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TOTAL_TIMEOUT = 300.0  # seconds for everything: start, run, report
POLL_INTERVAL = 2.0
NUM_ROUNDS = 2


def _flwr_run(flower_local, out_dir: Path, extra: list[str]) -> dict:
    """`flwr run .` on two simulated SuperNodes with the small run config plus ``extra``;
    polls until the run finishes and returns its report."""
    deadline = time.monotonic() + TOTAL_TIMEOUT

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"no finished run within {TOTAL_TIMEOUT:.0f}s\n{flower_local.diagnostics(run_id)}"
            )
        return left

    run_config = " ".join(
        [
            f"train.num-rounds={NUM_ROUNDS}",
            "data.num-samples=2000",
            "model.teacher-epochs=3",
            "train.warm-start-epochs=1",
            "train.local-epochs=1",
            "train.min-nodes=2",
            # The Ray test covers the on-device ONNX teacher; this one the proxy mode.
            "kd.soft-targets='proxy'",
            "kd.proxy-size=200",
            f"out-dir='{out_dir}'",
            *extra,
        ]
    )
    run_id: str | None = None
    started = flower_local.flwr_json(
        [
            "run",
            ".",
            flower_local.connection,
            "--federation-config",
            "num-supernodes=2 client-resources-num-cpus=1",
            "--run-config",
            run_config,
        ],
        timeout=min(remaining(), 120.0),
    )
    assert started.get("success") is True, started
    run_id = str(started["run-id"])

    status = ""
    while True:
        time.sleep(min(POLL_INTERVAL, remaining()))
        listing = flower_local.flwr_json(
            ["ls", flower_local.connection, "--run-id", run_id], timeout=min(remaining(), 60.0)
        )
        runs = [r for r in listing.get("runs", []) if str(r.get("run-id")) == run_id]
        assert runs, f"run {run_id} not listed: {listing}"
        status = runs[0]["status"]
        if status.startswith("finished"):
            break

    assert status == "finished:completed", (
        f"run {run_id} ended as {status!r}\n{flower_local.diagnostics(run_id)}"
    )
    report_path = out_dir / "report.json"
    assert report_path.is_file(), (
        f"no {report_path}; run folder holds "
        f"{sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else 'nothing'}\n"
        f"{flower_local.diagnostics(run_id)}"
    )
    return json.loads(report_path.read_text())


def test_flwr_run_local_simulation_writes_report(flower_local, tmp_path: Path):
    out_dir = tmp_path / "run"
    report = _flwr_run(flower_local, out_dir, [])
    assert [r["round"] for r in report["rounds"]] == list(range(NUM_ROUNDS + 1))
    accuracy = report["student"]["accuracy"]
    assert isinstance(accuracy, float) and math.isfinite(accuracy)
    assert 0.0 <= accuracy <= 1.0
    # The --run-config overrides reached the ServerApp.
    assert report["config"]["train.num-rounds"] == NUM_ROUNDS
    assert report["config"]["data.num-samples"] == 2000
    assert report["config"]["kd.soft-targets"] == "proxy"
    # Proxy mode ships public inputs with teacher probabilities every round, no ONNX teacher.
    assert report["rounds"][1]["bytes_down"] == report["rounds"][2]["bytes_down"]
    assert report["rounds"][1]["bytes_up"] > 0


def test_flwr_run_trains_a_student_per_device_class(flower_local, tmp_path: Path):
    # Two SuperNodes, one a class: each asked its class, then trained its class's width.
    report = _flwr_run(
        flower_local,
        tmp_path / "run",
        ["fleet.classes='pi:0.5,jetson:0.5'", "fleet.peer-weight=0.0"],
    )
    classes = report["fleet"]["classes"]
    assert [(n, c["width"], c["nodes"]) for n, c in classes.items()] == [
        ("pi", 16, 1),
        ("jetson", 32, 1),
    ]
    for block in classes.values():
        assert [r["round"] for r in block["rounds"]] == list(range(NUM_ROUNDS + 1))
        assert sum(r["replies"] - r["rejected"] - r["failures"] for r in block["rounds"][1:]) == 2
    assert (tmp_path / "run" / "students" / "jetson.pt").is_file()
