"""Device profiles: the shipped TOML files load, and a bad field is named with its file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgekd.deploy.profiles import ProfileError, list_profiles, load_profile, profile_from_dict

GOOD = """\
name = "lab-board"
description = "a test board"

[runtime]
backend = "onnxruntime"
execution_providers = ["CPUExecutionProvider"]
device = "cpu"
precision = "int8"
quantization = "static-qdq-per-channel"
threads = 2

[training]
mode = "head-only"
batch_size = 16

[parity]
max_abs_logit_diff_fp32 = 1e-4
max_top1_disagreement = 0.03
max_accuracy_drop = 0.01

[budget]
max_model_bytes = 100_000
max_memory_mb = 64
"""


def _write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_profiles_load_with_their_runtimes() -> None:
    # Execute
    names = list_profiles()
    profiles = {name: load_profile(name) for name in names}

    # Assert
    assert names == ["android", "jetson", "raspberry-pi"]
    pi, android, jetson = profiles["raspberry-pi"], profiles["android"], profiles["jetson"]
    assert (pi.backend, pi.precision, pi.threads) == ("onnxruntime", "int8", 4)
    assert pi.execution_providers == ("CPUExecutionProvider",)
    assert (android.backend, android.fallback_precision) == ("litert", "fp32")
    assert (jetson.backend, jetson.device, jetson.precision) == ("torch", "cuda", "fp16")
    assert jetson.alternative == "onnxruntime"
    for profile in profiles.values():
        assert profile.parity.max_abs_logit_diff_fp32 == pytest.approx(1e-4)
        assert profile.name == Path(profile.source).stem


def test_profile_round_trips_through_its_dict() -> None:
    profile = load_profile("android")

    again = profile_from_dict(profile.to_dict(), source="copy")

    assert again == dataclasses.replace(profile, source="copy")


def test_profile_loads_from_a_path(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, GOOD))

    assert profile.name == "lab-board"
    assert profile.training_batch_size == 16
    assert profile.budget.max_memory_mb == 64.0


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("threads = 2", "threads = 0", "board.toml: runtime.threads must be >= 1, got 0"),
        ('backend = "onnxruntime"', 'backend = "tensorrt"', "runtime.backend must be one of"),
        ("max_top1_disagreement = 0.03", "max_top1_disagreement = 2", "in [0, 1], got 2"),
        ("max_accuracy_drop = 0.01\n", "", "board.toml: parity.max_accuracy_drop is missing"),
        ("batch_size = 16", 'batch_size = "16"', "training.batch_size must be an integer"),
        ("threads = 2", "threads = 2\nthread = 4", "board.toml: unknown key runtime.thread"),
        ("[budget]", "[limits]", "table [budget] is missing"),
    ],
)
def test_malformed_profile_names_the_field_and_file(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    # Prepare
    path = _write(tmp_path, GOOD.replace(old, new))

    # Execute / Assert
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_profile(path)


def test_invalid_toml_and_unknown_names_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="board.toml: not valid TOML"):
        load_profile(_write(tmp_path, "name = "))
    with pytest.raises(ProfileError, match="unknown device profile 'toaster'.*raspberry-pi"):
        load_profile("toaster")
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(tmp_path / "absent.toml")
