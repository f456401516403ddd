"""PNG plots for the end-of-run report: accuracy and bytes per round, reliability diagram.

matplotlib is imported inside each function so that importing this module (and hence
the report code) stays cheap on devices and in tests that never draw. The figures
are built with the object-oriented API on an Agg canvas rather than through pyplot:
that never touches pyplot's global figure registry or the process-wide backend, so
nothing is left open after a call and a host application's GUI backend is unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_accuracy", "plot_bytes", "plot_reliability"]

_RELIABILITY_KEYS = ("bin_lower", "bin_upper", "accuracy", "confidence", "count")


def new_figure(*, rows: int = 1, height_ratios: Sequence[float] | None = None) -> Figure:
    """An object-oriented figure on an Agg canvas (no pyplot global state): one axes, or
    ``rows`` stacked axes sharing x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8 if rows == 1 else 6.0), layout="constrained")
    FigureCanvasAgg(figure)
    if rows > 1:
        figure.subplots(rows, 1, sharex=True, height_ratios=height_ratios)
    else:
        figure.add_subplot()
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a 100-dpi PNG (folders made as needed) and free its artists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    # The OO figure is not in pyplot's registry; dropping its artists frees the memory
    # promptly even if a caller keeps a reference around.
    figure.clear()


def _column(rows: Sequence[Mapping[str, Any]], key: str, what: str) -> list[float]:
    values: list[float] = []
    for index, row in enumerate(rows):
        if key not in row:
            raise ValueError(f"{what}: row {index} has no {key!r} key (keys: {sorted(row)})")
        values.append(float(row[key]))
    return values


def _accuracy_series(
    rounds: Sequence[Mapping[str, Any]], what: str
) -> tuple[list[float], list[float]]:
    # Rounds without an evaluation carry accuracy None; skip them rather than draw a 0.
    evaluated = [row for row in rounds if row.get("accuracy") is not None]
    ordered = sorted(evaluated, key=lambda row: float(row.get("round", 0)))
    return _column(ordered, "round", what), _column(ordered, "accuracy", what)


def plot_accuracy(
    rounds: list[dict[str, Any]], path: Path, *, baseline: list[dict[str, Any]] | None = None
) -> None:
    """Write a PNG of test accuracy per federated round.

    Args:
        rounds: one dict per round with keys ``round`` and ``accuracy``; rows whose
            accuracy is ``None`` (not evaluated that round) are skipped.
        path: where the PNG goes; missing parent folders are created.
        baseline: optional second run in the same format (e.g. FedAvg without KD),
            drawn dashed for comparison.

    Raises:
        ValueError: an evaluated row lacks the ``round`` key.
    """
    figure = new_figure()
    axes = figure.axes[0]
    x, y = _accuracy_series(rounds, "rounds")
    axes.plot(x, y, marker="o", markersize=3, label="edgekd")
    values = list(y)
    if baseline is not None:
        bx, by = _accuracy_series(baseline, "baseline")
        axes.plot(bx, by, marker="s", markersize=3, linestyle="--", label="baseline")
        values.extend(by)
        axes.legend(loc="lower right")
    # Fractions get a fixed 0..1 axis so runs are comparable at a glance; anything
    # else (e.g. percentages) keeps matplotlib's autoscaling.
    if values and all(0.0 <= value <= 1.0 for value in values):
        axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("round")
    axes.set_ylabel("accuracy")
    axes.set_title("Test accuracy per round")
    axes.grid(visible=True, alpha=0.3)
    save_figure(figure, path)


def plot_bytes(rounds: list[dict[str, Any]], path: Path) -> None:
    """Write a PNG of bytes sent to (``bytes_down``) and from (``bytes_up``) clients per round.

    The y axis is logarithmic when every value is positive, since download (model +
    soft targets) and upload (compressed updates) often differ by orders of magnitude;
    a zero would vanish on a log axis, so then it stays linear.

    Raises:
        ValueError: a row lacks ``round``, ``bytes_down`` or ``bytes_up``.
    """
    ordered = sorted(rounds, key=lambda row: float(row.get("round", 0)))
    x = _column(ordered, "round", "rounds")
    down = _column(ordered, "bytes_down", "rounds")
    up = _column(ordered, "bytes_up", "rounds")
    figure = new_figure()
    axes = figure.axes[0]
    axes.plot(x, down, marker="v", markersize=3, label="bytes_down (server → clients)")
    axes.plot(x, up, marker="^", markersize=3, label="bytes_up (clients → server)")
    if down + up and min(down + up) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("round")
    axes.set_ylabel("bytes")
    axes.set_title("Communication per round")
    axes.grid(visible=True, which="both", alpha=0.3)
    if ordered:
        axes.legend(loc="best")
    save_figure(figure, path)


def plot_reliability(bins: dict[str, list[float]], path: Path, title: str = "Reliability") -> None:
    """Write a reliability diagram (Guo et al., "On Calibration of Modern Neural
    Networks", ICML 2017): per confidence bin, a bar of accuracy against the diagonal
    of perfect calibration, the mean confidence as a marker, and the sample count below.

    Args:
        bins: equal-length lists under ``bin_lower``, ``bin_upper``, ``accuracy``,
            ``confidence`` and ``count``; empty bins (count 0) are drawn as gaps.
        path: where the PNG goes; missing parent folders are created.
        title: axes title.

    Raises:
        ValueError: a key is missing or the lists differ in length.
    """
    missing = [key for key in _RELIABILITY_KEYS if key not in bins]
    if missing:
        raise ValueError(
            f"reliability bins lack keys {missing}, expected {list(_RELIABILITY_KEYS)}"
        )
    lengths = {key: len(bins[key]) for key in _RELIABILITY_KEYS}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"reliability bins differ in length: {lengths}")
    lower = [float(value) for value in bins["bin_lower"]]
    width = [float(upper) - low for upper, low in zip(bins["bin_upper"], lower, strict=True)]
    count = [float(value) for value in bins["count"]]
    filled = [index for index, n in enumerate(count) if n > 0]

    figure = new_figure(rows=2, height_ratios=(3.0, 1.0))
    calibration, histogram = figure.axes
    calibration.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", label="perfect")
    calibration.bar(
        [lower[i] for i in filled],
        [float(bins["accuracy"][i]) for i in filled],
        width=[width[i] for i in filled],
        align="edge",
        edgecolor="black",
        alpha=0.8,
        label="accuracy",
    )
    calibration.plot(
        [lower[i] + width[i] / 2 for i in filled],
        [float(bins["confidence"][i]) for i in filled],
        linestyle="none",
        marker="_",
        markersize=12,
        markeredgewidth=2,
        color="tab:red",
        label="mean confidence",
    )
    calibration.set_xlim(0.0, 1.0)
    calibration.set_ylim(0.0, 1.0)
    calibration.set_ylabel("accuracy")
    calibration.set_title(title)
    calibration.legend(loc="upper left")
    histogram.bar(lower, count, width=width, align="edge", edgecolor="black", color="tab:grey")
    histogram.set_xlabel("confidence")
    histogram.set_ylabel("count")
    save_figure(figure, path)


def plot_certified_accuracy(curves: dict[str, dict[str, Any]], path: Path) -> None:
    """Certified accuracy against the feature-space L-infinity radius, one line per model
    (`edgekd inspect`)."""
    figure = new_figure()
    axes = figure.axes[0]
    for role, curve in curves.items():
        label = f"{role} (D = {curve['feature_dim']})"
        axes.plot(curve["eps"], curve["certified_accuracy"], marker="o", markersize=3, label=label)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("feature-space L-inf radius eps")
    axes.set_ylabel("certified accuracy")
    axes.set_title("Linear-head certificate on frozen features")
    axes.grid(visible=True, alpha=0.3)
    axes.legend(loc="upper right")
    save_figure(figure, path)
