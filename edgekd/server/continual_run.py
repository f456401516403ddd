"""A continual run, phase by phase (`run_continual`): setup (streams, teacher, proxy
set, initial student), the nodes' start, one federation per method, each method's
folder and the comparison. The strategy and the per-round scoring are in
`edgekd.server.continual`."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
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
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from torch import nn

from edgekd import __version__
from edgekd.continual.learner import evaluate_stream
from edgekd.continual.metrics import summarize
from edgekd.continual.scenario import client_stream, server_stream
from edgekd.continual.streams import TaskStream
from edgekd.core import records as R
from edgekd.core.config import CONTINUAL_METHODS, PROXY_METHODS, EdgeKDConfig
from edgekd.core.data import ArrayDataset, FederatedData
from edgekd.core.round_settings import continual_round_config
from edgekd.learn.models import (
    ModelSpec,
    build_model,
    count_params,
    load_checkpoint,
    model_state,
    save_checkpoint,
    spec_for,
)
from edgekd.learn.training import seed_everything
from edgekd.reporting.continual_plots import plot_accuracy_matrix, plot_task_accuracy
from edgekd.reporting.report import write_json_atomic, write_rounds
from edgekd.server.checkpoint import ResumeError, restore_rng, state_sha256
from edgekd.server.continual import (
    ContinualStrategy,
    StreamTracker,
    TaskSchedule,
    eval_student,
    proxy_for_method,
    proxy_record_for,
)
from edgekd.server.continual_resume import (
    ContinualCheckpointer,
    ContinualResume,
    MethodProgress,
    completed_summary,
    continual_resume_point,
)
from edgekd.server.federation import (
    MAX_REASONS,
    momentum_arrays,
    restore_momentum,
    robust_aggregator,
)
from edgekd.server.ledger import RoundLedger, metric_value
from edgekd.server.teacher import obtain_teacher
from edgekd.wire.payload import record_to_state, state_to_record

log = logging.getLogger("edgekd")


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
    progress: MethodProgress | None = None,
    on_round: Callable[[MethodProgress], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], nn.Module]:
    """One method's federated run over the whole stream, from ``initial`` or, when
    ``progress`` holds completed rounds, from the round after them (a resumed run).
    ``on_round`` sees ``progress`` updated after every round (to checkpoint it).

    Returns its ``continual`` summary (matrix, avg_accuracy, forgetting, bwt, fwt, baseline,
    per-round accuracy on every task, wall_time), the per-round records and the final student.
    """
    started = time.perf_counter()
    t, cl = cfg.train, cfg.continual
    progress = progress or MethodProgress(method)
    schedule = TaskSchedule(cl.tasks, cl.rounds_per_task, cl.lr_decay)
    reference = model_state(initial)
    strategy = ContinualStrategy(
        schedule=schedule,
        method=method,
        run_tag=f"{method}-{progress.run_tag}",
        proxy_record=proxy_for_method(proxy_record, method),
        task_starts=progress.task_starts,
        reference_state=reference,
        node_wait=t.round_timeout,
        max_examples=t.max_examples,
        norm_bound=t.norm_bound,
        aggregator=robust_aggregator(t.aggregation, t.server_lr, t.server_momentum),
        fraction_train=t.fraction_train,
        fraction_evaluate=0.0,  # the server scores every task itself
        min_train_nodes=t.min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=t.min_nodes,
    )
    tracker = StreamTracker(
        spec,
        stream,
        schedule,
        label=method,
        show=show_progress,
        mask_unseen=cl.mask_unseen,
        per_round=progress.per_round,
        seconds=progress.seconds,
    )
    earlier = progress.wall_time
    restore_momentum(strategy.aggregator, progress.momentum)

    def round_end(rnd: int, arrays: ArrayRecord, result: Result) -> None:
        if not progress.rounds:
            progress.rounds.append(_round_record(0, schedule, strategy, tracker, result))
        progress.rounds.append(_round_record(rnd, schedule, strategy, tracker, result))
        progress.round, progress.state = rnd, dict(record_to_state(arrays))
        progress.task_starts = strategy.task_starts
        progress.per_round, progress.seconds = tracker.per_round, tracker.seconds
        progress.momentum = momentum_arrays(strategy.aggregator)
        progress.wall_time = earlier + time.perf_counter() - started
        if on_round is not None:
            on_round(progress)

    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=state_to_record(progress.state or reference),
            num_rounds=schedule.num_rounds,
            timeout=t.round_timeout,
            train_config=ConfigRecord(dict(continual_round_config(cfg))),
            evaluate_fn=tracker,
            first_round=progress.round + 1,
            on_round_end=round_end,
        )
    finally:
        tracker.close()
    final = eval_student(spec, record_to_state(result.arrays)) if len(result.arrays) else initial
    progress.wall_time = earlier + time.perf_counter() - started
    summary = {
        **summarize(tracker.matrix, tracker.baseline),
        "baseline": tracker.baseline.tolist(),
        "accuracy_per_round": {str(r): a.tolist() for r, a in sorted(tracker.per_round.items())},
        "wall_time": progress.wall_time,
    }
    return summary, list(progress.rounds), final


def _round_record(
    rnd: int,
    schedule: TaskSchedule,
    strategy: ContinualStrategy,
    tracker: StreamTracker,
    result: Result,
) -> dict[str, Any]:
    """One line of ``rounds.jsonl``: the round's task, scores, time, counters and losses."""
    metrics = result.train_metrics_clientapp.get(rnd)
    acc = tracker.per_round.get(rnd)
    ledger = strategy.ledger.get(rnd, RoundLedger())
    return {
        "round": rnd,
        "task": schedule.task_of(rnd) if rnd > 0 else None,
        "accuracy": metric_value(result.evaluate_metrics_serverapp.get(rnd), R.ACCURACY),
        "task_accuracy": acc.tolist() if acc is not None else None,
        "seconds": tracker.seconds.get(rnd),
        **ledger.counters(),
        "reasons": ledger.reasons[:MAX_REASONS],  # why replies failed or were rejected
        "train_loss": metric_value(metrics, R.TRAIN_LOSS),
        "penalty": metric_value(metrics, R.PENALTY),
    }


Say = Callable[[str], None]


@dataclass(frozen=True)
class ContinualSetup:
    """What every method of a continual run shares: the clients' stream, the student's
    spec and common random start, and the teacher with its scores and (for
    ``teacher-kd`` and the same-proxy comparators) its proxy set."""

    stream: TaskStream
    student_spec: ModelSpec
    teacher: nn.Module
    teacher_acc: np.ndarray  # per task, on the clients' test sets
    teacher_trained_on: int  # the server's samples of all tasks
    proxy: ArrayRecord | None
    initial: nn.Module


@dataclass(frozen=True)
class NodeStart:
    """What the warm-up found: how long the nodes took to start, and how many there are."""

    seconds: float
    nodes: int


def run_continual(grid: Grid, cfg: EdgeKDConfig, *, show_progress: bool = True) -> Path:
    """The server side of a continual run, phase by phase: resume point, setup (streams,
    teacher, initial student), node start, one federated run per method (checkpointed
    after every round, `edgekd.server.continual_resume`), the comparison. Returns the run
    folder (see the module docstring)."""
    started = time.perf_counter()
    if not cfg.continual.scenario:
        raise ValueError("run_continual needs continual.scenario (class- or domain-incremental)")
    out_dir = Path(cfg.out_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cl = cfg.continual
    methods = tuple(CONTINUAL_METHODS) if cl.method == "all" else (cl.method,)

    def say(message: str) -> None:
        if show_progress:
            print(message, flush=True)

    resume = continual_resume_point(cfg, out_dir)
    setup = continual_setup(cfg, methods, out_dir, say, resume)
    common = common_report(cfg, setup, start_nodes(grid, cfg, say))
    checkpointer = ContinualCheckpointer(
        out_dir, cfg, state_sha256(model_state(setup.teacher)), resume.completed if resume else []
    )
    if resume is not None:  # as it was when the checkpoint was written
        restore_rng(resume.rng)
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        folder = out_dir / method if len(methods) > 1 else out_dir
        if method in checkpointer.completed:
            results[method] = completed_summary(folder, method)
            say(f"{method}: complete in the checkpoint, kept")
            continue
        progress = MethodProgress(method)
        if resume is not None and resume.progress.method == method:
            progress = resume.progress
            say(f"{method}: resuming after round {progress.round}")
        results[method] = method_phase(
            grid, cfg, setup, common, folder, say, progress, checkpointer, show_progress
        )
        checkpointer.method_done(progress)
    if len(methods) > 1:
        write_comparison(out_dir, cfg, common, results, time.perf_counter() - started)
    return out_dir


def continual_setup(
    cfg: EdgeKDConfig,
    methods: tuple[str, ...],
    out_dir: Path,
    say: Say,
    resume: ContinualResume | None = None,
) -> ContinualSetup:
    """Seed, rebuild the clients' stream and the server's draw of every task, obtain the
    teacher on the server's draw (saved as ``teacher.pt``; a resumed run loads that file
    and checks its hash), score it on every task, draw the proxy set if a method of
    ``PROXY_METHODS`` runs, and build the seeded initial student."""
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
    if resume is not None:
        teacher = resumed_teacher(out_dir, teacher_spec, resume, say)
    else:
        say(
            f"teacher: loading {cfg.model.teacher_path}"
            if cfg.model.teacher_path
            else f"teacher: training on the server's {len(public)} samples of all "
            f"{len(stream)} tasks ({cfg.model.teacher_epochs} epochs)"
        )
        teacher = obtain_teacher(cfg, data, teacher_spec)
        # Saved now, not at the end: a resumed run must go on with this very teacher.
        save_checkpoint(teacher, teacher_spec, str(out_dir / "teacher.pt"))
    teacher_acc = evaluate_stream(teacher, stream)
    say(f"teacher: accuracy per task {np.round(teacher_acc, 3).tolist()}")
    proxy = proxy_record_for(cfg, teacher, public) if set(methods) & set(PROXY_METHODS) else None
    torch.manual_seed(cfg.seed)
    initial = build_model(student_spec)  # the same random start for every method
    return ContinualSetup(
        stream=stream,
        student_spec=student_spec,
        teacher=teacher,
        teacher_acc=teacher_acc,
        teacher_trained_on=len(public),
        proxy=proxy,
        initial=initial,
    )


def resumed_teacher(out_dir: Path, spec: ModelSpec, resume: ContinualResume, say: Say) -> nn.Module:
    """``out_dir/teacher.pt``, refused unless it is the teacher the checkpoint was made with."""
    path = out_dir / "teacher.pt"
    say(f"teacher: loading {path} (resume)")
    try:
        teacher, _ = load_checkpoint(str(path), expected=spec)
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path}: cannot load the run's teacher ({exc})") from None
    sha256 = state_sha256(model_state(teacher))
    if sha256 != resume.teacher_sha256:
        raise ResumeError(
            f"{path} is not the teacher the checkpoint was made with "
            f"(sha256 {sha256[:12]}, checkpoint says {resume.teacher_sha256[:12]})"
        )
    return teacher.eval()


def start_nodes(grid: Grid, cfg: EdgeKDConfig, say: Say) -> NodeStart:
    """Start every node's ClientApp (`warm_up`) and count the nodes."""
    say("nodes: starting")
    seconds = warm_up(grid, cfg.train.round_timeout)
    return NodeStart(seconds=seconds, nodes=len(list(grid.get_node_ids())))


def common_report(cfg: EdgeKDConfig, setup: ContinualSetup, nodes: NodeStart) -> dict[str, Any]:
    """The part of every report that all methods share: version, scenario (tasks,
    schedule, partition, nodes), teacher, student size and node start time."""
    cl = cfg.continual
    return {
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
                for task in setup.stream
            ],
            "rounds_per_task": cl.rounds_per_task,
            "partition": cfg.data.partition,
            "nodes": nodes.nodes,
        },
        "teacher": {
            "task_accuracy": setup.teacher_acc.tolist(),
            "avg_accuracy": float(np.nanmean(setup.teacher_acc)),
            "params": count_params(setup.teacher),
            "trained_on": setup.teacher_trained_on,
        },
        "student": {"params": count_params(setup.initial)},
        "startup_seconds": nodes.seconds,
    }


def method_phase(
    grid: Grid,
    cfg: EdgeKDConfig,
    setup: ContinualSetup,
    common: dict[str, Any],
    folder: Path,
    say: Say,
    progress: MethodProgress,
    checkpointer: ContinualCheckpointer,
    show_progress: bool,
) -> dict[str, Any]:
    """One method from the common start (`run_method` on a copy of the initial student, or
    on from ``progress``), checkpointed after every round, its report written to
    ``folder`` (`write_method_folder`); returns its ``continual`` summary."""
    cl, method = cfg.continual, progress.method
    say(f"{method}: {cl.tasks} tasks x {cl.rounds_per_task} rounds")
    summary, rounds, student = run_method(
        grid,
        cfg,
        method,
        setup.stream,
        setup.student_spec,
        copy.deepcopy(setup.initial),
        proxy_record=setup.proxy,
        show_progress=show_progress,
        progress=progress,
        on_round=checkpointer.round_done,
    )
    report = method_report(cfg, common, method, summary, rounds)
    write_method_folder(folder, report, rounds, summary, method, student, setup.student_spec)
    say(
        f"{method}: avg accuracy {summary['avg_accuracy']:.3f}, forgetting "
        f"{summary['forgetting']:.3f}, {summary['wall_time']:.0f} s"
    )
    return summary


def method_report(
    cfg: EdgeKDConfig,
    common: dict[str, Any],
    method: str,
    summary: dict[str, Any],
    rounds: list[dict[str, Any]],
) -> dict[str, Any]:
    """One method's ``report.json``: the common part, its config (``continual.method``
    set to it), its summary, its rounds and the bytes they moved."""
    run_cfg = replace(cfg, continual=replace(cfg.continual, method=method))
    return {
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


def write_comparison(
    out_dir: Path,
    cfg: EdgeKDConfig,
    common: dict[str, Any],
    results: dict[str, dict[str, Any]],
    seconds: float,
) -> None:
    """With several methods: ``continual.json`` (and the same as ``report.json``) in the
    run folder, comparing every method's summary."""
    comparison = {
        **common,
        "config": cfg.to_flat(),
        "continual": results,
        "seconds": seconds,
    }
    write_json_atomic(out_dir / "continual.json", comparison)
    write_json_atomic(out_dir / "report.json", comparison)


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
