"""Anti-forgetting regularizers: the math, apart from any training loop or Flower adapter.

Each regularizer is a plain object (the Avalanche pattern: the penalty lives here, a
plugin or ClientApp only calls it) with one protocol, :class:`ContinualRegularizer`:

* ``before_task(model, task)``: called once when a task starts (e.g. LwF's snapshot);
* ``penalty(model, x, logits, y, teacher_probs=None)``: the extra loss added to the task
  loss on one batch of the current task;
* ``extra_batch(batch_size, generator)``: extra ``(x, y)`` joined to every batch (replay);
* ``after_task(model, task, x_train, y_train)``: called once when a task ends, with the
  data it was trained on (EWC's Fisher, the replay buffer);
* ``state_dict()`` / ``load_state_dict(d)``: everything carried between tasks as
  ``dict[str, np.ndarray]``, so a Flower client can keep it in ``context.state`` between
  rounds (a ``RecordDict`` holds numpy arrays) and a device without pickle can store it.

In a federated run ``before_task`` and ``after_task`` bracket the *task*, not each round:
a client calls them on the first and last round of a task and keeps the state in between.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from edgekd.continual.streams import Task
from edgekd.learn.kd import per_sample_kl

__all__ = [
    "EWC",
    "REGULARIZERS",
    "ContinualRegularizer",
    "LwF",
    "LwFProxy",
    "NaiveFineTuning",
    "Replay",
    "ReplayProxy",
    "TeacherKD",
    "empirical_fisher",
    "make_regularizer",
    "tempered_kl",
]


def tempered_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation term ``tau^2 * mean_i KL(p_t,i || softmax(z_i / tau))``.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (2015)::

        KL(p_t || p_s) = sum_c p_t,c * (log p_t,c - log p_s,c),    p_s = softmax(z / tau),

    averaged over the batch; ``tau^2`` keeps the gradient ``tau * (p_s - p_t) / B`` on the
    scale of a cross-entropy gradient. ``teacher_probs`` are already softened at ``tau``;
    exact zeros are allowed (``0 * log 0 = 0``). This is the KD half of
    `edgekd.learn.kd.class_balanced_kd_loss`, without the CE term, which would need labels
    inside the (possibly restricted) class set.

    Args:
        student_logits: ``[B, K]`` logits.
        teacher_probs: ``[B, K]`` probabilities.
        temperature: ``tau > 0``.

    Returns:
        Scalar tensor.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"teacher_probs shape {tuple(teacher_probs.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    return temperature**2 * per_sample_kl(student_logits, teacher_probs, temperature).mean()


class ContinualRegularizer:
    """Base protocol with no-op defaults; it is also naive fine-tuning."""

    name: ClassVar[str] = "naive"
    # True when `penalty` may use the teacher's soft targets for the batch: a runner then
    # computes them (and must, when ``needs_teacher`` is also True).
    uses_teacher_probs: ClassVar[bool] = False
    needs_teacher: bool = False

    def before_task(self, model: nn.Module, task: Task) -> None:
        """Called once before training on ``task`` starts."""

    def penalty(
        self, model: nn.Module, x: Tensor, logits: Tensor, y: Tensor, teacher_probs: Tensor | None
    ) -> Tensor:
        """Extra loss on a batch of the current task (``logits = model(x)``)."""
        return logits.new_zeros(())

    def extra_batch(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor] | None:
        """Extra ``(x, y)`` to join to a batch of ``batch_size`` samples, or None."""
        return None

    def after_task(
        self, model: nn.Module, task: Task, x_train: np.ndarray, y_train: np.ndarray
    ) -> None:
        """Called once after training on ``task`` (on the data it was trained on)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """State carried between tasks and rounds, as numpy arrays only."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned."""


class NaiveFineTuning(ContinualRegularizer):
    """Plain fine-tuning on each task in turn: penalty 0, the lower bound every method beats."""


class TeacherKD(ContinualRegularizer):
    """Distillation from a teacher that knows every class and domain::

        penalty = weight * tau^2 * ( mean_{i in B} KL(p_t,i^tau || softmax(z_i / tau))
                                   + mean_{k in P} KL(p_t,k^tau || softmax(z_k / tau)) ),

    Hinton et al. (2015). ``B`` is the current batch, whose teacher probabilities (already
    softened at ``temperature``) arrive with it, as in edgekd's ``on-device`` soft-target
    mode. ``P`` is an optional batch of the same size drawn from a *proxy set* with the
    teacher's probabilities on it, as in the ``proxy`` mode where the server ships them
    with a public set; either term may be absent, not both.

    Unlike LwF's frozen copy of the student, the teacher (the server's large model) was
    trained on all classes or domains. On the current batch its soft targets carry how
    much each old class resembles a new sample, which holds old-class logits in place under
    a domain shift; but in a class-incremental stream the current batch holds no old-class
    sample, so that term cannot keep old decision boundaries (it measured no better than
    naive fine-tuning on split mnist1d, in line with van de Ven et al., "Three types of
    incremental learning", 2022). The proxy term covers every class, which is what
    rehearsal-free class-incremental distillation needs (Lee et al., "Overcoming
    Catastrophic Forgetting With Unlabeled Data in the Wild", ICCV 2019).

    With the task loss weighted ``alpha``, ``weight = 1 - alpha`` and no proxy the sum is
    exactly `edgekd.learn.kd.class_balanced_kd_loss` without class weights.
    """

    name = "teacher-kd"
    uses_teacher_probs = True

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 4.0,
        *,
        proxy_x: np.ndarray | None = None,
        proxy_probs: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        """Configure the KD terms.

        Args:
            weight: Multiplier of the KD terms, ``>= 0``.
            temperature: ``tau`` at which all teacher probabilities were softened.
            proxy_x, proxy_probs: Optional proxy inputs ``[M, ...]`` and teacher
                probabilities ``[M, K]``; with them batches need no teacher probabilities.
            seed: Seeds the proxy batch draws (a generator of its own, so the training
                loop's batch order is the same with and without a proxy).
        """
        _check_kd_args(weight, temperature)
        self.weight = weight
        self.temperature = temperature
        self._generator = torch.Generator().manual_seed(seed)
        self._proxy: tuple[Tensor, Tensor] | None = None
        self.set_proxy(proxy_x, proxy_probs)

    def set_proxy(self, proxy_x: np.ndarray | None, proxy_probs: np.ndarray | None) -> None:
        """Replace the proxy set (e.g. with the one shipped in this round); None removes it."""
        if (proxy_x is None) != (proxy_probs is None):
            raise ValueError("give both proxy_x and proxy_probs, or neither")
        if proxy_x is None or proxy_probs is None:
            self._proxy = None
        elif len(proxy_x) != len(proxy_probs) or len(proxy_x) == 0:
            raise ValueError(
                f"proxy_x ({len(proxy_x)}) and proxy_probs ({len(proxy_probs)}) must have the "
                "same, non-zero length"
            )
        else:
            self._proxy = (torch.from_numpy(proxy_x), torch.from_numpy(proxy_probs))
        # Without a proxy every batch must bring its own teacher probabilities.
        self.needs_teacher = self._proxy is None

    def penalty(
        self, model: nn.Module, x: Tensor, logits: Tensor, y: Tensor, teacher_probs: Tensor | None
    ) -> Tensor:
        if teacher_probs is None and self._proxy is None:
            raise ValueError("teacher-kd needs teacher_probs for every batch, or a proxy set")
        total = logits.new_zeros(())
        if teacher_probs is not None:
            total = total + tempered_kl(logits, teacher_probs, self.temperature)
        if self._proxy is not None:
            proxy_x, proxy_probs = self._proxy
            pick = torch.randperm(len(proxy_probs), generator=self._generator)[: len(x)]
            total = total + tempered_kl(model(proxy_x[pick]), proxy_probs[pick], self.temperature)
        return self.weight * total


class LwF(ContinualRegularizer):
    """Learning without Forgetting, Li & Hoiem (ECCV 2016 / TPAMI 2017)::

        penalty = weight * tau^2 * mean_i KL(softmax(z_old,i[S] / tau) || softmax(z_i[S] / tau)),

    where ``z_old`` are the logits of a frozen snapshot of the student taken when the task
    starts and ``S`` the classes of the tasks *before* it, the only ones the snapshot
    learned (logits are restricted to ``S`` before the softmax, as the paper's old-task
    head). The first task has no ``S`` and no penalty. The snapshot is kept as a parameter
    dict and run with ``torch.func.functional_call``, so no model copy is needed.
    """

    name = "lwf"

    def __init__(self, weight: float = 1.0, temperature: float = 2.0) -> None:
        _check_kd_args(weight, temperature)
        self.weight = weight
        self.temperature = temperature
        self._seen: list[int] = []
        self._snapshot: dict[str, Tensor] | None = None

    @property
    def seen_classes(self) -> tuple[int, ...]:
        return tuple(self._seen)

    def before_task(self, model: nn.Module, task: Task) -> None:
        self._snapshot = (
            {k: v.detach().clone() for k, v in model.state_dict().items()} if self._seen else None
        )

    def penalty(
        self, model: nn.Module, x: Tensor, logits: Tensor, y: Tensor, teacher_probs: Tensor | None
    ) -> Tensor:
        if self._snapshot is None or not self._seen:
            return logits.new_zeros(())
        seen = torch.tensor(self._seen, dtype=torch.long, device=logits.device)
        with torch.no_grad():
            old_logits = functional_call(model, self._snapshot, (x,))
            old_probs = F.softmax(old_logits.index_select(1, seen) / self.temperature, dim=-1)
        return self.weight * tempered_kl(logits.index_select(1, seen), old_probs, self.temperature)

    def after_task(
        self, model: nn.Module, task: Task, x_train: np.ndarray, y_train: np.ndarray
    ) -> None:
        self._seen = sorted(set(self._seen) | set(task.classes))

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"seen_classes": np.asarray(self._seen, dtype=np.int64)}
        if self._snapshot is not None:
            state.update({f"snapshot.{k}": v.cpu().numpy() for k, v in self._snapshot.items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._seen = [int(c) for c in state["seen_classes"]]
        snap = {k[len("snapshot.") :]: v for k, v in state.items() if k.startswith("snapshot.")}
        self._snapshot = {k: torch.from_numpy(np.array(v)) for k, v in snap.items()} or None


class LwFProxy(LwF):
    """LwF that also distils its old self on the teacher-kd proxy inputs::

        penalty = LwF's term on the batch
                + weight * tau^2 * mean_{k in P} KL(softmax(z_old,k[S] / tau)
                                                    || softmax(z_k[S] / tau)),

    ``P`` a batch of the same size drawn from the proxy inputs (their teacher probabilities
    are not used). This is the comparator that gets the same data as :class:`TeacherKD`
    with the student's snapshot in the teacher's place, the global distillation on unlabelled
    data of Lee et al. (ICCV 2019) without their teacher ensemble; teacher-kd's lead over it
    is the teacher's share of the gain, not the data's.
    """

    name = "lwf-proxy"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 2.0,
        *,
        proxy_x: np.ndarray,
        seed: int = 0,
    ) -> None:
        super().__init__(weight, temperature)
        if len(proxy_x) == 0:
            raise ValueError("lwf-proxy needs a non-empty proxy set")
        self._proxy_x = torch.from_numpy(proxy_x)
        self._generator = torch.Generator().manual_seed(seed)

    def penalty(
        self, model: nn.Module, x: Tensor, logits: Tensor, y: Tensor, teacher_probs: Tensor | None
    ) -> Tensor:
        own = super().penalty(model, x, logits, y, teacher_probs)
        if self._snapshot is None or not self._seen:
            return own
        pick = torch.randperm(len(self._proxy_x), generator=self._generator)[: len(x)]
        px = self._proxy_x[pick]
        return own + super().penalty(model, px, model(px), y, None)


class EWC(ContinualRegularizer):
    """Elastic Weight Consolidation, Kirkpatrick et al. (PNAS 2017), online form::

        penalty = (weight / 2) * sum_i F_i * (theta_i - theta*_i)^2,
        F_i    = sum_{tasks t} mean_{(x, y) in t} (d log p(y | x) / d theta_i)^2,

    the diagonal *empirical* Fisher (squared per-sample gradients of the log-likelihood of
    the true label) at the end of each task, *summed* over tasks, with ``theta*`` the
    parameters after the latest task. This is online EWC with decay ``gamma = 1`` (Schwarz
    et al., "Progress & Compress", ICML 2018; Huszár, PNAS 2018): one Fisher and one anchor
    whatever the number of tasks, which is what a memory-bound device can store, instead of
    the original one quadratic term per task. Per-sample gradients use ``torch.func.vmap``.
    """

    name = "ewc"

    def __init__(self, weight: float = 100.0, max_fisher_samples: int = 2000) -> None:
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if max_fisher_samples < 1:
            raise ValueError(f"max_fisher_samples must be >= 1, got {max_fisher_samples}")
        self.weight = weight
        self.max_fisher_samples = max_fisher_samples
        self._fisher: dict[str, Tensor] = {}
        self._anchor: dict[str, Tensor] = {}

    def penalty(
        self, model: nn.Module, x: Tensor, logits: Tensor, y: Tensor, teacher_probs: Tensor | None
    ) -> Tensor:
        if not self._fisher:
            return logits.new_zeros(())
        total = logits.new_zeros(())
        for name, param in model.named_parameters():
            if name in self._fisher:
                total = total + (self._fisher[name] * (param - self._anchor[name]) ** 2).sum()
        return 0.5 * self.weight * total

    def after_task(
        self, model: nn.Module, task: Task, x_train: np.ndarray, y_train: np.ndarray
    ) -> None:
        fisher = empirical_fisher(model, x_train, y_train, self.max_fisher_samples)
        for name, value in fisher.items():
            self._fisher[name] = self._fisher.get(name, torch.zeros_like(value)) + value
        self._anchor = {k: v.detach().clone() for k, v in model.named_parameters()}

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"fisher.{k}": v.cpu().numpy() for k, v in self._fisher.items()}
        state.update({f"anchor.{k}": v.cpu().numpy() for k, v in self._anchor.items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._fisher = _unprefix(state, "fisher.")
        self._anchor = _unprefix(state, "anchor.")


def empirical_fisher(
    model: nn.Module, x: np.ndarray, y: np.ndarray, max_samples: int = 2000, chunk: int = 256
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher ``mean_n (d log p(y_n | x_n) / d theta)^2`` per parameter.

    At most ``max_samples`` evenly spaced samples are used (deterministic, no RNG), in
    chunks of ``chunk`` per-sample gradients to bound memory.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    if len(y) == 0:
        return fisher
    index = np.unique(np.linspace(0, len(y) - 1, min(len(y), max_samples)).round().astype(int))

    def log_likelihood(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        # gather, not [0, yi]: vmap cannot index with a batched tensor's value.
        return F.log_softmax(out[0], dim=-1).gather(0, yi.reshape(1))[0]

    per_sample_grad = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(index), chunk):
            sel = index[start : start + chunk]
            grads = per_sample_grad(params, torch.from_numpy(x[sel]), torch.from_numpy(y[sel]))
            for k, g in grads.items():
                fisher[k] += (g**2).sum(dim=0)
    finally:
        model.train(was_training)
    return {k: v / len(index) for k, v in fisher.items()}


class Replay(ContinualRegularizer):
    """Experience replay with a reservoir buffer, as in Chaudhry et al., "On Tiny Episodic
    Memories in Continual Learning" (2019).

    The buffer keeps a uniform sample of all training samples seen so far by reservoir
    sampling (Vitter, "Random Sampling with a Reservoir", ACM TOMS 1985, algorithm R): the
    ``n``-th sample (0-based) fills slot ``n`` while ``n < buffer_size``, and afterwards
    replaces slot ``j ~ U{0..n}`` when ``j < buffer_size``. Samples enter in
    :meth:`after_task`, so a task never replays itself. The random draws of one call come
    from a generator seeded with ``(seed, samples seen before the call)``, so the buffer is
    a pure function of the seed and the data, and needs no RNG state in :meth:`state_dict`.

    Replay adds no penalty. Instead :meth:`extra_batch` returns ``min(B, |buffer|)`` buffer
    samples drawn without replacement by the training loop's generator, which the loop
    concatenates to the ``B`` current samples; the task loss is the mean over the joined
    batch, so old and new samples weigh the same.
    """

    name = "replay"

    def __init__(self, buffer_size: int = 200, seed: int = 0) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.buffer_size = buffer_size
        self.seed = seed
        self._x: np.ndarray | None = None
        self._y = np.zeros(0, dtype=np.int64)
        self._n_seen = 0

    def __len__(self) -> int:
        return len(self._y)

    @property
    def samples_seen(self) -> int:
        return self._n_seen

    def buffer(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the buffered ``(x, y)``."""
        x = self._x if self._x is not None else np.zeros((0,), dtype=np.float32)
        return x.copy(), self._y.copy()

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Stream ``(x, y)`` through algorithm R."""
        if len(y) == 0:
            return
        k = self.buffer_size
        if self._x is None:
            self._x = np.zeros((0, *x.shape[1:]), dtype=x.dtype)
        rng = np.random.default_rng([self.seed, self._n_seen])
        # While the buffer is not full, algorithm R keeps every sample: append them at once.
        fill = min(max(k - self._n_seen, 0), len(y))
        if fill:
            self._x = np.concatenate([self._x, x[:fill]])
            self._y = np.concatenate([self._y, y[:fill].astype(np.int64)])
        self._n_seen += fill
        for i in range(fill, len(y)):
            j = int(rng.integers(0, self._n_seen + 1))
            if j < k:
                self._x[j] = x[i]
                self._y[j] = y[i]
            self._n_seen += 1

    def after_task(
        self, model: nn.Module, task: Task, x_train: np.ndarray, y_train: np.ndarray
    ) -> None:
        self.add(x_train, y_train)

    def extra_batch(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor] | None:
        if self._x is None or len(self._y) == 0:
            return None
        pick = torch.randperm(len(self._y), generator=generator)[:batch_size].numpy()
        return torch.from_numpy(self._x[pick]), torch.from_numpy(self._y[pick])

    def state_dict(self) -> dict[str, np.ndarray]:
        x, y = self.buffer()
        return {"x": x, "y": y, "n_seen": np.asarray(self._n_seen, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        y = np.asarray(state["y"], dtype=np.int64)
        self._y = y.copy()
        self._x = np.array(state["x"]) if len(y) else None
        self._n_seen = int(state["n_seen"])


class ReplayProxy(ContinualRegularizer):
    """Replay drawn from the teacher-kd proxy set instead of a buffer of the node's own data:
    each batch is joined by ``min(B, |pool|)`` proxy inputs whose teacher label (the argmax
    of their teacher probabilities) is a class of a task already trained, with that label.

    The comparator that gets the same data as :class:`TeacherKD` and the teacher's hard
    labels in place of its soft targets; it stores nothing of the node's own data. Its
    state is the classes seen so far.
    """

    name = "replay-proxy"

    def __init__(self, *, proxy_x: np.ndarray, proxy_probs: np.ndarray) -> None:
        if len(proxy_x) == 0 or len(proxy_x) != len(proxy_probs):
            raise ValueError(
                f"proxy_x ({len(proxy_x)}) and proxy_probs ({len(proxy_probs)}) must have the "
                "same, non-zero length"
            )
        self._x = proxy_x
        self._labels = np.asarray(proxy_probs).argmax(axis=1).astype(np.int64)
        self._set_seen([])

    def _set_seen(self, seen: Iterable[int]) -> None:
        self._seen = sorted({int(c) for c in seen})
        self._pool = np.flatnonzero(np.isin(self._labels, self._seen))  # once, not per batch

    @property
    def seen_classes(self) -> tuple[int, ...]:
        return tuple(self._seen)

    def pool(self) -> np.ndarray:
        """Indices of the proxy samples that may be replayed now."""
        return self._pool

    def after_task(
        self, model: nn.Module, task: Task, x_train: np.ndarray, y_train: np.ndarray
    ) -> None:
        self._set_seen([*self._seen, *task.classes])

    def extra_batch(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor] | None:
        pool = self.pool()
        if len(pool) == 0:
            return None
        pick = pool[torch.randperm(len(pool), generator=generator)[:batch_size].numpy()]
        return torch.from_numpy(self._x[pick]), torch.from_numpy(self._labels[pick])

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"seen_classes": np.asarray(self._seen, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._set_seen(state["seen_classes"])


def _unprefix(state: dict[str, np.ndarray], prefix: str) -> dict[str, Tensor]:
    return {
        k[len(prefix) :]: torch.from_numpy(np.array(v))
        for k, v in state.items()
        if k.startswith(prefix)
    }


REGULARIZERS: dict[str, type[ContinualRegularizer]] = {
    "naive": NaiveFineTuning,
    "teacher-kd": TeacherKD,
    "lwf": LwF,
    "ewc": EWC,
    "replay": Replay,
    "lwf-proxy": LwFProxy,
    "replay-proxy": ReplayProxy,
}


def _check_kd_args(weight: float, temperature: float) -> None:
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def make_regularizer(name: str, **kwargs: Any) -> ContinualRegularizer:
    """Build a regularizer by name (``naive``, ``teacher-kd``, ``lwf``, ``ewc``, ``replay``,
    ``lwf-proxy``, ``replay-proxy``).

    Keyword arguments go to the class (e.g. ``weight``, ``temperature``, ``buffer_size``).

    Raises:
        ValueError: For an unknown name.
    """
    try:
        cls = REGULARIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown continual method '{name}'; expected one of {sorted(REGULARIZERS)}"
        ) from None
    return cls(**kwargs)
