"""Device bundles: build, verify (sha256), re-check on this host, refuse to overwrite."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from edgekd.deploy.bundle import BundleError, build_bundle, check_bundle, load_bundle
from edgekd.deploy.parity import ParityError

DATA = Path(__file__).resolve().parents[1] / "data"
# The default run's student and its data (tests/data/README.md): 4 000 test samples,
# so the profile's 1-point and 3 % thresholds are 40 and 120 samples, not one or two.
STUDENT = DATA / "student_w16_default.pt"
RUN_CONFIG = {"seed": 42}
PI_FILES = {
    "student_int8.onnx",
    "student_fp32.onnx",
    "train_step.onnx",
    "train_infer.onnx",
    "step_layout.json",
    "step_params.npz",
    "parity.npz",
    "client.toml",
    "edgekd-client.service",
    "README.md",
    "manifest.json",
}


def _run_dir(root: Path) -> Path:
    """A run folder as `edgekd simulate` leaves it: student.pt next to report.json."""
    run = root / "run"
    run.mkdir()
    shutil.copy(STUDENT, run / "student.pt")
    (run / "report.json").write_text(json.dumps({"config": RUN_CONFIG}))
    return run


@pytest.fixture(scope="module")
def pi_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One raspberry-pi bundle for the read-only tests (copied before any change)."""
    root = tmp_path_factory.mktemp("pi")
    run = _run_dir(root)
    return build_bundle(
        run / "student.pt", "raspberry-pi", root / "bundle", superlink="10.1.2.3:9092"
    )


@pytest.fixture
def pi_copy(pi_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pi_bundle, tmp_path / "bundle"))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_raspberry_pi_bundle_verifies_and_describes_itself(pi_bundle: Path) -> None:
    # Execute
    bundle = load_bundle(pi_bundle)

    # Assert
    assert {p.name for p in pi_bundle.iterdir()} == PI_FILES
    manifest = bundle.manifest
    assert set(manifest["files"]) == PI_FILES - {"manifest.json"}
    assert bundle.inference_model.name == "student_int8.onnx"
    assert manifest["model"]["input_shape"] == [1, 40]
    assert manifest["model"]["num_features"] == 160  # width 16 x 10 positions
    assert manifest["model"]["num_classes"] == 10
    assert manifest["profile"]["name"] == "raspberry-pi"
    assert manifest["data"]["num_samples"] == 20000
    int8 = manifest["files"]["student_int8.onnx"]
    assert int8["precision"] == "int8"
    assert int8["parity"]["samples"] == 4000
    assert int8["parity"]["top1_agreement"] >= 0.97  # the profile's gate, with room
    assert manifest["build_host"]["onnxruntime"] == onnxruntime.__version__
    assert manifest["build_host"]["machine"] and "int8_kernel" in manifest["build_host"]
    assert manifest["files"]["student_fp32.onnx"]["parity"]["max_abs_logit_diff"] < 1e-4
    step = manifest["files"]["train_step.onnx"]["parity"]
    assert step["max_abs_logit_diff"] < 1e-4 and step["top1_agreement"] == 1.0
    assert step["step"]["max_abs_gradient_diff"] < 1e-4
    assert step["step"]["loss"] == pytest.approx(step["step"]["torch_loss"], rel=1e-5)
    assert int8["bytes"] < manifest["files"]["student_fp32.onnx"]["bytes"]
    client = tomllib.loads((pi_bundle / "client.toml").read_text())["client"]
    assert client["superlink"] == "10.1.2.3:9092"
    assert (client["backend"], client["model"], client["threads"]) == (
        "onnxruntime",
        "student_int8.onnx",
        4,
    )
    assert client["root_certificates"] == "" and client["node_key"] == ""
    unit = (pi_bundle / "edgekd-client.service").read_text()
    assert "ExecStart=/opt/edgekd/venv/bin/edgekd client start --bundle /opt/edgekd/bundle" in unit
    readme = (pi_bundle / "README.md").read_text()
    assert "journalctl -u edgekd-client" in readme and "--no-deps" in readme
    assert client["train_step"] == "train_step.onnx"
    assert client["step_layout"] == "step_layout.json" and "head_step" not in client
    layout = json.loads((pi_bundle / "step_layout.json").read_text())
    assert layout["optimizer"] == "adam" and layout["names"][-1] == "head.bias"
    with np.load(pi_bundle / "step_params.npz") as params:
        assert params["head.weight"].shape == (10, 160) and len(params.files) == 8


@pytest.mark.parametrize("name", ["student_int8.onnx", "step_params.npz", "client.toml"])
def test_changed_byte_is_named(pi_copy: Path, name: str) -> None:
    # Prepare: flip one byte in the middle of the file.
    path = pi_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(BundleError, match=f"file {name} changed \\(sha256"):
        load_bundle(pi_copy)


def test_deleted_file_is_named(pi_copy: Path) -> None:
    (pi_copy / "train_step.onnx").unlink()

    with pytest.raises(BundleError, match="file train_step.onnx missing"):
        load_bundle(pi_copy)


def test_malformed_or_unknown_manifest_is_refused(pi_copy: Path) -> None:
    manifest_path = pi_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match="unknown format_version 99"):
        load_bundle(pi_copy)

    manifest_path.write_text(json.dumps(manifest)[:-10])
    with pytest.raises(BundleError, match="manifest.json: malformed JSON"):
        load_bundle(pi_copy)

    manifest_path.unlink()
    with pytest.raises(BundleError, match="manifest.json missing"):
        load_bundle(pi_copy)


def test_check_bundle_reruns_parity_and_times_the_model(pi_bundle: Path) -> None:
    # Execute
    result = check_bundle(pi_bundle, threads=1, runs=20)

    # Assert
    assert result["ok"], result["problems"]
    assert result["verified_files"] == len(PI_FILES) - 1
    assert result["parity_samples"] == 1000  # PARITY_SAMPLES shipped
    assert result["host"] == result["build_host"]  # checked where it was built
    assert set(result["parity"]) == {"student_int8.onnx", "student_fp32.onnx", "train_step.onnx"}
    assert result["parity"]["train_step.onnx"]["max_abs_logit_diff"] < 1e-4
    fp32 = result["parity"]["student_fp32.onnx"]
    assert fp32["max_abs_logit_diff"] < 1e-4 and fp32["top1_agreement"] == 1.0
    int8 = result["parity"]["student_int8.onnx"]
    assert 0.97 <= int8["top1_agreement"] <= 1.0
    assert int8["torch_accuracy"] == fp32["torch_accuracy"]
    latency = result["latency"]
    assert (latency["model"], latency["threads"], latency["batch_size"]) == (
        "student_int8.onnx",
        1,
        1,
    )
    assert 0.0 < latency["p50_ms"] <= latency["p95_ms"]


def test_check_runs_without_torch(pi_bundle: Path) -> None:
    """A Raspberry Pi has no torch: the check must not import it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edgekd.deploy.bundle import check_bundle\n"
        f"result = check_bundle({str(pi_bundle)!r}, threads=1, runs=5)\n"
        "assert result['ok'], result['problems']\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_second_build_without_force_refuses_and_keeps_the_first(tmp_path: Path) -> None:
    # Prepare
    run = _run_dir(tmp_path)
    out = build_bundle(run / "student.pt", "raspberry-pi", tmp_path / "bundle")
    before = _digest(out)

    # Execute / Assert
    with pytest.raises(BundleError, match="is not empty; pass force=True"):
        build_bundle(run / "student.pt", "jetson", out)
    assert _digest(out) == before
    load_bundle(out)

    with pytest.raises(BundleError, match="is not a bundle"):  # force never deletes a run
        build_bundle(run / "student.pt", "jetson", run, force=True)
    assert (run / "student.pt").is_file()

    build_bundle(run / "student.pt", "jetson", out, force=True)
    assert load_bundle(out).profile.name == "jetson"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no leftovers


def test_parity_miss_fails_the_build_with_the_amount(tmp_path: Path) -> None:
    # Prepare: a profile that tolerates no logit difference at all in FP32.
    from edgekd.deploy.profiles import load_profile

    run = _run_dir(tmp_path)
    text = Path(load_profile("raspberry-pi").source).read_text()
    assert "max_abs_logit_diff_fp32 = 1e-4" in text
    strict = tmp_path / "strict.toml"
    strict.write_text(text.replace("max_abs_logit_diff_fp32 = 1e-4", "max_abs_logit_diff_fp32 = 0"))

    # Execute / Assert
    with pytest.raises(ParityError, match=r"max_abs_logit_diff_fp32 0 by [0-9.e-]+"):
        build_bundle(run / "student.pt", strict, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "strict.toml"]  # no temp folder


def test_missing_report_falls_back_to_default_data_and_says_so(tmp_path: Path) -> None:
    from edgekd.core.config import EdgeKDConfig
    from edgekd.deploy.bundle import _run_config

    cfg, note = _run_config(tmp_path)

    assert cfg == EdgeKDConfig()
    assert "no report.json" in note and "default config" in note


def test_jetson_bundle_ships_the_checkpoint_and_onnx(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)

    out = build_bundle(run / "student.pt", "jetson", tmp_path / "jetson")

    bundle = load_bundle(out)
    assert bundle.inference_model.name == "student.pt"
    assert (out / "student.pt").read_bytes() == STUDENT.read_bytes()
    assert "student_fp32.onnx" in bundle.manifest["files"]
    assert "head.npz" not in bundle.manifest["files"]  # full local KD, no head files
    result = check_bundle(out, threads=1, runs=5)
    assert result["ok"], result["problems"]
    assert result["parity"]["student.pt"]["max_abs_logit_diff"] == 0.0


@pytest.mark.skipif(
    importlib.util.find_spec("litert_torch") is None, reason="litert-torch is not installed"
)
def test_android_bundle_runs_on_litert(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)

    out = build_bundle(run / "student.pt", "android", tmp_path / "android")

    bundle = load_bundle(out)
    names = set(bundle.manifest["files"])
    assert {"student.tflite", "train_step.tflite", "step_layout.json", "step_params.npz"} <= names
    assert "edgekd-client.service" not in names and "head.npz" not in names
    result = check_bundle(out, threads=1, runs=5)
    assert result["ok"], result["problems"]
    assert result["parity"]["train_step.tflite"]["max_abs_logit_diff"] < 1e-4


def test_a_head_only_profile_ships_the_frozen_features_and_the_head_step(tmp_path: Path) -> None:
    # Prepare: the raspberry-pi profile for a device too small for the full step
    from edgekd.deploy.profiles import load_profile

    run = _run_dir(tmp_path)
    text = Path(load_profile("raspberry-pi").source).read_text()
    small = tmp_path / "pi-zero.toml"
    small.write_text(text.replace('mode = "full"', 'mode = "head-only"', 1))

    # Execute
    out = build_bundle(run / "student.pt", small, tmp_path / "bundle")

    # Assert
    names = set(load_bundle(out).manifest["files"])
    assert {"features.onnx", "head_step.onnx", "head.npz"} <= names
    assert not names & {"train_step.onnx", "step_layout.json", "step_params.npz"}
    manifest = load_bundle(out).manifest
    assert manifest["files"]["head_step.onnx"]["parity"]["max_abs_weight_diff"] < 1e-4
    result = check_bundle(out, threads=1, runs=5)
    assert result["ok"], result["problems"]
    assert result["parity"]["features.onnx"]["max_abs_logit_diff"] < 1e-4


def test_commands_build_and_check_exit_codes(
    pi_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the wiring as cli.py adds it.
    from edgekd.deploy.commands import register

    parser = argparse.ArgumentParser(prog="edgekd")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return int(args.func(args))

    # Execute / Assert: check prints JSON with the parity numbers.
    assert run("deploy", "check", str(pi_bundle), "--json", "--threads", "1") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parity"]["student_int8.onnx"]["samples"] == 1000

    assert run("deploy", "check", str(pi_bundle), "--threads", "1") == 0
    table = capsys.readouterr().out
    assert "student_int8.onnx" in table
    assert "this host:  " in table and "build host: " in table and "onnxruntime " in table

    assert run("deploy", "check", str(tmp_path / "absent")) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgekd: error: bundle folder not found") and err.count("\n") == 1

    model = str(_run_dir(tmp_path) / "student.pt")
    assert run("deploy", "build", "--model", model, "--target", "toaster", "--out", "x") == 2
    assert "unknown device profile 'toaster'" in capsys.readouterr().err
    bad_link = ("--superlink", "no-port", "--out", str(tmp_path / "c"))
    assert run("deploy", "build", "--model", model, "--target", "jetson", *bad_link) == 2
    assert "superlink must be HOST:PORT, got 'no-port'" in capsys.readouterr().err
    out = str(tmp_path / "b")
    assert run("deploy", "build", "--model", model, "--target", "jetson", "--out", out) == 0
    assert run("deploy", "build", "--model", model, "--target", "jetson", "--out", out) == 2
    assert "is not empty" in capsys.readouterr().err
