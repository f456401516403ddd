"""Knowledge-distillation losses and helpers, in plain torch.

Pure functions and small modules only; the Flower adapters in ``server/`` and
``client/`` call these and this module never imports ``flwr``.

Contents:

* :func:`soft_targets` and :func:`class_balanced_kd_loss` -- Hinton et al., "Distilling the
  Knowledge in a Neural Network" (2015), with optional per-sample weights.
* :func:`inverse_frequency_class_weights` and :func:`sample_weights_for` -- bounded,
  mean-one inverse-frequency class weights for non-IID local label histograms.
* :func:`temperature_for_batch` -- batch-size-dependent distillation temperature.
* :class:`HintLoss` -- FitNets hint loss, Romero et al., "FitNets: Hints for Thin Deep
  Nets" (ICLR 2015).
* :func:`gradient_norm_balance` -- weight between CE and a feature loss from the ratio of
  their gradient norms at the student feature.

How much "dark knowledge" a distribution carries is a score, not a loss: it lives with
the other numpy scores in `edgekd.fidelity.scores.dark_knowledge_entropy`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgekd.core.class_weights import inverse_frequency_class_weights as numpy_class_weights
from edgekd.core.round_settings import temperature_for_batch  # torch-free: devices use it

__all__ = [
    "HintLoss",
    "class_balanced_kd_loss",
    "gradient_norm_balance",
    "inverse_frequency_class_weights",
    "per_sample_kl",
    "sample_weights_for",
    "soft_targets",
    "temperature_for_batch",
]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def soft_targets(logits: Tensor, temperature: float) -> Tensor:
    """Softened class probabilities ``p = softmax(z / tau)`` over the last dimension.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), eq. 1.

    Args:
        logits: Logits ``z`` of shape ``[..., K]``.
        temperature: ``tau > 0``; larger values give a flatter distribution.

    Returns:
        Probabilities with the same shape as ``logits``.
    """
    _check_temperature(temperature)
    return F.softmax(logits / temperature, dim=-1)


def class_balanced_kd_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    sample_weights: Tensor | None = None,
    weight_ce: bool = False,
    trust_correct: bool = False,
) -> Tensor:
    """Hinton distillation loss with optional per-sample (e.g. class-balancing) weights.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (2015)::

        L = alpha * CE(z_s, y) + (1 - alpha) * tau^2 * KL(p_t || p_s),
        p_s = softmax(z_s / tau),
        KL(p_t || p_s) = sum_c p_t,c * (log p_t,c - log p_s,c).

    The ``tau^2`` factor keeps the KD gradient, ``tau * (p_s - p_t)`` per logit, on the same
    scale as the CE gradient when ``tau`` changes (Hinton et al., sec. 2).

    With per-sample weights ``w_i`` (shape ``[B]``) the batch loss is a *plain* mean over
    ``B`` of the weighted per-sample terms, not a weighted average (no division by
    ``sum_i w_i``)::

        L = alpha / B * sum_i v_i * CE_i + (1 - alpha) * tau^2 / B * sum_i w_i * KL_i,
        v_i = w_i if weight_ce else 1.

    A plain mean is deliberate: :func:`inverse_frequency_class_weights` already normalizes
    the weights to mean one over the local data, so the expected loss scale matches the
    unweighted loss, while a per-batch ``sum w_i`` normalizer would undo the re-weighting in
    batches dominated by one class.

    Args:
        student_logits: Student logits ``z_s``, shape ``[B, K]``.
        teacher_probs: Teacher probabilities ALREADY softened at ``temperature``, shape
            ``[B, K]``; exact zeros are allowed (``0 * log 0`` is taken as 0).
        labels: Hard labels, integer shape ``[B]``.
        temperature: Distillation temperature ``tau > 0``.
        alpha: Weight of the hard-label CE term, in ``[0, 1]``.
        sample_weights: Optional non-negative weights ``w``, shape ``[B]``.
        weight_ce: Also multiply the per-sample CE term by ``w``.
        trust_correct: Distil only where the teacher is right: a sample whose teacher
            top-1 is not its label gets ``alpha_i = 1`` (CE only), the others ``alpha``::

                L = 1/B * sum_i [a_i * v_i * CE_i + (1 - a_i) * tau^2 * w_i * KL_i],
                a_i = alpha if argmax p_t,i = y_i else 1.

            The device's label overrules a teacher that is wrong on its domain; the
            masking variant of Wen et al.'s knowledge adjustment ("Preparing Lessons:
            Improve Knowledge Distillation with Better Supervision", Neurocomputing
            2021). With every sample right it is the loss above.

    Returns:
        Scalar loss tensor.
    """
    _check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [B, K], got shape {tuple(student_logits.shape)}")
    if teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"teacher_probs shape {tuple(teacher_probs.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    batch = student_logits.shape[0]
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if sample_weights is not None and sample_weights.shape != (batch,):
        raise ValueError(
            f"sample_weights must have shape ({batch},), got {tuple(sample_weights.shape)}"
        )

    ce = F.cross_entropy(student_logits, labels, reduction="none")
    kl = per_sample_kl(student_logits, teacher_probs, temperature)

    if sample_weights is not None:
        w = sample_weights.to(dtype=kl.dtype, device=kl.device)
        kl = kl * w
        if weight_ce:
            ce = ce * w

    if trust_correct:
        right = teacher_probs.argmax(dim=1) == labels
        a = torch.where(right, alpha, 1.0).to(kl.dtype)
        return (a * ce).mean() + temperature**2 * ((1.0 - a) * kl).mean()
    return alpha * ce.mean() + (1.0 - alpha) * temperature**2 * kl.mean()


def per_sample_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """``KL(p_t,i || softmax(z_i / tau))`` for each row ``i``, shape ``[B]``: the KD term of
    `class_balanced_kd_loss` and of the continual regularizers (Hinton et al., 2015).
    ``teacher_probs`` are already softened at ``tau``; ``xlogy`` gives ``0 * log 0 = 0``,
    so one-hot or sparse teacher targets do not produce NaN."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    return (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_p_s).sum(dim=-1)


def inverse_frequency_class_weights(
    labels: np.ndarray | Tensor,
    num_classes: int,
    *,
    max_weight: float = 5.0,
) -> Tensor:
    """`edgekd.core.class_weights.inverse_frequency_class_weights` (the formula, the
    bound and its water-filling are documented there) as a float32 tensor ``[K]``; labels
    may be a numpy array or a tensor."""
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    weights = numpy_class_weights(y, num_classes, max_weight=max_weight)
    return torch.from_numpy(weights)


def sample_weights_for(labels: Tensor, class_weights: Tensor) -> Tensor:
    """Per-sample weights ``w_i = class_weights[y_i]``, on the device of ``labels``.

    Args:
        labels: Integer labels, shape ``[B]``.
        class_weights: Class weights, shape ``[K]`` (e.g. from
            :func:`inverse_frequency_class_weights`).

    Returns:
        Tensor of shape ``[B]`` with the dtype of ``class_weights``.
    """
    if class_weights.dim() != 1:
        raise ValueError(f"class_weights must be 1-D, got shape {tuple(class_weights.shape)}")
    return class_weights.to(labels.device)[labels.long()]


class HintLoss(nn.Module):
    """FitNets hint loss, Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

    A learned adapter ``r`` (the paper's regressor) maps the student's hint-layer feature to
    the teacher's channel count, then::

        L_hint = MSE(pool(r(f_s)), sg(f_t)),

    where ``sg`` is stop-gradient (the teacher is frozen) and ``pool`` is adaptive average
    pooling to the teacher's spatial size, applied only when the sizes differ. The adapter
    is a 1x1 ``Conv1d`` for ``[N, C, L]`` features (``ndim=1``), a 1x1 ``Conv2d`` for
    ``[N, C, H, W]`` features (``ndim=2``) and a ``Linear`` layer for flat ``[N, D]``
    features (``ndim=0``). Pooling after the adapter keeps the adapter a cheap per-position
    map instead of the paper's larger convolutional regressor, which matters on-device.
    """

    adapter: nn.Module

    def __init__(self, student_channels: int, teacher_channels: int, ndim: int) -> None:
        """Build the adapter.

        Args:
            student_channels: Channels (or width, for flat features) of the student feature.
            teacher_channels: Channels (or width) of the teacher feature.
            ndim: Number of spatial dimensions: 0 (flat), 1 or 2.
        """
        super().__init__()
        if student_channels <= 0 or teacher_channels <= 0:
            raise ValueError("student_channels and teacher_channels must be positive")
        if ndim == 0:
            self.adapter = nn.Linear(student_channels, teacher_channels)
        elif ndim == 1:
            self.adapter = nn.Conv1d(student_channels, teacher_channels, kernel_size=1)
        elif ndim == 2:
            self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        else:
            raise ValueError(f"ndim must be 0 (flat), 1 or 2, got {ndim}")
        self.ndim = ndim

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        """Return the scalar hint loss ``MSE(pool(adapter(f_s)), f_t.detach())``."""
        expected_dim = self.ndim + 2
        if student_feature.dim() != expected_dim or teacher_feature.dim() != expected_dim:
            raise ValueError(
                f"HintLoss(ndim={self.ndim}) expects {expected_dim}-D features, got student "
                f"{tuple(student_feature.shape)} and teacher {tuple(teacher_feature.shape)}"
            )
        if student_feature.shape[0] != teacher_feature.shape[0]:
            raise ValueError(
                f"batch sizes differ: student {student_feature.shape[0]}, "
                f"teacher {teacher_feature.shape[0]}"
            )
        adapted = self.adapter(student_feature)
        target_size = tuple(teacher_feature.shape[2:])
        if tuple(adapted.shape[2:]) != target_size:
            if self.ndim == 1:
                adapted = F.adaptive_avg_pool1d(adapted, target_size[0])
            else:
                adapted = F.adaptive_avg_pool2d(adapted, (target_size[0], target_size[1]))
        return F.mse_loss(adapted, teacher_feature.detach())


def gradient_norm_balance(
    ce_loss: Tensor,
    feature_loss: Tensor,
    student_feature: Tensor,
    eps: float = 1e-12,
) -> float:
    """CE weight from the gradient norms of both losses at the student feature.

    ::

        alpha = ||dCE/df|| / (||dCE/df|| + ||dL_feat/df||),

    With this ``alpha`` the combination ``alpha * L_feat + (1 - alpha) * CE`` gives both terms
    gradients of exactly equal norm at ``f`` (both equal
    ``||dCE/df|| * ||dL_feat/df|| / (||dCE/df|| + ||dL_feat/df||)``), in the spirit of
    GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
    Deep Multitask Networks", ICML 2018). The graph is retained, so the caller can still
    call ``backward()``; a loss that does not depend on ``f`` has gradient norm 0.

    Args:
        ce_loss: Scalar classification loss.
        feature_loss: Scalar feature (e.g. hint) loss.
        student_feature: The student feature tensor ``f`` both losses depend on.
        eps: Below this denominator both norms count as zero and 0.5 is returned.

    Returns:
        ``alpha`` as a python float in ``[0, 1]``.
    """
    norms: list[float] = []
    for loss in (ce_loss, feature_loss):
        (grad,) = torch.autograd.grad(loss, student_feature, retain_graph=True, allow_unused=True)
        norms.append(0.0 if grad is None else float(grad.detach().norm()))
    ce_norm, feat_norm = norms
    denominator = ce_norm + feat_norm
    if denominator <= eps:
        return 0.5
    return min(1.0, max(0.0, ce_norm / denominator))
