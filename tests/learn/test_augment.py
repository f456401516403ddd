"""Input augmentation: each transform does what its spec says, draws from its own
generator, and is refused with a message that names the bad item."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.core.config import ConfigError, parse_augment
from edgekd.learn.augment import Augment
from edgekd.learn.models import build_model, spec_for
from edgekd.learn.training import KDSettings, kd_train


def test_parse_augment_reads_items_and_off() -> None:
    assert parse_augment("") == {}
    assert parse_augment("shift:3, noise:0.1,scale:0.2") == {
        "shift": 3.0,
        "noise": 0.1,
        "scale": 0.2,
    }
    assert Augment.from_spec("") is None
    assert Augment.from_spec("shift:2") == Augment(shift=2)


@pytest.mark.parametrize("spec", ["shift:1.5", "scale:1", "noise:-1", "blur:2", "shift:1,shift:2"])
def test_parse_augment_refuses_bad_items_naming_them(spec: str) -> None:
    with pytest.raises(ConfigError, match="train.augment: cannot read"):
        parse_augment(spec)


def test_shift_rolls_each_signal_by_at_most_s_and_keeps_its_values() -> None:
    # Prepare: 64 impulses at position 20 of a length-40 signal
    x = torch.zeros(64, 1, 40)
    x[:, 0, 20] = 1.0
    # Execute
    out = Augment(shift=3)(x, torch.Generator().manual_seed(0))
    # Assert: one impulse each, moved by -3..3, every offset used, input untouched
    positions = out[:, 0].argmax(1)
    assert torch.equal(out.sum(2).squeeze(1), torch.ones(64))
    assert set((positions - 20).tolist()) == {-3, -2, -1, 0, 1, 2, 3}
    assert x[:, 0, 20].eq(1).all()


def test_shift_moves_images_on_both_axes() -> None:
    x = torch.zeros(200, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    out = Augment(shift=1)(x, torch.Generator().manual_seed(1))
    flat = out.view(200, -1).argmax(1)
    rows, cols = flat // 8 - 4, flat % 8 - 4
    assert set(rows.tolist()) == {-1, 0, 1} and set(cols.tolist()) == {-1, 0, 1}


def test_scale_and_noise_stay_in_their_bounds() -> None:
    x = torch.ones(500, 1, 40)
    scaled = Augment(scale=0.2)(x, torch.Generator().manual_seed(2))
    gains = scaled[:, 0, 0]
    assert gains.min() >= 0.8 and gains.max() <= 1.2 and gains.std() > 0.05
    assert torch.allclose(scaled, gains.view(-1, 1, 1).expand_as(scaled))  # one gain per sample
    noisy = Augment(noise=0.5)(x, torch.Generator().manual_seed(3))
    assert float((noisy - x).std()) == pytest.approx(0.5, rel=0.05)


def test_augmentation_is_seeded_and_changes_training_only_when_on() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 1, 40)).astype(np.float32)
    y = rng.integers(0, 10, 96).astype(np.int64)
    spec = spec_for((1, 40), 10, 4)

    def trained(augment: Augment | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(spec)
        settings = KDSettings(epochs=2, lr=0.01, batch_size=32, augment=augment)
        kd_train(model, x, y, None, settings, num_classes=10, seed=5)
        return [p.detach().clone() for p in model.parameters()]

    # Execute
    plain, again = trained(None), trained(None)
    augmented = trained(Augment(shift=2, noise=0.1))
    augmented_again = trained(Augment(shift=2, noise=0.1))
    # Assert
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(augmented, augmented_again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain, augmented, strict=True))
