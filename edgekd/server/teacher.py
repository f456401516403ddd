"""Teacher service: train (or load) the server-held teacher and distil students from it
on the server's public split (the warm start, the ``server_only`` alternative and the
FedDF-style step after aggregation all use `distill_on_public`)."""

from __future__ import annotations

import logging

import numpy as np
from torch import nn

from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import FederatedData
from edgekd.learn.models import ModelSpec, build_model, load_checkpoint
from edgekd.learn.training import KDSettings, kd_train, teacher_probs_for

log = logging.getLogger("edgekd")


def obtain_teacher(cfg: EdgeKDConfig, data: FederatedData, spec: ModelSpec) -> nn.Module:
    """Load ``model.teacher-path`` (refusing another architecture) or train a teacher
    on the public split with Adam and a cosine schedule."""
    if cfg.model.teacher_path:
        teacher, _ = load_checkpoint(cfg.model.teacher_path, expected=spec)
        log.info("loaded teacher from %s", cfg.model.teacher_path)
        return teacher.eval()
    teacher = build_model(spec)
    settings = KDSettings(
        epochs=cfg.model.teacher_epochs,
        lr=cfg.model.teacher_lr,
        batch_size=64,
        clip_norm=0.0,
        cosine=True,
    )
    kd_train(
        teacher,
        data.public.x,
        data.public.y,
        None,
        settings,
        num_classes=data.num_classes,
        seed=cfg.seed,
    )
    return teacher.eval()


def distill_on_public(
    student: nn.Module,
    teacher_probs: np.ndarray,
    data: FederatedData,
    cfg: EdgeKDConfig,
    *,
    epochs: int,
    seed: int,
    lr: float | None = None,
    teacher: nn.Module | None = None,
) -> dict[str, float]:
    """KD of ``student`` toward the teacher's soft targets on the public split; with
    ``kd.hint-weight > 0`` and the torch ``teacher``, plus a FitNets hint term."""
    settings = KDSettings(
        epochs=epochs,
        lr=lr if lr is not None else cfg.model.teacher_lr,
        batch_size=64,
        temperature=cfg.kd.temperature,
        alpha=cfg.kd.alpha,
        clip_norm=cfg.train.clip_norm,
        cosine=True,
        hint_weight=cfg.kd.hint_weight,
    )
    return kd_train(
        student,
        data.public.x,
        data.public.y,
        teacher_probs,
        settings,
        num_classes=data.num_classes,
        seed=seed,
        teacher=teacher,
    )


def public_soft_targets(teacher: nn.Module, data: FederatedData, temperature: float) -> np.ndarray:
    return teacher_probs_for(teacher, data.public.x, temperature)
