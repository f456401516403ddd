"""The federated rounds of one run: `run_federation` builds the strategy for a mode
(``"kd"`` with the teacher, ``"ce"`` plain FedAvg), runs it on the Grid, and records
every round (server-side score, wire counters, rejections, sparsity) and checkpoint."""

from __future__ import annotations

import lzma
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, Result
from torch import nn

from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig, parse_aggregation
from edgekd.core.data import FederatedData
from edgekd.core.numerics import softmax
from edgekd.core.round_settings import round_config
from edgekd.deploy.onnx_export import sha256_hex
from edgekd.learn.compression import CompressionSchedule, Pruner, keep_pruned_at_zero
from edgekd.learn.models import ModelSpec, load_for_state, model_state
from edgekd.learn.pruning import sparsity_of
from edgekd.learn.training import predict_logits
from edgekd.server.checkpoint import RunCheckpoint, capture_rng, restore_rng, save_run_checkpoint
from edgekd.server.ledger import RoundLedger, metric_value
from edgekd.server.node_wire import Masks, WireFormat
from edgekd.server.strategy import EdgeKDStrategy, TrimmedMean
from edgekd.server.teacher import distill_on_public
from edgekd.wire.payload import record_to_state, state_to_record

# Reasons kept per round record: enough to see every kind of fault in a drill.
MAX_REASONS = 50

PostAggregate = Callable[[int, ArrayRecord, Masks], ArrayRecord]


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
        probs = softmax(predict_logits(model, self.data.test.x))
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


@dataclass(frozen=True)
class CheckpointPlan:
    """Where `run_federation` writes its per-round checkpoint, and what it resumes."""

    out_dir: Path
    teacher_sha256: str
    resume_from: RunCheckpoint | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # saved as is (e.g. the structure)


def robust_aggregator(
    spec: str, server_lr: float = 1.0, server_momentum: float = 0.0
) -> FedAvg | None:
    """Flower's FedMedian or FedTrimmedAvg for ``train.aggregation``; for FedAvg, Flower's
    FedAvgM when ``train.server-lr`` or ``train.server-momentum`` asks for a server
    step (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", 2019: ``v = μ·v + Δ``, ``w = w − η·v`` with ``Δ``
    the round's average change); None for plain FedAvg."""
    kind, beta = parse_aggregation(spec)
    if kind == "median":
        return FedMedian()
    if kind == "trimmed-mean":
        return TrimmedMean(beta=beta)
    if server_lr != 1.0 or server_momentum != 0.0:
        return FedAvgM(server_learning_rate=server_lr, server_momentum=server_momentum)
    return None


def _round_sparsity(strategy: EdgeKDStrategy, server_round: int) -> float:
    return sparsity_of(strategy.masks_for_round(server_round))


def report_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def teacher_records(
    cfg: EdgeKDConfig,
    data: FederatedData,
    mode: str,
    teacher: nn.Module | None,
    teacher_onnx: bytes,
) -> tuple[ArrayRecord | None, ArrayRecord | None]:
    """What nodes get of the teacher in ``mode``: its xz-compressed ONNX (soft targets
    on-device), or a seeded draw of public inputs with its logits (proxy mode: each
    node softens them at its own T(B)). ``(None, None)`` for plain FedAvg."""
    k = cfg.kd
    if mode == "kd" and k.soft_targets == "on-device":
        blob = np.frombuffer(lzma.compress(teacher_onnx, preset=9), dtype=np.uint8)
        return ArrayRecord({R.TEACHER_ONNX: Array(blob)}), None
    if mode == "kd" and teacher is not None:
        rng = np.random.default_rng([cfg.seed, 5])
        idx = rng.choice(len(data.public), size=min(k.proxy_size, len(data.public)), replace=False)
        px = data.public.x[idx]
        logits = predict_logits(teacher, px).astype(np.float32)
        return None, state_to_record({R.PROXY_X: px, R.PROXY_LOGITS: logits})
    return None, None


def server_distill_step(
    cfg: EdgeKDConfig,
    data: FederatedData,
    spec: ModelSpec,
    teacher: nn.Module,
    public_probs: np.ndarray,
) -> PostAggregate:
    """The FedDF-style step after each aggregation: ``kd.server-distill-epochs`` of KD
    on the public split, pruned weights held at zero."""
    k = cfg.kd

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

    return post


def make_strategy(
    cfg: EdgeKDConfig,
    mode: str,
    spec: ModelSpec,
    reference: dict[str, np.ndarray],
    schedule: CompressionSchedule,
    pruner: Pruner,
    teacher: tuple[ArrayRecord | None, ArrayRecord | None],
    post: PostAggregate | None,
) -> EdgeKDStrategy:
    """The strategy for ``cfg``: wire format, robust aggregation, reply checks, sampling,
    and the pruner's masks set before each round."""
    t = cfg.train

    def prepare_round(
        server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
        if not schedule.unstructured:
            return arrays, {}
        student = load_for_state(spec, record_to_state(arrays))
        masks = pruner.step(server_round, student)
        return state_to_record(model_state(student)), masks

    teacher_record, proxy_record = teacher
    return EdgeKDStrategy(
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
        aggregator=robust_aggregator(t.aggregation, t.server_lr, t.server_momentum),
        node_wait=t.round_timeout,
        min_fraction=t.min_fraction,
        max_evaluate_nodes=t.max_evaluate_nodes,
        max_examples=t.max_examples,
        norm_bound=t.norm_bound,
        fraction_train=t.fraction_train,
        fraction_evaluate=t.fraction_evaluate,
        min_train_nodes=t.min_nodes,
        min_evaluate_nodes=min(t.min_nodes, 2) if t.fraction_evaluate > 0 else 0,
        min_available_nodes=t.min_nodes,
    )


class RoundLog:
    """Flower's ``on_round_end``: one record per round (round 0 is the student entering
    round 1) and, with a `CheckpointPlan`, a checkpoint after every round."""

    def __init__(
        self,
        cfg: EdgeKDConfig,
        strategy: EdgeKDStrategy,
        tracker: RoundTracker,
        pruner: Pruner,
        checkpoint: CheckpointPlan | None,
    ) -> None:
        self.cfg, self.strategy, self.tracker = cfg, strategy, tracker
        self.pruner, self.checkpoint = pruner, checkpoint
        resumed = checkpoint.resume_from if checkpoint is not None else None
        self.rounds: list[dict[str, Any]] = list(resumed.rounds) if resumed is not None else []
        self.start_sparsity = pruner.sparsity

    def record(self, rnd: int, result: Result) -> dict[str, Any]:
        ledger = self.strategy.ledger.get(rnd, RoundLedger())
        return {
            "round": rnd,
            **self.tracker.results.get(rnd, {}),
            **ledger.counters(),
            # why replies were rejected or the round skipped, node by node
            "reasons": ledger.reasons[:MAX_REASONS],
            # round 0: the student entering round 1 (pruned already with start-round 0)
            "sparsity": _round_sparsity(self.strategy, rnd) if rnd else self.start_sparsity,
            "train_loss": metric_value(result.train_metrics_clientapp.get(rnd), R.TRAIN_LOSS),
            "federated_accuracy": metric_value(
                result.evaluate_metrics_clientapp.get(rnd), R.ACCURACY
            ),
        }

    def __call__(self, rnd: int, arrays: ArrayRecord, result: Result) -> None:
        if not self.rounds:
            self.rounds.append(self.record(0, result))
        self.rounds.append(self.record(rnd, result))
        plan = self.checkpoint
        if plan is None:
            return
        pruner_state, initial_round = self.pruner.state_dict()
        save_run_checkpoint(
            plan.out_dir,
            RunCheckpoint(
                round=rnd,
                state=record_to_state(arrays),
                rounds=self.rounds,
                teacher_sha256=plan.teacher_sha256,
                config=self.cfg.to_flat(),
                pruner=pruner_state,
                pruner_initial_round=initial_round,
                rng=capture_rng(),
                extra=plan.extra,
                arrays=momentum_arrays(self.strategy.aggregator),
            ),
        )


MOMENTUM = "server-momentum/"  # RunCheckpoint.arrays prefix of FedAvgM's momentum buffer


def momentum_arrays(aggregator: FedAvg | None) -> dict[str, np.ndarray]:
    """FedAvgM's momentum buffer (``train.server-momentum``) for the checkpoint, one array
    per tensor in the student's order: a resumed run goes on with it, not from zero."""
    vector = aggregator.momentum_vector if isinstance(aggregator, FedAvgM) else None
    return {f"{MOMENTUM}{i:04d}": np.asarray(v) for i, v in enumerate(vector or [])}


def restore_momentum(aggregator: FedAvg | None, arrays: dict[str, np.ndarray]) -> None:
    """Put back what `momentum_arrays` saved (nothing saved: the buffer stays empty)."""
    saved = [arrays[k] for k in sorted(arrays) if k.startswith(MOMENTUM)]
    if saved and isinstance(aggregator, FedAvgM):
        aggregator.momentum_vector = [np.array(v) for v in saved]


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
    t = cfg.train
    reference = model_state(initial)
    schedule = schedule or CompressionSchedule()
    pruner = pruner or Pruner(schedule)
    resumed = checkpoint.resume_from if checkpoint is not None else None
    if resumed is not None:
        pruner.load_state_dict(resumed.pruner, resumed.pruner_initial_round)
        restore_rng(resumed.rng)
    records = teacher_records(cfg, data, mode, teacher, teacher_onnx)
    post = None
    if mode == "kd" and teacher is not None and cfg.kd.server_distill_epochs > 0:
        post = server_distill_step(cfg, data, spec, teacher, public_probs)
    strategy = make_strategy(cfg, mode, spec, reference, schedule, pruner, records, post)
    if resumed is not None:
        restore_momentum(strategy.aggregator, resumed.arrays)
    first_round = resumed.round + 1 if resumed is not None else 1
    tracker = RoundTracker(spec, data, t.num_rounds - first_round + 1, label, show_progress)
    round_log = RoundLog(cfg, strategy, tracker, pruner, checkpoint)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=state_to_record(reference),
            num_rounds=t.num_rounds,
            timeout=t.round_timeout,
            train_config=ConfigRecord(dict(round_config(cfg, mode, sha256_hex(teacher_onnx)))),
            evaluate_config=ConfigRecord({R.MODE: mode}),
            evaluate_fn=tracker,
            first_round=first_round,
            on_round_end=round_log,
        )
    finally:
        tracker.close()
    final = load_for_state(spec, record_to_state(result.arrays)) if len(result.arrays) else initial
    return final, round_log.rounds, pruner.numpy_masks()
