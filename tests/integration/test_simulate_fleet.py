"""`edgekd simulate --set fleet.classes=...` on Flower's Ray simulation engine, then a
device bundle built from each class's student (small, seeded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_simulate import SMALL  # tests/integration/test_simulate.py

from edgekd.cli.main import main
from edgekd.deploy.bundle import build_bundle, load_bundle

PROFILES = Path(__file__).resolve().parents[2] / "edgekd" / "deploy" / "profiles"

pytestmark = pytest.mark.integration


def test_a_fleet_of_two_classes_simulates_and_bundles_each_class(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "run"

    # Execute
    code = main(
        ["simulate", "--num-clients", "4", "--rounds", "3", "--out", str(out), *SMALL]
        + ["--set", "fleet.classes=pi:0.5,jetson:0.5", "--set", "fleet.backends=profile"]
    )

    # Assert: a student per class, each trained by its own two nodes on its profile's
    # runtime (the Pi's through the onnxruntime step graphs), none rejected.
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    classes = report["fleet"]["classes"]
    assert list(classes) == ["pi", "jetson"]
    for block in classes.values():
        assert block["nodes"] == 2
        assert [r["round"] for r in block["rounds"]] == [0, 1, 2, 3]
        assert sum(r["replies"] for r in block["rounds"][1:]) == 2 * 3
        runtime = "onnxruntime" if block["profile"] == "raspberry-pi" else "torch"
        assert sum(r[f"updates_{runtime}"] for r in block["rounds"][1:]) == 2 * 3
        assert sum(r["rejected"] + r["failures"] for r in block["rounds"][1:]) == 0
        assert block["accuracy"] > 0.3  # chance is 0.1
        assert block["own_class"]["accuracy"] > 0.3
    assert classes["pi"]["params"] < classes["jetson"]["params"]
    # Each class's student bundles for its profile, with the run's data config. Three
    # rounds leave near-ties that INT8 rounding flips on some CPUs and not on others, so
    # the Pi class is bundled for the Pi profile at FP32 (the INT8 gate has its own tests).
    pi_fp32 = tmp_path / "raspberry-pi-fp32.toml"
    pi_text = (PROFILES / "raspberry-pi.toml").read_text()
    pi_fp32.write_text(pi_text.replace('precision = "int8"', 'precision = "fp32"'))
    for name, target in (("pi", pi_fp32), ("jetson", "jetson")):
        bundle = build_bundle(
            out / "students" / f"{name}.pt", target, tmp_path / f"bundle-{name}", run_dir=out
        )
        loaded = load_bundle(bundle)
        assert loaded.profile.backend == {"pi": "onnxruntime", "jetson": "torch"}[name]
        assert loaded.manifest["model"]["spec"]["width"] == classes[name]["width"]
