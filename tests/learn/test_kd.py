"""Tests for edgekd.learn.kd against hand computations and closed-form gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.learn.kd import (
    HintLoss,
    class_balanced_kd_loss,
    gradient_norm_balance,
    inverse_frequency_class_weights,
    per_sample_kl,
    sample_weights_for,
    soft_targets,
    temperature_for_batch,
)


def _hand_kl(teacher_probs: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample KL(p_t || p_s) with 0 * log 0 = 0, written out term by term."""
    log_p_s = torch.log(torch.softmax(student_logits / tau, dim=1))
    rows = []
    for p_row, log_s_row in zip(teacher_probs, log_p_s, strict=True):
        total = torch.zeros((), dtype=student_logits.dtype)
        for p, log_s in zip(p_row, log_s_row, strict=True):
            if p > 0:
                total = total + p * (torch.log(p) - log_s)
        rows.append(total)
    return torch.stack(rows)


# --- soft_targets ----------------------------------------------------------------------------


def test_soft_targets_matches_exp_over_sum() -> None:
    # Prepare
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    tau = 2.0
    # Execute
    probs = soft_targets(logits, tau)
    # Assert
    expected = torch.exp(logits / tau) / torch.exp(logits / tau).sum()
    torch.testing.assert_close(probs, expected)


def test_soft_targets_rejects_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        soft_targets(torch.zeros(1, 3), 0.0)


# --- class_balanced_kd_loss ------------------------------------------------------------------


def test_kd_loss_matches_hand_computation() -> None:
    # Prepare
    torch.manual_seed(0)
    student = torch.randn(6, 5, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(6, 5, dtype=torch.float64) / 3.0, dim=1)
    labels = torch.randint(0, 5, (6,))
    tau, alpha = 3.0, 0.4
    # Execute
    loss = class_balanced_kd_loss(student, teacher, labels, temperature=tau, alpha=alpha)
    # Assert
    expected = (
        alpha * F.cross_entropy(student, labels)
        + (1 - alpha) * tau**2 * _hand_kl(teacher, student, tau).mean()
    )
    torch.testing.assert_close(loss, expected)


def test_kd_loss_alpha_one_is_cross_entropy() -> None:
    # Prepare
    torch.manual_seed(0)
    student = torch.randn(4, 3)
    teacher = torch.softmax(torch.randn(4, 3), dim=1)
    labels = torch.tensor([0, 2, 1, 2])
    # Execute
    loss = class_balanced_kd_loss(student, teacher, labels, temperature=4.0, alpha=1.0)
    # Assert
    torch.testing.assert_close(loss, F.cross_entropy(student, labels))


def test_kd_loss_is_finite_and_exact_with_zero_teacher_probs() -> None:
    # Prepare
    torch.manual_seed(0)
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.3, 0.5]], dtype=torch.float64
    )
    labels = torch.tensor([0, 1, 3])
    # Execute
    loss = class_balanced_kd_loss(student, teacher, labels, temperature=2.0, alpha=0.0)
    loss.backward()
    # Assert
    assert student.grad is not None
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss, 4.0 * _hand_kl(teacher, student.detach(), 2.0).mean())


def test_kd_loss_gradient_matches_closed_form() -> None:
    # Prepare: d/dz [a CE + (1-a) tau^2 KL] / B = [a (softmax(z) - y) + (1-a) tau (p_s - p_t)] / B
    torch.manual_seed(0)
    batch, classes, tau, alpha = 5, 4, 2.5, 0.3
    student = torch.randn(batch, classes, dtype=torch.float64, requires_grad=True)
    teacher = torch.softmax(torch.randn(batch, classes, dtype=torch.float64) / tau, dim=1)
    labels = torch.randint(0, classes, (batch,))
    # Execute
    loss = class_balanced_kd_loss(student, teacher, labels, temperature=tau, alpha=alpha)
    loss.backward()
    # Assert
    z = student.detach()
    onehot = F.one_hot(labels, classes).to(torch.float64)
    p_s = torch.softmax(z / tau, dim=1)
    expected = (
        alpha * (torch.softmax(z, dim=1) - onehot) + (1 - alpha) * tau * (p_s - teacher)
    ) / batch
    torch.testing.assert_close(student.grad, expected)


def test_kd_loss_sample_weights_plain_mean_of_weighted_terms() -> None:
    # Prepare
    torch.manual_seed(0)
    student = torch.randn(4, 3, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(4, 3, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 2, 1])
    weights = torch.tensor([0.5, 2.0, 1.0, 0.0], dtype=torch.float64)
    tau, alpha = 2.0, 0.25
    ce = F.cross_entropy(student, labels, reduction="none")
    kl = _hand_kl(teacher, student, tau)
    # Execute
    kd_only = class_balanced_kd_loss(
        student, teacher, labels, temperature=tau, alpha=alpha, sample_weights=weights
    )
    both = class_balanced_kd_loss(
        student,
        teacher,
        labels,
        temperature=tau,
        alpha=alpha,
        sample_weights=weights,
        weight_ce=True,
    )
    # Assert: divided by B = 4, not by sum(w) = 3.5
    torch.testing.assert_close(
        kd_only, alpha * ce.sum() / 4 + (1 - alpha) * tau**2 * (weights * kl).sum() / 4
    )
    torch.testing.assert_close(
        both, alpha * (weights * ce).sum() / 4 + (1 - alpha) * tau**2 * (weights * kl).sum() / 4
    )


def test_kd_loss_unit_weights_equal_unweighted() -> None:
    # Prepare
    torch.manual_seed(0)
    student = torch.randn(4, 3)
    teacher = torch.softmax(torch.randn(4, 3), dim=1)
    labels = torch.tensor([0, 1, 2, 1])
    # Execute
    weighted = class_balanced_kd_loss(
        student,
        teacher,
        labels,
        temperature=2.0,
        alpha=0.5,
        sample_weights=torch.ones(4),
        weight_ce=True,
    )
    plain = class_balanced_kd_loss(student, teacher, labels, temperature=2.0, alpha=0.5)
    # Assert
    torch.testing.assert_close(weighted, plain)


@pytest.mark.parametrize(
    ("alpha", "shape", "match"),
    [(1.5, (2, 3), "alpha"), (0.5, (3, 3), "teacher_probs shape")],
)
def test_kd_loss_rejects_bad_inputs(alpha: float, shape: tuple[int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        class_balanced_kd_loss(
            torch.zeros(2, 3),
            torch.full(shape, 1 / 3),
            torch.zeros(2, dtype=torch.long),
            temperature=1.0,
            alpha=alpha,
        )


# --- class weights ---------------------------------------------------------------------------


def test_class_weights_ten_to_one_clipped_and_mean_one() -> None:
    # Prepare: raw weights are (11/2)/10 = 0.55 and (11/2)/1 = 5.5
    labels = np.array([0] * 10 + [1])
    # Execute
    unbounded = inverse_frequency_class_weights(labels, 2, max_weight=math.inf)
    bounded = inverse_frequency_class_weights(labels, 2, max_weight=5.0)
    # Assert: class 1 clipped to 5, class 0 rescaled so 10 * w0 + 5 = 11
    torch.testing.assert_close(unbounded, torch.tensor([0.55, 5.5]))
    torch.testing.assert_close(bounded, torch.tensor([0.6, 5.0]))
    assert bounded.dtype == torch.float32
    mean_weight = sample_weights_for(torch.as_tensor(labels), bounded).double().mean()
    assert mean_weight.item() == pytest.approx(1.0, abs=1e-6)


def test_class_weights_dirichlet_like_histogram_respects_bound() -> None:
    # Prepare: the kind of skew Dirichlet(0.1) produces, with two absent classes
    counts = np.array([500, 3, 40, 0, 7, 1, 0])
    labels = np.repeat(np.arange(len(counts)), counts)
    # Execute
    weights = inverse_frequency_class_weights(labels, len(counts), max_weight=5.0).double()
    # Assert
    w = weights.numpy()
    assert w.max() <= 5.0 + 1e-6
    assert (counts * w).sum() == pytest.approx(counts.sum(), rel=1e-6)
    assert w[3] == 0.0 and w[6] == 0.0
    present = counts > 0
    order = np.argsort(counts[present])
    assert np.all(np.diff(w[present][order]) <= 1e-6), "rarer classes must not weigh less"
    # Raw inverse frequency for class 5 would be (551/5)/1 = 110.2; only the bound tames it.
    assert w[5] == pytest.approx(5.0)


def test_class_weights_balanced_data_are_all_one_and_tensor_input_accepted() -> None:
    # Prepare
    labels = torch.arange(4).repeat(5)
    # Execute
    weights = inverse_frequency_class_weights(labels, 4)
    # Assert
    torch.testing.assert_close(weights, torch.ones(4))


@pytest.mark.parametrize(
    ("labels", "max_weight", "match"),
    [([0, 1], 0.5, "max_weight"), ([0, 3], 5.0, "labels must lie"), ([], 5.0, "empty")],
)
def test_class_weights_reject_bad_inputs(labels: list[int], max_weight: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        inverse_frequency_class_weights(np.array(labels, dtype=np.int64), 3, max_weight=max_weight)


def test_sample_weights_for_indexes_class_weights() -> None:
    # Prepare
    class_weights = torch.tensor([0.5, 2.0, 0.0])
    labels = torch.tensor([1, 0, 1, 2])
    # Execute
    weights = sample_weights_for(labels, class_weights)
    # Assert
    torch.testing.assert_close(weights, torch.tensor([2.0, 0.5, 2.0, 0.0]))


# --- temperature_for_batch -------------------------------------------------------------------


def test_temperature_for_batch_fourth_root_rule() -> None:
    assert temperature_for_batch(4, 64, 4) == pytest.approx(4 * 16**0.25)
    assert temperature_for_batch(4, 64, 4) == pytest.approx(8.0)
    assert temperature_for_batch(3.0, 32, 32) == pytest.approx(3.0)


@pytest.mark.parametrize(("t0", "b0", "batch"), [(0.0, 64, 4), (4.0, 0, 4), (4.0, 64, -1)])
def test_temperature_for_batch_rejects_non_positive(t0: float, b0: int, batch: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        temperature_for_batch(t0, b0, batch)


# --- HintLoss --------------------------------------------------------------------------------


def _make_identity(adapter: nn.Module, channels: int) -> None:
    with torch.no_grad():
        assert isinstance(adapter, nn.Linear | nn.Conv1d | nn.Conv2d)
        eye = torch.eye(channels)
        adapter.weight.copy_(eye.reshape(adapter.weight.shape))
        assert adapter.bias is not None
        adapter.bias.zero_()


@pytest.mark.parametrize(("ndim", "shape"), [(0, (3, 4)), (1, (3, 4, 7)), (2, (3, 4, 5, 5))])
def test_hint_loss_zero_for_identity_adapter_and_equal_features(
    ndim: int, shape: tuple[int, ...]
) -> None:
    # Prepare
    torch.manual_seed(0)
    hint = HintLoss(4, 4, ndim)
    _make_identity(hint.adapter, 4)
    feature = torch.randn(shape)
    # Execute
    loss = hint(feature, feature.clone())
    # Assert
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_hint_loss_2d_pools_adapted_student_to_teacher_size() -> None:
    # Prepare
    torch.manual_seed(0)
    hint = HintLoss(3, 5, ndim=2)
    student = torch.randn(2, 3, 8, 8)
    teacher = torch.randn(2, 5, 4, 4, requires_grad=True)
    # Execute
    loss = hint(student, teacher)
    loss.backward()
    # Assert
    assert isinstance(hint.adapter, nn.Conv2d)
    adapted = F.conv2d(student, hint.adapter.weight, hint.adapter.bias)
    expected = ((F.avg_pool2d(adapted, 2) - teacher) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    assert teacher.grad is None, "teacher feature must be detached"
    assert hint.adapter.weight.grad is not None


def test_hint_loss_1d_pools_adapted_student_to_teacher_length() -> None:
    # Prepare
    torch.manual_seed(0)
    hint = HintLoss(3, 4, ndim=1)
    student = torch.randn(2, 3, 10)
    teacher = torch.randn(2, 4, 5)
    # Execute
    loss = hint(student, teacher)
    # Assert
    assert isinstance(hint.adapter, nn.Conv1d)
    adapted = F.conv1d(student, hint.adapter.weight, hint.adapter.bias)
    expected = ((F.avg_pool1d(adapted, 2) - teacher) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_hint_loss_rejects_bad_ndim_and_shapes() -> None:
    with pytest.raises(ValueError, match="ndim"):
        HintLoss(3, 4, ndim=3)
    with pytest.raises(ValueError, match="4-D"):
        HintLoss(3, 4, ndim=2)(torch.zeros(2, 3), torch.zeros(2, 4))


# --- gradient_norm_balance -------------------------------------------------------------------


def test_gradient_norm_balance_matches_hand_norms_and_keeps_graph() -> None:
    # Prepare: f = W x, CE-like term a . f (grad a), feature term ||f - t||^2 (grad 2 (f - t))
    torch.manual_seed(0)
    weight = torch.randn(3, 2, requires_grad=True)
    x = torch.randn(2)
    feature = weight @ x
    a = torch.tensor([3.0, 0.0, 4.0])
    target = torch.randn(3)
    ce_loss = (a * feature).sum()
    feature_loss = ((feature - target) ** 2).sum()
    # Execute
    alpha = gradient_norm_balance(ce_loss, feature_loss, feature)
    # Assert
    feat_norm = (2 * (feature.detach() - target)).norm().item()
    assert alpha == pytest.approx(5.0 / (5.0 + feat_norm))
    (ce_loss + feature_loss).backward()  # graph retained for the caller
    assert weight.grad is not None


def test_gradient_norm_balance_zero_and_unused_gradients() -> None:
    # Prepare
    feature = torch.randn(4, requires_grad=True)
    other = torch.randn(4, requires_grad=True)
    zero_loss = (feature * 0.0).sum()
    ce_loss = feature.sum()
    unrelated = (other**2).sum()
    # Execute / Assert
    assert gradient_norm_balance(zero_loss, zero_loss, feature) == 0.5
    assert gradient_norm_balance(ce_loss, unrelated, feature) == 1.0
    assert gradient_norm_balance(unrelated, ce_loss, feature) == 0.0


def test_trust_correct_distils_only_where_the_teacher_is_right() -> None:
    # Prepare: sample 0 the teacher gets right (top-1 = label 0), sample 1 wrong
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]])
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 2])
    tau, alpha = 2.0, 0.3
    # Execute
    loss = class_balanced_kd_loss(
        logits, teacher, labels, temperature=tau, alpha=alpha, trust_correct=True
    )
    # Assert: sample 0 is the Hinton mix, sample 1 plain CE
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    kl = per_sample_kl(logits, teacher, tau)
    expected = ((alpha * ce[0] + (1 - alpha) * tau**2 * kl[0]) + ce[1]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    plain = class_balanced_kd_loss(logits, teacher, labels, temperature=tau, alpha=alpha)
    assert plain.item() != pytest.approx(loss.item(), rel=1e-3)
    # a teacher right on every sample gives the ordinary loss
    right = torch.tensor([0, 0])
    assert class_balanced_kd_loss(
        logits, teacher, right, temperature=tau, alpha=alpha, trust_correct=True
    ).item() == pytest.approx(
        class_balanced_kd_loss(logits, teacher, right, temperature=tau, alpha=alpha).item(),
        rel=1e-6,
    )
