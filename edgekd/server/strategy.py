"""The distillation strategy: Flower's FedAvg plus what edgekd changes.

It overrides only the hooks it changes and calls ``super()`` inside them (FedProx
pattern):

* ``configure_train`` attaches the soft-target source — the ONNX teacher to nodes
  that have not yet confirmed they hold it, or the proxy set — and counts the bytes
  each message carries;
* both ``configure_*`` hooks wait a bounded time for nodes (Flower's sampler waits
  forever) and go on with the nodes that came;
* ``aggregate_train`` rejects replies that fail validation (NaN/Inf, wrong names,
  shapes or dtypes) with a logged reason, lets FedAvg average the rest, applies an
  optional server-side step (FedDF-style distillation), and counts upload bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
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
    messages: int = 0  # training instructions sent
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
        node_wait: float = 600.0,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.node_wait = node_wait
        self.reference_state = dict(reference_state)
        self.teacher_record = teacher_record
        self.proxy_record = proxy_record
        self.post_aggregate = post_aggregate
        self.ledger: dict[int, RoundLedger] = {}
        self._nodes_with_teacher: set[int] = set()

    @contextmanager
    def _available_nodes(self, grid: Grid) -> Iterator[None]:
        """Wait at most ``node_wait`` seconds for ``min_available_nodes``; then go on
        with the nodes that are there for this round instead of waiting forever (Flower's
        sampler has no timeout). No node at all is an error."""
        deadline = time.monotonic() + self.node_wait
        while (count := len(list(grid.get_node_ids()))) < self.min_available_nodes:
            if time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        if count == 0:
            raise RuntimeError(f"no node connected within {self.node_wait:.0f} s")
        saved = (self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes)
        if count < self.min_available_nodes:
            log.warning(
                "only %d of %d nodes connected after %.0f s; this round uses them",
                count,
                self.min_available_nodes,
                self.node_wait,
            )
            self.min_available_nodes = count
            self.min_train_nodes = min(self.min_train_nodes, count)
            self.min_evaluate_nodes = min(self.min_evaluate_nodes, count)
        try:
            yield
        finally:
            self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = saved

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        with self._available_nodes(grid):
            return list(super().configure_evaluate(server_round, arrays, config, grid))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        with self._available_nodes(grid):
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
            ledger.messages += 1
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
