"""On-device training of the student's linear head as a plain graph (ONNX / TFLite).

A Raspberry Pi (onnxruntime) or a phone (LiteRT) has no torch and no autograd. The
device keeps the feature extractor frozen and trains only ``head = nn.Linear(D, C)``,
so one SGD step of the class-balanced KD loss has a closed-form gradient that any
runtime can evaluate: :class:`HeadKDStep` writes it with plain tensor ops (no
``torch.autograd``, no ``torch.func``), and :func:`export_head_step_onnx` exports it.

The loss is exactly `edgekd.learn.kd.class_balanced_kd_loss` as edgekd's client calls
it (``sample_weights = class_weights[y]``, ``weight_ce=False``: the class weights scale
the KD term only, and the batch loss is a plain mean over the batch).

This module never imports flwr.
"""

from __future__ import annotations

import copy

import onnx
import torch
from torch import Tensor, nn

from edgekd.core.records import HEAD_STEP_INPUTS, HEAD_STEP_OUTPUTS
from edgekd.deploy.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    export_graph_onnx,
    export_onnx_bytes,
)

__all__ = [
    "FEATURES_INPUT",
    "FEATURES_OUTPUT",
    "HEAD_STEP_INPUTS",
    "HEAD_STEP_OUTPUTS",
    "HeadKDStep",
    "HeadLogits",
    "example_head_step_inputs",
    "export_feature_extractor_onnx",
    "export_head_step_onnx",
    "kd_loss_and_logit_gradient",
    "split_student",
]

#: Input and output names of the exported feature extractor.
FEATURES_INPUT = INPUT_NAME
FEATURES_OUTPUT = "features"
#: Opset of the exported step (that of `edgekd.deploy.onnx_export`).
ONNX_OPSET = 17


def kd_loss_and_logit_gradient(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor,
    class_weights: Tensor,
    tau: Tensor,
    alpha: Tensor,
    trust: Tensor,
    weight_ce: Tensor,
) -> tuple[Tensor, Tensor]:
    """The class-weighted KD loss of a batch and its gradient with respect to the logits,
    in closed form with plain tensor ops (the formula: :class:`HeadKDStep`; both on-device
    steps start their backward here).

    ``a_i = alpha``, or 1 where ``trust`` is 1 and the teacher's top class is not ``y_i``
    (`edgekd.learn.kd.class_balanced_kd_loss`'s ``trust_correct``); the CE term is scaled
    by ``v_i = w_i`` where ``weight_ce`` is 1, else 1. A row with label ``-1`` (padding)
    adds nothing to the loss, the gradient or the count ``n``.
    """
    num_classes = logits.shape[1]
    classes = torch.arange(num_classes, dtype=labels.dtype, device=labels.device)
    one_hot = (labels.unsqueeze(1) == classes.unsqueeze(0)).to(logits.dtype)
    row_mask = one_hot.sum(dim=1)
    count = row_mask.sum().clamp_min(1.0)
    # Gathering by a matmul with the one-hot keeps padded rows at weight 0 and needs
    # no integer gather (which the TFLite converter handles less uniformly).
    sample_weights = one_hot @ class_weights
    # The teacher is right where its logit of the label is its largest one.
    teacher_right = (one_hot * teacher_logits).sum(dim=1) >= teacher_logits.amax(dim=1)
    a = alpha + (1.0 - alpha) * trust * (1.0 - teacher_right.to(logits.dtype))

    log_s = torch.log_softmax(logits, dim=1)
    log_q = torch.log_softmax(logits / tau, dim=1)
    log_p = torch.log_softmax(teacher_logits / tau, dim=1)
    p = torch.exp(log_p)
    ce = -(one_hot * log_s).sum(dim=1)
    # p * (log p - log q): p > 0 here (a softmax), and an underflowed p = 0 meets a
    # finite log p, so this equals the xlogy form of class_balanced_kd_loss.
    kl = (p * (log_p - log_q)).sum(dim=1)
    ce_weights = 1.0 + weight_ce * (sample_weights - 1.0)
    per_sample = a * ce_weights * ce + (1.0 - a) * tau * tau * sample_weights * kl
    loss = (row_mask * per_sample).sum() / count

    grad_ce = (torch.exp(log_s) - one_hot) * ce_weights.unsqueeze(1)
    grad_kd = (torch.exp(log_q) - p) * (tau * sample_weights).unsqueeze(1)
    per_row = a.unsqueeze(1) * grad_ce + (1.0 - a).unsqueeze(1) * grad_kd
    return loss, per_row * (row_mask / count).unsqueeze(1)


class HeadKDStep(nn.Module):
    """One SGD step of the class-balanced KD loss on a linear head, gradient in closed form.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (2015). With logits
    ``z_i = W f_i + b``, ``s_i = softmax(z_i)``, ``q_i = softmax(z_i / tau)``, teacher
    ``p_i = softmax(t_i / tau)``, one-hot ``e_i`` of ``y_i`` and ``w_i = class_weights[y_i]``::

        L = 1/n * sum_i m_i * [ alpha * CE_i + (1 - alpha) * tau^2 * w_i * KL(p_i || q_i) ],
        CE_i = logsumexp(z_i) - z_i,y,

    whose gradient with respect to the logits is (Hinton et al., sec. 2)::

        G_i = dL/dz_i = m_i / n * [ alpha * (s_i - e_i) + (1 - alpha) * tau * w_i * (q_i - p_i) ],

    and, by the chain rule through ``z = F W^T + b``::

        dL/dW = G^T F,    dL/db = sum_i G_i,
        W' = W - lr * dL/dW,    b' = b - lr * dL/db.

    The returned loss is ``L`` at the weights *before* the step (what autograd reports).

    Padding. ``m_i = sum_c e_ic`` is 1 for a label in ``[0, C)`` and 0 otherwise, and
    ``n = max(sum_i m_i, 1)``. A row with label ``-1`` (PyTorch's ``ignore_index`` idea)
    therefore adds nothing to the loss, the gradient or ``n``: a runtime with a static
    batch pads a short batch with such rows and gets exactly the unpadded step. Without
    padding ``n = B`` and ``L`` equals `edgekd.learn.kd.class_balanced_kd_loss` with
    ``sample_weights = class_weights[y]`` and ``weight_ce=False`` (its plain batch mean).
    """

    def forward(
        self,
        features: Tensor,
        labels: Tensor,
        teacher_logits: Tensor,
        weight: Tensor,
        bias: Tensor,
        class_weights: Tensor,
        temperature: Tensor,
        alpha: Tensor,
        lr: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(new_weight [C, D], new_bias [C], loss [])``.

        Args:
            features: Frozen features ``F``, float32 ``[B, D]``.
            labels: Labels ``y``, int64 ``[B]``; ``-1`` marks a padded row.
            teacher_logits: Teacher logits ``t`` (not yet softened), float32 ``[B, C]``.
            weight: Head weight ``W``, float32 ``[C, D]``.
            bias: Head bias ``b``, float32 ``[C]``.
            class_weights: Per-class KD weights, float32 ``[C]`` (ones for no weighting).
            temperature: ``tau > 0``, float32 ``[]`` or ``[1]``.
            alpha: CE weight in ``[0, 1]``, float32 ``[]`` or ``[1]``.
            lr: SGD learning rate, float32 ``[]`` or ``[1]``.
        """
        tau = temperature.reshape(())
        a = alpha.reshape(())
        step = lr.reshape(())
        zero = torch.zeros((), dtype=features.dtype)
        logits = features @ weight.t() + bias
        loss, grad_logits = kd_loss_and_logit_gradient(
            logits, labels, teacher_logits, class_weights, tau, a, trust=zero, weight_ce=zero
        )

        grad_weight = grad_logits.t() @ features
        grad_bias = grad_logits.sum(dim=0)
        return weight - step * grad_weight, bias - step * grad_bias, loss


class HeadLogits(nn.Module):
    """Head inference with the weights as inputs: ``logits = F W^T + b``.

    Lives next to :class:`HeadKDStep` so a runtime that trains ``W, b`` outside the graph
    (LiteRT ``infer`` signature) evaluates them with the same graph conventions.
    """

    def forward(self, features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return features @ weight.t() + bias


def example_head_step_inputs(
    num_features: int, num_classes: int, batch_size: int
) -> tuple[Tensor, ...]:
    """Example inputs of :class:`HeadKDStep` (for tracing/conversion), in input order."""
    return (
        torch.zeros(batch_size, num_features),
        torch.zeros(batch_size, dtype=torch.int64),
        torch.zeros(batch_size, num_classes),
        torch.zeros(num_classes, num_features),
        torch.zeros(num_classes),
        torch.ones(num_classes),
        torch.tensor(4.0),
        torch.tensor(0.5),
        torch.tensor(0.01),
    )


def export_head_step_onnx(num_features: int, num_classes: int) -> bytes:
    """Serialize :class:`HeadKDStep` for ``D = num_features``, ``C = num_classes`` to ONNX.

    A single self-contained file (TorchScript exporter, opset 17) with a dynamic batch
    axis on ``features``, ``labels`` and ``teacher_logits``; input and output names are
    :data:`HEAD_STEP_INPUTS` and :data:`HEAD_STEP_OUTPUTS`. The scalars
    (``temperature``, ``alpha``, ``lr``) are 0-d float32 inputs.
    """
    if num_features <= 0 or num_classes <= 0:
        raise ValueError(
            f"num_features and num_classes must be positive, got {num_features}, {num_classes}"
        )
    return export_graph_onnx(
        HeadKDStep(),
        example_head_step_inputs(num_features, num_classes, batch_size=2),
        list(HEAD_STEP_INPUTS),
        list(HEAD_STEP_OUTPUTS),
        ("features", "labels", "teacher_logits"),
    )


def split_student(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Split a student into ``(feature_extractor, head)``.

    ``feature_extractor`` is ``Sequential(model.features, Flatten(1))`` and outputs the
    flattened ``[B, D]`` features the head sees; both parts share parameters with
    ``model`` (deep-copy before changing them). Raises ``TypeError`` when the model has
    no ``features`` module or its ``head`` is not a plain ``nn.Linear`` (e.g. a low-rank
    factorized head), which the closed-form step does not cover.
    """
    features = getattr(model, "features", None)
    head = getattr(model, "head", None)
    if not isinstance(features, nn.Module):
        raise TypeError(f"{type(model).__name__} has no 'features' module to freeze")
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"on-device head training needs an nn.Linear 'head', got {type(head).__name__}"
        )
    return nn.Sequential(features, nn.Flatten(1)), head


def export_feature_extractor_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """The frozen feature extractor of ``model`` as single-file ONNX, dynamic batch.

    ``input_shape`` excludes the batch axis (e.g. ``(1, 40)``). The input is named
    :data:`FEATURES_INPUT` and the ``[B, D]`` output :data:`FEATURES_OUTPUT`. ``model`` is
    not modified (the export works on a copy).
    """
    extractor, _ = split_student(copy.deepcopy(model))
    proto = onnx.load_from_string(export_onnx_bytes(extractor, input_shape))
    # export_onnx_bytes names its output "logits"; rename it to what it is.
    for node in proto.graph.node:
        node.output[:] = [FEATURES_OUTPUT if o == OUTPUT_NAME else o for o in node.output]
    for output in proto.graph.output:
        if output.name == OUTPUT_NAME:
            output.name = FEATURES_OUTPUT
    return proto.SerializeToString()
