"""Export torch models to a single-file ONNX model (no external ``.onnx.data``)."""

from __future__ import annotations

import hashlib
import io
import warnings

import torch
from torch import nn

INPUT_NAME = "x"
OUTPUT_NAME = "logits"


def export_onnx_bytes(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """Serialize ``model`` to ONNX with a dynamic batch axis.

    The TorchScript exporter is used (``dynamo=False``): the models are static CNNs,
    it needs no ``onnxscript``, and it writes one self-contained file.
    """
    model.eval()
    buffer = io.BytesIO()
    example = torch.zeros((1, *input_shape), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,  # type: ignore[arg-type]  # file-like objects are accepted
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            dynamo=False,
            external_data=False,
        )
    return buffer.getvalue()


def export_graph_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    batched: tuple[str, ...],
) -> bytes:
    """Serialize a graph module with named inputs and outputs (the on-device training
    steps) to single-file ONNX, opset 17, TorchScript exporter; the inputs in
    ``batched`` get a dynamic batch axis."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buffer,  # type: ignore[arg-type]  # file-like objects are accepted
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in batched},
            opset_version=17,
            dynamo=False,
            external_data=False,
        )
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
