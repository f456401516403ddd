"""The student's whole KD training step as a plain graph (ONNX / TFLite), no autograd.

A Raspberry Pi (onnxruntime) or a phone (LiteRT) has no torch, and neither runtime
can differentiate a graph: onnxruntime-training is discontinued and litert-torch
exports no training step. So the step is written out. :class:`StudentKDStep` holds
the student's layer list and evaluates, with ordinary tensor ops only,

1. the forward pass, caching what each layer's backward needs;
2. the class-balanced KD loss and its gradient with respect to the logits, in closed
   form (the formula of `edgekd.deploy.head_step.HeadKDStep`);
3. the backward pass, layer by layer in reverse (below);
4. the pruning masks (gradients and weights of pruned entries stay at zero), clipping
   by the global gradient norm (``torch.nn.utils.clip_grad_norm_``), and the optimizer
   update of every tensor: Adam (Kingma & Ba 2015, PyTorch's defaults) or SGD with
   momentum 0.9 (PyTorch's form ``v' = mu v + g``), the optimizer state in and out.

Why this route and not a joint graph from ``torch.export``: the joint graph holds
``aten.convolution_backward``, ``max_pool2d_with_indices_backward`` and friends, which
neither the ONNX exporter nor the TFLite converter lowers. The backward below uses
only MatMul, Pad, strided Slice, Reshape, Concat, comparisons and elementwise
arithmetic, which every runtime runs, with static shapes except the batch axis.

The layers, each with its backward (``g`` the gradient of the layer's output):

* convolution (1-D as 2-D with height 1), by im2col: ``cols`` holds the ``k`` strided
  slices of the padded input, ``y = W_f cols + b``; ``dW_f = sum_b g cols^T``,
  ``db = sum g``, ``dcols = W_f^T g`` scattered back slice by slice (zero-interleaved
  for stride > 1, then padded into place);
* ReLU: ``g * [y > 0]`` (PyTorch's ``threshold_backward``);
* 2×2 max pooling: the gradient goes to the first maximum of each window in scan
  order, as PyTorch's ``max_pool2d`` picks it, so a tie sends it where autograd does;
* global average pooling: ``g / (H W)`` everywhere; flatten: a reshape;
* linear: ``dx = g W``, ``dW = g^T x``, ``db = sum_b g``.

Filter-pruned students (fewer channels) and low-rank students (a layer split into two
without a bias in the first) are the same layers with other shapes. Every gradient
and update equals torch autograd's to float32 rounding (``tests/deploy/test_train_step.py``).

This module never imports flwr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgekd.deploy.head_step import kd_loss_and_logit_gradient
from edgekd.deploy.onnx_export import export_graph_onnx
from edgekd.deploy.step_layout import OPTIMIZERS, STEP_SCALARS, StepLayout

__all__ = [
    "OPTIMIZERS",
    "STEP_SCALARS",
    "LayerOp",
    "StepLayout",
    "StudentKDStep",
    "StudentLogits",
    "example_infer_inputs",
    "example_step_inputs",
    "export_infer_onnx",
    "export_train_step_onnx",
    "layout_for",
    "step_for",
    "student_layers",
    "trainable_names",
]

#: Adam's constants (PyTorch's defaults) and SGD's momentum (edgekd's torch trainer).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SGD_MOMENTUM = 0.9
#: The clip coefficient's guard, as ``torch.nn.utils.clip_grad_norm_`` writes it.
CLIP_EPS = 1e-6


@dataclass(frozen=True)
class LayerOp:
    """One layer of the student in execution order, with what its backward needs.

    ``kind`` is ``conv``, ``relu``, ``maxpool2``, ``gap``, ``flatten`` or ``linear``;
    ``weight``/``bias`` name the layer's tensors in the student's ``state_dict`` (``bias``
    empty when the layer has none). A 1-D convolution is stored as 2-D: kernel, stride
    and padding as ``(height, width)`` with height ``(1, 1, 0)``.
    """

    kind: str
    weight: str = ""
    bias: str = ""
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    one_d: bool = False


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix, module)]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


def _layer_op(path: str, module: nn.Module) -> LayerOp:
    bias = f"{path}.bias" if getattr(module, "bias", None) is not None else ""
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if _pair(module.dilation) != (1, 1) or module.groups != 1:
            raise TypeError(f"{path}: dilated or grouped convolutions have no step graph")
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise TypeError(f"{path}: only explicit zero padding has a step graph")
        one_d = isinstance(module, nn.Conv1d)
        if one_d:
            kernel, stride = (1, module.kernel_size[0]), (1, module.stride[0])
            padding = (0, int(module.padding[0]))
        else:
            kernel, stride, padding = (
                _pair(module.kernel_size),
                _pair(module.stride),
                _pair(module.padding),
            )
        return LayerOp("conv", f"{path}.weight", bias, kernel, stride, padding, one_d)
    if isinstance(module, nn.Linear):
        return LayerOp("linear", f"{path}.weight", bias)
    if isinstance(module, nn.ReLU):
        return LayerOp("relu")
    if isinstance(module, nn.MaxPool2d):
        if (
            _pair(module.kernel_size) != (2, 2)
            or _pair(module.stride) != (2, 2)
            or _pair(module.padding) != (0, 0)
            or module.ceil_mode
            or _pair(module.dilation) != (1, 1)
        ):
            raise TypeError(f"{path}: only 2x2 max pooling with stride 2 has a step graph")
        return LayerOp("maxpool2")
    if isinstance(module, nn.AdaptiveAvgPool2d):
        if _pair(module.output_size) != (1, 1):  # type: ignore[arg-type]
            raise TypeError(f"{path}: only global average pooling has a step graph")
        return LayerOp("gap")
    if isinstance(module, nn.Flatten):
        return LayerOp("flatten")
    raise TypeError(f"{path}: no step graph for a {type(module).__name__} layer")


def student_layers(model: nn.Module) -> list[LayerOp]:
    """The layer list of an edgekd student: ``features``, a flatten, then ``head``.

    Nested ``Sequential`` blocks (low-rank factors) are flattened; ``Identity`` layers
    are dropped. Raises ``TypeError`` naming a layer the step graph does not cover.
    """
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if not isinstance(features, nn.Module) or not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no 'features' and 'head' modules")
    leaves = _leaves(features, "features") + [("", nn.Flatten(1))] + _leaves(head, "head")
    return [_layer_op(path, m) for path, m in leaves if not isinstance(m, nn.Identity)]


# ------------------------------------------------------------------ layer math
def _conv_cols(x: Tensor, op: LayerOp) -> tuple[Tensor, int, int]:
    """im2col of a padded 4-D input: ``[B, C * kh * kw, Ho * Wo]`` and ``(Ho, Wo)``."""
    (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    height, width = xp.shape[2], xp.shape[3]
    ho, wo = (height - kh) // sh + 1, (width - kw) // sw + 1
    taps = [
        xp[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    cols = torch.stack(taps, dim=2)  # [B, C, kh*kw, Ho, Wo]: the weight's flat order
    return cols.reshape(x.shape[0], x.shape[1] * kh * kw, ho * wo), ho, wo


def _interleave(d: Tensor, stride: int, dim: int) -> Tensor:
    """Insert ``stride - 1`` zeros after every entry of ``d`` along ``dim`` (2 or 3) and
    drop the trailing ones: the positions ``0, s, 2s, ...`` of a strided slice."""
    if stride == 1:
        return d
    size = d.shape[dim]
    zeros = torch.zeros_like(d)
    spread = torch.stack([d] + [zeros] * (stride - 1), dim=dim + 1)
    shape = list(d.shape)
    shape[dim] = size * stride
    spread = spread.reshape(shape)
    return spread.narrow(dim, 0, stride * (size - 1) + 1)


def _conv_backward_input(
    dcols: Tensor, x_shape: Sequence[int], op: LayerOp, ho: int, wo: int
) -> Tensor:
    """col2im: scatter ``dcols`` ``[B, C*kh*kw, Ho*Wo]`` back onto the input's positions."""
    (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
    batch, channels, height, width = x_shape
    hp, wp = height + 2 * ph, width + 2 * pw
    per_tap = dcols.reshape(batch, channels, kh * kw, ho, wo)
    total: Tensor | None = None
    for i in range(kh):
        for j in range(kw):
            d = per_tap[:, :, i * kw + j]
            d = _interleave(_interleave(d, sh, 2), sw, 3)
            placed = F.pad(d, (j, wp - j - d.shape[3], i, hp - i - d.shape[2]))
            total = placed if total is None else total + placed
    assert total is not None
    return total[:, :, ph : ph + height, pw : pw + width]


def _maxpool_windows(x: Tensor) -> list[Tensor]:
    """The four corners of every 2×2 window, in PyTorch's scan order."""
    return [x[:, :, a::2, b::2] for a in (0, 1) for b in (0, 1)]


def _first_max_selectors(corners: list[Tensor], y: Tensor) -> list[Tensor]:
    """One-hot (float) of the first corner equal to the window's maximum."""
    taken = torch.zeros_like(y)
    out = []
    for corner in corners:
        hit = (corner == y).to(y.dtype) * (1.0 - taken)
        taken = taken + hit
        out.append(hit)
    return out


def _merge_windows(parts: list[Tensor]) -> Tensor:
    """Inverse of :func:`_maxpool_windows`: interleave four ``[B, C, H/2, W/2]`` corners."""
    top = torch.stack([parts[0], parts[1]], dim=4)  # rows 0::2
    bottom = torch.stack([parts[2], parts[3]], dim=4)  # rows 1::2
    batch, channels, half_h, half_w = parts[0].shape
    top = top.reshape(batch, channels, half_h, 2 * half_w)
    bottom = bottom.reshape(batch, channels, half_h, 2 * half_w)
    return torch.stack([top, bottom], dim=3).reshape(batch, channels, 2 * half_h, 2 * half_w)


# ------------------------------------------------------------------ the step
class StudentKDStep(nn.Module):
    """Forward, KD loss, backward and optimizer update of a whole student, no autograd.

    With logits ``z_i``, ``s_i = softmax(z_i)``, ``q_i = softmax(z_i / tau)``, teacher
    ``p_i = softmax(t_i / tau)``, one-hot ``e_i``, ``w_i = class_weights[y_i]``, row mask
    ``m_i`` (0 for a padded row, label ``-1``) and ``n = max(sum m_i, 1)``::

        L = 1/n sum_i m_i [a_i v_i CE_i + (1 - a_i) tau^2 w_i KL(p_i || q_i)],
        dL/dz_i = m_i/n [a_i v_i (s_i - e_i) + (1 - a_i) tau w_i (q_i - p_i)],

    ``a_i = alpha``, or 1 where ``trust_correct`` is 1 and the teacher's top class is not
    ``y_i`` (`edgekd.learn.kd.class_balanced_kd_loss`'s ``trust_correct``); ``v_i = w_i``
    where ``weight_ce`` is 1 (its ``weight_ce``; with ``alpha = 1`` the class-weighted CE
    of a FedAvg round), else 1. The gradient
    of every tensor follows by the layers' backward (module docstring); then masks,
    global-norm clipping (``clip_norm <= 0`` disables it) and the optimizer step, the
    ``step``-th of the optimizer (1-based, for Adam's bias correction).
    """

    def __init__(self, layers: Sequence[LayerOp], names: Sequence[str], optimizer: str = "adam"):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got '{optimizer}'")
        self.layers = list(layers)
        self.names = list(names)
        self.optimizer = optimizer
        used = {n for op in self.layers for n in (op.weight, op.bias) if n}
        if used != set(self.names):
            raise ValueError(
                f"the layers use {sorted(used)} but the step trains {sorted(self.names)}"
            )

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        x, labels, teacher_logits, class_weights = inputs[:4]
        tau, alpha, lr, clip, step, trust, weight_ce = (s.reshape(()) for s in inputs[4:11])
        count, first = len(self.names), 4 + len(STEP_SCALARS)
        groups = [list(inputs[first + g * count : first + (g + 1) * count]) for g in range(4)]
        params = dict(zip(self.names, groups[0], strict=True))
        masks = dict(zip(self.names, groups[1], strict=True))

        logits, caches = self._forward(x, params)
        loss, grad_logits = kd_loss_and_logit_gradient(
            logits, labels, teacher_logits, class_weights, tau, alpha, trust, weight_ce
        )
        by_name = self._backward(grad_logits, caches, params)
        masked = [by_name[n] * masks[n] for n in self.names]
        total = torch.stack([(g * g).sum() for g in masked]).sum().sqrt()
        coef = torch.clamp(clip / (total + CLIP_EPS), max=1.0)
        scale = torch.where(clip > 0, coef, torch.ones_like(coef))
        grads = [g * scale for g in masked]

        new_params: list[Tensor] = []
        state1: list[Tensor] = []
        state2: list[Tensor] = []
        for name, g, s1, s2 in zip(self.names, grads, groups[2], groups[3], strict=True):
            if self.optimizer == "adam":
                b1, b2 = ADAM_BETAS
                m = b1 * s1 + (1.0 - b1) * g
                v = b2 * s2 + (1.0 - b2) * g * g
                # PyTorch's Adam: p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
                denom = v.sqrt() / torch.sqrt(1.0 - torch.pow(b2, step)) + ADAM_EPS
                update = (lr / (1.0 - torch.pow(b1, step))) * m / denom
            else:
                m = SGD_MOMENTUM * s1 + g
                v = s2
                update = lr * m
            new_params.append((params[name] - update) * masks[name])
            state1.append(m)
            state2.append(v)
        return (*new_params, *state1, *state2, loss)

    def _forward(
        self, x: Tensor, params: dict[str, Tensor]
    ) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        caches: list[tuple[Tensor, ...]] = []
        h = x
        for op in self.layers:
            if op.kind == "conv":
                h4 = h.unsqueeze(2) if op.one_d else h
                cols, ho, wo = _conv_cols(h4, op)
                weight = params[op.weight]
                out = weight.reshape(weight.shape[0], -1) @ cols
                if op.bias:
                    out = out + params[op.bias].reshape(1, -1, 1)
                out = out.reshape(h4.shape[0], weight.shape[0], ho, wo)
                caches.append((h4, cols))
                # reshape, not squeeze: the ONNX exporter guards a squeeze with an If node
                h = out.reshape(out.shape[0], out.shape[1], wo) if op.one_d else out
            elif op.kind == "relu":
                h = torch.relu(h)
                caches.append((h,))
            elif op.kind == "maxpool2":
                even = h[:, :, : 2 * (h.shape[2] // 2), : 2 * (h.shape[3] // 2)]
                corners = _maxpool_windows(even)
                y = torch.maximum(
                    torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3])
                )
                caches.append((h, y, *corners))
                h = y
            elif op.kind == "gap":
                caches.append((h,))
                h = h.mean(dim=(2, 3), keepdim=True)
            elif op.kind == "flatten":
                caches.append((h,))
                h = h.reshape(h.shape[0], -1)
            else:  # linear
                caches.append((h,))
                h = h @ params[op.weight].t()
                if op.bias:
                    h = h + params[op.bias]
        return h, caches

    def _backward(
        self, grad: Tensor, caches: list[tuple[Tensor, ...]], params: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        grads: dict[str, Tensor] = {}
        g = grad
        for index in range(len(self.layers) - 1, -1, -1):
            op, cache = self.layers[index], caches[index]
            first = index == 0  # the input needs no gradient
            if op.kind == "linear":
                (h,) = cache
                weight = params[op.weight]
                grads[op.weight] = g.t() @ h
                if op.bias:
                    grads[op.bias] = g.sum(dim=0)
                if not first:
                    g = g @ weight
            elif op.kind == "flatten":
                (h,) = cache
                g = g.reshape(h.shape)
            elif op.kind == "gap":
                (h,) = cache
                g = g * torch.ones_like(h) / float(h.shape[2] * h.shape[3])
            elif op.kind == "relu":
                (y,) = cache
                g = g * (y > 0).to(g.dtype)
            elif op.kind == "maxpool2":
                h, y, *corners = cache
                parts = [g * hit for hit in _first_max_selectors(corners, y)]
                merged = _merge_windows(parts)
                pad_h, pad_w = h.shape[2] - merged.shape[2], h.shape[3] - merged.shape[3]
                g = F.pad(merged, (0, pad_w, 0, pad_h)) if pad_h or pad_w else merged
            else:  # conv
                h4, cols = cache
                weight = params[op.weight]
                out_ch = weight.shape[0]
                gf = g.reshape(g.shape[0], out_ch, -1)
                grads[op.weight] = (gf @ cols.transpose(1, 2)).sum(dim=0).reshape(weight.shape)
                if op.bias:
                    grads[op.bias] = gf.sum(dim=(0, 2))
                if not first:
                    ho = g.shape[2] if not op.one_d else 1
                    wo = gf.shape[2] // ho
                    dcols = weight.reshape(out_ch, -1).t() @ gf
                    dx = _conv_backward_input(dcols, h4.shape, op, ho, wo)
                    g = dx.reshape(dx.shape[0], dx.shape[1], dx.shape[3]) if op.one_d else dx
        return grads


class StudentLogits(nn.Module):
    """The student's logits with its tensors as inputs: ``forward(x, *params)``.

    The same layer code as :class:`StudentKDStep`'s forward, so the device evaluates
    exactly the weights it trains (``infer`` beside ``train``)."""

    def __init__(self, layers: Sequence[LayerOp], names: Sequence[str]):
        super().__init__()
        self.step = StudentKDStep(layers, names)

    def forward(self, x: Tensor, *params: Tensor) -> Tensor:
        logits, _ = self.step._forward(x, dict(zip(self.step.names, params, strict=True)))
        return logits


def trainable_names(model: nn.Module) -> list[str]:
    """The student's trainable tensors in ``state_dict`` order (what the step trains)."""
    return [name for name, _ in model.named_parameters()]


def layout_for(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int, optimizer: str
) -> StepLayout:
    names = trainable_names(model)
    params = dict(model.named_parameters())
    return StepLayout(
        names=tuple(names),
        shapes=tuple(tuple(params[n].shape) for n in names),
        optimizer=optimizer,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
    )


def step_for(model: nn.Module, optimizer: str = "adam") -> StudentKDStep:
    """:class:`StudentKDStep` for ``model``'s layers and trainable tensors."""
    return StudentKDStep(student_layers(model), trainable_names(model), optimizer)


def example_step_inputs(layout: StepLayout, batch_size: int) -> tuple[Tensor, ...]:
    """Example inputs of the step (for tracing/conversion), in input order."""
    c = layout.num_classes
    scalars = (4.0, 0.5, 0.01, 2.0, 1.0, 0.0, 0.0)
    # A fresh tensor per input: the TFLite converter folds inputs that alias one object.
    groups = [[torch.full(s, fill) for s in layout.shapes] for fill in (0.1, 1.0, 0.0, 0.0)]
    return (
        torch.zeros(batch_size, *layout.input_shape),
        torch.zeros(batch_size, dtype=torch.int64),
        torch.zeros(batch_size, c),
        torch.ones(c),
        *(torch.tensor(v) for v in scalars),
        *(t for group in groups for t in group),
    )


def example_infer_inputs(layout: StepLayout, batch_size: int) -> tuple[Tensor, ...]:
    """Example inputs of :class:`StudentLogits`, in input order."""
    params = (torch.full(s, 0.1) for s in layout.shapes)
    return (torch.zeros(batch_size, *layout.input_shape), *params)


def export_train_step_onnx(model: nn.Module, layout: StepLayout) -> bytes:
    """The whole-student step of ``model`` as single-file ONNX, dynamic batch axis.

    Input and output names are ``layout.input_names()`` / ``layout.output_names()``.
    """
    return export_graph_onnx(
        step_for(model, layout.optimizer),
        example_step_inputs(layout, batch_size=2),
        layout.input_names(),
        layout.output_names(),
        ("x", "labels", "teacher_logits"),
    )


def export_infer_onnx(model: nn.Module, layout: StepLayout) -> bytes:
    """:class:`StudentLogits` of ``model`` as single-file ONNX: inputs
    ``layout.infer_input_names()``, output ``logits``, dynamic batch axis."""
    module = StudentLogits(student_layers(model), layout.names)
    return export_graph_onnx(
        module, example_infer_inputs(layout, 2), layout.infer_input_names(), ["logits"], ("x",)
    )
