"""`build_bundle`: a student checkpoint into a bundle for a device profile, every
export checked against the torch student before the bundle is moved into place."""

from __future__ import annotations

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

from edgekd.core.errors import one_line_error
from edgekd.deploy.bundle.layout import (
    DEFAULT_DEVICE_DATA_DIR,
    DEFAULT_SUPERLINK,
    FEATURES,
    HEAD,
    HEAD_STEP,
    INFERENCE,
    MANIFEST,
    MANIFEST_VERSION,
    PARITY_DATA,
    PARITY_SAMPLES,
    REFERENCE,
    STEP_LAYOUT,
    STEP_PARAMS,
    TRAIN_INFER,
    TRAIN_STEP,
    BundleError,
    _Artifact,
    _sha256,
    _sha256_file,
)
from edgekd.deploy.host import int8_host
from edgekd.deploy.profiles import DeviceProfile, load_profile
from edgekd.deploy.quantize import CALIBRATION_SAMPLES, quantize_onnx_int8
from edgekd.deploy.signing import SignatureError, sign_manifest

if TYPE_CHECKING:
    from torch import nn

    from edgekd.core.config import EdgeKDConfig
    from edgekd.core.data import FederatedData

from edgekd.deploy.bundle.build_parity import build_parity
from edgekd.deploy.bundle.templates import _text_files

log = logging.getLogger(__name__)


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
        model_path: Student checkpoint (`edgekd.learn.models.save_checkpoint` format).
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
    _check_superlink(superlink)
    _refuse_occupied(out, force)
    profile = load_profile(target)
    student = _load_run(model_path, Path(run_dir) if run_dir is not None else model_path.parent)
    exports = _exports(student, profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _fill_bundle(
            tmp,
            student,
            profile,
            exports,
            superlink=superlink,
            data_dir=data_dir,
            sign_key=sign_key,
        )
        _install(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass(frozen=True)
class _Student:
    """The checkpoint to bundle, its model and spec, and the run config and data it was
    trained on (``note`` says when that config is the default one)."""

    path: Path
    model: nn.Module
    spec: Any
    cfg: EdgeKDConfig
    data: FederatedData
    note: str


@dataclass(frozen=True)
class _Exports:
    """What goes into the bundle besides the text files and the manifest: the model
    files, parity data and head weights, with the torch student's logits on the test
    split that every export is checked against."""

    artifacts: list[_Artifact]
    notes: list[str]
    reference: np.ndarray
    num_features: int
    parity_samples: int


def _check_superlink(superlink: str) -> None:
    """Refuse a ``superlink`` that is not ``HOST:PORT`` with a port in 1..65535."""
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BundleError(f"superlink must be HOST:PORT, got '{superlink}'")


def _load_run(model_path: Path, run_dir: Path) -> _Student:
    """Load the student checkpoint, the config of the run in ``run_dir`` and its data;
    refuse a student whose input shape or class count does not fit that data."""
    model, spec = _load_student(model_path)
    cfg, data_note = _run_config(run_dir)
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
    return _Student(model_path, model, spec, cfg, data, data_note)


def _exports(student: _Student, profile: DeviceProfile) -> _Exports:
    """Score the torch student on the test split (the parity reference), export the
    profile's model files, and add the shipped parity samples and, for head-only
    training, the head's weights."""
    from edgekd.deploy.parity import torch_predictor

    model, data = student.model, student.data
    test_x, test_y = data.test.x, data.test.y
    reference = torch_predictor(model)(test_x)
    head_weight, head_bias, num_features = _head_of(model, profile)
    artifacts, notes = _model_artifacts(model, student.path, profile, data)
    if profile.backend != "torch":
        artifacts += _training_artifacts(model, profile, data, student.cfg.train.optimizer)
    notes = [student.note, *notes] if student.note else notes
    n = min(PARITY_SAMPLES, len(test_y))
    artifacts.append(_npz(PARITY_DATA, x=test_x[:n], y=test_y[:n], logits=reference[:n]))
    if profile.training_mode == "head-only" and profile.backend != "torch":
        artifacts.append(_npz(HEAD, weight=head_weight, bias=head_bias))
    return _Exports(artifacts, notes, reference, num_features, n)


def _training_artifacts(
    model: nn.Module, profile: DeviceProfile, data: FederatedData, optimizer: str
) -> list[_Artifact]:
    """What a torch-free device trains with: the whole student's step graph, its layout
    and starting tensors (``mode = "full"``), or the frozen features and the head step
    (``mode = "head-only"``)."""
    shape, batch = data.input_shape, profile.training_batch_size
    litert = profile.backend == "litert"
    from edgekd.deploy.train_step import export_infer_onnx, export_train_step_onnx, layout_for

    try:
        if profile.training_mode == "head-only":
            return _head_only_artifacts(model, profile, data)
        layout = layout_for(model, shape, data.num_classes, optimizer)
        if litert:
            from edgekd.deploy.tflite_export import export_train_step_tflite

            step = export_train_step_tflite(model, layout, batch)
            graphs = [
                _Artifact(
                    "train_step.tflite",
                    step,
                    TRAIN_STEP,
                    "fp32",
                    f"{optimizer}; static batch {batch}; signatures train and infer",
                )  # fmt: skip
            ]
        else:
            graphs = [
                _Artifact(
                    "train_step.onnx",
                    slim_onnx(export_train_step_onnx(model, layout)),
                    TRAIN_STEP,
                    "fp32",
                    f"{optimizer}; forward, backward and update, every tensor",
                ),  # fmt: skip
                _Artifact(
                    "train_infer.onnx",
                    slim_onnx(export_infer_onnx(model, layout)),
                    TRAIN_INFER,
                    "fp32",
                    "logits with the trained tensors as inputs",
                ),  # fmt: skip
            ]
    except (TypeError, ImportError) as exc:  # a layer with no step graph, no converter
        raise BundleError(f"target {profile.name}: {exc}") from None
    params = {n: p.detach().cpu().numpy() for n, p in model.named_parameters()}
    return [
        *graphs,
        _Artifact(STEP_LAYOUT, (layout.to_json() + "\n").encode()),
        _npz(STEP_PARAMS, **params),
    ]


def _check_budget(artifacts: list[_Artifact], profile: DeviceProfile) -> None:
    """Refuse an inference model over the profile's ``max_model_bytes``."""
    inference = next(a for a in artifacts if a.role == INFERENCE)
    size = len(inference.data)
    if size > profile.budget.max_model_bytes:
        raise BundleError(
            f"{inference.name} is {size:,} bytes, over {profile.name}'s max_model_bytes "
            f"{profile.budget.max_model_bytes:,} by {size - profile.budget.max_model_bytes:,}"
        )


def _fill_bundle(
    tmp: Path,
    student: _Student,
    profile: DeviceProfile,
    exports: _Exports,
    *,
    superlink: str,
    data_dir: str,
    sign_key: str | Path | None,
) -> None:
    """Write the bundle into the scratch folder ``tmp``: the exports (each checked for
    parity on the full test split, the inference model against the size budget), the
    text files, ``manifest.json`` and, with ``sign_key``, its signature."""
    artifacts, data = exports.artifacts, student.data
    for artifact in artifacts:
        (tmp / artifact.name).write_bytes(artifact.data)
    parity = build_parity(
        tmp, artifacts, profile, data.test.x, data.test.y, exports.reference, student.model
    )
    _check_budget(artifacts, profile)
    texts = _text_files(profile, artifacts, superlink, data_dir)
    for name, text in texts.items():
        (tmp / name).write_text(text)
    manifest = _manifest(
        tmp,
        profile=profile,
        artifacts=artifacts,
        parity=parity,
        model_path=student.path,
        spec=student.spec.to_dict(),
        data=data,
        cfg=student.cfg,
        num_features=exports.num_features,
        calibration=min(CALIBRATION_SAMPLES, len(data.public)),
        parity_samples=exports.parity_samples,
        notes=exports.notes,
    )
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if sign_key is not None:
        try:
            sign_manifest(tmp, Path(sign_key))
        except SignatureError as exc:
            raise BundleError(str(exc)) from None


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
    from edgekd.learn.models import CheckpointError, load_checkpoint

    try:
        model, spec = load_checkpoint(str(model_path))
    except CheckpointError as exc:
        raise BundleError(str(exc)) from None
    return model.eval(), spec


def _run_config(run_dir: Path) -> tuple[EdgeKDConfig, str]:
    """The run's config from ``run_dir/report.json``, or the defaults and a note saying so."""
    from edgekd.core.config import ConfigError, EdgeKDConfig

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
    from edgekd.core.data import load_federated_data
    from edgekd.core.data_files import DataFileError

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
        fp32 = slim_onnx(export_onnx_bytes(model, shape))
        artifacts = [_Artifact("student_fp32.onnx", fp32, REFERENCE, "fp32")]
        if profile.precision == "int8":
            calibration = data.public.x[:CALIBRATION_SAMPLES]
            int8 = slim_onnx(quantize_onnx_int8(export_onnx_bytes(model, shape), calibration))
            artifacts.insert(0, _Artifact("student_int8.onnx", int8, INFERENCE, "int8"))
        else:
            artifacts[0].role = INFERENCE
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
        from edgekd.deploy.tflite_export import export_student_tflite

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
    return artifacts, notes


def _head_only_artifacts(
    model: nn.Module, profile: DeviceProfile, data: FederatedData
) -> list[_Artifact]:
    """The frozen feature extractor and the closed-form head step (``head-only``)."""
    shape, batch = data.input_shape, profile.training_batch_size
    weight, _, _ = _head_of(model, profile)
    if profile.backend == "onnxruntime":
        from edgekd.deploy.head_step import export_feature_extractor_onnx, export_head_step_onnx

        step = export_head_step_onnx(int(weight.shape[1]), data.num_classes)
        return [
            _Artifact(
                "features.onnx",
                slim_onnx(export_feature_extractor_onnx(model, shape)),
                FEATURES,
                "fp32",
            ),  # fmt: skip
            _Artifact("head_step.onnx", slim_onnx(step), HEAD_STEP, "fp32"),
        ]
    from edgekd.deploy.tflite_export import export_features_tflite, export_head_step_tflite

    return [
        _Artifact(
            "features.tflite",
            export_features_tflite(model, shape, batch),
            FEATURES,
            "fp32",
            f"static batch {batch}",
        ),  # fmt: skip
        _Artifact(
            "head_step.tflite",
            export_head_step_tflite(int(weight.shape[1]), data.num_classes, batch),
            HEAD_STEP,
            "fp32",
            f"static batch {batch}; signatures train and infer",
        ),
    ]


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
