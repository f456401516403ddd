"""Low-rank factorization: exact at full rank, the energy rule on a hand example, and
truncation error equal to the discarded spectrum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.learn.lowrank import (
    factorize_conv,
    factorize_linear,
    factorize_model,
    rank_for_energy,
)
from edgekd.learn.models import build_model, count_params, spec_for


def test_full_rank_svd_reproduces_the_linear_layer() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    x = torch.randn(5, 12)

    factored = factorize_linear(layer, 7)

    assert [tuple(m.weight.shape) for m in factored] == [(7, 12), (7, 7)]
    assert factored[0].bias is None
    torch.testing.assert_close(factored(x), layer(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("energy", "rank"), [(0.6, 1), (0.9, 2), (13 / 14, 2), (0.95, 3), (1.0, 3)]
)
def test_energy_rank_on_a_hand_example(energy: float, rank: int) -> None:
    # σ = (3, 2, 1): cumulative σ² = 9, 13, 14 of 14 → 0.643, 0.929, 1.0
    assert rank_for_energy(np.array([3.0, 2.0, 1.0]), energy) == rank


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 6, 5, stride=2, padding=2),
        nn.Conv2d(4, 5, 3, padding=1),
    ],
)
def test_full_rank_factorized_conv_matches(conv: nn.Conv1d | nn.Conv2d) -> None:
    torch.manual_seed(0)
    conv.reset_parameters()
    full = min(conv.out_channels, conv.weight[0].numel())
    x = torch.randn(2, conv.in_channels, *([9] * (conv.weight.dim() - 2)))

    factored = factorize_conv(conv, full)

    assert factored[1].kernel_size == (1,) * (conv.weight.dim() - 2)
    torch.testing.assert_close(factored(x), conv(x), rtol=0, atol=1e-5)


def test_truncation_error_is_the_discarded_energy() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(20, 10)
    sigma = torch.linalg.svdvals(layer.weight.detach().double())

    factored = factorize_linear(layer, 4)
    product = (factored[1].weight @ factored[0].weight).detach().double()

    error = torch.linalg.matrix_norm(product - layer.weight.detach().double()) ** 2
    assert float(error) == pytest.approx(float((sigma[4:] ** 2).sum()), rel=1e-4)


def test_factorize_model_reports_and_only_replaces_where_it_saves() -> None:
    torch.manual_seed(0)
    model = build_model(spec_for((1, 40), 10, 16))
    x = torch.randn(3, 1, 40)

    small, report = factorize_model(model, rank=4)

    # head 160→10: 4·(160+10)+10 = 690 < 1610; first conv (16, 5): 4·21+16 = 100 > 96
    assert report["head"] == {
        "rank": 4,
        "full_rank": 10,
        "energy": pytest.approx(report["head"]["energy"]),
        "params_before": 1610,
        "params_after": 690,
        "factorized": True,
    }
    assert report["features.0"]["factorized"] is False
    assert report["features.2"]["factorized"] is True  # (16, 48) at rank 4: 256+16 < 784
    assert count_params(small) == sum(r["params_after"] for r in report.values())
    assert count_params(small) < count_params(model)
    assert small(x).shape == (3, 10)
    assert isinstance(model.head, nn.Linear)  # the caller's model is untouched


def test_factorize_model_by_energy_at_one_is_exact() -> None:
    torch.manual_seed(0)
    model = build_model(spec_for((1, 8, 8), 10, 4))
    x = torch.randn(2, 1, 8, 8)

    same, report = factorize_model(model, energy=1.0, min_params_saving=False, layers=["head"])

    assert list(report) == ["head"]
    assert report["head"]["rank"] == report["head"]["full_rank"] == 8
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=1e-5)


def test_factorize_model_needs_exactly_one_rule() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        factorize_model(model)
    with pytest.raises(ValueError, match="exactly one"):
        factorize_model(model, rank=2, energy=0.9)
