"""The edgekd ServerApp: teacher, warm-started student, the federation, the report.

`run_edgekd` is the whole server side of one run; the ServerApp calls it with the
config parsed from ``context.run_config`` (``flwr run .``), and ``edgekd simulate``
builds a ServerApp bound to its own config with `make_server_app`.
"""

from __future__ import annotations

import copy
import logging
import lzma
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedMedian, Result
from torch import nn

from edgekd import __version__
from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig, parse_aggregation
from edgekd.core.data import FederatedData, load_federated_data
from edgekd.deploy.onnx_export import export_onnx_bytes, sha256_hex
from edgekd.deploy.quantize import (
    CALIBRATION_SAMPLES,
    int8_weight_fake_quant,
    quantize_onnx_int8,
)
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
from edgekd.learn.pruning import prunable_parameters, sparsity_of
from edgekd.learn.training import predict_logits, seed_everything, softmax_np
from edgekd.reporting.report import (
    dark_knowledge,
    model_summary,
    write_json_atomic,
    write_plots,
    write_rounds,
)
from edgekd.server.checkpoint import (
    ResumeError,
    RunCheckpoint,
    capture_rng,
    check_resumable,
    load_run_checkpoint,
    restore_rng,
    save_run_checkpoint,
    state_sha256,
)
from edgekd.server.strategy import (
    EdgeKDStrategy,
    Masks,
    RoundLedger,
    TrimmedMean,
    WireFormat,
    metric_value,
)
from edgekd.server.teacher import distill_on_public, obtain_teacher, public_soft_targets
from edgekd.wire.codec import decode_state, encode_state, write_artifact
from edgekd.wire.payload import record_to_state, state_to_record

log = logging.getLogger("edgekd")
STRUCTURAL_FINETUNE_EPOCHS = 10  # server-side KD after filter pruning / factorization


class RoundTracker:
    """Server-side evaluation after every round (Flower's ``evaluate_fn``): scores the
    global student on the devices' test split, times the round, shows progress."""

    def __init__(
        self, spec: ModelSpec, data: FederatedData, num_rounds: int, label: str, show: bool
    ) -> None:
        self.spec, self.data = spec, data
        self.results: dict[int, dict[str, float]] = {}
        self._last = time.perf_counter()
        self._bar: Any = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=num_rounds, desc=label, unit="round", leave=True)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = load_for_state(self.spec, record_to_state(arrays))
        probs = softmax_np(predict_logits(model, self.data.test.x))
        acc = report_accuracy(probs, self.data.test.y)
        nll = float(
            -np.log(np.clip(probs[np.arange(len(probs)), self.data.test.y], 1e-12, None)).mean()
        )
        now = time.perf_counter()
        self.results[server_round] = {"accuracy": acc, "loss": nll, "seconds": now - self._last}
        self._last = now
        if self._bar is not None and server_round > 0:
            self._bar.set_postfix(acc=f"{acc:.3f}")
            self._bar.update(1)
        return MetricRecord({R.ACCURACY: acc, R.LOSS: nll})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _train_config(cfg: EdgeKDConfig, mode: str, teacher_hash: str) -> ConfigRecord:
    t, k = cfg.train, cfg.kd
    return ConfigRecord(
        {
            R.MODE: mode,
            R.LOCAL_EPOCHS: t.local_epochs,
            R.LR: t.lr,
            R.OPTIMIZER: t.optimizer,
            R.BATCH_SIZE: t.batch_size,
            R.CLIP_NORM: t.clip_norm,
            R.SEED: cfg.seed,
            R.TEMPERATURE: k.temperature,
            R.ALPHA: k.alpha,
            R.CLASS_WEIGHTING: k.class_weighting,
            R.MAX_CLASS_WEIGHT: k.max_class_weight,
            R.REFERENCE_BATCH: k.reference_batch,
            R.SOFT_TARGETS: k.soft_targets,
            R.TEACHER_HASH: teacher_hash,
        }
    )


def run_federation(
    grid: Grid,
    cfg: EdgeKDConfig,
    data: FederatedData,
    spec: ModelSpec,
    initial: nn.Module,
    *,
    mode: str,
    teacher: nn.Module | None,
    teacher_onnx: bytes,
    public_probs: np.ndarray,
    label: str,
    show_progress: bool,
    schedule: CompressionSchedule | None = None,
    checkpoint: CheckpointPlan | None = None,
    pruner: Pruner | None = None,
) -> tuple[nn.Module, list[dict[str, Any]], dict[str, np.ndarray]]:
    """Run ``cfg.train.num_rounds`` rounds from ``initial``; return the final student,
    the per-round records and the final pruning masks. ``mode="ce"`` is plain FedAvg
    with no teacher; ``public_probs`` are the teacher's soft targets on the public
    split, for the FedDF-style step; ``schedule`` the compression recipe (None: off).
    ``teacher_onnx`` is the teacher as shipped to on-device nodes (xz-compressed).
    ``checkpoint`` says where to write a checkpoint after every round and, when
    resuming, the checkpoint to go on from (``initial`` is then its student).
    ``pruner``: one that already pruned ``initial`` (start-round 0)."""
    t, k = cfg.train, cfg.kd
    reference = model_state(initial)
    schedule = schedule or CompressionSchedule()
    pruner = pruner or Pruner(schedule)
    resumed = checkpoint.resume_from if checkpoint is not None else None
    if resumed is not None:
        pruner.load_state_dict(resumed.pruner, resumed.pruner_initial_round)
        restore_rng(resumed.rng)
    teacher_record = proxy_record = None
    if mode == "kd" and k.soft_targets == "on-device":
        blob = np.frombuffer(lzma.compress(teacher_onnx, preset=9), dtype=np.uint8)
        teacher_record = ArrayRecord({R.TEACHER_ONNX: Array(blob)})
    elif mode == "kd" and teacher is not None:
        rng = np.random.default_rng([cfg.seed, 5])
        idx = rng.choice(len(data.public), size=min(k.proxy_size, len(data.public)), replace=False)
        px = data.public.x[idx]
        # Logits, not probabilities: each node softens them at its own T(B).
        logits = predict_logits(teacher, px).astype(np.float32)
        proxy_record = state_to_record({R.PROXY_X: px, R.PROXY_LOGITS: logits})
    post = None
    if mode == "kd" and teacher is not None and k.server_distill_epochs > 0:

        def post(server_round: int, arrays: ArrayRecord, masks: Masks) -> ArrayRecord:
            student = load_for_state(spec, record_to_state(arrays))
            with keep_pruned_at_zero(student, masks):
                distill_on_public(
                    student,
                    public_probs,
                    data,
                    cfg,
                    epochs=k.server_distill_epochs,
                    seed=cfg.seed + server_round,
                    lr=k.server_distill_lr,
                    teacher=teacher,
                )
            return state_to_record(model_state(student))

    def prepare_round(
        server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
        if not schedule.unstructured:
            return arrays, {}
        student = load_for_state(spec, record_to_state(arrays))
        masks = pruner.step(server_round, student)
        return state_to_record(model_state(student)), masks

    strategy = EdgeKDStrategy(
        reference_state=reference,
        teacher_record=teacher_record,
        proxy_record=proxy_record,
        post_aggregate=post,
        prepare_round=prepare_round,
        wire=WireFormat(
            int8=schedule.int8_wire,
            upload=cfg.compression.upload if mode == "kd" else "fp32",
            download=cfg.compression.download,
            entropy=cfg.compression.entropy,
            quantizer_for=schedule.qat_for,
        ),
        aggregator=robust_aggregator(t.aggregation),
        node_wait=t.round_timeout,
        min_fraction=t.min_fraction,
        max_examples=t.max_examples,
        norm_bound=t.norm_bound,
        fraction_train=t.fraction_train,
        fraction_evaluate=t.fraction_evaluate,
        min_train_nodes=t.min_nodes,
        min_evaluate_nodes=min(t.min_nodes, 2) if t.fraction_evaluate > 0 else 0,
        min_available_nodes=t.min_nodes,
    )
    first_round = resumed.round + 1 if resumed is not None else 1
    rounds: list[dict[str, Any]] = list(resumed.rounds) if resumed is not None else []
    tracker = RoundTracker(spec, data, t.num_rounds - first_round + 1, label, show_progress)
    start_sparsity = pruner.sparsity

    def round_record(rnd: int, result: Result) -> dict[str, Any]:
        return {
            "round": rnd,
            **tracker.results.get(rnd, {}),
            **strategy.ledger.get(rnd, RoundLedger()).counters(),
            # why replies were rejected or the round skipped, node by node
            "reasons": strategy.ledger.get(rnd, RoundLedger()).reasons[:MAX_REASONS],
            # round 0: the student entering round 1 (pruned already with start-round 0)
            "sparsity": _round_sparsity(strategy, rnd) if rnd else start_sparsity,
            "train_loss": metric_value(result.train_metrics_clientapp.get(rnd), R.TRAIN_LOSS),
            "federated_accuracy": metric_value(
                result.evaluate_metrics_clientapp.get(rnd), R.ACCURACY
            ),
        }

    def on_round_end(rnd: int, arrays: ArrayRecord, result: Result) -> None:
        if not rounds:
            rounds.append(round_record(0, result))
        rounds.append(round_record(rnd, result))
        if checkpoint is not None:
            pruner_state, initial_round = pruner.state_dict()
            save_run_checkpoint(
                checkpoint.out_dir,
                RunCheckpoint(
                    round=rnd,
                    state=record_to_state(arrays),
                    rounds=rounds,
                    teacher_sha256=checkpoint.teacher_sha256,
                    config=cfg.to_flat(),
                    pruner=pruner_state,
                    pruner_initial_round=initial_round,
                    rng=capture_rng(),
                    extra=checkpoint.extra,
                ),
            )

    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=state_to_record(reference),
            num_rounds=t.num_rounds,
            timeout=t.round_timeout,
            train_config=_train_config(cfg, mode, sha256_hex(teacher_onnx)),
            evaluate_config=ConfigRecord({R.MODE: mode}),
            evaluate_fn=tracker,
            first_round=first_round,
            on_round_end=on_round_end,
        )
    finally:
        tracker.close()
    final = load_for_state(spec, record_to_state(result.arrays)) if len(result.arrays) else initial
    return final, rounds, pruner.numpy_masks()


def prune_in_warm_start(
    student: nn.Module,
    initial: nn.Module,
    schedule: CompressionSchedule,
    public_probs: np.ndarray,
    data: FederatedData,
    cfg: EdgeKDConfig,
    teacher: nn.Module,
    say: Callable[[str], None],
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


@dataclass(frozen=True)
class CheckpointPlan:
    """Where `run_federation` writes its per-round checkpoint, and what it resumes."""

    out_dir: Path
    teacher_sha256: str
    resume_from: RunCheckpoint | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # saved as is (e.g. the structure)


def robust_aggregator(spec: str) -> FedAvg | None:
    """Flower's FedMedian or FedTrimmedAvg for ``train.aggregation``; None for FedAvg."""
    kind, beta = parse_aggregation(spec)
    if kind == "median":
        return FedMedian()
    if kind == "trimmed-mean":
        return TrimmedMean(beta=beta)
    return None


def _round_sparsity(strategy: EdgeKDStrategy, server_round: int) -> float:
    return sparsity_of(strategy.masks_for_round(server_round))


Say = Callable[[str], None]


@dataclass(frozen=True)
class TeacherPhase:
    """What the teacher phase hands on: the model, what nodes get of it (its ONNX), its
    hash (a resumed run must distil from the very same), and its soft targets."""

    model: nn.Module
    onnx: bytes
    sha256: str
    test_probs: np.ndarray  # on the devices' test split (agreement of every student)
    server_probs: np.ndarray  # on the server-domain test split
    public_probs: np.ndarray  # on the public split at kd.temperature (warm start, FedDF)


@dataclass(frozen=True)
class StudentStart:
    """The student entering round 1: warm-started, maybe pruned and reshaped."""

    init: nn.Module  # the seeded random student (server-only KD starts from it)
    random_init: nn.Module  # an untouched copy of it, for FedAvg without a teacher
    warm: nn.Module
    structure: dict[str, Any]  # filter ratio, factorized layers (report and checkpoint)
    pruner: Pruner | None


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
        test_probs=softmax_np(predict_logits(teacher, data.test.x)),
        server_probs=softmax_np(predict_logits(teacher, data.server_test.x)),
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


def _summary(model: nn.Module, data: FederatedData, teacher: TeacherPhase) -> dict[str, Any]:
    """A model's report block on the devices' test split (FP32 parameter bytes)."""
    probs = softmax_np(predict_logits(model, data.test.x))
    n = count_params(model)
    return model_summary(
        probs,
        data.test.y,
        data.num_classes,
        params=n,
        nbytes=4 * n,
        teacher_probs=teacher.test_probs,
    )


def run_report(
    cfg: EdgeKDConfig,
    data: FederatedData,
    teacher: TeacherPhase,
    start: StudentStart,
    student: nn.Module,
    rounds: list[dict[str, Any]],
    masks: Masks,
    schedule: CompressionSchedule,
) -> dict[str, Any]:
    """``report.json`` as far as the federation decides it (README: Outputs)."""
    return {
        "edgekd_version": __version__,
        "config": cfg.to_flat(),
        "dataset": {
            "name": cfg.data.dataset,
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
            "client_shift": cfg.data.client_shift,
            "partition": cfg.data.partition,
            "public": len(data.public),
            "server_test": len(data.server_test),
            "device_pool": len(data.pool),
            "test": len(data.test),
        },
        "teacher": {
            **_summary(teacher.model, data, teacher),
            "server_domain_accuracy": report_accuracy(teacher.server_probs, data.server_test.y),
            "onnx_sha256": sha256_hex(teacher.onnx),
            "onnx_bytes": len(teacher.onnx),
        },
        "student": {
            **_summary(student, data, teacher),
            "sparsity": sparsity_of(masks),
            "bits": schedule.bits,
            "structure": start.structure,
            "warm_start_accuracy": rounds[0].get("accuracy"),
            "dark_knowledge": dark_knowledge(
                softmax_np(predict_logits(student, data.test.x)), data.test.y, data.num_classes
            ),
        },
        "rounds": rounds,
        # Against the student as it started: filter pruning and low-rank shrink it.
        "communication": communication(
            rounds, count_params(start.init), count_params(teacher.model)
        ),
    }


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
    """``--baseline``: server-only KD with the same epoch budget, and FedAvg without a
    teacher from the same random student; adds both to ``report``, returns FedAvg's rounds."""
    server_only = copy.deepcopy(start.init)
    budget = cfg.train.warm_start_epochs + cfg.train.num_rounds * cfg.train.local_epochs
    distill_on_public(
        server_only,
        teacher.public_probs,
        data,
        cfg,
        epochs=budget,
        seed=cfg.seed,
        teacher=teacher.model,
    )
    report["server_only"] = {**_summary(server_only, data, teacher), "epochs": budget}
    baseline, baseline_rounds, _ = run_federation(
        grid,
        cfg,
        data,
        spec,
        start.random_init,
        mode="ce",
        teacher=None,
        teacher_onnx=teacher.onnx,
        public_probs=teacher.public_probs,
        label="fedavg baseline",
        show_progress=show_progress,
    )
    report["baseline"] = _summary(baseline, data, teacher)
    report["baseline_rounds"] = baseline_rounds
    return baseline_rounds


def write_exports(
    out_dir: Path,
    cfg: EdgeKDConfig,
    data: FederatedData,
    student: nn.Module,
    spec: ModelSpec,
    teacher: TeacherPhase,
    rounds: list[dict[str, Any]],
    baseline_rounds: list[dict[str, Any]] | None,
    report: dict[str, Any],
) -> None:
    """Checkpoints, rounds, plots, the ONNX and INT8 ONNX students (checked against the
    raspberry-pi gate into ``report["student_int8"]``), and ``report.json``."""
    save_checkpoint(student, spec, str(out_dir / "student.pt"))
    write_rounds(out_dir / "rounds.jsonl", rounds)
    write_plots(
        out_dir,
        rounds,
        softmax_np(predict_logits(student, data.test.x)),
        data.test.y,
        baseline_rounds,
    )
    save_checkpoint(int8_weight_fake_quant(student), spec, str(out_dir / "student.int8.pt"))
    student_onnx = export_onnx_bytes(student, data.input_shape)
    (out_dir / "student.onnx").write_bytes(student_onnx)
    int8_path = out_dir / "student.int8.onnx"
    int8_path.write_bytes(quantize_onnx_int8(student_onnx, data.public.x[:CALIBRATION_SAMPLES]))
    report["student_int8"] = check_int8_export(int8_path, student, data, teacher.test_probs)
    if not report["student_int8"]["ok"]:
        log.warning("INT8 export: %s", "; ".join(report["student_int8"]["problems"]))
    write_json_atomic(out_dir / "report.json", report)


# Reasons kept per round record: enough to see every kind of fault in a drill.
MAX_REASONS = 50
# The device profile whose parity gate `edgekd deploy build` applies to this export.
INT8_GATE_PROFILE = "raspberry-pi"


def check_int8_export(
    int8_path: Path, student: nn.Module, data: FederatedData, teacher_test: np.ndarray
) -> dict[str, Any]:
    """The INT8 ONNX student scored on the devices' test split with this host's
    onnxruntime, against the FP32 student with `INT8_GATE_PROFILE`'s thresholds, so a
    run never leaves a broken INT8 student without saying so.

    The report block: the model summary, ``parity`` (`ParityResult`), ``problems`` (each
    missed threshold), ``ok`` and ``host`` (where it was measured, `int8_host`)."""
    from edgekd.deploy.host import int8_host
    from edgekd.deploy.parity import measure_parity, onnx_predictor, parity_problems
    from edgekd.deploy.profiles import load_profile

    logits = onnx_predictor(int8_path)(data.test.x)
    parity = measure_parity(
        logits,
        predict_logits(student, data.test.x),
        data.test.y,
        model_file=int8_path.name,
        precision="int8",
        runtime="onnxruntime",
    )
    problems = parity_problems(parity, load_profile(INT8_GATE_PROFILE))
    block = model_summary(
        softmax_np(logits),
        data.test.y,
        data.num_classes,
        params=count_params(student),
        nbytes=int8_path.stat().st_size,
        teacher_probs=teacher_test,
    )
    return {
        **block,
        "parity": parity.to_dict(),
        "profile": INT8_GATE_PROFILE,
        "problems": problems,
        "ok": not problems,
        "host": int8_host(),
    }


def communication(
    rounds: list[dict[str, Any]], student_params: int, teacher_params: int
) -> dict[str, int]:
    """Bytes actually sent, next to what plain FedAvg of the FP32 student (and of the
    teacher) would have sent to and from the same nodes in the same rounds: 4 bytes a
    parameter, one model per training or evaluation instruction and one per reply that
    carried a model."""
    transfers = sum(
        r["messages"] + r.get("eval_messages", 0) + r["replies"] - r["failures"] for r in rounds
    )
    return {
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "fp32_fedavg_bytes": 4 * student_params * transfers,
        "teacher_fedavg_bytes": 4 * teacher_params * transfers,
    }


def report_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def fidelity_summaries(out_dir: Path, cfg: EdgeKDConfig) -> dict[str, Any]:
    """`edgekd inspect` of the FP32 and the INT8 ONNX student, each into its own folder.

    A failure here is logged and recorded, never allowed to lose the finished run."""
    from edgekd.inspection import run_inspect, summarize

    out: dict[str, Any] = {}
    for name, student in (("fp32", "student.pt"), ("int8_onnx", "student.int8.onnx")):
        try:
            full = run_inspect(
                str(out_dir / "teacher.pt"),
                str(out_dir / student),
                dataset_cfg=cfg.data,
                seed=cfg.seed,
                out_dir=out_dir / f"fidelity-{name.replace('_', '-')}",
                compressed_path=str(out_dir / "student.int8.pt") if name == "fp32" else None,
            )
            out[name] = summarize(full)
        except Exception as exc:  # noqa: BLE001 - the run's results are already saved
            log.warning("fidelity report for %s failed: %s", student, exc)
            out[name] = {"error": str(exc)}
    return out


def make_server_app(cfg: EdgeKDConfig | None = None, show_progress: bool = True) -> ServerApp:
    """A ServerApp bound to ``cfg``; with None it reads the run's ``run_config``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else EdgeKDConfig.from_run_config(context.run_config)
        if run_cfg.continual.scenario:  # `flwr run .` with continual.scenario set
            from edgekd.server.continual import run_continual

            out = run_continual(grid, run_cfg, show_progress=show_progress)
        else:
            out = run_edgekd(grid, run_cfg, show_progress=show_progress)
        log.info("edgekd: report written to %s", out / "report.json")

    return server_app


app = make_server_app()
