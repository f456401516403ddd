"""The whole-student KD step (torch ops, ONNX, TFLite) against torch autograd and
torch.optim, for every model family and a filter-pruned and a low-rank student.

Tolerances are relative to each tensor's largest entry, in FP32. Every gradient, and
the first step's SGD weights and optimizer state, agree to 1e-5. Adam's weights are
held to 5e-5: its step ``m / (sqrt(v) + eps)`` divides by about ``|g|``, so where a
gradient entry is near zero the rounding of another summation order is magnified
(seen: 1.7e-5 on one entry of the 2-D student's last convolution in LiteRT). Steps 2
and 3 start from weights that already differ by that rounding, so they are held to 1e-4
(seen here: 3.1e-5 in a step-3 Adam moment; the margin is for other CPUs' kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from step_models import MODELS, NUM_CLASSES, TFLITE_BATCH, tflite_fixture_name
from torch import nn

from edgekd.deploy.step_layout import StepLayout, StepLayoutError
from edgekd.deploy.step_runtime import LiteRTStepRuntime, OrtStepRuntime, local_full_kd
from edgekd.deploy.train_step import (
    export_infer_onnx,
    export_train_step_onnx,
    layout_for,
    step_for,
    student_layers,
)
from edgekd.learn.compression import keep_pruned_at_zero
from edgekd.learn.kd import class_balanced_kd_loss, sample_weights_for, soft_targets

STEPS = Path(__file__).resolve().parents[1] / "data" / "train_steps"
TOL = 1e-5
ADAM_WEIGHT_TOL = 5e-5
LATER_STEP_TOL = 1e-4


def _batch(shape: tuple[int, ...], seed: int, batch: int = 16) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    teacher = 3.0 * torch.randn(batch, NUM_CLASSES, generator=gen)
    class_weights = 0.2 + 3.0 * torch.rand(NUM_CLASSES, generator=gen)
    return x, labels, teacher, class_weights


def _masks(model: nn.Module, seed: int, prune: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        keep = torch.rand(p.shape, generator=gen) > 0.4 if prune and p.dim() > 1 else None
        out[name] = torch.ones_like(p) if keep is None else keep.float()
    return out


def _autograd_steps(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, ...]],
    hyper: dict[str, float],
    masks: dict[str, torch.Tensor],
    optimizer: str,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], list[float]]:
    """What edgekd's torch trainer does: the KD loss, masked gradients, clipping, the step.

    Returns, after each step, the optimizer's first state (Adam's ``exp_avg``, SGD's
    ``momentum_buffer``), the weights, and the loss before the step."""
    tau, alpha = hyper["temperature"], hyper["alpha"]
    for name, p in model.named_parameters():
        p.data.mul_(masks[name])
    params = list(model.parameters())
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=hyper["lr"])
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=hyper["lr"], momentum=0.9)
    )
    hooks = keep_pruned_at_zero(model, {n: m.bool().numpy() for n, m in masks.items()})
    first_state, weights, losses = [], [], []
    for x, labels, teacher, class_weights in batches:
        loss = class_balanced_kd_loss(
            model(x),
            soft_targets(teacher, tau),
            labels,
            temperature=tau,
            alpha=alpha,
            sample_weights=sample_weights_for(labels, class_weights),
            weight_ce=hyper["weight_ce"] > 0,
            trust_correct=hyper["trust_correct"] > 0,
        )
        opt.zero_grad()
        loss.backward()
        if hyper["clip_norm"] > 0:
            nn.utils.clip_grad_norm_(params, hyper["clip_norm"])
        opt.step()
        key = "exp_avg" if optimizer == "adam" else "momentum_buffer"
        first_state.append({n: opt.state[p][key].clone() for n, p in model.named_parameters()})
        for name, p in model.named_parameters():  # what the trainer returns: pruned at zero
            p.data.mul_(masks[name])
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        losses.append(float(loss.detach()))
    hooks.remove()
    return first_state, weights, losses


Runner = Callable[[list[np.ndarray]], list[np.ndarray]]


def _graph_steps(
    run: Runner,
    layout: StepLayout,
    init: dict[str, torch.Tensor],
    batches: list[tuple[torch.Tensor, ...]],
    hyper: dict[str, float],
    masks: dict[str, torch.Tensor],
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], list[float]]:
    """The graph's steps from ``init``: the weights and ``state1`` after each, the losses."""
    k = len(layout.names)
    params = [(init[n] * masks[n]).numpy() for n in layout.names]
    state = [np.zeros_like(p) for p in params] * 2
    weights, state1, losses = [], [], []
    for step, (x, labels, teacher, class_weights) in enumerate(batches, start=1):
        keys = ("temperature", "alpha", "lr", "clip_norm", "step", "trust_correct", "weight_ce")
        scalars = [np.float32(step if key == "step" else hyper[key]) for key in keys]
        feeds = [t.numpy() for t in (x, labels, teacher, class_weights)] + scalars
        outputs = run(feeds + params + [masks[n].numpy() for n in layout.names] + state)
        outputs = [np.asarray(o) for o in outputs]
        params, state = outputs[:k], outputs[k : 3 * k]
        weights.append(dict(zip(layout.names, params, strict=True)))
        state1.append(dict(zip(layout.names, state[:k], strict=True)))
        losses.append(float(outputs[-1].reshape(-1)[0]))
    return weights, state1, losses


def _close(got: np.ndarray, want: torch.Tensor, name: str, tol: float = TOL) -> None:
    want_np = want.detach().numpy()
    scale = max(float(np.abs(want_np).max()), 1e-3)
    err = float(np.abs(got - want_np).max()) / scale
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def _torch_runner(model: nn.Module, layout: StepLayout) -> Runner:
    step = step_for(model, layout.optimizer)
    return lambda feeds: [
        o.numpy() for o in step(*(torch.from_numpy(np.asarray(f)) for f in feeds))
    ]


def _onnx_runner(model: nn.Module, layout: StepLayout, tmp_path: Path) -> Runner:
    (tmp_path / "train.onnx").write_bytes(export_train_step_onnx(model, layout))
    (tmp_path / "infer.onnx").write_bytes(export_infer_onnx(model, layout))
    runtime = OrtStepRuntime(str(tmp_path / "train.onnx"), str(tmp_path / "infer.onnx"), layout)
    return runtime.step


def _tflite_runner(family: str, layout: StepLayout) -> Runner:
    path = STEPS / tflite_fixture_name(family, layout.optimizer)
    return LiteRTStepRuntime(str(path), layout).step


def _runner(backend: str, family: str, model: nn.Module, layout: StepLayout, tmp: Path) -> Runner:
    if backend == "torch":
        return _torch_runner(model, layout)
    if backend == "onnx":
        return _onnx_runner(model, layout, tmp)
    pytest.importorskip("ai_edge_litert")
    return _tflite_runner(family, layout)


KD = {
    "temperature": 3.0, "alpha": 0.4, "lr": 0.01, "clip_norm": 2.0, "trust_correct": 0.0,
    "weight_ce": 0.0,
}  # fmt: skip
#: Clipping that binds, the per-sample alpha of kd.trust = "correct", class-weighted CE.
TRUST = {
    "temperature": 1.5, "alpha": 0.2, "lr": 0.02, "clip_norm": 0.5, "trust_correct": 1.0,
    "weight_ce": 1.0,
}  # fmt: skip
BACKENDS = ["torch", "onnx", "tflite"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("hyper", [KD, TRUST], ids=["kd", "trust-clip"])
def test_three_steps_equal_autograd_and_torch_optim(
    backend: str, family: str, optimizer: str, hyper: dict[str, float], tmp_path: Path
) -> None:
    # Prepare: pruning masks on two of the students, so masked gradients are checked
    model, shape = MODELS[family]()
    layout = layout_for(model, shape, NUM_CLASSES, optimizer)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(model, seed=5, prune=family in ("cnn1d", "cnn2d"))
    batches = [_batch(shape, seed, TFLITE_BATCH) for seed in range(3)]
    run = _runner(backend, family, model, layout, tmp_path)
    # Execute
    opt_state, want, want_loss = _autograd_steps(model, batches, hyper, masks, optimizer)
    got, got_state1, got_loss = _graph_steps(run, layout, init, batches, hyper, masks)
    # Assert: every tensor and the optimizer's first state after every step
    for step in range(len(batches)):
        tol = TOL if step == 0 else LATER_STEP_TOL
        weight_tol = max(ADAM_WEIGHT_TOL, tol) if optimizer == "adam" else tol
        for name in layout.names:
            _close(got[step][name], want[step][name], f"step {step + 1} {name}", weight_tol)
            _close(got_state1[step][name], opt_state[step][name], f"state {step + 1} {name}", tol)
    np.testing.assert_allclose(got_loss, want_loss, rtol=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_gradient_equals_autograd(backend: str, family: str, tmp_path: Path) -> None:
    # Prepare: SGD from zero velocity without clipping returns the gradient as state1
    model, shape = MODELS[family]()
    layout = layout_for(model, shape, NUM_CLASSES, "sgd")
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(model, seed=0, prune=False)
    hyper = dict(KD, clip_norm=0.0)
    x, labels, teacher, class_weights = _batch(shape, seed=11, batch=TFLITE_BATCH)
    run = _runner(backend, family, model, layout, tmp_path)
    # Execute
    loss = class_balanced_kd_loss(
        model(x),
        soft_targets(teacher, hyper["temperature"]),
        labels,
        temperature=hyper["temperature"],
        alpha=hyper["alpha"],
        sample_weights=sample_weights_for(labels, class_weights),
    )
    loss.backward()
    _, got, _ = _graph_steps(run, layout, init, [(x, labels, teacher, class_weights)], hyper, masks)
    # Assert
    for name, param in model.named_parameters():
        assert param.grad is not None and float(param.grad.abs().max()) > 0
        _close(got[0][name], param.grad, f"gradient of {name}")


def test_a_padded_litert_step_equals_the_unpadded_onnx_step(tmp_path: Path) -> None:
    # Prepare: 10 rows in LiteRT's static batch of 16 (6 rows padded with label -1)
    pytest.importorskip("ai_edge_litert")
    model, shape = MODELS["cnn1d"]()
    layout = layout_for(model, shape, NUM_CLASSES, "adam")
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(model, seed=0, prune=False)
    batches = [tuple(t[:10] if t.dim() and len(t) == TFLITE_BATCH else t for t in _batch(shape, 3))]
    # Execute
    onnx_w, _, onnx_loss = _graph_steps(
        _runner("onnx", "cnn1d", model, layout, tmp_path), layout, init, batches, KD, masks
    )
    lite_w, _, lite_loss = _graph_steps(
        _tflite_runner("cnn1d", layout), layout, init, batches, KD, masks
    )
    # Assert
    assert lite_loss == pytest.approx(onnx_loss, rel=TOL)
    for name in layout.names:
        _close(lite_w[0][name], torch.from_numpy(onnx_w[0][name]), name, ADAM_WEIGHT_TOL)


def _learnable(shape: tuple[int, ...], n: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs whose class is readable from the signal, and a teacher that knows it."""
    gen = np.random.default_rng(0)
    y = gen.integers(0, NUM_CLASSES, n)
    x = gen.normal(size=(n, *shape)).astype(np.float32)
    x.reshape(n, -1)[np.arange(n), y] += 4.0
    teacher = (4.0 * np.eye(NUM_CLASSES)[y]).astype(np.float32)
    return x, y, teacher


def test_ten_onnx_steps_lower_the_loss_and_train_every_tensor(tmp_path: Path) -> None:
    # Prepare
    model, shape = MODELS["cnn1d"]()
    layout = layout_for(model, shape, NUM_CLASSES, "adam")
    runtime = _onnx_runtime(model, layout, tmp_path)
    state = {n: p.detach().numpy() for n, p in model.named_parameters()}
    x, y, teacher = _learnable(shape)
    common = {"batch_size": 64, "lr": 0.01, "temperature": 2.0, "alpha": 0.5, "clip_norm": 2.0}
    # Execute: one step (its loss is the start's), then ten
    _, first = local_full_kd(runtime, state, x, y, teacher, epochs=1, **common)
    new_state, tenth = local_full_kd(runtime, state, x, y, teacher, epochs=10, **common)
    # Assert
    assert tenth["steps"] == 10
    assert tenth["loss"] < 0.8 * first["loss"]
    for name in layout.names:
        assert not np.allclose(new_state[name], state[name]), f"{name} did not change"


def _onnx_runtime(model: nn.Module, layout: StepLayout, tmp_path: Path) -> OrtStepRuntime:
    (tmp_path / "train.onnx").write_bytes(export_train_step_onnx(model, layout))
    (tmp_path / "infer.onnx").write_bytes(export_infer_onnx(model, layout))
    return OrtStepRuntime(str(tmp_path / "train.onnx"), str(tmp_path / "infer.onnx"), layout)


def test_local_full_kd_keeps_pruned_entries_at_zero_and_passes_buffers(tmp_path: Path) -> None:
    # Prepare
    model, shape = MODELS["cnn1d"]()
    layout = layout_for(model, shape, NUM_CLASSES, "sgd")
    runtime = _onnx_runtime(model, layout, tmp_path)
    state = {n: p.detach().numpy() for n, p in model.named_parameters()}
    state["extra.buffer"] = np.arange(3, dtype=np.int64)
    masks = {n: m.numpy().astype(bool) for n, m in _masks(model, 1, prune=True).items()}
    x, y, teacher = _learnable(shape, n=40)
    # Execute
    new_state, metrics = local_full_kd(
        runtime, state, x, y, teacher, epochs=2, batch_size=16, lr=0.05, temperature=2.0,
        alpha=0.5, masks=masks, seed=3,
    )  # fmt: skip
    # Assert
    assert list(new_state) == list(state)
    assert metrics["steps"] == 6 and metrics["num-examples"] == 40
    np.testing.assert_array_equal(new_state["extra.buffer"], state["extra.buffer"])
    for name in layout.names:
        assert np.all(new_state[name][~masks[name]] == 0.0)
        assert not np.allclose(new_state[name][masks[name]], state[name][masks[name]])


def test_the_infer_graph_gives_the_students_logits(tmp_path: Path) -> None:
    # Prepare
    model, shape = MODELS["low-rank"]()
    layout = layout_for(model, shape, NUM_CLASSES, "adam")
    runtime = _onnx_runtime(model, layout, tmp_path)
    x = _batch(shape, 4)[0]
    params = [p.detach().numpy() for p in model.parameters()]
    # Execute
    got = runtime.logits(x.numpy(), params)
    # Assert
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_step_layout_survives_json_and_refuses_a_corrupt_file() -> None:
    model, shape = MODELS["filter-pruned"]()
    layout = layout_for(model, shape, NUM_CLASSES, "adam")
    assert StepLayout.from_json(layout.to_json()) == layout
    with pytest.raises(StepLayoutError, match="unreadable step layout"):
        StepLayout.from_json('{"names": ["a"]}')
    with pytest.raises(StepLayoutError, match="optimizer must be one of"):
        StepLayout.from_json(layout.to_json().replace('"adam"', '"lion"'))


def test_student_layers_name_an_unsupported_layer() -> None:
    model, _ = MODELS["cnn1d"]()
    model.features[1] = nn.GELU()
    with pytest.raises(TypeError, match="features.1: no step graph for a GELU"):
        student_layers(model)
