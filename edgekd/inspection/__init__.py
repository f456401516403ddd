"""Student fidelity report: calibration, uncertainty, robustness and rank order vs the teacher.

`run_inspect` loads a teacher checkpoint and a student (torch checkpoint, ONNX or
TFLite file), scores both on the devices' test split and writes ``fidelity.json``,
``fidelity.md`` and PNG plots. The numbers come from the numpy-only
`edgekd.fidelity.scores` and `edgekd.core.metrics`; torch (for the teacher and for a
torch student's attacks and certificates) is imported only when a function needs it, so
importing this module stays cheap.

Definitions the report relies on, beyond those modules' docstrings:

* the bootstrap uses the run's seed for both models, so teacher and student are scored on
  the same resamples (a paired bootstrap);
* input-space attack radii are fractions of the test inputs' standard deviation
  (`ATTACK_EPS_FRACTIONS`), because mnist1d signals have no fixed range like [0, 1];
* feature-space certificates use one absolute epsilon grid for both models, from 0 to the
  95th percentile of the larger model's certified radii; teacher and student features
  differ in dimension and scale, so compare the curves' shapes, not a single epsilon;
* minority/majority classes are split at the median class count of the device pool,
  the data the federated student was distilled on;
* with ``calibrate`` the temperature is fitted on the server's held-out test split
  (``server_test``: server-held, never trained on; the public split is the teacher's
  training data, where it is overconfident by construction), which is the server
  domain; the test split is the (shifted) device domain, so the calibrated scores show how
  well a server-side calibration carries over to the devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from edgekd.core.config import DataConfig
from edgekd.core.errors import EdgeKDError, one_line_error
from edgekd.core.metrics import (
    HEADLINE_KEYS,
    classification_metrics,
    mean_kl,
    reliability_bins,
    teacher_agreement,
)
from edgekd.deploy.host import describe_host, int8_host
from edgekd.fidelity.scores import (
    apply_temperature,
    bootstrap_intervals,
    certified_accuracy_curve,
    certified_radius,
    fit_temperature,
    minority_majority_ece,
    per_class_ece,
    rank_order_fidelity,
    uq_fidelity,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ATTACK_EPS_FRACTIONS", "LoadedModel", "ModelFileError", "load_model", "run_inspect"]

# FGSM/PGD radii as fractions of the test inputs' standard deviation: from barely visible
# noise to a perturbation a fifth of the signal's spread.
ATTACK_EPS_FRACTIONS = (0.05, 0.1, 0.2)
# Points of the certified-accuracy curve; 21 resolve its knee without crowding the table.
CERTIFICATE_POINTS = 21
BOOTSTRAP_LEVEL = 0.95
RANK_KS = (1, 3, 5)
# Samples per ONNX/TFLite call: large enough to amortise the runtime's per-call cost,
# small enough for a device-sized interpreter arena.
_RUNTIME_BATCH = 1024
NOT_AVAILABLE = "not available"


class ModelFileError(EdgeKDError, ValueError):
    """A teacher or student file is missing, corrupt or of the wrong shape; one line."""


@dataclass
class LoadedModel:
    """A model behind a logits function, whatever format it was read from."""

    path: str
    format: str  # "torch" | "onnx" | "tflite"
    predict: Callable[[np.ndarray], np.ndarray]  # float32 inputs [N, ...] -> logits [N, K]
    torch_model: nn.Module | None = None  # only for "torch": attacks and certificates


# Terminal colour codes, which torch puts into some load errors.
# ------------------------------------------------------------------ loading
def _load_torch(path: str, input_shape: tuple[int, ...], num_classes: int) -> LoadedModel:
    from edgekd.learn.models import CheckpointError, load_checkpoint, spec_for
    from edgekd.learn.training import predict_logits

    expected = spec_for(input_shape, num_classes, width=1)  # width is not compared
    try:
        model, _ = load_checkpoint(path, expected)
    except CheckpointError as exc:
        raise ModelFileError(one_line_error(exc)) from None
    model.eval()
    return LoadedModel(path, "torch", lambda x: predict_logits(model, x), model)


def _load_onnx(path: str) -> LoadedModel:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
        raise ModelFileError(f"cannot read ONNX model {path}: {one_line_error(exc)}") from None
    input_name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        parts = [
            session.run(None, {input_name: x[i : i + _RUNTIME_BATCH]})[0]
            for i in range(0, len(x), _RUNTIME_BATCH)
        ]
        return np.concatenate(parts)

    return LoadedModel(path, "onnx", predict)


def _tflite_interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ImportError(
                "reading a .tflite student needs a TFLite interpreter: pip install ai-edge-litert"
            ) from None
    return Interpreter


def _load_tflite(path: str) -> LoadedModel:
    interpreter_class = _tflite_interpreter_class()
    try:
        interpreter = interpreter_class(model_path=path)
        interpreter.allocate_tensors()
    except Exception as exc:  # noqa: BLE001 - the interpreter raises ValueError/RuntimeError
        raise ModelFileError(f"cannot read TFLite model {path}: {one_line_error(exc)}") from None
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    expected = tuple(int(s) for s in source["shape"][1:])
    # litert-torch exports a static batch (shape_signature has no -1): such a model
    # cannot be resized, so it is fed chunks of exactly its batch size.
    signature = source.get("shape_signature", source["shape"])
    fixed_batch = int(source["shape"][0]) if len(signature) and signature[0] != -1 else 0

    def quantize(x: np.ndarray) -> np.ndarray:
        scale, zero = source.get("quantization", (0.0, 0))
        dtype = np.dtype(source["dtype"])
        if np.issubdtype(dtype, np.integer) and scale:
            info = np.iinfo(dtype)
            return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
        return x.astype(dtype)

    def dequantize(z: np.ndarray) -> np.ndarray:
        scale, zero = target.get("quantization", (0.0, 0))
        if np.issubdtype(z.dtype, np.integer) and scale:
            return ((z.astype(np.float32) - zero) * scale).astype(np.float32)
        return z.astype(np.float32)

    def predict(x: np.ndarray) -> np.ndarray:
        # Converters from torch usually keep channels first; a channels-last model is fed
        # the same data with the channel axis moved.
        if expected != x.shape[1:] and expected == (*x.shape[2:], x.shape[1]):
            x = np.moveaxis(x, 1, -1)
        parts = []
        step = fixed_batch or _RUNTIME_BATCH
        for start in range(0, len(x), step):
            batch = x[start : start + step]
            n = len(batch)
            if fixed_batch:  # pad the last chunk to the model's static batch size
                batch = np.concatenate([batch, np.zeros((step - n, *batch.shape[1:]), batch.dtype)])
            else:
                interpreter.resize_tensor_input(source["index"], list(batch.shape))
                interpreter.allocate_tensors()
            interpreter.set_tensor(source["index"], quantize(batch))
            interpreter.invoke()
            parts.append(dequantize(interpreter.get_tensor(target["index"]))[:n])
        return np.concatenate(parts)

    return LoadedModel(path, "tflite", predict)


def load_model(path: str | Path, input_shape: tuple[int, ...], num_classes: int) -> LoadedModel:
    """Load a model by its suffix (``.pt``/``.pth``, ``.onnx``, ``.tflite``) and probe it.

    Raises:
        ModelFileError: the file is missing, unreadable, of another architecture, or does
            not map ``[2, *input_shape]`` to ``[2, num_classes]`` finite logits. The
            message is one line and names the file.
        ImportError: a ``.tflite`` file with no TFLite interpreter installed.
    """
    path = str(path)
    if not Path(path).is_file():
        raise ModelFileError(f"model file not found: {path}")
    suffix = Path(path).suffix.lower()
    if suffix in (".pt", ".pth"):
        model = _load_torch(path, input_shape, num_classes)
    elif suffix == ".onnx":
        model = _load_onnx(path)
    elif suffix == ".tflite":
        model = _load_tflite(path)
    else:
        raise ModelFileError(
            f"unknown model format '{suffix}' of {path}: use .pt, .onnx or .tflite"
        )
    probe = np.zeros((2, *input_shape), dtype=np.float32)
    try:
        logits = np.asarray(model.predict(probe))
    except Exception as exc:  # noqa: BLE001 - any runtime failure means an unusable model
        raise ModelFileError(
            f"model {path} fails on a {probe.shape} input: {one_line_error(exc)}"
        ) from None
    if logits.shape != (2, num_classes) or not np.isfinite(logits).all():
        raise ModelFileError(
            f"model {path} maps {probe.shape} to {logits.shape}, expected (2, {num_classes})"
        )
    return model


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


# ------------------------------------------------------------------ run
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
    k = data.num_classes
    models = {
        "teacher": load_model(teacher_path, data.input_shape, k),
        "student": load_model(student_path, data.input_shape, k),
    }
    if models["teacher"].torch_model is None:
        raise ModelFileError(f"teacher {teacher_path} must be a torch checkpoint (.pt)")
    # Loaded before any scoring so a bad file fails in a second, not after the attacks.
    compressed = None
    if compressed_path is not None:
        compressed = load_model(compressed_path, data.input_shape, k)
        if compressed.torch_model is None:
            raise ModelFileError(f"compressed model {compressed_path} must be a torch checkpoint")
    class_counts = np.bincount(data.pool.y, minlength=k)
    logits = {role: m.predict(x).astype(np.float64) for role, m in models.items()}

    report: dict[str, Any] = {
        "data": {
            "dataset": dataset_cfg.dataset,
            "num_samples": dataset_cfg.num_samples,
            "client_shift": dataset_cfg.client_shift,
            "seed": seed,
            "test_size": int(len(y)),
            "num_classes": k,
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

    teacher_probs = apply_temperature(logits["teacher"], 1.0)
    student_probs = apply_temperature(logits["student"], 1.0)
    report["fidelity"] = {
        "agreement": teacher_agreement(student_probs, teacher_probs),
        "kl_to_teacher": mean_kl(teacher_probs, student_probs),
        "rank_order": rank_order_fidelity(logits["teacher"], logits["student"], RANK_KS),
        "uq": uq_fidelity(report["teacher"]["bootstrap"], report["student"]["bootstrap"]),
    }

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


# ------------------------------------------------------------------ outputs
def _write_json(path: Path, report: dict[str, Any]) -> None:
    from edgekd.reporting.report import write_json_atomic

    write_json_atomic(path, report)


def _write_plots(
    out_dir: Path,
    reliability: dict[str, dict[str, list[float]]],
    robustness: dict[str, dict[str, Any]],
) -> list[str]:
    from edgekd.reporting.plots import plot_reliability

    names = []
    for role, bins in reliability.items():
        name = f"reliability_{role}.png"
        plot_reliability(
            bins, out_dir / name, title=f"{role.replace('_', ' ').capitalize()} reliability"
        )
        names.append(name)
    curves = {
        role: block["certificate"]
        for role, block in robustness.items()
        if isinstance(block.get("certificate"), dict)
    }
    if curves:
        _plot_certified(curves, out_dir / "certified_accuracy.png")
        names.append("certified_accuracy.png")
    return names


def _plot_certified(curves: dict[str, dict[str, Any]], path: Path) -> None:
    """Certified accuracy against the feature-space L-infinity radius, one line per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The OO API on an Agg canvas, as in edgekd.reporting.plots: no pyplot global state.
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for role, curve in curves.items():
        label = f"{role} (D = {curve['feature_dim']})"
        axes.plot(curve["eps"], curve["certified_accuracy"], marker="o", markersize=3, label=label)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("feature-space L-inf radius eps")
    axes.set_ylabel("certified accuracy")
    axes.set_title("Linear-head certificate on frozen features")
    axes.grid(visible=True, alpha=0.3)
    axes.legend(loc="upper right")
    figure.savefig(path, format="png", dpi=100)
    figure.clear()


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _interval(ci: dict[str, float]) -> str:
    return f"{_fmt(ci['point'])} [{_fmt(ci['lower'])}, {_fmt(ci['upper'])}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """``fidelity.md``: the report's numbers as Markdown tables."""
    t, s, fid = report["teacher"], report["student"], report["fidelity"]
    level = int(round(100 * report["settings"]["bootstrap_level"]))
    lines = [
        "# Student fidelity report",
        "",
        f"Teacher `{t['path']}` ({t['format']}), student `{s['path']}` ({s['format']}); "
        f"{report['data']['dataset']} devices' test split, {report['data']['test_size']} samples, "
        f"seed {report['data']['seed']}. Intervals: {level} % percentile bootstrap, "
        f"{report['settings']['bootstrap_resamples']} resamples.",
        "",
        f"Measured on {describe_host(report['host'])}." if "host" in report else "",
        "",
        "## Scores",
        "",
    ]
    rows = [
        [name, _interval(t["bootstrap"][key]), _interval(s["bootstrap"][key])]
        for name, key in (("accuracy", "accuracy"), ("NLL", "nll"), ("Brier", "brier"))
    ]
    mm_t, mm_s = t["minority_majority_ece"], s["minority_majority_ece"]
    rows += [
        ["ECE (15 bins)", _fmt(t["ece"]), _fmt(s["ece"])],
        ["minority-class ECE", _fmt(mm_t["minority_ece"]), _fmt(mm_s["minority_ece"])],
        ["majority-class ECE", _fmt(mm_t["majority_ece"]), _fmt(mm_s["majority_ece"])],
        ["macro recall", _fmt(t["macro_recall"]), _fmt(s["macro_recall"])],
        ["min class recall", _fmt(t["min_class_recall"]), _fmt(s["min_class_recall"])],
        [
            "dark-knowledge entropy (max)",
            f"{_fmt(t['dark_knowledge']['entropy'])} ({_fmt(t['dark_knowledge']['max'])})",
            f"{_fmt(s['dark_knowledge']['entropy'])} ({_fmt(s['dark_knowledge']['max'])})",
        ],
    ]
    lines += _table(["metric", "teacher", "student"], rows)

    if "calibrated" in t:
        lines += ["## Temperature scaling (fitted on the server's held-out split)", ""]
        rows = [
            [role, _fmt(b["calibrated"]["temperature"], 3)]
            + [f"{_fmt(b[m])} → {_fmt(b['calibrated'][m])}" for m in ("ece", "nll", "brier")]
            for role, b in (("teacher", t), ("student", s))
        ]
        lines += _table(["model", "T", "ECE", "NLL", "Brier"], rows)

    lines += ["## Fidelity to the teacher", ""]
    rows = [
        ["top-1 agreement", _fmt(fid["agreement"])],
        ["KL(teacher ‖ student), nats", _fmt(fid["kl_to_teacher"])],
    ]
    rows += [[key.replace("_", " "), _fmt(value)] for key, value in fid["rank_order"].items()]
    lines += _table(["measure", "value"], rows)

    lines += ["## Uncertainty of the scores: student vs teacher intervals", ""]
    rows = [
        [
            name,
            _fmt(u["covers_teacher_point"]),
            _fmt(u["width_ratio"], 3),
            _fmt(u["overconfident"]),
        ]
        for name, u in fid["uq"].items()
    ]
    lines += _table(
        ["metric", "student interval covers teacher", "width ratio", "overconfident (< 0.5)"], rows
    )

    lines += ["## Per-class ECE", ""]
    names = report["data"]["class_names"]
    rows = [
        [str(names[c]), str(report["data"]["pool_class_counts"][c]), _fmt(te), _fmt(se)]
        for c, (te, se) in enumerate(zip(t["per_class_ece"], s["per_class_ece"], strict=True))
    ]
    lines += _table(["class", "pool count", "teacher", "student"], rows)

    robust = {"teacher": t["robustness"], "student": s["robustness"]}
    if "compressed" in report:
        c = report["compressed"]
        robust["compressed"] = c["robustness"]
        lines += [f"Compressed student `{c['path']}`: accuracy {_fmt(c['accuracy'])}.", ""]
    lines += _robustness_markdown(robust)
    sensitivity = report["layer_sensitivity"]
    lines += ["## Layer sensitivity (FGSM)", ""]
    if isinstance(sensitivity, str):
        lines += [sensitivity, ""]
    else:
        rows = [
            [str(r["layer"]), _fmt(r["fgsm_accuracy"]), _fmt(r["delta"])]
            for r in sensitivity["layers"]
        ]
        lines += _table(["layer swapped to compressed", "FGSM accuracy", "change"], rows)
        if sensitivity["layers"]:
            top = sensitivity["layers"][0]
            lines += [
                f"Compressing `{top['layer']}` moved FGSM accuracy most ({_fmt(top['delta'])}).",
                "",
            ]
    return "\n".join(lines)


def _robustness_markdown(blocks: dict[str, dict[str, Any]]) -> list[str]:
    """Adversarial and certified accuracy for every model that has a torch form."""
    lines = ["## Adversarial accuracy (input space, L-inf)", ""]
    for role, block in blocks.items():
        if isinstance(block["adversarial"], str):
            lines += [f"{role}: {block['adversarial']}.", ""]
    attacked = [(role, b) for role, b in blocks.items() if isinstance(b["adversarial"], list)]
    if attacked:
        header = ["eps (× input std)"]
        for role, _ in attacked:
            header += [f"{role} FGSM", f"{role} PGD-10"]
        rows = []
        for i, fraction in enumerate(ATTACK_EPS_FRACTIONS):
            row = [f"{_fmt(attacked[0][1]['adversarial'][i]['eps'])} ({fraction})"]
            for _, b in attacked:
                row += [
                    _fmt(b["adversarial"][i]["fgsm_accuracy"]),
                    _fmt(b["adversarial"][i]["pgd_accuracy"]),
                ]
            rows.append(row)
        lines += _table(header, rows)

    lines += ["## Certified accuracy of the linear head (feature space, L-inf)", ""]
    certified = [
        (role, b["certificate"]) for role, b in blocks.items() if isinstance(b["certificate"], dict)
    ]
    for role, block in blocks.items():
        if isinstance(block["certificate"], str):
            lines += [f"{role}: {block['certificate']}.", ""]
    if certified:
        lines += [
            "Median certified radius of the correctly classified samples: "
            + ", ".join(
                f"{role} {_fmt(c['median_radius_correct'])} (D = {c['feature_dim']})"
                for role, c in certified
            ),
            "",
        ]
        eps = certified[0][1]["eps"]
        rows = [
            [_fmt(e)] + [_fmt(c["certified_accuracy"][i]) for _, c in certified]
            for i, e in enumerate(eps)
            if i % 4 == 0  # every 4th grid point keeps the table short; the PNG has all
        ]
        lines += _table(["eps"] + [role for role, _ in certified], rows)
    return lines


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a fidelity report, for ``report.json``'s ``fidelity``."""
    student, teacher, fid = report["student"], report["teacher"], report["fidelity"]
    adversarial = student.get("robustness", {}).get("adversarial")
    out = {
        "student": student["path"],
        "format": student["format"],
        "accuracy": student["accuracy"],
        "teacher_accuracy": teacher["accuracy"],
        "ece": student["ece"],
        "teacher_ece": teacher["ece"],
        "minority_ece": student["minority_majority_ece"].get("minority_ece"),
        "majority_ece": student["minority_majority_ece"].get("majority_ece"),
        "nll": student["nll"],
        "brier": student["brier"],
        "agreement": fid["agreement"],
        "kl_to_teacher": fid["kl_to_teacher"],
        **fid["rank_order"],
        "uq": fid["uq"],
        "dark_knowledge": student["dark_knowledge"],
        "fgsm_accuracy": _fgsm_row(adversarial),
    }
    if "compressed" in report:
        out["compressed_accuracy"] = report["compressed"]["accuracy"]
        out["compressed_fgsm_accuracy"] = _fgsm_row(
            report["compressed"]["robustness"]["adversarial"]
        )
    layers = report.get("layer_sensitivity")
    if isinstance(layers, dict) and layers["layers"]:
        out["most_sensitive_layer"] = layers["layers"][0]["layer"]
    return out


def _fgsm_row(adversarial: list[dict[str, float]] | str) -> list[float] | str:
    if isinstance(adversarial, str):
        return adversarial
    return [row["fgsm_accuracy"] for row in adversarial]
