"""The edgekd ClientApp (Flower Message API): thin glue around `edgekd.client.trainer`.

A node finds its data from ``node_config`` (``partition-id``, ``num-partitions``,
set by the simulation engine or ``flower-supernode --node-config``) and the run's
`EdgeKDConfig`, so the data never leaves it. Soft targets come from the cached
ONNX teacher (``on-device``; it travels xz-compressed) or from the message (``proxy``).
The payload codec runs as a mod (`edgekd.client.codec_mod`), so the handlers see
plain arrays and the round's pruning masks. A node started with a device bundle
whose backend is onnxruntime or LiteRT trains without torch, through the bundle's step
graph (`edgekd.client.edge_client`); a simulated node does the same with
``client.backend = onnxruntime | litert | mixed:<share>``
(`edgekd.client.graph_trainer`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgekd.client.codec_mod import masks_from_message, payload_codec_mod
from edgekd.client.edge_client import (
    BUNDLE,
    bundle_backend,
    edge_data,
    handle_edge_evaluate,
    handle_edge_train,
    torch_placement,
    train_reply,
)
from edgekd.client.faults import make_fault_mod
from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig, node_backend
from edgekd.core.data import ArrayDataset, client_split, load_federated_data
from edgekd.core.fleet import node_class, parse_fleet_classes
from edgekd.core.round_settings import RoundSettings, config_scalar
from edgekd.core.specs import ModelSpec, spec_for
from edgekd.deploy.bundle import load_bundle
from edgekd.deploy.profiles import load_profile
from edgekd.wire.payload import record_to_state

TORCH_FREE_BACKENDS = ("onnxruntime", "litert")  # bundle backends that train without torch


def _node_data(cfg: EdgeKDConfig, context: Context) -> tuple[ArrayDataset, ArrayDataset, ModelSpec]:
    if context.node_config.get(BUNDLE):  # a device started with `edgekd client start --bundle`
        bundle = load_bundle(Path(str(context.node_config[BUNDLE])))
        train, val = edge_data(cfg, context, bundle)
        spec = spec_for(bundle.input_shape, bundle.num_classes, cfg.model.student_width)
        return train, val, spec
    pid = int(config_scalar(context.node_config, R.PARTITION_ID))
    num = int(config_scalar(context.node_config, R.NUM_PARTITIONS))
    data = load_federated_data(cfg.data, cfg.seed)
    train, val = client_split(data, cfg.data.partition, pid, num, cfg.seed, cfg.data.val_fraction)
    spec = spec_for(data.input_shape, data.num_classes, cfg.model.student_width)
    return train, val, spec


def handle_train(cfg: EdgeKDConfig, msg: Message, context: Context) -> Message:
    from edgekd.client.teacher_cache import round_teacher_logits
    from edgekd.client.trainer import local_kd_update

    train, _, spec = _node_data(cfg, context)
    config = msg.content.config_records[R.CONFIG]
    settings = RoundSettings.from_round(config, context.node_config, **torch_placement(context))
    logits = None
    proxy = None
    if settings.mode == "kd" and str(config[R.SOFT_TARGETS]) == "on-device":
        logits = round_teacher_logits(msg.content, config, train.x)
    elif settings.mode == "kd":
        p = msg.content.array_records[R.PROXY]
        proxy = (p[R.PROXY_X].numpy(), p[R.PROXY_LOGITS].numpy())
    state = record_to_state(msg.content.array_records[R.ARRAYS])
    masks = masks_from_message(msg.content)
    backend = _simulated_backend(cfg, context)
    if backend == "torch":
        new_state, metrics = local_kd_update(
            spec, state, train, settings, teacher_logits=logits, proxy=proxy, masks=masks,
            quantizer=str(config.get(R.QAT, "")),
        )  # fmt: skip
    else:  # the fleet as deployed: the bundles' step graph in onnxruntime or LiteRT
        from edgekd.client.graph_backend import simulated_step_runtime
        from edgekd.client.graph_trainer import graph_kd_update

        runtime = simulated_step_runtime(
            backend, spec, state, settings.optimizer, settings.batch_size
        )
        new_state, metrics = graph_kd_update(
            runtime, state, train, settings, teacher_logits=logits, proxy=proxy, masks=masks
        )
    return train_reply(
        msg, new_state, metrics[R.TRAIN_LOSS], metrics["temperature"], len(train), backend
    )


def _simulated_backend(cfg: EdgeKDConfig, context: Context) -> str:
    """torch, or the runtime ``client.backend`` puts this simulated node on (a node
    started with a bundle trains as its bundle says, before this is asked)."""
    if context.node_config.get(BUNDLE) or R.PARTITION_ID not in context.node_config:
        return "torch"
    pid = int(config_scalar(context.node_config, R.PARTITION_ID))
    num = int(config_scalar(context.node_config, R.NUM_PARTITIONS))
    if cfg.fleet.classes and cfg.fleet.backends == "profile":
        return load_profile(node_class(cfg.fleet.classes, pid, num).profile).backend
    return node_backend(cfg.client.backend, pid, num)


def handle_evaluate(cfg: EdgeKDConfig, msg: Message, context: Context) -> Message:
    from edgekd.client.trainer import evaluate_state

    _, val, spec = _node_data(cfg, context)
    state = record_to_state(msg.content.array_records[R.ARRAYS])
    metrics = evaluate_state(spec, state, val)
    reply = RecordDict(
        {
            R.METRICS: MetricRecord(
                {R.ACCURACY: metrics["accuracy"], R.LOSS: metrics["loss"], R.NUM_EXAMPLES: len(val)}
            )
        }
    )
    return Message(content=reply, reply_to=msg)


def handle_fleet_query(cfg: EdgeKDConfig, msg: Message, context: Context) -> Message:
    """The server's question before round 1 of a fleet run: which device class is this
    node? A simulated node's class comes from its partition id (`node_class`); a node
    started with a bundle is the class whose profile its bundle was built for."""
    bundle = context.node_config.get(BUNDLE)
    if bundle:
        profile = load_bundle(Path(str(bundle))).profile.name
        names = [c.name for c in parse_fleet_classes(cfg.fleet.classes) if c.profile == profile]
        if not names:
            raise ValueError(f"no class of fleet.classes '{cfg.fleet.classes}' is a {profile}")
        name = names[0]
    else:
        pid = int(config_scalar(context.node_config, R.PARTITION_ID))
        num = int(config_scalar(context.node_config, R.NUM_PARTITIONS))
        name = node_class(cfg.fleet.classes, pid, num).name
    return Message(RecordDict({R.CONFIG: ConfigRecord({R.FLEET_CLASS: name})}), reply_to=msg)


def for_message(cfg: EdgeKDConfig, msg: Message) -> EdgeKDConfig:
    """``cfg`` with the student width a fleet run's message names (its class's)."""
    config = msg.content.config_records.get(R.CONFIG)
    if config is None or R.STUDENT_WIDTH not in config:
        return cfg
    width = int(config_scalar(config, R.STUDENT_WIDTH))
    if width < 1:
        raise ValueError(f"{R.STUDENT_WIDTH} must be >= 1, got {width}")
    return replace(cfg, model=replace(cfg.model, student_width=width))


def make_client_app(cfg: EdgeKDConfig | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg``; with None it reads the run's ``run_config``."""

    def config_of(context: Context) -> EdgeKDConfig:
        return cfg if cfg is not None else EdgeKDConfig.from_run_config(context.run_config)

    def fault_plan(context: Context) -> tuple[str, int]:
        run_cfg = config_of(context)
        return run_cfg.faults, run_cfg.seed

    # The codec is outermost: the fault drill (inert unless the node config or the
    # run's `faults` asks for it) sees plain arrays.
    client_app = ClientApp(mods=[payload_codec_mod, make_fault_mod(fault_plan)])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = for_message(config_of(context), msg)
        if bundle_backend(context) in TORCH_FREE_BACKENDS:  # no torch on this device
            return handle_edge_train(run_cfg, msg, context)
        if run_cfg.continual.scenario:  # the same app serves continual runs (`flwr run .`)
            from edgekd.client.continual_client import handle_continual_train

            return handle_continual_train(run_cfg, msg, context)
        return handle_train(run_cfg, msg, context)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        from edgekd.client.continual_client import handle_warm_up

        config = msg.content.config_records.get(R.CONFIG)
        if config is not None and config.get(R.FLEET_QUERY) == "class":
            return handle_fleet_query(config_of(context), msg, context)
        return handle_warm_up(config_of(context), msg, context)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run_cfg = for_message(config_of(context), msg)
        if bundle_backend(context) in TORCH_FREE_BACKENDS:
            return handle_edge_evaluate(run_cfg, msg, context)
        return handle_evaluate(run_cfg, msg, context)

    return client_app


app = make_client_app()
