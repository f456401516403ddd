"""Classification and calibration metrics in numpy only.

This module runs on edge devices that have no torch installed, so it must import nothing
beyond numpy and the standard library. All functions take class probabilities ``probs``
of shape ``[N, K]`` and integer ``labels`` of shape ``[N]``.

Contents: expected calibration error and reliability-diagram bins (Guo et al., "On
Calibration of Modern Neural Networks", ICML 2017), accuracy / per-class recall / NLL /
Brier score (Brier, "Verification of Forecasts Expressed in Terms of Probability", Monthly
Weather Review 1950), and student-teacher agreement and KL divergence.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "classification_metrics",
    "expected_calibration_error",
    "mean_kl",
    "reliability_bins",
    "teacher_agreement",
]

# Floor for probabilities inside a log, so a confidently wrong prediction gives a large,
# finite penalty (-log 1e-12 ~= 27.6 nats) instead of inf.
_PROB_FLOOR = 1e-12


# The per-model numbers every report block carries, in this order.
HEADLINE_KEYS = (
    "accuracy",
    "ece",
    "nll",
    "brier",
    "macro_recall",
    "min_class_recall",
    "per_class_recall",
)


def _as_probs(probs: npt.ArrayLike, name: str = "probs") -> npt.NDArray[np.float64]:
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return array


def _as_probs_and_labels(
    probs: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    p = _as_probs(probs)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {y.shape}")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"length mismatch: probs has {p.shape[0]} rows, labels {y.shape[0]}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {p.shape[1]}) to index probs, got [{y.min()}, {y.max()}]"
        )
    return p, y.astype(np.int64)


def _bin_statistics(
    probs: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], n_bins: int
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
]:
    """Per-bin edges, summed correctness, summed confidence and counts."""
    if n_bins <= 0:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # side="left" puts a value equal to an upper edge into the bin below it, giving (lo, hi]
    # bins; the clip puts confidence 0 into the first bin, and 1.0 falls in the last.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.int64)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins).astype(np.float64)
    confidence_sum = np.bincount(index, weights=confidence, minlength=n_bins).astype(np.float64)
    return edges, correct_sum, confidence_sum, counts


def expected_calibration_error(
    probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15
) -> float:
    """Expected calibration error with equal-width confidence bins (Guo et al., 2017, eq. 3).

    ::

        ECE = sum_b (n_b / N) * |acc_b - conf_b|,

    where confidence is the top-1 probability, ``acc_b`` the top-1 accuracy and ``conf_b``
    the mean confidence of the ``n_b`` samples in bin ``b``. The ``n_bins`` bins split
    ``[0, 1]`` evenly and are ``(lo, hi]``, except that the first also holds 0; the last is
    closed on the right, so a confidence of exactly 1.0 is counted.

    Args:
        probs: Class probabilities, shape ``[N, K]``.
        labels: Integer labels, shape ``[N]``.
        n_bins: Number of bins.

    Returns:
        ECE in ``[0, 1]``.
    """
    p, y = _as_probs_and_labels(probs, labels)
    _, correct_sum, confidence_sum, _ = _bin_statistics(p, y, n_bins)
    # sum_b (n_b/N)|acc_b - conf_b| == sum_b |correct_sum_b - confidence_sum_b| / N.
    return float(np.abs(correct_sum - confidence_sum).sum() / p.shape[0])


def reliability_bins(
    probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15
) -> dict[str, list[float]]:
    """Per-bin accuracy and confidence for a reliability diagram (Guo et al., 2017, fig. 1).

    Uses the same bins as :func:`expected_calibration_error`. Empty bins have count 0 and
    NaN accuracy and confidence, so a plot leaves them out rather than drawing a false 0.

    Args:
        probs: Class probabilities, shape ``[N, K]``.
        labels: Integer labels, shape ``[N]``.
        n_bins: Number of bins.

    Returns:
        Dict of ``n_bins``-long lists: ``bin_lower``, ``bin_upper``, ``accuracy``,
        ``confidence`` and ``count`` (counts as floats).
    """
    p, y = _as_probs_and_labels(probs, labels)
    edges, correct_sum, confidence_sum, counts = _bin_statistics(p, y, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, correct_sum / counts, np.nan)
        confidence = np.where(counts > 0, confidence_sum / counts, np.nan)
    return {
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "accuracy": accuracy.tolist(),
        "confidence": confidence.tolist(),
        "count": counts.astype(np.float64).tolist(),
    }


def classification_metrics(
    probs: npt.ArrayLike, labels: npt.ArrayLike, num_classes: int
) -> dict[str, float | list[float]]:
    """Accuracy, recall, calibration and proper scoring rules in one pass.

    ::

        accuracy        = mean_i [argmax_c p_ic == y_i]
        recall_c        = accuracy over the samples with y_i == c (NaN if class c is absent)
        macro_recall    = mean of recall_c over classes present in labels
        min_class_recall = min of recall_c over classes present in labels
        ece             = expected_calibration_error(probs, labels)      (Guo et al., 2017)
        nll             = mean_i -log max(p_i,y_i, 1e-12)
        brier           = mean_i sum_c (p_ic - [c == y_i])^2              (Brier, 1950)

    Args:
        probs: Class probabilities, shape ``[N, num_classes]``.
        labels: Integer labels, shape ``[N]``.
        num_classes: Number of classes ``K``.

    Returns:
        Dict with keys ``accuracy``, ``per_class_recall`` (list of length ``num_classes``),
        ``macro_recall``, ``min_class_recall``, ``ece``, ``nll`` and ``brier``.
    """
    p, y = _as_probs_and_labels(probs, labels)
    if p.shape[1] != num_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but num_classes is {num_classes}")

    correct = (p.argmax(axis=1) == y).astype(np.float64)
    support = np.bincount(y, minlength=num_classes)
    hits = np.bincount(y, weights=correct, minlength=num_classes).astype(np.float64)
    present = support > 0
    recall = np.full(num_classes, np.nan)
    recall[present] = hits[present] / support[present]

    target_prob = p[np.arange(p.shape[0]), y]
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0

    return {
        "accuracy": float(correct.mean()),
        "per_class_recall": [float(r) for r in recall],
        "macro_recall": float(recall[present].mean()),
        "min_class_recall": float(recall[present].min()),
        "ece": expected_calibration_error(p, y),
        "nll": float(-np.log(np.clip(target_prob, _PROB_FLOOR, None)).mean()),
        "brier": float(((p - onehot) ** 2).sum(axis=1).mean()),
    }


def _check_same_shape(
    student_probs: npt.ArrayLike, teacher_probs: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    s = _as_probs(student_probs, "student_probs")
    t = _as_probs(teacher_probs, "teacher_probs")
    if s.shape != t.shape:
        raise ValueError(f"shape mismatch: student_probs {s.shape} vs teacher_probs {t.shape}")
    return s, t


def teacher_agreement(student_probs: npt.ArrayLike, teacher_probs: npt.ArrayLike) -> float:
    """Share of samples where student and teacher top-1 classes agree.

    ::

        agreement = mean_i [argmax_c s_ic == argmax_c t_ic]

    Args:
        student_probs: Student probabilities (or logits), shape ``[N, K]``.
        teacher_probs: Teacher probabilities (or logits), shape ``[N, K]``.

    Returns:
        Agreement in ``[0, 1]``.
    """
    s, t = _check_same_shape(student_probs, teacher_probs)
    return float((s.argmax(axis=1) == t.argmax(axis=1)).mean())


def mean_kl(teacher_probs: npt.ArrayLike, student_probs: npt.ArrayLike) -> float:
    """Mean Kullback-Leibler divergence ``KL(p_t || p_s)`` in nats.

    ::

        KL_i = sum_c p_t,ic * (log p_t,ic - log max(p_s,ic, 1e-12)),    KL = mean_i KL_i,

    with ``0 * log 0 = 0`` for teacher zeros. The student floor keeps the value finite when
    the student gives exactly 0 to a class the teacher supports.

    Args:
        teacher_probs: Teacher probabilities, shape ``[N, K]``.
        student_probs: Student probabilities, shape ``[N, K]``.

    Returns:
        Mean KL, ``>= 0`` up to round-off.
    """
    s, t = _check_same_shape(student_probs, teacher_probs)
    positive = t > 0
    log_t = np.log(np.where(positive, t, 1.0))
    log_s = np.log(np.clip(s, _PROB_FLOOR, None))
    per_sample = np.where(positive, t * (log_t - log_s), 0.0).sum(axis=1)
    return float(per_sample.mean())
