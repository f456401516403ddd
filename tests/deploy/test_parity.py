"""Parity numbers of exported students against the torch student, and the threshold check."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekd.deploy.parity import (
    ParityError,
    ParityResult,
    check_parity,
    measure_latency,
    measure_parity,
    parity_problems,
    run_parity,
    tflite_predictor,
    torch_predictor,
)
from edgekd.deploy.profiles import load_profile

DATA = Path(__file__).resolve().parents[1] / "data"


def test_measure_parity_counts_agreement_and_accuracy() -> None:
    # Prepare: 4 samples; the export flips sample 3's top-1 (to the right class).
    reference = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 0.5]])
    logits = reference + np.array([[0.1, 0.0], [0.0, 0.0], [0.0, 0.0], [-0.6, 0.0]])
    labels = np.array([0, 1, 1, 1])

    # Execute
    result = measure_parity(
        logits, reference, labels, model_file="m.onnx", precision="int8", runtime="onnxruntime"
    )

    # Assert
    assert result.samples == 4
    assert result.max_abs_logit_diff == pytest.approx(0.6)
    assert result.top1_agreement == pytest.approx(0.75)
    assert result.accuracy == pytest.approx(0.75)  # samples 0, 1, 3
    assert result.torch_accuracy == pytest.approx(0.5)  # samples 0, 1
    assert result.accuracy_drop == pytest.approx(-0.25)


def _result(**changes: Any) -> ParityResult:
    base = measure_parity(
        np.eye(4), np.eye(4), np.arange(4), model_file="s.onnx", precision="int8", runtime="ort"
    )
    return dataclasses.replace(base, **changes)


def test_parity_miss_raises_naming_threshold_and_amount() -> None:
    # Prepare: raspberry-pi allows 3 % disagreement and a 1-point accuracy drop.
    profile = load_profile("raspberry-pi")
    result = _result(top1_agreement=0.9, accuracy=0.80, torch_accuracy=0.85)

    # Execute / Assert
    with pytest.raises(ParityError) as excinfo:
        check_parity(result, profile)
    message = str(excinfo.value)
    assert "s.onnx: top-1 disagreement 0.1 exceeds raspberry-pi's max_top1_disagreement" in message
    assert "by 0.07" in message
    assert "accuracy drop 0.05 exceeds raspberry-pi's max_accuracy_drop 0.01 by 0.04" in message


def test_logit_tolerance_applies_to_fp32_exports_only() -> None:
    profile = load_profile("raspberry-pi")
    int8 = _result(max_abs_logit_diff=2.0)
    fp32 = _result(max_abs_logit_diff=2.0e-4, precision="fp32")

    assert parity_problems(int8, profile) == []
    (problem,) = parity_problems(fp32, profile)
    assert "max_abs_logit_diff_fp32 0.0001 by 0.0001" in problem
    check_parity(_result(), profile)  # passes: no exception


def test_onnx_and_tflite_exports_match_the_torch_student() -> None:
    # Prepare: the fixture student, its ONNX export and its committed static-batch TFLite file.
    import tempfile

    from edgekd.deploy.onnx_export import export_onnx_bytes
    from edgekd.learn.models import load_checkpoint

    model, _ = load_checkpoint(str(DATA / "student_w8.pt"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 1, 40)).astype(np.float32)
    y = rng.integers(0, 10, size=7)
    reference = torch_predictor(model)(x)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp, "s.onnx")
        onnx_path.write_bytes(export_onnx_bytes(model, (1, 40)))

        # Execute
        onnx_result = run_parity(onnx_path, x, y, reference, precision="fp32")
    tflite_logits = tflite_predictor(DATA / "student_w8.tflite")(x)  # 7 calls of batch 1

    # Assert
    assert onnx_result.runtime == "onnxruntime"
    assert onnx_result.max_abs_logit_diff < 1e-4
    assert onnx_result.top1_agreement == 1.0
    assert tflite_logits.shape == (7, 10)
    assert np.abs(tflite_logits - reference).max() < 1e-4


def test_measure_latency_reports_percentiles() -> None:
    timing = measure_latency(lambda x: x * 2, np.ones((1, 4)), warmup=2, runs=20)

    assert timing["runs"] == 20
    assert 0.0 < timing["p50_ms"] <= timing["p95_ms"]
