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

import copy
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from torch import nn

from edgekd import __version__
from edgekd.continual.learner import evaluate_stream
from edgekd.continual.metrics import summarize
from edgekd.continual.scenario import client_stream, proxy_digest, server_stream
from edgekd.continual.streams import TaskStream
from edgekd.core import records as R
from edgekd.core.config import CONTINUAL_METHODS, EdgeKDConfig
from edgekd.core.data import ArrayDataset, FederatedData
from edgekd.learn.models import (
    ModelSpec,
    build_model,
    count_params,
    load_for_state,
    model_state,
    save_checkpoint,
    spec_for,
)
from edgekd.learn.training import seed_everything, teacher_probs_for
from edgekd.reporting.continual_plots import plot_accuracy_matrix, plot_task_accuracy
from edgekd.reporting.report import write_json_atomic, write_rounds
from edgekd.server.strategy import EdgeKDStrategy, RoundLedger, metric_value
from edgekd.server.teacher import obtain_teacher
from edgekd.wire.payload import record_nbytes, record_to_state, state_to_record

log = logging.getLogger("edgekd")

# What a continual node reports (client/continual_client.py).
CONTINUAL_METRIC_KEYS = frozenset({R.TRAIN_LOSS, R.PENALTY, R.NUM_EXAMPLES})

__all__ = [
    "ContinualStrategy",
    "StreamTracker",
    "TaskSchedule",
    "run_continual",
]


@dataclass(frozen=True)
class TaskSchedule:
    """Rounds ``1..rounds_per_task`` train task 0, the next ``rounds_per_task`` task 1, ..."""

    tasks: int
    rounds_per_task: int

    @property
    def num_rounds(self) -> int:
        return self.tasks * self.rounds_per_task

    def task_of(self, server_round: int) -> int:
        """The task round ``server_round`` (1-based) trains on."""
        if not 1 <= server_round <= self.num_rounds:
            raise ValueError(f"round {server_round} outside 1..{self.num_rounds}")
        return (server_round - 1) // self.rounds_per_task

    def ends_task(self, server_round: int) -> bool:
        """True after the last round of a task: the model then gives a row of ``R``."""
        return server_round >= 1 and server_round % self.rounds_per_task == 0


class ContinualStrategy(EdgeKDStrategy):
    """EdgeKDStrategy (validation, byte accounting, bounded waits) plus the task schedule.

    ``configure_train`` injects the round's task, the method and the run's tag into the
    config (the FedProx pattern: inject, then delegate), and attaches the proxy set (the
    teacher's probabilities on public inputs) to nodes that do not hold it yet; a node holds
    it once it has answered a round without an error, and loses it on an error reply.
    """

    def __init__(
        self,
        *,
        schedule: TaskSchedule,
        method: str,
        run_tag: str,
        proxy_record: ArrayRecord | None = None,
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
        self._nodes_with_proxy: set[int] = set()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord(
            {
                **dict(config.items()),
                R.CL_TASK: self.schedule.task_of(server_round),
                R.CL_METHOD: self.method,
                R.CL_RUN: self.run_tag,
                R.CL_PROXY_HASH: self.proxy_hash,
            }
        )
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.continual_proxy is None:
            return messages
        ledger = self.ledger[server_round]
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self._nodes_with_proxy:
                content = dict(msg.content.items())
                content[R.PROXY] = self.continual_proxy
                msg = Message(
                    content=RecordDict(content),
                    dst_node_id=node,
                    message_type=msg.metadata.message_type,
                )
                ledger.bytes_down += record_nbytes(self.continual_proxy)
            out.append(msg)
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():  # it may have lost its state: send the proxy again
                self._nodes_with_proxy.discard(node)
            else:
                self._nodes_with_proxy.add(node)
        return super().aggregate_train(server_round, replies)


class StreamTracker:
    """Server-side evaluation after every round (Flower's ``evaluate_fn``): the global
    student's accuracy on every task's test set, the rows of ``R`` at task ends, ``b`` at
    round 0, and a progress bar."""

    def __init__(
        self,
        spec: ModelSpec,
        stream: TaskStream,
        schedule: TaskSchedule,
        *,
        label: str = "",
        show: bool = False,
    ) -> None:
        self.spec, self.stream, self.schedule = spec, stream, schedule
        self.per_round: dict[int, np.ndarray] = {}
        self.seconds: dict[int, float] = {}
        self._last = time.perf_counter()
        self._bar: Any = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=schedule.num_rounds, desc=label, unit="round", leave=True)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc = evaluate_stream(_student(self.spec, record_to_state(arrays)), self.stream)
        self.per_round[server_round] = acc
        now = time.perf_counter()
        self.seconds[server_round] = now - self._last
        self._last = now
        seen = self.schedule.task_of(server_round) + 1 if server_round > 0 else 1
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


def continual_train_config(cfg: EdgeKDConfig) -> ConfigRecord:
    """What every node needs each round besides the task (which the strategy injects)."""
    t, k, cl = cfg.train, cfg.kd, cfg.continual
    return ConfigRecord(
        {
            R.LOCAL_EPOCHS: t.local_epochs,
            R.LR: t.lr,
            R.BATCH_SIZE: t.batch_size,
            R.CLIP_NORM: t.clip_norm,
            R.SEED: cfg.seed,
            R.CLASS_WEIGHTING: k.class_weighting,
            R.MAX_CLASS_WEIGHT: k.max_class_weight,
            R.CL_WEIGHT: cl.weight,
            R.CL_TEMPERATURE: cl.temperature,
            R.CL_EWC_WEIGHT: cl.ewc_weight,
            R.CL_BUFFER_SIZE: cl.buffer_size,
        }
    )


def proxy_record_for(cfg: EdgeKDConfig, teacher: nn.Module, public: ArrayDataset) -> ArrayRecord:
    """``continual.proxy-size`` public inputs (seeded draw) with the teacher's probabilities
    at ``continual.temperature``."""
    rng = np.random.default_rng([cfg.seed, 5])
    size = min(cfg.continual.proxy_size, len(public))
    x = public.x[np.sort(rng.choice(len(public), size=size, replace=False))]
    probs = teacher_probs_for(teacher, x, cfg.continual.temperature)
    return state_to_record({R.PROXY_X: x, R.PROXY_PROBS: probs})


def warm_up(grid: Grid, timeout: float) -> float:
    """Send every connected node a query that only loads its ClientApp and stream, so the
    simulation engine's start (tens of seconds for Ray's workers) is not billed to whichever
    method runs first. Returns the seconds it took; a node that fails here is not an error
    (the rounds decide what to do with it)."""
    started = time.perf_counter()
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
        for node in grid.get_node_ids()
    ]
    if messages:
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                log.warning("warm-up: node %d: %s", reply.metadata.src_node_id, reply.error.reason)
    return time.perf_counter() - started


def run_method(
    grid: Grid,
    cfg: EdgeKDConfig,
    method: str,
    stream: TaskStream,
    spec: ModelSpec,
    initial: nn.Module,
    *,
    proxy_record: ArrayRecord | None,
    show_progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]], nn.Module]:
    """One method's federated run over the whole stream.

    Returns its ``continual`` summary (matrix, avg_accuracy, forgetting, bwt, fwt, baseline,
    per-round accuracy on every task, wall_time), the per-round records and the final student.
    """
    started = time.perf_counter()
    t, cl = cfg.train, cfg.continual
    schedule = TaskSchedule(cl.tasks, cl.rounds_per_task)
    reference = model_state(initial)
    strategy = ContinualStrategy(
        schedule=schedule,
        method=method,
        run_tag=f"{method}-{uuid.uuid4().hex[:12]}",
        proxy_record=proxy_record if method == "teacher-kd" else None,
        reference_state=reference,
        node_wait=t.round_timeout,
        max_examples=t.max_examples,
        norm_bound=t.norm_bound,
        fraction_train=t.fraction_train,
        fraction_evaluate=0.0,  # the server scores every task itself
        min_train_nodes=t.min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=t.min_nodes,
    )
    tracker = StreamTracker(spec, stream, schedule, label=method, show=show_progress)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=state_to_record(reference),
            num_rounds=schedule.num_rounds,
            timeout=t.round_timeout,
            train_config=continual_train_config(cfg),
            evaluate_fn=tracker,
        )
    finally:
        tracker.close()
    rounds = []
    for rnd in range(schedule.num_rounds + 1):
        ledger = strategy.ledger.get(rnd)
        metrics = result.train_metrics_clientapp.get(rnd)
        acc = tracker.per_round.get(rnd)
        rounds.append(
            {
                "round": rnd,
                "task": schedule.task_of(rnd) if rnd > 0 else None,
                "accuracy": metric_value(result.evaluate_metrics_serverapp.get(rnd), R.ACCURACY),
                "task_accuracy": acc.tolist() if acc is not None else None,
                "seconds": tracker.seconds.get(rnd),
                **(ledger or RoundLedger()).counters(),
                "train_loss": metric_value(metrics, R.TRAIN_LOSS),
                "penalty": metric_value(metrics, R.PENALTY),
            }
        )
    final = _student(spec, record_to_state(result.arrays)) if len(result.arrays) else initial
    summary = {
        **summarize(tracker.matrix, tracker.baseline),
        "baseline": tracker.baseline.tolist(),
        "accuracy_per_round": {str(r): a.tolist() for r, a in sorted(tracker.per_round.items())},
        "wall_time": time.perf_counter() - started,
    }
    return summary, rounds, final


def run_continual(grid: Grid, cfg: EdgeKDConfig, *, show_progress: bool = True) -> Path:
    """The server side of a continual run; returns the run folder (see the module docstring)."""
    started = time.perf_counter()
    if not cfg.continual.scenario:
        raise ValueError("run_continual needs continual.scenario (class- or domain-incremental)")
    out_dir = Path(cfg.out_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cl = cfg.continual
    methods = list(CONTINUAL_METHODS) if cl.method == "all" else [cl.method]

    def say(message: str) -> None:
        if show_progress:
            print(message, flush=True)

    seed_everything(cfg.seed)
    stream, server = client_stream(cfg), server_stream(cfg)
    public = _concat(server, "train")
    data = FederatedData(  # what obtain_teacher trains on: the server's draw of every task
        public=public,
        server_test=_concat(server, "test"),
        pool=_concat(stream, "train"),
        test=_concat(stream, "test"),
        num_classes=stream.num_classes,
        class_names=[str(c) for c in range(stream.num_classes)],
    )
    teacher_spec = spec_for(stream.input_shape, stream.num_classes, cfg.model.teacher_width)
    student_spec = spec_for(stream.input_shape, stream.num_classes, cfg.model.student_width)
    say(
        f"teacher: loading {cfg.model.teacher_path}"
        if cfg.model.teacher_path
        else f"teacher: training on the server's {len(public)} samples of all {len(stream)} tasks "
        f"({cfg.model.teacher_epochs} epochs)"
    )
    teacher = obtain_teacher(cfg, data, teacher_spec)
    teacher_acc = evaluate_stream(teacher, stream)
    say(f"teacher: accuracy per task {np.round(teacher_acc, 3).tolist()}")
    proxy = proxy_record_for(cfg, teacher, public) if "teacher-kd" in methods else None
    torch.manual_seed(cfg.seed)
    initial = build_model(student_spec)  # the same random start for every method
    common: dict[str, Any] = {
        "edgekd_version": __version__,
        "scenario": {
            "name": cl.scenario,
            "tasks": [
                {
                    "id": task.id,
                    "name": task.name,
                    "classes": list(task.classes),
                    "train": len(task.y_train),
                    "test": len(task.y_test),
                }
                for task in stream
            ],
            "rounds_per_task": cl.rounds_per_task,
            "partition": cfg.data.partition,
        },
        "teacher": {
            "task_accuracy": teacher_acc.tolist(),
            "avg_accuracy": float(np.nanmean(teacher_acc)),
            "params": count_params(teacher),
            "trained_on": len(public),
        },
        "student": {"params": count_params(initial)},
    }
    save_checkpoint(teacher, teacher_spec, str(out_dir / "teacher.pt"))
    say("nodes: starting")
    common["startup_seconds"] = warm_up(grid, cfg.train.round_timeout)
    common["scenario"]["nodes"] = len(list(grid.get_node_ids()))
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        folder = out_dir / method if len(methods) > 1 else out_dir
        say(f"{method}: {cl.tasks} tasks x {cl.rounds_per_task} rounds")
        summary, rounds, student = run_method(
            grid,
            cfg,
            method,
            stream,
            student_spec,
            copy.deepcopy(initial),
            proxy_record=proxy,
            show_progress=show_progress,
        )
        results[method] = summary
        run_cfg = replace(cfg, continual=replace(cl, method=method))
        report = {
            **common,
            "config": run_cfg.to_flat(),
            "continual": {method: summary},
            "rounds": rounds,
            "communication": {
                "bytes_down": sum(r["bytes_down"] for r in rounds),
                "bytes_up": sum(r["bytes_up"] for r in rounds),
            },
            "seconds": summary["wall_time"],
        }
        write_method_folder(folder, report, rounds, summary, method, student, student_spec)
        say(
            f"{method}: avg accuracy {summary['avg_accuracy']:.3f}, forgetting "
            f"{summary['forgetting']:.3f}, {summary['wall_time']:.0f} s"
        )
    if len(methods) > 1:
        comparison = {
            **common,
            "config": cfg.to_flat(),
            "continual": results,
            "seconds": time.perf_counter() - started,
        }
        write_json_atomic(out_dir / "continual.json", comparison)
        write_json_atomic(out_dir / "report.json", comparison)
    return out_dir


def write_method_folder(
    folder: Path,
    report: dict[str, Any],
    rounds: list[dict[str, Any]],
    summary: dict[str, Any],
    method: str,
    student: nn.Module,
    spec: ModelSpec,
) -> None:
    """report.json, rounds.jsonl, student.pt and the two plots of one method."""
    folder.mkdir(parents=True, exist_ok=True)
    write_rounds(folder / "rounds.jsonl", rounds)
    save_checkpoint(student, spec, str(folder / "student.pt"))
    plot_accuracy_matrix(
        summary["matrix"], folder / "continual_matrix.png", title=f"{method}: accuracy matrix R"
    )
    per_round = {int(r): acc for r, acc in summary["accuracy_per_round"].items()}
    plot_task_accuracy(
        per_round,
        int(report["scenario"]["rounds_per_task"]),
        folder / "continual_accuracy.png",
        title=f"{method}: test accuracy per task",
    )
    write_json_atomic(folder / "report.json", report)


def _concat(stream: TaskStream, split: str) -> ArrayDataset:
    xs = [getattr(task, f"x_{split}") for task in stream]
    ys = [getattr(task, f"y_{split}") for task in stream]
    return ArrayDataset(np.concatenate(xs), np.concatenate(ys))


def _student(
    spec: ModelSpec, state: dict[str, np.ndarray] | OrderedDict[str, np.ndarray]
) -> nn.Module:
    return load_for_state(spec, state).eval()
