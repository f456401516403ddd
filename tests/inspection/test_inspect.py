"""Tests for the student fidelity report (edgekd.inspection) and its torch probes.

Tiny untrained CNNs on 1000 mnist1d samples per domain: the numbers are checked for
consistency with independent computations, not for being good.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.core.config import DataConfig
from edgekd.core.data import load_federated_data
from edgekd.core.metrics import classification_metrics
from edgekd.core.numerics import softmax
from edgekd.deploy.onnx_export import export_onnx_bytes
from edgekd.fidelity.attacks import (
    fgsm_accuracy,
    head_features,
    layer_sensitivity,
    parameterised_layers,
    pgd_accuracy,
)
from edgekd.fidelity.scores import certified_radius, l1_certificate
from edgekd.inspection import ModelFileError, run_inspect
from edgekd.learn.models import build_model, save_checkpoint, spec_for
from edgekd.learn.training import predict_logits

DATA = DataConfig(num_samples=1000)
SEED = 3
BOOTSTRAP = 200


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """teacher.pt (width 8), student.pt and student.onnx (width 4), compressed.pt."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("models")
    data = load_federated_data(DATA, SEED)
    files: dict[str, Path] = {}
    for name, width, seed in (("teacher", 8, 0), ("student", 4, 1)):
        torch.manual_seed(seed)
        spec = spec_for(data.input_shape, data.num_classes, width)
        model = build_model(spec)
        files[name] = folder / f"{name}.pt"
        save_checkpoint(model, spec, str(files[name]))
        if name == "student":
            files["onnx"] = folder / "student.onnx"
            files["onnx"].write_bytes(export_onnx_bytes(model, data.input_shape))
            # A stand-in for a compressed student: weights rounded to 2 significant bits.
            with torch.no_grad():
                for p in model.parameters():
                    scale = p.abs().max()
                    p.copy_(torch.round(p / scale * 2) / 2 * scale)
            files["compressed"] = folder / "compressed.pt"
            save_checkpoint(model, spec, str(files["compressed"]))
    return files


@pytest.fixture(scope="module")
def torch_report(
    model_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("report-torch")
    report = run_inspect(
        str(model_files["teacher"]),
        str(model_files["student"]),
        dataset_cfg=DATA,
        seed=SEED,
        out_dir=out,
        bootstrap=BOOTSTRAP,
        calibrate=True,
        compressed_path=str(model_files["compressed"]),
    )
    return report, out


def _numbers(block: Any, prefix: str = "") -> dict[str, float]:
    """Flatten the numeric leaves of a report block into ``{"a.b.0": value}``."""
    if isinstance(block, dict):
        out: dict[str, float] = {}
        for key, value in block.items():
            out.update(_numbers(value, f"{prefix}{key}."))
        return out
    if isinstance(block, list):
        out = {}
        for index, value in enumerate(block):
            out.update(_numbers(value, f"{prefix}{index}."))
        return out
    if isinstance(block, bool | int | float):
        return {prefix.rstrip("."): float(block)}
    return {}


# ------------------------------------------------------------------ the report
def test_report_files_and_numbers_match_direct_computation(
    torch_report: tuple[dict[str, Any], Path], model_files: dict[str, Path]
) -> None:
    # Prepare: score the student directly, without the report's code path
    report, out = torch_report
    data = load_federated_data(DATA, SEED)
    from edgekd.learn.models import load_checkpoint

    student, _ = load_checkpoint(str(model_files["student"]))
    direct = classification_metrics(
        softmax(predict_logits(student, data.test.x)), data.test.y, data.num_classes
    )
    # Assert
    for name in ("fidelity.json", "fidelity.md", "certified_accuracy.png"):
        assert (out / name).stat().st_size > 0
    for role in ("teacher", "student", "teacher_calibrated", "student_calibrated"):
        assert (out / f"reliability_{role}.png").stat().st_size > 0
    assert report["student"]["accuracy"] == pytest.approx(direct["accuracy"])
    assert report["student"]["nll"] == pytest.approx(direct["nll"], abs=1e-5)
    assert report["data"]["test_size"] == len(data.test.y) == 200
    assert report["student"]["bootstrap"]["nll"]["point"] == pytest.approx(report["student"]["nll"])
    assert report["student"]["calibrated"]["temperature"] > 0
    markdown = (out / "fidelity.md").read_text()
    assert "| top1 retention |" in markdown
    assert "Median certified radius of the correctly classified" in markdown


def test_report_robustness_blocks_for_torch_models(
    torch_report: tuple[dict[str, Any], Path],
) -> None:
    # Prepare
    report, _ = torch_report
    # Execute
    robustness = report["student"]["robustness"]
    certificate = robustness["certificate"]
    # Assert: certified accuracy starts at (tie-strict) accuracy and never increases
    assert [row["eps_fraction_of_std"] for row in robustness["adversarial"]] == [0.05, 0.1, 0.2]
    assert certificate["certified_accuracy"][0] <= report["student"]["accuracy"] + 1e-12
    curve = certificate["certified_accuracy"]
    assert all(a >= b for a, b in itertools.pairwise(curve))
    layers = report["layer_sensitivity"]["layers"]
    assert [row["layer"] for row in layers] != []
    assert sorted(row["layer"] for row in layers) == [
        "features.0",
        "features.2",
        "features.4",
        "head",
    ]
    deltas = [abs(row["delta"]) for row in layers]
    assert deltas == sorted(deltas, reverse=True)


def test_onnx_student_gives_the_same_fidelity_numbers(
    torch_report: tuple[dict[str, Any], Path],
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    # Prepare
    torch_result, _ = torch_report
    # Execute
    onnx_result = run_inspect(
        str(model_files["teacher"]),
        str(model_files["onnx"]),
        dataset_cfg=DATA,
        seed=SEED,
        out_dir=tmp_path,
        bootstrap=BOOTSTRAP,
        calibrate=True,
    )
    # Assert: every number outside robustness agrees within 1e-4
    for section in ("student", "fidelity"):
        a = {k: v for k, v in _numbers(torch_result[section]).items() if "robustness" not in k}
        b = {k: v for k, v in _numbers(onnx_result[section]).items() if "robustness" not in k}
        assert a.keys() == b.keys()
        for key in a:
            if math.isnan(a[key]):
                assert math.isnan(b[key]), key
            else:
                assert b[key] == pytest.approx(a[key], abs=1e-4), key
    assert onnx_result["student"]["format"] == "onnx"
    assert onnx_result["student"]["robustness"]["adversarial"].startswith("not available")
    assert "not available" in (tmp_path / "fidelity.md").read_text()
    assert not (tmp_path / "reliability_missing.png").exists()


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_corrupt_student_file_gives_one_line_error_naming_it(
    model_files: dict[str, Path], tmp_path: Path, suffix: str
) -> None:
    # Prepare
    bad = tmp_path / f"broken{suffix}"
    bad.write_bytes(b"\x00not a model\n" * 10)
    # Execute
    with pytest.raises(ModelFileError) as info:
        run_inspect(
            str(model_files["teacher"]),
            str(bad),
            dataset_cfg=DATA,
            seed=SEED,
            out_dir=tmp_path / "out",
            bootstrap=BOOTSTRAP,
        )
    # Assert
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert str(bad) in message
    assert not (tmp_path / "out" / "fidelity.json").exists()


def test_checkpoint_with_foreign_pickle_gives_one_line_error(
    model_files: dict[str, Path], tmp_path: Path
) -> None:
    # Prepare: torch's weights-only loader refuses it with a multi-line, coloured message
    bad = tmp_path / "foreign.pt"
    torch.save({"spec": Path("x"), "state_dict": {}}, bad)
    # Execute
    with pytest.raises(ModelFileError) as info:
        run_inspect(
            str(model_files["teacher"]), str(bad), dataset_cfg=DATA, seed=SEED, out_dir=tmp_path
        )
    # Assert
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert str(bad) in message


def test_missing_student_file_is_named(model_files: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(ModelFileError, match="nowhere.onnx"):
        run_inspect(
            str(model_files["teacher"]), str(missing), dataset_cfg=DATA, seed=SEED, out_dir=tmp_path
        )


FIXTURES = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None, reason="needs ai-edge-litert (dev extra)"
)
def test_tflite_student_matches_its_torch_source() -> None:
    # student_w8.tflite was converted from student_w8.pt by litert-torch (tests/data/README.md).
    from edgekd.inspection import load_model

    x = np.random.default_rng(0).normal(size=(37, 1, 40)).astype(np.float32)
    torch_model = load_model(FIXTURES / "student_w8.pt", (1, 40), 10)
    tflite_model = load_model(FIXTURES / "student_w8.tflite", (1, 40), 10)
    assert tflite_model.format == "tflite"
    np.testing.assert_allclose(tflite_model.predict(x), torch_model.predict(x), atol=1e-4)


def test_tflite_student_without_runtime_says_what_to_install(
    model_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both interpreters unimportable, as on a host with neither installed.
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    student = tmp_path / "student.tflite"
    student.write_bytes(b"TFL3")
    with pytest.raises(ImportError, match="pip install ai-edge-litert"):
        run_inspect(
            str(model_files["teacher"]), str(student), dataset_cfg=DATA, seed=SEED, out_dir=tmp_path
        )


# ------------------------------------------------------------------ torch probes
def _linear_binary_model(seed: int) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2))
    x = torch.randn(400, 1, 6).numpy()
    with torch.no_grad():
        y = (model(torch.from_numpy(x)) + 0.5 * torch.randn(400, 2)).argmax(dim=1).numpy()
    return model, x, y


def test_fgsm_and_pgd_are_exact_on_a_binary_linear_model() -> None:
    # Prepare: for K = 2 and a linear model the sign of the CE gradient is -sign(w_y - w_j),
    # the exact worst case, so the attacks' accuracy equals the certified share
    model, x, y = _linear_binary_model(0)
    linear = model[1]
    W, b = linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()
    eps = 0.1
    # Execute
    fgsm = fgsm_accuracy(model, x, y, eps)
    pgd = pgd_accuracy(model, x, y, eps, steps=10, seed=0)
    # Assert
    certified = l1_certificate(x.reshape(len(x), -1), y, W, b, eps).mean()
    assert fgsm == pytest.approx(certified, abs=1 / len(y))
    assert pgd == pytest.approx(certified, abs=1 / len(y))
    assert fgsm < fgsm_accuracy(model, x, y, 0.0)


def test_pgd_is_seeded_and_no_weaker_than_fgsm_on_a_cnn() -> None:
    # Prepare
    torch.manual_seed(1)
    model = build_model(spec_for((1, 40), 10, width=4))
    x = torch.randn(300, 1, 40).numpy()
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(dim=1).numpy()  # clean accuracy 1.0
    eps = 0.3
    # Execute
    first = pgd_accuracy(model, x, y, eps, seed=5)
    again = pgd_accuracy(model, x, y, eps, seed=5)
    fgsm = fgsm_accuracy(model, x, y, eps)
    # Assert
    assert first == again
    assert first <= fgsm < 1.0
    assert all(p.grad is None for p in model.parameters())


def test_head_features_reproduce_the_logits() -> None:
    # Prepare
    torch.manual_seed(2)
    model = build_model(spec_for((1, 40), 10, width=4))
    x = torch.randn(50, 1, 40).numpy()
    # Execute
    f, W, b = head_features(model, x)
    # Assert
    np.testing.assert_allclose(f @ W.T + b, predict_logits(model, x), atol=1e-5)
    assert f.shape == (50, 4 * 10)
    assert (certified_radius(f, model(torch.from_numpy(x)).argmax(1).numpy(), W, b) > 0).all()


def test_layer_sensitivity_finds_the_damaged_layer() -> None:
    # Prepare: a "compressed" copy whose last layer is zeroed: all logits tie, argmax is
    # class 0, so on samples of class 1 its FGSM accuracy is 0; the first layer is unchanged
    torch.manual_seed(3)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    compressed = copy.deepcopy(reference)
    with torch.no_grad():
        compressed[3].weight.zero_()
        compressed[3].bias.zero_()
        x = torch.randn(400, 1, 6)
        x = x[reference(x).argmax(dim=1) == 1].numpy()
    y = np.ones(len(x), dtype=np.int64)
    # Execute
    rows = layer_sensitivity(reference, compressed, x, y, 0.01)
    # Assert
    assert len(x) > 50
    assert parameterised_layers(reference) == ["1", "3"]
    assert [row["layer"] for row in rows] == ["3", "1"]
    assert rows[0]["fgsm_accuracy"] == 0.0
    assert float(rows[0]["delta"]) < -0.5
    assert rows[1]["delta"] == 0.0
    assert layer_sensitivity(reference, None, x, y, 0.01) == []


def test_a_factorized_head_is_certified_as_one_linear_map() -> None:
    # Prepare: the low-rank recipe splits the head into two Linears
    from edgekd.learn.lowrank import factorize_model

    torch.manual_seed(4)
    model, _ = factorize_model(build_model(spec_for((1, 40), 10, width=4)), rank=3)
    x = torch.randn(20, 1, 40).numpy()

    # Execute
    f, W, b = head_features(model, x)

    # Assert
    assert isinstance(model.head, nn.Sequential)
    np.testing.assert_allclose(f @ W.T + b, predict_logits(model, x), atol=1e-5)
