"""Pruning: the cubic schedule, masks that keep the right weights and stay at zero
through training, and filter pruning that yields a smaller model onnxruntime can run."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgekd.deploy.onnx_export import INPUT_NAME, export_onnx_bytes
from edgekd.learn.models import build_model, count_params, spec_for
from edgekd.learn.pruning import (
    apply_masks,
    cubic_sparsity,
    lamp_scores,
    macs,
    magnitude_masks,
    mask_gradients,
    movement_masks,
    prunable_parameters,
    prune_filters,
    sparsity_of,
)


def test_prunable_parameters_are_the_conv_and_linear_weights() -> None:
    model = build_model(spec_for((1, 40), 10, 4))

    params = prunable_parameters(model)

    assert list(params) == [
        "features.0.weight",
        "features.2.weight",
        "features.4.weight",
        "head.weight",
    ]
    assert params["head.weight"] is model.head.weight


@pytest.mark.parametrize(
    ("round_", "expected"),
    [
        (0, 0.1),
        (2, 0.1),
        (4, 0.8 + (0.1 - 0.8) * 0.5**3),
        (5, 0.8 - 0.7 * 0.25**3),
        (6, 0.8),
        (9, 0.8),
    ],
)
def test_cubic_schedule_before_during_and_after(round_: int, expected: float) -> None:
    assert cubic_sparsity(round_, 2, 6, 0.8, initial_sparsity=0.1) == pytest.approx(expected)


def test_magnitude_masks_keep_the_largest_globally_and_per_layer() -> None:
    weights = {
        "a": torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.05, 0.4]]),
        "b": torch.tensor([1.0, -3.0]),
    }

    global_masks = magnitude_masks(weights, 0.5, scope="global")
    layer_masks = magnitude_masks(weights, 0.5, scope="layer")

    assert global_masks["a"].tolist() == [[False, True, False], [True, False, False]]
    assert global_masks["b"].tolist() == [True, True]
    assert layer_masks["a"].tolist() == [[False, True, False], [True, False, True]]
    assert layer_masks["b"].tolist() == [False, True]
    assert sparsity_of(global_masks) == pytest.approx(0.5)


def test_ties_prune_the_earlier_entries_first() -> None:
    weights = {"w": torch.ones(2, 3)}

    masks = magnitude_masks(weights, 0.5)

    assert masks["w"].tolist() == [[False, False, False], [True, True, True]]


def test_previous_masks_are_never_undone() -> None:
    weights = {"w": torch.tensor([10.0, 1.0, 2.0, 3.0])}
    previous = {"w": torch.tensor([False, True, True, True])}  # the largest is already pruned

    masks = magnitude_masks(weights, 0.5, previous_masks=previous)
    shrink = magnitude_masks(
        weights, 0.25, previous_masks={"w": torch.tensor([False, False, True, True])}
    )

    assert masks["w"].tolist() == [False, False, True, True]
    assert shrink["w"].tolist() == [False, False, True, True]  # lower target: stays at 0.5


def test_movement_prunes_the_weights_that_moved_least() -> None:
    initial = {"w": torch.tensor([1.0, -1.0, 0.5, 2.0])}
    weights = {"w": torch.tensor([1.01, 0.0, 0.5, 2.5])}  # moved 0.01, 1.0, 0.0, 0.5

    masks = movement_masks(weights, initial, 0.5)

    assert masks["w"].tolist() == [False, True, False, True]


@pytest.mark.parametrize("optimizer_name", ["sgd-momentum", "adam"])
def test_pruned_weights_stay_exactly_zero_through_training(optimizer_name: str) -> None:
    torch.manual_seed(0)
    model = build_model(spec_for((1, 40), 10, 8))
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    if optimizer_name == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), lr=0.05, weight_decay=0.01
        )
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # momentum / moments exist before pruning: the hard case
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    masks = magnitude_masks(prunable_parameters(model), 0.7)
    before = {k: v.detach().clone() for k, v in prunable_parameters(model).items()}

    with mask_gradients(model, masks, optimizer=optimizer):
        for _ in range(5):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    for name, weight in prunable_parameters(model).items():
        assert torch.count_nonzero(weight[~masks[name]]) == 0
        assert not torch.equal(weight[masks[name]], before[name][masks[name]])


def test_gradient_hook_alone_keeps_zeros_for_a_fresh_optimizer() -> None:
    torch.manual_seed(1)
    model = nn.Linear(8, 4)
    masks = magnitude_masks(prunable_parameters(model), 0.5)
    handle = mask_gradients(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 8)).pow(2).sum().backward()
        optimizer.step()
    handle.remove()

    assert torch.count_nonzero(model.weight[~masks["weight"]]) == 0


def test_apply_masks_zeroes_a_numpy_state() -> None:
    state = {"w": np.arange(1.0, 5.0, dtype=np.float32)}

    apply_masks(state, {"w": np.array([True, False, True, False])})

    assert state["w"].tolist() == [1.0, 0.0, 3.0, 0.0]


def test_macs_of_a_hand_counted_model() -> None:
    model = nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.Flatten(), nn.Linear(40, 3))

    # conv: 4 channels × 10 positions × (1 × 5 taps); linear: 3 × 40
    assert macs(model, (1, 10)) == 200 + 120


@pytest.mark.parametrize("shape", [(1, 40), (1, 8, 8), (3, 16, 16)])
def test_filter_pruning_shrinks_the_model_and_runs_in_onnxruntime(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(spec_for(shape, 10, 8)).eval()
    x = torch.randn(3, *shape)

    pruned = prune_filters(model, 0.5).eval()
    session = ort.InferenceSession(
        export_onnx_bytes(pruned, shape), providers=["CPUExecutionProvider"]
    )
    (onnx_out,) = session.run(None, {INPUT_NAME: x.numpy()})

    with torch.no_grad():
        out = pruned(x)
    assert count_params(pruned) < 0.5 * count_params(model)
    assert macs(pruned, shape) < 0.5 * macs(model, shape)
    assert out.shape == model(x).shape == (3, 10)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(onnx_out, out.numpy(), rtol=1e-4, atol=1e-5)
    assert count_params(model) == count_params(build_model(spec_for(shape, 10, 8)))  # untouched


def test_filter_pruning_removes_dead_filters_without_changing_the_output() -> None:
    # Filters 1, 3, 4 and 6 of every conv are zero (weight and bias): their channels
    # carry ReLU(0) = 0, so removing them, and the head columns they fed through the
    # flatten, must leave the logits unchanged.
    torch.manual_seed(0)
    model = build_model(spec_for((1, 40), 10, 8)).eval()
    with torch.no_grad():
        for module in model.features:
            if isinstance(module, nn.Conv1d):
                module.weight[[1, 3, 4, 6]] = 0.0
                module.bias[[1, 3, 4, 6]] = 0.0  # type: ignore[index]
    x = torch.randn(5, 1, 40)
    assert model.features(x)[:, [0, 2, 5, 7]].abs().sum() > 0  # the kept channels are alive

    pruned = prune_filters(model, 0.5)

    assert [m.out_channels for m in pruned.features if isinstance(m, nn.Conv1d)] == [4, 4, 4]
    assert pruned.head.in_features == 4 * 10
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)


def test_lamp_scores_on_a_hand_example_and_every_layer_keeps_its_largest() -> None:
    # Prepare: sorted squares 1, 4, 9 -> 1/14, 4/13, 9/9
    scores = torch.tensor([3.0, -1.0, 2.0])

    # Execute
    lamp = lamp_scores(scores.abs())
    masks = magnitude_masks(
        {"small": torch.full((50,), 0.01) * torch.arange(1, 51), "big": torch.arange(1.0, 51)},
        0.9,
        scope="lamp",
    )

    # Assert
    torch.testing.assert_close(lamp, torch.tensor([1.0, 1 / 14, 4 / 13], dtype=torch.float64))
    # Plain global ranking would empty "small"; LAMP keeps part of each layer.
    assert int(masks["small"].sum()) > 0 and int(masks["big"].sum()) > 0
    assert int(masks["small"].sum()) + int(masks["big"].sum()) == 10
