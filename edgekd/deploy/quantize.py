"""INT8 post-training quantization of ONNX students with onnxruntime.quantization.

Static QDQ (QuantizeLinear/DequantizeLinear pairs around each op), weights INT8 per
output channel, activations INT8 per tensor, calibrated on server-held data (the
public/proxy split): the Raspberry Pi profile's format.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn


def quantize_onnx_int8(
    fp32_onnx: bytes, calibration_x: np.ndarray, *, per_channel: bool = True, batch_size: int = 64
) -> bytes:
    """Return the INT8 static-QDQ version of ``fp32_onnx``, calibrated on ``calibration_x``
    with min/max ranges (onnxruntime's ``CalibrationMethod.MinMax``)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self._batches = iter(
                {name: calibration_x[i : i + batch_size].astype(np.float32)}
                for i in range(0, len(calibration_x), batch_size)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32_onnx)
        # Shape inference and graph cleanup first, as onnxruntime recommends for QDQ.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        import onnx

        input_name = onnx.load(str(pre)).graph.input[0].name
        quantize_static(
            str(pre),
            str(dst),
            _Reader(input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return dst.read_bytes()


def int8_weight_fake_quant(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose conv/linear weights are rounded to symmetric INT8 per
    output channel (`edgekd.common.quantization.convert_weights_int8`) and stored back
    as floats.

    The torch twin of the INT8 export: it runs the robustness analyses (attacks,
    certificates, per-layer sensitivity) that need gradients and head features.
    """
    import torch

    from edgekd.common.quantization import convert_weights_int8, dequantize_int8

    out = copy.deepcopy(model)
    state = out.state_dict()
    for name, (q, scales) in convert_weights_int8(model).items():
        state[name] = torch.from_numpy(dequantize_int8(q, scales))
    out.load_state_dict(state)
    return out
