"""Ternary weights with a straight-through estimator, and INT8 quantization-aware training.

**Ternary** (the seed's rule, which combines two papers): the threshold is TTQ's
(Zhu et al. 2017, "Trained Ternary Quantization")

    Δ = q_t · max|W|,    q_t = 0.05 by default (TTQ's t),

and the scale is TWN's closed form for a given Δ (Li & Liu 2016, "Ternary Weight
Networks", eq. 5)

    a = mean{ |W_i| : |W_i| > Δ },    W_t = a · sign(W) · 1[|W| > Δ] ∈ {−a, 0, +a}.

(TTQ learns separate positive and negative scales; TWN uses Δ = 0.7·mean|W|; the seed
uses one scale with TTQ's threshold.) Rounding has no useful derivative, so
`TernarySTE` uses the clipped straight-through estimator (Bengio et al. 2013; Hubara et
al. 2016): the backward pass hands the incoming gradient to ``W`` **unchanged where
|W| ≤ clip** (the boundary included) and gives **exactly 0 where |W| > clip**, so weights
outside ``[−clip, clip]`` stop growing. ``q_t`` and ``clip`` get no gradient.

**INT8 QAT** (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference") with ``torch.ao.quantization``'s
``FakeQuantize`` (torchao is not a dependency; torch 2.x still ships these pieces):

* weights: symmetric per-output-channel qint8 in ``[−127, 127]``
  (``MovingAveragePerChannelMinMaxObserver``, ``ch_axis=0``), the ONNX/TFLite convention;
* activations: the input of every conv/linear, per-tensor affine quint8 ``[0, 255]``
  (``MovingAverageMinMaxObserver``) — what an integer kernel consumes; the logits stay float.

``FakeQuantize`` computes ``q = clamp(round(x/s) + z)``, ``x̂ = (q − z)·s`` forward and
passes gradients straight through inside the range. `convert_weights_int8` then gives
the integer weights ``q = clamp(round(W/s), −127, 127)`` with ``s_c = max_j|W_cj| / 127``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)

DEFAULT_Q_T = 0.05  # TTQ's threshold factor t (Zhu et al. 2017, sec. 3)
DEFAULT_CLIP = 1.0  # hard-tanh STE range: weights of these small CNNs lie well inside it
INT8_MAX = 127  # symmetric range [−127, 127]: −128 unused, so scale·q is symmetric


# ---------------------------------------------------------------------- ternary
def ternary_threshold(weight: Tensor, q_t: float = DEFAULT_Q_T) -> Tensor:
    """``Δ = q_t · max|W|``."""
    return q_t * weight.detach().abs().max()


@torch.no_grad()
def ternarize(weight: Tensor, q_t: float = DEFAULT_Q_T) -> Tensor:
    """``a · sign(W) · 1[|W| > Δ]`` with ``a`` the mean ``|W|`` above ``Δ`` (no gradient).

    Exactly three values ``{−a, 0, +a}`` (fewer if W has no entries of one sign).
    """
    if not 0.0 <= q_t < 1.0:
        raise ValueError(f"q_t must lie in [0, 1), got {q_t}")
    magnitude = weight.abs()
    above = magnitude > ternary_threshold(weight, q_t)
    if not bool(above.any()):
        return torch.zeros_like(weight)
    scale = magnitude[above].mean()
    return torch.sign(weight) * above.to(weight.dtype) * scale


class TernarySTE(torch.autograd.Function):
    """Forward: `ternarize`. Backward: ``∂L/∂W = ∂L/∂W_t · 1[|W| ≤ clip]``."""

    @staticmethod
    def forward(weight: Tensor, q_t: float, clip: float) -> Tensor:
        return ternarize(weight, q_t)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        weight, _q_t, clip = inputs
        ctx.save_for_backward(weight)
        ctx.clip = clip

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        passes = weight.abs() <= ctx.clip
        return grad_output * passes.to(grad_output.dtype), None, None


def ternary_weight(weight: Tensor, q_t: float = DEFAULT_Q_T, clip: float = DEFAULT_CLIP) -> Tensor:
    """Differentiable ternary weight (see `TernarySTE` for the gradient)."""
    return TernarySTE.apply(weight, q_t, clip)


class TernaryWeight(nn.Module):
    """A parametrization that makes a layer train with ternary weights::

        torch.nn.utils.parametrize.register_parametrization(conv, "weight", TernaryWeight())

    The full-precision latent weight stays in ``parametrizations.weight.original``.
    """

    def __init__(self, q_t: float = DEFAULT_Q_T, clip: float = DEFAULT_CLIP) -> None:
        super().__init__()
        self.q_t = q_t
        self.clip = clip

    def forward(self, weight: Tensor) -> Tensor:
        return ternary_weight(weight, self.q_t, self.clip)


# ------------------------------------------------------------------- INT8 (QAT)
def weight_fake_quant() -> FakeQuantize:
    """Per-output-channel symmetric qint8 fake quantization of a weight."""
    return FakeQuantize(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-INT8_MAX,
        quant_max=INT8_MAX,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )


def activation_fake_quant() -> FakeQuantize:
    """Per-tensor affine quint8 fake quantization of an activation."""
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )


class _FakeQuantLayer:
    """Adds the two fake quantizers; the subclasses keep the float layer's parameter
    names (``weight``, ``bias``), so a QAT model loads the float ``state_dict`` as is."""

    weight: Tensor

    def _add_fake_quant(self) -> None:
        self.weight_fake_quant = weight_fake_quant()
        self.input_fake_quant = activation_fake_quant()


class QATLinear(nn.Linear, _FakeQuantLayer):
    def __init__(self, src: nn.Linear) -> None:
        super().__init__(src.in_features, src.out_features, bias=src.bias is not None)
        self.load_state_dict(src.state_dict())
        self._add_fake_quant()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_fake_quant(x), self.weight_fake_quant(self.weight), self.bias)


def _conv_args(src: nn.Conv1d | nn.Conv2d) -> dict[str, Any]:
    return dict(
        in_channels=src.in_channels,
        out_channels=src.out_channels,
        kernel_size=src.kernel_size,
        stride=src.stride,
        padding=src.padding,
        dilation=src.dilation,
        groups=src.groups,
        bias=src.bias is not None,
        padding_mode=src.padding_mode,
    )


class QATConv1d(nn.Conv1d, _FakeQuantLayer):
    def __init__(self, src: nn.Conv1d) -> None:
        super().__init__(**_conv_args(src))
        self.load_state_dict(src.state_dict())
        self._add_fake_quant()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(
            self.input_fake_quant(x), self.weight_fake_quant(self.weight), self.bias
        )


class QATConv2d(nn.Conv2d, _FakeQuantLayer):
    def __init__(self, src: nn.Conv2d) -> None:
        super().__init__(**_conv_args(src))
        self.load_state_dict(src.state_dict())
        self._add_fake_quant()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(
            self.input_fake_quant(x), self.weight_fake_quant(self.weight), self.bias
        )


_QAT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
}


def prepare_qat(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear/Conv1d/Conv2d layers fake-quantize their weight
    (per channel, qint8) and their input (per tensor, quint8) on every forward pass.

    Parameter names are unchanged; the observers add buffers (``*.weight_fake_quant.*``,
    ``*.input_fake_quant.*``) to the ``state_dict``, so send ``named_parameters()``, not
    the whole ``state_dict``, as a federated payload. The caller's model is not touched.
    """
    qat = copy.deepcopy(model)
    for name, module in list(qat.named_modules()):
        cls = _QAT_CLASSES.get(type(module))
        if cls is not None:
            qat.set_submodule(name, cls(module).to(module.weight.device))
    return qat


@torch.no_grad()
def convert_weights_int8(
    model: nn.Module, levels: int = INT8_MAX
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``state_dict`` name → (int8 weight, float32 per-output-channel scales).

    ``s_c = max_j|W_cj| / L`` (1.0 for an all-zero channel), ``q = clamp(round(W/s_c),
    −L, L)`` with ``L = levels`` (127; 64 for the 7-bit weights of the ONNX export,
    `edgekd.deploy.quantize`), so ``|q·s_c − W| ≤ s_c/2``. The scales are taken from the
    final weights, not the observers' moving averages: those lag the last optimizer step
    and would clip weights that grew since. Works on a float model or a `prepare_qat` one; biases
    stay float (an integer runtime folds them into int32 with the activation scale).
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            weight = module.weight.detach().cpu().to(torch.float64)
            flat = weight.reshape(weight.shape[0], -1)
            max_abs = flat.abs().amax(dim=1)
            scales = torch.where(max_abs > 0, max_abs / levels, torch.ones_like(max_abs))
            shape = (-1,) + (1,) * (weight.dim() - 1)
            q = torch.clamp(torch.round(weight / scales.reshape(shape)), -levels, levels)
            key = f"{name}.weight" if name else "weight"
            out[key] = (q.to(torch.int8).numpy(), scales.to(torch.float32).numpy())
    return out


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``q · s_c`` broadcast over the output-channel axis 0, as float32."""
    shape = (-1,) + (1,) * (q.ndim - 1)
    return (q.astype(np.float32) * scales.astype(np.float32).reshape(shape)).astype(np.float32)
