"""Fixtures for tests that start real Flower processes (`flwr run` on a local SuperLink).

`flwr run` against a connection whose address is ``":local:"`` lazily starts a
*detached* ``flower-superlink --simulation`` (its own session), which in turn starts a
detached ``flower-superexec``, the ``flwr-simulation`` process and a Ray cluster. None
of these are children we could wait on, so every process is tagged with a unique
environment variable and, at teardown, every process carrying that tag is killed
(process groups first, then the stragglers), whether the test passed or not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from processes import BIN_DIR, flower_env_for, kill_tagged  # tests/integration/processes.py

REPO_ROOT = Path(__file__).resolve().parents[2]
# `flwr` and the `flower-superlink` it spawns (looked up on PATH) come from this venv.
CONNECTION = "local"

# SuperLink connections live in $FLWR_HOME/config.toml since flwr 1.26; ":local:" makes
# `flwr` start (and reuse) a managed local SuperLink in simulation mode.
FLOWER_CONFIG = f"""\
[superlink]
default = "{CONNECTION}"

[superlink.{CONNECTION}]
address = ":local:"
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FlowerLocal:
    """A private Flower home, environment and local-SuperLink ports for one test."""

    home: Path
    env: dict[str, str]
    tag: str
    connection: str = CONNECTION

    @property
    def superlink_log(self) -> Path:
        return self.home / "local-superlink" / "superlink.log"

    def flwr(
        self, args: Sequence[str], *, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run one `flwr` CLI command from the repo root, bounded by ``timeout``."""
        proc = subprocess.Popen(
            [str(BIN_DIR / "flwr"), *args],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(
                f"`flwr {' '.join(args)}` timed out after {timeout:.0f}s\n"
                f"stdout:\n{out}\nstderr:\n{err}\n{self.diagnostics()}"
            ) from None
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`flwr {' '.join(args)}` exited with {proc.returncode}\n"
                f"stdout:\n{out}\nstderr:\n{err}\n{self.diagnostics()}"
            )
        return result

    def flwr_json(self, args: Sequence[str], *, timeout: float) -> dict[str, Any]:
        out = self.flwr([*args, "--format", "json"], timeout=timeout).stdout
        # `--format json` prints one JSON object; anything before it is chatter.
        start = out.find("{")
        assert start >= 0, f"no JSON in `flwr {' '.join(args)}` output:\n{out}"
        return json.loads(out[start:])

    def diagnostics(self, run_id: str | None = None, lines: int = 60) -> str:
        parts = []
        if self.superlink_log.exists():
            tail = self.superlink_log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {self.superlink_log} (tail) ---\n" + "\n".join(tail))
        if run_id is not None:
            try:
                res = self.flwr(["log", run_id, self.connection, "--show"], timeout=30, check=False)
                tail = (res.stdout + res.stderr).splitlines()[-lines:]
                parts.append(f"--- flwr log {run_id} (tail) ---\n" + "\n".join(tail))
            except AssertionError as err:
                parts.append(f"--- flwr log {run_id} failed: {err}")
        return "\n".join(parts)


@pytest.fixture(scope="session")
def edgekd_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset/teacher cache for the session, away from ``~/.cache/edgekd``."""
    return tmp_path_factory.mktemp("edgekd-cache")


@pytest.fixture
def flower_local(tmp_path: Path, edgekd_cache_dir: Path) -> Iterator[FlowerLocal]:
    """A tmp ``$FLWR_HOME`` with a ``:local:`` connection on free ports, offline.

    Every process started under it (``flwr``, the managed SuperLink, SuperExec, the
    simulation and its Ray cluster) inherits a unique tag and is killed at teardown.
    """
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(FLOWER_CONFIG, encoding="utf-8")
    tag = uuid.uuid4().hex
    http_port, control_port = _free_port(), _free_port()
    while control_port == http_port:
        control_port = _free_port()
    env = {
        **flower_env_for(edgekd_cache_dir, tag),
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
    }
    try:
        yield FlowerLocal(home=home, env=env, tag=tag)
    finally:
        kill_tagged(tag)
