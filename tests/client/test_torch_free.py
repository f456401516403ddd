"""The client's Flower glue, the ONNX teacher cache and the payload code import on a
device without torch (a Raspberry Pi or a phone runs onnxruntime or LiteRT only)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "edgekd.client.app",
        "edgekd.client.teacher_cache",
        "edgekd.wire.payload",
        "edgekd.wire.codec",
        "edgekd.client.codec_mod",
        "edgekd.core.metrics",
        "edgekd.fidelity.scores",
        "edgekd.core.data",
        "edgekd.core.specs",
        "edgekd.core.round_settings",
        "edgekd.core.class_weights",
        "edgekd.deploy.runtimes",
        "edgekd.deploy.step_layout",
        "edgekd.deploy.step_runtime",
        "edgekd.deploy.signing",
        "edgekd.deploy.host",
        "edgekd.client.edge_client",
        "edgekd.client.graph_trainer",
        "edgekd.client.faults",
        "edgekd.deploy.bundle",
        "edgekd.deploy.profiles",
        "edgekd.cli.main",  # `edgekd client start` and `edgekd deploy check` run on devices
    ],
)
def test_imports_without_torch(module: str) -> None:
    code = f"import sys; sys.modules['torch'] = None; import {module}"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
