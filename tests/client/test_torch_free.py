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
        "edgekd.payload",
        "edgekd.codec",
        "edgekd.client.codec_mod",
        "edgekd.common.metrics",
        "edgekd.common.fidelity",
        "edgekd.common.data",
        "edgekd.common.specs",
        "edgekd.common.round_settings",
        "edgekd.common.class_weights",
        "edgekd.deploy.runtimes",
        "edgekd.deploy.signing",
        "edgekd.deploy.host",
        "edgekd.client.edge_client",
        "edgekd.client.faults",
        "edgekd.deploy.bundle",
        "edgekd.deploy.profiles",
        "edgekd.cli",  # `edgekd client start` and `edgekd deploy check` run on devices
    ],
)
def test_imports_without_torch(module: str) -> None:
    code = f"import sys; sys.modules['torch'] = None; import {module}"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
