"""``edgekd server …`` and ``edgekd client start``: a real federation on Flower's
Deployment Engine (see `edgekd.fleet.processes` for the processes).

``server start`` starts ``flower-superlink`` (TLS unless ``--insecure``; with node
authentication when asked), registers the connection in ``$FLWR_HOME``, submits the
edgekd ServerApp with ``flwr run`` and streams its log until the run ends. With
``--resume RUN_DIR`` it continues an interrupted run from its last checkpoint.
``client start`` runs ``flower-supernode`` with edgekd's ClientApp for one device.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from edgekd.core.run_folder import claim_run_folder
from edgekd.fleet.processes import (
    DEFAULT_PORT,
    Connection,
    OrchestrationError,
    TLSFiles,
    flower_env,
    parse_address,
    start_process,
    stop_process,
    superlink_command,
    supernode_command,
    wait_for_port,
    write_connection,
    write_run_config,
)

CONNECTION = "edgekd"
INSECURE_WARNING = (
    "edgekd: WARNING: --insecure: no TLS. Models, updates and node identities cross the "
    "network in clear text. Use it for a local test only; make certificates with "
    "`edgekd server certs --out DIR` and pass --certs DIR."
)


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def app_dir(given: str | None) -> Path:
    """The Flower app to submit: ``--app``, or the source tree edgekd runs from."""
    if given:
        path = Path(given).resolve()
    else:
        path = Path(__file__).resolve().parents[2]
    manifest = path / "pyproject.toml"
    if not manifest.is_file() or "[tool.flwr.app" not in manifest.read_text(encoding="utf-8"):
        raise OrchestrationError(
            f"{path} is not a Flower app (no [tool.flwr.app] in its pyproject.toml); "
            "pass --app with the edgekd source folder"
        )
    return path


def server_run_config(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The run folder and the flat run config to submit; a bad key or value fails here,
    before any process starts, naming the field."""
    from edgekd.cli.preflight import build_config

    if args.resume:
        from edgekd.server.checkpoint import check_resumable, load_run_checkpoint

        run_dir = Path(args.resume).resolve()
        checkpoint = load_run_checkpoint(run_dir)
        base = {k: v for k, v in checkpoint.config.items() if k not in ("resume", "out-dir")}
        flags = {"train.num-rounds": args.rounds, "resume": True, "out-dir": str(run_dir)}
        cfg = build_config(None, args.set, flags, base=_config_from_flat(base))
        # Every refusal the ServerApp would make, made here: before a file is written.
        check_resumable(checkpoint, cfg.to_flat(), run_dir)
        claim_run_folder(run_dir, force=True, flag="--resume")  # writable
        print(f"edgekd: resuming {run_dir} after round {checkpoint.round}", flush=True)
    else:
        run_dir = Path(args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}").resolve()
        flags = {"train.num-rounds": args.rounds, "out-dir": str(run_dir)}
        cfg = build_config(args.config, args.set, flags)
        claim_run_folder(run_dir, force=args.force)
    return run_dir, cfg.to_flat()


def _config_from_flat(flat: dict[str, Any]) -> Any:
    from edgekd.core.config import EdgeKDConfig

    return EdgeKDConfig().with_overrides(flat)


def cmd_server_start(args: argparse.Namespace) -> int:
    from edgekd.cli.preflight import preflight
    from edgekd.core.config import EdgeKDConfig

    run_dir, run_config = server_run_config(args)
    preflight(EdgeKDConfig().with_overrides(run_config))  # data and checkpoints, before processes
    app = app_dir(args.app)
    tls = None if args.insecure else TLSFiles.in_dir(Path(args.certs))
    if tls is None:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    home = flwr_home()
    env = flower_env(home)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = write_run_config(run_dir / "run_config.toml", run_config)
    superlink = None
    address = args.superlink
    try:
        if address is None:
            host, port = parse_address(args.listen, "--listen")
            address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
            log_path = run_dir / "superlink.log"
            with log_path.open("a", encoding="utf-8") as log:
                superlink = start_process(
                    superlink_command(
                        args.listen,
                        tls=tls,
                        node_auth=args.node_auth,
                        # Registered node keys survive a restart (`--resume`).
                        database=run_dir / "superlink.db",
                    ),
                    env=env,
                    log=log,
                    cwd=run_dir,
                )
            wait_for_port(address, superlink, timeout=60, log_path=log_path)
            print(f"edgekd: SuperLink serving {args.listen} (log: {log_path})", flush=True)
        write_connection(home, CONNECTION, address, root_cert=tls.ca_cert if tls else None)
        connection = Connection(CONNECTION, home, env)
        for key in args.authorize or []:
            register_node(connection, Path(key))
        run_id = connection.submit(app, config_file)
        print(f"edgekd: run {run_id} submitted; report: {run_dir / 'report.json'}", flush=True)
        status = connection.follow(run_id, out=sys.stdout, timeout=args.timeout)
        print(f"edgekd: run {run_id} {status}", flush=True)
        return 0 if status == "finished:completed" else 1
    except KeyboardInterrupt:
        print(
            f"edgekd: interrupted; continue with `edgekd server start --resume {run_dir}` "
            "(from the last completed round)",
            file=sys.stderr,
            flush=True,
        )
        return 130
    finally:
        if superlink is not None:
            stop_process(superlink)


def register_node(connection: Connection, public_key: Path) -> None:
    """Let the SuperLink accept the node holding the private half of ``public_key``."""
    from edgekd.fleet.certs import read_public_key

    try:
        read_public_key(public_key)  # a clear error for a file that is not a key
    except ValueError as exc:
        raise OrchestrationError(str(exc)) from None
    args = ["supernode", "register", str(public_key.resolve()), connection.name]
    # With --format json a refused registration still exits 0: read "success".
    answer = connection.flwr_json(args, timeout=60)
    if answer.get("success") is not True:
        raise OrchestrationError(
            f"{public_key}: the SuperLink refused the key: {answer.get('error-message', answer)}"
        )
    print(f"edgekd: registered node key {public_key} (node {answer.get('node-id')})", flush=True)


def cmd_server_add_node(args: argparse.Namespace) -> int:
    home = flwr_home()
    register_node(Connection(args.connection, home, flower_env(home)), Path(args.public_key))
    return 0


def cmd_server_certs(args: argparse.Namespace) -> int:
    from edgekd.fleet.certs import make_certificates, make_node_keys

    out = Path(args.out)
    hosts = tuple(args.host or ("127.0.0.1", "localhost"))
    make_certificates(out, hosts=hosts, overwrite=args.force)
    print(f"edgekd: CA and server certificate in {out} for {', '.join(hosts)}")
    for name in args.node or []:
        keys = make_node_keys(out / "nodes", name, overwrite=args.force)
        print(f"edgekd: node '{name}': {keys}")
    return 0


def cmd_client_start(args: argparse.Namespace) -> int:
    """Replace this process with a ``flower-supernode`` running edgekd's ClientApp.

    With ``--bundle`` the bundle is verified first (a changed or missing file refuses
    to start, naming it) and its ``client.toml`` supplies the SuperLink address, the CA
    and the node key unless the command line gives them."""
    node_config: dict[str, Any] = {}
    for item in args.node_config or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise OrchestrationError(f"--node-config expects key=value, got '{item}'")
        node_config[key.strip()] = _scalar(value.strip())
    if args.partition_id is not None:
        if args.num_partitions is None:
            raise OrchestrationError("--partition-id needs --num-partitions")
        node_config["partition-id"] = args.partition_id
        node_config["num-partitions"] = args.num_partitions
    client: dict[str, Any] = {}
    if args.bundle:
        from edgekd.deploy.bundle import load_bundle

        bundle = load_bundle(Path(args.bundle), verify_key=args.verify_key)
        node_config["bundle"] = str(bundle.path.resolve())
        client = _bundle_client_settings(bundle.path)
        print(f"edgekd: bundle {bundle.path} verified ({bundle.profile.name})", flush=True)
    superlink = args.superlink or client.get("superlink")
    if not superlink:
        raise OrchestrationError("--superlink HOST:PORT is needed (no bundle gives one)")
    root_cert = args.root_cert or client.get("root_certificates") or None
    key = args.key or client.get("node_key") or None
    if not args.insecure and not root_cert:
        raise OrchestrationError("--root-cert CA.crt is needed for TLS (or --insecure, local only)")
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    cmd = supernode_command(
        superlink,
        root_cert=_existing(root_cert, "root certificate")
        if root_cert and not args.insecure
        else None,
        node_config=node_config,
        runtime_port=args.port,
        private_key=_existing(key, "node key") if key else None,
    )
    env = flower_env(flwr_home())
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)  # noqa: S606 - Flower's own executable, no shell


def _bundle_client_settings(bundle: Path) -> dict[str, Any]:
    """``[client]`` of the bundle's client.toml, file paths made absolute."""
    import tomllib

    with (bundle / "client.toml").open("rb") as handle:
        client = dict(tomllib.load(handle).get("client", {}))
    for key in ("root_certificates", "node_key"):
        value = str(client.get(key) or "")
        if value and not Path(value).is_absolute():
            client[key] = str(bundle / value)
    return client


def _existing(path: str | Path, what: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise OrchestrationError(f"{what} {resolved}: no such file")
    return resolved


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text in ("true", "false"):
        return text == "true"
    return text.strip("\"'")


def register(sub: Any) -> None:
    """Add ``server`` and ``client`` to the ``edgekd`` parser's subcommands."""
    server = sub.add_parser("server", help="server orchestration on a real network")
    ssub = server.add_subparsers(dest="server_command", required=True)
    start = ssub.add_parser("start", help="start a SuperLink and run the edgekd ServerApp")
    start.add_argument("--config", help="TOML file with config keys (see README)")
    start.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
    start.add_argument("--rounds", type=int, help="federated rounds (train.num-rounds)")
    start.add_argument("--out", help="run folder (runs/<timestamp>)")
    start.add_argument(
        "--force", action="store_true", help="overwrite a run folder that holds a run already"
    )
    start.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its checkpoint")
    start.add_argument(
        "--listen",
        default=f"0.0.0.0:{DEFAULT_PORT}",
        help=f"address the SuperLink serves devices on (0.0.0.0:{DEFAULT_PORT})",
    )
    start.add_argument("--superlink", help="use this running SuperLink (HOST:PORT) instead")
    start.add_argument("--certs", default="certs", help="folder from `edgekd server certs`")
    start.add_argument("--insecure", action="store_true", help="no TLS: local tests only")
    start.add_argument("--node-auth", action="store_true", help="accept only registered node keys")
    start.add_argument(
        "--authorize", action="append", metavar="PUBKEY", help="register a node key at start"
    )
    start.add_argument("--app", help="the edgekd Flower app folder (this source tree)")
    start.add_argument("--timeout", type=float, help="give up on the run after this many seconds")
    start.set_defaults(func=cmd_server_start)

    certs = ssub.add_parser("certs", help="make a CA, a server certificate and node keys")
    certs.add_argument("--out", required=True, help="folder to write into")
    certs.add_argument(
        "--host",
        action="append",
        default=None,
        help="name or IP the devices use to reach the server; repeatable (127.0.0.1, localhost)",
    )
    certs.add_argument("--node", action="append", help="also make a key pair for this node")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(func=cmd_server_certs)

    add = ssub.add_parser("add-node", help="register a device's public key with the SuperLink")
    add.add_argument("public_key", help="the node's public key file")
    add.add_argument("--connection", default=CONNECTION, help="$FLWR_HOME connection (edgekd)")
    add.set_defaults(func=cmd_server_add_node)

    client = sub.add_parser("client", help="a device joining the federation")
    csub = client.add_subparsers(dest="client_command", required=True)
    cstart = csub.add_parser("start", help="run a SuperNode with the edgekd ClientApp")
    cstart.add_argument("--superlink", help="the server's HOST:PORT (default: the bundle's)")
    cstart.add_argument("--bundle", help="a device bundle from `edgekd deploy build`")
    cstart.add_argument(
        "--verify-key", help="public key the bundle's manifest must be signed with (--bundle)"
    )
    cstart.add_argument("--root-cert", help="the CA certificate (ca.crt) for TLS")
    cstart.add_argument("--key", help="this node's private key (node authentication)")
    cstart.add_argument("--insecure", action="store_true", help="no TLS: local tests only")
    cstart.add_argument("--partition-id", type=int, help="this node's share of the demo data")
    cstart.add_argument("--num-partitions", type=int, help="how many shares the data has")
    cstart.add_argument("--node-config", action="append", metavar="KEY=VALUE", help="repeatable")
    cstart.add_argument(
        "--port", type=int, default=9094, help="this node's local runtime API port (9094)"
    )
    cstart.set_defaults(func=cmd_client_start)
