"""The distillation strategy: Flower's FedAvg plus what edgekd changes.

It overrides only the hooks it changes and calls ``super()`` inside them (FedProx
pattern):

* ``configure_train`` attaches the soft-target source — the ONNX teacher to nodes
  that have not yet confirmed they hold it, or the proxy set — and counts the bytes
  each message carries;
* both ``configure_*`` hooks wait a bounded time for nodes (Flower's sampler waits
  forever) and go on with the nodes that came;
* ``aggregate_train`` rejects replies that fail validation (`edgekd.server.replies`:
  the record layout, finite metrics, ``num-examples`` in bounds; then NaN/Inf, wrong
  names, shapes or dtypes, a payload that does not decode) with a logged reason,
  bounds each update's norm and weight against the round's median, puts the rest in a
  content order (so the float32 sum does not depend on which node answered first),
  lets FedAvg (or a robust Flower strategy passed as ``aggregator``: FedMedian,
  FedTrimmedAvg) average the rest when at least ``min_fraction`` of the asked nodes
  sent a valid update, applies an optional server-side step (FedDF-style
  distillation), and counts upload bytes. Whatever the averaging or that step raises,
  or a non-finite result, skips the round with the global student kept — never the run;
* ``aggregate_evaluate`` validates evaluation replies the same way;
* ``start`` is Flower's round loop with two additions a restartable server needs: it
  can begin at a later round (``first_round``, after a resume) and it hands every
  finished round to ``on_round_end`` (the checkpoint).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedTrimmedAvg, Result

from edgekd.core import records as R
from edgekd.server.ledger import RoundLedger
from edgekd.server.node_wire import Masks, NodeWire, RoundWire, WireFormat
from edgekd.server.replies import (
    BACKEND_METRIC_KEYS,
    EVALUATE_METRIC_KEYS,
    TRAIN_METRIC_KEYS,
    EmptyReply,
    bounded_weights,
    check_reply_layout,
    checked_metrics,
    clip_update_norms,
)
from edgekd.wire.payload import (
    PayloadError,
    check_update,
    record_nbytes,
    record_to_state,
    state_to_record,
)

log = logging.getLogger("edgekd")

# (round, global arrays) -> (arrays to train from, pruning masks): the compression step
PrepareRound = Callable[[int, ArrayRecord], tuple[ArrayRecord, dict[str, np.ndarray]]]
# (round, aggregated arrays, the round's masks) -> arrays: e.g. FedDF distillation
PostAggregate = Callable[[int, ArrayRecord, Masks], ArrayRecord]
# (finished round, global arrays after it, the run's results so far): e.g. a checkpoint
RoundEnd = Callable[[int, ArrayRecord, Result], None]


def _reply_digest(msg: Message) -> str:
    """A content hash of a decoded reply: its arrays (names and bytes) and metrics."""
    digest = hashlib.sha256()
    for record in msg.content.array_records.values():
        for key, arr in record.items():
            digest.update(key.encode())
            digest.update(bytes(arr.data))
    for metrics in msg.content.metric_records.values():
        digest.update(repr(sorted(metrics.items())).encode())
    return digest.hexdigest()


def _require_finite(arrays: ArrayRecord, what: str) -> None:
    for name, arr in arrays.items():
        value = arr.numpy()
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            raise FloatingPointError(f"{what} holds NaN or Inf in '{name}'")


class TrimmedMean(FedTrimmedAvg):
    """Flower's FedTrimmedAvg that trims at least one update at each end once three or
    more arrive: with ``⌊β·n⌋ = 0`` (β = 0.2 and four updates) it would trim nothing and
    average a poisoned update in. Coordinate-wise trimmed mean: Yin et al., ICML 2018."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        configured, n = self.beta, len(replies)
        if n >= 3 and int(configured * n) == 0:
            self.beta = 1.0 / n + 1e-9  # int(beta * n) == 1, and 1/n < 0.5
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.beta = configured


class EdgeKDStrategy(FedAvg):
    """FedAvg that ships soft-target sources and validates and accounts every update."""

    def __init__(
        self,
        *,
        reference_state: Mapping[str, np.ndarray],
        teacher_record: ArrayRecord | None = None,
        proxy_record: ArrayRecord | None = None,
        post_aggregate: PostAggregate | None = None,
        prepare_round: PrepareRound | None = None,
        wire: WireFormat | None = None,
        aggregator: FedAvg | None = None,
        node_wait: float = 600.0,
        min_fraction: float = 0.0,
        max_evaluate_nodes: int = 0,
        max_examples: int = 1_000_000,
        norm_bound: float = 0.0,
        train_metric_keys: frozenset[str] = TRAIN_METRIC_KEYS,
        evaluate_metric_keys: frozenset[str] = EVALUATE_METRIC_KEYS,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.node_wait = node_wait
        self.min_fraction = min_fraction
        self.max_evaluate_nodes = max_evaluate_nodes
        # Reply validation (edgekd.server.replies): the metrics each kind of reply
        # carries, the largest num-examples believed, and the update-norm bound
        # (a multiple of the round's median change; 0 = off).
        self.max_examples = max_examples
        self.norm_bound = norm_bound
        self.train_metric_keys = train_metric_keys
        self.evaluate_metric_keys = evaluate_metric_keys
        self.reference_state = dict(reference_state)
        self.teacher_record = teacher_record
        self.proxy_record = proxy_record
        self.post_aggregate = post_aggregate
        self.prepare_round = prepare_round
        self.wire = wire or WireFormat()
        # The averaging itself, after validation and decoding: FedAvg's weighted mean
        # (None), or a robust Flower strategy such as FedMedian or FedTrimmedAvg.
        self.aggregator = aggregator
        self.ledger: dict[int, RoundLedger] = {}
        # What was sent each round and what each node holds (the per-node caches).
        self.node_wire = NodeWire(
            self.wire,
            teacher_record=teacher_record,
            proxy_record=proxy_record,
            arrayrecord_key=self.arrayrecord_key,
            configrecord_key=self.configrecord_key,
        )

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

    @contextmanager
    def _evaluate_cap(self, grid: Grid) -> Iterator[None]:
        """Sample at most ``max_evaluate_nodes`` nodes for federated evaluation: in a fleet
        of 10 000, ``fraction_evaluate`` 0.25 would ask 2 500 nodes a round, each to
        score a handful of local samples (0 = no cap)."""
        configured = self.fraction_evaluate
        count = len(list(grid.get_node_ids()))
        if self.max_evaluate_nodes and count * configured > self.max_evaluate_nodes:
            # int(count * fraction) is what Flower samples; +0.5 keeps float error out
            self.fraction_evaluate = (self.max_evaluate_nodes + 0.5) / count
        try:
            yield
        finally:
            self.fraction_evaluate = configured

    def start(  # two keyword-only additions
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        on_round_end: RoundEnd | None = None,
    ) -> Result:
        """Flower's loop (`Strategy.start`: train, federated evaluation, central
        evaluation) over rounds ``first_round..num_rounds``; round 0's central
        evaluation only when starting from round 1. ``on_round_end`` sees each
        finished round; an exception there ends the run (a checkpoint that cannot be
        written must not be silently skipped)."""
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        if evaluate_fn is not None and first_round == 1:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        arrays = result.arrays = initial_arrays
        for rnd in range(first_round, num_rounds + 1):
            log.info("round %d/%d", rnd, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(rnd, arrays, train_config, grid), timeout=timeout
            )
            agg_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if agg_arrays is not None:
                arrays = result.arrays = agg_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(rnd, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            eval_metrics = self.aggregate_evaluate(rnd, replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
            if evaluate_fn is not None:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
            if on_round_end is not None:
                on_round_end(rnd, arrays, result)
        return result

    def masks_for_round(self, server_round: int) -> dict[str, np.ndarray]:
        """The pruning masks the nodes trained under in ``server_round`` (empty: none)."""
        return self.node_wire.masks_for_round(server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        wire = self.node_wire.round_wire(server_round)
        masks = wire.masks if wire is not None else {}
        state = record_to_state(arrays)
        config = self.node_wire.config_with_keys(config, server_round, state, masks)
        with self._available_nodes(grid), self._evaluate_cap(grid):
            messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        ledger = self.ledger.setdefault(server_round, RoundLedger())
        ledger.eval_messages += len(messages)
        return self.node_wire.encode(messages, state, masks, ledger, attach_sources=False)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        masks: dict[str, np.ndarray] = {}
        if self.prepare_round is not None:
            arrays, masks = self.prepare_round(server_round, arrays)
        state = record_to_state(arrays)
        self.node_wire.open_round(server_round, state, masks)
        config = self.node_wire.config_with_keys(config, server_round, state, masks)
        with self._available_nodes(grid):
            messages = list(super().configure_train(server_round, arrays, config, grid))
        ledger = self.ledger.setdefault(server_round, RoundLedger())
        ledger.messages += len(messages)
        return self.node_wire.encode(messages, state, masks, ledger, attach_sources=True)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        wire = self.node_wire.round_wire(server_round)
        ledger = self.ledger.setdefault(server_round, RoundLedger())
        self.node_wire.settle(replies)
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.node_wire.failed(node)
                continue
            self.node_wire.replied(node, wire, trained=False)
            try:
                check_reply_layout(msg, None)
                metrics = checked_metrics(
                    msg.content.metric_records[R.METRICS],
                    self.evaluate_metric_keys,
                    self.max_examples,
                )
            except EmptyReply:
                ledger.eval_empty += 1
                continue
            except PayloadError as exc:
                ledger.eval_rejected += 1
                ledger.reasons.append(f"node {node} (evaluate): {exc}")
                log.warning(
                    "round %d: rejected evaluation from node %d: %s", server_round, node, exc
                )
                continue
            msg.content = RecordDict({R.METRICS: metrics})
            valid.append(msg)
        if not valid:
            return None
        try:
            return super().aggregate_evaluate(server_round, valid)
        except Exception as exc:  # noqa: BLE001 - federated metrics never end a run
            ledger.reasons.append(f"evaluation aggregate: {exc}")
            log.warning("round %d: evaluation metrics not aggregated: %s", server_round, exc)
            return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ledger = self.ledger.setdefault(server_round, RoundLedger())
        wire = self.node_wire.round_wire(server_round) or RoundWire(
            dict(self.reference_state), {}, ""
        )
        accepted: list[tuple[Message, dict[str, np.ndarray], MetricRecord]] = []
        replies = list(replies)
        self.node_wire.settle(replies)
        for msg in replies:
            ledger.replies += 1
            node = msg.metadata.src_node_id
            if msg.has_error():
                ledger.failures += 1
                ledger.reasons.append(f"node {node}: {msg.error.reason}")
                self.node_wire.failed(node)
                continue
            try:
                state, reported = self._checked_update(msg, wire, ledger)
            except EmptyReply:
                ledger.empty += 1
                self.node_wire.replied(node, wire, trained=True)
                continue
            except Exception as exc:  # noqa: BLE001 - any reply that breaks a check is one rejected reply
                reason = (
                    str(exc) if isinstance(exc, PayloadError) else f"{type(exc).__name__}: {exc}"
                )
                ledger.rejected += 1
                ledger.reasons.append(f"node {node}: {reason}")
                log.warning(
                    "round %d: rejected update from node %d: %s", server_round, node, reason
                )
                continue
            self.node_wire.replied(node, wire, trained=True)
            accepted.append((msg, state, reported))
        ledger.missing = max(ledger.messages - ledger.replies, 0)
        needed = max(math.ceil(self.min_fraction * ledger.messages), 1)
        if len(accepted) < needed:
            ledger.skipped = 1
            log.warning(
                "round %d: %d valid updates of %d asked (%d needed: train.min-fraction %.2f); "
                "the global student stays as it was",
                server_round,
                len(accepted),
                ledger.messages,
                needed,
                self.min_fraction,
            )
            return None, None
        messages = self._bounded(accepted, wire, ledger)
        # Flower sums the weighted updates in float32 in list order, and replies come
        # in whatever order the nodes finished: sorting by content makes the average
        # (and so a whole simulation) bit-reproducible.
        messages.sort(key=_reply_digest)
        if isinstance(self.aggregator, FedAvgM):
            # Its pseudo-gradient is taken against the global student of this round (the
            # FP32 master), not the one it last returned: the server step after averaging
            # and the pruner change the student in between.
            base = wire.master if wire.master is not None else wire.sent
            self.aggregator.current_arrays = state_to_record(base)
        aggregate = (
            self.aggregator.aggregate_train
            if self.aggregator is not None
            else super().aggregate_train
        )
        try:
            arrays, metrics = aggregate(server_round, messages)
            if arrays is None:
                raise ValueError("the aggregator returned no model")
            _require_finite(arrays, "the average")
            averaged = record_to_state(arrays)
            if self.post_aggregate is not None:
                arrays = self.post_aggregate(server_round, arrays, wire.masks)
                _require_finite(arrays, "the server's step after averaging")
        except Exception as exc:  # noqa: BLE001 - a failed aggregation costs a round, not the run
            ledger.skipped = 1
            ledger.reasons.append(f"aggregation: {type(exc).__name__}: {exc}")
            log.warning(
                "round %d: aggregation failed (%s: %s); the global student stays as it was",
                server_round,
                type(exc).__name__,
                exc,
            )
            return None, None
        self.reference_state = averaged
        if metrics is not None:
            metrics["rejected"] = ledger.rejected
            metrics["failures"] = ledger.failures
        return arrays, metrics

    def _checked_update(
        self, msg: Message, wire: RoundWire, ledger: RoundLedger
    ) -> tuple[dict[str, np.ndarray], MetricRecord]:
        """A training reply's decoded student and metrics; raises on anything invalid."""
        record = msg.content.array_records.get(self.arrayrecord_key)
        if record is None:
            raise PayloadError("reply carries no model arrays")
        ledger.bytes_up += record_nbytes(record)
        check_reply_layout(msg, self.arrayrecord_key)
        metrics = checked_metrics(
            msg.content.metric_records[R.METRICS],
            self.train_metric_keys,
            self.max_examples,
            optional_keys=BACKEND_METRIC_KEYS,
        )
        decoded = self.node_wire.decode_reply(record, wire)
        check_update(decoded, wire.sent)
        # Counted, then dropped: Flower averages every metric key, and not every node
        # reports one (continual nodes, older clients).
        for backend, key in R.BACKEND_METRICS.items():
            if key in metrics:
                del metrics[key]
                setattr(ledger, f"updates_{backend}", getattr(ledger, f"updates_{backend}") + 1)
        return dict(record_to_state(decoded)), metrics

    def _bounded(
        self,
        accepted: list[tuple[Message, dict[str, np.ndarray], MetricRecord]],
        wire: RoundWire,
        ledger: RoundLedger,
    ) -> list[Message]:
        """The accepted replies as the aggregator sees them: each update's change
        clipped to ``norm_bound`` times the round's median, each weight to
        `~edgekd.server.replies.WEIGHT_CAP` times the median, and nothing else in them."""
        base = wire.master if wire.master is not None else wire.sent
        states, scales = clip_update_norms((s for _, s, _ in accepted), base, self.norm_bound)
        ledger.clipped = sum(scale < 1.0 for scale in scales)
        weights = bounded_weights([int(cast(int, m[R.NUM_EXAMPLES])) for _, _, m in accepted])
        out = []
        for (msg, _, metrics), state, weight in zip(accepted, states, weights, strict=True):
            bounded = MetricRecord({**dict(metrics.items()), R.NUM_EXAMPLES: weight})
            msg.content = RecordDict(
                {self.arrayrecord_key: state_to_record(state), R.METRICS: bounded}
            )
            out.append(msg)
        return out
