"""The continual-learning handlers of the edgekd ClientApp (`edgekd.client.app` calls them
when ``continual.scenario`` is set): each round, one local pass on the node's share of the
current task, with the anti-forgetting method's state kept on the node.

The server (`edgekd.server.continual`) says which task a round belongs to (``continual.task``)
and which method to use; everything the method carries between rounds and tasks (LwF's
snapshot, EWC's Fisher and anchor, the replay buffer, the teacher's proxy set) lives in this
node's ``context.state``, never on the server. A node calls ``after_task`` lazily: at its
first round of a later task, on the global student it just received (the model at the end of
the tasks it missed) and on its own data of each task that ended, then ``before_task`` for
the new one, so the hooks bracket the task as `edgekd.continual.learner.run_sequential` does.
A node without state for the run (its first round comes in a later task, it lost its state,
or the server resumed a run on fresh nodes) gets the global student at every task start so
far (``R.HISTORY``) and rebuilds its state from them and its own data of the past tasks, as
if it had trained every round (`_rebuild`); without it, it starts from the current task.

Thin glue: the math is in `edgekd.continual` (regularizers, ``train_task``); the payload
codec runs as a mod, so the handler sees plain arrays.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from edgekd.continual.scenario import client_stream, proxy_digest
from edgekd.continual.streams import TaskStream, task_client_split
from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig
from edgekd.core.errors import EdgeKDError
from edgekd.core.round_settings import RoundSettings, config_scalar, round_seed
from edgekd.core.specs import spec_for
from edgekd.wire.payload import record_to_state, state_to_record

if TYPE_CHECKING:
    from edgekd.continual.regularizers import ContinualRegularizer

# context.state entries (this node only)
STATE = "continual.state"  # ArrayRecord: the regularizer's state_dict()
META = "continual.meta"  # ConfigRecord: run tag and the task the state belongs to
PROXY_STATE = "continual.proxy"  # ArrayRecord: the teacher's proxy set, as shipped once
PROXY_META = "continual.proxy-meta"  # ConfigRecord: its hash


class ContinualStateError(EdgeKDError, RuntimeError):
    """The node lacks something the server assumes it holds (e.g. the proxy set)."""


def handle_continual_train(cfg: EdgeKDConfig, msg: Message, context: Context) -> Message:
    """One round of local continual training; see the module docstring."""
    import torch

    from edgekd.continual.learner import train_task
    from edgekd.learn.models import model_state

    torch.set_num_threads(1)  # one simulated client per core
    config = msg.content.config_records[R.CONFIG]
    pid = int(config_scalar(context.node_config, R.PARTITION_ID))
    num = int(config_scalar(context.node_config, R.NUM_PARTITIONS))
    seed = int(config_scalar(config, R.SEED))
    task_id = int(config_scalar(config, R.CL_TASK))
    run = str(config_scalar(config, R.CL_RUN))
    stream = client_stream(cfg)
    if not 0 <= task_id < len(stream):
        raise ValueError(f"{R.CL_TASK} {task_id} outside the stream's {len(stream)} tasks")
    settings = RoundSettings.from_round(config, context.node_config)  # as every node reads it
    node_seed = round_seed(seed, 0, pid)  # per node, for the regularizer's own draws

    model = _load_student(cfg, stream, record_to_state(msg.content.array_records[R.ARRAYS]))
    regularizer = _make_regularizer(config, _proxy(msg, context, config), node_seed, settings.seed)
    history = msg.content.array_records.get(R.HISTORY)
    share = _Share(stream, cfg.data.partition, pid, num, seed)
    if not _advance(regularizer, model, context, run, task_id, share) and history is not None:
        _rebuild(regularizer, cfg, share, record_to_state(history), task_id)

    local = share.of(task_id)
    logit_adjust = bool(config.get(R.CL_LOGIT_ADJUST, True))
    out = train_task(
        model,
        local.x,
        local.y,
        regularizer,
        epochs=settings.local_epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        seed=settings.seed,
        class_weighting=settings.class_weighting and not logit_adjust,
        max_class_weight=settings.max_class_weight,
        clip_norm=settings.clip_norm,
        active_classes=(
            stream.classes_up_to(task_id) if bool(config.get(R.CL_MASK_UNSEEN, True)) else None
        ),
        adjust_classes=stream[task_id].classes if logit_adjust else None,
    )
    save_state(context, regularizer, run, task_id)
    new_state = model_state(model)
    reply = RecordDict(
        {
            R.ARRAYS: state_to_record(new_state),
            R.METRICS: MetricRecord(
                {
                    R.TRAIN_LOSS: float(out["loss"]),
                    R.PENALTY: float(out["penalty"]),
                    R.NUM_EXAMPLES: len(local),
                }
            ),
        }
    )
    return Message(content=reply, reply_to=msg)


def handle_warm_up(cfg: EdgeKDConfig, msg: Message, context: Context) -> Message:
    """The server's warm-up query: load what every round needs (torch, flwr-datasets'
    partitioners, the stream and this node's share of the first task) and take one
    throw-away optimizer step (torch imports more on the first one), so that the first
    method's clock does not include any of it."""
    from edgekd.continual.learner import train_task
    from edgekd.continual.regularizers import NaiveFineTuning
    from edgekd.learn.models import build_model

    stream = client_stream(cfg)
    pid = int(config_scalar(context.node_config, R.PARTITION_ID))
    num = int(config_scalar(context.node_config, R.NUM_PARTITIONS))
    task_client_split(stream[0], cfg.data.partition, pid, num, cfg.seed)
    model = build_model(spec_for(stream.input_shape, stream.num_classes, cfg.model.student_width))
    x, y = stream[0].x_train[:2], stream[0].y_train[:2]
    train_task(model, x, y, NaiveFineTuning(), epochs=1, lr=1e-3, batch_size=2, seed=0)
    return Message(content=RecordDict(), reply_to=msg)


@dataclass(frozen=True)
class _Share:
    """Which share of every task this node holds."""

    stream: TaskStream
    partition: str
    pid: int
    num: int
    seed: int

    def of(self, task: int) -> Any:
        return task_client_split(self.stream[task], self.partition, self.pid, self.num, self.seed)


def _advance(
    regularizer: ContinualRegularizer,
    model: Any,
    context: Context,
    run: str,
    task_id: int,
    share: _Share,
) -> bool:
    """Restore the node's state for ``run`` and bring it to ``task_id``: ``after_task`` for
    every task that ended since the node last trained, ``before_task`` for a new task.
    False when the node holds no state for ``run`` (it then only ran ``before_task``)."""
    meta = context.state.config_records.get(META)
    held = int(config_scalar(meta, "task")) if meta is not None and meta.get("run") == run else None
    if held is not None and held > task_id:
        held = None  # the server went back in the stream: a new run under the same tag
    if held is None:  # this node's first round of the run, or a state of another run
        regularizer.before_task(model, share.stream[task_id])
        return False
    regularizer.load_state_dict(record_to_state(context.state.array_records[STATE]))
    for past in range(held, task_id):
        data = share.of(past)
        regularizer.after_task(model, share.stream[past], data.x, data.y)
    if task_id > held:
        regularizer.before_task(model, share.stream[task_id])
    return True


def _rebuild(
    regularizer: ContinualRegularizer,
    cfg: EdgeKDConfig,
    share: _Share,
    history: Mapping[str, np.ndarray],
    task_id: int,
) -> None:
    """Rebuild a fresh regularizer's state at ``task_id`` from the global student at each task
    start (``history["<task>/<name>"]``): the hook calls a node that trained every round made,
    on the models it received then. Bit-identical to that node's state for every method
    (the hooks read only the model, the node's data and its seed)."""
    starts = [
        _load_student(cfg, share.stream, _prefixed(history, f"{t}/")) for t in range(task_id + 1)
    ]
    regularizer.before_task(starts[0], share.stream[0])
    for past in range(task_id):
        data = share.of(past)
        regularizer.after_task(starts[past + 1], share.stream[past], data.x, data.y)
        regularizer.before_task(starts[past + 1], share.stream[past + 1])


def _prefixed(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ContinualStateError(f"the history sent has no task start {prefix.rstrip('/')}")
    return out


def save_state(context: Context, regularizer: ContinualRegularizer, run: str, task_id: int) -> None:
    """Keep the regularizer's numpy state and the task it belongs to in ``context.state``."""
    # Not state_to_record: np.ascontiguousarray would turn 0-d scalars (a count) into 1-d.
    context.state[STATE] = ArrayRecord(
        OrderedDict((k, Array(np.array(v))) for k, v in regularizer.state_dict().items())
    )
    context.state[META] = ConfigRecord({"run": run, "task": task_id})


def held_state(context: Context) -> dict[str, np.ndarray]:
    """The regularizer state this node holds (empty before its first round)."""
    record = context.state.array_records.get(STATE)
    return dict(record_to_state(record)) if record is not None else {}


def _make_regularizer(
    config: ConfigRecord,
    proxy: tuple[np.ndarray, np.ndarray] | None,
    node_seed: int,
    round_seed: int,
) -> ContinualRegularizer:
    from edgekd.continual.regularizers import make_regularizer

    method = str(config_scalar(config, R.CL_METHOD))
    kwargs: dict[str, Any] = {}
    if method == "teacher-kd":
        proxy = _needs(proxy, method)
        kwargs = {
            "weight": float(config_scalar(config, R.CL_WEIGHT)),
            "temperature": float(config_scalar(config, R.CL_TEMPERATURE)),
            "proxy_x": proxy[0],
            "proxy_probs": proxy[1],
            "seed": round_seed,  # the proxy batches of this round
        }
    elif method in ("lwf", "lwf-proxy"):
        weight = R.CL_WEIGHT if method == "lwf" else R.CL_LWF_PROXY_WEIGHT
        kwargs = {
            "weight": float(config_scalar(config, weight)),
            "temperature": float(config_scalar(config, R.CL_TEMPERATURE)),
        }
        if method == "lwf-proxy":  # the proxy inputs only, not the teacher's probabilities
            kwargs.update(proxy_x=_needs(proxy, method)[0], seed=round_seed)
    elif method == "replay-proxy":
        x, probs = _needs(proxy, method)
        kwargs = {"proxy_x": x, "proxy_probs": probs}
    elif method == "ewc":
        kwargs = {"weight": float(config_scalar(config, R.CL_EWC_WEIGHT))}
    elif method == "replay":
        # The reservoir's seed is not in its state: it must be the same in every round.
        kwargs = {"buffer_size": int(config_scalar(config, R.CL_BUFFER_SIZE)), "seed": node_seed}
    return make_regularizer(method, **kwargs)


def _needs(
    proxy: tuple[np.ndarray, np.ndarray] | None, method: str
) -> tuple[np.ndarray, np.ndarray]:
    if proxy is None:
        raise ContinualStateError(f"{method} needs the teacher's proxy set; none was sent")
    return proxy


def _proxy(
    msg: Message, context: Context, config: ConfigRecord
) -> tuple[np.ndarray, np.ndarray] | None:
    """The proxy set from this message (cached on the node) or from the node's cache."""
    expected = str(config.get(R.CL_PROXY_HASH, ""))
    if not expected:
        return None
    attached = msg.content.array_records.get(R.PROXY)
    if attached is not None:
        x, probs = attached[R.PROXY_X].numpy(), attached[R.PROXY_PROBS].numpy()
        if proxy_digest(x, probs) != expected:
            raise ContinualStateError(f"the proxy set does not match its hash {expected}")
        context.state[PROXY_STATE] = attached
        context.state[PROXY_META] = ConfigRecord({"hash": expected})
        return x, probs
    held = context.state.config_records.get(PROXY_META, ConfigRecord()).get("hash")
    if held != expected or PROXY_STATE not in context.state.array_records:
        raise ContinualStateError(f"this node does not hold the proxy set {expected}")
    cached = context.state.array_records[PROXY_STATE]
    return cached[R.PROXY_X].numpy(), cached[R.PROXY_PROBS].numpy()


def _load_student(cfg: EdgeKDConfig, stream: TaskStream, state: Mapping[str, np.ndarray]) -> Any:
    import torch

    from edgekd.learn.models import build_model

    model = build_model(spec_for(stream.input_shape, stream.num_classes, cfg.model.student_width))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model
