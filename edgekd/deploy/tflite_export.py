"""Export the student and the on-device head step to LiteRT (TFLite) with ``litert-torch``.

``litert-torch`` is large and optional (``pip install 'edgekd[litert]'``); it is
imported inside the functions, and a missing install raises
:class:`LiteRTUnavailableError` (an ``ImportError``) that names the extra. Devices run
the files with the LiteRT interpreter alone (``ai-edge-litert``; see
`edgekd.deploy.runtimes.LiteRTRuntime`).

LiteRT graphs here have a static batch size; the converter downcasts int64 inputs
(labels) to int32. Files:

* :func:`export_student_tflite`: the whole student, signature ``infer``; optionally
  INT8 weights (dynamic-range) through ``ai_edge_quantizer``;
* :func:`export_features_tflite`: the frozen feature extractor, signature ``features``;
* :func:`export_head_step_tflite`: one file with a ``train`` signature
  (`edgekd.deploy.head_step.HeadKDStep`) and an ``infer`` signature (head logits);
* :func:`export_train_step_tflite`: the whole student's step
  (`edgekd.deploy.train_step.StudentKDStep`, signature ``train``) and its logits with
  the tensors as inputs (``infer``).

Never imports flwr.
"""

from __future__ import annotations

import copy
from types import ModuleType

import torch
from torch import nn

from edgekd.core.errors import EdgeKDError
from edgekd.deploy.head_step import (
    HeadKDStep,
    HeadLogits,
    example_head_step_inputs,
    split_student,
)
from edgekd.deploy.step_layout import StepLayout
from edgekd.deploy.train_step import (
    StudentKDStep,
    StudentLogits,
    example_infer_inputs,
    example_step_inputs,
    student_layers,
)

__all__ = [
    "FEATURES_SIGNATURE",
    "INFER_SIGNATURE",
    "TRAIN_SIGNATURE",
    "LiteRTUnavailableError",
    "export_features_tflite",
    "export_head_step_tflite",
    "export_student_tflite",
    "export_train_step_tflite",
    "is_litert_torch_available",
]

INFER_SIGNATURE = "infer"
TRAIN_SIGNATURE = "train"
FEATURES_SIGNATURE = "features"
_INSTALL_HINT = "TFLite export needs litert-torch: pip install 'edgekd[litert]'"


class LiteRTUnavailableError(EdgeKDError, ImportError):
    """``litert-torch`` (or ``ai-edge-quantizer``) is not installed."""


def is_litert_torch_available() -> bool:
    """True when ``litert_torch`` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("litert_torch") is not None


def _litert_torch() -> ModuleType:
    try:
        import litert_torch
    except ImportError as exc:
        raise LiteRTUnavailableError(_INSTALL_HINT) from exc
    return litert_torch


def _check_batch(batch_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def _quantize_int8_weights(tflite: bytes) -> bytes:
    """Dynamic-range INT8: per-channel INT8 weights, float activations quantized on the fly."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as exc:
        raise LiteRTUnavailableError(_INSTALL_HINT) from exc
    qt = quantizer.Quantizer(tflite)
    qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    result = qt.quantize()
    if result.quantized_model is None:  # pragma: no cover - the quantizer raises instead
        raise RuntimeError("ai_edge_quantizer returned no model")
    return bytes(result.quantized_model)


def export_student_tflite(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    *,
    int8: bool = False,
) -> bytes:
    """The whole student as a ``.tflite`` flatbuffer with one signature, ``infer``.

    ``input_shape`` excludes the batch axis; the batch is static at ``batch_size``.
    ``int8=True`` stores the weights as per-channel INT8 (``ai_edge_quantizer``'s
    ``dynamic_wi8_afp32`` recipe: no calibration data needed). ``model`` is not modified.
    """
    _check_batch(batch_size)
    litert_torch = _litert_torch()
    student = copy.deepcopy(model).eval()
    example = (torch.zeros(batch_size, *input_shape),)
    edge = litert_torch.signature(INFER_SIGNATURE, student, example).convert()
    data = bytes(edge.model_content())
    return _quantize_int8_weights(data) if int8 else data


def export_features_tflite(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int
) -> bytes:
    """The frozen feature extractor (``[B, D]`` flattened features), signature ``features``.

    Static batch ``batch_size``; ``input_shape`` excludes the batch axis.
    """
    _check_batch(batch_size)
    litert_torch = _litert_torch()
    extractor, _ = split_student(copy.deepcopy(model))
    example = (torch.zeros(batch_size, *input_shape),)
    edge = litert_torch.signature(FEATURES_SIGNATURE, extractor.eval(), example).convert()
    return bytes(edge.model_content())


def export_head_step_tflite(num_features: int, num_classes: int, batch_size: int) -> bytes:
    """One ``.tflite`` file with two signatures for the head ``Linear(D, C)``:

    * ``train``: :class:`~edgekd.deploy.head_step.HeadKDStep` (inputs in the order of
      ``HEAD_STEP_INPUTS``, scalars 0-d; labels int32 after conversion; label ``-1`` marks
      a padded row), outputs ``(new_weight, new_bias, loss)``;
    * ``infer``: ``logits = features @ weight.T + bias`` with ``(features, weight, bias)``
      as inputs.

    Static batch ``batch_size`` for both.
    """
    _check_batch(batch_size)
    if num_features <= 0 or num_classes <= 0:
        raise ValueError(
            f"num_features and num_classes must be positive, got {num_features}, {num_classes}"
        )
    litert_torch = _litert_torch()
    train_args = example_head_step_inputs(num_features, num_classes, batch_size)
    infer_args = (train_args[0], train_args[3], train_args[4])
    edge = (
        litert_torch.signature(TRAIN_SIGNATURE, HeadKDStep().eval(), train_args)
        .signature(INFER_SIGNATURE, HeadLogits().eval(), infer_args)
        .convert()
    )
    return bytes(edge.model_content())


def export_train_step_tflite(model: nn.Module, layout: StepLayout, batch_size: int) -> bytes:
    """The whole-student step of ``model`` as one ``.tflite`` file with two signatures:

    * ``train``: `edgekd.deploy.train_step.StudentKDStep` (inputs in the order of
      ``layout.input_names()``, scalars 0-d, labels int32 after conversion, label ``-1``
      marks a padded row), outputs in the order of ``layout.output_names()``;
    * ``infer``: the logits, inputs ``x`` and the student's tensors.

    Static batch ``batch_size`` for both.
    """
    _check_batch(batch_size)
    litert_torch = _litert_torch()
    layers, names = student_layers(model), list(layout.names)
    edge = (
        litert_torch.signature(
            TRAIN_SIGNATURE,
            StudentKDStep(layers, names, layout.optimizer).eval(),
            example_step_inputs(layout, batch_size),
        )
        .signature(
            INFER_SIGNATURE,
            StudentLogits(layers, names).eval(),
            example_infer_inputs(layout, batch_size),
        )
        .convert()
    )
    return bytes(edge.model_content())
