"""The students of the step-graph tests, one per family and compression shape.

Shared by ``test_train_step.py`` and ``tests/data/make_tflite_fixtures.py`` (which
converts their step graphs to TFLite): the graphs take the weights as inputs, so only
the architectures must agree, and they are built here once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgekd.learn.lowrank import factorize_linear
from edgekd.learn.models import ModelSpec, build_model, model_for_state

NUM_CLASSES = 10
TOL = 1e-5  # relative, in FP32


def _cnn1d(width: int = 8, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    return build_model(ModelSpec("cnn1d", 1, 40, NUM_CLASSES, width)), (1, 40)


def _cnn2d(seed: int = 0, size: int = 8) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    return build_model(ModelSpec("cnn2d", 1, size, NUM_CLASSES, 4)), (1, size, size)


def _filter_pruned() -> tuple[nn.Module, tuple[int, ...]]:
    """A CNN1d whose convolutions keep 5 and 3 of 8 filters (what filter pruning builds)."""
    model, shape = _cnn1d()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["features.0.weight"] = state["features.0.weight"][:5]
    state["features.0.bias"] = state["features.0.bias"][:5]
    state["features.2.weight"] = state["features.2.weight"][:3, :5]
    state["features.2.bias"] = state["features.2.bias"][:3]
    state["features.4.weight"] = state["features.4.weight"][:, :3]
    torch.manual_seed(1)
    return model_for_state(ModelSpec("cnn1d", 1, 40, NUM_CLASSES, 8), state), shape


def _low_rank() -> tuple[nn.Module, tuple[int, ...]]:
    """A CNN1d with its head and its middle convolution factorized (rank 4 and 3)."""
    model, shape = _cnn1d(width=8, seed=2)
    assert isinstance(model.head, nn.Linear)
    model.head = factorize_linear(model.head, 4)
    conv = model.features[2]
    model.features[2] = nn.Sequential(
        nn.Conv1d(8, 3, 3, stride=2, padding=1, bias=False), nn.Conv1d(3, 8, 1)
    )
    del conv
    return model, shape


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "cnn1d": _cnn1d,
    "cnn2d": _cnn2d,
    "cnn2d-odd": lambda: _cnn2d(size=9),
    "filter-pruned": _filter_pruned,
    "low-rank": _low_rank,
}


#: Static batch of the TFLite fixtures (``train_step_<family>_<optimizer>_b16.tflite``).
TFLITE_BATCH = 16


def tflite_fixture_name(family: str, optimizer: str) -> str:
    return f"train_step_{family}_{optimizer}_b{TFLITE_BATCH}.tflite"
