"""Torch training loops shared by the server (teacher, warm start, FedDF step) and the
torch client backend. The losses themselves live in `edgekd.learn.kd`; this module
only iterates over batches, steps the optimizer and clips gradients.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgekd.core.errors import EdgeKDError
from edgekd.learn.augment import Augment
from edgekd.learn.kd import (
    HintLoss,
    class_balanced_kd_loss,
    gradient_norm_balance,
    inverse_frequency_class_weights,
    sample_weights_for,
    soft_targets,
)
from edgekd.learn.models import capture_features


class DivergenceError(EdgeKDError, RuntimeError):
    """Training produced a non-finite loss."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    model.eval()
    out = [
        model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass(frozen=True)
class KDSettings:
    """What one call of `kd_train` does; built from `TrainConfig` + `KDConfig`."""

    epochs: int
    lr: float
    batch_size: int
    temperature: float = 4.0
    alpha: float = 0.5  # CE weight; ignored (CE only) when no teacher targets are given
    class_weighting: bool = False
    max_class_weight: float = 5.0
    clip_norm: float = 2.0
    optimizer: str = "adam"
    cosine: bool = False  # cosine-decay the lr over the call (long server-side runs)
    hint_weight: float = 0.0
    device: str = "cpu"  # "cuda" on a Jetson node (its bundle's profile)
    fp16: bool = False  # autocast to float16 with a gradient scaler (CUDA only)
    augment: Augment | None = None  # per-batch input augmentation (train.augment)
    trust_correct: bool = False  # kd.trust = "correct": no KD where the teacher is wrong


def kd_train(
    student: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    teacher_probs: np.ndarray | None,
    settings: KDSettings,
    *,
    num_classes: int,
    seed: int,
    teacher: nn.Module | None = None,
) -> dict[str, float]:
    """Train ``student`` in place on (x, y) with the class-balanced KD loss.

    ``teacher_probs`` are the teacher's probabilities at ``settings.temperature``
    (None: plain cross-entropy). With ``hint_weight > 0`` and a torch ``teacher``,
    a FitNets hint term on the ``features`` layer (scaled by ``hint_weight``) is mixed
    with the KD/CE term by the gradient-norm balance of
    `edgekd.learn.kd.gradient_norm_balance`.
    Returns the mean loss of the last epoch and the step count.
    """
    if len(y) == 0:
        return {"loss": 0.0, "steps": 0.0}
    with _placed_on(student, torch.device(settings.device)):
        return _kd_train(student, x, y, teacher_probs, settings, num_classes, seed, teacher)


@contextmanager
def _placed_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` on ``device`` for the block and back on the host after it (a node's
    state leaves it from host memory); nothing moves for the CPU."""
    if device.type == "cpu":
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


def _optimizer(
    params: list[nn.Parameter], settings: KDSettings, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam (or SGD with momentum 0.9) at ``settings.lr``, cosine-decayed over
    ``total_steps`` when ``settings.cosine``."""
    opt: torch.optim.Optimizer
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=settings.lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=settings.lr)
    if not settings.cosine:
        return opt, None
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))


def _kd_train(
    student: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    teacher_probs: np.ndarray | None,
    settings: KDSettings,
    num_classes: int,
    seed: int,
    teacher: nn.Module | None,
) -> dict[str, float]:
    device = torch.device(settings.device)
    fp16 = settings.fp16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    pt = torch.from_numpy(teacher_probs) if teacher_probs is not None else None
    weights = (
        sample_weights_for(
            yt,
            inverse_frequency_class_weights(y, num_classes, max_weight=settings.max_class_weight),
        )
        if settings.class_weighting
        else None
    )
    hint: HintLoss | None = None
    params = list(student.parameters())
    if settings.hint_weight > 0 and teacher is not None:
        hint = _make_hint(student, teacher, xt[:2])
        params += list(hint.parameters())
    total = settings.epochs * math.ceil(len(y) / settings.batch_size)
    opt, sched = _optimizer(params, settings, total)
    # Its own generator: a run without augmentation draws what it always drew.
    aug_gen = torch.Generator().manual_seed(seed + 7919)
    student.train()
    last = 0.0
    for _ in range(settings.epochs):
        order = torch.randperm(len(y), generator=gen)
        running, count = 0.0, 0
        for start in range(0, len(y), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            xb, yb = xt[idx], yt[idx].to(device)
            pb = None if pt is None else pt[idx]
            if settings.augment is not None:
                xb = settings.augment(xb, aug_gen)
                if pb is not None and teacher is not None:  # soft targets of the new view
                    with torch.no_grad():
                        pb = soft_targets(teacher(xb), settings.temperature)
            xb = xb.to(device)
            wb = None if weights is None else weights[idx].to(device)
            with (
                torch.autocast(device.type, dtype=torch.float16, enabled=fp16),
                capture_features(student) as feats,
            ):
                logits = student(xb)
            logits = logits.float()  # the loss in float32 whatever the forward ran in
            if pb is None:
                loss = nn.functional.cross_entropy(logits, yb, reduction="none")
                loss = (loss * wb).mean() if wb is not None else loss.mean()
            else:
                loss = class_balanced_kd_loss(
                    logits,
                    pb.to(device),
                    yb,
                    temperature=settings.temperature,
                    alpha=settings.alpha,
                    sample_weights=wb,
                    trust_correct=settings.trust_correct,
                )
            if hint is not None and teacher is not None:
                with torch.no_grad(), capture_features(teacher) as tfeats:
                    teacher(xb)
                feat_loss = settings.hint_weight * hint(feats["features"], tfeats["features"])
                # Balance the terms by their gradient norms at the student feature, so
                # neither the hint nor the KD/CE term dominates the shared layers.
                a = gradient_norm_balance(loss, feat_loss, feats["features"])
                loss = a * feat_loss + (1.0 - a) * loss
            if not torch.isfinite(loss):
                raise DivergenceError(f"non-finite loss {loss.item()} during local training")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # scaling is a no-op unless fp16
            if settings.clip_norm > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, settings.clip_norm)
            scaler.step(opt)
            scaler.update()
            if sched is not None:
                sched.step()
            running += float(loss.detach()) * len(idx)
            count += len(idx)
        last = running / max(count, 1)
    student.eval()
    return {"loss": last, "steps": float(total)}


def _make_hint(student: nn.Module, teacher: nn.Module, probe: torch.Tensor) -> HintLoss:
    with torch.no_grad(), capture_features(student) as s, capture_features(teacher) as t:
        student(probe)
        teacher(probe)
    fs, ft = s["features"], t["features"]
    ndim = fs.dim() - 2 if fs.dim() > 2 else 0
    return HintLoss(fs.shape[1], ft.shape[1], ndim)


def teacher_probs_for(teacher: nn.Module, x: np.ndarray, temperature: float) -> np.ndarray:
    """The teacher's soft targets softmax(z/τ) for ``x``."""
    with torch.no_grad():
        return soft_targets(torch.from_numpy(predict_logits(teacher, x)), temperature).numpy()
