"""The distillation strategy: Flower's FedAvg plus what edgekd changes.

It overrides only two hooks and calls ``super()`` for the rest (FedProx pattern):

* ``configure_train`` attaches the soft-target source — the ONNX teacher to nodes
  that have not yet confirmed they hold it, or the proxy set — and counts the bytes
  each message carries;
* ``aggregate_train`` rejects replies that fail validation (NaN/Inf, wrong names,
  shapes or dtypes) with a logged reason, lets FedAvg average the rest, applies an
  optional server-side step (FedDF-style distillation), and counts upload bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from edgekd.common import records as R
from edgekd.payload import PayloadError, check_update, record_nbytes

log = logging.getLogger("edgekd")

PostAggregate = Callable[[int, ArrayRecord], ArrayRecord]


@dataclass
class RoundLedger:
    """Per-round accounting: real payload bytes each way and what was dropped."""

    bytes_down: int = 0
    bytes_up: int = 0
    replies: int = 0
    failures: int = 0
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)


class EdgeKDStrategy(FedAvg):
    """FedAvg that ships soft-target sources and validates and accounts every update."""

    def __init__(
        self,
        *,
        reference_state: Mapping[str, np.ndarray],
        teacher_record: ArrayRecord | None = None,
        proxy_record: ArrayRecord | None = None,
        post_aggregate: PostAggregate | None = None,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.reference_state = dict(reference_state)
        self.teacher_record = teacher_record
        self.proxy_record = proxy_record
        self.post_aggregate = post_aggregate
        self.ledger: dict[int, RoundLedger] = {}
        self._nodes_with_teacher: set[int] = set()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        ledger = self.ledger.setdefault(server_round, RoundLedger())
        out = []
        for msg in messages:
            extra: dict[str, ArrayRecord] = {}
            node = msg.metadata.dst_node_id
            if self.teacher_record is not None and node not in self._nodes_with_teacher:
                extra[R.TEACHER] = self.teacher_record
            if self.proxy_record is not None:
                extra[R.PROXY] = self.proxy_record
            if extra:
                content = RecordDict({**dict(msg.content.items()), **extra})
                msg = Message(
                    content=content, dst_node_id=node, message_type=msg.metadata.message_type
                )
            ledger.bytes_down += sum(record_nbytes(r) for r in msg.content.array_records.values())
            out.append(msg)
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ledger = self.ledger.setdefault(server_round, RoundLedger())
        accepted: list[Message] = []
        for msg in replies:
            ledger.replies += 1
            node = msg.metadata.src_node_id
            if msg.has_error():
                ledger.failures += 1
                ledger.reasons.append(f"node {node}: {msg.error.reason}")
                continue
            record = msg.content.array_records.get(self.arrayrecord_key)
            try:
                if record is None:
                    raise PayloadError("reply carries no model arrays")
                ledger.bytes_up += record_nbytes(record)
                check_update(record, self.reference_state)
                if self.weighted_by_key not in msg.content.metric_records.get(
                    R.METRICS, MetricRecord()
                ):
                    raise PayloadError(f"metrics lack '{self.weighted_by_key}'")
            except PayloadError as exc:
                ledger.rejected += 1
                ledger.reasons.append(f"node {node}: {exc}")
                log.warning("round %d: rejected update from node %d: %s", server_round, node, exc)
                continue
            self._nodes_with_teacher.add(node)
            accepted.append(msg)
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None and self.post_aggregate is not None:
            arrays = self.post_aggregate(server_round, arrays)
        if metrics is not None:
            metrics["rejected"] = ledger.rejected
            metrics["failures"] = ledger.failures
        return arrays, metrics
