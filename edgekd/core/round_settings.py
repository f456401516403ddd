"""One round's settings, as every kind of node reads them.

The server writes the round's ConfigRecord with `round_config` (or
`continual_round_config`); torch nodes (`edgekd.client.app`), torch-free edge nodes
(`edgekd.client.edge_client`) and the continual handler all decode it with
`RoundSettings.from_round`, so writer and reader sit side by side here and a setting
cannot mean one thing on one kind of node and another elsewhere. Pure Python: a
Raspberry Pi without torch imports it.

What depends on the node rather than the server:

* the batch size: the node's own ``batch-size`` (a device whose memory forces a smaller
  batch), else a runtime's static batch (LiteRT), else the server's ``batch-size``;
* the distillation temperature, coupled to that batch, ``T(B) = T0·(B0/B)^(1/4)``
  (`temperature_for_batch`); soft targets are softened on the node at this τ, which is
  why the proxy set travels as teacher *logits*, not probabilities;
* the seed: different per node (its partition id) and per round, the same for a rerun.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig

__all__ = [
    "RoundSettings",
    "config_scalar",
    "continual_round_config",
    "round_config",
    "round_seed",
    "temperature_for_batch",
]

Scalar = int | float | str | bool


def _shared_keys(cfg: EdgeKDConfig) -> dict[str, Scalar]:
    """The keys of every round, federated KD and continual alike."""
    t, k = cfg.train, cfg.kd
    return {
        R.LOCAL_EPOCHS: t.local_epochs,
        R.LR: t.lr,
        R.BATCH_SIZE: t.batch_size,
        R.CLIP_NORM: t.clip_norm,
        R.SEED: cfg.seed,
        R.CLASS_WEIGHTING: k.class_weighting,
        R.MAX_CLASS_WEIGHT: k.max_class_weight,
    }


def round_config(cfg: EdgeKDConfig, mode: str, teacher_hash: str) -> dict[str, Scalar]:
    """A federated round's settings (Flower's FedAvg adds ``server-round``): ``mode`` is
    ``"kd"`` or ``"ce"``, ``teacher_hash`` the sha256 of the teacher's ONNX (on-device
    nodes cache it)."""
    k = cfg.kd
    return {
        R.MODE: mode,
        **_shared_keys(cfg),
        R.OPTIMIZER: cfg.train.optimizer,
        R.TEMPERATURE: k.temperature,
        R.ALPHA: k.alpha,
        R.REFERENCE_BATCH: k.reference_batch,
        R.SOFT_TARGETS: k.soft_targets,
        R.TEACHER_HASH: teacher_hash,
        R.AUGMENT: cfg.train.augment,
        R.TRUST: k.trust,
    }


def continual_round_config(cfg: EdgeKDConfig) -> dict[str, Scalar]:
    """A continual round's settings besides the task (which the strategy adds): the
    regularizers carry their own temperature."""
    cl = cfg.continual
    return {
        **_shared_keys(cfg),
        R.CL_WEIGHT: cl.weight,
        R.CL_LWF_PROXY_WEIGHT: cl.lwf_proxy_weight,
        R.CL_TEMPERATURE: cl.temperature,
        R.CL_EWC_WEIGHT: cl.ewc_weight,
        R.CL_BUFFER_SIZE: cl.buffer_size,
        R.CL_MASK_UNSEEN: cl.mask_unseen,
        R.CL_LOGIT_ADJUST: cl.logit_adjust,
    }


def temperature_for_batch(t0: float, b0: int, batch_size: int) -> float:
    """Distillation temperature scaled with batch size: ``T(B) = T0 * (B0 / B) ** (1/4)``.

    ``T0`` is the temperature tuned at reference batch size ``B0``; smaller on-device batches
    get a proportionally softer target, growing only with the fourth root of ``B0 / B`` so a
    16x smaller batch doubles the temperature.

    Args:
        t0: Reference temperature ``T0 > 0``.
        b0: Reference batch size ``B0 > 0``.
        batch_size: Actual batch size ``B > 0``.

    Returns:
        The temperature for ``batch_size``.
    """
    if t0 <= 0 or b0 <= 0 or batch_size <= 0:
        raise ValueError(
            f"t0, b0 and batch_size must be positive, got t0={t0}, b0={b0}, batch_size={batch_size}"
        )
    return float(t0 * (b0 / batch_size) ** 0.25)


def round_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """Different per node and per round, reproducible for the same run."""
    return run_seed * 100_003 + server_round * 1009 + partition_id


def config_scalar(record: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A scalar from a Flower record; a list or bytes value is a malformed config."""
    value = record.get(key, default)
    if value is None or isinstance(value, (list, bytes)):
        raise ValueError(f"config key '{key}' is missing or not a scalar")
    return value


@dataclass(frozen=True)
class RoundSettings:
    """What the server asked for this round, as this node applies it."""

    mode: str  # "kd" or "ce"
    local_epochs: int
    lr: float
    optimizer: str
    batch_size: int
    clip_norm: float
    temperature: float
    alpha: float
    class_weighting: bool
    max_class_weight: float
    reference_batch: int
    seed: int
    augment: str = ""  # train.augment (torch nodes)
    trust: str = "all"  # kd.trust (torch nodes)
    device: str = "cpu"  # a Jetson node trains on "cuda" (its bundle's profile)
    fp16: bool = False  # with float16 autocast there

    def effective_temperature(self) -> float:
        """T(B) = T0·(B0/B)^(1/4): a device forced to a smaller batch gets a softer τ."""
        return temperature_for_batch(self.temperature, self.reference_batch, self.batch_size)

    @classmethod
    def from_round(
        cls,
        config: Mapping[str, Any],
        node_config: Mapping[str, Any],
        *,
        runtime_batch: int | None = None,
        **placement: Any,
    ) -> RoundSettings:
        """Decode the round's ConfigRecord for the node with ``node_config``.

        ``runtime_batch``: the static batch of the node's runtime (LiteRT graphs), used
        when the node config sets none; ``placement``: ``device``/``fp16`` for torch.

        Raises:
            ValueError: a key is missing or not a scalar.
        """
        default_batch = runtime_batch or config_scalar(config, R.BATCH_SIZE)
        batch = int(config_scalar(node_config, R.NODE_BATCH_SIZE, default_batch))
        pid = int(node_config.get(R.PARTITION_ID, 0))
        return cls(
            mode=str(config.get(R.MODE, "kd")),
            local_epochs=int(config_scalar(config, R.LOCAL_EPOCHS)),
            lr=float(config_scalar(config, R.LR)),
            optimizer=str(config.get(R.OPTIMIZER, "adam")),
            batch_size=batch,
            clip_norm=float(config.get(R.CLIP_NORM, 0.0)),
            # absent in continual rounds, whose regularizers carry their own
            temperature=float(config_scalar(config, R.TEMPERATURE, 1.0)),
            alpha=float(config_scalar(config, R.ALPHA, 1.0)),
            class_weighting=bool(config_scalar(config, R.CLASS_WEIGHTING)),
            max_class_weight=float(config_scalar(config, R.MAX_CLASS_WEIGHT)),
            reference_batch=int(config.get(R.REFERENCE_BATCH, batch)),
            augment=str(config_scalar(config, R.AUGMENT, "")),
            trust=str(config_scalar(config, R.TRUST, "all")),
            seed=round_seed(
                int(config_scalar(config, R.SEED)), int(config_scalar(config, R.ROUND)), pid
            ),
            **placement,
        )
