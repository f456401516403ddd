"""Task streams for continual learning (numpy only; no torch, no flwr).

A :class:`TaskStream` is an ordered tuple of :class:`Task` objects, each with its own train
and test split. Two scenarios, in the terms of van de Ven, Tuytelaars & Tolias, "Three types
of incremental learning" (Nature Machine Intelligence 2022):

* **class-incremental**: the classes arrive in consecutive groups (mnist1d: ``{0,1}``,
  ``{2,3}``, ...); one single head over all classes is evaluated on every task, so a model
  must tell old classes from new ones without being told the task.
* **domain-incremental**: the same 10 mnist1d classes in every task, under a growing
  amount of correlated noise, i.i.d. noise and shear (task 0 = the mnist1d package's
  defaults, the last task = :data:`DOMAIN_HARDEST`).

Everything is a pure function of its arguments and seed, and nothing is downloaded: mnist1d
is generated locally by the ``mnist1d`` package (Greydanus & Kobak, ICML 2024).
:func:`task_client_split` cuts one task's training data into a client's non-IID share with
the same flwr-datasets partitioners as the rest of edgekd, so a federated client rebuilds
its own share of each task from ``(seed, task id, client id, num_clients)`` alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgekd.core.config import CONTINUAL_SCENARIOS
from edgekd.core.data import ArrayDataset, _mnist1d, generate_mnist1d, partition_of

__all__ = [
    "DOMAIN_HARDEST",
    "SCENARIOS",
    "Task",
    "TaskStream",
    "class_incremental_stream",
    "domain_incremental_stream",
    "domain_task_args",
    "make_stream",
    "task_client_split",
]

SCENARIOS = CONTINUAL_SCENARIOS  # one list: the config validates against it

# mnist1d's own defaults (``get_dataset_args()``), the easiest domain and task 0.
_DOMAIN_EASIEST = {"corr_noise_scale": 0.25, "iid_noise_scale": 0.02, "shear_scale": 0.75}
# The last domain-incremental task. Chosen by a trial (width-16 CNN, 1 600 training samples
# per task, 15 epochs): trained on task 0 it drops from ~0.71 on task 0 to ~0.41 here, while
# a model trained on this task itself still reaches ~0.40, far above chance (0.10). Harder
# settings (noise 0.6, shear 1.5) left the last task barely learnable (~0.19).
DOMAIN_HARDEST = {"corr_noise_scale": 0.40, "iid_noise_scale": 0.05, "shear_scale": 1.0}
# mnist1d's train/test split inside ``make_dataset``.
_TRAIN_SPLIT = 0.8


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a stream: the classes it contains and its train/test arrays.

    ``x_*`` are float32 ``[N, C, L]`` inputs, ``y_*`` int64 ``[N]`` labels in the stream's
    global label space (class-incremental tasks are *not* relabelled to ``0..k-1``).
    """

    id: int
    name: str
    classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def train(self) -> ArrayDataset:
        return ArrayDataset(self.x_train, self.y_train)

    @property
    def test(self) -> ArrayDataset:
        return ArrayDataset(self.x_test, self.y_test)


@dataclass(frozen=True, eq=False)
class TaskStream:
    """Tasks in training order, with the shape information a model factory needs."""

    tasks: tuple[Task, ...]
    num_classes: int
    input_shape: tuple[int, ...]
    scenario: str

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    def classes_up_to(self, task_id: int) -> tuple[int, ...]:
        """The classes of tasks ``0..task_id``, sorted: what a learner has seen by the end
        of task ``task_id``."""
        if not 0 <= task_id < len(self.tasks):
            raise ValueError(f"task {task_id} outside the stream's {len(self.tasks)} tasks")
        return tuple(sorted({c for task in self.tasks[: task_id + 1] for c in task.classes}))


def class_incremental_stream(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_tasks: int = 5,
    num_classes: int = 10,
) -> TaskStream:
    """Split a labelled dataset into ``num_tasks`` tasks of consecutive, disjoint classes.

    Task ``t`` holds the classes of ``np.array_split(range(num_classes), num_tasks)[t]``:
    mnist1d's 10 classes in 5 tasks give ``{0,1}, {2,3}, {4,5}, {6,7}, {8,9}``; a class
    count that does not divide evenly gives the first tasks one class more. The split
    follows the "Split MNIST" protocol (Zenke, Poole & Ganguli, ICML 2017).

    Args:
        x, y: Training inputs ``[N, ...]`` and integer labels ``[N]`` in ``[0, num_classes)``.
        x_test, y_test: Test inputs and labels.
        num_tasks: Number of tasks, ``1 <= num_tasks <= num_classes``.
        num_classes: Number of classes in the label space.

    Returns:
        A ``"class-incremental"`` stream.
    """
    if not 1 <= num_tasks <= num_classes:
        raise ValueError(f"num_tasks must lie in [1, {num_classes}], got {num_tasks}")
    for name, labels in (("y", y), ("y_test", y_test)):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    tasks = []
    for t, group in enumerate(np.array_split(np.arange(num_classes), num_tasks)):
        classes = tuple(int(c) for c in group)
        train = np.isin(y, group)
        test = np.isin(y_test, group)
        tasks.append(
            Task(
                id=t,
                name=f"classes-{'-'.join(str(c) for c in classes)}",
                classes=classes,
                x_train=x[train],
                y_train=y[train],
                x_test=x_test[test],
                y_test=y_test[test],
            )
        )
    return TaskStream(tuple(tasks), num_classes, tuple(int(s) for s in x.shape[1:]), SCENARIOS[0])


def domain_task_args(task_id: int, num_tasks: int) -> dict[str, float]:
    """mnist1d noise and shear scales of domain-incremental task ``task_id``.

    Linear in the task index: ``s_t = s_0 + t / (T - 1) * (s_hard - s_0)`` for each scale,
    with ``s_0`` the mnist1d defaults and ``s_hard`` :data:`DOMAIN_HARDEST`; a one-task
    stream is just the defaults.
    """
    if not 0 <= task_id < num_tasks:
        raise ValueError(f"task_id {task_id} outside [0, {num_tasks})")
    frac = task_id / (num_tasks - 1) if num_tasks > 1 else 0.0
    return {k: v + frac * (DOMAIN_HARDEST[k] - v) for k, v in _DOMAIN_EASIEST.items()}


def domain_incremental_stream(
    num_tasks: int = 5, num_samples: int = 4000, seed: int = 0
) -> TaskStream:
    """The 10 mnist1d classes under noise and shear that grow linearly with the task.

    Each task draws ``num_samples`` fresh samples (80 % train, 20 % test, mnist1d's split)
    with the scales of :func:`domain_task_args` and its own seed, derived from
    ``(seed, task id)``, so no two tasks share a sample.

    Args:
        num_tasks: Number of tasks (domains), ``>= 1``.
        num_samples: Samples generated per task (train + test).
        seed: Stream seed.

    Returns:
        A ``"domain-incremental"`` stream.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    tasks = []
    for t in range(num_tasks):
        scales = domain_task_args(t, num_tasks)
        task_seed = int(np.random.SeedSequence([seed, 7, t]).generate_state(1)[0])
        x_train, y_train, x_test, y_test = _mnist1d_domain(num_samples, task_seed, scales)
        tasks.append(
            Task(
                id=t,
                name=f"domain-{t}",
                classes=tuple(range(10)),
                x_train=x_train,
                y_train=y_train,
                x_test=x_test,
                y_test=y_test,
            )
        )
    shape = tuple(int(s) for s in tasks[0].x_train.shape[1:])
    return TaskStream(tuple(tasks), 10, shape, SCENARIOS[1])


def _mnist1d_domain(
    num_samples: int, seed: int, scales: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mnist1d with the given noise/shear scales, as (x_train, y_train, x_test, y_test),
    cached on disk by `edgekd.core.data.generate_mnist1d`."""
    raw = generate_mnist1d({"num_samples": num_samples, "seed": seed, **scales})
    return raw["x"], raw["y"], raw["x_test"], raw["y_test"]


def task_client_split(
    task: Task, partition: str, client_id: int, num_clients: int, seed: int
) -> ArrayDataset:
    """One client's non-IID share of ``task``'s training set.

    The partition is `edgekd.core.data.partition_of` (flwr-datasets' IID, Dirichlet
    or pathological partitioner) on the task's labels, seeded by ``(seed, task.id)`` so each
    task is cut afresh while every client computes the same cut without coordination. A
    pure function of ``(task, partition, client_id, num_clients, seed)``.

    Note that a Dirichlet share of a 2-class task may be empty, and ``pathological:<k>``
    needs ``k`` no larger than the task's class count.

    Args:
        task: The task whose training split is cut.
        partition: ``"iid"``, ``"dirichlet:<alpha>"`` or ``"pathological:<k>"``.
        client_id: This client's index in ``[0, num_clients)``.
        num_clients: Number of clients sharing the task.
        seed: Run seed.

    Returns:
        The client's ``(x, y)`` in a stable, seeded order.
    """
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id {client_id} outside [0, {num_clients})")
    task_seed = int(np.random.SeedSequence([seed, 11, task.id]).generate_state(1)[0])
    index = partition_of(task.y_train, partition, num_clients, task_seed, client_id)
    # A permutation of positions, not of ``index`` itself: the partitioner's share is cached
    # read-only, and numpy shuffles an empty array in place (it copies any other).
    order = np.random.default_rng([seed, 13, task.id, client_id]).permutation(len(index))
    return task.train.subset(index[order])


def make_stream(
    scenario: str, num_tasks: int = 5, seed: int = 0, num_samples: int = 4000
) -> TaskStream:
    """Build a named mnist1d stream.

    * ``"class-incremental"``: ``num_samples`` samples of the plain mnist1d domain (the
      server domain of `edgekd.core.data`, disk-cached there), shuffled by ``seed`` into
      80 % train / 20 % test, then split by :func:`class_incremental_stream`.
    * ``"domain-incremental"``: :func:`domain_incremental_stream` with ``num_samples``
      samples *per task*.

    Raises:
        ValueError: For any other scenario name.
    """
    if scenario == "class-incremental":
        x, y = _mnist1d(num_samples, seed, shift=False)
        order = np.random.default_rng([seed, 5]).permutation(len(y))
        n_train = int(round(_TRAIN_SPLIT * len(y)))
        tr, te = order[:n_train], order[n_train:]
        return class_incremental_stream(x[tr], y[tr], x[te], y[te], num_tasks, num_classes=10)
    if scenario == "domain-incremental":
        return domain_incremental_stream(num_tasks, num_samples, seed)
    raise ValueError(f"unknown continual scenario '{scenario}'; expected one of {SCENARIOS}")
