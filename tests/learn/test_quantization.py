"""Ternary weights and their straight-through gradient; INT8 QAT and weight conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from edgekd.learn.models import build_model, spec_for
from edgekd.learn.quantization import (
    QATConv1d,
    QATLinear,
    TernaryWeight,
    convert_weights_int8,
    dequantize_int8,
    prepare_qat,
    ternarize,
    ternary_weight,
)


def test_ternary_weights_take_exactly_three_values() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3)
    delta = 0.05 * w.abs().max()

    t = ternarize(w, q_t=0.05)

    a = w.abs()[w.abs() > delta].mean()
    assert sorted(t.unique().tolist()) == pytest.approx([-float(a), 0.0, float(a)])
    assert torch.equal(t == 0, w.abs() <= delta)
    assert torch.equal(torch.sign(t[t != 0]), torch.sign(w[t != 0]))


def test_ternary_threshold_on_a_hand_example() -> None:
    w = torch.tensor([-2.0, -0.5, 0.05, 0.1, 1.0])  # Δ = 0.05·2 = 0.1: 0.05 and 0.1 → 0

    t = ternarize(w)

    a = (2.0 + 0.5 + 1.0) / 3
    assert t.tolist() == pytest.approx([-a, -a, 0.0, 0.0, a])


def test_ste_passes_the_gradient_inside_the_clip_and_blocks_it_outside() -> None:
    w = torch.tensor([-2.0, -1.0, -0.5, 0.01, 0.5, 1.0, 1.5], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])

    ternary_weight(w, q_t=0.05, clip=1.0).backward(upstream)

    # unchanged where |w| ≤ 1 (boundary included, zeroed weights too), 0 where |w| > 1
    assert w.grad is not None
    assert w.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


def test_ternary_parametrization_trains_through_the_ste() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    parametrize.register_parametrization(layer, "weight", TernaryWeight())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    latent_before = layer.parametrizations.weight.original.detach().clone()

    layer(torch.randn(4, 6)).sum().backward()
    optimizer.step()

    assert layer.weight.unique().numel() <= 3
    assert not torch.equal(layer.parametrizations.weight.original, latent_before)


def test_qat_model_trains_a_step_and_converts_to_int8_within_half_a_step() -> None:
    torch.manual_seed(0)
    model = build_model(spec_for((1, 40), 10, 8))
    x, y = torch.randn(32, 1, 40), torch.randint(0, 10, (32,))
    qat = prepare_qat(model)
    optimizer = torch.optim.Adam(qat.parameters(), lr=0.01)
    before = qat.head.weight.detach().clone()

    loss = nn.functional.cross_entropy(qat(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    int8 = convert_weights_int8(qat)

    assert isinstance(qat.features[0], QATConv1d) and isinstance(qat.head, QATLinear)
    assert type(model.head) is nn.Linear  # the caller's model is untouched
    assert torch.isfinite(loss)
    assert not torch.equal(qat.head.weight, before)
    assert list(int8) == [
        "features.0.weight",
        "features.2.weight",
        "features.4.weight",
        "head.weight",
    ]
    for name, (q, scales) in int8.items():
        weight = qat.get_parameter(name).detach().numpy()
        assert q.dtype == np.int8 and q.shape == weight.shape and scales.shape == (weight.shape[0],)
        assert np.abs(q).max() == 127  # symmetric range, the largest weight of a channel hits it
        err = np.abs(dequantize_int8(q, scales) - weight)
        assert np.all(err <= scales.reshape((-1,) + (1,) * (q.ndim - 1)) / 2 + 1e-7)


def test_qat_forward_uses_fake_quantized_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    qat = prepare_qat(nn.Sequential(layer))[0]
    x = torch.rand(3, 5)  # in [0, 1): the activation grid has step 1/255

    out = qat(x)

    assert not torch.equal(out, layer(x))
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0.05)
