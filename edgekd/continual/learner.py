"""Local continual training (torch): one task's pass, stream evaluation, a sequential runner.

:func:`train_task` is the unit a federated client runs each round on its share of the
current task: the task loss plus a :class:`~edgekd.continual.regularizers.ContinualRegularizer`
penalty, with Adam and gradient clipping as `edgekd.learn.training.kd_train`.
:func:`run_sequential` chains it over a whole :class:`~edgekd.continual.streams.TaskStream`
on one machine (no federation), for tests and quick comparisons of the methods; a Flower
adapter reuses :func:`train_task` and the regularizers' ``state_dict``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.continual.metrics import summarize
from edgekd.continual.regularizers import ContinualRegularizer, make_regularizer
from edgekd.continual.streams import TaskStream
from edgekd.learn.kd import inverse_frequency_class_weights, sample_weights_for
from edgekd.learn.training import DivergenceError, predict_logits, seed_everything

__all__ = ["evaluate_stream", "local_log_prior", "run_sequential", "train_task"]


def train_task(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    regularizer: ContinualRegularizer,
    *,
    teacher_probs: np.ndarray | None = None,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    alpha: float = 1.0,
    class_weighting: bool = False,
    max_class_weight: float = 5.0,
    clip_norm: float = 2.0,
    active_classes: Sequence[int] | None = None,
    adjust_classes: Sequence[int] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on one task's data ``(x, y)``.

    Per batch ``B`` (plus the regularizer's replay samples ``R``, if any)::

        loss = alpha * mean_{i in B u R} w_i * CE(z_i, y_i) + penalty(model, x_B, z_B, y_B, p_t,B),

    where ``w_i`` are `edgekd.learn.kd.inverse_frequency_class_weights` of the task's labels
    when ``class_weighting`` (replayed samples, whose classes may be absent from the task,
    get weight 1), else 1. The penalty sees only the current batch. With
    ``TeacherKD(weight=1 - alpha, temperature=tau)`` and no class weights this is exactly
    the Hinton KD loss of `edgekd.learn.kd.class_balanced_kd_loss`.

    With ``active_classes`` the cross-entropy is a softmax over those classes only: the
    logits of every other class are masked out of it (Avalanche's ``IncrementalClassifier``
    with ``masking=True`` masks the units of classes not seen yet the same way). Pass the
    classes seen so far (see :func:`_masked_cross_entropy` why). The regularizers'
    penalties are not masked: a teacher or an old model may speak for any class.

    With ``adjust_classes`` (the current task's classes) the cross-entropy is the Balanced
    Softmax ``CE(z + o, y)`` with the offsets ``o`` of :func:`local_log_prior` (see there
    why); predictions and the penalties use the plain logits. It corrects the local prior,
    as ``class_weighting`` does, so the two are exclusive.

    Adam, gradient-norm clipping at ``clip_norm`` and a seeded shuffling generator, as in
    `edgekd.learn.training.kd_train`: the same model, data and seed give the same weights.
    ``before_task`` / ``after_task`` are *not* called here; they bracket a whole task, which
    may span several calls (federated rounds).

    Args:
        model: The student, trained in place.
        x, y: The task's (or this client's share of the task's) inputs and labels.
        regularizer: The anti-forgetting method.
        teacher_probs: ``[N, K]`` teacher probabilities for ``x``, softened at the
            regularizer's temperature; required when ``regularizer.needs_teacher``.
        epochs, lr, batch_size: Local training settings.
        seed: Seeds the batch order (and replay draws).
        alpha: Weight of the cross-entropy task loss, ``>= 0``.
        class_weighting: Inverse-frequency weighting of the CE term.
        max_class_weight: Bound on a class weight (see the kd function).
        clip_norm: Gradient-norm clip; ``<= 0`` disables it.
        active_classes: The classes the CE term may score (the classes seen so far);
            None scores all of them. Must include every label of ``y`` and of the replay
            samples.
        adjust_classes: The classes whose local prior the CE corrects (the current
            task's); None: plain CE.

    Returns:
        ``loss`` and ``penalty``: means over the samples of the last epoch; ``steps``.

    Raises:
        DivergenceError: When a loss turns non-finite.
        ValueError: For ``adjust_classes`` together with ``class_weighting``, and the input
            checks above.
    """
    _check_task_inputs(y, regularizer, teacher_probs, alpha, adjust_classes, class_weighting)
    if len(y) == 0:
        return {"loss": 0.0, "penalty": 0.0, "steps": 0.0}
    gen = torch.Generator().manual_seed(seed)
    data = _task_tensors(x, y, teacher_probs, class_weighting, max_class_weight, active_classes)
    if adjust_classes is not None:
        data = replace(data, log_prior=local_log_prior(y, adjust_classes, _num_outputs(model, x)))
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    steps = 0
    last_loss = last_penalty = 0.0
    for _ in range(epochs):
        loss_sum, penalty_sum, epoch_steps = _train_epoch(
            model,
            opt,
            params,
            regularizer,
            data,
            gen,
            batch_size=batch_size,
            alpha=alpha,
            clip_norm=clip_norm,
        )
        steps += epoch_steps
        last_loss, last_penalty = loss_sum / len(y), penalty_sum / len(y)
    model.eval()
    return {"loss": last_loss, "penalty": last_penalty, "steps": float(steps)}


@dataclass(frozen=True)
class _TaskTensors:
    """One task's training data as tensors: inputs, labels, the teacher's probabilities
    (if given), per-sample class weights (if class weighting is on) and the sorted classes
    the CE term scores (None: all)."""

    x: torch.Tensor
    y: torch.Tensor
    teacher_probs: torch.Tensor | None
    weights: torch.Tensor | None
    active: torch.Tensor | None = None
    log_prior: torch.Tensor | None = None  # [K], added to the logits inside the CE


def _check_task_inputs(
    y: np.ndarray,
    regularizer: ContinualRegularizer,
    teacher_probs: np.ndarray | None,
    alpha: float,
    adjust_classes: Sequence[int] | None = None,
    class_weighting: bool = False,
) -> None:
    """Refuse a negative ``alpha``, a missing teacher the regularizer needs, teacher
    probabilities whose row count does not match the labels, and two corrections of the
    class prior at once."""
    if adjust_classes is not None and class_weighting:
        raise ValueError(
            "adjust_classes and class_weighting both correct the class prior; pick one"
        )
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if regularizer.needs_teacher and teacher_probs is None:
        raise ValueError(f"method '{regularizer.name}' needs teacher_probs")
    if teacher_probs is not None and len(teacher_probs) != len(y):
        raise ValueError(f"teacher_probs has {len(teacher_probs)} rows for {len(y)} samples")


def _task_tensors(
    x: np.ndarray,
    y: np.ndarray,
    teacher_probs: np.ndarray | None,
    class_weighting: bool,
    max_class_weight: float,
    active_classes: Sequence[int] | None = None,
) -> _TaskTensors:
    """Wrap the task's arrays as tensors (sharing memory) and, with ``class_weighting``,
    give each sample its class's inverse-frequency weight."""
    yt = torch.from_numpy(y)
    weights = (
        sample_weights_for(
            yt, inverse_frequency_class_weights(y, int(y.max()) + 1, max_weight=max_class_weight)
        )
        if class_weighting
        else None
    )
    return _TaskTensors(
        x=torch.from_numpy(x),
        y=yt,
        teacher_probs=torch.from_numpy(teacher_probs) if teacher_probs is not None else None,
        weights=weights,
        active=(
            torch.tensor(sorted(set(active_classes)), dtype=torch.long)
            if active_classes is not None
            else None
        ),
    )


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    regularizer: ContinualRegularizer,
    data: _TaskTensors,
    gen: torch.Generator,
    *,
    batch_size: int,
    alpha: float,
    clip_norm: float,
) -> tuple[float, float, int]:
    """One pass over the task in a fresh ``gen``-seeded order, one optimizer step per
    batch. Returns the sample-weighted sums of the loss and of the penalty, and the
    number of steps."""
    order = torch.randperm(len(data.y), generator=gen)
    loss_sum = penalty_sum = 0.0
    steps = 0
    for start in range(0, len(data.y), batch_size):
        idx = order[start : start + batch_size]
        loss, penalty = _batch_loss(model, regularizer, data, idx, gen, alpha)
        if not torch.isfinite(loss):
            raise DivergenceError(f"non-finite loss {loss.item()} during continual training")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm > 0:
            nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        steps += 1
        loss_sum += float(loss.detach()) * len(idx)
        penalty_sum += float(penalty.detach()) * len(idx)
    return loss_sum, penalty_sum, steps


def _batch_loss(
    model: nn.Module,
    regularizer: ContinualRegularizer,
    data: _TaskTensors,
    idx: torch.Tensor,
    gen: torch.Generator,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of batch ``idx`` and its penalty part: the (weighted) cross-entropy over
    the batch plus the regularizer's replay samples (drawn from ``gen``; weight 1), times
    ``alpha``, plus the regularizer's penalty on the batch alone."""
    xb, yb = data.x[idx], data.y[idx]
    wb = data.weights[idx] if data.weights is not None else None
    extra = regularizer.extra_batch(len(idx), gen)
    if extra is not None:
        x_in, y_in = torch.cat([xb, extra[0]]), torch.cat([yb, extra[1]])
        if wb is not None:
            wb = torch.cat([wb, torch.ones(len(extra[1]), dtype=wb.dtype)])
    else:
        x_in, y_in = xb, yb
    logits = model(x_in)
    ce_logits = logits + data.log_prior if data.log_prior is not None else logits
    ce = _masked_cross_entropy(ce_logits, y_in, data.active)
    task_loss = (ce * wb).mean() if wb is not None else ce.mean()
    pt = data.teacher_probs
    penalty = regularizer.penalty(
        model, xb, logits[: len(idx)], yb, pt[idx] if pt is not None else None
    )
    return alpha * task_loss + penalty, penalty


def local_log_prior(
    y: np.ndarray, classes: Sequence[int], num_classes: int, pseudo_count: float = 1e-3
) -> torch.Tensor:
    """Logit offsets ``[num_classes]`` (float32) of a balanced softmax over ``classes``.

    ``o_c = log((n_c + pseudo_count) / max_k n_k)`` for ``c`` in ``classes``, where ``n``
    counts the labels ``y`` (the node's share of the task) among them, and ``o_c = 0`` for
    every other class. A class of the task the node holds none of gets a very negative
    offset: the node gives no evidence against it.

    This is Balanced Softmax (Ren et al., NeurIPS 2020) as FedLC applies it to label skew
    across clients (Zhang et al., ICML 2022). Among the task's classes ``CE(z + o, y)`` is
    minimised by a model whose own (unadjusted) probabilities are balanced, so a node
    holding mostly one class of the task no longer drives the other class's logit down;
    the federated average of such updates is what fails without it (measured: a naive
    federated run on Dirichlet-0.5 shares learned its second task to 0.72). Old classes
    keep offset 0, as frequent as the node's commonest class: their logits must still be
    pushed down on the new task's inputs, or a method whose penalty holds them up (LwF,
    EWC) never learns the new task (measured: with the old classes' offsets at their
    near-zero local prior, LwF's diagonal fell to 0.05).
    """
    counts = np.bincount(y, minlength=num_classes)[:num_classes].astype(np.float64)
    cls = np.asarray(sorted(set(classes)), dtype=np.int64)
    if len(cls) == 0 or cls.min() < 0 or cls.max() >= num_classes:
        raise ValueError(f"adjust_classes {cls.tolist()} must be non-empty, in [0, {num_classes})")
    offsets = np.zeros(num_classes)
    top = max(float(counts[cls].max()), pseudo_count)
    offsets[cls] = np.log((counts[cls] + pseudo_count) / top)
    return torch.tensor(offsets, dtype=torch.float32)


def _num_outputs(model: nn.Module, x: np.ndarray) -> int:
    """The number of logits ``model`` gives (one forward pass on one sample, no grad)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        k = int(model(torch.from_numpy(x[:1])).shape[1])
    model.train(was_training)
    return k


def _masked_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample CE of ``logits`` against ``y``, the softmax taken over the ``active``
    classes only (all when None); ``active`` is sorted and holds every label of ``y``.

    Without the mask, each task trains the head rows of classes that have not arrived to
    score low on every feature, and when such a class arrives the cheapest way to raise its
    logit is to switch the shared ReLU features off, which leaves nothing to tell its
    classes apart (measured: without it, a federated naive run lost 88 % of its features at
    the third task and learned it to 0.50, one class of two)."""
    if active is None:
        return F.cross_entropy(logits, y, reduction="none")
    if not bool(torch.isin(y, active).all()):
        missing = sorted(set(y.tolist()) - set(active.tolist()))
        raise ValueError(f"labels {missing} are not among the active classes {active.tolist()}")
    return F.cross_entropy(
        logits.index_select(1, active), torch.searchsorted(active, y), reduction="none"
    )


def evaluate_stream(
    model: nn.Module, stream: TaskStream, active_classes: Sequence[int] | None = None
) -> np.ndarray:
    """Top-1 accuracy on each task's test set; NaN for an empty test set.

    The argmax runs over one shared head, so class-incremental tasks are scored without
    being told the task: over *all* classes, or over ``active_classes`` (the classes seen
    so far) when given, as Avalanche's masked ``IncrementalClassifier`` predicts. A head
    row that has never been trained holds its random start, and as the features grow it
    can outscore the trained rows, so a learner that masks its loss must mask its
    predictions too. After the last task every class is active and nothing is masked.
    """
    acc = np.full(len(stream), np.nan)
    inactive = None
    if active_classes is not None:
        inactive = np.setdiff1d(np.arange(stream.num_classes), np.asarray(active_classes))
    for t, task in enumerate(stream):
        if len(task.y_test):
            logits = predict_logits(model, task.x_test)
            if inactive is not None:
                logits[:, inactive] = -np.inf
            acc[t] = float((logits.argmax(axis=1) == task.y_test).mean())
    return acc


def run_sequential(
    stream: TaskStream,
    method: str | ContinualRegularizer,
    model_factory: Callable[[], nn.Module],
    teacher_probs_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    epochs: int = 3,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    alpha: float = 1.0,
    class_weighting: bool = False,
    regularizer_kwargs: dict[str, Any] | None = None,
    mask_unseen: bool = True,
    logit_adjust: bool = False,
) -> dict[str, Any]:
    """Train one model on the tasks of ``stream`` in order, without federation.

    The model comes from ``model_factory()`` after seeding torch with ``seed``; its accuracy
    before any training is the forward-transfer baseline ``b``. After each task ``i`` the
    model is scored on every task, giving row ``i`` of the accuracy matrix ``R``.

    Args:
        stream: The tasks.
        method: A regularizer name for `make_regularizer` (with ``regularizer_kwargs``) or a
            regularizer object (used as is, and mutated).
        model_factory: Builds the untrained student.
        teacher_probs_fn: ``x -> teacher probabilities`` at the regularizer's temperature;
            called on each task's training inputs when the regularizer uses teacher
            probabilities, required when it needs them (teacher-kd without a proxy set).
        epochs, lr, batch_size, alpha, class_weighting: Passed to :func:`train_task`.
        seed: Seeds the model initialisation and each task's batch order.
        regularizer_kwargs: Keyword arguments for `make_regularizer`.
        mask_unseen: Give :func:`train_task` the classes seen so far as
            ``active_classes`` (see there).
        logit_adjust: Give :func:`train_task` each task's classes as ``adjust_classes``.
            One learner sees each task's whole data, so this is for comparing with a
            federated run, not a fix it needs.

    Returns:
        :func:`~edgekd.continual.metrics.summarize` of ``R`` and ``b`` plus ``method``,
        ``scenario``, ``baseline`` (``b`` as a list), ``train`` (per-task train_task output)
        and ``wall_time_s``.
    """
    start = time.perf_counter()
    regularizer = _regularizer_for(method, regularizer_kwargs)
    if regularizer.needs_teacher and teacher_probs_fn is None:
        raise ValueError(f"method '{regularizer.name}' needs a teacher_probs_fn")
    seed_everything(seed)
    model = model_factory()
    baseline = evaluate_stream(model, stream, _active(stream, 0, mask_unseen))
    rows = []
    train_logs = []
    for task in stream:
        regularizer.before_task(model, task)
        probs = _task_teacher_probs(regularizer, teacher_probs_fn, task.x_train)
        task_seed = int(np.random.SeedSequence([seed, task.id]).generate_state(1)[0])
        train_logs.append(
            train_task(
                model,
                task.x_train,
                task.y_train,
                regularizer,
                teacher_probs=probs,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                seed=task_seed,
                alpha=alpha,
                class_weighting=class_weighting,
                active_classes=_active(stream, task.id, mask_unseen),
                adjust_classes=task.classes if logit_adjust else None,
            )
        )
        regularizer.after_task(model, task, task.x_train, task.y_train)
        rows.append(evaluate_stream(model, stream, _active(stream, task.id, mask_unseen)))
    return {
        **summarize(np.stack(rows), baseline),
        "method": regularizer.name,
        "scenario": stream.scenario,
        "baseline": baseline.tolist(),
        "train": train_logs,
        "wall_time_s": time.perf_counter() - start,
    }


def _active(stream: TaskStream, task_id: int, mask_unseen: bool) -> tuple[int, ...] | None:
    """The classes seen by the end of task ``task_id`` with ``mask_unseen``, else None."""
    return stream.classes_up_to(task_id) if mask_unseen else None


def _regularizer_for(
    method: str | ContinualRegularizer, regularizer_kwargs: dict[str, Any] | None
) -> ContinualRegularizer:
    """``method`` itself when it is a regularizer object, else `make_regularizer` of the
    name with ``regularizer_kwargs``."""
    if isinstance(method, ContinualRegularizer):
        return method
    return make_regularizer(method, **(regularizer_kwargs or {}))


def _task_teacher_probs(
    regularizer: ContinualRegularizer,
    teacher_probs_fn: Callable[[np.ndarray], np.ndarray] | None,
    x_train: np.ndarray,
) -> np.ndarray | None:
    """The teacher's probabilities on a task's training inputs when the regularizer uses
    them and a teacher is given, else None."""
    if regularizer.uses_teacher_probs and teacher_probs_fn is not None:
        return teacher_probs_fn(x_train)
    return None
