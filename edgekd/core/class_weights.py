"""Bounded inverse-frequency class weights, in numpy: the one implementation that torch
training (`edgekd.learn.kd`) and torch-free devices (`edgekd.deploy.runtimes`) share.
"""

from __future__ import annotations

import numpy as np

__all__ = ["inverse_frequency_class_weights"]


def inverse_frequency_class_weights(
    labels: np.ndarray,
    num_classes: int,
    *,
    max_weight: float = 5.0,
) -> np.ndarray:
    """Bounded inverse-frequency class weights with mean per-sample weight exactly one.

    Raw weights are the standard inverse-frequency rule (as used as the baseline in Cui et
    al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019)::

        w_c = (N / K_present) / n_c    for n_c > 0,    w_c = 0 for n_c = 0,

    where ``n_c`` is the local label histogram, ``N = sum_c n_c`` and ``K_present`` the
    number of classes with ``n_c > 0``. An absent class gets weight 0; it never indexes a
    sample, so the value only matters for readability.

    Bounding. Under Dirichlet(0.1) label skew a class with 3 local samples gets a raw weight
    near 50; those few samples then dominate every gradient step and training diverges.
    The weights are therefore clipped at ``max_weight`` and renormalized so that

        sum_c n_c * w_c = N    (mean per-sample weight over the local data is 1),

    which keeps the effective learning rate equal to that of the unweighted loss. Clipping
    and renormalizing are iterated to a fixed point ("water-filling"): classes whose
    weight exceeds the bound are fixed at ``max_weight`` and only the remaining classes are
    rescaled, by a common factor ``s``::

        w_c = min(s * raw_c, max_weight),    s chosen so that sum_c n_c * w_c = N.

    Each pass can only clip more classes and raise ``s``, so the loop ends after at most
    ``K`` passes, with every weight ``<= max_weight`` and the mean exactly one; the ordering
    and ratios of the unclipped classes are kept. A mean of one under the bound is possible
    only when ``max_weight >= 1``; smaller values raise ``ValueError``.

    Args:
        labels: Local integer labels, shape ``[N]``.
        num_classes: Number of classes ``K``; labels must lie in ``[0, K)``.
        max_weight: Upper bound on any class weight, ``>= 1`` (``math.inf`` disables it).

    Returns:
        float32 array of shape ``[K]``.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if not max_weight >= 1.0:
        raise ValueError(
            f"max_weight must be >= 1 for a mean weight of 1 to be reachable, got {max_weight}"
        )
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        raise ValueError("labels is empty; cannot compute class weights")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")

    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    total = counts.sum()
    raw = np.zeros(num_classes, dtype=np.float64)
    raw[present] = (total / present.sum()) / counts[present]

    clipped = np.zeros(num_classes, dtype=bool)
    weights = raw.copy()
    for _ in range(num_classes):
        free = present & ~clipped
        free_mass = float((counts[free] * raw[free]).sum())
        if free_mass <= 0.0:
            # Only reachable when max_weight == 1: every class sits at the bound.
            weights = np.where(present, max_weight, 0.0)
            break
        # Guarded so that max_weight=inf with no clipped class gives 0, not 0 * inf = NaN.
        clipped_mass = float(counts[clipped].sum()) * max_weight if clipped.any() else 0.0
        scale = (total - clipped_mass) / free_mass
        weights = np.where(clipped, max_weight, scale * raw)
        # A small tolerance stops round-off from clipping a class that sits exactly on the bound.
        newly_clipped = free & (weights > max_weight * (1.0 + 1e-12))
        if not newly_clipped.any():
            break
        clipped |= newly_clipped
    weights = np.where(present, np.minimum(weights, max_weight), 0.0)
    return weights.astype(np.float32)
