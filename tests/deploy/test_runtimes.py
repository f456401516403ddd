"""Torch-free on-device head training: onnxruntime and LiteRT runtimes, the loop, weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.deploy import runtimes
from edgekd.deploy.head_step import (
    HEAD_STEP_INPUTS,
    HeadKDStep,
    export_feature_extractor_onnx,
    export_head_step_onnx,
    split_student,
)
from edgekd.deploy.runtimes import (
    LiteRTRuntime,
    OrtRuntime,
    inverse_frequency_class_weights,
    local_head_kd,
)
from edgekd.learn import kd
from edgekd.learn.models import load_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data"
FEATURES_TFLITE = DATA / "features_w8_b32.tflite"
HEAD_TFLITE = DATA / "head_step_d80_c10_b32.tflite"
NUM_CLASSES, BATCH = 10, 32


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    model, _ = load_checkpoint(str(DATA / "student_w8.pt"))
    folder = tmp_path_factory.mktemp("onnx")
    features, step = folder / "features.onnx", folder / "head_step.onnx"
    features.write_bytes(export_feature_extractor_onnx(model, (1, 40)))
    _, head = split_student(model)
    step.write_bytes(export_head_step_onnx(head.in_features, head.out_features))
    return str(features), str(step)


@pytest.fixture(scope="module")
def ort_runtime(onnx_files: tuple[str, str]) -> OrtRuntime:
    return OrtRuntime(*onnx_files)


@pytest.fixture(scope="module")
def litert_runtime() -> LiteRTRuntime:
    pytest.importorskip("ai_edge_litert.interpreter")
    return LiteRTRuntime(str(FEATURES_TFLITE), str(HEAD_TFLITE))


@pytest.fixture(scope="module")
def student_head() -> tuple[np.ndarray, np.ndarray]:
    model, _ = load_checkpoint(str(DATA / "student_w8.pt"))
    _, head = split_student(model)
    return head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()


def _local_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Learnable, imbalanced local data: class prototypes plus noise, and teacher logits."""
    prototypes = 2.0 * np.random.default_rng(123).standard_normal((NUM_CLASSES, 1, 40))
    rng = np.random.default_rng(seed)
    y = rng.choice(NUM_CLASSES, size=n, p=np.linspace(1, 10, NUM_CLASSES) / 55).astype(np.int64)
    x = (prototypes[y] + 0.5 * rng.standard_normal((n, 1, 40))).astype(np.float32)
    teacher = (3.0 * rng.standard_normal((n, NUM_CLASSES))).astype(np.float32)
    teacher[np.arange(n), y] += 4.0  # a teacher that mostly agrees with the labels
    return x, y, teacher


def test_step_input_names_are_the_exporters() -> None:
    assert runtimes.HEAD_STEP_INPUTS is HEAD_STEP_INPUTS  # one definition (records.py)


@pytest.mark.parametrize("max_weight", [1.0, 2.0, 5.0, math.inf])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_devices_class_weights_are_the_trainings(max_weight: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.choice(NUM_CLASSES - 2, size=200, p=rng.dirichlet(np.full(NUM_CLASSES - 2, 0.3)))
    got = inverse_frequency_class_weights(labels, NUM_CLASSES, max_weight=max_weight)
    want = kd.inverse_frequency_class_weights(labels, NUM_CLASSES, max_weight=max_weight)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.numpy())


def test_ort_step_equals_the_torch_step(
    ort_runtime: OrtRuntime, student_head: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    x, y, teacher = _local_data(BATCH, seed=0)
    features = ort_runtime.features(x)
    weights = inverse_frequency_class_weights(y, NUM_CLASSES)
    # Execute
    got = ort_runtime.head_step(features, y, teacher, *student_head, weights, 4.0, 0.8, 0.1)
    # Assert
    want = HeadKDStep()(
        *(torch.from_numpy(a) for a in (features, y, teacher, *student_head, weights)),
        torch.tensor(4.0),
        torch.tensor(0.8),
        torch.tensor(0.1),
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5)


def test_litert_features_equal_the_onnx_features(
    ort_runtime: OrtRuntime, litert_runtime: LiteRTRuntime
) -> None:
    x, _, _ = _local_data(70, seed=1)  # two full static batches and a padded one
    np.testing.assert_allclose(litert_runtime.features(x), ort_runtime.features(x), atol=1e-5)


@pytest.mark.parametrize("rows", [1, 13, 32])
def test_litert_padded_step_equals_the_unpadded_onnx_step(
    ort_runtime: OrtRuntime,
    litert_runtime: LiteRTRuntime,
    student_head: tuple[np.ndarray, np.ndarray],
    rows: int,
) -> None:
    # Prepare: a short last batch that LiteRT must pad to its static 32 rows.
    x, y, teacher = _local_data(rows, seed=rows)
    features = ort_runtime.features(x)
    weights = inverse_frequency_class_weights(np.arange(NUM_CLASSES).repeat(3)[:25], NUM_CLASSES)
    args = (features, y, teacher, *student_head, weights, 2.0, 0.5, 0.2)
    # Execute
    lite = litert_runtime.head_step(*args)
    onnx = ort_runtime.head_step(*args)
    # Assert
    np.testing.assert_allclose(lite[0], onnx[0], atol=1e-5)
    np.testing.assert_allclose(lite[1], onnx[1], atol=1e-5)
    assert lite[2] == pytest.approx(onnx[2], abs=1e-5)


def test_litert_rejects_a_batch_over_its_static_size(
    litert_runtime: LiteRTRuntime, student_head: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y, teacher = _local_data(BATCH + 1, seed=0)
    features = np.zeros((BATCH + 1, 80), dtype=np.float32)
    with pytest.raises(ValueError, match="static batch"):
        litert_runtime.head_step(
            features, y, teacher, *student_head, np.ones(NUM_CLASSES), 2.0, 0.5, 0.1
        )


@pytest.mark.parametrize("runtime_name", ["ort_runtime", "litert_runtime"])
def test_ten_steps_lower_the_kd_loss(
    runtime_name: str, request: pytest.FixtureRequest, student_head: tuple[np.ndarray, np.ndarray]
) -> None:
    runtime = request.getfixturevalue(runtime_name)
    x, y, teacher = _local_data(BATCH, seed=3)
    features = runtime.features(x)
    weight, bias = student_head
    weights = inverse_frequency_class_weights(y, NUM_CLASSES)
    losses = []
    for _ in range(11):  # the 11th call reports the loss after ten steps
        weight, bias, loss = runtime.head_step(
            features, y, teacher, weight, bias, weights, 4.0, 0.8, 0.5
        )
        losses.append(loss)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))  # every step lowers it
    assert losses[-1] < 0.9 * losses[0]


def test_local_head_kd_is_the_same_on_both_runtimes(
    ort_runtime: OrtRuntime,
    litert_runtime: LiteRTRuntime,
    student_head: tuple[np.ndarray, np.ndarray],
) -> None:
    # Prepare: 100 examples at batch 32 leave a last batch of 4 for LiteRT to pad.
    x, y, teacher = _local_data(100, seed=4)
    settings = dict(
        epochs=3,
        batch_size=BATCH,
        lr=0.2,
        temperature=4.0,
        alpha=0.8,
        class_weights=inverse_frequency_class_weights(y, NUM_CLASSES),
        seed=5,
    )
    # Execute
    w_ort, b_ort, m_ort = local_head_kd(ort_runtime, x, y, teacher, *student_head, **settings)  # type: ignore[arg-type]
    w_lite, b_lite, m_lite = local_head_kd(  # type: ignore[arg-type]
        litert_runtime, x, y, teacher, *student_head, **settings
    )
    # Assert
    assert m_ort["steps"] == 12 and m_ort["num-examples"] == 100
    np.testing.assert_allclose(w_lite, w_ort, atol=1e-4)
    np.testing.assert_allclose(b_lite, b_ort, atol=1e-4)
    assert m_lite["loss"] == pytest.approx(m_ort["loss"], abs=1e-4)
    assert m_lite["accuracy"] == m_ort["accuracy"]


def test_local_head_kd_learns(
    ort_runtime: OrtRuntime, student_head: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y, teacher = _local_data(200, seed=6)
    kwargs = dict(batch_size=16, lr=0.2, temperature=4.0, alpha=0.8, seed=0)
    _, _, first = local_head_kd(ort_runtime, x, y, teacher, *student_head, epochs=1, **kwargs)  # type: ignore[arg-type]
    _, _, later = local_head_kd(ort_runtime, x, y, teacher, *student_head, epochs=8, **kwargs)  # type: ignore[arg-type]
    assert later["loss"] < first["loss"]
    assert later["accuracy"] > first["accuracy"]


def test_local_head_kd_does_not_mutate_the_inputs(
    ort_runtime: OrtRuntime, student_head: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y, teacher = _local_data(40, seed=7)
    weight, bias = (a.copy() for a in student_head)
    local_head_kd(
        ort_runtime,
        x,
        y,
        teacher,
        weight,
        bias,
        epochs=1,
        batch_size=8,
        lr=0.5,
        temperature=2.0,
        alpha=0.5,
    )
    np.testing.assert_array_equal(weight, student_head[0])
    np.testing.assert_array_equal(bias, student_head[1])


_TORCH_FREE_SCRIPT = """
import json, sys
sys.modules["torch"] = None
import numpy as np
from edgekd.deploy.runtimes import (
    LiteRTRuntime, OrtRuntime, inverse_frequency_class_weights, local_head_kd,
)
features_onnx, step_onnx, features_tflite, head_tflite = sys.argv[1:5]
rng = np.random.default_rng(0)
x = rng.standard_normal((50, 1, 40)).astype(np.float32)
y = rng.integers(0, 10, 50)
teacher = rng.standard_normal((50, 10)).astype(np.float32)
weight = 0.1 * rng.standard_normal((10, 80)).astype(np.float32)
bias = np.zeros(10, dtype=np.float32)
cw = inverse_frequency_class_weights(y, 10)
result = {}
for name, runtime in [
    ("ort", OrtRuntime(features_onnx, step_onnx)),
    ("litert", LiteRTRuntime(features_tflite, head_tflite)),
]:
    _, _, metrics = local_head_kd(
        runtime, x, y, teacher, weight, bias, epochs=2, batch_size=32, lr=0.1,
        temperature=4.0, alpha=0.8, class_weights=cw, seed=0,
    )
    result[name] = metrics
print(json.dumps(result))
"""


def test_runtimes_train_without_torch(onnx_files: tuple[str, str]) -> None:
    pytest.importorskip("ai_edge_litert.interpreter")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _TORCH_FREE_SCRIPT,
            *onnx_files,
            str(FEATURES_TFLITE),
            str(HEAD_TFLITE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["ort"]["steps"] == 4
    assert metrics["ort"]["loss"] == pytest.approx(metrics["litert"]["loss"], abs=1e-4)
