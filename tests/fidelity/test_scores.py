"""Tests for edgekd.fidelity.scores against independent references.

References: torchmetrics' MulticlassCalibrationError for ECE, scipy.stats.kendalltau for
Kendall tau-b, brute force over the vertices of the L-infinity ball for the linear-head
certificate, a plain loop for the bootstrap, and hand-computed small cases.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import kendalltau

from edgekd.core.metrics import classification_metrics, expected_calibration_error
from edgekd.fidelity.scores import (
    apply_temperature,
    bootstrap_intervals,
    certified_accuracy_curve,
    certified_radius,
    dark_knowledge_entropy,
    fit_temperature,
    kendall_tau_per_sample,
    l1_certificate,
    max_dark_knowledge_entropy,
    minority_majority_ece,
    per_class_ece,
    rank_order_fidelity,
    uq_fidelity,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _random_probs(n: int, k: int, seed: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(n, k))
    labels = rng.integers(0, k, size=n)
    return softmax(logits, axis=1), labels


# ------------------------------------------------------------------ module boundary
def test_fidelity_imports_without_torch() -> None:
    # Prepare: a fresh interpreter in which importing torch fails
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import edgekd.fidelity.scores\n"
        "print('ok', 'flwr' in sys.modules)"
    )
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )
    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "False"]


# ------------------------------------------------------------------ calibration
def test_ece_matches_torchmetrics() -> None:
    # Prepare: softmax probabilities with no confidence at exactly 1.0 or on a bin edge
    torchmetrics = pytest.importorskip("torchmetrics.classification")
    probs, labels = _random_probs(3000, 10, seed=0)
    assert probs.max() < 1.0
    metric = torchmetrics.MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    # Execute
    ours = expected_calibration_error(probs, labels)
    theirs = float(metric(torch.from_numpy(probs), torch.from_numpy(labels)))
    # Assert
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_ece_counts_confidence_exactly_one() -> None:
    # Prepare: two one-hot rows (one right, one wrong) and one row at 0.7, all by hand:
    # last bin: acc 1/2, conf 1.0 -> (2/3)|0.5 - 1|; bin (0.667, 0.733]: (1/3)|1 - 0.7|
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.7, 0.3]])
    labels = np.array([0, 1, 0])
    # Execute
    ece = expected_calibration_error(probs, labels)
    # Assert
    assert ece == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 0.3)


def test_per_class_ece_restricts_to_each_true_class() -> None:
    # Prepare: class 0 rows both right at 0.9 (|1 - 0.9|), class 1 row wrong at 0.8
    # (|0 - 0.8|), class 2 absent
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.8, 0.1, 0.1]])
    labels = np.array([0, 0, 1])
    # Execute
    values = per_class_ece(probs, labels, num_classes=3)
    # Assert
    assert values[0] == pytest.approx(0.1)
    assert values[1] == pytest.approx(0.8)
    assert math.isnan(values[2])


def test_minority_majority_ece_splits_at_median_training_count() -> None:
    # Prepare: counts [5, 100, 50, 7] -> median 28.5: classes 0, 3 minority, 1, 2 majority
    probs, labels = _random_probs(400, 4, seed=1)
    counts = np.array([5, 100, 50, 7])
    minority = np.isin(labels, [0, 3])
    # Execute
    result = minority_majority_ece(probs, labels, counts)
    # Assert
    assert result["minority_classes"] == [0, 3]
    assert result["majority_classes"] == [1, 2]
    assert result["median_count"] == 28.5
    assert result["minority_ece"] == pytest.approx(
        expected_calibration_error(probs[minority], labels[minority])
    )
    assert result["majority_ece"] == pytest.approx(
        expected_calibration_error(probs[~minority], labels[~minority])
    )


def test_minority_majority_ece_balanced_counts_have_no_minority() -> None:
    # Prepare
    probs, labels = _random_probs(50, 3, seed=2)
    # Execute
    result = minority_majority_ece(probs, labels, [10, 10, 10])
    # Assert
    assert result["minority_classes"] == []
    assert math.isnan(float(result["minority_ece"]))  # type: ignore[arg-type]


def test_temperature_scaling_lowers_nll_of_overconfident_logits() -> None:
    # Prepare: labels drawn from softmax(z), logits reported 4x too sharp
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4000, 6))
    labels = np.array([rng.choice(6, p=p) for p in softmax(z, axis=1)])
    overconfident = 4.0 * z
    before = classification_metrics(apply_temperature(overconfident, 1.0), labels, 6)
    # Execute
    t = fit_temperature(overconfident, labels)
    after = classification_metrics(apply_temperature(overconfident, t), labels, 6)
    # Assert
    assert t > 1.0
    assert after["nll"] < before["nll"]
    assert after["ece"] < before["ece"]


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_scaling_recovers_known_temperature(true_t: float) -> None:
    # Prepare: labels sampled from softmax(z / T0): the NLL minimiser is near T0
    rng = np.random.default_rng(4)
    z = 3.0 * rng.normal(size=(20000, 5))
    p = softmax(z / true_t, axis=1)
    labels = (p.cumsum(axis=1) > rng.random((len(p), 1))).argmax(axis=1)
    # Execute
    t = fit_temperature(z, labels)
    # Assert
    assert t == pytest.approx(true_t, rel=0.1)


def test_apply_temperature_rejects_non_positive() -> None:
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(np.zeros((2, 3)), 0.0)


# ------------------------------------------------------------------ rank order
def test_kendall_tau_matches_scipy_with_ties() -> None:
    # Prepare: rounded logits create ties in both teacher and student rows
    rng = np.random.default_rng(5)
    teacher = np.round(rng.normal(size=(200, 7)), 1)
    student = np.round(teacher + 0.7 * rng.normal(size=(200, 7)), 0)
    # Execute
    ours = kendall_tau_per_sample(teacher, student)
    # Assert
    reference = np.array(
        [kendalltau(t, s).statistic for t, s in zip(teacher, student, strict=True)]
    )
    np.testing.assert_allclose(ours, reference, atol=1e-12)


def test_kendall_tau_constant_row_is_nan_and_skipped_in_mean() -> None:
    # Prepare: row 0 reversed order (tau -1), row 1 constant student (undefined)
    teacher = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    student = np.array([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    # Execute
    tau = kendall_tau_per_sample(teacher, student)
    summary = rank_order_fidelity(teacher, student, ks=(1,))
    # Assert
    assert tau[0] == pytest.approx(-1.0)
    assert math.isnan(tau[1])
    assert summary["mean_kendall_tau"] == pytest.approx(-1.0)


def test_top_k_retention_by_hand() -> None:
    # Prepare: teacher top-1 is class 0 in every row; the student ranks it 1st, 2nd, 4th
    teacher = np.tile([4.0, 3.0, 2.0, 1.0], (3, 1))
    student = np.array([[9.0, 1.0, 1.0, 1.0], [5.0, 6.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    # Execute
    result = rank_order_fidelity(teacher, student, ks=(1, 2, 3, 4))
    # Assert
    assert result["top1_retention"] == pytest.approx(1 / 3)
    assert result["top2_retention"] == pytest.approx(2 / 3)
    assert result["top3_retention"] == pytest.approx(2 / 3)
    assert result["top4_retention"] == pytest.approx(1.0)


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_matches_loop_reference() -> None:
    # Prepare: a plain reference with the same generator stream, one resample at a time
    probs, labels = _random_probs(300, 4, seed=6)
    rng = np.random.default_rng(11)
    idx = rng.integers(0, 300, size=(200, 300))
    acc = [(probs[i].argmax(axis=1) == labels[i]).mean() for i in idx]
    nll = [classification_metrics(probs[i], labels[i], 4)["nll"] for i in idx]
    # Execute
    ci = bootstrap_intervals(probs, labels, n_resamples=200, seed=11, level=0.9)
    # Assert
    assert ci["accuracy"]["lower"] == pytest.approx(np.percentile(acc, 5))
    assert ci["accuracy"]["upper"] == pytest.approx(np.percentile(acc, 95))
    assert ci["nll"]["lower"] == pytest.approx(np.percentile(nll, 5))
    full = classification_metrics(probs, labels, 4)
    for name in ("accuracy", "nll", "brier"):
        assert ci[name]["point"] == pytest.approx(full[name])
        assert ci[name]["lower"] <= ci[name]["point"] <= ci[name]["upper"]


def test_bootstrap_is_reproducible_under_seed() -> None:
    # Prepare
    probs, labels = _random_probs(500, 5, seed=7)
    # Execute
    first = bootstrap_intervals(probs, labels, n_resamples=300, seed=1)
    again = bootstrap_intervals(probs, labels, n_resamples=300, seed=1)
    other = bootstrap_intervals(probs, labels, n_resamples=300, seed=2)
    # Assert
    assert first == again
    assert first != other
    assert first["accuracy"]["point"] == other["accuracy"]["point"]


def test_uq_fidelity_by_hand() -> None:
    # Prepare
    teacher = {
        "accuracy": {"point": 0.9, "lower": 0.88, "upper": 0.92},
        "nll": {"point": 0.3, "lower": 0.25, "upper": 0.35},
    }
    student = {
        "accuracy": {"point": 0.85, "lower": 0.82, "upper": 0.88},  # misses 0.9, same width
        "nll": {"point": 0.31, "lower": 0.29, "upper": 0.33},  # covers 0.3, 0.4x width
    }
    # Execute
    result = uq_fidelity(teacher, student)
    # Assert
    assert result["accuracy"] == {
        "covers_teacher_point": False,
        "width_ratio": pytest.approx(1.5),
        "overconfident": False,
    }
    assert result["nll"]["covers_teacher_point"] is True
    assert result["nll"]["width_ratio"] == pytest.approx(0.4)
    assert result["nll"]["overconfident"] is True


# ------------------------------------------------------------------ dark knowledge
def test_dark_knowledge_entropy_uniform_non_target_is_max() -> None:
    # Prepare
    classes = 6
    probs = np.full((2, classes), 0.4 / (classes - 1))
    probs[0, 2] = 0.6
    probs[1, 5] = 0.6
    # Execute
    entropy = dark_knowledge_entropy(probs, np.array([2, 5]))
    # Assert
    assert entropy == pytest.approx(math.log(classes - 1))
    assert max_dark_knowledge_entropy(classes) == pytest.approx(math.log(5))


def test_dark_knowledge_entropy_hand_example_and_one_hot_row() -> None:
    # Prepare: row 0 non-target renormalized to [0.6, 0.4]; row 1 is one-hot (no dark mass)
    probs = np.array([[0.5, 0.3, 0.2], [0.0, 1.0, 0.0]])
    # Execute
    entropy = dark_knowledge_entropy(probs, np.array([0, 1]))
    # Assert
    row0 = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    assert entropy == pytest.approx(row0 / 2)


# ------------------------------------------------------------------ certificates
def test_certificate_hand_built_including_boundary() -> None:
    # Prepare: W rows w0=(1,0), w1=(0,1), w2=(-1,-1), f=(2,0), y=0 -> z=(2,0,-2).
    # vs class 1: margin 2, ||w0-w1||_1 = 2 -> radius 1; vs class 2: 4 / 3. Radius 1.
    W = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    b = np.zeros(3)
    f = np.array([[2.0, 0.0]])
    y = np.array([0])
    # Execute / Assert: certified strictly inside, not at the boundary eps = 1
    assert l1_certificate(f, y, W, b, 0.5).tolist() == [True]
    assert l1_certificate(f, y, W, b, 0.999).tolist() == [True]
    assert l1_certificate(f, y, W, b, 1.0).tolist() == [False]
    assert certified_radius(f, y, W, b).tolist() == [1.0]
    # ...and at eps = 1 the attack delta = -sign(w0 - w1) really reaches a tie
    z = (f + np.array([-1.0, 1.0])) @ W.T + b
    assert z[0, 0] == z[0, 1]


def test_certificate_matches_vertex_brute_force() -> None:
    # Prepare: a linear score is extremal at a vertex of the L-inf ball, so checking all
    # 2^D vertices is an exact, independent reference
    rng = np.random.default_rng(9)
    d, k, n, eps = 4, 3, 300, 0.15
    W, b = rng.normal(size=(k, d)), rng.normal(size=k)
    f = rng.normal(size=(n, d))
    y = (f @ W.T + b + 0.5 * rng.normal(size=(n, k))).argmax(axis=1)
    vertices = eps * np.array(list(itertools.product([-1.0, 1.0], repeat=d)))
    # Execute
    certified = l1_certificate(f, y, W, b, eps)
    # Assert
    z = (f[:, None, :] + vertices[None]) @ W.T + b  # [N, 2^D, K]
    z_y = np.take_along_axis(z, y[:, None, None].repeat(len(vertices), 1), axis=2)
    others = np.where(np.arange(k)[None, None, :] == y[:, None, None], -np.inf, z)
    brute = (z_y[..., 0] > others.max(axis=2)).all(axis=1)
    np.testing.assert_array_equal(certified, brute)
    assert 0 < certified.sum() < n  # the case is not trivial either way


def test_certificate_binary_special_case() -> None:
    # Prepare: a binary classifier sign(w.x + c) as a 2-row head W = [0, w], b = [0, c]
    rng = np.random.default_rng(10)
    w, c = rng.normal(size=5), 0.3
    x = rng.normal(size=(500, 5))
    y01 = rng.integers(0, 2, size=500)
    y_pm = 2 * y01 - 1
    W, b = np.stack([np.zeros(5), w]), np.array([0.0, c])
    # Execute
    ours = l1_certificate(x, y01, W, b, 0.2)
    # Assert
    np.testing.assert_array_equal(ours, y_pm * (x @ w + c) > 0.2 * np.abs(w).sum())


def test_certified_accuracy_curve_starts_at_accuracy_and_decreases() -> None:
    # Prepare
    rng = np.random.default_rng(12)
    W, b = rng.normal(size=(5, 8)), rng.normal(size=5)
    f = rng.normal(size=(400, 8))
    y = (f @ W.T + b + rng.normal(size=(400, 5))).argmax(axis=1)
    # Execute
    curve = certified_accuracy_curve(f, y, W, b, [0.0, 0.05, 0.1, 0.5, 5.0])
    # Assert
    assert curve[0] == pytest.approx(((f @ W.T + b).argmax(axis=1) == y).mean())
    assert all(a >= c for a, c in itertools.pairwise(curve))
    assert curve[-1] == 0.0
    radius = certified_radius(f, y, W, b)
    assert curve[2] == pytest.approx((radius > 0.1).mean())


def test_certificate_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="columns"):
        l1_certificate(np.zeros((2, 3)), [0, 1], np.zeros((2, 4)), np.zeros(2), 0.1)
    with pytest.raises(ValueError, match="eps"):
        l1_certificate(np.zeros((2, 3)), [0, 1], np.zeros((2, 3)), np.zeros(2), -0.1)
