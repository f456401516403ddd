"""PNG plots of a continual run: the accuracy matrix as a heatmap, accuracy per task over rounds.

Drawn like `edgekd.reporting.plots`: an object-oriented figure on an Agg canvas, matplotlib
imported inside each function, no pyplot state left behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from edgekd.reporting.plots import new_figure, save_figure

__all__ = ["plot_accuracy_matrix", "plot_task_accuracy"]


def plot_accuracy_matrix(
    matrix: Sequence[Sequence[float]], path: Path, *, title: str = "Accuracy matrix"
) -> None:
    """Write a heatmap of ``R`` (row ``i``: after training task ``i``; column ``j``: scored on
    task ``j``), each cell annotated with its value, colours fixed to ``[0, 1]``.

    Raises:
        ValueError: ``matrix`` is not square.
    """
    rows = [[float(v) for v in row] for row in matrix]
    size = len(rows)
    if size == 0 or any(len(row) != size for row in rows):
        raise ValueError(
            f"the accuracy matrix must be square, got rows of {[len(r) for r in rows]}"
        )
    figure = new_figure()
    axes = figure.axes[0]
    image = axes.imshow(rows, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            # Dark text on the bright end of viridis, white on the dark end.
            axes.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if value > 0.6 else "white",
            )
    axes.set_xticks(range(size))
    axes.set_yticks(range(size))
    axes.set_xlabel("scored on task j")
    axes.set_ylabel("after training task i")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="accuracy")
    save_figure(figure, path)


def plot_task_accuracy(
    per_round: Mapping[int, Sequence[float]],
    rounds_per_task: int,
    path: Path,
    *,
    title: str = "Accuracy per task",
) -> None:
    """Write one line per task: its test accuracy after every round (round 0: the untrained
    student), with dotted lines where a new task starts.

    Args:
        per_round: round -> accuracy on each task (all rounds list the same tasks).
        rounds_per_task: rounds spent on each task (the task boundaries).
        path: where the PNG goes; missing parent folders are created.
        title: axes title.
    """
    rounds = sorted(per_round)
    tasks = len(per_round[rounds[0]]) if rounds else 0
    figure = new_figure()
    axes = figure.axes[0]
    for task in range(tasks):
        axes.plot(
            rounds,
            [float(per_round[r][task]) for r in rounds],
            marker="o",
            markersize=2,
            label=f"task {task}",
        )
    last = rounds[-1] if rounds else 0
    for boundary in range(rounds_per_task, last, rounds_per_task):
        axes.axvline(boundary + 0.5, linestyle=":", color="grey", linewidth=1)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy")
    axes.set_title(title)
    axes.grid(visible=True, alpha=0.3)
    if tasks:
        axes.legend(loc="best", fontsize=8)
    save_figure(figure, path)
