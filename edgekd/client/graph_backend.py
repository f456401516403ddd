"""Step graphs for simulated nodes that train like a Raspberry Pi or a phone.

With ``client.backend = onnxruntime | litert | mixed:<share>`` a simulated node trains
through the same exported graph a bundle ships (`edgekd.deploy.train_step`), run by
onnxruntime or the LiteRT interpreter inside its Ray worker. The graph depends only
on the student's architecture (its tensors are inputs), so each worker exports it once
per architecture, optimizer and (LiteRT's static) batch and keeps it in memory.
Simulation only: it needs torch (and ``litert-torch`` for LiteRT) to export.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from edgekd.core.specs import ModelSpec
from edgekd.deploy.step_runtime import LiteRTStepRuntime, OrtStepRuntime, StepRuntime

__all__ = ["input_shape_of", "simulated_step_runtime"]

_CACHE: dict[tuple[object, ...], StepRuntime] = {}
_LOCK = threading.Lock()
#: Graphs kept per worker (architectures x optimizers x batches): a run uses one or two.
_MAX_CACHED = 8


def input_shape_of(spec: ModelSpec) -> tuple[int, ...]:
    """The input shape (without the batch axis) of ``spec``'s family."""
    if spec.family == "cnn1d":
        return (spec.in_channels, spec.input_size)
    return (spec.in_channels, spec.input_size, spec.input_size)


def simulated_step_runtime(
    backend: str,
    spec: ModelSpec,
    state: Mapping[str, np.ndarray],
    optimizer: str,
    batch_size: int,
) -> StepRuntime:
    """The ``backend`` runtime of the step graph for the student ``state`` describes
    (filter-pruned and low-rank shapes included), exported on first use."""
    if backend not in ("onnxruntime", "litert"):
        raise ValueError(f"no step graph runtime for backend '{backend}'")
    shapes = tuple((name, tuple(np.shape(value))) for name, value in state.items())
    key = (backend, spec, shapes, optimizer, batch_size if backend == "litert" else 0)
    with _LOCK:
        runtime = _CACHE.get(key)
        if runtime is None:
            runtime = _export(backend, spec, state, optimizer, batch_size)
            if len(_CACHE) >= _MAX_CACHED:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = runtime
    return runtime


def _export(
    backend: str, spec: ModelSpec, state: Mapping[str, np.ndarray], optimizer: str, batch: int
) -> StepRuntime:
    from edgekd.deploy.train_step import export_infer_onnx, export_train_step_onnx, layout_for
    from edgekd.learn.models import load_for_state

    model = load_for_state(spec, state)
    layout = layout_for(model, input_shape_of(spec), spec.num_classes, optimizer)
    if backend == "onnxruntime":
        return OrtStepRuntime(
            export_train_step_onnx(model, layout), export_infer_onnx(model, layout), layout
        )
    from edgekd.deploy.tflite_export import export_train_step_tflite

    return LiteRTStepRuntime(export_train_step_tflite(model, layout, batch), layout)
