"""The parity checks `build_bundle` runs before a bundle is moved into place: each
export against the torch student, the head KD step against autograd."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.deploy.bundle.layout import (
    FEATURES,
    HEAD_STEP,
    INFERENCE,
    REFERENCE,
    TRAIN_INFER,
    TRAIN_STEP,
    _Artifact,
)
from edgekd.deploy.parity import (
    ParityError,
    ParityResult,
    measure_parity,
    parity_problems,
    predictor_for,
)
from edgekd.deploy.profiles import DeviceProfile

if TYPE_CHECKING:
    from torch import nn
from edgekd.deploy.bundle.check import (
    _feature_path_parity,
    _head_arrays,
    _step_graph_parity,
    _torch_device,
    step_graph_runtime,
    step_params,
)


# ------------------------------------------------------------------ parity at build time
def build_parity(
    folder: Path,
    artifacts: list[_Artifact],
    profile: DeviceProfile,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray,
    model: nn.Module,
) -> dict[str, dict[str, Any]]:
    """Parity of every model file on the full test split against the torch student
    ``model``; raise `ParityError` on a miss."""
    out: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for artifact in artifacts:
        if artifact.role in (INFERENCE, REFERENCE):
            result = student_parity(folder / artifact.name, artifact, profile, x, y, reference)
        elif artifact.role == FEATURES:
            step = next(a.name for a in artifacts if a.role == HEAD_STEP)
            result = _feature_path_parity(folder, artifact.name, step, x, y, reference)
        elif artifact.role == HEAD_STEP:
            out[artifact.name] = head_step_parity(folder, artifacts, profile, x, y, reference)
            problems += out[artifact.name].pop("problems")
            continue
        elif artifact.role == TRAIN_STEP:
            infer = next((a.name for a in artifacts if a.role == TRAIN_INFER), None)
            result = _step_graph_parity(folder, artifact.name, infer, x, y, reference)
            one_step = train_step_parity(
                folder, artifact.name, infer, model, profile, x, y, reference
            )
            problems += one_step.pop("problems")
            out[artifact.name] = {**result.to_dict(), "step": one_step}
            problems += parity_problems(result, profile)
            continue
        else:
            continue
        out[artifact.name] = result.to_dict()
        problems += parity_problems(result, profile)
    if problems:
        raise ParityError("; ".join(problems))
    return out


def student_parity(
    path: Path,
    artifact: _Artifact,
    profile: DeviceProfile,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray,
) -> ParityResult:
    precision = artifact.precision
    device, fp16 = "cpu", False
    if path.suffix == ".pt":
        device, fp16 = _torch_device(profile)
        precision = "fp16" if fp16 else "fp32"
        if precision != artifact.precision:
            artifact.note = f"parity measured in {precision} on {device}: no CUDA on this host"
    predict, runtime = predictor_for(
        path, threads=1, providers=profile.execution_providers, device=device, fp16=fp16
    )
    return measure_parity(
        predict(x), reference, y, model_file=path.name, precision=precision, runtime=runtime
    )


def edge_runtime(folder: Path, artifacts: list[_Artifact], threads: int = 1) -> Any:
    from edgekd.deploy.runtimes import runtime_for

    features = next(a.name for a in artifacts if a.role == FEATURES)
    step = next(a.name for a in artifacts if a.role == HEAD_STEP)
    return runtime_for(str(folder / features), str(folder / step), threads=threads)


def head_step_parity(
    folder: Path,
    artifacts: list[_Artifact],
    profile: DeviceProfile,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray,
) -> dict[str, Any]:
    """One step of the exported head-step graph against `HeadKDStep` in torch, on the
    first training batch of the test split with the torch logits as the teacher: the new
    weights may differ by at most the profile's FP32 logit tolerance."""
    import torch

    from edgekd.deploy.head_step import HeadKDStep

    runtime = edge_runtime(folder, artifacts)
    weight, bias = _head_arrays(folder)
    n = min(profile.training_batch_size, len(y))
    features = runtime.features(x[:n])
    class_weights = np.ones(len(bias), dtype=np.float32)
    settings = (4.0, 0.5, 0.1)  # temperature, alpha, lr: a large lr makes the step visible
    new_w, new_b, loss = runtime.head_step(
        features, y[:n], reference[:n], weight, bias, class_weights, *settings
    )
    with torch.no_grad():
        floats = (reference[:n], weight, bias, class_weights)
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (features, y[:n])]
        tensors += [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in floats]
        ref_w, ref_b, ref_loss = HeadKDStep()(
            *tensors, *(torch.tensor(v, dtype=torch.float32) for v in settings)
        )
    diff = max(
        float(np.abs(new_w - ref_w.numpy()).max()), float(np.abs(new_b - ref_b.numpy()).max())
    )
    step = next(a.name for a in artifacts if a.role == HEAD_STEP)
    limit = profile.parity.max_abs_logit_diff_fp32
    problems = []
    if not (np.isfinite(loss) and diff <= limit):
        problems.append(
            f"{step}: one KD step differs from torch's HeadKDStep by {diff:.4g} in the "
            f"weights (loss {loss:.4g}), over {profile.name}'s FP32 tolerance {limit:g} "
            f"by {diff - limit:.4g}"
        )
    return {
        "model_file": step,
        "precision": "fp32",
        "samples": n,
        "max_abs_weight_diff": diff,
        "loss": float(loss),
        "torch_loss": float(ref_loss),
        "problems": problems,
    }


def train_step_parity(
    folder: Path,
    step: str,
    infer: str | None,
    model: nn.Module,
    profile: DeviceProfile,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray,
) -> dict[str, Any]:
    """One step of the exported whole-student graph against the same step in torch
    (`edgekd.deploy.train_step.StudentKDStep`), on the first training batch of the test
    split with the torch logits as the teacher: every gradient (read from the first
    optimizer state, ``(1 - beta1) g`` for Adam, ``g`` for SGD) may differ by at most the
    profile's FP32 logit tolerance. Gradients, not Adam's new weights: its first step
    ``lr g / (|g| + eps)`` turns a rounding difference in a near-zero gradient into one of
    up to ``lr``. (The step's agreement with autograd itself, weights included, is what
    ``tests/deploy/test_train_step.py`` proves.)"""
    import torch

    from edgekd.deploy.train_step import ADAM_BETAS, step_for

    runtime = step_graph_runtime(folder, step, infer)
    layout = runtime.layout
    params = step_params(folder, layout.names)
    n = min(profile.training_batch_size, len(y))
    weights = np.ones(layout.num_classes, np.float32)
    # temperature, alpha, lr, clip_norm (off), step, trust_correct, weight_ce
    scalars = [np.float32(v) for v in (4.0, 0.5, 0.01, 0.0, 1.0, 0.0, 0.0)]
    zeros = [np.zeros_like(p) for p in params]
    ones = [np.ones_like(p) for p in params]
    feeds = [x[:n], y[:n].astype(np.int64), reference[:n], weights, *scalars]
    feeds += [*params, *ones, *zeros, *zeros]
    got = runtime.step(feeds)
    with torch.no_grad():
        want = step_for(model, layout.optimizer)(
            *(torch.from_numpy(np.ascontiguousarray(f)) for f in feeds)
        )
    count = len(layout.names)
    scale = 1.0 / (1.0 - ADAM_BETAS[0]) if layout.optimizer == "adam" else 1.0
    diff = scale * max(
        float(np.abs(np.asarray(g) - w.numpy()).max())
        for g, w in zip(got[count : 2 * count], want[count : 2 * count], strict=True)
    )
    loss = float(np.asarray(got[-1]).reshape(-1)[0])
    limit = profile.parity.max_abs_logit_diff_fp32
    problems = []
    if not (np.isfinite(loss) and diff <= limit):
        problems.append(
            f"{step}: one KD step's gradients differ from torch's StudentKDStep by {diff:.4g} "
            f"(loss {loss:.4g}), over {profile.name}'s FP32 tolerance {limit:g}"
        )
    return {
        "samples": n,
        "max_abs_gradient_diff": diff,
        "loss": loss,
        "torch_loss": float(want[-1]),
        "problems": problems,
    }
