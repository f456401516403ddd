"""A federation of real processes on loopback for the deployment tests: `edgekd server
start` (which starts ``flower-superlink`` and submits the ServerApp with ``flwr run``)
and `edgekd client start` nodes (``flower-supernode`` with the edgekd ClientApp).

Every process carries the test's tag (see conftest.py) and is killed at teardown;
each node and each server runs in its own session, so one can be killed with all its
children (the ClientApp / ServerApp processes Flower spawns) in the middle of a run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processes import BIN_DIR  # tests/integration/processes.py

NUM_PARTITIONS = 5  # honest nodes hold partitions 0-2; fault drills 3 and 4
# A small, quick run: 3 rounds of about 20 s each on 2 cores (process start-up and
# Flower's polling dominate, not the training).
RUN_SETTINGS = [
    "--rounds",
    "3",
    "--set",
    "seed=7",
    "--set",
    "data.num-samples=4000",
    "--set",
    "data.partition=iid",
    "--set",
    "model.teacher-epochs=20",
    "--set",
    "train.warm-start-epochs=2",
    "--set",
    "train.local-epochs=2",
    "--set",
    "train.fraction-evaluate=0",
    "--set",
    "train.min-nodes=3",
    # A bound, not a pace: rounds end when every node has replied (20-45 s here).
    "--set",
    "train.round-timeout=120",
]


# Ports below Linux's ephemeral range (32768-60999): a port the OS picked, released and
# then handed to a process's outgoing connection was taken before a SuperNode bound it
# ("address already in use" in CI). Each one is handed out once per test process.
_NEXT_PORT = [20_000 + (os.getpid() % 500) * 20]


def free_port() -> int:
    while True:
        port = _NEXT_PORT[0]
        _NEXT_PORT[0] += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"--- {path}: none"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path} (tail) ---\n" + "\n".join(text)


@dataclass
class Fleet:
    """One SuperLink address, its certificates, and the processes started against it."""

    root: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    certs: Path | None = None  # None: --insecure
    procs: list[tuple[subprocess.Popen[str], Path]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(
        self, args: Sequence[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        log_path = self.root / log_name
        with log_path.open("a") as log:
            proc = subprocess.Popen(
                [str(BIN_DIR / "edgekd"), *args],
                cwd=self.root,
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        self.procs.append((proc, log_path))
        return proc

    def node(
        self,
        partition_id: int,
        *,
        key: Path | None = None,
        fault: str | None = None,
        name: str | None = None,
        bundle: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        args = ["client", "start", "--superlink", self.address, "--port", str(free_port())]
        if bundle is not None:
            args += ["--bundle", str(bundle)]
        args += ["--partition-id", str(partition_id), "--num-partitions", str(NUM_PARTITIONS)]
        if self.certs is None:
            args.append("--insecure")
        else:
            args += ["--root-cert", str(self.certs / "ca.crt")]
        if key is not None:
            args += ["--key", str(key)]
        if fault is not None:
            args += ["--node-config", f"fault={fault}"]
        return self._spawn(args, f"node-{name or partition_id}.log", env=env)

    def server(self, out: Path, *extra: str, settings: Sequence[str] = RUN_SETTINGS) -> Any:
        args = ["server", "start", "--listen", self.address, "--out", str(out), *settings]
        args += ["--insecure"] if self.certs is None else ["--certs", str(self.certs)]
        return self._spawn([*args, *extra], f"server-{out.name}.log")

    def superlink(self) -> subprocess.Popen[str]:
        """A SuperLink of its own (TLS), for several `edgekd server start --superlink`
        runs against the same connected nodes."""
        from edgekd.fleet.processes import TLSFiles, superlink_command, wait_for_port

        assert self.certs is not None
        log_path = self.root / "superlink.log"
        cmd = superlink_command(self.address, tls=TLSFiles.in_dir(self.certs), node_auth=False)
        with log_path.open("a") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        self.procs.append((proc, log_path))
        wait_for_port(self.address, proc, timeout=60, log_path=log_path)
        return proc

    def wait(self, proc: subprocess.Popen[str], timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process still running after {timeout:.0f} s\n{self.logs()}"
            ) from None

    @staticmethod
    def kill(proc: subprocess.Popen[str]) -> None:
        """SIGKILL a process and everything in its session (a pulled plug)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(_tail(path) for _, path in self.procs)

    def report(self, out: Path) -> dict[str, Any]:
        path = out / "report.json"
        assert path.is_file(), f"no {path}\n{self.logs()}"
        return json.loads(path.read_text())

    def run(
        self,
        out: Path,
        *extra: str,
        settings: Sequence[str] = RUN_SETTINGS,
        timeout: float = 300.0,
    ) -> dict[str, Any]:
        """`edgekd server start` to the end; its report."""
        proc = self.server(out, *extra, settings=settings)
        code = self.wait(proc, timeout)
        assert code == 0, f"edgekd server start exited with {code}\n{self.logs()}"
        return self.report(out)

    def wait_for_log(
        self, proc: subprocess.Popen[str], text: str, *, count: int = 1, timeout: float
    ) -> None:
        """Wait until ``proc``'s log holds ``text`` ``count`` times."""
        log_path = next(path for p, path in self.procs if p is proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log_path.read_text(errors="replace").count(text) >= count:
                return
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"'{text}' x{count} not in {log_path}\n{self.logs()}")

    def wait_for_checkpoint(self, out: Path, rnd: int, timeout: float) -> None:
        from edgekd.server.checkpoint import ResumeError, load_run_checkpoint

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if load_run_checkpoint(out).round >= rnd:
                    return
            except ResumeError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"no checkpoint of round {rnd} after {timeout:.0f} s\n{self.logs()}")


def accuracies(report: dict[str, Any]) -> list[float]:
    return [r["accuracy"] for r in report["rounds"]]
