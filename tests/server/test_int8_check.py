"""`edgekd simulate` checks its own INT8 export with the raspberry-pi parity gate and
says loudly when it misses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekd.cli.main import int8_verdict
from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import FederatedData, load_federated_data
from edgekd.core.numerics import softmax
from edgekd.deploy.onnx_export import export_onnx_bytes
from edgekd.deploy.quantize import CALIBRATION_SAMPLES, quantize_onnx_int8
from edgekd.learn.models import load_checkpoint
from edgekd.learn.training import predict_logits
from edgekd.server.outputs import check_int8_export

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def default_data() -> FederatedData:
    cfg = EdgeKDConfig()
    return load_federated_data(cfg.data, cfg.seed)


def _int8_of(checkpoint: Path, data: FederatedData, out: Path) -> Path:
    model, _ = load_checkpoint(str(checkpoint))
    fp32 = export_onnx_bytes(model, data.input_shape)
    out.write_bytes(quantize_onnx_int8(fp32, data.public.x[:CALIBRATION_SAMPLES]))
    return out


def test_good_export_passes_and_names_its_host(default_data: FederatedData, tmp_path: Path) -> None:
    # Prepare: the default run's student and its own INT8 export.
    student, _ = load_checkpoint(str(DATA / "student_w16_default.pt"))
    int8 = _int8_of(DATA / "student_w16_default.pt", default_data, tmp_path / "s.int8.onnx")
    teacher_probs = softmax(predict_logits(student, default_data.test.x))

    # Execute
    block = check_int8_export(int8, student, default_data, teacher_probs)

    # Assert
    assert block["ok"] and block["problems"] == []
    assert block["profile"] == "raspberry-pi"
    parity = block["parity"]
    assert parity["samples"] == 4000 and parity["top1_agreement"] >= 0.97
    assert abs(parity["accuracy"] - parity["torch_accuracy"]) <= 0.01
    assert block["accuracy"] == parity["accuracy"] and block["bytes"] == int8.stat().st_size
    assert block["host"]["onnxruntime"] and block["host"]["int8_kernel"]
    line = int8_verdict(block)
    assert line.startswith("INT8 ONNX student: top-1 agreement with FP32 0.9")
    assert "raspberry-pi parity gate passed on " in line and "onnxruntime" in line


def test_broken_export_is_reported_loudly(default_data: FederatedData, tmp_path: Path) -> None:
    # Prepare: an INT8 file that is not this student (an untrained one of the same shape).
    student, _ = load_checkpoint(str(DATA / "student_w16_default.pt"))
    wrong = _int8_of(DATA / "student_w8.pt", default_data, tmp_path / "wrong.int8.onnx")
    probs = np.full((len(default_data.test), 10), 0.1)

    # Execute
    block = check_int8_export(wrong, student, default_data, probs)

    # Assert
    assert not block["ok"]
    assert any(
        "top-1 disagreement" in p and "max_top1_disagreement 0.03" in p for p in block["problems"]
    )
    assert any("accuracy drop" in p for p in block["problems"])
    line = int8_verdict(block)
    assert line.startswith("!!! INT8 ONNX student FAILS the raspberry-pi parity gate on ")
    assert "do not deploy student.int8.onnx" in line and "\n" not in line
