"""What a valid reply looks like, and how far one node may pull the average.

Every reply is checked on its own before anything aggregates it, so that one node's
malformed or hostile reply is one rejected reply and never the round or the run
(Flower's aggregators raise ``InconsistentMessageReplies`` on replies that differ, and
divide by the sum of ``num-examples``):

* `check_reply_layout`: exactly the records edgekd's nodes send — one ArrayRecord under
  the strategy's key (training) or none (evaluation), one MetricRecord ``metrics`` with
  exactly the expected keys, no ConfigRecord;
* `checked_metrics`: every metric a finite number (not a bool or a list),
  ``num-examples`` an integer in ``[1, max_examples]``, ``accuracy`` in [0, 1]; a reply
  that is valid but reports 0 examples (a node whose share is empty, common when a
  fleet of thousands splits a small pool) raises `EmptyReply`: counted, never averaged,
  not logged as an attack;
* `bounded_weights`: ``num-examples`` as an averaging weight is capped at
  `WEIGHT_CAP` times the round's median, so a node that inflates its count within the
  bound still cannot take the average over;
* `clip_update_norms`: each update's change ``Δ_i = w_i − w`` is scaled to at most
  ``c · median_j ‖Δ_j‖`` (norm bounding, Sun et al. 2019, "Can you really backdoor
  federated learning?"; relative to the round's median as in Karimireddy et al. 2021's
  centered clipping), so a ×10⁶ update moves the average no more than three honest
  ones would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import numpy as np
from flwr.app import Message, MetricRecord

from edgekd.core import records as R
from edgekd.wire.payload import PayloadError

__all__ = [
    "EVALUATE_METRIC_KEYS",
    "EmptyReply",
    "TRAIN_METRIC_KEYS",
    "BACKEND_METRIC_KEYS",
    "WEIGHT_CAP",
    "bounded_weights",
    "check_reply_layout",
    "checked_metrics",
    "clip_update_norms",
]

# What edgekd's nodes report (client/app.py, edge_client.py; continual adds its penalty).
TRAIN_METRIC_KEYS = frozenset({R.TRAIN_LOSS, "temperature", R.NUM_EXAMPLES})
EVALUATE_METRIC_KEYS = frozenset({R.ACCURACY, R.LOSS, R.NUM_EXAMPLES})
# An averaging weight is at most this many times the round's median num-examples:
# Dirichlet(0.1) partitions of the default run stay within 5x, a liar gets 10x at most.
WEIGHT_CAP = 10.0


class EmptyReply(PayloadError):
    """A well-formed reply from a node with no examples: nothing to average."""


def check_reply_layout(msg: Message, array_key: str | None) -> None:
    """Raise `PayloadError` unless ``msg`` holds exactly one MetricRecord ``metrics``,
    one ArrayRecord ``array_key`` (none when ``array_key`` is None) and nothing else."""
    content = msg.content
    arrays = sorted(content.array_records)
    expected = [array_key] if array_key is not None else []
    if arrays != expected:
        raise PayloadError(f"array records {arrays}, expected {expected}")
    if sorted(content.metric_records) != [R.METRICS]:
        raise PayloadError(f"metric records {sorted(content.metric_records)}, expected ['metrics']")
    if content.config_records:
        raise PayloadError(f"unexpected config records {sorted(content.config_records)}")


#: Optional training metrics: the one backend that trained the update (value 1).
BACKEND_METRIC_KEYS = frozenset(R.BACKEND_METRICS.values())


def checked_metrics(
    record: MetricRecord,
    expected_keys: frozenset[str],
    max_examples: int,
    optional_keys: frozenset[str] = frozenset(),
) -> MetricRecord:
    """``record`` with ``num-examples`` as an int, or `PayloadError` naming the first
    problem: missing or unexpected keys, a value that is not one finite number,
    ``num-examples`` outside ``[1, max_examples]`` or not whole, accuracy outside [0, 1];
    `EmptyReply` for ``num-examples`` 0."""
    keys = set(record.keys())
    optional = keys & optional_keys
    if keys - optional != expected_keys or len(optional) > 1:
        missing = sorted(expected_keys - keys)
        extra = sorted(keys - expected_keys - optional) or sorted(optional)[1:]
        raise PayloadError(f"metric keys differ (missing {missing}, unexpected {extra})")
    for key in optional:
        if record[key] != 1:
            raise PayloadError(f"metric '{key}' is {record[key]!r}, not 1")
    out: dict[str, int | float | list[int] | list[float]] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"metric '{key}' is {type(value).__name__}, not a number")
        if not math.isfinite(value):
            raise PayloadError(f"metric '{key}' is {value}")
        out[key] = value
    examples = cast(float, out[R.NUM_EXAMPLES])
    if examples == 0:
        raise EmptyReply("num-examples 0: the node holds no data for this")
    if examples != int(examples) or not 1 <= examples <= max_examples:
        raise PayloadError(
            f"num-examples {examples} is not a whole number in [1, {max_examples}] "
            "(train.max-examples)"
        )
    out[R.NUM_EXAMPLES] = int(examples)
    accuracy = cast(float, out.get(R.ACCURACY, 0.0))
    if not 0.0 <= accuracy <= 1.0:
        raise PayloadError(f"accuracy {accuracy} is outside [0, 1]")
    return MetricRecord(out)


def bounded_weights(examples: Sequence[int], cap: float = WEIGHT_CAP) -> list[int]:
    """Each count capped at ``cap`` times the median count (at least 1)."""
    if not examples:
        return []
    limit = max(int(cap * float(np.median(examples))), 1)
    return [min(int(n), limit) for n in examples]


def clip_update_norms(
    updates: Iterable[Mapping[str, np.ndarray]],
    base: Mapping[str, np.ndarray],
    bound: float,
) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """Scale each update's change against ``base`` (float arrays only) to an L2 norm of at
    most ``bound`` times the median norm of all of them; ``(updates, scale factors)``.

    ``bound <= 0`` returns the updates unchanged. An all-zero median (nobody moved)
    leaves everything as it is.
    """
    states = [dict(u) for u in updates]
    if bound <= 0 or not states:
        return states, [1.0] * len(states)
    floats = [k for k, v in base.items() if np.asarray(v).dtype.kind == "f"]
    norms = [
        math.sqrt(sum(float(np.sum((s[k].astype(np.float64) - base[k]) ** 2)) for k in floats))
        for s in states
    ]
    limit = bound * float(np.median(norms))
    scales = [1.0 if n <= limit or limit == 0 else limit / n for n in norms]
    for state, scale in zip(states, scales, strict=True):
        if scale < 1.0:
            for k in floats:
                change = (state[k].astype(np.float64) - base[k]) * scale
                state[k] = (base[k] + change).astype(state[k].dtype)
    return states, scales
