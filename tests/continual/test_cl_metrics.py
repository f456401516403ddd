"""Continual-learning metrics against hand-computed values on small accuracy matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgekd.continual.metrics import average_accuracy, bwt, forgetting, fwt, summarize

# R[i, j] = accuracy on task j after training task i.
R = np.array(
    [
        [0.90, 0.30, 0.10],
        [0.70, 0.80, 0.20],
        [0.50, 0.60, 0.85],
    ]
)
B = np.array([0.10, 0.10, 0.10])


def test_hand_computed_values() -> None:
    # Prepare: by hand,
    #   A   = (0.50 + 0.60 + 0.85) / 3                         = 0.65
    #   F   = ((max(0.9, 0.7) - 0.5) + (max(0.3, 0.8) - 0.6)) / 2 = (0.4 + 0.2) / 2 = 0.3
    #   BWT = ((0.5 - 0.9) + (0.6 - 0.8)) / 2                   = -0.3
    #   FWT = ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = (0.2 + 0.1) / 2 = 0.15
    # Execute
    out = summarize(R, B)
    # Assert
    assert out["avg_accuracy"] == pytest.approx(0.65)
    assert out["forgetting"] == pytest.approx(0.3)
    assert out["bwt"] == pytest.approx(-0.3)
    assert out["fwt"] == pytest.approx(0.15)
    assert out["matrix"] == R.tolist()
    assert set(out) == {"matrix", "avg_accuracy", "forgetting", "bwt", "fwt"}


def test_forgetting_uses_the_best_earlier_row_not_the_diagonal() -> None:
    # Domain-incremental shape: task 1 peaks before its own training, so F and -BWT differ.
    r = np.array(
        [
            [0.80, 0.70, 0.40],
            [0.60, 0.60, 0.50],
            [0.70, 0.65, 0.90],
        ]
    )
    # F   = ((max(0.8, 0.6) - 0.7) + (max(0.7, 0.6) - 0.65)) / 2 = (0.1 + 0.05) / 2 = 0.075
    # BWT = ((0.7 - 0.8) + (0.65 - 0.6)) / 2                      = -0.025
    assert forgetting(r) == pytest.approx(0.075)
    assert bwt(r) == pytest.approx(-0.025)


def test_signs_for_catastrophic_forgetting_and_for_improvement() -> None:
    # Catastrophic: each task is learned perfectly, then lost entirely.
    eye = np.eye(3)
    assert forgetting(eye) == pytest.approx(1.0)
    assert bwt(eye) == pytest.approx(-1.0)
    assert average_accuracy(eye) == pytest.approx(1.0 / 3.0)
    # Improving: later training helps old tasks, so no forgetting and positive BWT.
    up = np.array([[0.5, 0.0, 0.0], [0.6, 0.5, 0.0], [0.7, 0.6, 0.5]])
    assert forgetting(up) < 0
    assert bwt(up) == pytest.approx(0.15)
    # Forward transfer is positive only when earlier tasks beat the random baseline.
    assert fwt(up, np.array([0.0, 0.1, 0.1])) == pytest.approx(-0.1)
    assert fwt(R, np.zeros(3)) > 0


def test_one_task_has_no_transfer_or_forgetting() -> None:
    r = np.array([[0.8]])
    assert average_accuracy(r) == pytest.approx(0.8)
    assert math.isnan(forgetting(r))
    assert math.isnan(bwt(r))
    assert math.isnan(fwt(r, [0.1]))


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="square"):
        forgetting(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="b must have shape"):
        fwt(R, np.zeros(2))
