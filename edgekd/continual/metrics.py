"""Continual-learning metrics from an accuracy matrix (numpy only).

``R`` is a ``T x T`` matrix with ``R[i, j]`` = test accuracy on task ``j`` after training on
task ``i`` (tasks in stream order, 0-based). ``b[j]`` is the accuracy on task ``j`` of the
model before any training (a random initialisation), the reference for forward transfer.

Definitions, with ``T`` tasks and the last row ``T - 1``:

* average accuracy ``A = mean_j R[T-1, j]`` (Chaudhry et al., "Riemannian Walk for
  Incremental Learning", ECCV 2018, eq. 1; Lopez-Paz & Ranzato 2017 "ACC");
* forgetting ``F = mean_{j<T-1} (max_{l<T-1} R[l, j] - R[T-1, j])`` (Chaudhry et al. 2018,
  eq. 2-3);
* backward transfer ``BWT = mean_{j<T-1} (R[T-1, j] - R[j, j])`` (Lopez-Paz & Ranzato,
  "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, eq. 3);
* forward transfer ``FWT = mean_{j>=1} (R[j-1, j] - b[j])`` (Lopez-Paz & Ranzato 2017, eq. 4).

Forgetting and BWT need two tasks or more, FWT too; with one task they are NaN.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["average_accuracy", "bwt", "forgetting", "fwt", "summarize"]


def _as_matrix(r: npt.ArrayLike) -> npt.NDArray[np.float64]:
    m = np.asarray(r, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {m.shape}")
    return m


def average_accuracy(r: npt.ArrayLike) -> float:
    """``A = mean_j R[T-1, j]``: mean accuracy over all tasks after the last one."""
    m = _as_matrix(r)
    return float(m[-1].mean())


def forgetting(r: npt.ArrayLike) -> float:
    """Average forgetting, Chaudhry et al. (ECCV 2018)::

        F = 1/(T-1) * sum_{j<T-1} ( max_{l<T-1} R[l, j] - R[T-1, j] ).

    Positive when accuracy on an old task fell below its best earlier value; NaN for ``T=1``.
    """
    m = _as_matrix(r)
    t = m.shape[0]
    if t < 2:
        return math.nan
    best = m[: t - 1, : t - 1].max(axis=0)
    return float((best - m[t - 1, : t - 1]).mean())


def bwt(r: npt.ArrayLike) -> float:
    """Backward transfer, Lopez-Paz & Ranzato (NeurIPS 2017)::

        BWT = 1/(T-1) * sum_{j<T-1} ( R[T-1, j] - R[j, j] ).

    Negative when later tasks hurt earlier ones (forgetting); NaN for ``T=1``.
    """
    m = _as_matrix(r)
    t = m.shape[0]
    if t < 2:
        return math.nan
    return float((m[t - 1, : t - 1] - np.diag(m)[: t - 1]).mean())


def fwt(r: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Forward transfer, Lopez-Paz & Ranzato (NeurIPS 2017)::

        FWT = 1/(T-1) * sum_{j>=1} ( R[j-1, j] - b[j] ),

    with ``b[j]`` the accuracy on task ``j`` of the randomly initialised model: positive when
    learning the earlier tasks already helps on task ``j``; NaN for ``T=1``.
    """
    m = _as_matrix(r)
    base = np.asarray(b, dtype=np.float64)
    t = m.shape[0]
    if base.shape != (t,):
        raise ValueError(f"b must have shape ({t},), got {base.shape}")
    if t < 2:
        return math.nan
    return float((np.diag(m, k=1) - base[1:]).mean())


def summarize(r: npt.ArrayLike, b: npt.ArrayLike) -> dict[str, float | list[list[float]]]:
    """All metrics of this module in one dict (JSON-ready: the matrix as nested lists).

    Returns:
        Keys ``matrix``, ``avg_accuracy``, ``forgetting``, ``bwt`` and ``fwt``.
    """
    m = _as_matrix(r)
    return {
        "matrix": m.tolist(),
        "avg_accuracy": average_accuracy(m),
        "forgetting": forgetting(m),
        "bwt": bwt(m),
        "fwt": fwt(m, b),
    }
