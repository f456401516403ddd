"""The parts of `simulations/avalanche_anchors.py` that need no avalanche-lib: the
config it reads and the accuracy rows it scores (the anchors run in a venv of their own)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.continual.streams import class_incremental_stream


@pytest.fixture(scope="module")
def anchors() -> ModuleType:
    path = Path(__file__).parents[2] / "simulations" / "avalanche_anchors.py"
    spec = importlib.util.spec_from_file_location("avalanche_anchors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Fixed(nn.Module):
    """Scores every input with the same logits."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_the_config_takes_the_sets_and_the_seed(anchors: ModuleType) -> None:
    # Execute
    cfg = anchors._config(None, ["continual.rounds-per-task=4", "continual.weight=0.5"], 7)

    # Assert
    assert (cfg.seed, cfg.continual.rounds_per_task, cfg.continual.weight) == (7, 4, 0.5)


def test_rows_predict_among_the_seen_classes_only_when_asked(anchors: ModuleType) -> None:
    # Prepare: 4 classes in 2 tasks; the model always scores class 3 highest, then class 1
    y = np.repeat(np.arange(4), 5)
    x = np.zeros((len(y), 1, 8), dtype=np.float32)
    stream = class_incremental_stream(x, y, x, y, num_tasks=2, num_classes=4)
    model = _Fixed([0.0, 2.0, 1.0, 3.0])

    # Execute
    plain = anchors._row(model, stream, None)
    masked = anchors._row(model, stream, stream.classes_up_to(0))

    # Assert: plain argmax is class 3 (half of task 1); among {0, 1} it is class 1
    assert plain == [0.0, 0.5]
    assert masked == [0.5, 0.0]
