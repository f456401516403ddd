"""The torch-free local update through the step graph (`edgekd.client.graph_trainer`):
the round's modes, its refusals, and train.augment in numpy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edgekd.client.graph_trainer import augment_batch, graph_kd_update
from edgekd.core.data import ArrayDataset
from edgekd.core.round_settings import RoundSettings
from edgekd.deploy.step_runtime import OrtStepRuntime
from edgekd.deploy.train_step import export_infer_onnx, export_train_step_onnx, layout_for
from edgekd.learn.models import ModelSpec, build_model

SETTINGS = RoundSettings(
    mode="kd", local_epochs=2, lr=0.01, optimizer="adam", batch_size=16, clip_norm=2.0,
    temperature=4.0, alpha=0.5, class_weighting=True, max_class_weight=5.0,
    reference_batch=16, seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> tuple[OrtStepRuntime, dict]:
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn1d", 1, 40, 10, 4))
    layout = layout_for(model, (1, 40), 10, "adam")
    runtime = OrtStepRuntime(
        export_train_step_onnx(model, layout), export_infer_onnx(model, layout), layout
    )
    return runtime, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _data(n: int = 48) -> ArrayDataset:
    rng = np.random.default_rng(1)
    return ArrayDataset(rng.normal(size=(n, 1, 40)).astype(np.float32), rng.integers(0, 10, n))


@pytest.mark.parametrize("mode", ["on-device", "proxy", "ce"])
def test_every_mode_trains_every_tensor(student, mode: str) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    runtime, state = student
    train = _data()
    rng = np.random.default_rng(2)
    teacher = rng.normal(size=(len(train), 10)).astype(np.float32) if mode == "on-device" else None
    proxy = (
        (rng.normal(size=(32, 1, 40)).astype(np.float32), rng.normal(size=(32, 10)))
        if mode == "proxy"
        else None
    )
    settings = replace(SETTINGS, mode="ce" if mode == "ce" else "kd")
    # Execute
    new_state, metrics = graph_kd_update(
        runtime, state, train, settings, teacher_logits=teacher, proxy=proxy
    )
    # Assert
    assert list(new_state) == list(state)
    assert all(not np.allclose(new_state[k], state[k]) for k in state)
    assert np.isfinite(metrics["train-loss"]) and metrics["temperature"] == 4.0


def test_a_round_with_another_optimizer_is_refused_naming_both(student) -> None:  # type: ignore[no-untyped-def]
    runtime, state = student
    with pytest.raises(ValueError, match="trains with sgd, the step graph implements adam"):
        graph_kd_update(
            runtime, state, _data(), replace(SETTINGS, optimizer="sgd"),
            teacher_logits=np.zeros((48, 10), np.float32),
        )  # fmt: skip


def test_numpy_augmentation_rolls_scales_and_adds_noise_per_sample() -> None:
    # Prepare
    x = np.arange(2 * 1 * 8, dtype=np.float32).reshape(2, 1, 8)
    # Execute / Assert: a shift alone is a circular roll of each sample, by at most 2
    shifted = augment_batch("shift:2")(x, np.random.default_rng(0))  # type: ignore[misc]
    for row, out in zip(x, shifted, strict=True):
        assert any(np.array_equal(np.roll(row, k, axis=-1), out) for k in range(-2, 3))
    scaled = augment_batch("scale:0.5")(x, np.random.default_rng(0))  # type: ignore[misc]
    gains = scaled[:, 0, 1:] / x[:, 0, 1:]
    assert np.allclose(gains, gains[:, :1]) and np.all((gains >= 0.5) & (gains <= 1.5))
    noisy = augment_batch("noise:0.1")(x, np.random.default_rng(0))  # type: ignore[misc]
    assert 0.05 < float(np.std(noisy - x)) < 0.2 and noisy.dtype == np.float32
    assert augment_batch("") is None
