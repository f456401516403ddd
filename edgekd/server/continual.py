"""The continual server side: a federation that moves through a stream of tasks.

`run_continual` is the server side of a continual run; the edgekd ServerApp
(`edgekd.server.app`) calls it when ``continual.scenario`` is set:

1. **Streams**: the clients' stream and the server's own disjoint draw of every task, both
   rebuilt from the config (`edgekd.continual.scenario`); nothing travels but models.
2. **Teacher**: trained (or loaded with ``model.teacher-path``) on the server's draw of *all*
   tasks, so it knows every class and domain the students will meet one at a time.
3. **Federation** per method: ``tasks x rounds-per-task`` FedAvg rounds from the same random
   initialisation. `ContinualStrategy` tells every node which task a round trains on and, for
   ``teacher-kd``, ships the teacher's probabilities on a public proxy set once per node. The
   nodes keep each method's state (snapshot, Fisher, replay buffer) themselves
   (`edgekd.client.continual_client`).
4. **Scoring**: after every round the global student is scored on every task's test set; the
   score after the last round of task ``i`` is row ``i`` of the accuracy matrix ``R`` and the
   untrained student's scores are ``b``, giving average accuracy, forgetting, BWT and FWT
   (`edgekd.continual.metrics`).
5. **Report**: per method ``report.json`` (its ``continual`` block), ``rounds.jsonl``, the final
   student, a heatmap of ``R`` and a plot of each task's accuracy over the rounds; with
   ``continual.method = "all"`` the five methods run one after another on the same stream,
   teacher and initial student, each in its own folder, and ``continual.json`` compares them.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from torch import nn

from edgekd.continual.learner import evaluate_stream
from edgekd.continual.scenario import proxy_digest
from edgekd.continual.streams import TaskStream
from edgekd.core import records as R
from edgekd.core.config import PROXY_METHODS, EdgeKDConfig
from edgekd.core.data import ArrayDataset
from edgekd.core.round_settings import config_scalar
from edgekd.learn.models import (
    ModelSpec,
    load_for_state,
)
from edgekd.learn.training import teacher_probs_for
from edgekd.server.strategy import EdgeKDStrategy
from edgekd.wire.payload import record_nbytes, record_to_state, state_to_record

log = logging.getLogger("edgekd")

# What a continual node reports (client/continual_client.py).
CONTINUAL_METRIC_KEYS = frozenset({R.TRAIN_LOSS, R.PENALTY, R.NUM_EXAMPLES})

__all__ = [
    "ContinualStrategy",
    "StreamTracker",
    "TaskSchedule",
    "eval_student",
]


@dataclass(frozen=True)
class TaskSchedule:
    """Rounds ``1..rounds_per_task`` train task 0, the next ``rounds_per_task`` task 1, ..."""

    tasks: int
    rounds_per_task: int
    lr_decay: str = "none"  # continual.lr-decay

    @property
    def num_rounds(self) -> int:
        return self.tasks * self.rounds_per_task

    def task_of(self, server_round: int) -> int:
        """The task round ``server_round`` (1-based) trains on."""
        if not 1 <= server_round <= self.num_rounds:
            raise ValueError(f"round {server_round} outside 1..{self.num_rounds}")
        return (server_round - 1) // self.rounds_per_task

    def lr_scale(self, server_round: int) -> float:
        """The factor on the nodes' learning rate in ``server_round``: 1 with ``lr_decay =
        "none"``; with ``"cosine"``, ``(1 + cos(pi * k / n)) / 2`` for the task's ``k``-th
        round of ``n`` (k = 0, 1, ...), so the lr falls from its full value at a task's first
        round to near 0 at its last and restarts with the next task (SGDR's schedule,
        Loshchilov & Hutter, ICLR 2017, one cycle a task): each task ends on a settled
        model, not wherever the last round's step left it."""
        if self.lr_decay == "none":
            return 1.0
        k = (server_round - 1) % self.rounds_per_task
        return 0.5 * (1.0 + math.cos(math.pi * k / self.rounds_per_task))

    def ends_task(self, server_round: int) -> bool:
        """True after the last round of a task: the model then gives a row of ``R``."""
        return server_round >= 1 and server_round % self.rounds_per_task == 0


class ContinualStrategy(EdgeKDStrategy):
    """EdgeKDStrategy (validation, byte accounting, bounded waits) plus the task schedule.

    ``configure_train`` injects the round's task, the method and the run's tag into the
    config (the FedProx pattern: inject, then delegate), and attaches to every node the
    server does not count as *current* (one that has answered a round of this method
    without an error, since this server started) what it may lack: the proxy set (the
    teacher's probabilities on public inputs), and from the second task on the history
    (``R.HISTORY``: the global student at the start of every task so far, from which the
    node rebuilds its method's state, see `edgekd.client.continual_client`). An error
    reply makes a node not current again (it may have lost its state).

    ``task_starts`` (task -> state) is recorded at each task's first round; a resumed run
    passes the ones it saved.
    """

    def __init__(
        self,
        *,
        schedule: TaskSchedule,
        method: str,
        run_tag: str,
        proxy_record: ArrayRecord | None = None,
        task_starts: dict[int, dict[str, np.ndarray]] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_metric_keys", CONTINUAL_METRIC_KEYS)
        super().__init__(**kwargs)  # the parent's proxy_record would go out every round
        self.schedule = schedule
        self.method = method
        self.run_tag = run_tag
        self.continual_proxy = proxy_record
        self.proxy_hash = (
            proxy_digest(proxy_record[R.PROXY_X].numpy(), proxy_record[R.PROXY_PROBS].numpy())
            if proxy_record is not None
            else ""
        )
        self.task_starts: dict[int, dict[str, np.ndarray]] = dict(task_starts or {})
        self._current: set[int] = set()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        task = self.schedule.task_of(server_round)
        if (server_round - 1) % self.schedule.rounds_per_task == 0:
            self.task_starts[task] = dict(record_to_state(arrays))
        config = ConfigRecord(
            {
                **dict(config.items()),
                R.CL_TASK: task,
                R.CL_METHOD: self.method,
                R.CL_RUN: self.run_tag,
                R.CL_PROXY_HASH: self.proxy_hash,
            }
        )
        if R.LR in config:
            config[R.LR] = float(config_scalar(config, R.LR)) * self.schedule.lr_scale(server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        catch_up = {R.PROXY: self.continual_proxy} if self.continual_proxy is not None else {}
        if task > 0:
            catch_up[R.HISTORY] = self.history(task)
        if not catch_up:
            return messages
        ledger = self.ledger[server_round]
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self._current:
                msg = Message(
                    content=RecordDict({**dict(msg.content.items()), **catch_up}),
                    dst_node_id=node,
                    message_type=msg.metadata.message_type,
                )
                ledger.bytes_down += sum(record_nbytes(r) for r in catch_up.values())
            out.append(msg)
        return out

    def history(self, task: int) -> ArrayRecord:
        """The global student at the start of tasks ``0..task``, as ``"<task>/<name>"``."""
        missing = [t for t in range(task + 1) if t not in self.task_starts]
        if missing:
            raise RuntimeError(f"no recorded start for task(s) {missing} of {self.method}")
        return state_to_record(
            {
                f"{t}/{name}": value
                for t in range(task + 1)
                for name, value in self.task_starts[t].items()
            }
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():  # it may have lost its state: send what it needs again
                self._current.discard(node)
            else:
                self._current.add(node)
        return super().aggregate_train(server_round, replies)


class StreamTracker:
    """Server-side evaluation after every round (Flower's ``evaluate_fn``): the global
    student's accuracy on every task's test set, the rows of ``R`` at task ends, ``b`` at
    round 0, and a progress bar. With ``mask_unseen`` the student predicts among the classes
    seen by the round's task only (task 0's at round 0), as it trains
    (`edgekd.continual.learner.evaluate_stream`)."""

    def __init__(
        self,
        spec: ModelSpec,
        stream: TaskStream,
        schedule: TaskSchedule,
        *,
        label: str = "",
        show: bool = False,
        mask_unseen: bool = False,
        per_round: dict[int, np.ndarray] | None = None,
        seconds: dict[int, float] | None = None,
    ) -> None:
        self.spec, self.stream, self.schedule = spec, stream, schedule
        self.mask_unseen = mask_unseen
        # A resumed run passes the scores and timings of the rounds before its checkpoint.
        self.per_round: dict[int, np.ndarray] = dict(per_round or {})
        self.seconds: dict[int, float] = dict(seconds or {})
        self._last = time.perf_counter()
        self._bar: Any = None
        if show:
            from tqdm import tqdm

            done = max((r for r in self.per_round if r > 0), default=0)
            self._bar = tqdm(
                total=schedule.num_rounds, initial=done, desc=label, unit="round", leave=True
            )

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        task = self.schedule.task_of(server_round) if server_round > 0 else 0
        active = self.stream.classes_up_to(task) if self.mask_unseen else None
        student = eval_student(self.spec, record_to_state(arrays))
        acc = evaluate_stream(student, self.stream, active)
        self.per_round[server_round] = acc
        now = time.perf_counter()
        self.seconds[server_round] = now - self._last
        self._last = now
        seen = task + 1
        mean_seen = float(np.nanmean(acc[:seen]))
        if self._bar is not None and server_round > 0:
            self._bar.set_postfix(task=seen - 1, acc_seen=f"{mean_seen:.3f}")
            self._bar.update(1)
        return MetricRecord({R.ACCURACY: mean_seen, "accuracy-all-tasks": float(np.nanmean(acc))})

    @property
    def baseline(self) -> np.ndarray:
        """``b``: the untrained student's accuracy on every task."""
        return self.per_round[0]

    @property
    def matrix(self) -> np.ndarray:
        """``R``, one row per task that has ended so far."""
        ends = [r for r in sorted(self.per_round) if self.schedule.ends_task(r)]
        return np.stack([self.per_round[r] for r in ends]) if ends else np.zeros((0, 0))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def proxy_record_for(cfg: EdgeKDConfig, teacher: nn.Module, public: ArrayDataset) -> ArrayRecord:
    """``continual.proxy-size`` public inputs (seeded draw) with the teacher's probabilities
    at ``continual.temperature``."""
    rng = np.random.default_rng([cfg.seed, 5])
    size = min(cfg.continual.proxy_size, len(public))
    x = public.x[np.sort(rng.choice(len(public), size=size, replace=False))]
    probs = teacher_probs_for(teacher, x, cfg.continual.temperature)
    return state_to_record({R.PROXY_X: x, R.PROXY_PROBS: probs})


def proxy_for_method(record: ArrayRecord | None, method: str) -> ArrayRecord | None:
    """What of the proxy set ``method`` gets: all of it for teacher-kd and replay-proxy,
    the inputs only for lwf-proxy (its probabilities are an empty ``[n, 0]`` array, so it
    is not charged the bytes of the teacher's probabilities it never uses), none else."""
    if record is None or method not in PROXY_METHODS:
        return None
    if method != "lwf-proxy":
        return record
    x = record[R.PROXY_X].numpy()
    return state_to_record({R.PROXY_X: x, R.PROXY_PROBS: np.zeros((len(x), 0), np.float32)})


def eval_student(
    spec: ModelSpec, state: dict[str, np.ndarray] | OrderedDict[str, np.ndarray]
) -> nn.Module:
    """The student of ``state`` in eval mode."""
    return load_for_state(spec, state).eval()
