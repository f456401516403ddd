"""A heterogeneous federation: one teacher, a student per device class (``fleet.classes``).

A Raspberry Pi, a phone and a Jetson cannot run the same student; distillation lets
students of different sizes learn together. Before round 1 the server asks every node
for its class (`edgekd.client.app.handle_fleet_query`) and warm-starts each class's
student (its width from `edgekd.core.fleet`) by KD on the public split; a node that
connects later is asked before the next round and joins its class from then on
(`admit_late_nodes`). Each round:

1. every class is a federation of its own: an `EdgeKDStrategy` per class (reply checks,
   bounds, wire accounting, FedAvg) sends its student to its class's nodes only, each
   message naming the width, and averages their replies. A class narrower than the
   widest also gets the widest class's current student as ONNX (`peer_record`): its nodes
   distil on their own data toward ``(1 - w) * z_teacher + w * z_peer``, ``w =
   fleet.peer-weight``, with CE weight ``fleet.peer-alpha`` in kd.alpha's place (the
   peer learned the devices' domain from the other classes' data; the teacher did not).
   With ``fleet.train-narrower`` a wider class's nodes also train every narrower class's
   student (`helper_nodes`); each reply goes to the class whose message it answers;
2. the **server step** across classes, FedDF-style (Lin et al., "Ensemble Distillation
   for Robust Model Fusion in Federated Learning", NeurIPS 2020, Alg. 1, with the
   server's teacher as one more member): each class's averaged student c is distilled on
   the public split (x, y) for ``fleet.distill-epochs`` at ``kd.server-distill-lr``,
   with the loss of edgekd's own server step
   (`edgekd.server.federation.server_distill_step`)::

       L_c = alpha * CE(z_c(x), y) + (1 - alpha) * tau^2 * KL(p(x) || softmax(z_c(x) / tau))
       p(x) = softmax( mean_{m in M_c} z_m(x) / tau )

   where M_c is the teacher plus, with ``fleet.ensemble = all`` (the default), every
   class's student, c's own included (FedDF's ensemble), or with ``larger`` every other
   class's student at least as wide as c (Fed-ET's direction, Cho et al., IJCAI 2022:
   large models teach small ones; the widest class then distils from the teacher alone).
   ``alpha`` and ``tau`` are ``kd.alpha`` and ``kd.temperature``.

The comparator **own class** runs the same rounds from the same warm starts with each
class's server step toward the teacher alone (same loss, epochs and rate) and no peer:
each class in a federation of its own, as edgekd trains a single student. With ``--baseline``,
**server-only** KD of each class's size (tuned as `edgekd.server.comparators` tunes it)
is added.

Outputs: ``report.json`` (``fleet``: a block per class: accuracy, params, bytes,
fidelity, bytes each way, the comparators, the per-round accuracy), ``teacher.pt`` and
``students/<class>.pt``; ``edgekd deploy build --model RUN/students/<class>.pt --target
<its profile> --run RUN --out BUNDLE`` bundles each.
"""

from __future__ import annotations

import copy
import logging
import lzma
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import ArrayDataset, FederatedData, load_federated_data, pooled_client_splits
from edgekd.core.errors import EdgeKDError
from edgekd.core.fleet import DeviceClass, parse_fleet_classes
from edgekd.core.numerics import softmax
from edgekd.core.round_settings import round_config
from edgekd.deploy.onnx_export import export_onnx_bytes, sha256_hex
from edgekd.deploy.profiles import load_profile
from edgekd.learn.compression import CompressionSchedule, Pruner
from edgekd.learn.models import (
    ModelSpec,
    build_model,
    count_params,
    load_for_state,
    model_state,
    save_checkpoint,
    spec_for,
)
from edgekd.learn.training import predict_logits, seed_everything
from edgekd.reporting.report import write_json_atomic
from edgekd.server.comparators import accuracy, tuned_server_only
from edgekd.server.federation import make_strategy, teacher_records
from edgekd.server.ledger import RoundLedger
from edgekd.server.outputs import model_block
from edgekd.server.phases import Say, StudentStart, TeacherPhase
from edgekd.server.pipeline import student_start, teacher_phase
from edgekd.server.strategy import EdgeKDStrategy
from edgekd.server.teacher import distill_on_public
from edgekd.wire.payload import record_nbytes, record_to_state, state_to_record

log = logging.getLogger("edgekd")

STEPS = ("ensemble", "teacher")  # the fleet's FedDF step, the own-class comparator's
ENSEMBLE_WORDS = {
    "larger": "every other class's student at least as wide",
    "all": "every class's student, its own included",
}


class FleetError(EdgeKDError, RuntimeError):
    """A fleet run cannot go on: a class with no node, a student over its budget."""


class ClassGrid:
    """The Grid as one device class's strategy sees it: ``get_node_ids`` yields only the
    connected nodes of the class; everything else is the real Grid's."""

    def __init__(self, grid: Grid, nodes: Iterable[int]) -> None:
        self._grid, self._nodes = grid, frozenset(nodes)

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n in self._nodes]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def class_grid(grid: Grid, nodes: Iterable[int]) -> Grid:
    """`ClassGrid` typed as the Grid it stands in for."""
    return cast(Grid, ClassGrid(grid, nodes))


@dataclass
class ClassRun:
    """One device class: its config (the run's, with its width), student and nodes."""

    device: DeviceClass
    cfg: EdgeKDConfig
    spec: ModelSpec
    nodes: list[int]
    start: StudentStart
    # A node that joined after the class query -> the first round it trains in (the
    # nodes asked before round 1 are absent: they train from round 1)
    joined: dict[int, int] = field(default_factory=dict)
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by step
    final: dict[str, nn.Module] = field(default_factory=dict)  # by step


def ask_classes(
    grid: Grid,
    classes: tuple[DeviceClass, ...],
    min_nodes: int,
    timeout: float,
    asked: set[int] | None = None,
) -> dict[str, list[int]]:
    """Ask every connected node its class (waiting up to ``timeout`` for ``min_nodes``);
    a node that fails or names no class of the fleet is logged and left out. The nodes
    asked are added to ``asked``.

    Raises:
        FleetError: a class no node answered for.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < min_nodes and time.monotonic() < deadline:
        time.sleep(1.0)
    if asked is not None:
        asked.update(nodes)
    out = query_classes(grid, nodes, classes, timeout)
    empty = [name for name, members in out.items() if not members]
    if empty:
        raise FleetError(
            f"fleet.classes: no node of class {', '.join(empty)} answered within "
            f"{timeout:.0f} s ({len(nodes)} nodes connected)"
        )
    return out


def query_classes(
    grid: Grid, nodes: list[int], classes: tuple[DeviceClass, ...], timeout: float
) -> dict[str, list[int]]:
    """Each class's members among ``nodes``, sorted, by asking each node its class; a node
    that fails or names no class of the fleet is logged and left out."""
    query = ConfigRecord({R.FLEET_QUERY: "class"})
    messages = [
        Message(RecordDict({R.CONFIG: query}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    out: dict[str, list[int]] = {c.name: [] for c in classes}
    for reply in grid.send_and_receive(messages, timeout=timeout) if messages else []:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("fleet: node %d did not say its class: %s", node, reply.error.reason)
            continue
        config = reply.content.config_records.get(R.CONFIG)
        name = str(config.get(R.FLEET_CLASS, "")) if config is not None else ""
        if name not in out:
            log.warning("fleet: node %d names class '%s', not one of %s", node, name, list(out))
            continue
        out[name].append(node)
    return {name: sorted(members) for name, members in out.items()}


def admit_late_nodes(
    grid: Grid, runs: list[ClassRun], asked: set[int], rnd: int, timeout: float
) -> None:
    """Ask the nodes that connected since the class query (and were never asked) their
    class; each one that names a class joins it and trains from round ``rnd`` on, in this
    pass and in every later one (so a comparator pass gives it the same rounds)."""
    new = [n for n in grid.get_node_ids() if n not in asked]
    if not new:
        return
    asked.update(new)
    members = query_classes(grid, new, tuple(run.device for run in runs), timeout)
    for run in runs:
        for node in members[run.device.name]:
            run.nodes.append(node)
            run.joined[node] = rnd
            log.info("fleet: node %d joined class %s at round %d", node, run.device.name, rnd)


def round_nodes(run: ClassRun, rnd: int) -> list[int]:
    """The class's nodes that train in round ``rnd``."""
    return [n for n in run.nodes if run.joined.get(n, 1) <= rnd]


def run_fleet(grid: Grid, cfg: EdgeKDConfig, *, show_progress: bool = True) -> Path:
    """The server side of a fleet run (module docstring); returns the run folder."""
    started = time.perf_counter()
    out_dir = Path(cfg.out_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        if show_progress:
            print(message, flush=True)

    seed_everything(cfg.seed)
    data = load_federated_data(cfg.data, cfg.seed)
    classes = parse_fleet_classes(cfg.fleet.classes)
    say(
        f"teacher: loading {cfg.model.teacher_path}"
        if cfg.model.teacher_path
        else f"teacher: training on {len(data.public)} public samples"
    )
    teacher = teacher_phase(
        cfg, data, spec_for(data.input_shape, data.num_classes, cfg.model.teacher_width),
        out_dir, None,
    )  # fmt: skip
    asked: set[int] = set()  # nodes asked their class: a node that connects later is too
    members = ask_classes(grid, classes, cfg.train.min_nodes, cfg.train.round_timeout, asked)
    say("fleet: " + ", ".join(f"{c.name} {len(members[c.name])} nodes" for c in classes))
    runs = [class_run(c, cfg, data, teacher, members[c.name], say) for c in classes]
    for step, label in (("ensemble", "fleet"), ("teacher", "own-class comparator")):
        seed_everything(cfg.seed)
        run_rounds(
            grid, cfg, data, teacher, runs, asked, step=step, label=label, show=show_progress
        )
    nodes = sum(len(run.nodes) for run in runs)
    _, val = pooled_client_splits(data, cfg.data.partition, nodes, cfg.seed, cfg.data.val_fraction)
    report = fleet_report(cfg, data, teacher, runs, val)
    if cfg.baseline:
        server_only_per_class(cfg, data, teacher, runs, val, report, say)
    (out_dir / "students").mkdir(exist_ok=True)
    for run in runs:
        save_checkpoint(
            run.final["ensemble"], run.spec, str(out_dir / f"students/{run.device.name}.pt")
        )
    report["seconds"] = time.perf_counter() - started
    write_json_atomic(out_dir / "report.json", report)
    for run in runs:
        block = report["fleet"]["classes"][run.device.name]
        say(
            f"{run.device.name} (width {run.device.width}): {block['accuracy']:.4f}, own class "
            f"only {block['own_class']['accuracy']:.4f} ({block['gain_over_own_class']:+.4f})"
        )
    return out_dir


def class_run(
    device: DeviceClass,
    cfg: EdgeKDConfig,
    data: FederatedData,
    teacher: TeacherPhase,
    nodes: list[int],
    say: Say,
) -> ClassRun:
    """A class's config and warm-started student, checked against its profile's budget."""
    class_cfg = replace(cfg, model=replace(cfg.model, student_width=device.width))
    spec = spec_for(data.input_shape, data.num_classes, device.width)
    nbytes, budget = 4 * count_params(build_model(spec)), load_profile(device.profile).budget
    if nbytes > budget.max_model_bytes:
        raise FleetError(
            f"fleet.classes: class {device.name}'s student (width {device.width}, {nbytes} "
            f"bytes in FP32) is over the {device.profile} profile's {budget.max_model_bytes}"
            f"-byte budget; give it a smaller width ({device.name}=<width>:<share>)"
        )
    say(f"{device.name}: width {device.width}, {len(nodes)} nodes")
    start = student_start(class_cfg, data, spec, teacher, CompressionSchedule(), None, say)
    return ClassRun(device, class_cfg, spec, nodes, start)


def class_strategy(
    run: ClassRun, records: tuple[ArrayRecord | None, ArrayRecord | None]
) -> EdgeKDStrategy:
    """Edgekd's strategy for one class's federation, without its own server step (the
    fleet's runs after every class has averaged) and without federated evaluation."""
    t = run.cfg.train
    cfg = replace(
        run.cfg, train=replace(t, fraction_evaluate=0.0, min_nodes=min(t.min_nodes, len(run.nodes)))
    )
    schedule = CompressionSchedule()
    reference = model_state(run.start.warm)
    return make_strategy(cfg, "kd", run.spec, reference, schedule, Pruner(schedule), records, None)


def run_rounds(
    grid: Grid,
    cfg: EdgeKDConfig,
    data: FederatedData,
    teacher: TeacherPhase,
    runs: list[ClassRun],
    asked: set[int],
    *,
    step: str,
    label: str,
    show: bool,
) -> None:
    """``train.num-rounds`` rounds of every class from its warm start, each round ending
    in the server ``step`` (``ensemble``: FedDF across classes; ``teacher``: each class
    toward the teacher alone); fills each run's ``rounds[step]`` and ``final[step]``.
    A node not in ``asked`` that connects is asked its class before the next round
    (`admit_late_nodes`)."""
    if step not in STEPS:
        raise ValueError(f"unknown server step '{step}' (use {', '.join(STEPS)})")
    # What nodes get of the teacher (its xz-compressed ONNX or the proxy set), made once
    records = teacher_records(cfg, data, "kd", teacher.model, teacher.onnx)
    strategies = [class_strategy(run, records) for run in runs]
    arrays = [state_to_record(model_state(run.start.warm)) for run in runs]
    base = round_config(cfg, "kd", sha256_hex(teacher.onnx))
    for run, record in zip(runs, arrays, strict=True):
        run.rounds[step] = [_round_record(0, run, record, data, None)]
    bar = _progress(cfg.train.num_rounds, label) if show else None
    for rnd in range(1, cfg.train.num_rounds + 1):
        admit_late_nodes(grid, runs, asked, rnd, cfg.train.round_timeout)
        peer = peer_record(cfg, data, runs, arrays) if step == "ensemble" else None
        sent_by: list[list[Message]] = []
        for run, strategy, record in zip(runs, strategies, arrays, strict=True):
            config = ConfigRecord({**base, R.STUDENT_WIDTH: run.device.width})
            narrower = peer is not None and run.device.width < peer[0]
            if narrower:
                config[R.PEER_WEIGHT] = cfg.fleet.peer_weight
                config[R.ALPHA] = cfg.fleet.peer_alpha
            nodes = round_nodes(run, rnd) + helper_nodes(cfg, runs, run, rnd, step)
            sent = list(strategy.configure_train(rnd, record, config, class_grid(grid, nodes)))
            if peer is not None and narrower:
                for msg in sent:
                    msg.content.array_records[R.PEER] = peer[1]
                ledger = strategy.ledger.setdefault(rnd, RoundLedger())
                ledger.bytes_down += record_nbytes(peer[1]) * len(sent)
            sent_by.append(sent)
        messages = [msg for sent in sent_by for msg in sent]
        replies = list(grid.send_and_receive(messages, timeout=cfg.train.round_timeout))
        routed = route_replies(replies, sent_by)
        for i, (strategy, own) in enumerate(zip(strategies, routed, strict=True)):
            averaged, _ = strategy.aggregate_train(rnd, own)
            if averaged is not None:
                arrays[i] = averaged
        arrays = server_step(cfg, data, teacher, runs, arrays, step, rnd)
        for run, strategy, record in zip(runs, strategies, arrays, strict=True):
            run.rounds[step].append(_round_record(rnd, run, record, data, strategy))
        if bar is not None:
            bar.set_postfix({r.device.name: f"{r.rounds[step][-1]['accuracy']:.3f}" for r in runs})
            bar.update(1)
    if bar is not None:
        bar.close()
    for run, record in zip(runs, arrays, strict=True):
        run.final[step] = load_for_state(run.spec, record_to_state(record))


def helper_nodes(
    cfg: EdgeKDConfig, runs: list[ClassRun], run: ClassRun, rnd: int, step: str
) -> list[int]:
    """The nodes of every wider class, which with ``fleet.train-narrower`` also train
    ``run``'s student on their own data in the fleet's pass (a device trains every student
    that fits it: HeteroFL, Diao et al., ICLR 2021; FjORD, Horváth et al., NeurIPS 2021).
    The own-class comparator has none: a class alone has only its own nodes."""
    if step != "ensemble" or not cfg.fleet.train_narrower:
        return []
    wider = [other for other in runs if other.device.width > run.device.width]
    return [node for other in wider for node in round_nodes(other, rnd)]


def route_replies(replies: list[Message], sent_by: list[list[Message]]) -> list[list[Message]]:
    """Each class's replies, matched by the message each answers (the Grid set the ids
    when it sent them): a node of a wider class answers its own class's message and, with
    ``fleet.train-narrower``, a narrower class's too. A reply to no message sent is
    dropped."""
    owner = {msg.metadata.message_id: i for i, sent in enumerate(sent_by) for msg in sent}
    out: list[list[Message]] = [[] for _ in sent_by]
    for reply in replies:
        i = owner.get(reply.metadata.reply_to_message_id)
        if i is not None:
            out[i].append(reply)
    return out


def peer_record(
    cfg: EdgeKDConfig, data: FederatedData, runs: list[ClassRun], arrays: list[ArrayRecord]
) -> tuple[int, ArrayRecord] | None:
    """``(width, record)``: the widest class's current student as xz-compressed ONNX, which
    a narrower class's nodes run in onnxruntime (torch-free, as they run the teacher) and
    blend into their on-device soft targets at ``fleet.peer-weight`` (see
    `edgekd.client.teacher_cache.round_teacher_logits`). It learned the devices' domain
    from the other nodes' data, which the teacher, trained on the server's, did not (the
    screen: docs/device-classes.md). None when the weight is 0, the soft targets are not
    on-device, or every class is as wide."""
    if cfg.fleet.peer_weight == 0 or cfg.kd.soft_targets != "on-device":
        return None
    widest = max(range(len(runs)), key=lambda i: runs[i].device.width)
    width = runs[widest].device.width
    if all(run.device.width == width for run in runs):
        return None
    model = load_for_state(runs[widest].spec, record_to_state(arrays[widest]))
    onnx = export_onnx_bytes(model, data.input_shape)
    blob = np.frombuffer(lzma.compress(onnx, preset=9), dtype=np.uint8)
    return width, ArrayRecord({R.TEACHER_ONNX: Array(blob)})


def server_step(
    cfg: EdgeKDConfig,
    data: FederatedData,
    teacher: TeacherPhase,
    runs: list[ClassRun],
    arrays: list[ArrayRecord],
    step: str,
    rnd: int,
) -> list[ArrayRecord]:
    """The server step after every class averaged (module docstring): each class's
    student distilled toward its ensemble's soft targets (``step="ensemble"``), or
    toward the teacher's (``"teacher"``), for ``fleet.distill-epochs``."""
    k, epochs = cfg.kd, cfg.fleet.distill_epochs
    if epochs == 0:
        return arrays
    students = [
        load_for_state(r.spec, record_to_state(a)) for r, a in zip(runs, arrays, strict=True)
    ]
    out = []
    for run, student in zip(runs, students, strict=True):
        targets, source = teacher.public_probs, cast(nn.Module | None, teacher.model)
        peers = ensemble_members(runs, students, run, cfg.fleet.ensemble)
        if step == "ensemble" and peers:
            members = [teacher.model, *peers]
            targets, source = ensemble_targets(members, data.public.x, k.temperature), None
        distill_on_public(
            student, targets, data, run.cfg, epochs=epochs, seed=cfg.seed + rnd,
            lr=k.server_distill_lr, teacher=source,
        )  # fmt: skip
        out.append(state_to_record(model_state(student)))
    return out


def ensemble_members(
    runs: list[ClassRun], students: list[nn.Module], run: ClassRun, mode: str
) -> list[nn.Module]:
    """The students whose logits join the teacher's in ``run``'s targets: with ``all``,
    every class's (its own included, as in FedDF); with ``larger``, the other classes' at
    least as wide as ``run``'s (none for the widest: it distils from the teacher alone,
    exactly as its own-class comparator does)."""
    if mode == "all":
        return list(students)
    width = run.device.width
    return [
        s for r, s in zip(runs, students, strict=True) if r is not run and r.device.width >= width
    ]


def ensemble_targets(models: list[nn.Module], x: np.ndarray, temperature: float) -> np.ndarray:
    """FedDF's soft targets: the softmax of the members' mean logits at ``temperature``."""
    logits = np.mean([predict_logits(m, x) for m in models], axis=0)
    return softmax(logits / temperature).astype(np.float32)


def _round_record(
    rnd: int, run: ClassRun, record: ArrayRecord, data: FederatedData, strategy: Any
) -> dict[str, Any]:
    model = load_for_state(run.spec, record_to_state(record))
    ledger = strategy.ledger.get(rnd) if strategy is not None else None
    out: dict[str, Any] = {"round": rnd, "accuracy": accuracy(model, data.test)}
    if ledger is not None:
        out.update(ledger.counters())
        out["reasons"] = ledger.reasons[:20]
    return out


def _progress(total: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="round", leave=True)


def fleet_report(
    cfg: EdgeKDConfig,
    data: FederatedData,
    teacher: TeacherPhase,
    runs: list[ClassRun],
    val: ArrayDataset,
) -> dict[str, Any]:
    """``report.json`` of a fleet run: the config, the teacher, and per class its student
    (`model_block`: accuracy, params, bytes, fidelity; accuracy on ``val``, the nodes'
    pooled validation shares, for tuning), its nodes, the bytes it sent and received,
    the own-class comparator and the gain over it, and its rounds."""
    from edgekd import __version__

    classes = {}
    for run in runs:
        fleet_rounds, own_rounds = run.rounds["ensemble"], run.rounds["teacher"]
        own = model_block(run.final["teacher"], data, teacher)
        own["val_accuracy"] = accuracy(run.final["teacher"], val)
        block = model_block(run.final["ensemble"], data, teacher)
        block["val_accuracy"] = accuracy(run.final["ensemble"], val)
        classes[run.device.name] = {
            "profile": run.device.profile,
            "width": run.device.width,
            "nodes": len(run.nodes),
            "joined_late": {str(n): r for n, r in sorted(run.joined.items())},
            **block,
            "warm_start_accuracy": fleet_rounds[0]["accuracy"],
            "bytes_down": sum(int(r.get("bytes_down", 0)) for r in fleet_rounds),
            "bytes_up": sum(int(r.get("bytes_up", 0)) for r in fleet_rounds),
            "own_class": {**own, "rounds": own_rounds},
            "gain_over_own_class": block["accuracy"] - own["accuracy"],
            "rounds": fleet_rounds,
        }
    return {
        "edgekd_version": __version__,
        "config": cfg.to_flat(),
        "teacher": {**model_block(teacher.model, data, teacher), "onnx_bytes": len(teacher.onnx)},
        "fleet": {
            "step": f"{cfg.fleet.distill_epochs} epochs of KD on the public split after each "
            "round toward softmax(mean logits / tau) of the teacher and "
            + ENSEMBLE_WORDS[cfg.fleet.ensemble],
            "classes": classes,
        },
    }


def server_only_per_class(
    cfg: EdgeKDConfig,
    data: FederatedData,
    teacher: TeacherPhase,
    runs: list[ClassRun],
    val: ArrayDataset,
    report: dict[str, Any],
    say: Say,
) -> None:
    """``--baseline``: each class's size distilled on the server alone, with the run's
    budget (warm start + rounds x local epochs) and the grid of `tuned_server_only`,
    chosen on the pooled validation shares of the devices."""
    budget = cfg.train.warm_start_epochs + cfg.train.num_rounds * cfg.train.local_epochs
    for run in runs:
        say(f"{run.device.name}: server-only KD comparator ({budget} epochs, tuned)")
        tuned = tuned_server_only(
            run.cfg, data, copy.deepcopy(run.start.init), teacher.model, teacher.public_probs,
            val, budget,
        )  # fmt: skip
        block = report["fleet"]["classes"][run.device.name]
        block["server_only"] = {
            **model_block(tuned.model, data, teacher),
            "chosen": tuned.chosen,
            "candidates": tuned.candidates,
            "epochs": budget,
        }
