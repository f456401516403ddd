"""`run_inspect`: load the models, score them, probe their robustness and write the report.

Each step is a function of its own: `_load_models` (every file is read and probed before
any scoring), `_report_header`, `_score_models`, `_fidelity`, `_add_robustness`; the
outputs are written by `edgekd.inspection.render`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.core.config import DataConfig
from edgekd.core.metrics import mean_kl, reliability_bins, teacher_agreement
from edgekd.deploy.host import int8_host
from edgekd.fidelity.scores import apply_temperature, rank_order_fidelity, uq_fidelity
from edgekd.inspection.analysis import (
    BOOTSTRAP_LEVEL,
    RANK_KS,
    _calibration,
    _export_calibrated,
    _layer_sensitivity,
    _robustness,
    _scores,
)
from edgekd.inspection.load import LoadedModel, ModelFileError, load_model
from edgekd.inspection.render import _write_json, _write_plots, render_markdown

if TYPE_CHECKING:
    from edgekd.core.data import FederatedData

__all__ = ["run_inspect"]


def run_inspect(
    teacher_path: str,
    student_path: str,
    *,
    dataset_cfg: DataConfig,
    seed: int,
    out_dir: Path,
    bootstrap: int = 1000,
    calibrate: bool = False,
    compressed_path: str | None = None,
) -> dict[str, Any]:
    """Score teacher and student on the devices' test split and write the fidelity report.

    Args:
        teacher_path: Teacher checkpoint written by `edgekd.learn.models.save_checkpoint`.
        student_path: Student as a torch checkpoint (``.pt``), ONNX (``.onnx``) or TFLite
            (``.tflite``) file.
        dataset_cfg: The data the models were trained for; its test split is scored.
        seed: Data seed (as in the run) and bootstrap/PGD seed.
        out_dir: Where ``fidelity.json``, ``fidelity.md`` and the PNGs go (created).
        bootstrap: Bootstrap resamples per model.
        calibrate: Also fit a temperature per model on the server's held-out split and score the
            calibrated probabilities.
        compressed_path: Optional compressed torch checkpoint of the student's
            architecture; with a torch student, each layer's effect on FGSM accuracy is
            reported (`edgekd.fidelity.attacks.layer_sensitivity`).

    Returns:
        The dict written to ``fidelity.json`` (NaN as in numpy; the file has null).

    Raises:
        ModelFileError: a model file is missing, corrupt or does not fit the data.
    """
    from edgekd.core.data import load_federated_data

    data = load_federated_data(dataset_cfg, seed)
    x, y = data.test.x, data.test.y
    models, compressed = _load_models(teacher_path, student_path, compressed_path, data)
    class_counts = np.bincount(data.pool.y, minlength=data.num_classes)
    logits = {role: m.predict(x).astype(np.float64) for role, m in models.items()}

    report = _report_header(dataset_cfg, seed, data, class_counts, bootstrap, calibrate)
    reliability = _score_models(
        report,
        models,
        logits,
        data,
        class_counts,
        bootstrap=bootstrap,
        seed=seed,
        calibrate=calibrate,
    )
    report["fidelity"] = _fidelity(report, logits)
    robustness = _add_robustness(report, models, compressed, x, y, seed)
    if calibrate and models["student"].torch_model is not None:
        report["student"]["calibrated"]["export"] = _export_calibrated(
            models["student"].torch_model,
            report["student"]["calibrated"]["temperature"],
            data.input_shape,
            Path(out_dir) / "student.calibrated.onnx",
        )
    report["layer_sensitivity"] = _layer_sensitivity(models["student"], compressed, x, y)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = _write_plots(out_dir, reliability, robustness)
    _write_json(out_dir / "fidelity.json", report)
    (out_dir / "fidelity.md").write_text(render_markdown(report))
    return report


def _load_models(
    teacher_path: str, student_path: str, compressed_path: str | None, data: FederatedData
) -> tuple[dict[str, LoadedModel], LoadedModel | None]:
    """Teacher and student by role, and the compressed student if one is given.

    Every file is loaded before any scoring, so a bad one fails in a second, not after the
    attacks.
    """
    k = data.num_classes
    models = {
        "teacher": load_model(teacher_path, data.input_shape, k),
        "student": load_model(student_path, data.input_shape, k),
    }
    if models["teacher"].torch_model is None:
        raise ModelFileError(f"teacher {teacher_path} must be a torch checkpoint (.pt)")
    compressed = None
    if compressed_path is not None:
        compressed = load_model(compressed_path, data.input_shape, k)
        if compressed.torch_model is None:
            raise ModelFileError(f"compressed model {compressed_path} must be a torch checkpoint")
    return models, compressed


def _report_header(
    dataset_cfg: DataConfig,
    seed: int,
    data: FederatedData,
    class_counts: np.ndarray,
    bootstrap: int,
    calibrate: bool,
) -> dict[str, Any]:
    """The report's ``data``, ``settings`` and ``host`` blocks."""
    return {
        "data": {
            "dataset": dataset_cfg.dataset,
            "num_samples": dataset_cfg.num_samples,
            "client_shift": dataset_cfg.client_shift,
            "seed": seed,
            "test_size": int(len(data.test.y)),
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "pool_class_counts": [int(c) for c in class_counts],
            "calibration_split": "server_test" if calibrate else None,
        },
        "settings": {
            "bootstrap_resamples": bootstrap,
            "bootstrap_level": BOOTSTRAP_LEVEL,
            "ece_bins": 15,
        },
        # An INT8 model's scores depend on the CPU's INT8 kernels (edgekd.deploy.host).
        "host": int8_host(),
    }


def _score_models(
    report: dict[str, Any],
    models: dict[str, LoadedModel],
    logits: dict[str, np.ndarray],
    data: FederatedData,
    class_counts: np.ndarray,
    *,
    bootstrap: int,
    seed: int,
    calibrate: bool,
) -> dict[str, dict[str, list[float]]]:
    """Add each model's block (scores, and calibrated ones) to ``report`` by its role.

    Returns:
        The reliability bins per role (``"<role>_calibrated"`` too with calibration), for
        the plots.
    """
    y, k = data.test.y, data.num_classes
    reliability: dict[str, dict[str, list[float]]] = {}
    for role, model in models.items():
        block: dict[str, Any] = {"path": model.path, "format": model.format}
        block.update(_scores(logits[role], y, k, class_counts, bootstrap=bootstrap, seed=seed))
        reliability[role] = reliability_bins(apply_temperature(logits[role], 1.0), y)
        if calibrate:
            calib_logits = model.predict(data.server_test.x).astype(np.float64)
            block["calibrated"], calibrated = _calibration(
                calib_logits, data.server_test.y, logits[role], y, k
            )
            reliability[f"{role}_calibrated"] = reliability_bins(calibrated, y)
        report[role] = block
    return reliability


def _fidelity(report: dict[str, Any], logits: dict[str, np.ndarray]) -> dict[str, Any]:
    """The student's agreement with the teacher: top-1, KL, rank order and intervals."""
    teacher_probs = apply_temperature(logits["teacher"], 1.0)
    student_probs = apply_temperature(logits["student"], 1.0)
    return {
        "agreement": teacher_agreement(student_probs, teacher_probs),
        "kl_to_teacher": mean_kl(teacher_probs, student_probs),
        "rank_order": rank_order_fidelity(logits["teacher"], logits["student"], RANK_KS),
        "uq": uq_fidelity(report["teacher"]["bootstrap"], report["student"]["bootstrap"]),
    }


def _add_robustness(
    report: dict[str, Any],
    models: dict[str, LoadedModel],
    compressed: LoadedModel | None,
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Put each model's attacks and certificates into ``report`` (and the compressed
    student's block, if there is one); returns the robustness blocks by role."""
    robust_models = dict(models)
    if compressed is not None:
        robust_models["compressed"] = compressed
    robustness = _robustness(robust_models, x, y, seed)
    for role in models:
        report[role]["robustness"] = robustness[role]
    if compressed is not None:
        report["compressed"] = {
            "path": compressed.path,
            "format": compressed.format,
            "accuracy": float((compressed.predict(x).argmax(1) == y).mean()),
            "robustness": robustness["compressed"],
        }
    return robustness
