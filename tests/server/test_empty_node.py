"""A node whose share of the pool is empty, on the real ClientApp against a fake Grid: it
replies with 0 examples on every path (teacher on the device or a proxy set, torch or a
step graph), and the server counts it as empty, not as a failure, round after round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fakegrid import FakeGrid, node_contexts  # tests/server/fakegrid.py
from flwr.app import Message, RecordDict

from edgekd.client.app import make_client_app
from edgekd.core import data
from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig
from edgekd.server.pipeline import run_edgekd

NODES = [31, 32]


@pytest.mark.parametrize(
    ("soft_targets", "backend"),
    [
        ("on-device", "torch"),
        ("proxy", "torch"),
        ("on-device", "onnxruntime"),
        ("proxy", "onnxruntime"),
    ],
)
def test_a_node_with_an_empty_share_replies_empty_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, soft_targets: str, backend: str
) -> None:
    # Prepare: node 32 (partition 1) holds nothing, handed out read-only as the cache does.
    real = data.partition_of

    def partition_of(labels: np.ndarray, spec: str, n: int, seed: int, pid: int) -> np.ndarray:
        share = real(labels, spec, n, seed, pid)
        return share[:0] if pid == 1 else share

    monkeypatch.setattr(data, "partition_of", partition_of)
    cfg = EdgeKDConfig().with_overrides(
        {
            "data.num-samples": 800,
            "data.partition": "iid",
            "model.teacher-width": 8,
            "model.student-width": 4,
            "model.teacher-epochs": 1,
            "train.warm-start-epochs": 1,
            "train.num-rounds": 2,
            "train.local-epochs": 1,
            "train.fraction-evaluate": 1.0,
            "kd.soft-targets": soft_targets,
            "kd.proxy-size": 100,
            "client.backend": backend,
            "out-dir": str(tmp_path / "run"),
        }
    )
    app = make_client_app(cfg)
    contexts = node_contexts(NODES, R.PARTITION_ID, R.NUM_PARTITIONS)

    def reply(node: int, msg: Message) -> RecordDict | None:
        return app(msg, contexts[node]).content

    # Execute
    run_edgekd(FakeGrid(NODES, reply), cfg)

    # Assert
    lines = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    rounds = [json.loads(line) for line in lines][1:]
    assert [(r["replies"], r["empty"], r["failures"], r["rejected"]) for r in rounds] == [
        (2, 1, 0, 0),
        (2, 1, 0, 0),
    ]
    assert all(r["eval_empty"] == 1 for r in rounds)
