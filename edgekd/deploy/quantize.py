"""INT8 post-training quantization of ONNX students with onnxruntime.quantization.

Static QDQ (QuantizeLinear/DequantizeLinear pairs around each op), weights INT8 per
output channel, activations INT8 per tensor, calibrated on server-held data (the
public/proxy split): the Raspberry Pi profile's format.

Weights use 7 of their 8 bits (``reduce_range=True``: codes in [-64, 64]) so that the
model computes the same function on every CPU. onnxruntime runs QDQ convolutions and
GEMMs as u8 activations × s8 weights; on x86 without VNNI (AVX2 only) its kernels add
pairs of products into a saturating int16 (`edgekd.deploy.host`), and with full-range
weights 255·127 + 255·127 overflows. With |w| ≤ 64 a pair is at most 255·128 = 32 640 <
32 767: no sum can clip, the integer arithmetic is exact on AVX2, VNNI and ARM alike.

Measured on the default run's student (seed 42, 3 rounds, 4 000 shifted test samples),
native AVX-512 VNNI vs AVX2 without VNNI (``qemu-x86_64 -cpu max``), FP32 accuracy 0.8150:

| settings | accuracy VNNI | accuracy AVX2 | top-1 agreement AVX2 |
|---|---|---|---|
| QDQ, s8 activations, 8-bit weights (before) | 0.8127 | 0.6435 | 0.703 |
| QDQ, s8 activations, 7-bit weights (chosen) | 0.8130 | 0.8130 | 0.974 |
| QDQ, u8 activations, 7-bit weights | 0.8130 | 0.8130 | 0.974 |
| QDQ, u8 activations and weights (U8U8) | 0.8117 | 0.8117 | 0.974 |
| QOperator, u8 activations and weights | 0.8120 | 0.6420 | 0.701 |

U8U8 QDQ is exact too, but its QOperator twin saturates: which kernel runs depends on
graph fusions the exporter does not control, while a bound on the weight codes holds
whatever kernel runs. The seventh bit cost nothing measurable (0.8130 vs 0.8127).
MinMax, percentile (99.99) and entropy calibration on 1 000, 2 000 or 6 000 public
samples gave the default run's student 0.8552–0.8575 (FP32 0.8608): no method is
better by more than what 48 more calibration samples change, so MinMax stays.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekd.core.errors import EdgeKDError

if TYPE_CHECKING:
    from torch import nn

# Calibration samples for static INT8: min/max ranges settle well before this many.
# `edgekd simulate` and `edgekd deploy build` use the same, so they write the same model.
CALIBRATION_SAMPLES = 2048
# |weight code| at most this: 255 * 2 * 64 = 32 640 fits the int16 that onnxruntime's
# AVX2 kernels sum a pair of u8*s8 products into (module docstring).
SATURATION_FREE_WEIGHT_CODE = 64
# Ops whose weights onnxruntime runs through its INT8 GEMM/conv kernels.
_INT8_GEMM_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


class QuantizationError(EdgeKDError, RuntimeError):
    """The quantizer wrote a model that would not compute the same function on every CPU."""


def quantize_onnx_int8(
    fp32_onnx: bytes, calibration_x: np.ndarray, *, per_channel: bool = True, batch_size: int = 64
) -> bytes:
    """Return the INT8 static-QDQ version of ``fp32_onnx`` (`static_qdq` with 7-bit
    weights), its weight codes checked to lie within ±`SATURATION_FREE_WEIGHT_CODE`.

    Raises:
        QuantizationError: a weight code outside that bound (an onnxruntime that ignores
            ``reduce_range``), so that no export saturates silently on AVX2 hosts.
    """
    int8 = static_qdq(
        fp32_onnx, calibration_x, per_channel=per_channel, batch_size=batch_size, reduce_range=True
    )
    largest = max_weight_code(int8)
    if largest > SATURATION_FREE_WEIGHT_CODE:
        raise QuantizationError(
            f"INT8 weight code {largest} exceeds {SATURATION_FREE_WEIGHT_CODE}: onnxruntime's "
            "AVX2 kernels (no VNNI) would saturate on this model"
        )
    return int8


def static_qdq(
    fp32_onnx: bytes,
    calibration_x: np.ndarray,
    *,
    reduce_range: bool,
    per_channel: bool = True,
    batch_size: int = 64,
) -> bytes:
    """onnxruntime's static QDQ quantizer with edgekd's settings: s8 activations per
    tensor, s8 weights per output channel (7-bit with ``reduce_range``), min/max
    calibration (``CalibrationMethod.MinMax``) on ``calibration_x``.

    ``reduce_range=False`` gives the full-range weights that saturate on AVX2: kept for
    the measurements that compare the two (tests, ``benchmarks/int8_isa.py``).
    """
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
            reduce_range=reduce_range,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return dst.read_bytes()


def max_weight_code(int8_onnx: bytes) -> int:
    """The largest |code − zero point| among the INT8 weights that feed a conv/GEMM
    through a DequantizeLinear (QDQ models; a QOperator model has none and gives 0).

    A model whose value is at most `SATURATION_FREE_WEIGHT_CODE` computes without
    saturation on every onnxruntime CPU kernel; full-range INT8 weights give 127.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(int8_onnx).graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    largest = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        codes = numpy_helper.to_array(initializers[node.input[0]])
        if codes.dtype not in (np.int8, np.uint8) or not consumers.get(node.output[0], set()) & (
            _INT8_GEMM_OPS
        ):
            continue  # int32 biases and activation scales are not multiplied in int16
        zero = initializers.get(node.input[2]) if len(node.input) > 2 else None
        offset = numpy_helper.to_array(zero).astype(np.int32) if zero is not None else 0
        if np.ndim(offset) == 1 and codes.ndim > 1:  # per channel, along the node's axis
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            offset = np.expand_dims(offset, [d for d in range(codes.ndim) if d != axis])
        centred = codes.astype(np.int32) - offset
        largest = max(largest, int(np.abs(centred).max(initial=0)))
    return largest


def int8_weight_fake_quant(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose conv/linear weights are rounded per output channel to
    the export's symmetric 7-bit codes (±`SATURATION_FREE_WEIGHT_CODE`, with
    `edgekd.learn.quantization.convert_weights_int8`) and stored back as floats.

    The torch twin of the INT8 export: it runs the robustness analyses (attacks,
    certificates, per-layer sensitivity) that need gradients and head features.
    """
    import torch

    from edgekd.learn.quantization import convert_weights_int8, dequantize_int8

    out = copy.deepcopy(model)
    state = out.state_dict()
    for name, (q, scales) in convert_weights_int8(model, SATURATION_FREE_WEIGHT_CODE).items():
        state[name] = torch.from_numpy(dequantize_int8(q, scales))
    out.load_state_dict(state)
    return out
