"""Run configuration: frozen dataclasses parsed once from Flower's flat ``run_config``.

Flower flattens ``[tool.flwr.app.config]`` tables into dotted keys (``kd.temperature``);
`EdgeKDConfig.from_run_config` turns such a mapping into typed objects and rejects
unknown keys and bad values with a one-line `ConfigError` naming the key. The
defaults below are the single source of truth; ``pyproject.toml`` repeats them for
``flwr run .`` and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

KNOWN_DATASETS = ("mnist1d", "digits", "mnist", "fashion-mnist", "cifar10")
SOFT_TARGET_MODES = ("on-device", "proxy")
OPTIMIZERS = ("adam", "sgd")


class ConfigError(ValueError):
    """A configuration value is unknown, malformed or out of range."""


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
    min_nodes: int = 2
    warm_start_epochs: int = 60  # server-side KD on the public split before round 1
    round_timeout: float = 600.0  # never wait without bound for a reply


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


@dataclass(frozen=True)
class EdgeKDConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    seed: int = 42
    out_dir: str = ""  # empty: runs/<timestamp>
    baseline: bool = False  # also train FedAvg-without-teacher and server-only students

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
        _check(t.clip_norm >= 0, "train.clip-norm must be >= 0 (0 disables clipping)")
        _check(0.0 < t.fraction_train <= 1.0, "train.fraction-train must be in (0, 1]")
        _check(0.0 <= t.fraction_evaluate <= 1.0, "train.fraction-evaluate must be in [0, 1]")
        _check(t.min_nodes >= 1, "train.min-nodes must be >= 1")
        _check(t.round_timeout > 0, "train.round-timeout must be > 0")
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
