"""The ClientApp's handlers on a device that runs a bundle (`edgekd deploy build`).

``edgekd client start --bundle DIR`` puts ``bundle = DIR`` in the node config. The
bundle is verified (every file against its manifest's sha256) before it is used; its
``backend`` says how the node trains:

* ``onnxruntime`` (Raspberry Pi) and ``litert`` (Android): no torch. By default
  (profile ``[training] mode = "full"``) the node trains every tensor of the student
  through the bundle's step graph (`edgekd.deploy.train_step`: forward, backward and the
  optimizer in one graph) with `edgekd.client.graph_trainer`, exactly as a torch node
  would, and sends the whole student back. With ``mode = "head-only"`` (devices too
  small for the full step) the feature extractor stays frozen and the node trains the
  linear head with the head-step graph (closed-form gradient), sending every other
  tensor back as it received it;
* ``torch`` (Jetson): the full local KD update of `edgekd.client.trainer`.

Soft targets: ``on-device`` runs the ONNX teacher the server sent (onnxruntime is part
of the ``edge`` install on both backends); ``proxy`` distils on the shipped public
inputs (their teacher argmax as labels) and then fits the local labels.

Local data: ``DATA_DIR/train.npz`` (arrays ``x`` float32 of the bundle's input shape
and ``y`` int labels), where ``DATA_DIR`` is ``data_dir`` of the bundle's
``client.toml``, or, for demos and tests, a share of the embedded default data chosen
by ``partition-id`` / ``num-partitions`` in the node config.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import ArrayDataset
from edgekd.core.errors import EdgeKDError
from edgekd.core.numerics import log_softmax
from edgekd.core.round_settings import RoundSettings
from edgekd.wire.payload import record_to_state, state_to_record

log = logging.getLogger("edgekd")
HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"
BUNDLE = "bundle"  # node config key set by `edgekd client start --bundle`
VAL_FRACTION = 0.1


class EdgeDataError(EdgeKDError, ValueError):
    """The device's local data is missing or malformed."""


def bundle_backend(context: Context) -> str | None:
    """The backend of the node's bundle, or None for a plain (simulated) node."""
    bundle = context.node_config.get(BUNDLE)
    if not bundle:
        return None
    return str(_bundle(str(bundle)).profile.backend)


def torch_placement(context: Context) -> dict[str, Any]:
    """``device``/``fp16`` for the torch trainer: a Jetson bundle's CUDA + FP16 when CUDA
    is there (else the CPU, logged), the CPU for every other node."""
    bundle = context.node_config.get(BUNDLE)
    if not bundle:
        return {}
    profile = _bundle(str(bundle)).profile
    if profile.backend != "torch" or profile.device != "cuda":
        return {}
    import torch

    if not torch.cuda.is_available():
        log.warning("bundle profile %s wants CUDA, which is not available: CPU", profile.name)
        return {}
    return {"device": "cuda", "fp16": profile.precision == "fp16"}


def handle_edge_train(cfg: EdgeKDConfig, msg: Message, context: Context) -> Message:
    bundle = _bundle(str(context.node_config[BUNDLE]))
    if _trains_full(bundle):
        return _full_train(cfg, msg, context, bundle)
    runtime = _runtime(bundle)
    train, _ = edge_data(cfg, context, bundle)
    config = msg.content.config_records[R.CONFIG]
    # The same decoding as a torch node: the node's batch (its own, else the runtime's
    # static one), the temperature coupled to it, a seed of its partition and round.
    settings = RoundSettings.from_round(
        config, context.node_config, runtime_batch=runtime.batch_size
    )
    temperature = settings.effective_temperature()
    received = record_to_state(msg.content.array_records[R.ARRAYS])
    weight, bias = _head(received)
    class_weights = _class_weights(train.y, bundle.num_classes, settings)
    # The run's train.lr is the head's SGD step: 0.01 (the default) holds on the default
    # students' unnormalised features (|f| up to ~80); 0.1 diverged (loss ~20).
    common: dict[str, Any] = {
        "epochs": settings.local_epochs,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "seed": settings.seed,
    }
    if str(config[R.SOFT_TARGETS]) == "on-device":
        teacher = _teacher_logits(msg, config, train.x)
        weight, bias, metrics = _local_head_kd(
            runtime, train.x, train.y, teacher, weight, bias, temperature, settings.alpha,
            class_weights, common,
        )  # fmt: skip
    else:
        proxy = msg.content.array_records[R.PROXY]
        px, plogits = proxy[R.PROXY_X].numpy(), proxy[R.PROXY_LOGITS].numpy()
        weight, bias, _ = _local_head_kd(
            runtime, px, plogits.argmax(1), plogits, weight, bias, temperature, 0.0, None, common
        )
        weight, bias, metrics = _local_head_kd(
            runtime, train.x, train.y, np.zeros((len(train), bundle.num_classes), np.float32),
            weight, bias, temperature, 1.0, class_weights, common,
        )  # fmt: skip
    state = dict(received)
    state[HEAD_WEIGHT], state[HEAD_BIAS] = weight, bias
    return train_reply(
        msg, state, float(metrics["loss"]), temperature, len(train), bundle.profile.backend
    )


def _full_train(cfg: EdgeKDConfig, msg: Message, context: Context, bundle: Any) -> Message:
    """Every tensor of the student trained through the bundle's step graph."""
    from edgekd.client.codec_mod import masks_from_message
    from edgekd.client.graph_trainer import graph_kd_update

    runtime = _step_runtime(bundle)
    train, _ = edge_data(cfg, context, bundle)
    config = msg.content.config_records[R.CONFIG]
    settings = RoundSettings.from_round(
        config, context.node_config, runtime_batch=runtime.batch_size
    )
    state = record_to_state(msg.content.array_records[R.ARRAYS])
    teacher, proxy = None, None
    if str(config[R.SOFT_TARGETS]) == "on-device" and settings.mode == "kd":
        teacher = _teacher_logits(msg, config, train.x)
    elif settings.mode == "kd":
        record = msg.content.array_records[R.PROXY]
        proxy = (record[R.PROXY_X].numpy(), record[R.PROXY_LOGITS].numpy())
    new_state, metrics = graph_kd_update(
        runtime, state, train, settings, teacher_logits=teacher, proxy=proxy,
        masks=masks_from_message(msg.content),
    )  # fmt: skip
    return train_reply(
        msg, new_state, metrics[R.TRAIN_LOSS], metrics["temperature"], len(train),
        bundle.profile.backend,
    )  # fmt: skip


def train_reply(
    msg: Message,
    state: Mapping[str, np.ndarray],
    loss: float,
    temperature: float,
    num_examples: int,
    backend: str,
) -> Message:
    """A training reply as every kind of node sends it: the student, the loss, the
    temperature it trained at, its example count and the runtime that trained it."""
    metrics: dict[str, int | float | list[int] | list[float]] = {
        R.TRAIN_LOSS: float(loss),
        "temperature": float(temperature),
        R.NUM_EXAMPLES: int(num_examples),
        R.BACKEND_METRICS[backend]: 1,
    }
    content = RecordDict({R.ARRAYS: state_to_record(state), R.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def handle_edge_evaluate(cfg: EdgeKDConfig, msg: Message, context: Context) -> Message:
    bundle = _bundle(str(context.node_config[BUNDLE]))
    _, val = edge_data(cfg, context, bundle)
    state = record_to_state(msg.content.array_records[R.ARRAYS])
    if _trains_full(bundle):
        step = _step_runtime(bundle)
        logits = step.logits(val.x, [state[name] for name in step.layout.names])
    else:
        weight, bias = _head(state)
        logits = _runtime(bundle).logits(val.x, weight, bias)
    log_probs = log_softmax(logits)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        R.ACCURACY: float((logits.argmax(1) == val.y).mean()) if len(val) else 0.0,
        R.LOSS: float(-log_probs[np.arange(len(val)), val.y].mean()) if len(val) else 0.0,
        R.NUM_EXAMPLES: len(val),
    }
    return Message(content=RecordDict({R.METRICS: MetricRecord(metrics)}), reply_to=msg)


def edge_data(
    cfg: EdgeKDConfig, context: Context, bundle: Any
) -> tuple[ArrayDataset, ArrayDataset]:
    """The node's (train, validation) data: the bundle's data folder, or a demo share."""
    node = context.node_config
    if R.PARTITION_ID in node:
        from edgekd.core.data import client_split, load_federated_data

        data = load_federated_data(cfg.data, cfg.seed)
        return client_split(
            data,
            cfg.data.partition,
            int(node[R.PARTITION_ID]),
            int(node[R.NUM_PARTITIONS]),
            cfg.seed,
            cfg.data.val_fraction,
        )
    return read_device_data(_data_dir(bundle), bundle.input_shape, bundle.num_classes)


def read_device_data(
    folder: Path, input_shape: tuple[int, ...], num_classes: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """``folder/train.npz`` split into train and a fixed 10 % validation tail."""
    path = folder / "train.npz"
    if not path.is_file():
        raise EdgeDataError(
            f"{path}: no local data (an .npz with x [N, {', '.join(map(str, input_shape))}] "
            "and y [N]; set data_dir in the bundle's client.toml)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = np.asarray(npz["x"], np.float32), np.asarray(npz["y"]).astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise EdgeDataError(f"{path}: unreadable local data ({exc})") from exc
    if x.shape[1:] != tuple(input_shape) or len(x) != len(y) or len(y) == 0:
        raise EdgeDataError(
            f"{path}: x has shape {x.shape} and y {y.shape}; expected x [N, "
            f"{', '.join(map(str, input_shape))}] and y [N] with N > 0"
        )
    if y.min() < 0 or y.max() >= num_classes:
        raise EdgeDataError(f"{path}: labels must be in 0..{num_classes - 1}")
    cut = len(y) - max(int(len(y) * VAL_FRACTION), 1) if len(y) > 1 else len(y)
    return ArrayDataset(x[:cut], y[:cut]), ArrayDataset(x[cut:], y[cut:])


def _bundle(path: str) -> Any:
    from edgekd.deploy.bundle import load_bundle

    return load_bundle(Path(path))


def _client_toml(bundle: Any) -> dict[str, Any]:
    with (bundle.path / "client.toml").open("rb") as handle:
        return dict(tomllib.load(handle).get("client", {}))


def _data_dir(bundle: Any) -> Path:
    folder = Path(str(_client_toml(bundle).get("data_dir", "data")))
    return folder if folder.is_absolute() else bundle.path / folder


def _trains_full(bundle: Any) -> bool:
    """Whether the bundle ships the whole-student step graph (``train_step`` in its
    ``client.toml``), rather than the head-only step."""
    return "train_step" in _client_toml(bundle)


def _step_runtime(bundle: Any) -> Any:
    from edgekd.deploy.step_layout import StepLayout
    from edgekd.deploy.step_runtime import step_runtime_for

    client = _client_toml(bundle)
    layout = StepLayout.from_json(bundle.file(str(client["step_layout"])).read_text())
    infer = client.get("train_infer")
    return step_runtime_for(
        str(bundle.file(str(client["train_step"]))),
        str(bundle.file(str(infer))) if infer else None,
        layout,
        threads=int(client.get("threads", 1)),
    )


def _runtime(bundle: Any) -> Any:
    from edgekd.deploy.runtimes import runtime_for

    if bundle.profile.backend not in ("onnxruntime", "litert"):
        raise ValueError(f"{bundle.path}: backend '{bundle.profile.backend}' does not train heads")
    client = _client_toml(bundle)
    return runtime_for(
        str(bundle.file(str(client["features"]))),
        str(bundle.file(str(client["head_step"]))),
        threads=int(client.get("threads", 1)),
    )


def _head(state: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if HEAD_WEIGHT not in state or HEAD_BIAS not in state:
        raise ValueError(
            f"the student has no plain linear head ('{HEAD_WEIGHT}', '{HEAD_BIAS}'); "
            "edge nodes train only such a head (no low-rank head for them)"
        )
    return np.asarray(state[HEAD_WEIGHT], np.float32), np.asarray(state[HEAD_BIAS], np.float32)


def _class_weights(y: np.ndarray, num_classes: int, settings: RoundSettings) -> np.ndarray | None:
    from edgekd.deploy.runtimes import inverse_frequency_class_weights

    if not settings.class_weighting:
        return None
    return inverse_frequency_class_weights(y, num_classes, max_weight=settings.max_class_weight)


def _teacher_logits(msg: Message, config: Any, x: np.ndarray) -> np.ndarray:
    from edgekd.client.teacher_cache import round_teacher_logits

    return np.asarray(round_teacher_logits(msg.content, config, x), np.float32)


def _local_head_kd(
    runtime: Any,
    x: np.ndarray,
    y: np.ndarray,
    teacher: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    temperature: float,
    alpha: float,
    class_weights: np.ndarray | None,
    common: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    from edgekd.deploy.runtimes import local_head_kd

    return local_head_kd(
        runtime,
        x,
        y,
        teacher,
        weight,
        bias,
        temperature=temperature,
        alpha=alpha,
        class_weights=class_weights,
        **common,
    )
