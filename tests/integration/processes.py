"""Processes the integration tests start, and how they are all killed at the end.

Every process a test starts carries ``EDGEKD_IT_TAG=<tag>`` in its environment (children
inherit it), so teardown can find and kill all of them, also those started detached
in their own sessions (a local SuperLink, its SuperExec, Ray). Its own module, not
conftest.py: tests import it by name, and ``conftest`` is ambiguous in a full run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

# `flwr`, `edgekd` and the Flower executables they spawn (looked up on PATH) come from this venv.
BIN_DIR = Path(sys.executable).parent
TAG_VAR = "EDGEKD_IT_TAG"


def _tagged_pids(tag: str) -> list[int]:
    """Pids of processes whose environment holds ``TAG_VAR=tag`` (Linux /proc)."""
    needle = f"{TAG_VAR}={tag}".encode()
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _signal_tagged(tag: str, sig: signal.Signals) -> list[int]:
    pids = _tagged_pids(tag)
    own_group = os.getpgrp()
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except OSError:
            pass
    for pgid in groups - {own_group}:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    return pids


def kill_tagged(tag: str, grace: float = 10.0) -> None:
    """SIGTERM every tagged process (and its process group), then SIGKILL survivors."""
    if not _signal_tagged(tag, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _tagged_pids(tag):
        time.sleep(0.2)
    _signal_tagged(tag, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _tagged_pids(tag):
        time.sleep(0.2)


def flower_env_for(cache_dir: Path, tag: str) -> dict[str, str]:
    """The environment of every process a test starts: this venv first on PATH, offline
    Flower, one edgekd cache, one thread per process (2 cores, many processes), and
    the tag that teardown kills by."""
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(BIN_DIR), os.environ.get("PATH", "")]),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "EDGEKD_CACHE_DIR": str(cache_dir),
        "RAY_DISABLE_USAGE_STATS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        TAG_VAR: tag,
    }
