"""Device bundles: a folder with everything one device needs to join the federation.

`build_bundle` turns a student checkpoint into a bundle for a device profile
(`edgekd.deploy.profiles`), `load_bundle` verifies one (every file against the sha256 in
its manifest) and `check_bundle` re-runs parity and measures latency on the host it
runs on, the device itself included (no torch needed for onnxruntime/LiteRT bundles).

A bundle for ``raspberry-pi`` holds::

    manifest.json          format version, sha256 + size of every other file, the profile,
                           input shape, class names, num_features/num_classes, parity numbers
    student_int8.onnx      inference model (INT8 static QDQ, per-channel weights)
    student_fp32.onnx      the FP32 export, the reference the INT8 model is judged against
    features.onnx          frozen feature extractor  } head-only on-device KD
    head_step.onnx         one class-weighted KD SGD step of the linear head (weights as inputs)
    head.npz               initial head weights: weight [C, D], bias [C]
    parity.npz             up to PARITY_SAMPLES test inputs, labels and the torch logits
    client.toml            SuperLink address, backend, model files, data folder, TLS/auth paths
    edgekd-client.service  systemd unit (raspberry-pi, jetson)
    README.md              copy, install, start, logs: for the person at the device

``android`` ships ``student.tflite`` (+ ``student_int8.tflite`` when the converter gives
INT8 weights), ``features.tflite`` and ``head_step.tflite`` (static batch =
the profile's training batch size) instead of the ONNX files; ``jetson`` ships
``student.pt`` and ``student_fp32.onnx`` (full local KD in torch, no head files).

Data. The calibration set (the run's server-held ``public`` split, at most
`CALIBRATION_SAMPLES`) and the parity set (the devices' ``test`` split) are rebuilt by
`edgekd.common.data.load_federated_data` from the run's config, read from
``report.json`` in ``run_dir`` (default: the checkpoint's folder). Without a report the
default config's data is used and the manifest says so. ``parity.npz`` carries a slice
of the test split with the torch logits so that a device without torch or the dataset
package can re-check parity (`check_bundle`).

Writes go to a temporary sibling folder that is renamed into place at the end, so an
interrupted or failed build never leaves half a bundle; an existing non-empty folder
is replaced only with ``force=True`` and only if it is a bundle (has a manifest).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.common.errors import EdgeKDError, one_line_error
from edgekd.deploy.host import int8_host
from edgekd.deploy.parity import (
    ParityError,
    ParityResult,
    measure_latency,
    measure_parity,
    parity_problems,
    predictor_for,
)
from edgekd.deploy.profiles import DeviceProfile, ProfileError, load_profile, profile_from_dict
from edgekd.deploy.quantize import CALIBRATION_SAMPLES, quantize_onnx_int8
from edgekd.deploy.signing import SignatureError, sign_manifest, verify_manifest

if TYPE_CHECKING:
    from torch import nn

    from edgekd.common.config import EdgeKDConfig
    from edgekd.common.data import FederatedData

__all__ = [
    "Bundle",
    "BundleError",
    "MANIFEST_VERSION",
    "build_bundle",
    "check_bundle",
    "load_bundle",
]

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
CLIENT_TOML = "client.toml"
SERVICE = "edgekd-client.service"
README = "README.md"
PARITY_DATA = "parity.npz"
HEAD = "head.npz"
# Where the README and the systemd unit put things on the device.
DEVICE_ROOT = "/opt/edgekd"
DEVICE_BUNDLE = f"{DEVICE_ROOT}/bundle"
DEVICE_VENV = f"{DEVICE_ROOT}/venv"
DEFAULT_DEVICE_DATA_DIR = f"{DEVICE_ROOT}/data"
DEFAULT_SUPERLINK = "127.0.0.1:9092"  # Flower's Fleet API port; set the real host at build
# Test samples shipped for on-device parity checks: 1 000 resolve a 1-point accuracy
# drop (standard error ~1.3 points at 85 %) and keep mnist1d's parity.npz at ~200 kB.
PARITY_SAMPLES = 1000
# Roles of the model files; "inference" is the one the device serves with.
INFERENCE, REFERENCE, FEATURES, HEAD_STEP = "inference", "reference", "features", "head-step"


class BundleError(EdgeKDError, ValueError):
    """A bundle cannot be built, or a bundle folder is missing, changed or malformed."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder and its manifest."""

    path: Path
    manifest: dict[str, Any]
    profile: DeviceProfile

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def inference_model(self) -> Path:
        return self.path / self.manifest["inference_model"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["model"]["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["model"]["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["model"]["class_names"])

    def files_with_role(self, *roles: str) -> list[str]:
        return [name for name, f in self.manifest["files"].items() if f.get("role") in roles]


@dataclass
class _Artifact:
    name: str
    data: bytes
    role: str = ""  # INFERENCE | REFERENCE | FEATURES | HEAD_STEP | "" (not a model)
    precision: str = ""
    note: str = ""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ build
def build_bundle(
    model_path: str | Path,
    target: str | Path,
    out_dir: str | Path,
    *,
    superlink: str = DEFAULT_SUPERLINK,
    data_dir: str = DEFAULT_DEVICE_DATA_DIR,
    run_dir: str | Path | None = None,
    force: bool = False,
    sign_key: str | Path | None = None,
) -> Path:
    """Build the bundle of ``model_path`` for ``target`` into ``out_dir``; return its path.

    Args:
        model_path: Student checkpoint (`edgekd.common.models.save_checkpoint` format).
        target: A shipped profile name (``raspberry-pi``, ``android``, ``jetson``) or a
            profile TOML path.
        out_dir: The bundle folder; must be absent or empty unless ``force``.
        superlink: ``HOST:PORT`` of the SuperLink's Fleet API, written to ``client.toml``.
        data_dir: The device's local data folder, written to ``client.toml``.
        run_dir: Run folder whose ``report.json`` gives the data config (default: the
            checkpoint's folder).
        force: Replace an existing bundle in ``out_dir`` (only once the new one is
            complete); a non-empty folder that is not a bundle is never replaced.
        sign_key: Private key that signs ``manifest.json`` (`edgekd.deploy.signing`).

    Raises:
        BundleError: unreadable checkpoint, a student that does not fit the run's data,
            a model over the profile's size budget, ``out_dir`` not empty, or an export
            the target needs is unavailable (e.g. android without ``litert-torch``).
        ParityError: an exported model misses the profile's parity thresholds.
        ProfileError: unknown or malformed profile.
    """
    model_path, out = Path(model_path), Path(out_dir)
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BundleError(f"superlink must be HOST:PORT, got '{superlink}'")
    _refuse_occupied(out, force)
    profile = load_profile(target)
    model, spec = _load_student(model_path)
    cfg, data_note = _run_config(Path(run_dir) if run_dir is not None else model_path.parent)
    data = _load_data(cfg)
    if (spec.in_channels, spec.input_size, spec.num_classes) != (
        data.input_shape[0],
        data.input_shape[-1],
        data.num_classes,
    ):
        raise BundleError(
            f"{model_path} takes {spec.in_channels}x{spec.input_size} inputs and "
            f"{spec.num_classes} classes, but the run's data has shape {data.input_shape} and "
            f"{data.num_classes} classes"
        )
    from edgekd.deploy.parity import torch_predictor

    test_x, test_y = data.test.x, data.test.y
    reference = torch_predictor(model)(test_x)
    head_weight, head_bias, num_features = _head_of(model, profile)
    artifacts, notes = _model_artifacts(model, model_path, profile, data)
    notes = [data_note, *notes] if data_note else notes
    n = min(PARITY_SAMPLES, len(test_y))
    artifacts.append(_npz(PARITY_DATA, x=test_x[:n], y=test_y[:n], logits=reference[:n]))
    if profile.training_mode == "head-only":
        artifacts.append(_npz(HEAD, weight=head_weight, bias=head_bias))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for artifact in artifacts:
            (tmp / artifact.name).write_bytes(artifact.data)
        parity = _build_parity(tmp, artifacts, profile, test_x, test_y, reference)
        inference = next(a for a in artifacts if a.role == INFERENCE)
        size = len(inference.data)
        if size > profile.budget.max_model_bytes:
            raise BundleError(
                f"{inference.name} is {size:,} bytes, over {profile.name}'s max_model_bytes "
                f"{profile.budget.max_model_bytes:,} by {size - profile.budget.max_model_bytes:,}"
            )
        texts = _text_files(profile, artifacts, superlink, data_dir)
        for name, text in texts.items():
            (tmp / name).write_text(text)
        manifest = _manifest(
            tmp,
            profile=profile,
            artifacts=artifacts,
            parity=parity,
            model_path=model_path,
            spec=spec.to_dict(),
            data=data,
            cfg=cfg,
            num_features=num_features,
            calibration=min(CALIBRATION_SAMPLES, len(data.public)),
            parity_samples=n,
            notes=notes,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if sign_key is not None:
            try:
                sign_manifest(tmp, Path(sign_key))
            except SignatureError as exc:
                raise BundleError(str(exc)) from None
        _install(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _refuse_occupied(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BundleError(f"{out} is not empty; pass force=True (--force) to replace it")
        if not (out / MANIFEST).is_file():  # force replaces bundles, never other folders
            raise BundleError(
                f"{out} is not empty and is not a bundle (no {MANIFEST}): not replaced"
            )


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished bundle into place; an old one is removed only afterwards."""
    _refuse_occupied(out, force)  # again: something may have appeared while building
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        else:
            out.rmdir()
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by a service
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load_student(model_path: Path) -> tuple[nn.Module, Any]:
    from edgekd.common.models import CheckpointError, load_checkpoint

    try:
        model, spec = load_checkpoint(str(model_path))
    except CheckpointError as exc:
        raise BundleError(str(exc)) from None
    return model.eval(), spec


def _run_config(run_dir: Path) -> tuple[EdgeKDConfig, str]:
    """The run's config from ``run_dir/report.json``, or the defaults and a note saying so."""
    from edgekd.common.config import ConfigError, EdgeKDConfig

    report = run_dir / "report.json"
    if not report.is_file():
        note = (
            f"no report.json in {run_dir}: calibration and parity data come from the "
            "default config (mnist1d, seed 42); pass run_dir (--run) if the student was "
            "trained on other data"
        )
        log.warning(note)
        return EdgeKDConfig(), note
    try:
        config = json.loads(report.read_text())["config"]
        return EdgeKDConfig().with_overrides(config), ""
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{report} has no readable 'config': {exc}") from None
    except ConfigError as exc:
        raise BundleError(f"{report}: {exc}") from None


def _load_data(cfg: EdgeKDConfig) -> FederatedData:
    from edgekd.common.data import load_federated_data
    from edgekd.common.data_files import DataFileError

    try:
        return load_federated_data(cfg.data, cfg.seed)
    except DataFileError as exc:
        raise BundleError(str(exc)) from None


def _head_of(model: nn.Module, profile: DeviceProfile) -> tuple[np.ndarray, np.ndarray, int]:
    """The linear head's weights and its input width (D)."""
    from edgekd.deploy.head_step import split_student

    try:
        _, head = split_student(model)
    except TypeError as exc:
        if profile.training_mode == "head-only":
            raise BundleError(f"{profile.name} trains the head on the device: {exc}") from None
        return np.zeros((0, 0), np.float32), np.zeros(0, np.float32), 0
    weight = head.weight.detach().cpu().numpy().astype(np.float32)
    bias = head.bias.detach().cpu().numpy().astype(np.float32)
    return weight, bias, int(weight.shape[1])


def _npz(name: str, **arrays: Any) -> _Artifact:  # Any: numpy types savez oddly
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return _Artifact(name, buffer.getvalue())


def slim_onnx(model_bytes: bytes) -> bytes:
    """The same ONNX graph without what a runtime never reads: value_info (shape
    inference results), node names and doc strings, all-zero zero points of weight
    DequantizeLinear nodes (0 is the default), and long internal tensor names (renamed
    ``t0, t1, ...``; graph inputs and outputs keep their names). For a 3k-parameter QDQ
    student this halves the file: the names outweigh the INT8 weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    del graph.value_info[:]
    graph.doc_string = ""
    model.doc_string = ""
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        node.name, node.doc_string = "", ""
        if node.op_type == "DequantizeLinear" and len(node.input) == 3:
            source, zero = initializers.get(node.input[0]), initializers.get(node.input[2])
            if source is not None and zero is not None:
                if not numpy_helper.to_array(zero).any():
                    del node.input[2]
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    fixed = {i.name for i in graph.input} | {o.name for o in graph.output}
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in fixed:
            return name
        return renamed.setdefault(name, f"t{len(renamed)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _model_artifacts(
    model: nn.Module, model_path: Path, profile: DeviceProfile, data: FederatedData
) -> tuple[list[_Artifact], list[str]]:
    """The model files of ``profile``'s backend, and notes on what was left out."""
    from edgekd.deploy.onnx_export import export_onnx_bytes

    shape = data.input_shape
    notes: list[str] = []
    if profile.backend == "onnxruntime":
        from edgekd.deploy.head_step import export_feature_extractor_onnx, export_head_step_onnx

        fp32 = slim_onnx(export_onnx_bytes(model, shape))
        artifacts = [_Artifact("student_fp32.onnx", fp32, REFERENCE, "fp32")]
        if profile.precision == "int8":
            calibration = data.public.x[:CALIBRATION_SAMPLES]
            int8 = slim_onnx(quantize_onnx_int8(export_onnx_bytes(model, shape), calibration))
            artifacts.insert(0, _Artifact("student_int8.onnx", int8, INFERENCE, "int8"))
        else:
            artifacts[0].role = INFERENCE
        weight, _, _ = _head_of(model, profile)
        features = slim_onnx(export_feature_extractor_onnx(model, shape))
        step = export_head_step_onnx(int(weight.shape[1]), data.num_classes)
        artifacts += [
            _Artifact("features.onnx", features, FEATURES, "fp32"),
            _Artifact("head_step.onnx", slim_onnx(step), HEAD_STEP, "fp32"),
        ]
        return artifacts, notes
    if profile.backend == "litert":
        return _litert_artifacts(model, profile, data)
    # torch (jetson): the checkpoint as given, plus the ONNX alternative.
    fp32 = slim_onnx(export_onnx_bytes(model, shape))
    return [
        _Artifact("student.pt", model_path.read_bytes(), INFERENCE, profile.precision),
        _Artifact("student_fp32.onnx", fp32, REFERENCE, "fp32"),
    ], notes


def _litert_artifacts(
    model: nn.Module, profile: DeviceProfile, data: FederatedData
) -> tuple[list[_Artifact], list[str]]:
    try:
        from edgekd.deploy.tflite_export import (
            export_features_tflite,
            export_head_step_tflite,
            export_student_tflite,
        )

        fp32 = export_student_tflite(model, data.input_shape, batch_size=1)
    except ImportError as exc:
        raise BundleError(f"target {profile.name}: {exc}") from None
    notes: list[str] = []
    artifacts = [_Artifact("student.tflite", fp32, REFERENCE, "fp32")]
    if profile.precision == "int8-weights":
        try:
            int8 = export_student_tflite(model, data.input_shape, batch_size=1, int8=True)
            artifacts.insert(0, _Artifact("student_int8.tflite", int8, INFERENCE, "int8-weights"))
        except Exception as exc:  # noqa: BLE001 - any quantizer failure means "no INT8 here"
            notes.append(
                f"INT8-weight TFLite export unavailable ({one_line_error(exc)}); "
                f"student.tflite (FP32, the profile's fallback precision) serves inference"
            )
    if not any(a.role == INFERENCE for a in artifacts):
        artifacts[0].role = INFERENCE
        artifacts[0].note = "FP32: no INT8 export"
    batch = profile.training_batch_size
    weight, _, _ = _head_of(model, profile)
    artifacts += [
        _Artifact(
            "features.tflite",
            export_features_tflite(model, data.input_shape, batch),
            FEATURES,
            "fp32",
            f"static batch {batch}",
        ),
        _Artifact(
            "head_step.tflite",
            export_head_step_tflite(int(weight.shape[1]), data.num_classes, batch),
            HEAD_STEP,
            "fp32",
            f"static batch {batch}; signatures train and infer",
        ),
    ]
    return artifacts, notes


# ------------------------------------------------------------------ parity at build time
def _build_parity(
    folder: Path,
    artifacts: list[_Artifact],
    profile: DeviceProfile,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """Parity of every model file on the full test split; raise `ParityError` on a miss."""
    out: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for artifact in artifacts:
        if artifact.role in (INFERENCE, REFERENCE):
            result = _student_parity(folder / artifact.name, artifact, profile, x, y, reference)
        elif artifact.role == FEATURES:
            step = next(a.name for a in artifacts if a.role == HEAD_STEP)
            result = _feature_path_parity(folder, artifact.name, step, x, y, reference)
        elif artifact.role == HEAD_STEP:
            out[artifact.name] = _head_step_parity(folder, artifacts, profile, x, y, reference)
            problems += out[artifact.name].pop("problems")
            continue
        else:
            continue
        out[artifact.name] = result.to_dict()
        problems += parity_problems(result, profile)
    if problems:
        raise ParityError("; ".join(problems))
    return out


def _torch_device(profile: DeviceProfile) -> tuple[str, bool]:
    """Where a torch bundle runs here: CUDA with FP16 autocast if asked and present."""
    import torch

    if profile.device == "cuda" and torch.cuda.is_available():
        return "cuda", profile.precision == "fp16"
    return "cpu", False


def _student_parity(
    path: Path,
    artifact: _Artifact,
    profile: DeviceProfile,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray,
) -> ParityResult:
    precision = artifact.precision
    device, fp16 = "cpu", False
    if path.suffix == ".pt":
        device, fp16 = _torch_device(profile)
        precision = "fp16" if fp16 else "fp32"
        if precision != artifact.precision:
            artifact.note = f"parity measured in {precision} on {device}: no CUDA on this host"
    predict, runtime = predictor_for(
        path, threads=1, providers=profile.execution_providers, device=device, fp16=fp16
    )
    return measure_parity(
        predict(x), reference, y, model_file=path.name, precision=precision, runtime=runtime
    )


def _edge_runtime(folder: Path, artifacts: list[_Artifact], threads: int = 1) -> Any:
    from edgekd.deploy.runtimes import runtime_for

    features = next(a.name for a in artifacts if a.role == FEATURES)
    step = next(a.name for a in artifacts if a.role == HEAD_STEP)
    return runtime_for(str(folder / features), str(folder / step), threads=threads)


def _head_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / HEAD) as head:
        return head["weight"], head["bias"]


def _feature_path_parity(
    folder: Path, features: str, step: str, x: np.ndarray, y: np.ndarray, reference: np.ndarray
) -> ParityResult:
    """The on-device training path at inference: the features file, then ``head.npz``
    (at build time and in `check_bundle`)."""
    from edgekd.deploy.runtimes import runtime_for

    runtime = runtime_for(str(folder / features), str(folder / step))
    weight, bias = _head_arrays(folder)
    kind = "litert" if features.endswith(".tflite") else "onnxruntime"
    return measure_parity(
        runtime.logits(x, weight, bias),
        reference,
        y,
        model_file=features,
        precision="fp32",
        runtime=f"{kind} features + {HEAD}",
    )


def _head_step_parity(
    folder: Path,
    artifacts: list[_Artifact],
    profile: DeviceProfile,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray,
) -> dict[str, Any]:
    """One step of the exported head-step graph against `HeadKDStep` in torch, on the
    first training batch of the test split with the torch logits as the teacher: the new
    weights may differ by at most the profile's FP32 logit tolerance."""
    import torch

    from edgekd.deploy.head_step import HeadKDStep

    runtime = _edge_runtime(folder, artifacts)
    weight, bias = _head_arrays(folder)
    n = min(profile.training_batch_size, len(y))
    features = runtime.features(x[:n])
    class_weights = np.ones(len(bias), dtype=np.float32)
    settings = (4.0, 0.5, 0.1)  # temperature, alpha, lr: a large lr makes the step visible
    new_w, new_b, loss = runtime.head_step(
        features, y[:n], reference[:n], weight, bias, class_weights, *settings
    )
    with torch.no_grad():
        floats = (reference[:n], weight, bias, class_weights)
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (features, y[:n])]
        tensors += [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in floats]
        ref_w, ref_b, ref_loss = HeadKDStep()(
            *tensors, *(torch.tensor(v, dtype=torch.float32) for v in settings)
        )
    diff = max(
        float(np.abs(new_w - ref_w.numpy()).max()), float(np.abs(new_b - ref_b.numpy()).max())
    )
    step = next(a.name for a in artifacts if a.role == HEAD_STEP)
    limit = profile.parity.max_abs_logit_diff_fp32
    problems = []
    if not (np.isfinite(loss) and diff <= limit):
        problems.append(
            f"{step}: one KD step differs from torch's HeadKDStep by {diff:.4g} in the "
            f"weights (loss {loss:.4g}), over {profile.name}'s FP32 tolerance {limit:g} "
            f"by {diff - limit:.4g}"
        )
    return {
        "model_file": step,
        "precision": "fp32",
        "samples": n,
        "max_abs_weight_diff": diff,
        "loss": float(loss),
        "torch_loss": float(ref_loss),
        "problems": problems,
    }


# ------------------------------------------------------------------ text files
def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _text_files(
    profile: DeviceProfile,
    artifacts: list[_Artifact],
    superlink: str,
    data_dir: str,
) -> dict[str, str]:
    files = {
        CLIENT_TOML: _client_toml(profile, artifacts, superlink, data_dir),
        README: _readme(profile, artifacts, superlink),
    }
    if profile.backend != "litert":  # a phone has no systemd
        files[SERVICE] = _systemd_unit(profile)
    return files


def _client_toml(
    profile: DeviceProfile, artifacts: list[_Artifact], superlink: str, data_dir: str
) -> str:
    by_role = {a.role: a.name for a in artifacts if a.role}
    lines = [
        "# edgekd client configuration, written by `edgekd deploy build`.",
        "# `edgekd client start --bundle DIR` reads it; file names are relative to DIR.",
        "[client]",
        f"superlink = {_toml_string(superlink)}  # the SuperLink's Fleet API, HOST:PORT",
        f"profile = {_toml_string(profile.name)}",
        f"backend = {_toml_string(profile.backend)}",
        f"device = {_toml_string(profile.device)}",
        f"threads = {profile.threads}",
        f"model = {_toml_string(by_role[INFERENCE])}  # inference",
    ]
    if REFERENCE in by_role:
        lines.append(f"reference_model = {_toml_string(by_role[REFERENCE])}  # FP32 export")
    if FEATURES in by_role:
        lines += [
            f"features = {_toml_string(by_role[FEATURES])}  # frozen feature extractor",
            f"head_step = {_toml_string(by_role[HEAD_STEP])}  # one KD SGD step of the head",
            f"head = {_toml_string(HEAD)}  # initial head weights: weight [C, D], bias [C]",
        ]
    lines += [
        f"train_batch_size = {profile.training_batch_size}",
        f"data_dir = {_toml_string(data_dir)}  # this device's local data",
        "# TLS: PEM file of the CA that signed the SuperLink's certificate. Empty: an",
        "# insecure connection (for a test network only).",
        'root_certificates = ""',
        "# Node authentication: this node's private key (its public key registered with",
        "# the SuperLink). Empty: no node authentication.",
        'node_key = ""',
        "",
    ]
    return "\n".join(lines)


def _systemd_unit(profile: DeviceProfile) -> str:
    return f"""\
# systemd unit for the edgekd client on a {profile.name}; install it with
#   sudo cp {DEVICE_BUNDLE}/{SERVICE} /etc/systemd/system/
#   sudo systemctl daemon-reload && sudo systemctl enable --now {SERVICE.removesuffix(".service")}
[Unit]
Description=edgekd federated KD client ({profile.name})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=edgekd
WorkingDirectory={DEVICE_ROOT}
Environment=OMP_NUM_THREADS={profile.threads}
ExecStart={DEVICE_VENV}/bin/edgekd client start --bundle {DEVICE_BUNDLE}
Restart=on-failure
RestartSec=10
# stdout/stderr go to the journal: journalctl -u {SERVICE.removesuffix(".service")} -f
StandardOutput=journal
StandardError=journal

[Install]
WantedBy=multi-user.target
"""


def _install_commands(profile: DeviceProfile) -> str:
    from edgekd import __version__

    if profile.backend == "torch":
        return (
            f"python3 -m venv --system-site-packages {DEVICE_VENV}   # keeps JetPack's CUDA torch\n"
            f"{DEVICE_VENV}/bin/pip install 'edgekd=={__version__}'"
        )
    runtime = "onnxruntime" if profile.backend == "onnxruntime" else "ai-edge-litert"
    return (
        f"python3 -m venv {DEVICE_VENV}\n"
        f"# edgekd itself without its server-side dependencies (torch, Ray), then the\n"
        f"# device runtime: nothing here installs torch. pip warns that edgekd's torch\n"
        f"# requirement is not met; the device never imports torch. A wheel built on\n"
        f"# the server (`pip wheel --no-deps .`) works in place of 'edgekd=={__version__}'.\n"
        f"{DEVICE_VENV}/bin/pip install --no-deps 'edgekd=={__version__}'\n"
        f"{DEVICE_VENV}/bin/pip install numpy flwr {runtime}"
    )


def _readme(profile: DeviceProfile, artifacts: list[_Artifact], superlink: str) -> str:
    model = next(a for a in artifacts if a.role == INFERENCE)
    service = SERVICE.removesuffix(".service")
    files = "\n".join(
        f"| `{a.name}` | {a.role or 'data'} | {a.precision or '-'} | {a.note} |" for a in artifacts
    )
    if profile.backend == "litert":
        copy = (
            "adb push bundle /data/local/tmp/edgekd-bundle      # or copy it into the app\n"
            "# In a Linux userland on the phone (e.g. Termux) with Python >= 3.11:\n"
            "mkdir -p ~/edgekd && cp -r /data/local/tmp/edgekd-bundle ~/edgekd/bundle"
        )
        start = (
            "edgekd client start --bundle ~/edgekd/bundle\n"
            "```\n\n"
            "There is no Kotlin SuperNode: this Python LiteRT client is the reference. An app\n"
            "embeds `features.tflite` and `head_step.tflite` (signatures `train`, `infer`)\n"
            "with the LiteRT Android runtime and must speak Flower's Fleet API itself.\n\n"
            "Logs: the client prints to its terminal; run it under `nohup ... > client.log`\n"
            "to keep them.\n"
        )
        bundle = "~/edgekd/bundle"
    else:
        copy = (
            f"scp -r bundle USER@DEVICE:/tmp/edgekd-bundle\n"
            f"ssh USER@DEVICE\n"
            f"sudo useradd --system --home {DEVICE_ROOT} edgekd || true\n"
            f"sudo mkdir -p {DEVICE_ROOT} && sudo mv /tmp/edgekd-bundle {DEVICE_BUNDLE}"
        )
        start = (
            f"sudo cp {DEVICE_BUNDLE}/{SERVICE} /etc/systemd/system/\n"
            f"sudo systemctl daemon-reload\n"
            f"sudo systemctl enable --now {service}\n"
            "```\n\n"
            f"Logs go to the systemd journal: `journalctl -u {service} -f`;\n"
            f"status: `systemctl status {service}`; stop: `sudo systemctl stop {service}`.\n"
        )
        bundle = DEVICE_BUNDLE
    return f"""\
# edgekd bundle for {profile.name}

{profile.description}. The device serves predictions with `{model.name}`
({model.precision}, {profile.backend}) and joins the federation at `{superlink}`
(`client.toml`; edit `superlink`, `data_dir`, `root_certificates` and `node_key` there).

| file | role | precision | note |
|---|---|---|---|
{files}

`manifest.json` holds the sha256 of every file and the parity numbers measured when the
bundle was built; the client refuses a bundle whose files changed.

## 1. Copy

```bash
{copy}
```

## 2. Install

```bash
{_install_commands(profile)}
```

## 3. Check (on the device)

```bash
{DEVICE_VENV if profile.backend != "litert" else "~/edgekd/venv"}/bin/edgekd deploy check {bundle}
```

It verifies every file, re-runs parity on {PARITY_SAMPLES} stored test samples against the
FP32 torch logits and measures latency at batch 1; exit code 0 means the device is ready.

## 4. Start

```bash
{start}"""


# ------------------------------------------------------------------ manifest
def _manifest(
    folder: Path,
    *,
    profile: DeviceProfile,
    artifacts: list[_Artifact],
    parity: dict[str, dict[str, Any]],
    model_path: Path,
    spec: dict[str, Any],
    data: FederatedData,
    cfg: EdgeKDConfig,
    num_features: int,
    calibration: int,
    parity_samples: int,
    notes: list[str],
) -> dict[str, Any]:
    from edgekd import __version__

    meta = {a.name: a for a in artifacts}
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.iterdir()):
        entry: dict[str, Any] = {"sha256": _sha256_file(path), "bytes": path.stat().st_size}
        artifact = meta.get(path.name)
        if artifact is not None and artifact.role:
            entry.update(role=artifact.role, precision=artifact.precision)
            entry["parity"] = parity.get(path.name)
            if artifact.note:
                entry["note"] = artifact.note
        files[path.name] = entry
    inference = next(a.name for a in artifacts if a.role == INFERENCE)
    return {
        "format_version": MANIFEST_VERSION,
        "edgekd_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "target": profile.name,
        "profile": profile.to_dict(),
        "profile_source": Path(profile.source).name,
        "inference_model": inference,
        "model": {
            "source": str(model_path),
            "source_sha256": _sha256(model_path.read_bytes()),
            "spec": spec,
            "input_shape": list(data.input_shape),
            "input_name": "x",
            "output_name": "logits",
            "num_features": num_features,
            "num_classes": data.num_classes,
            "class_names": data.class_names,
        },
        "data": {
            "dataset": cfg.data.dataset,
            "num_samples": cfg.data.num_samples,
            "client_shift": cfg.data.client_shift,
            "seed": cfg.seed,
            "calibration_split": "public",
            "calibration_samples": calibration,
            "parity_split": "test",
            "parity_samples_at_build": int(len(data.test)),
            "parity_samples_shipped": parity_samples,
        },
        "files": files,
        # Where the parity above was measured: INT8 kernels differ between CPUs.
        "build_host": int8_host(),
        "notes": notes,
    }


# ------------------------------------------------------------------ load / verify
_REQUIRED = ("format_version", "target", "profile", "inference_model", "model", "files")


def load_bundle(path: str | Path, *, verify_key: str | Path | None = None) -> Bundle:
    """Read and verify a bundle folder.

    ``verify_key``: a public key; the manifest must be signed by it
    (`edgekd.deploy.signing`), checked before anything in it is trusted.

    Raises:
        BundleError: no folder or manifest, malformed JSON, an unknown format version, a
            missing key, a listed file that is missing or changed (its sha256
            differs), or (with ``verify_key``) a missing or wrong signature; the message
            names the file. Files the manifest does not list (logs, say) are ignored.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"bundle folder not found: {folder}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{folder}: {MANIFEST} missing (not a bundle?)")
    if verify_key is not None:
        try:
            verify_manifest(folder, Path(verify_key))
        except SignatureError as exc:
            raise BundleError(str(exc)) from None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: malformed JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: expected a JSON object")
    version = manifest.get("format_version")
    if version != MANIFEST_VERSION:
        raise BundleError(
            f"{manifest_path}: unknown format_version {version!r} (this edgekd reads "
            f"{MANIFEST_VERSION}; rebuild the bundle or upgrade edgekd)"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{manifest_path}: key '{missing[0]}' missing")
    files = manifest["files"]
    if not isinstance(files, dict) or manifest["inference_model"] not in files:
        raise BundleError(f"{manifest_path}: 'files' does not list the inference model")
    for name, entry in files.items():
        target = folder / name
        if Path(name).name != name:
            raise BundleError(f"{manifest_path}: file name {name!r} is not a plain name")
        if not isinstance(entry, dict):
            raise BundleError(f"{manifest_path}: the entry of file {name} is not an object")
        if "role" in entry and not isinstance(entry.get("parity"), dict | None):
            raise BundleError(f"{manifest_path}: file {name}'s parity is not an object")
        if not target.is_file():
            raise BundleError(f"bundle {folder}: file {name} missing")
        digest = _sha256_file(target)
        if digest != entry.get("sha256"):
            raise BundleError(
                f"bundle {folder}: file {name} changed (sha256 {digest[:12]}..., "
                f"manifest says {str(entry.get('sha256'))[:12]}...)"
            )
    try:
        profile = profile_from_dict(manifest["profile"], source=f"{MANIFEST} profile")
    except ProfileError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    return Bundle(folder, manifest, profile)


# ------------------------------------------------------------------ check on this host
def _rss_mb() -> float | None:
    """Resident set size of this process from /proc (Linux, Android); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def check_bundle(
    path: str | Path,
    *,
    threads: int | None = None,
    runs: int = 200,
    verify_key: str | Path | None = None,
) -> dict[str, Any]:
    """Verify ``path`` (`load_bundle`), re-run parity on the shipped test samples with this
    host's runtimes, and time the inference model at batch 1.

    ``threads`` overrides the profile's runtime threads (for latency); parity always runs
    single-threaded. A model whose runtime is missing here (torch on a Pi, LiteRT
    elsewhere) is reported as skipped with the reason. The result's ``ok`` is False when a
    parity threshold or a budget is missed; ``problems`` says which and by how much.
    """
    bundle = load_bundle(path, verify_key=verify_key)
    threads = threads or bundle.profile.threads
    signature = {"signature": "verified" if verify_key is not None else "not checked"}
    if bundle.inference_model.suffix != ".pt":
        return {**_check_loaded(bundle, threads, runs), **signature}
    try:
        import torch  # the torch backend: its intra-op threads are process-wide
    except ImportError:
        raise BundleError(
            f"{bundle.inference_model.name} needs torch, which is not installed here"
        ) from None

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {**_check_loaded(bundle, threads, runs), **signature}
    finally:
        torch.set_num_threads(before)


def _check_loaded(bundle: Bundle, threads: int, runs: int) -> dict[str, Any]:
    profile = bundle.profile
    try:
        with np.load(bundle.file(PARITY_DATA), allow_pickle=False) as stored:
            x, y, reference = stored["x"], stored["y"], stored["logits"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise BundleError(f"{PARITY_DATA}: unreadable ({type(exc).__name__}: {exc})") from None

    # Memory first, while the inference runtime is not yet loaded in this process.
    before = _rss_mb()
    try:
        predict, runtime, precision, note = _inference_predictor(bundle, threads)
        predict(x[:1])
    except ImportError as exc:
        raise BundleError(f"cannot run {bundle.inference_model.name} here: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types for bad files
        raise BundleError(
            f"{bundle.inference_model.name}: the runtime cannot load or run it "
            f"({one_line_error(exc)})"
        ) from None
    after = _rss_mb()
    growth = None if before is None or after is None else max(after - before, 0.0)

    problems: list[str] = []
    parity: dict[str, dict[str, Any]] = {}
    for name in bundle.files_with_role(INFERENCE, REFERENCE, FEATURES):
        entry = bundle.manifest["files"][name]
        try:
            if entry["role"] == FEATURES:
                step = bundle.files_with_role(HEAD_STEP)[0]
                result = _feature_path_parity(bundle.path, name, step, x, y, reference)
            elif name == bundle.inference_model.name:
                result = measure_parity(
                    predict(x), reference, y, model_file=name, precision=precision, runtime=runtime
                )
            else:
                p, rt = predictor_for(bundle.file(name), threads=1)
                result = measure_parity(
                    p(x), reference, y, model_file=name, precision=entry["precision"], runtime=rt
                )
        except ImportError as exc:
            parity[name] = {"skipped": f"runtime not installed here: {exc}"}
            continue
        except Exception as exc:  # noqa: BLE001 - a file that verifies but does not run
            raise BundleError(f"{name}: cannot be run here ({one_line_error(exc)})") from None
        found = parity_problems(result, profile)
        parity[name] = {**result.to_dict(), "ok": not found}
        problems += found

    latency = {
        "model": bundle.inference_model.name,
        "runtime": runtime,
        "threads": threads,
        "batch_size": 1,
        **measure_latency(predict, x[:1], runs=runs),
    }
    size = bundle.inference_model.stat().st_size
    budget = profile.budget
    if size > budget.max_model_bytes:
        problems.append(
            f"{bundle.inference_model.name}: {size:,} bytes exceeds max_model_bytes "
            f"{budget.max_model_bytes:,} by {size - budget.max_model_bytes:,}"
        )
    if growth is not None and growth > budget.max_memory_mb:
        problems.append(
            f"memory: loading and running the model grew RSS by {growth:.1f} MB, over "
            f"max_memory_mb {budget.max_memory_mb:g} by {growth - budget.max_memory_mb:.1f}"
        )
    return {
        "bundle": str(bundle.path),
        "target": profile.name,
        "backend": profile.backend,
        "host": int8_host(),
        "build_host": bundle.manifest.get("build_host"),
        "verified_files": len(bundle.manifest["files"]),
        "parity_samples": int(len(y)),
        "parity": parity,
        "latency": latency,
        "model_bytes": {
            "file": bundle.inference_model.name,
            "bytes": size,
            "max_model_bytes": budget.max_model_bytes,
        },
        "memory": {"rss_growth_mb": growth, "max_memory_mb": budget.max_memory_mb},
        "notes": [note] if note else [],
        "problems": problems,
        "ok": not problems,
    }


def _inference_predictor(bundle: Bundle, threads: int) -> tuple[Any, str, str, str]:
    """The inference model's predictor as the profile runs it on this host, with its
    runtime, the precision actually run and a note when that differs from the profile."""
    profile = bundle.profile
    name = bundle.inference_model.name
    precision = bundle.manifest["files"][name]["precision"]
    note = ""
    device, fp16 = "cpu", False
    if bundle.inference_model.suffix == ".pt":
        device, fp16 = _torch_device(profile)
        if precision == "fp16" and not fp16:
            precision = "fp32"
            note = f"{name}: no CUDA here, so parity and latency are FP32 on the CPU"
    predict, runtime = predictor_for(
        bundle.inference_model,
        threads=threads,
        providers=profile.execution_providers,
        device=device,
        fp16=fp16,
    )
    return predict, runtime, precision, note
