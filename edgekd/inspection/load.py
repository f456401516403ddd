"""Read a teacher or student (torch checkpoint, ONNX or TFLite file) behind a logits function.

`load_model` picks the reader by the file's suffix and probes the model with a zero batch,
so a missing, corrupt or ill-fitting file fails as one `ModelFileError` line before any
scoring. torch, onnxruntime and the TFLite interpreter are imported only by the reader
that needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.core.errors import EdgeKDError, one_line_error

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LoadedModel", "ModelFileError", "load_model"]

# Samples per ONNX/TFLite call: large enough to amortise the runtime's per-call cost,
# small enough for a device-sized interpreter arena.
_RUNTIME_BATCH = 1024


class ModelFileError(EdgeKDError, ValueError):
    """A teacher or student file is missing, corrupt or of the wrong shape; one line."""


@dataclass
class LoadedModel:
    """A model behind a logits function, whatever format it was read from."""

    path: str
    format: str  # "torch" | "onnx" | "tflite"
    predict: Callable[[np.ndarray], np.ndarray]  # float32 inputs [N, ...] -> logits [N, K]
    torch_model: nn.Module | None = None  # only for "torch": attacks and certificates


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
