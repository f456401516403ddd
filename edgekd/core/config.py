"""Run configuration: frozen dataclasses parsed once from Flower's flat ``run_config``.

Flower flattens ``[tool.flwr.app.config]`` tables into dotted keys (``kd.temperature``);
`EdgeKDConfig.from_run_config` turns such a mapping into typed objects and rejects
unknown keys and bad values with a one-line `ConfigError` naming the key. The
defaults below are the single source of truth; ``pyproject.toml`` repeats them for
``flwr run .`` and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from edgekd.core.errors import ConfigError
from edgekd.core.fleet import FleetConfig, check_fleet

KNOWN_DATASETS = ("mnist1d", "digits", "mnist", "fashion-mnist", "cifar10")
SOFT_TARGET_MODES = ("on-device", "proxy")
OPTIMIZERS = ("adam", "sgd")
PRUNE_METHODS = ("magnitude", "movement", "filter")
QUANTIZE_MODES = ("", "int8", "ternary")
UPLOAD_MODES = ("fp32", "int8-delta", "int8-delta-ef", "int4-delta", "int4-delta-ef")
DOWNLOAD_MODES = ("state", "delta")
ENTROPY_CODERS = ("none", "zlib")
TEACHER_FORMATS = ("fp32", "int8")
# The continual streams (edgekd.continual.streams.SCENARIOS) use this very tuple; the
# methods are the keys of edgekd.continual.regularizers.REGULARIZERS (a test keeps them).
CONTINUAL_SCENARIOS = ("class-incremental", "domain-incremental")
CONTINUAL_METHODS = ("teacher-kd", "lwf-proxy", "replay-proxy", "lwf", "ewc", "replay", "naive")
LR_DECAYS = ("none", "cosine")  # continual.lr-decay: edgekd.server.continual.TaskSchedule
# The methods that get the teacher-kd proxy set: it and the two without its soft targets
PROXY_METHODS = ("teacher-kd", "lwf-proxy", "replay-proxy")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist1d"  # generated offline by the mnist1d package
    data_dir: str = ""  # folder with IDX / CIFAR pickle files for the file datasets
    num_samples: int = 20_000  # per domain; mnist1d generates this many
    client_shift: bool = True  # devices see a shifted domain: the case edgekd is for
    partition: str = "dirichlet:0.5"  # iid | dirichlet:<alpha> | pathological:<k>
    public_fraction: float = 0.3  # server-held share (teacher training, proxy set)
    test_fraction: float = 0.2  # held-out test share of each domain
    val_fraction: float = 0.1  # each client's local validation share


@dataclass(frozen=True)
class ModelConfig:
    teacher_width: int = 64  # ~31k params: 0.95 on the server domain from 6k samples
    student_width: int = 16  # ~3.3k params, about 1/10 of the teacher
    teacher_path: str = ""  # load a trained teacher instead of training one
    # Start the federation from this student (e.g. the one in deployed bundles, whose
    # frozen feature extractor edge nodes keep) instead of a warm-started one.
    student_path: str = ""
    teacher_epochs: int = 40  # Adam + cosine schedule; converged on mnist1d by ~30
    teacher_lr: float = 3e-3


@dataclass(frozen=True)
class TrainConfig:
    num_rounds: int = 20
    local_epochs: int = 3
    lr: float = 1e-2  # Adam, with clipping: fastest stable setting found on mnist1d
    optimizer: str = "adam"
    batch_size: int = 32
    clip_norm: float = 2.0  # bounds the step when a tiny class has a large weight
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.25  # federated evaluation on a sample of clients
    max_evaluate_nodes: int = 50  # ... of at most this many a round (0 = no cap)
    min_nodes: int = 2
    warm_start_epochs: int = 60  # server-side KD on the public split before round 1
    warm_start_lr: float = 0.0  # Adam, cosine; 0 = model.teacher-lr (the teacher's recipe)
    round_timeout: float = 600.0  # never wait without bound for a reply
    # A round aggregates only if at least this fraction of the nodes it asked sent a valid
    # update; otherwise the global student stays as it was (one node is never enough
    # evidence to overwrite twenty's work).
    min_fraction: float = 0.5
    aggregation: str = "fedavg"  # fedavg | median | trimmed-mean:<beta>: robust to poisoning
    # A server step over the average (FedAvgM, with fedavg only): w -= server-lr * v,
    # v = server-momentum * v + (w - average). 1.0 / 0.0 is plain FedAvg.
    server_lr: float = 1.0
    server_momentum: float = 0.0
    # Reply bounds (edgekd.server.replies): a reply claiming more examples is rejected
    # (raise it for fleets with more local data), and each update's change is clipped to
    # this multiple of the round's median change (0 = off): one x1e6 node moves the
    # average like three honest ones, and no honest update of the default runs is clipped.
    max_examples: int = 1_000_000
    norm_bound: float = 3.0
    # Label-preserving input augmentation for every training path that reads it (warm
    # start, server-only KD, the centralised ceiling, torch nodes): "" (off) or items
    # shift:<samples>, noise:<std>, scale:<fraction> (see edgekd.learn.augment).
    augment: str = ""


@dataclass(frozen=True)
class KDConfig:
    temperature: float = 4.0
    alpha: float = 0.8  # CE weight: device labels beat a teacher that is off-domain there
    class_weighting: bool = True  # inverse-frequency weights, bounded and normalised
    max_class_weight: float = 5.0
    reference_batch: int = 32  # B0 in T(B) = T0 * (B0 / B)^(1/4)
    soft_targets: str = "on-device"  # on-device | proxy
    proxy_size: int = 1000  # public samples shipped with teacher probabilities in proxy mode
    hint_weight: float = 0.0  # FitNets hint loss weight (0 = off); on-device torch only
    server_distill_epochs: int = 1  # FedDF-style KD on the public split after each round
    server_distill_lr: float = 1e-3  # Adam; a gentle step that keeps what clients learned
    # all: distil every sample; correct: only where the teacher's top-1 is the label
    # (torch paths; edgekd.learn.kd.class_balanced_kd_loss)
    trust: str = "all"


@dataclass(frozen=True)
class CompressionConfig:
    """What the server does to the student, and when (see `edgekd.learn.compression`)."""

    prune: str = ""  # "" | magnitude:<sparsity> | movement:<sparsity> | filter:<ratio>
    quantize: str = ""  # "" | int8 | ternary: QAT from end-round on; both send INT8 values
    lowrank: str = ""  # "" | energy:<0..1> | rank:<r>: SVD-factorize before round 1
    start_round: int = 1  # first round trained with pruned weights; 0: prune in warm start
    end_round: int = 5  # the cubic schedule reaches the final sparsity here; QAT from here
    upload: str = "fp32"  # fp32 | int8-delta | int4-delta, each with -ef (error feedback)
    download: str = "state"  # state | delta: INT8 code changes against what a node holds
    entropy: str = "none"  # none | zlib: deflate every payload, both ways
    teacher: str = "fp32"  # fp32 | int8: the ONNX teacher shipped to on-device nodes


@dataclass(frozen=True)
class ContinualConfig:
    """A continual run (`edgekd.server.continual`): tasks arrive one after another."""

    scenario: str = ""  # "" (off) | class-incremental | domain-incremental (mnist1d streams)
    tasks: int = 5  # class-incremental: 10 classes in 5 tasks of 2, split-MNIST style
    # Rounds a task; it and the weights below: chosen on held-out seeds (docs/continual.md).
    rounds_per_task: int = 15
    method: str = "teacher-kd"  # one of CONTINUAL_METHODS, or all (compare them)
    samples_per_task: int = 2000  # generated per task for the clients, as many for the server
    weight: float = 1.0  # KD-term weight of teacher-kd and lwf (0 = naive)
    lwf_proxy_weight: float = 0.5  # lwf-proxy's (at 1 its last task was 0.899)
    temperature: float = 2.0  # tau of the teacher-kd and lwf soft targets
    ewc_weight: float = 0.3  # EWC's lambda (3 and 10 held the last task below 0.9)
    proxy_size: int = 1000  # public samples shipped once per node with teacher probabilities
    buffer_size: int = 200  # replay: reservoir samples each node keeps on its own disk
    # Every method's CE scores only the classes seen so far (Avalanche's masking): off,
    # the future classes' head rows learn to score low and their arrival kills the ReLUs.
    mask_unseen: bool = True
    # Balanced-softmax local CE, CE(z + log pi_local, y) (FedLC), in kd.class-weighting's place:
    # under label skew a node holding mostly one class of a task drives the other's logit down.
    logit_adjust: bool = True
    lr_decay: str = "none"  # or "cosine": the nodes' lr falls over each task's rounds (LR_DECAYS)


@dataclass(frozen=True)
class SimConfig:
    """Where `edgekd simulate` runs its simulated nodes (Flower's Ray engine)."""

    # "" = $RAY_ADDRESS if set, else a private local Ray instance; host:port or "auto"
    # attaches to a running cluster (`ray start --head`) instead
    ray_address: str = ""
    client_cpus: float = 1.0  # Ray CPUs per simulated node: the cluster runs CPUs/this at once
    client_gpus: float = 0.0  # Ray GPUs per simulated node (0.5: two nodes share a GPU)


@dataclass(frozen=True)
class ClientConfig:
    """How simulated nodes train (`edgekd.client.graph_trainer`)."""

    # torch | onnxruntime | litert | mixed:<share>: onnxruntime and litert train through
    # the exported step graphs a bundle ships (the fleet as deployed); mixed:0.5 puts the
    # first half of the nodes on onnxruntime and the rest on torch
    backend: str = "torch"


@dataclass(frozen=True)
class EdgeKDConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    seed: int = 42
    out_dir: str = ""  # empty: runs/<timestamp>
    baseline: bool = False  # also train FedAvg-without-teacher and server-only students
    resume: bool = False  # continue the run in out-dir from its last checkpoint
    # Simulation fault drill (edgekd.client.faults): "scale:1e6=0.1,nan=0.05" gives 10 %
    # of the nodes x1e6 updates and 5 % NaN ones from round 1; "" for none.
    faults: str = ""

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> EdgeKDConfig:
        """Build a config from Flower-style flat keys (``kd.temperature = 3.0``)."""
        return cls().with_overrides(run_config)

    def with_overrides(self, values: Mapping[str, Any]) -> EdgeKDConfig:
        """Return a copy with flat dotted keys replaced; strings are parsed by type."""
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        defaults = flat_defaults()
        for key, raw in _flatten(values).items():
            if key not in defaults:
                raise ConfigError(
                    f"unknown config key '{key}' (known keys: {', '.join(sorted(defaults))})"
                )
            value = _coerce(key, raw, defaults[key])
            section, _, name = key.rpartition(".")
            attr = name.replace("-", "_")
            if section:
                sections.setdefault(section, {})[attr] = value
            else:
                top[attr] = value
        updated = {name: replace(getattr(self, name), **vals) for name, vals in sections.items()}
        config = replace(self, **updated, **top)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field that is out of range."""
        for key, value in self.to_flat().items():
            # inf passes every "> 0" check below and then skips every round
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        d, m, t, k = self.data, self.model, self.train, self.kd
        if d.dataset not in KNOWN_DATASETS:
            raise ConfigError(
                f"data.dataset: unknown dataset '{d.dataset}' (choose {', '.join(KNOWN_DATASETS)})"
            )
        parse_partition(d.partition)
        _check(0.0 < d.public_fraction < 1.0, "data.public-fraction must be in (0, 1)")
        _check(0.0 < d.test_fraction < 1.0, "data.test-fraction must be in (0, 1)")
        _check(
            d.public_fraction + d.test_fraction < 1.0,
            "data.public-fraction + data.test-fraction must be < 1",
        )
        _check(0.0 <= d.val_fraction < 0.5, "data.val-fraction must be in [0, 0.5)")
        _check(d.num_samples >= 100, "data.num-samples must be >= 100")
        _check(m.teacher_width >= 1 and m.student_width >= 1, "model widths must be >= 1")
        _check(m.teacher_epochs >= 0, "model.teacher-epochs must be >= 0")
        _check(t.num_rounds >= 1, "train.num-rounds must be >= 1")
        _check(t.local_epochs >= 1, "train.local-epochs must be >= 1")
        _check(t.lr > 0, "train.lr must be > 0")
        _check(t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {OPTIMIZERS}")
        _check(t.batch_size >= 1, "train.batch-size must be >= 1")
        _check(t.warm_start_lr >= 0, "train.warm-start-lr must be >= 0 (0: model.teacher-lr)")
        _check(t.clip_norm >= 0, "train.clip-norm must be >= 0 (0 disables clipping)")
        _check(0.0 < t.fraction_train <= 1.0, "train.fraction-train must be in (0, 1]")
        _check(0.0 <= t.fraction_evaluate <= 1.0, "train.fraction-evaluate must be in [0, 1]")
        _check(t.max_evaluate_nodes >= 0, "train.max-evaluate-nodes must be >= 0 (0: no cap)")
        _check(t.min_nodes >= 1, "train.min-nodes must be >= 1")
        _check(t.round_timeout > 0, "train.round-timeout must be > 0")
        _check(0.0 <= t.min_fraction <= 1.0, "train.min-fraction must be in [0, 1]")
        _check(not self.resume or bool(self.out_dir), "resume needs out-dir: the run to continue")
        parse_aggregation(t.aggregation)
        _check(t.server_lr > 0, "train.server-lr must be > 0")
        _check(0.0 <= t.server_momentum < 1.0, "train.server-momentum must be in [0, 1)")
        _check(
            (t.server_lr == 1.0 and t.server_momentum == 0.0) or t.aggregation == "fedavg",
            "train.server-lr / train.server-momentum need train.aggregation = fedavg",
        )
        parse_fault_plan(self.faults)
        _check(t.max_examples >= 1, "train.max-examples must be >= 1")
        _check(t.norm_bound >= 0, "train.norm-bound must be >= 0 (0 disables the bound)")
        parse_augment(t.augment)
        _check(self.kd.trust in KD_TRUST, f"kd.trust must be one of {KD_TRUST}")
        _check(k.temperature > 0, "kd.temperature must be > 0")
        _check(0.0 <= k.alpha <= 1.0, "kd.alpha must be in [0, 1]")
        _check(k.max_class_weight >= 1.0, "kd.max-class-weight must be >= 1")
        _check(k.reference_batch >= 1, "kd.reference-batch must be >= 1")
        _check(
            k.soft_targets in SOFT_TARGET_MODES,
            f"kd.soft-targets must be one of {SOFT_TARGET_MODES}, got '{k.soft_targets}'",
        )
        _check(k.proxy_size >= 1, "kd.proxy-size must be >= 1")
        _check(k.hint_weight >= 0, "kd.hint-weight must be >= 0")
        _check(k.server_distill_epochs >= 0, "kd.server-distill-epochs must be >= 0")
        _check(k.server_distill_lr > 0, "kd.server-distill-lr must be > 0")
        c = self.compression
        parse_prune(c.prune)
        parse_lowrank(c.lowrank)
        _check(
            c.quantize in QUANTIZE_MODES,
            f"compression.quantize must be one of {QUANTIZE_MODES}, got '{c.quantize}'",
        )
        _check(
            c.upload in UPLOAD_MODES,
            f"compression.upload must be one of {UPLOAD_MODES}, got '{c.upload}'",
        )
        _check(
            c.download in DOWNLOAD_MODES,
            f"compression.download must be one of {DOWNLOAD_MODES}, got '{c.download}'",
        )
        _check(
            c.download == "state" or c.quantize != "",
            "compression.download = delta sends INT8 code changes: it needs "
            "compression.quantize (int8 or ternary)",
        )
        _check(
            c.entropy in ENTROPY_CODERS,
            f"compression.entropy must be one of {ENTROPY_CODERS}, got '{c.entropy}'",
        )
        _check(
            c.teacher in TEACHER_FORMATS,
            f"compression.teacher must be one of {TEACHER_FORMATS}, got '{c.teacher}'",
        )
        _check(c.start_round >= 0, "compression.start-round must be >= 0")
        _check(
            c.start_round >= 1 or parse_prune(c.prune)[0] in ("magnitude", "movement"),
            "compression.start-round = 0 prunes during the server's warm start: it needs "
            "compression.prune = magnitude:<s> or movement:<s>",
        )
        _check(c.end_round >= c.start_round, "compression.end-round must be >= start-round")
        self._validate_continual()
        self._validate_nodes()

    def _validate_nodes(self) -> None:
        """How simulated nodes run: sim.*, fleet.*, client.backend."""
        _check(self.sim.client_cpus > 0, "sim.client-cpus must be > 0")
        _check(self.sim.client_gpus >= 0, "sim.client-gpus must be >= 0")
        check_fleet(self.to_flat())
        kind, _ = parse_client_backend(self.client.backend)
        if kind == "torch":
            return
        _check(
            self.compression.quantize == "",
            f"client.backend = {self.client.backend}: the step graphs train FP32 weights; "
            "compression.quantize (QAT) needs client.backend = torch",
        )
        _check(
            self.kd.hint_weight == 0,
            f"client.backend = {self.client.backend}: kd.hint-weight needs the torch teacher "
            "on the node (client.backend = torch)",
        )
        _check(
            not self.continual.scenario,
            f"client.backend = {self.client.backend}: continual runs train on torch nodes",
        )

    def _validate_continual(self) -> None:
        cl = self.continual
        _check(
            cl.scenario in ("", *CONTINUAL_SCENARIOS),
            f"continual.scenario must be '' (off) or one of {CONTINUAL_SCENARIOS}, "
            f"got '{cl.scenario}'",
        )
        _check(
            not cl.scenario or self.data.dataset == "mnist1d",
            f"continual.scenario: the task streams are mnist1d only, not '{self.data.dataset}'",
        )
        _check(cl.tasks >= 1, "continual.tasks must be >= 1")
        _check(
            cl.scenario != "class-incremental" or cl.tasks <= 10,
            "continual.tasks must be <= 10 for class-incremental (mnist1d has 10 classes)",
        )
        _check(cl.rounds_per_task >= 1, "continual.rounds-per-task must be >= 1")
        _check(cl.lr_decay in LR_DECAYS, f"continual.lr-decay must be one of {LR_DECAYS}")
        _check(
            cl.method in (*CONTINUAL_METHODS, "all"),
            f"continual.method must be one of {(*CONTINUAL_METHODS, 'all')}, got '{cl.method}'",
        )
        _check(cl.samples_per_task >= 50, "continual.samples-per-task must be >= 50")
        _check(cl.weight >= 0, "continual.weight must be >= 0")
        _check(cl.lwf_proxy_weight >= 0, "continual.lwf-proxy-weight must be >= 0")
        _check(cl.temperature > 0, "continual.temperature must be > 0")
        _check(cl.ewc_weight >= 0, "continual.ewc-weight must be >= 0")
        _check(cl.proxy_size >= 1, "continual.proxy-size must be >= 1")
        _check(cl.buffer_size >= 1, "continual.buffer-size must be >= 1")

    def to_flat(self) -> dict[str, Any]:
        """The config as flat dotted keys, the form Flower's run_config uses."""
        return {key: _get(self, key) for key in flat_defaults()}


def flat_defaults() -> dict[str, Any]:
    """Every known flat key with its default value."""
    out: dict[str, Any] = {}
    root = EdgeKDConfig()
    for f in fields(root):
        value = getattr(root, f.name)
        if dataclasses.is_dataclass(value):
            for sub in fields(value):
                out[f"{f.name}.{sub.name.replace('_', '-')}"] = getattr(value, sub.name)
        else:
            out[f.name.replace("_", "-")] = value
    return out


def parse_partition(spec: str) -> tuple[str, float]:
    """Parse ``iid``, ``dirichlet:<alpha>`` or ``pathological:<classes-per-client>``."""
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return "iid", 0.0
    if kind in ("dirichlet", "pathological") and arg:
        try:
            value = float(arg)
        except ValueError:
            value = float("nan")
        if kind == "dirichlet" and value > 0:
            return kind, value
        if kind == "pathological" and value >= 1 and value == int(value):
            return kind, value
        need = "alpha > 0" if kind == "dirichlet" else "an integer >= 1"
        raise ConfigError(f"data.partition: '{spec}' needs {need}")
    raise ConfigError(
        f"data.partition: unknown partition '{spec}' "
        "(use iid, dirichlet:<alpha> or pathological:<classes-per-client>)"
    )


CLIENT_BACKENDS = ("torch", "onnxruntime", "litert")


def parse_client_backend(spec: str) -> tuple[str, float]:
    """``torch``, ``onnxruntime``, ``litert`` -> ``(kind, 0.0)``; ``mixed:<share>`` ->
    ``("mixed", share)``, the share of nodes on onnxruntime (the rest on torch)."""
    kind, _, arg = spec.partition(":")
    if kind in CLIENT_BACKENDS and not arg:
        return kind, 0.0
    if kind == "mixed" and 0.0 <= _number(arg) <= 1.0:
        return kind, _number(arg)
    raise ConfigError(
        f"client.backend: cannot read '{spec}' (use torch, onnxruntime, litert or "
        "mixed:<share of onnxruntime nodes in [0, 1]>)"
    )


def node_backend(spec: str, partition_id: int, num_partitions: int) -> str:
    """The backend simulated node ``partition_id`` trains with under ``client.backend =
    spec``: with ``mixed:<s>`` the first ``round(s * N)`` nodes run onnxruntime."""
    kind, share = parse_client_backend(spec)
    if kind != "mixed":
        return kind
    return "onnxruntime" if partition_id < round(share * num_partitions) else "torch"


AUGMENT_KINDS = ("shift", "noise", "scale")
KD_TRUST = ("all", "correct")


def parse_augment(spec: str) -> dict[str, float]:
    """``"shift:4,noise:0.1,scale:0.1"`` -> ``{"shift": 4.0, "noise": 0.1, "scale": 0.1}``;
    ``""`` -> ``{}`` (off). ``shift`` is a whole number of samples (pixels for images),
    ``noise`` a standard deviation, ``scale`` the half-width of the gain interval (< 1)."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, arg = item.partition(":")
        value = _number(arg)
        ok = kind in AUGMENT_KINDS and kind not in out and math.isfinite(value) and value >= 0
        if ok and kind == "shift":
            ok = value == int(value)
        if ok and kind == "scale":
            ok = value < 1
        if not ok:
            raise ConfigError(
                f"train.augment: cannot read '{item}' (use shift:<whole samples>, "
                "noise:<std>, scale:<fraction below 1>, each once, comma-separated)"
            )
        out[kind] = value
    return out


def parse_aggregation(spec: str) -> tuple[str, float]:
    """``fedavg``, ``median`` (coordinate-wise, Yin et al. 2018) or ``trimmed-mean:<beta>``
    (drop the beta share of largest and of smallest values per coordinate, beta < 0.5)."""
    kind, _, arg = spec.partition(":")
    if kind in ("fedavg", "median") and not arg:
        return kind, 0.0
    if kind == "trimmed-mean" and 0.0 < _number(arg) < 0.5:
        return kind, _number(arg)
    raise ConfigError(
        f"train.aggregation: cannot read '{spec}' (use fedavg, median or trimmed-mean:<beta>, "
        "beta in (0, 0.5): beta 0 trims nothing)"
    )


def parse_fault(spec: str) -> tuple[str, float]:
    """``"scale:<k>"`` -> ("scale", k); ``"examples:<n>"`` -> ("examples", n);
    ``"delay:<s>"`` -> ("delay", s); ``"nan"`` -> ("nan", 0); ``""`` -> ("", 0)."""
    kind, _, value = spec.partition(":")
    if kind in ("scale", "examples", "delay"):
        try:
            return kind, float(value)
        except ValueError:
            raise ConfigError(f"fault '{spec}' needs a number: {kind}:1e6") from None
    if kind in ("", "nan") and not value:
        return kind, 0.0
    raise ConfigError(f"unknown fault '{spec}' (use scale:<k>, examples:<n>, delay:<s> or nan)")


def parse_fault_plan(spec: str) -> list[tuple[str, float]]:
    """``"scale:1e6=0.1,nan=0.05"`` -> ``[("scale:1e6", 0.1), ("nan", 0.05)]``: each fault
    (as `parse_fault` reads it) with the share of nodes that get it; shares sum to <= 1."""
    plan = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        fault, eq, share = item.rpartition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not eq or not 0.0 < value <= 1.0:
            raise ConfigError(f"faults: '{item}' is not FAULT=SHARE with a share in (0, 1]")
        parse_fault(fault)
        plan.append((fault, value))
    if sum(share for _, share in plan) > 1.0 + 1e-9:
        raise ConfigError(f"faults: the shares of '{spec}' add up to more than 1")
    return plan


def parse_prune(spec: str) -> tuple[str, float]:
    """``""`` (off), ``magnitude:<s>``/``movement:<s>`` (final sparsity s in (0, 1)) or
    ``filter:<r>`` (fraction r in (0, 1) of every conv's filters removed)."""
    if not spec:
        return "", 0.0
    kind, _, arg = spec.partition(":")
    value = _number(arg)
    if kind in PRUNE_METHODS and 0.0 < value < 1.0:
        return kind, value
    raise ConfigError(
        f"compression.prune: cannot read '{spec}' "
        f"(use magnitude:<s>, movement:<s> or filter:<r> with a number in (0, 1))"
    )


def parse_lowrank(spec: str) -> tuple[str, float]:
    """``""`` (off), ``energy:<e>`` (retained spectral energy in (0, 1]) or ``rank:<r>``."""
    if not spec:
        return "", 0.0
    kind, _, arg = spec.partition(":")
    value = _number(arg)
    if kind == "energy" and 0.0 < value <= 1.0:
        return kind, value
    if kind == "rank" and value >= 1 and value == int(value):
        return kind, value
    raise ConfigError(
        f"compression.lowrank: cannot read '{spec}' (use energy:<0..1> or rank:<integer>)"
    )


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _get(config: EdgeKDConfig, key: str) -> Any:
    section, _, name = key.rpartition(".")
    obj: Any = getattr(config, section) if section else config
    return getattr(obj, name.replace("-", "_"))


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}".replace("_", "-")
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix=f"{full}."))
        else:
            out[full] = value
    return out


def _coerce(key: str, raw: Any, default: Any) -> Any:
    """Convert ``raw`` to the type of ``default``; strings from ``--set`` are parsed."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(raw, int) and raw in (0, 1):
                return bool(raw)
            raise ValueError
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and raw != int(raw)):
                raise ValueError
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': cannot read {raw!r} as {kind.__name__}") from None
