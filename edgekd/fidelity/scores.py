"""How faithfully a student reproduces its teacher, in numpy and scipy only.

The student may be an ONNX or TFLite file inspected on a host without torch, so this
module imports nothing beyond numpy, scipy and `edgekd.core.metrics` (itself numpy
only). Every function takes logits or probabilities of shape ``[N, K]`` and integer labels
of shape ``[N]``.

Contents:

* rank order: per-sample Kendall tau-b between teacher and student logits (Kendall,
  "The treatment of ties in ranking problems", Biometrika 1945) and top-k retention of
  the teacher's top-1 class;
* calibration: per-class and minority/majority ECE on top of
  :func:`edgekd.core.metrics.expected_calibration_error` (Guo et al., "On Calibration of
  Modern Neural Networks", ICML 2017), and temperature scaling (same paper, section 4.2);
* uncertainty of the scores: percentile-bootstrap intervals of accuracy, NLL and Brier
  score (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13) and how the
  student's intervals compare with the teacher's;
* dark knowledge: entropy of the non-target distribution (Hinton et al., "Distilling the
  Knowledge in a Neural Network", 2015), its only implementation;
* robustness: exact certificates of a linear head on frozen features against
  L-infinity feature perturbations (the dual-norm bound, e.g. Wong & Kolter, "Provable
  Defenses against Adversarial Examples via the Convex Outer Adversarial Polytope",
  ICML 2018, section 2, for the one-layer case).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from edgekd.core.metrics import expected_calibration_error

__all__ = [
    "OVERCONFIDENT_WIDTH_RATIO",
    "apply_temperature",
    "bootstrap_intervals",
    "certified_accuracy_curve",
    "certified_radius",
    "dark_knowledge_entropy",
    "fit_temperature",
    "kendall_tau_per_sample",
    "l1_certificate",
    "max_dark_knowledge_entropy",
    "minority_majority_ece",
    "per_class_ece",
    "rank_order_fidelity",
    "uq_fidelity",
]

# A student interval narrower than half the teacher's on the same test samples is flagged;
# see `uq_fidelity` for why 0.5.
OVERCONFIDENT_WIDTH_RATIO = 0.5

# Same floor as edgekd.core.metrics: a confidently wrong sample costs ~27.6 nats, not inf.
_PROB_FLOOR = 1e-12

# Bounds of log T for temperature scaling: T in [e^-4, e^4] ~= [0.018, 55] covers every
# temperature reported by Guo et al. (2017, table 9: 1.1 to 3.5) with a wide margin, and
# keeps softmax(z / T) finite for float64 logits.
_LOG_T_BOUNDS = (-4.0, 4.0)

# Elements per working array in the chunked loops below (~8 MB of float64): the bootstrap
# of 1000 resamples of 4000 samples and Kendall tau on 100 classes stay in cache-sized
# pieces instead of allocating hundreds of MB at once.
_CHUNK_ELEMENTS = 1 << 20


# ------------------------------------------------------------------ input checks
def _as_matrix(values: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, K] array, got shape {array.shape}")
    return array


def _as_labels(labels: npt.ArrayLike, n: int, num_classes: int) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}], got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _same_shape(
    teacher: npt.ArrayLike, student: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    t = _as_matrix(teacher, "teacher_logits")
    s = _as_matrix(student, "student_logits")
    if t.shape != s.shape:
        raise ValueError(f"shape mismatch: teacher {t.shape} vs student {s.shape}")
    return t, s


# ------------------------------------------------------------------ rank order
def kendall_tau_per_sample(
    teacher_logits: npt.ArrayLike, student_logits: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Kendall's tau-b between the teacher's and the student's class scores, per sample.

    For one sample with scores ``t, s`` over ``K`` classes and the ``n0 = K(K-1)/2`` class
    pairs ``i < j``::

        tau_b = sum_{i<j} sgn(t_i - t_j) sgn(s_i - s_j) / sqrt((n0 - n_t)(n0 - n_s)),

    where ``n_t`` and ``n_s`` count the pairs tied in ``t`` and in ``s`` (Kendall 1945); it
    equals ``scipy.stats.kendalltau`` (variant "b"). Rank order is invariant to any
    monotone map, so logits and probabilities give the same tau, except where a float32
    softmax rounds distinct logits to equal probabilities: pass logits.

    Args:
        teacher_logits: Teacher scores, shape ``[N, K]``, ``K >= 2``.
        student_logits: Student scores, same shape.

    Returns:
        ``[N]`` array in ``[-1, 1]``; NaN where a row is constant (tau-b is undefined).
    """
    t, s = _same_shape(teacher_logits, student_logits)
    n, k = t.shape
    if k < 2:
        raise ValueError(f"Kendall tau needs at least 2 classes, got {k}")
    i, j = np.triu_indices(k, 1)
    n_pairs = i.size
    tau = np.empty(n, dtype=np.float64)
    rows = max(1, _CHUNK_ELEMENTS // n_pairs)
    for start in range(0, n, rows):
        tc, sc = t[start : start + rows], s[start : start + rows]
        sign_t = np.sign(tc[:, i] - tc[:, j])
        sign_s = np.sign(sc[:, i] - sc[:, j])
        numerator = (sign_t * sign_s).sum(axis=1)
        untied_t = np.count_nonzero(sign_t, axis=1)  # n0 - n_t
        untied_s = np.count_nonzero(sign_s, axis=1)  # n0 - n_s
        denominator = np.sqrt(untied_t.astype(np.float64) * untied_s)
        with np.errstate(invalid="ignore", divide="ignore"):
            tau[start : start + rows] = np.where(denominator > 0, numerator / denominator, np.nan)
    return tau


def rank_order_fidelity(
    teacher_logits: npt.ArrayLike,
    student_logits: npt.ArrayLike,
    ks: Sequence[int] = (1, 3, 5),
) -> dict[str, float]:
    """Does the student order the classes as the teacher does?

    ::

        mean_kendall_tau = mean over samples with a defined tau of kendall_tau_per_sample
        top{k}_retention = mean_i [ #{c : s_ic > s_i,c*} < k ],   c* = argmax_c t_ic

    i.e. the share of samples whose teacher top-1 class is among the student's top ``k``.
    A class tied with others is given the best rank among them (only strictly larger
    student scores push it down), so ties never count against the student.

    Args:
        teacher_logits: Teacher scores, shape ``[N, K]``.
        student_logits: Student scores, same shape.
        ks: The ``k`` values, each ``>= 1``; ``k >= K`` gives 1.0.

    Returns:
        Dict with ``mean_kendall_tau`` (NaN if no row has a defined tau) and one
        ``top{k}_retention`` per ``k``.
    """
    t, s = _same_shape(teacher_logits, student_logits)
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    tau = kendall_tau_per_sample(t, s)
    teacher_top = t.argmax(axis=1)
    score_of_teacher_top = s[np.arange(len(s)), teacher_top]
    student_rank = (s > score_of_teacher_top[:, None]).sum(axis=1)  # 0 = student's top-1
    defined = ~np.isnan(tau)
    out = {"mean_kendall_tau": float(tau[defined].mean()) if defined.any() else math.nan}
    for k in ks:
        out[f"top{int(k)}_retention"] = float((student_rank < int(k)).mean())
    return out


# ------------------------------------------------------------------ calibration
def _probs_and_labels(
    probs: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    p = _as_matrix(probs, "probs")
    return p, _as_labels(labels, p.shape[0], p.shape[1])


def per_class_ece(
    probs: npt.ArrayLike, labels: npt.ArrayLike, num_classes: int, n_bins: int = 15
) -> list[float]:
    """ECE restricted to the samples of each true class.

    ::

        ECE_c = ECE({(p_i, y_i) : y_i == c})

    with :func:`edgekd.core.metrics.expected_calibration_error` (top-1 confidence,
    ``n_bins`` equal-width bins, Guo et al. 2017, eq. 3). Within class ``c`` a bin's
    accuracy is the recall of ``c`` among its samples, so ``ECE_c`` says how far the
    model's confidence is from how often it gets class ``c`` right; a minority class the
    model under-recalls with high confidence shows up here while the pooled ECE hides it.
    This is not the "classwise ECE" of Kull et al. (NeurIPS 2019), which bins ``p_ic``
    over all samples.

    Args:
        probs: Class probabilities, shape ``[N, num_classes]``.
        labels: Integer labels, shape ``[N]``.
        num_classes: ``K``.
        n_bins: Bins per class, as in the pooled ECE.

    Returns:
        ``num_classes`` values; NaN for a class with no sample.
    """
    p, y = _probs_and_labels(probs, labels)
    if p.shape[1] != num_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but num_classes is {num_classes}")
    out: list[float] = []
    for c in range(num_classes):
        mask = y == c
        out.append(expected_calibration_error(p[mask], y[mask], n_bins) if mask.any() else math.nan)
    return out


def minority_majority_ece(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    class_counts: npt.ArrayLike,
    n_bins: int = 15,
) -> dict[str, float | list[int]]:
    """Pooled ECE over the test samples of minority and of majority classes.

    A class is a *minority* class when its training count is strictly below the median of
    ``class_counts``, a *majority* class otherwise (the median class of an odd ``K`` and
    classes tied at the median count as majority, so equal counts give no minority).
    Each side's ECE is :func:`edgekd.core.metrics.expected_calibration_error` over the
    test samples whose true class is on that side.

    Args:
        probs: Class probabilities, shape ``[N, K]``.
        labels: Integer labels, shape ``[N]``.
        class_counts: Training samples per class, length ``K``.
        n_bins: ECE bins.

    Returns:
        ``minority_ece``, ``majority_ece`` (NaN when a side has no test sample), ``gap``
        (minority minus majority), ``median_count``, and the class lists
        ``minority_classes`` and ``majority_classes``.
    """
    p, y = _probs_and_labels(probs, labels)
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.shape != (p.shape[1],):
        raise ValueError(f"class_counts must have length {p.shape[1]}, got shape {counts.shape}")
    median = float(np.median(counts))
    minority = np.flatnonzero(counts < median)
    majority = np.flatnonzero(counts >= median)

    def side_ece(classes: npt.NDArray[np.intp]) -> float:
        mask = np.isin(y, classes)
        return expected_calibration_error(p[mask], y[mask], n_bins) if mask.any() else math.nan

    minority_ece, majority_ece = side_ece(minority), side_ece(majority)
    return {
        "minority_ece": minority_ece,
        "majority_ece": majority_ece,
        "gap": minority_ece - majority_ece,
        "median_count": median,
        "minority_classes": [int(c) for c in minority],
        "majority_classes": [int(c) for c in majority],
    }


def _mean_nll(logits: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], t: float) -> float:
    return float(-log_softmax(logits / t, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Temperature scaling (Guo et al., 2017, section 4.2): the ``T > 0`` minimising NLL.

    ::

        T* = argmin_T  -1/N sum_i log softmax(z_i / T)_{y_i}

    searched over ``log T`` in ``[-4, 4]`` with scipy's bounded Brent method. The NLL is a
    convex function of ``1/T`` (a log-sum-exp of a linear function plus a linear term),
    so it is unimodal in ``log T`` and Brent's method finds the global minimum. Fit it on
    held-out data, never on the test split it is evaluated on.

    Args:
        logits: Logits ``z``, shape ``[N, K]``.
        labels: Integer labels, shape ``[N]``.

    Returns:
        ``T*``; ``> 1`` softens an overconfident model, ``< 1`` sharpens an underconfident one.
    """
    z = _as_matrix(logits, "logits")
    y = _as_labels(labels, z.shape[0], z.shape[1])
    result = minimize_scalar(
        lambda log_t: _mean_nll(z, y, math.exp(log_t)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def apply_temperature(logits: npt.ArrayLike, temperature: float) -> npt.NDArray[np.float64]:
    """Calibrated probabilities ``softmax(z / T)`` (float64, rows sum to 1)."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _as_matrix(logits, "logits")
    return np.exp(log_softmax(z / temperature, axis=1))


# ------------------------------------------------------------------ uncertainty of scores
def _per_sample_scores(
    p: npt.NDArray[np.float64], y: npt.NDArray[np.int64]
) -> dict[str, npt.NDArray[np.float64]]:
    """Per-sample accuracy, NLL and Brier terms; their means are the metrics' values."""
    rows = np.arange(len(y))
    onehot = np.zeros_like(p)
    onehot[rows, y] = 1.0
    return {
        "accuracy": (p.argmax(axis=1) == y).astype(np.float64),
        "nll": -np.log(np.clip(p[rows, y], _PROB_FLOOR, None)),
        "brier": ((p - onehot) ** 2).sum(axis=1),
    }


def bootstrap_intervals(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Percentile-bootstrap confidence intervals of accuracy, NLL and Brier score.

    Each of the ``B = n_resamples`` resamples draws ``N`` test samples with replacement;
    the metric's value on resample ``b`` is the mean of its per-sample terms
    (``[argmax p_i == y_i]``, ``-log max(p_i,y_i, 1e-12)``, ``sum_c (p_ic - [c == y_i])^2``,
    as in :func:`edgekd.core.metrics.classification_metrics`). The interval is::

        [q_{(1 - level)/2}, q_{(1 + level)/2}]  of the B resampled values

    (Efron & Tibshirani 1993, section 13.3, percentile method, with numpy's linear
    quantile interpolation). All three metrics share the same resamples, so their
    intervals are comparable. Resamples are drawn in fixed-size chunks from
    ``numpy.random.default_rng(seed)``: the same inputs and seed give identical intervals.

    Args:
        probs: Class probabilities, shape ``[N, K]``.
        labels: Integer labels, shape ``[N]``.
        n_resamples: ``B``, at least 2.
        seed: Seed of the resampling.
        level: Coverage in ``(0, 1)``.

    Returns:
        ``{"accuracy" | "nll" | "brier": {"point", "lower", "upper"}}``; ``point`` is the
        metric on the full sample.
    """
    p, y = _probs_and_labels(probs, labels)
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be >= 2, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    scores = _per_sample_scores(p, y)
    names = list(scores)
    stacked = np.stack([scores[name] for name in names])  # [M, N]
    n = len(y)
    rng = np.random.default_rng(seed)
    resampled = np.empty((len(names), n_resamples), dtype=np.float64)
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, per_chunk):
        stop = min(start + per_chunk, n_resamples)
        index = rng.integers(0, n, size=(stop - start, n))
        # One gather per metric: [M, b, N] -> mean over the resampled samples.
        resampled[:, start:stop] = stacked[:, index].mean(axis=2)
    tail = (1.0 - level) / 2.0
    lower, upper = np.quantile(resampled, [tail, 1.0 - tail], axis=1)
    return {
        name: {
            "point": float(stacked[m].mean()),
            "lower": float(lower[m]),
            "upper": float(upper[m]),
        }
        for m, name in enumerate(names)
    }


def uq_fidelity(
    teacher_ci: dict[str, dict[str, float]], student_ci: dict[str, dict[str, float]]
) -> dict[str, dict[str, float | bool]]:
    """Compare the student's bootstrap intervals with the teacher's, metric by metric.

    ::

        covers_teacher_point = lower_s <= point_t <= upper_s
        width_ratio          = (upper_s - lower_s) / (upper_t - lower_t)
        overconfident        = width_ratio < 0.5

    Both intervals come from the same test samples, so a width differs only through the
    per-sample spread of the metric (the bootstrap width of a mean is about
    ``2 z sigma / sqrt(N)``). Halving it takes a per-sample standard deviation half the
    teacher's, four times less variance: far beyond the few per cent by which two
    1000-resample bootstrap widths differ by chance, so 0.5 flags a real difference, not
    resampling noise. For NLL and Brier a much narrower interval means the student's
    losses are suspiciously uniform; for accuracy it can also just mean an accuracy much
    nearer 0 or 1 (``sigma = sqrt(a(1 - a))``), so read that flag with the accuracies.

    Args:
        teacher_ci: Output of :func:`bootstrap_intervals` for the teacher.
        student_ci: The same for the student.

    Returns:
        Per metric present in both: ``covers_teacher_point``, ``width_ratio`` (inf when
        the teacher's width is 0 and the student's is not, 1.0 when both are 0) and
        ``overconfident``.
    """
    out: dict[str, dict[str, float | bool]] = {}
    for name in teacher_ci.keys() & student_ci.keys():
        t, s = teacher_ci[name], student_ci[name]
        t_width = t["upper"] - t["lower"]
        s_width = s["upper"] - s["lower"]
        if t_width > 0:
            ratio = s_width / t_width
        else:
            ratio = 1.0 if s_width <= 0 else math.inf
        out[name] = {
            "covers_teacher_point": bool(s["lower"] <= t["point"] <= s["upper"]),
            "width_ratio": float(ratio),
            "overconfident": bool(ratio < OVERCONFIDENT_WIDTH_RATIO),
        }
    return dict(sorted(out.items()))


# ------------------------------------------------------------------ dark knowledge
def dark_knowledge_entropy(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Mean entropy (nats) of the non-target distribution: the "dark knowledge" of
    Hinton et al. (2015), the relative probabilities of the wrong classes.

    ::

        q_ic = p_ic / (1 - p_i,y_i)  for c != y_i,     H = mean_i [ -sum_{c != y_i} q_ic log q_ic ]

    Hinton et al. (2015). A row with no non-target mass (``p_y = 1``) has entropy 0.
    """
    p, y = _probs_and_labels(probs, labels)
    non_target = p.copy()
    non_target[np.arange(len(y)), y] = 0.0
    mass = np.maximum(non_target.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    q = non_target / mass
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    return float(-plogp.sum(axis=1).mean())


def max_dark_knowledge_entropy(num_classes: int) -> float:
    """Upper bound of :func:`dark_knowledge_entropy`: ``ln(C - 1)`` for ``C`` classes."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return math.log(num_classes - 1)


# ------------------------------------------------------------------ robustness
def _linear_head_inputs(
    features: npt.ArrayLike, labels: npt.ArrayLike, weight: npt.ArrayLike, bias: npt.ArrayLike
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    f = _as_matrix(features, "features")
    w = _as_matrix(weight, "W")
    b = np.asarray(bias, dtype=np.float64)
    if w.shape[1] != f.shape[1]:
        raise ValueError(f"W has {w.shape[1]} columns but features have {f.shape[1]}")
    if b.shape != (w.shape[0],):
        raise ValueError(f"b must have shape ({w.shape[0]},), got {b.shape}")
    if w.shape[0] < 2:
        raise ValueError(f"a classifier head needs at least 2 classes, got {w.shape[0]}")
    return f, _as_labels(labels, f.shape[0], w.shape[0]), w, b


def _margins_and_norms(
    f: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    w: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Margins ``z_y - z_j`` and dual norms ``||w_y - w_j||_1``, both ``[N, K]``."""
    logits = f @ w.T + b
    margins = logits[np.arange(len(y)), y][:, None] - logits
    pair_norms = np.abs(w[:, None, :] - w[None, :, :]).sum(axis=2)  # [K, K], 0 on the diagonal
    return margins, pair_norms[y]


def l1_certificate(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    W: npt.ArrayLike,
    b: npt.ArrayLike,
    eps: float,
) -> npt.NDArray[np.bool_]:
    """Exact certificate of a linear head ``z = W f + b`` against ``||delta||_inf <= eps``
    on the features.

    The worst case of ``(w_y - w_j) . (f + delta)`` over the L-infinity ball is
    ``(w_y - w_j) . f - eps ||w_y - w_j||_1`` (Hoelder: the L1 norm is the dual of
    L-infinity; Wong & Kolter 2018 for the one-layer case). So sample ``i`` is certified iff::

        for every j != y_i:   (w_y - w_j) . f_i + (b_y - b_j)  >  eps * ||w_y - w_j||_1.

    For ``K = 2`` with ``w = w_1 - w_0`` and ``y`` in ``{-1, +1}`` this is the familiar
    ``y (w . f + b) > eps ||w||_1``. The inequality is strict: a sample exactly on the
    boundary can be flipped to a tie and is not certified. The test is exact for the
    head, so a certified sample is also correctly classified; it says nothing about
    perturbations of the model's input, only of its frozen features.

    Args:
        features: Head inputs ``f``, shape ``[N, D]``.
        labels: True classes, shape ``[N]``.
        W: Head weight, shape ``[K, D]``.
        b: Head bias, shape ``[K]``.
        eps: Radius ``>= 0``.

    Returns:
        Boolean ``[N]``.
    """
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    f, y, w, bias = _linear_head_inputs(features, labels, W, b)
    margins, norms = _margins_and_norms(f, y, w, bias)
    holds = margins > eps * norms
    holds[np.arange(len(y)), y] = True  # j == y is not a constraint
    return np.asarray(holds.all(axis=1))


def certified_radius(
    features: npt.ArrayLike, labels: npt.ArrayLike, W: npt.ArrayLike, b: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Largest feature-space L-infinity radius each sample is certified for.

    ::

        r_i = min_{j != y_i} ((w_y - w_j) . f_i + b_y - b_j) / ||w_y - w_j||_1,

    clipped at 0 below (a misclassified sample has radius 0); a constraint with
    ``w_y = w_j`` holds for every radius if its margin is positive (``inf``) and none
    otherwise. :func:`l1_certificate` is true exactly for ``eps < r_i``, up to the
    rounding of the division; use it, not ``r``, for decisions at a boundary.
    """
    f, y, w, bias = _linear_head_inputs(features, labels, W, b)
    margins, norms = _margins_and_norms(f, y, w, bias)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(norms > 0, margins / np.where(norms > 0, norms, 1.0), np.inf)
        ratio = np.where((norms == 0) & (margins <= 0), 0.0, ratio)
    ratio[np.arange(len(y)), y] = np.inf
    return np.clip(ratio.min(axis=1), 0.0, None)


def certified_accuracy_curve(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    W: npt.ArrayLike,
    b: npt.ArrayLike,
    eps_grid: Sequence[float],
) -> list[float]:
    """Certified accuracy at each radius: ``mean_i [correct_i and certified_i(eps)]``.

    At ``eps = 0`` this is the head's accuracy with ties counted as errors. See
    :func:`l1_certificate`.
    """
    f, y, w, bias = _linear_head_inputs(features, labels, W, b)
    correct = (f @ w.T + bias).argmax(axis=1) == y
    return [float((correct & l1_certificate(f, y, w, bias, float(eps))).mean()) for eps in eps_grid]
