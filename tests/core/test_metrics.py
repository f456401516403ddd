"""Tests for edgekd.core.metrics against hand-computed numbers and a loop reference."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekd.core.metrics import (
    classification_metrics,
    expected_calibration_error,
    mean_kl,
    reliability_bins,
    teacher_agreement,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _loop_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Reference ECE with explicit (lo, hi] bins, the first also holding 0."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (confidence > lo) & (confidence <= hi)
        if b == 0:
            in_bin |= confidence == 0.0
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            total += in_bin.sum() / len(labels) * gap
    return total


# Bins of width 0.25 (exact in binary): A and B fall in (0.5, 0.75], C and D in (0.75, 1].
EDGE_PROBS = np.array([[0.75, 0.25], [0.6, 0.4], [1.0, 0.0], [0.0, 1.0]])
EDGE_LABELS = np.array([1, 0, 0, 0])


def test_ece_hand_example_with_upper_edges() -> None:
    # Prepare: bin (0.5,0.75]: acc 0.5, conf 0.675; bin (0.75,1]: acc 0.5, conf 1.0
    expected = 2 / 4 * abs(0.5 - 0.675) + 2 / 4 * abs(0.5 - 1.0)
    # Execute
    ece = expected_calibration_error(EDGE_PROBS, EDGE_LABELS, n_bins=4)
    # Assert
    assert ece == pytest.approx(expected)
    assert ece == pytest.approx(0.3375)


def test_ece_counts_confidence_exactly_one() -> None:
    # Prepare: a single confidently wrong sample; dropping conf == 1.0 would give 0
    probs = np.array([[1.0, 0.0]])
    labels = np.array([1])
    # Execute
    ece = expected_calibration_error(probs, labels)
    # Assert
    assert ece == pytest.approx(1.0)


def test_ece_matches_loop_reference_on_random_data() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 7)) * 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 7, size=500)
    # Execute
    ece = expected_calibration_error(probs, labels, n_bins=10)
    # Assert
    assert ece == pytest.approx(_loop_ece(probs, labels, 10))


def test_reliability_bins_hand_example() -> None:
    # Execute
    bins = reliability_bins(EDGE_PROBS, EDGE_LABELS, n_bins=4)
    # Assert
    assert set(bins) == {"bin_lower", "bin_upper", "accuracy", "confidence", "count"}
    assert bins["bin_lower"] == [0.0, 0.25, 0.5, 0.75]
    assert bins["bin_upper"] == [0.25, 0.5, 0.75, 1.0]
    assert bins["count"] == [0.0, 0.0, 2.0, 2.0]
    assert math.isnan(bins["accuracy"][0]) and math.isnan(bins["confidence"][1])
    assert bins["accuracy"][2:] == pytest.approx([0.5, 0.5])
    assert bins["confidence"][2:] == pytest.approx([0.675, 1.0])


def test_classification_metrics_hand_example() -> None:
    # Prepare: class 2 absent; sample 2 (label 1) is predicted as class 0
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 1])
    # Execute
    metrics = classification_metrics(probs, labels, num_classes=3)
    # Assert
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    recall = metrics["per_class_recall"]
    assert isinstance(recall, list) and len(recall) == 3
    assert recall[:2] == pytest.approx([1.0, 0.5]) and math.isnan(recall[2])
    assert metrics["macro_recall"] == pytest.approx(0.75)
    assert metrics["min_class_recall"] == pytest.approx(0.5)
    assert metrics["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.8) + math.log(0.4)) / 3)
    # Brier rows: 0.09+0.04+0.01, 0.01+0.04+0.01, 0.25+0.36+0.01
    assert metrics["brier"] == pytest.approx((0.14 + 0.06 + 0.62) / 3)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(probs, labels))


def test_classification_metrics_nll_clips_zero_probability() -> None:
    # Prepare
    probs = np.array([[1.0, 0.0]])
    labels = np.array([1])
    # Execute
    metrics = classification_metrics(probs, labels, num_classes=2)
    # Assert
    assert metrics["nll"] == pytest.approx(-math.log(1e-12))
    assert metrics["brier"] == pytest.approx(2.0)


def test_teacher_agreement_and_mean_kl_hand_numbers() -> None:
    # Prepare: top-1 agrees on rows 0 and 2 only; the teacher has an exact zero
    teacher = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [0.0, 1.0, 0.0]])
    student = np.array([[0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.2, 0.5, 0.3]])
    # Execute
    agreement = teacher_agreement(student, teacher)
    kl = mean_kl(teacher, student)
    # Assert
    assert agreement == pytest.approx(2 / 3)
    rows = [
        0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.3),
        0.1 * math.log(0.1 / 0.8) + 0.2 * math.log(0.2 / 0.1) + 0.7 * math.log(0.7 / 0.1),
        1.0 * math.log(1.0 / 0.5),
    ]
    assert kl == pytest.approx(sum(rows) / 3)
    assert mean_kl(teacher, teacher) == pytest.approx(0.0, abs=1e-15)


def test_mean_kl_finite_when_student_has_zero() -> None:
    kl = mean_kl(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]))
    assert math.isfinite(kl) and kl > 10.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: expected_calibration_error(np.ones((3, 2)) / 2, np.array([0, 1])), "length"),
        (lambda: expected_calibration_error(np.array([0.2, 0.8]), np.array([1])), "2-D"),
        (lambda: classification_metrics(np.ones((2, 2)) / 2, np.array([0, 1]), 3), "columns"),
        (lambda: classification_metrics(np.ones((2, 2)) / 2, np.array([0, 2]), 2), "labels"),
        (lambda: teacher_agreement(np.ones((2, 3)), np.ones((3, 3))), "shape mismatch"),
        (lambda: mean_kl(np.ones(3), np.ones((1, 3))), "teacher_probs must be 2-D"),
    ],
)
def test_metrics_reject_bad_shapes(call: object, match: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=match):
        call()


def test_metrics_module_imports_without_torch() -> None:
    # Prepare: a None entry in sys.modules makes `import torch` raise ImportError
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import edgekd.core.metrics as m\n"
        "import numpy as np\n"
        "print(m.expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])))\n"
    )
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Assert
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) == 0.0
