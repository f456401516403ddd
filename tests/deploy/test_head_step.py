"""The closed-form head KD step (torch, ONNX, TFLite) against torch autograd."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgekd.deploy.head_step import (
    FEATURES_OUTPUT,
    HEAD_STEP_INPUTS,
    HEAD_STEP_OUTPUTS,
    HeadKDStep,
    export_feature_extractor_onnx,
    export_head_step_onnx,
    split_student,
)
from edgekd.learn.kd import class_balanced_kd_loss, sample_weights_for, soft_targets
from edgekd.learn.models import load_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data"
STUDENT = DATA / "student_w8.pt"
FEATURES_TFLITE = DATA / "features_w8_b32.tflite"
HEAD_TFLITE = DATA / "head_step_d80_c10_b32.tflite"
NUM_FEATURES, NUM_CLASSES, BATCH = 80, 10, 32
CASES = [(1.0, 0.5), (4.0, 0.8), (2.5, 0.0), (3.0, 1.0), (0.7, 0.3)]
TOL = 1e-5


def _problem(seed: int, batch: int = BATCH) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, NUM_FEATURES, generator=gen).abs()  # post-ReLU-like
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    teacher_logits = 3.0 * torch.randn(batch, NUM_CLASSES, generator=gen)
    weight = 0.1 * torch.randn(NUM_CLASSES, NUM_FEATURES, generator=gen)
    bias = 0.1 * torch.randn(NUM_CLASSES, generator=gen)
    class_weights = 0.2 + 3.0 * torch.rand(NUM_CLASSES, generator=gen)  # far from uniform
    return features, labels, teacher_logits, weight, bias, class_weights


def _args(problem: tuple[torch.Tensor, ...], tau: float, alpha: float, lr: float) -> tuple:
    return (*problem, torch.tensor(tau), torch.tensor(alpha), torch.tensor(lr))


def _autograd_step(
    problem: tuple[torch.Tensor, ...], tau: float, alpha: float, lr: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGD step on edgekd's loss exactly as the client calls it (weight_ce default)."""
    features, labels, teacher_logits, weight, bias, class_weights = problem
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    loss = class_balanced_kd_loss(
        features @ w.t() + b,
        soft_targets(teacher_logits, tau),
        labels,
        temperature=tau,
        alpha=alpha,
        sample_weights=sample_weights_for(labels, class_weights),
    )
    loss.backward()
    assert w.grad is not None and b.grad is not None
    return (w - lr * w.grad).detach(), (b - lr * b.grad).detach(), loss.detach()


def _max_diff(got: tuple, want: tuple) -> float:
    return max(
        float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(got, want, strict=True)
    )


@pytest.mark.parametrize(("tau", "alpha"), CASES)
def test_torch_step_equals_autograd(tau: float, alpha: float) -> None:
    # Prepare
    problem = _problem(seed=int(tau * 10) + int(alpha * 100))
    # Execute
    got = HeadKDStep()(*_args(problem, tau, alpha, lr=0.5))
    # Assert
    assert _max_diff(got, _autograd_step(problem, tau, alpha, lr=0.5)) < TOL


def test_torch_step_accepts_one_element_scalars() -> None:
    problem = _problem(seed=1)
    scalars = (torch.tensor([2.0]), torch.tensor([0.4]), torch.tensor([0.3]))
    got = HeadKDStep()(*problem, *scalars)
    assert got[2].shape == ()
    assert _max_diff(got, _autograd_step(problem, 2.0, 0.4, 0.3)) < TOL


def test_padded_rows_change_nothing() -> None:
    # Prepare: 20 real rows, then 12 rows of garbage marked with label -1.
    problem = _problem(seed=7, batch=20)
    pad = _problem(seed=8, batch=12)
    padded = [torch.cat([problem[i], pad[i]]) for i in range(3)]
    padded[1][20:] = -1
    # Execute
    got = HeadKDStep()(
        *padded, *problem[3:], torch.tensor(2.0), torch.tensor(0.6), torch.tensor(0.3)
    )
    # Assert
    assert _max_diff(got, _autograd_step(problem, 2.0, 0.6, 0.3)) < TOL


@pytest.fixture(scope="module")
def onnx_step() -> ort.InferenceSession:
    return ort.InferenceSession(export_head_step_onnx(NUM_FEATURES, NUM_CLASSES))


def test_onnx_step_names(onnx_step: ort.InferenceSession) -> None:
    assert tuple(i.name for i in onnx_step.get_inputs()) == HEAD_STEP_INPUTS
    assert tuple(o.name for o in onnx_step.get_outputs()) == HEAD_STEP_OUTPUTS


@pytest.mark.parametrize(("tau", "alpha"), CASES)
@pytest.mark.parametrize("batch", [1, 32, 77])  # the batch axis is dynamic
def test_onnx_step_equals_autograd(
    onnx_step: ort.InferenceSession, tau: float, alpha: float, batch: int
) -> None:
    problem = _problem(seed=batch, batch=batch)
    feeds = {
        n: a.numpy() for n, a in zip(HEAD_STEP_INPUTS, _args(problem, tau, alpha, 0.5), strict=True)
    }
    got = onnx_step.run(None, feeds)
    assert _max_diff(got, _autograd_step(problem, tau, alpha, lr=0.5)) < TOL


def _ten_steps(step: object, problem: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """Losses before the first and after the tenth step on one batch (tau=4, alpha=0.5)."""
    features, labels, teacher_logits, weight, bias, class_weights = (t.numpy() for t in problem)
    losses = []
    for _ in range(11):
        weight, bias, loss = step(  # type: ignore[operator]
            features, labels, teacher_logits, weight, bias, class_weights, 4.0, 0.5, 0.05
        )
        losses.append(float(loss))
    return losses[0], losses[-1]


def test_onnx_ten_steps_lower_the_loss(onnx_step: ort.InferenceSession) -> None:
    def step(*values: object) -> list[np.ndarray]:
        arrays = [
            np.asarray(v, dtype=np.int64 if i == 1 else np.float32) for i, v in enumerate(values)
        ]
        return onnx_step.run(None, dict(zip(HEAD_STEP_INPUTS, arrays, strict=True)))

    before, after = _ten_steps(step, _problem(seed=11))
    assert after < 0.9 * before


def _tflite_runner(signature: str):  # type: ignore[no-untyped-def]
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    return interpreter_module.Interpreter(model_path=str(HEAD_TFLITE)).get_signature_runner(
        signature
    )


def _run_tflite_train(runner, values: list) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    details = runner.get_input_details()
    feeds = {
        f"args_{i}": np.asarray(v, dtype=details[f"args_{i}"]["dtype"])
        for i, v in enumerate(values)
    }
    out = runner(**feeds)
    return [out[f"output_{i}"] for i in range(len(out))]


@pytest.mark.parametrize(("tau", "alpha"), CASES)
def test_tflite_train_signature_equals_autograd(tau: float, alpha: float) -> None:
    runner = _tflite_runner("train")
    problem = _problem(seed=3)
    got = _run_tflite_train(runner, [a.numpy() for a in _args(problem, tau, alpha, 0.5)])
    assert _max_diff(got, _autograd_step(problem, tau, alpha, lr=0.5)) < TOL


def test_tflite_ten_steps_lower_the_loss() -> None:
    runner = _tflite_runner("train")
    before, after = _ten_steps(lambda *v: _run_tflite_train(runner, list(v)), _problem(seed=11))
    assert after < 0.9 * before


def test_tflite_infer_signature_is_the_head() -> None:
    runner = _tflite_runner("infer")
    features, _, _, weight, bias, _ = _problem(seed=5)
    out = runner(args_0=features.numpy(), args_1=weight.numpy(), args_2=bias.numpy())
    np.testing.assert_allclose(out["output_0"], (features @ weight.t() + bias).numpy(), atol=TOL)


def test_split_student_reproduces_the_model() -> None:
    model, _ = load_checkpoint(str(STUDENT))
    extractor, head = split_student(model)
    x = torch.randn(5, 1, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = extractor(x)
        assert features.shape == (5, head.in_features)
        torch.testing.assert_close(head(features), model(x))


def test_split_student_rejects_a_non_linear_head() -> None:
    model, _ = load_checkpoint(str(STUDENT))
    model.head = torch.nn.Sequential(model.head)
    with pytest.raises(TypeError, match="nn.Linear"):
        split_student(model)


def test_feature_extractor_onnx_matches_torch() -> None:
    # Prepare
    model, _ = load_checkpoint(str(STUDENT))
    x = torch.randn(7, 1, 40, generator=torch.Generator().manual_seed(1))
    # Execute
    session = ort.InferenceSession(export_feature_extractor_onnx(model, (1, 40)))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    # Assert
    assert session.get_outputs()[0].name == FEATURES_OUTPUT
    with torch.no_grad():
        np.testing.assert_allclose(got, split_student(model)[0](x).numpy(), atol=1e-5)


def test_feature_tflite_fixture_matches_the_student() -> None:
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    model, _ = load_checkpoint(str(STUDENT))
    assert model.head.in_features == NUM_FEATURES  # the fixture names match the student
    runner = interpreter_module.Interpreter(model_path=str(FEATURES_TFLITE)).get_signature_runner(
        "features"
    )
    x = torch.randn(BATCH, 1, 40, generator=torch.Generator().manual_seed(2))
    got = runner(args_0=x.numpy())["output_0"]
    with torch.no_grad():
        np.testing.assert_allclose(got, split_student(model)[0](x).numpy(), atol=1e-5)


def test_tflite_export_names_the_extra_when_litert_torch_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgekd.deploy import tflite_export

    monkeypatch.setitem(sys.modules, "litert_torch", None)
    with pytest.raises(ImportError, match=r"pip install 'edgekd\[litert\]'"):
        tflite_export.export_head_step_tflite(NUM_FEATURES, NUM_CLASSES, BATCH)


def test_student_tflite_export_fp32_and_int8() -> None:
    """Needs the converter (``pip install 'edgekd[litert]'``); CI skips it."""
    pytest.importorskip("litert_torch")
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    from edgekd.deploy.tflite_export import export_student_tflite

    model, _ = load_checkpoint(str(STUDENT))
    x = torch.randn(4, 1, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).numpy()
    for int8, tol in ((False, 1e-5), (True, 2e-2)):
        data = export_student_tflite(model, (1, 40), batch_size=4, int8=int8)
        runner = interpreter_module.Interpreter(model_content=data).get_signature_runner("infer")
        got = runner(args_0=x.numpy())["output_0"]
        np.testing.assert_allclose(got, want, atol=tol)
