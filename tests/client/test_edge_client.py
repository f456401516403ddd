"""The device side of a bundle: local data files, and the torch trainer's CUDA/FP16 path
(skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.client.edge_client import EdgeDataError, read_device_data


def test_device_data_is_split_into_train_and_a_validation_tail(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((50, 1, 40), dtype=np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(50) % 10)
    train, val = read_device_data(tmp_path, (1, 40), 10)
    assert (len(train), len(val)) == (45, 5)
    np.testing.assert_array_equal(val.x, x[45:])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (None, "no local data"),
        ({"x": np.zeros((4, 1, 39), np.float32), "y": np.zeros(4)}, "expected x"),
        ({"x": np.zeros((4, 1, 40), np.float32), "y": np.full(4, 10)}, "labels must be"),
        ({"x": np.zeros((4, 1, 40), np.float32)}, "unreadable"),
    ],
)
def test_bad_device_data_is_named(tmp_path: Path, arrays: dict | None, message: str) -> None:
    if arrays is not None:
        np.savez(tmp_path / "train.npz", **arrays)
    with pytest.raises(EdgeDataError, match=message) as err:
        read_device_data(tmp_path, (1, 40), 10)
    assert "train.npz" in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a Jetson profile)")
def test_kd_train_on_cuda_with_fp16_autocast_learns_and_returns_to_the_host() -> None:
    from edgekd.common.models import build_model, spec_for
    from edgekd.common.training import KDSettings, kd_train

    torch.manual_seed(0)
    model = build_model(spec_for((1, 40), 10, 8))
    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 40), dtype=np.float32)
    y = (x[:, 0, :10].argmax(1)).astype(np.int64)  # a learnable rule
    settings = KDSettings(epochs=1, lr=1e-2, batch_size=32, device="cuda", fp16=True)
    first = kd_train(model, x, y, None, settings, num_classes=10, seed=0)["loss"]
    later = kd_train(model, x, y, None, settings, num_classes=10, seed=1)["loss"]
    assert later < first
    assert next(model.parameters()).device.type == "cpu"
