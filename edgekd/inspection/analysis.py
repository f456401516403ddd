"""The report's measurements: scores, calibration, robustness and layer sensitivity.

Each function scores logits or a loaded model (`edgekd.inspection.load.LoadedModel`) and
returns a block of ``fidelity.json``; `edgekd.inspection.run.run_inspect` assembles them.
The numbers come from the numpy-only `edgekd.fidelity.scores` and `edgekd.core.metrics`;
the attacks, certificates and the calibrated ONNX export import torch (through
`edgekd.fidelity.attacks`) only when called, for torch models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from edgekd.core.metrics import HEADLINE_KEYS, classification_metrics
from edgekd.fidelity.scores import (
    apply_temperature,
    bootstrap_intervals,
    certified_accuracy_curve,
    certified_radius,
    fit_temperature,
    minority_majority_ece,
    per_class_ece,
)
from edgekd.inspection.load import LoadedModel

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ATTACK_EPS_FRACTIONS",
    "BOOTSTRAP_LEVEL",
    "CERTIFICATE_POINTS",
    "NOT_AVAILABLE",
    "RANK_KS",
]

# FGSM/PGD radii as fractions of the test inputs' standard deviation: from barely visible
# noise to a perturbation a fifth of the signal's spread.
ATTACK_EPS_FRACTIONS = (0.05, 0.1, 0.2)
# Points of the certified-accuracy curve; 21 resolve its knee without crowding the table.
CERTIFICATE_POINTS = 21
BOOTSTRAP_LEVEL = 0.95
RANK_KS = (1, 3, 5)
NOT_AVAILABLE = "not available"


# ------------------------------------------------------------------ scores
def _scores(
    logits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    class_counts: np.ndarray,
    *,
    bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    probs = apply_temperature(logits, 1.0)
    m = classification_metrics(probs, labels, num_classes)
    from edgekd.reporting.report import dark_knowledge

    return {
        **{key: m[key] for key in HEADLINE_KEYS},
        "per_class_ece": per_class_ece(probs, labels, num_classes),
        "minority_majority_ece": minority_majority_ece(probs, labels, class_counts),
        "dark_knowledge": dark_knowledge(probs, labels, num_classes),
        "bootstrap": bootstrap_intervals(
            probs, labels, n_resamples=bootstrap, seed=seed, level=BOOTSTRAP_LEVEL
        ),
    }


def _calibration(
    calibration_logits: np.ndarray,
    calibration_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
) -> tuple[dict[str, float], np.ndarray]:
    temperature = fit_temperature(calibration_logits, calibration_labels)
    probs = apply_temperature(test_logits, temperature)
    m = classification_metrics(probs, test_labels, num_classes)
    block = {"temperature": temperature}
    block.update({key: cast(float, m[key]) for key in ("ece", "nll", "brier")})
    return block, probs


def _adversarial(
    model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int
) -> list[dict[str, float]]:
    from edgekd.fidelity.attacks import fgsm_accuracy, pgd_accuracy

    scale = float(x.std())
    rows = []
    for fraction in ATTACK_EPS_FRACTIONS:
        eps = fraction * scale
        rows.append(
            {
                "eps_fraction_of_std": fraction,
                "eps": eps,
                "fgsm_accuracy": fgsm_accuracy(model, x, y, eps),
                "pgd_accuracy": pgd_accuracy(model, x, y, eps, seed=seed),
            }
        )
    return rows


def _robustness(
    models: dict[str, LoadedModel], x: np.ndarray, y: np.ndarray, seed: int
) -> dict[str, dict[str, Any]]:
    """Attacks and head certificates for the torch models, "not available" for the rest."""
    from edgekd.fidelity.attacks import head_features

    heads: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    out: dict[str, dict[str, Any]] = {}
    for role, model in models.items():
        if model.torch_model is None:
            reason = f"{NOT_AVAILABLE} for {model.format} models (needs a torch checkpoint)"
            out[role] = {"adversarial": reason, "certificate": reason}
            continue
        out[role] = {"adversarial": _adversarial(model.torch_model, x, y, seed)}
        heads[role] = head_features(model.torch_model, x)
    radii = {role: certified_radius(f, y, w, b) for role, (f, w, b) in heads.items()}
    finite = [r[np.isfinite(r)] for r in radii.values()]
    top = max((float(np.quantile(r, 0.95)) for r in finite if r.size), default=0.0)
    grid = np.linspace(0.0, top if top > 0 else 1.0, CERTIFICATE_POINTS).tolist()
    for role, (f, w, b) in heads.items():
        out[role]["certificate"] = {
            "eps": grid,
            "certified_accuracy": certified_accuracy_curve(f, y, w, b, grid),
            # Over the correctly classified samples: a misclassified one has radius 0 and
            # would pin the median at 0 for any model below 50 % accuracy.
            "median_radius_correct": _median_positive(radii[role]),
            "feature_dim": int(f.shape[1]),
        }
    return out


def _median_positive(radii: np.ndarray) -> float:
    positive = radii[radii > 0]
    return float(np.median(positive)) if positive.size else 0.0


# ------------------------------------------------------------------ student extras
def _export_calibrated(
    model: nn.Module, temperature: float, input_shape: tuple[int, ...], path: Path
) -> str:
    """Carry the fitted temperature into an ONNX export: logits / T."""
    import torch

    from edgekd.deploy.onnx_export import export_onnx_bytes

    class TemperatureScaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) / temperature

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(export_onnx_bytes(TemperatureScaled(), input_shape))
    return str(path)


def _layer_sensitivity(
    student: LoadedModel, compressed: LoadedModel | None, x: np.ndarray, y: np.ndarray
) -> dict[str, Any] | str:
    if compressed is None or compressed.torch_model is None:
        return "skipped: no compressed model given"
    if student.torch_model is None:
        return f"{NOT_AVAILABLE}: the student is a {student.format} model, not a torch checkpoint"
    from edgekd.fidelity.attacks import layer_sensitivity

    eps = ATTACK_EPS_FRACTIONS[1] * float(x.std())
    return {
        "compressed_path": compressed.path,
        "eps": eps,
        "layers": layer_sensitivity(student.torch_model, compressed.torch_model, x, y, eps),
    }
