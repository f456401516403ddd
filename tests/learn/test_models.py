"""Model families: size ratio, feature hooks, checkpoints that refuse another architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgekd.core.config import ModelConfig
from edgekd.learn.models import (
    CheckpointError,
    build_model,
    capture_features,
    count_params,
    load_checkpoint,
    save_checkpoint,
    spec_for,
)


def test_default_student_is_at_most_a_fifth_of_the_teacher() -> None:
    m = ModelConfig()
    teacher = build_model(spec_for((1, 40), 10, m.teacher_width))
    student = build_model(spec_for((1, 40), 10, m.student_width))
    assert count_params(student) <= count_params(teacher) / 5


@pytest.mark.parametrize(
    ("shape", "feature_dims"), [((1, 40), 3), ((1, 8, 8), 4), ((3, 32, 32), 4)]
)
def test_forward_and_feature_hook(shape: tuple[int, ...], feature_dims: int) -> None:
    model = build_model(spec_for(shape, 10, 4))
    with capture_features(model) as feats:
        logits = model(torch.zeros(2, *shape))
    assert logits.shape == (2, 10)
    assert feats["features"].dim() == feature_dims
    assert feats["features"].shape[0] == 2


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    spec = spec_for((1, 40), 10, 4)
    model = build_model(spec)
    save_checkpoint(model, spec, str(tmp_path / "m.pt"))
    loaded, loaded_spec = load_checkpoint(str(tmp_path / "m.pt"), expected=spec)
    assert loaded_spec == spec
    x = torch.randn(3, 1, 40)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    image_spec = spec_for((1, 8, 8), 10, 4)
    save_checkpoint(build_model(image_spec), image_spec, str(tmp_path / "img.pt"))
    with pytest.raises(CheckpointError, match="another architecture: family='cnn2d'"):
        load_checkpoint(str(tmp_path / "img.pt"), expected=spec_for((1, 40), 10, 4))


def test_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pt"))
