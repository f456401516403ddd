"""Flower's Deployment Engine as processes: the SuperLink, SuperNodes and `flwr run`.

`edgekd server start` and `edgekd client start` are thin: they build the command lines
of Flower's own executables (``flower-superlink``, ``flower-supernode``, ``flwr``),
write the connection Flower's CLI reads from ``$FLWR_HOME/config.toml`` (flwr >= 1.26),
start the processes and watch them. No transport or scheduler of our own.

flwr 1.42 serves the Fleet, Control and Runtime APIs of a SuperLink on one HTTP
address (``--host``/``--port``), so a federation has one address to open and to give
the devices. TLS: the SuperLink gets the server certificate and key (and the CA),
nodes and the ``flwr`` CLI the CA as their root certificate. Node authentication:
the SuperLink runs with ``--enable-supernode-auth`` and accepts only nodes whose
public keys were registered (``flwr supernode register``).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgekd.core.errors import EdgeKDError

DEFAULT_PORT = 9092
OFFLINE_ENV = {
    # No network but the package registries, and no surprises at run time.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


class OrchestrationError(EdgeKDError, RuntimeError):
    """A Flower process that would not start, or a run that did not complete."""


@dataclass(frozen=True)
class TLSFiles:
    """What `edgekd server certs` writes: the CA, and the server's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, folder: Path) -> TLSFiles:
        files = cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")
        for path in (files.ca_cert, files.server_cert, files.server_key):
            if not path.is_file():
                raise OrchestrationError(
                    f"{path}: missing; make the certificates with `edgekd server certs --out "
                    f"{folder}` (or pass --insecure for a local test, without TLS)"
                )
        return files


def parse_address(address: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OrchestrationError(f"{what} '{address}' is not HOST:PORT (e.g. 127.0.0.1:9092)")
    return host.strip("[]"), int(port)


def superlink_command(
    listen: str,
    *,
    tls: TLSFiles | None,
    node_auth: bool,
    database: Path | None = None,
) -> list[str]:
    """``flower-superlink`` serving on ``listen`` (HOST:PORT)."""
    host, port = parse_address(listen, "--listen")
    cmd = [_executable("flower-superlink"), "--host", host, "--port", str(port)]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    cmd.append("--disable-runtime-dependency-installation")
    return cmd


def supernode_command(
    superlink: str,
    *,
    root_cert: Path | None,
    node_config: Mapping[str, Any],
    runtime_port: int,
    private_key: Path | None = None,
    max_retries: int | None = None,
) -> list[str]:
    """``flower-supernode`` joining ``superlink``. ``runtime_port`` is the node's own
    local API port: every node on one host needs its own."""
    parse_address(superlink, "--superlink")
    cmd = [_executable("flower-supernode"), "--superlink", superlink]
    cmd += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    if private_key is not None:  # an OpenSSH EC private key; its public half registered
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        cmd += ["--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())]
    cmd += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def write_connection(flwr_home: Path, name: str, address: str, *, root_cert: Path | None) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in ``flwr_home/config.toml``,
    make it the default, and keep any other connection there."""
    path = flwr_home / "config.toml"
    existing: dict[str, Any] = {}
    if path.is_file():
        try:
            existing = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise OrchestrationError(f"{path}: not valid TOML ({exc})") from exc
    links = dict(existing.get("superlink", {}))
    connection: dict[str, Any] = {"address": address}
    if root_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_cert.resolve())
    links = {k: v for k, v in links.items() if isinstance(v, dict) and k != name}
    lines = ["[superlink]", f"default = {_toml_value(name)}", ""]
    for conn_name, values in [*links.items(), (name, connection)]:
        lines.append(f"[superlink.{conn_name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    flwr_home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_run_config(path: Path, flat: Mapping[str, Any]) -> Path:
    """A TOML file of flat run-config keys, for ``flwr run --run-config FILE``."""
    body = "".join(f'"{key}" = {_toml_value(value)}\n' for key, value in sorted(flat.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's executables: this interpreter's bin first on PATH
    (so the SuperLink finds the SuperExec and ServerApp of the same install)."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "PYTHONUNBUFFERED": "1",
        **OFFLINE_ENV,
        **(extra or {}),
    }


def start_process(
    cmd: Sequence[str], *, env: Mapping[str, str], log: IO[str] | None, cwd: Path | None = None
) -> subprocess.Popen[str]:
    """Start ``cmd``; on Linux it dies with us (``PR_SET_PDEATHSIG``), so a killed
    ``edgekd server start`` does not leave a SuperLink holding its port."""
    return subprocess.Popen(
        list(cmd),
        env=dict(env),
        cwd=cwd,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def wait_for_port(
    address: str, proc: subprocess.Popen[str], *, timeout: float, log_path: Path | None = None
) -> None:
    """Wait until ``address`` accepts TCP connections; fail early if ``proc`` exits."""
    host, port = parse_address(address)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - a bind-all address
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            name = Path(str(list(proc.args)[0])).name  # type: ignore[arg-type]
            raise OrchestrationError(
                f"{name} exited with {proc.returncode} before serving {address}{_tail(log_path)}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise OrchestrationError(f"nothing serves {address} after {timeout:.0f} s{_tail(log_path)}")


def stop_process(proc: subprocess.Popen[str], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _die_with_parent() -> None:
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.is_file():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- {path} (last lines) ---\n" + "\n".join(tail)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    raise OrchestrationError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


@dataclass(frozen=True)
class Connection:
    """How the ``flwr`` CLI reaches a SuperLink: a named entry in ``$FLWR_HOME``."""

    name: str
    flwr_home: Path
    env: Mapping[str, str]

    def flwr(
        self, args: Sequence[str], *, timeout: float, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """One ``flwr`` command, bounded by ``timeout``; an error names it and its output."""
        cmd = [_executable("flwr"), *args]
        try:
            done = subprocess.run(
                cmd, env=dict(self.env), cwd=cwd, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            what = f"`flwr {' '.join(args)}`"
            raise OrchestrationError(f"{what} timed out after {timeout:.0f} s") from None
        if done.returncode != 0:
            raise OrchestrationError(
                f"`flwr {' '.join(args)}` exited with {done.returncode}:\n"
                f"{(done.stdout + done.stderr).strip()[-2000:]}"
            )
        return done

    def flwr_json(self, args: Sequence[str], *, timeout: float, cwd: Path | None = None) -> Any:
        out = self.flwr([*args, "--format", "json"], timeout=timeout, cwd=cwd).stdout
        start = out.find("{")  # anything before the JSON object is chatter
        if start < 0:
            raise OrchestrationError(f"`flwr {' '.join(args)}` printed no JSON:\n{out[-2000:]}")
        return json.loads(out[start:])

    def submit(self, app_dir: Path, run_config: Path) -> str:
        """``flwr run`` the app; returns the run id (the run goes on in the SuperLink)."""
        started = self.flwr_json(
            ["run", str(app_dir), self.name, "--run-config", str(run_config)], timeout=300
        )
        if started.get("success") is not True:
            raise OrchestrationError(f"`flwr run` did not start the run: {started}")
        return str(started["run-id"])

    def status(self, run_id: str) -> str:
        listing = self.flwr_json(["ls", self.name, "--run-id", run_id], timeout=60)
        runs = [r for r in listing.get("runs", []) if str(r.get("run-id")) == run_id]
        if not runs:
            raise OrchestrationError(f"run {run_id} is not known to the SuperLink")
        return str(runs[0]["status"])

    def follow(
        self, run_id: str, *, out: IO[str], poll: float = 2.0, timeout: float | None = None
    ) -> str:
        """Stream the run's log to ``out`` until it finishes; return its final status
        (``finished:completed``, ``finished:failed``, ...)."""
        log_proc = subprocess.Popen(
            [_executable("flwr"), "log", run_id, self.name, "--stream"],
            env=dict(self.env),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                status = self.status(run_id)
                if status.startswith("finished"):
                    time.sleep(poll)  # let the log catch up with the last lines
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise OrchestrationError(f"run {run_id} still {status} after {timeout:.0f} s")
                time.sleep(poll)
        finally:
            stop_process(log_proc, grace=2.0)
