"""The server side of one run as named phases: resume point, teacher, student start
(warm start, pruning, structural compression), federation, the student as shipped,
report and baselines, exports. `run_edgekd` calls them in order; each can be called
and tested alone."""

from __future__ import annotations

import copy
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from torch import nn

from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import FederatedData, load_federated_data
from edgekd.core.numerics import softmax
from edgekd.deploy.onnx_export import export_onnx_bytes
from edgekd.deploy.quantize import quantize_onnx_int8
from edgekd.learn.compression import (
    WARM_PRUNE_EPOCHS,
    WARM_PRUNE_STEPS,
    CompressionSchedule,
    Pruner,
    finalize,
    keep_pruned_at_zero,
    structural_compress,
)
from edgekd.learn.models import (
    ModelSpec,
    build_model,
    count_params,
    load_checkpoint,
    load_for_state,
    model_state,
    save_checkpoint,
    spec_for,
)
from edgekd.learn.pruning import prunable_parameters
from edgekd.learn.training import predict_logits, seed_everything
from edgekd.reporting.report import write_json_atomic
from edgekd.server.checkpoint import (
    ResumeError,
    RunCheckpoint,
    check_resumable,
    load_run_checkpoint,
    state_sha256,
)
from edgekd.server.comparators import baselines
from edgekd.server.federation import CheckpointPlan, report_accuracy, run_federation
from edgekd.server.outputs import (
    fidelity_summaries,
    run_report,
    write_exports,
)
from edgekd.server.phases import Say, StudentStart, TeacherPhase
from edgekd.server.teacher import distill_on_public, obtain_teacher, public_soft_targets
from edgekd.wire.codec import decode_state, encode_state, write_artifact

STRUCTURAL_FINETUNE_EPOCHS = 10  # server-side KD after filter pruning / factorization


def run_edgekd(grid: Grid, cfg: EdgeKDConfig, *, show_progress: bool = True) -> Path:
    """The server side of one run, phase by phase: resume point, teacher, student start,
    federation, the student as shipped, report and baselines, exports. Returns the run
    folder."""
    started = time.perf_counter()
    # Absolute, so the log names it: under `flwr run` the working directory is wherever
    # the local SuperLink was first started, not the app folder.
    out_dir = Path(cfg.out_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    data = load_federated_data(cfg.data, cfg.seed)
    teacher_spec = spec_for(data.input_shape, data.num_classes, cfg.model.teacher_width)
    student_spec = spec_for(data.input_shape, data.num_classes, cfg.model.student_width)

    def say(message: str) -> None:
        if show_progress:  # long steps before the round bar starts; none in tests
            print(message, flush=True)

    say(
        f"teacher: loading {cfg.model.teacher_path}"
        if cfg.model.teacher_path
        else f"teacher: training on {len(data.public)} public samples "
        f"({cfg.model.teacher_epochs} epochs)"
    )
    resume_from = resume_point(cfg, out_dir, say)
    teacher = teacher_phase(cfg, data, teacher_spec, out_dir, resume_from)
    schedule = CompressionSchedule.from_config(cfg.compression)
    start = student_start(cfg, data, student_spec, teacher, schedule, resume_from, say)
    student, rounds, masks = run_federation(
        grid,
        cfg,
        data,
        student_spec,
        start.warm,
        mode="kd",
        teacher=teacher.model,
        teacher_onnx=teacher.onnx,
        public_probs=teacher.public_probs,
        label="edgekd",
        show_progress=show_progress,
        schedule=schedule,
        checkpoint=CheckpointPlan(
            out_dir, teacher.sha256, resume_from, extra={"structure": start.structure}
        ),
        pruner=start.pruner,
    )
    finalize(student, schedule, masks)
    # What ships: the student after the codec's INT8 rounding, scored as such.
    student_record = encode_state(model_state(student), masks=masks, int8=schedule.int8_wire)
    shipped, _ = decode_state(student_record, model_state(student))
    student = load_for_state(student_spec, shipped)
    artifact_bytes = write_artifact(out_dir / "student.ekd", student_record, model_state(student))
    report = run_report(cfg, data, teacher, start, student, rounds, masks, schedule)
    report["student"].update(
        bytes=artifact_bytes,
        nonzero_params=int(sum(np.count_nonzero(v) for v in shipped.values())),
    )
    baseline_rounds = None
    if cfg.baseline:
        baseline_rounds = baselines(
            grid, cfg, data, student_spec, teacher, start, report, show_progress
        )
    report["seconds"] = time.perf_counter() - started
    write_exports(
        out_dir, cfg, data, student, student_spec, teacher, rounds, baseline_rounds, report
    )
    say("fidelity reports: FP32 and INT8 ONNX student (edgekd inspect)")
    report["fidelity"] = fidelity_summaries(out_dir, cfg)
    write_json_atomic(out_dir / "report.json", report)
    return out_dir


def resume_point(cfg: EdgeKDConfig, out_dir: Path, say: Say) -> RunCheckpoint | None:
    """The checkpoint to continue from (``cfg.resume``), checked against the config."""
    if not cfg.resume:
        return None
    resume_from = load_run_checkpoint(out_dir)
    check_resumable(resume_from, cfg.to_flat(), out_dir)
    say(f"resuming {out_dir} after round {resume_from.round}")
    return resume_from


def teacher_phase(
    cfg: EdgeKDConfig,
    data: FederatedData,
    spec: ModelSpec,
    out_dir: Path,
    resume_from: RunCheckpoint | None,
) -> TeacherPhase:
    """Train (or load) the teacher, save it at once, export what nodes get of it."""
    if resume_from is not None:
        teacher, _ = load_checkpoint(str(out_dir / "teacher.pt"), expected=spec)
    else:
        teacher = obtain_teacher(cfg, data, spec)
        # Saved now, not at the end: a resumed run must distil from this very teacher.
        save_checkpoint(teacher, spec, str(out_dir / "teacher.pt"))
    sha256 = state_sha256(model_state(teacher))
    if resume_from is not None and resume_from.teacher_sha256 != sha256:
        raise ResumeError(
            f"{out_dir / 'teacher.pt'} is not the teacher the checkpoint was made with "
            f"(sha256 {sha256[:12]}, checkpoint says {resume_from.teacher_sha256[:12]})"
        )
    onnx = export_onnx_bytes(teacher, data.input_shape)
    if cfg.compression.teacher == "int8":  # what on-device nodes get; the server keeps FP32
        onnx = quantize_onnx_int8(onnx, data.public.x[: cfg.kd.proxy_size])
    return TeacherPhase(
        model=teacher,
        onnx=onnx,
        sha256=sha256,
        test_probs=softmax(predict_logits(teacher, data.test.x)),
        server_probs=softmax(predict_logits(teacher, data.server_test.x)),
        public_probs=public_soft_targets(teacher, data, cfg.kd.temperature),
    )


def student_start(
    cfg: EdgeKDConfig,
    data: FederatedData,
    spec: ModelSpec,
    teacher: TeacherPhase,
    schedule: CompressionSchedule,
    resume_from: RunCheckpoint | None,
    say: Say,
) -> StudentStart:
    """The student entering round 1: the checkpoint's, a given one, or warm-started by
    server-side KD; pruned in the warm start and structurally compressed if asked."""
    # Reseed: the student's phase must not depend on whether the teacher was trained
    # here (which draws from the global generators) or loaded with --teacher, so that
    # recipes run against one cached teacher compare with the run that trained it.
    seed_everything(cfg.seed)
    init = build_model(spec)
    random_init = copy.deepcopy(init)
    warm = copy.deepcopy(init)
    say(
        f"teacher: {report_accuracy(teacher.server_probs, data.server_test.y):.4f} on "
        f"server-domain test, {report_accuracy(teacher.test_probs, data.test.y):.4f} on the "
        "devices' test split"
    )
    structure: dict[str, Any] = {}
    if resume_from is not None:  # the checkpoint's student, already warm and reshaped
        warm = load_for_state(spec, resume_from.state)
        structure = dict(resume_from.extra.get("structure", {}))
    elif cfg.model.student_path:
        say(f"student: loading {cfg.model.student_path}")
        warm, _ = load_checkpoint(cfg.model.student_path, expected=spec)
    elif cfg.train.warm_start_epochs > 0:
        say(f"student: warm start, {cfg.train.warm_start_epochs} epochs of server-side KD")
        distill_on_public(
            warm,
            teacher.public_probs,
            data,
            cfg,
            epochs=cfg.train.warm_start_epochs,
            seed=cfg.seed,
            lr=cfg.train.warm_start_lr or None,
            teacher=teacher.model,
        )
    pruner = None
    if resume_from is None and schedule.prunes_in_warm_start:
        pruner = prune_in_warm_start(
            warm, init, schedule, teacher.public_probs, data, cfg, teacher.model, say
        )
    if resume_from is None and (schedule.prune_method == "filter" or schedule.lowrank_kind):
        warm, structure = structural_compress(warm, schedule)
        say(f"student: structural compression ({count_params(warm)} params), fine-tuning")
        distill_on_public(
            warm, teacher.public_probs, data, cfg, epochs=STRUCTURAL_FINETUNE_EPOCHS, seed=cfg.seed
        )
    return StudentStart(
        init=init, random_init=random_init, warm=warm, structure=structure, pruner=pruner
    )


def prune_in_warm_start(
    student: nn.Module,
    initial: nn.Module,
    schedule: CompressionSchedule,
    public_probs: np.ndarray,
    data: FederatedData,
    cfg: EdgeKDConfig,
    teacher: nn.Module,
    say: Say,
) -> Pruner:
    """``compression.start-round = 0``: Zhu & Gupta's gradual pruning on the server,
    after the warm start and before round 1. ``WARM_PRUNE_STEPS`` cubic steps up to the
    final sparsity, each followed by ``WARM_PRUNE_EPOCHS`` epochs of KD on the public
    split with the pruned weights held at zero. Movement scores ``|W − W0|`` against
    ``initial``, the untrained student. Returns the pruner, masks set, for the rounds."""
    pruner = Pruner(schedule)
    pruner.initial = {name: w.detach().clone() for name, w in prunable_parameters(initial).items()}
    for step in range(1, WARM_PRUNE_STEPS + 1):
        pruner.prune_to(schedule.warm_start_sparsity(step), student)
        with keep_pruned_at_zero(student, pruner.numpy_masks()):
            distill_on_public(
                student,
                public_probs,
                data,
                cfg,
                epochs=WARM_PRUNE_EPOCHS,
                seed=cfg.seed + 1000 + step,
                teacher=teacher,
            )
        say(
            f"student: pruned to {pruner.sparsity:.2f} on the server "
            f"(step {step}/{WARM_PRUNE_STEPS}), {WARM_PRUNE_EPOCHS} epochs of KD"
        )
    return pruner
