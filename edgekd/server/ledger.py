"""Per-round accounting of a strategy: bytes each way, and what was dropped and why."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import MetricRecord


@dataclass
class RoundLedger:
    """Per-round accounting: real payload bytes each way and what was dropped."""

    bytes_down: int = 0
    bytes_up: int = 0
    messages: int = 0  # training instructions sent
    eval_messages: int = 0  # evaluation instructions sent (they carry the student too)
    replies: int = 0
    missing: int = 0  # training instructions that got no reply before the timeout
    failures: int = 0
    rejected: int = 0
    clipped: int = 0  # accepted updates whose norm was scaled down to the round's bound
    eval_rejected: int = 0  # evaluation replies that failed validation
    empty: int = 0  # valid training replies with 0 examples (an empty share): not averaged
    eval_empty: int = 0  # the same for evaluation replies
    skipped: int = 0  # 1 when the round kept the old student (too few updates, or it failed)
    # accepted updates by the runtime that trained them (the nodes' updates-<backend>)
    updates_torch: int = 0
    updates_onnxruntime: int = 0
    updates_litert: int = 0
    reasons: list[str] = field(default_factory=list)

    def counters(self) -> dict[str, int]:
        """The numbers of a round record (``rounds.jsonl``), without the reasons."""
        return {k: v for k, v in vars(self).items() if k != "reasons"}


def metric_value(record: MetricRecord | None, key: str) -> float | None:
    """A numeric metric from an aggregated MetricRecord, or None."""
    value = record.get(key) if record is not None else None
    return float(value) if isinstance(value, (int, float)) else None
