"""Tests for edgekd.reporting.plots: each function writes a real PNG and leaks no figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgekd.reporting.plots import plot_accuracy, plot_bytes, plot_reliability

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    content = path.read_bytes()
    assert len(content) > len(PNG_SIGNATURE)
    assert content.startswith(PNG_SIGNATURE)


def make_rounds(count: int) -> list[dict[str, Any]]:
    return [
        {
            "round": r,
            "accuracy": 0.1 + 0.08 * r,
            "bytes_down": 250_000.0 * r,
            "bytes_up": 1_200.0 * r,
        }
        for r in range(1, count + 1)
    ]


def make_bins(edges: int = 15) -> dict[str, list[float]]:
    lower = [i / edges for i in range(edges)]
    return {
        "bin_lower": lower,
        "bin_upper": [(i + 1) / edges for i in range(edges)],
        "accuracy": [min(1.0, low + 0.02) for low in lower],
        "confidence": [low + 0.5 / edges for low in lower],
        # Low-confidence bins are commonly empty; they must not break the plot.
        "count": [0.0, 0.0, *[float(10 * i) for i in range(2, edges)]],
    }


def test_plot_accuracy_writes_png(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "accuracy.png"

    # Execute
    plot_accuracy(make_rounds(10), path)

    # Assert
    assert_png(path)


def test_plot_accuracy_with_baseline_creates_parent_folders(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "report" / "plots" / "accuracy.png"
    rounds = make_rounds(5)
    rounds.append({"round": 6, "accuracy": None})  # a round without evaluation
    baseline = [{"round": r, "accuracy": 0.05 * r} for r in (3, 1, 2)]
    baseline_before = [dict(row) for row in baseline]

    # Execute
    plot_accuracy(rounds, path, baseline=baseline)

    # Assert
    assert_png(path)
    assert baseline == baseline_before  # sorted internally, caller's list untouched


def test_plot_accuracy_names_a_row_without_round(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="row 0 has no 'round' key"):
        plot_accuracy([{"accuracy": 0.5}], tmp_path / "accuracy.png")


def test_plot_bytes_writes_png_on_log_and_linear_axes(tmp_path: Path) -> None:
    # Prepare
    with_zero = make_rounds(4)
    with_zero[0]["bytes_up"] = 0.0  # would vanish on a log axis

    # Execute
    plot_bytes(make_rounds(4), tmp_path / "bytes_log.png")
    plot_bytes(with_zero, tmp_path / "bytes_linear.png")

    # Assert
    assert_png(tmp_path / "bytes_log.png")
    assert_png(tmp_path / "bytes_linear.png")


def test_plot_bytes_names_the_missing_key(tmp_path: Path) -> None:
    # Prepare
    rounds = [{"round": 1, "bytes_down": 10}]

    # Execute / Assert
    with pytest.raises(ValueError, match="no 'bytes_up' key"):
        plot_bytes(rounds, tmp_path / "bytes.png")


def test_plot_reliability_writes_png(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "reliability.png"

    # Execute
    plot_reliability(make_bins(), path, title="Student reliability")

    # Assert
    assert_png(path)


def test_plot_reliability_rejects_ragged_bins(tmp_path: Path) -> None:
    # Prepare
    bins = make_bins()
    bins["count"] = bins["count"][:-1]

    # Execute / Assert
    with pytest.raises(ValueError, match="differ in length"):
        plot_reliability(bins, tmp_path / "reliability.png")


def test_plot_reliability_names_missing_keys(tmp_path: Path) -> None:
    # Prepare
    bins = make_bins()
    del bins["confidence"]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"lack keys \['confidence'\]"):
        plot_reliability(bins, tmp_path / "reliability.png")


def test_plots_leave_no_pyplot_figure_open(tmp_path: Path) -> None:
    # Prepare
    pyplot = pytest.importorskip("matplotlib.pyplot")
    open_before = set(pyplot.get_fignums())

    # Execute
    plot_accuracy(make_rounds(3), tmp_path / "a.png")
    plot_bytes(make_rounds(3), tmp_path / "b.png")
    plot_reliability(make_bins(), tmp_path / "r.png")

    # Assert
    assert set(pyplot.get_fignums()) == open_before


def test_importing_report_plots_does_not_import_matplotlib() -> None:
    # Execute: a fresh interpreter, since this test process has matplotlib loaded already
    probe = "import sys, edgekd.reporting.plots; print('matplotlib' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )

    # Assert
    assert result.stdout.strip() == "False"
