"""The comparators of ``--baseline``, each with the federated run's budget and its own
tuning on data no model trains on and that is not the devices' test split.

* **server-only KD**: the student distilled on the public split alone, the best the
  server could do without a device. Its learning rate and augmentation are chosen by
  a small grid (`SERVER_ONLY_LRS` x {off, `DEFAULT_AUGMENT`}, cosine schedule) on the
  pooled validation shares of the clients — the device domain, which favours this
  comparator over a server that could not see it;
* **centralised ceiling**: the warm-started student trained with the clients' KD loss
  on the pooled device training data, as if it could leave the devices, for the
  federation's local epochs (``rounds x local-epochs``) under a cosine schedule (a
  centralised run's own schedule, like server-only's; a constant rate left it below
  server-only on some seeds), augmentation on or off by the same validation split;
* **FedAvg from scratch** and **FedAvg from the warm start** (no teacher in the
  rounds) are federations of their own (`edgekd.server.pipeline.baselines`).

``gap_closed`` is ``(federated - server-only) / (ceiling - server-only)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from torch import nn

from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import ArrayDataset, FederatedData, pooled_client_splits
from edgekd.learn.augment import Augment
from edgekd.learn.models import ModelSpec
from edgekd.learn.training import KDSettings, kd_train, predict_logits, teacher_probs_for
from edgekd.server.federation import run_federation
from edgekd.server.outputs import model_block
from edgekd.server.phases import StudentStart, TeacherPhase
from edgekd.server.teacher import distill_on_public

# The server-only grid, around edgekd's own warm-start rate and a 3x larger one.
SERVER_ONLY_LRS = (3e-3, 1e-2)
# The augmentation the comparators may switch on (chosen by validation, never test):
# shifts of up to 3 of mnist1d's 40 samples, 10 % gain, noise at 0.1 of the signal's std.
DEFAULT_AUGMENT = "shift:3,scale:0.1,noise:0.1"


@dataclass(frozen=True)
class Tuned:
    """A tuned comparator: its model, the setting chosen and every candidate's score."""

    model: nn.Module
    chosen: dict[str, Any]
    candidates: list[dict[str, Any]]


def accuracy(model: nn.Module, split: ArrayDataset) -> float:
    if len(split) == 0:
        return 0.0
    return float((predict_logits(model, split.x).argmax(1) == split.y).mean())


def _augment_choices(cfg: EdgeKDConfig) -> tuple[str, ...]:
    """Off, and the run's own ``train.augment`` (else `DEFAULT_AUGMENT`)."""
    return ("", cfg.train.augment or DEFAULT_AUGMENT)


def best_on(val: ArrayDataset, trained: Iterable[tuple[dict[str, Any], nn.Module]]) -> Tuned:
    """The candidate with the highest accuracy on ``val`` (the first of equals), with
    every candidate's setting and score."""
    best: tuple[float, nn.Module, dict[str, Any]] | None = None
    candidates = []
    for setting, model in trained:
        score = accuracy(model, val)
        candidates.append({**setting, "val_accuracy": score})
        if best is None or score > best[0]:
            best = (score, model, setting)
    if best is None:
        raise ValueError("no candidate to choose from")
    return Tuned(best[1], best[2], candidates)


def tuned_server_only(
    cfg: EdgeKDConfig,
    data: FederatedData,
    init: nn.Module,
    teacher: nn.Module,
    public_probs: np.ndarray,
    val: ArrayDataset,
    epochs: int,
) -> Tuned:
    """Server-only KD from ``init`` for ``epochs`` on the public split; the grid's best
    on ``val``."""
    return best_on(val, _server_only_grid(cfg, data, init, teacher, public_probs, epochs))


def _server_only_grid(
    cfg: EdgeKDConfig,
    data: FederatedData,
    init: nn.Module,
    teacher: nn.Module,
    public_probs: np.ndarray,
    epochs: int,
) -> Iterator[tuple[dict[str, Any], nn.Module]]:
    for lr in SERVER_ONLY_LRS:
        for augment in _augment_choices(cfg):
            model = copy.deepcopy(init)
            distill_on_public(
                model,
                public_probs,
                data,
                cfg,
                epochs=epochs,
                seed=cfg.seed,
                lr=lr,
                teacher=teacher,
                augment=augment,
            )
            yield {"lr": lr, "augment": augment, "schedule": "cosine"}, model


def centralised_ceiling(
    cfg: EdgeKDConfig,
    data: FederatedData,
    warm: nn.Module,
    teacher: nn.Module,
    train: ArrayDataset,
    val: ArrayDataset,
) -> Tuned:
    """The clients' KD (their lr, batch, α, τ, class weights, clipping) on the pooled
    device training data ``train``, from the warm start, for ``rounds x local-epochs``
    epochs under a cosine schedule; augmentation on or off by ``val``."""
    return best_on(val, _ceiling_runs(cfg, data, warm, teacher, train))


def _ceiling_runs(
    cfg: EdgeKDConfig,
    data: FederatedData,
    warm: nn.Module,
    teacher: nn.Module,
    train: ArrayDataset,
) -> Iterator[tuple[dict[str, Any], nn.Module]]:
    t, k = cfg.train, cfg.kd
    probs = teacher_probs_for(teacher, train.x, k.temperature)
    for augment in _augment_choices(cfg):
        model = copy.deepcopy(warm)
        settings = KDSettings(
            epochs=t.num_rounds * t.local_epochs,
            lr=t.lr,
            batch_size=t.batch_size,
            temperature=k.temperature,
            alpha=k.alpha,
            class_weighting=k.class_weighting,
            max_class_weight=k.max_class_weight,
            clip_norm=t.clip_norm,
            optimizer=t.optimizer,
            cosine=True,
            augment=Augment.from_spec(augment),
            trust_correct=k.trust == "correct",
        )
        kd_train(
            model,
            train.x,
            train.y,
            probs,
            settings,
            num_classes=data.num_classes,
            seed=cfg.seed,
            teacher=teacher,
        )
        chosen = {"lr": t.lr, "augment": augment, "epochs": settings.epochs, "schedule": "cosine"}
        yield chosen, model


def gap_closed(federated: float, server_only: float, ceiling: float) -> float | None:
    """The share of the server-only -> ceiling gap the federated student closes (None
    when the ceiling is not above server-only: there is no gap to close)."""
    gap = ceiling - server_only
    return (federated - server_only) / gap if gap > 1e-9 else None


def baselines(
    grid: Grid,
    cfg: EdgeKDConfig,
    data: FederatedData,
    spec: ModelSpec,
    teacher: TeacherPhase,
    start: StudentStart,
    report: dict[str, Any],
    show_progress: bool,
) -> list[dict[str, Any]]:
    """``--baseline``: every comparator of the module docstring into ``report``
    (``server_only``, ``ceiling``, ``baseline`` = FedAvg from scratch, ``fedavg_warm``,
    ``gap_closed``); returns FedAvg-from-scratch's rounds (for the accuracy plot)."""
    nodes = len(list(grid.get_node_ids()))
    train, val = pooled_client_splits(
        data, cfg.data.partition, nodes, cfg.seed, cfg.data.val_fraction
    )
    budget = cfg.train.warm_start_epochs + cfg.train.num_rounds * cfg.train.local_epochs
    server_only = tuned_server_only(
        cfg, data, start.init, teacher.model, teacher.public_probs, val, budget
    )
    ceiling = centralised_ceiling(cfg, data, start.warm, teacher.model, train, val)
    for key, tuned in (("server_only", server_only), ("ceiling", ceiling)):
        report[key] = {
            **model_block(tuned.model, data, teacher),
            "chosen": tuned.chosen,
            "candidates": tuned.candidates,
            "val_accuracy": accuracy(tuned.model, val),
        }
    report["server_only"]["epochs"] = budget
    out: dict[str, list[dict[str, Any]]] = {}
    for key, initial, label in (
        ("baseline", start.random_init, "fedavg from scratch"),
        ("fedavg_warm", start.warm, "fedavg from warm start"),
    ):
        model, rounds, _ = run_federation(
            grid,
            cfg,
            data,
            spec,
            copy.deepcopy(initial),
            mode="ce",
            teacher=None,
            teacher_onnx=teacher.onnx,
            public_probs=teacher.public_probs,
            label=label,
            show_progress=show_progress,
        )
        report[key] = model_block(model, data, teacher)
        out[key] = rounds
    report["baseline_rounds"] = out["baseline"]
    report["gap_closed"] = gap_closed(
        report["student"]["accuracy"],
        report["server_only"]["accuracy"],
        report["ceiling"]["accuracy"],
    )
    return out["baseline"]
