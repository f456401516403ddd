"""Local KD update on one client, torch backend (laptops, Jetson, simulation).

The Flower-facing code is in `edgekd.client.app`; this module only turns (global
student, round settings, local data, teacher soft targets) into (updated student,
metrics), so it can be tested without Flower.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from edgekd.core.data import ArrayDataset
from edgekd.core.metrics import classification_metrics
from edgekd.core.numerics import softmax
from edgekd.core.round_settings import RoundSettings
from edgekd.learn.augment import Augment
from edgekd.learn.compression import keep_pruned_at_zero, plain_state
from edgekd.learn.compression import training_view as make_training_view
from edgekd.learn.models import ModelSpec, load_for_state
from edgekd.learn.training import KDSettings, kd_train, predict_logits


def local_kd_update(
    spec: ModelSpec,
    state: Mapping[str, np.ndarray],
    train: ArrayDataset,
    settings: RoundSettings,
    *,
    teacher_logits: np.ndarray | None,
    proxy: tuple[np.ndarray, np.ndarray] | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
    quantizer: str = "",
) -> tuple[OrderedDict[str, np.ndarray], dict[str, float]]:
    """Run the round's local epochs and return the new state and training metrics.

    * ``mode == "ce"``: plain (class-weighted) cross-entropy, the FedAvg baseline.
    * ``teacher_logits`` given (on-device teacher): class-balanced KD on local data
      at the batch-coupled temperature.
    * ``proxy`` given (x, teacher logits): CE on local data, then KD on the public
      proxy set at the batch-coupled temperature, every epoch.

    ``masks`` (``True`` = kept) hold pruned weights at exactly zero; ``quantizer``
    ("int8" or "ternary") trains through fake-quantized weights (QAT rounds). The
    returned state holds the latent float weights under the original names.
    """
    torch.set_num_threads(1)  # one simulated client per core
    base = load_for_state(spec, state)
    names = list(base.state_dict())  # before a ternary view renames the weights
    model = make_training_view(base, quantizer)
    hooks = keep_pruned_at_zero(model, masks or {})
    try:
        metrics = _train(model, spec, train, settings, teacher_logits, proxy)
    finally:
        hooks.remove()
    new_state = plain_state(model, names)
    for name, mask in (masks or {}).items():
        new_state[name][~np.asarray(mask, dtype=bool)] = 0.0
    return new_state, metrics


def _train(
    model: torch.nn.Module,
    spec: ModelSpec,
    train: ArrayDataset,
    settings: RoundSettings,
    teacher_logits: np.ndarray | None,
    proxy: tuple[np.ndarray, np.ndarray] | None,
) -> dict[str, float]:
    tau = settings.effective_temperature()
    kd = KDSettings(
        epochs=settings.local_epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        temperature=tau,
        alpha=settings.alpha,
        class_weighting=settings.class_weighting,
        max_class_weight=settings.max_class_weight,
        clip_norm=settings.clip_norm,
        optimizer=settings.optimizer,
        device=settings.device,
        fp16=settings.fp16,
        augment=Augment.from_spec(settings.augment),
        trust_correct=settings.trust == "correct",
    )
    probs = None
    if settings.mode == "kd" and teacher_logits is not None:
        probs = softmax(teacher_logits, tau)
    n = spec.num_classes
    if settings.mode != "kd" or proxy is None:
        out = kd_train(model, train.x, train.y, probs, kd, num_classes=n, seed=settings.seed)
        return {"train-loss": out["loss"], "temperature": float(tau)}
    # Proxy mode: alternate a local CE epoch with a KD epoch on the public proxy set,
    # the teacher's logits softened at this node's T(B) like on-device targets.
    px, plogits = proxy
    pprobs = softmax(plogits, tau)
    pseudo = plogits.argmax(axis=1).astype(np.int64)
    one_epoch = replace(kd, epochs=1)
    proxy_kd = replace(kd, epochs=1, alpha=0.0, class_weighting=False)
    loss = 0.0
    for epoch in range(settings.local_epochs):
        seed = settings.seed * 1000 + epoch
        loss = kd_train(model, train.x, train.y, None, one_epoch, num_classes=n, seed=seed)["loss"]
        kd_train(model, px, pseudo, pprobs, proxy_kd, num_classes=n, seed=seed)
    return {"train-loss": float(loss), "temperature": float(tau)}


def evaluate_state(
    spec: ModelSpec, state: Mapping[str, np.ndarray], data: ArrayDataset
) -> dict[str, float]:
    """Accuracy and NLL of the global student on local validation data."""
    if len(data) == 0:
        return {"accuracy": 0.0, "loss": 0.0}
    probs = softmax(predict_logits(load_for_state(spec, state), data.x))
    m = classification_metrics(probs, data.y, spec.num_classes)
    return {"accuracy": float(m["accuracy"]), "loss": float(m["nll"])}  # type: ignore[arg-type]
