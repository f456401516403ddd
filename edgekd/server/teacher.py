"""Teacher service: train (or load) the server-held teacher and distil students from it
on the server's public split (the warm start, the ``server_only`` alternative and the
FedDF-style step after aggregation all use `distill_on_public`)."""

from __future__ import annotations

import logging

import numpy as np
from torch import nn

from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import FederatedData
from edgekd.learn.augment import Augment
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
    augment: str | None = None,
    cosine: bool = True,
) -> dict[str, float]:
    """KD of ``student`` toward the teacher's soft targets on the public split; with
    ``kd.hint-weight > 0`` and the torch ``teacher``, plus a FitNets hint term.
    ``lr`` defaults to ``model.teacher-lr``, ``augment`` to ``train.augment`` (with the
    torch ``teacher``, the soft targets of each augmented view are the teacher's own)."""
    settings = KDSettings(
        epochs=epochs,
        lr=lr if lr is not None else cfg.model.teacher_lr,
        batch_size=64,
        temperature=cfg.kd.temperature,
        alpha=cfg.kd.alpha,
        clip_norm=cfg.train.clip_norm,
        cosine=cosine,
        hint_weight=cfg.kd.hint_weight,
        augment=Augment.from_spec(cfg.train.augment if augment is None else augment),
        trust_correct=cfg.kd.trust == "correct",
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
