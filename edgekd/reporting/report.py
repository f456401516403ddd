"""The run folder: ``report.json``, ``rounds.jsonl``, checkpoints and PNG plots.

The schema of ``report.json`` is documented in the README ("Outputs").
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.core.metrics import (
    HEADLINE_KEYS,
    classification_metrics,
    mean_kl,
    reliability_bins,
    teacher_agreement,
)
from edgekd.fidelity.scores import dark_knowledge_entropy, max_dark_knowledge_entropy
from edgekd.reporting.plots import plot_accuracy, plot_bytes, plot_reliability


def model_summary(
    probs: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    params: int,
    nbytes: int,
    teacher_probs: np.ndarray | None = None,
) -> dict[str, Any]:
    """The report's per-model block: accuracy, calibration, recall and teacher fidelity."""
    m = classification_metrics(probs, labels, num_classes)
    out: dict[str, Any] = {key: m[key] for key in HEADLINE_KEYS}
    out.update(params=params, bytes=nbytes)
    if teacher_probs is not None:
        out["agreement"] = teacher_agreement(probs, teacher_probs)
        out["kl_to_teacher"] = mean_kl(teacher_probs, probs)
    return out


def dark_knowledge(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Mean entropy of the non-target distribution, next to its maximum ln(C−1)."""
    return {
        "entropy": dark_knowledge_entropy(probs, labels),
        "max": max_dark_knowledge_entropy(num_classes),
    }


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temp file and a rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(_jsonable(payload), tmp, indent=2)
    os.replace(tmp.name, path)


def write_rounds(path: Path, rounds: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(_jsonable(r)) + "\n" for r in rounds))


def write_plots(
    out_dir: Path,
    rounds: list[dict[str, Any]],
    student_probs: np.ndarray,
    labels: np.ndarray,
    baseline_rounds: list[dict[str, Any]] | None = None,
) -> None:
    plot_accuracy(rounds, out_dir / "accuracy.png", baseline=baseline_rounds)
    plot_bytes(rounds, out_dir / "bytes.png")
    plot_reliability(
        reliability_bins(student_probs, labels), out_dir / "reliability.png", "Student reliability"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN; an absent class's recall is null
    return value
