"""Local KD update through the exported step graph: the torch-free twin of
`edgekd.client.trainer.local_kd_update`.

A Raspberry Pi (onnxruntime) or a phone (LiteRT) trains every tensor of the student
with `edgekd.deploy.step_runtime.local_full_kd`; a simulated node with
``client.backend = onnxruntime | litert`` does the same with graphs exported in its
worker, so a simulation runs the fleet on the runtimes it will be deployed with. The
round's settings are decoded by the same `RoundSettings` as on a torch node, and the
three modes match the torch trainer's:

* on-device soft targets: class-balanced KD on local data (``kd.trust = correct``
  gives per-sample alpha);
* ``mode = ce`` (the FedAvg baseline): class-weighted CE (alpha 1, CE weighted);
* proxy soft targets: a class-weighted CE epoch on local data, then a KD epoch on the
  shipped public inputs, every epoch.

Each call starts the optimizer afresh, as the torch trainer does. ``train.augment``
runs in numpy (:func:`augment_batch`). Never imports torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgekd.core.class_weights import inverse_frequency_class_weights
from edgekd.core.config import parse_augment
from edgekd.core.data import ArrayDataset
from edgekd.core.round_settings import RoundSettings
from edgekd.deploy.step_runtime import StepRuntime, local_full_kd

__all__ = ["augment_batch", "graph_kd_update"]


def augment_batch(spec: str) -> Callable[[np.ndarray, np.random.Generator], np.ndarray] | None:
    """``train.augment`` in numpy: per sample a circular shift on every spatial axis,
    a gain and additive Gaussian noise, as `edgekd.learn.augment.Augment` does in torch
    (same distributions, another generator). None when ``spec`` is empty."""
    items = parse_augment(spec)
    if not items:
        return None
    shift, scale, noise = (
        int(items.get("shift", 0)),
        items.get("scale", 0.0),
        items.get("noise", 0.0),
    )

    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = x
        if shift > 0:
            for axis in range(2, x.ndim):
                offsets = rng.integers(-shift, shift + 1, len(x))
                out = np.stack(
                    [
                        np.roll(row, int(o), axis=axis - 1)
                        for row, o in zip(out, offsets, strict=True)
                    ]
                )
        if scale > 0:
            gain = 1.0 + scale * (2.0 * rng.random(len(x)) - 1.0)
            out = out * gain.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
        if noise > 0:
            out = out + (noise * rng.standard_normal(x.shape)).astype(x.dtype)
        return np.asarray(out, dtype=x.dtype)

    return apply


def graph_kd_update(
    runtime: StepRuntime,
    state: Mapping[str, np.ndarray],
    train: ArrayDataset,
    settings: RoundSettings,
    *,
    teacher_logits: np.ndarray | None,
    proxy: tuple[np.ndarray, np.ndarray] | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[OrderedDict[str, np.ndarray], dict[str, float]]:
    """The round's local epochs on ``train`` through the step graph; ``(state, metrics)``.

    ``teacher_logits`` are the on-device teacher's logits on ``train.x`` (softened in the
    graph at the node's ``T(B)``); ``proxy`` is ``(x, teacher logits)`` of the public
    proxy set. ``masks`` (``True`` kept) keep pruned weights at zero.

    Raises:
        ValueError: the graph's optimizer is not the round's (a bundle built for another
            ``train.optimizer``), or a batch exceeds a static graph batch.
    """
    layout = runtime.layout
    if settings.optimizer != layout.optimizer:
        raise ValueError(
            f"the round trains with {settings.optimizer}, the step graph implements "
            f"{layout.optimizer}: rebuild the bundle for train.optimizer = {settings.optimizer}"
        )
    tau = settings.effective_temperature()
    if len(train) == 0:  # the reply says 0 examples and the server averages nothing of it
        return OrderedDict(state), {"train-loss": 0.0, "temperature": tau}
    num_classes = layout.num_classes
    weights = (
        inverse_frequency_class_weights(train.y, num_classes, max_weight=settings.max_class_weight)
        if settings.class_weighting
        else None
    )
    common: dict[str, Any] = {
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "clip_norm": settings.clip_norm,
        "masks": masks,
        "augment": augment_batch(settings.augment),
        "temperature": tau,
    }
    no_teacher = np.zeros((len(train), num_classes), np.float32)
    if settings.mode == "kd" and teacher_logits is not None:
        new_state, metrics = local_full_kd(
            runtime, state, train.x, train.y, teacher_logits, epochs=settings.local_epochs,
            alpha=settings.alpha, class_weights=weights, trust_correct=settings.trust == "correct",
            seed=settings.seed, **common,
        )  # fmt: skip
        return new_state, {"train-loss": metrics["loss"], "temperature": tau}
    if settings.mode != "kd" or proxy is None:  # plain FedAvg: class-weighted CE
        new_state, metrics = local_full_kd(
            runtime, state, train.x, train.y, no_teacher, epochs=settings.local_epochs,
            alpha=1.0, class_weights=weights, weight_ce=True, seed=settings.seed, **common,
        )  # fmt: skip
        return new_state, {"train-loss": metrics["loss"], "temperature": tau}
    px, plogits = proxy
    pseudo = plogits.argmax(axis=1).astype(np.int64)
    current: Mapping[str, np.ndarray] = state
    loss = 0.0
    for epoch in range(settings.local_epochs):
        seed = settings.seed * 1000 + epoch
        current, metrics = local_full_kd(
            runtime, current, train.x, train.y, no_teacher, epochs=1, alpha=1.0,
            class_weights=weights, weight_ce=True, seed=seed, **common,
        )  # fmt: skip
        loss = metrics["loss"]
        current, _ = local_full_kd(
            runtime, current, px, pseudo, plogits, epochs=1, alpha=0.0, seed=seed, **common
        )
    return OrderedDict(current), {"train-loss": float(loss), "temperature": tau}
