"""`edgekd server …` / `edgekd client start` without processes: the command lines built
for Flower's executables, the run config handed to `flwr run`, and the refusals that
must happen before anything starts (bad config, missing certificates, changed bundle).
Real processes: tests/integration/test_deployment.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from edgekd.cli.main import main
from edgekd.core.config import EdgeKDConfig
from edgekd.fleet.certs import make_certificates
from edgekd.fleet.processes import (
    OrchestrationError,
    parse_address,
    superlink_command,
    supernode_command,
    write_run_config,
)
from edgekd.server.checkpoint import RunCheckpoint, save_run_checkpoint


def test_parse_address_names_a_bad_one() -> None:
    assert parse_address("127.0.0.1:9092") == ("127.0.0.1", 9092)
    assert parse_address("[::1]:9092") == ("::1", 9092)
    for bad in ("9092", "host:", "host:x", "host:70000"):
        with pytest.raises(OrchestrationError, match=f"'{bad}' is not HOST:PORT"):
            parse_address(bad)


def test_superlink_serves_tls_unless_insecure(tmp_path: Path) -> None:
    from edgekd.fleet.processes import TLSFiles

    make_certificates(tmp_path)
    tls = superlink_command("0.0.0.0:9092", tls=TLSFiles.in_dir(tmp_path), node_auth=True)
    plain = superlink_command("127.0.0.1:1", tls=None, node_auth=False)
    assert tls[tls.index("--host") + 1 :][:3] == ["0.0.0.0", "--port", "9092"]
    assert tls[tls.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    assert "--enable-supernode-auth" in tls and "--insecure" not in tls
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain


def test_missing_certificates_are_named(tmp_path: Path) -> None:
    from edgekd.fleet.processes import TLSFiles

    with pytest.raises(OrchestrationError, match=r"ca.crt: missing.*edgekd server certs"):
        TLSFiles.in_dir(tmp_path)


def test_supernode_command_carries_the_node_config_and_key(tmp_path: Path) -> None:
    cmd = supernode_command(
        "10.0.0.1:9092",
        root_cert=tmp_path / "ca.crt",
        node_config={"partition-id": 3, "fault": "scale:1e6"},
        runtime_port=9100,
        private_key=tmp_path / "node",
    )
    assert cmd[cmd.index("--node-config") + 1] == 'partition-id=3 fault="scale:1e6"'
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "node")
    assert cmd[cmd.index("--port") + 1] == "9100"


def test_run_config_file_round_trips_to_the_same_config(tmp_path: Path) -> None:
    cfg = EdgeKDConfig().with_overrides(
        {"train.num-rounds": 3, "out-dir": "/abs/run", "kd.soft-targets": "proxy"}
    )
    path = write_run_config(tmp_path / "run_config.toml", cfg.to_flat())
    assert EdgeKDConfig.from_run_config(tomllib.loads(path.read_text())) == cfg


def test_server_start_refuses_a_bad_config_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["server", "start", "--insecure", "--out", str(tmp_path / "run"),
                 "--set", "train.min-fraction=2"])  # fmt: skip
    assert code == 2
    assert "train.min-fraction must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_server_start_without_certificates_says_how_to_make_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["server", "start", "--certs", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "run"), "--set", "data.num-samples=200"])  # fmt: skip
    assert code == 2
    assert "edgekd server certs" in capsys.readouterr().err


def test_resume_takes_the_checkpoints_config(tmp_path: Path) -> None:
    from edgekd.cli.fleet import server_run_config
    from edgekd.cli.main import make_parser

    cfg = EdgeKDConfig().with_overrides({"kd.temperature": 3.0, "train.num-rounds": 5})
    save_run_checkpoint(
        tmp_path,
        RunCheckpoint(
            round=2,
            state={"w": np.zeros(1, np.float32)},
            rounds=[],
            teacher_sha256="t",
            config=cfg.to_flat(),
        ),
    )
    args = make_parser().parse_args(["server", "start", "--resume", str(tmp_path)])
    run_dir, flat = server_run_config(args)
    assert run_dir == tmp_path.resolve()
    assert (flat["kd.temperature"], flat["resume"], flat["out-dir"]) == (3.0, True, str(run_dir))


def test_client_start_refuses_a_changed_bundle_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "bundles" / "android-w8", bundle)
    data = bytearray((bundle / "train_step.tflite").read_bytes())
    data[100] ^= 0xFF
    (bundle / "train_step.tflite").write_bytes(bytes(data))
    code = main(["client", "start", "--bundle", str(bundle), "--insecure"])
    assert code == 2
    assert "train_step.tflite" in capsys.readouterr().err
