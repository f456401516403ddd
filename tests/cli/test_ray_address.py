"""Where `edgekd simulate` runs: a private Ray instance, or the cluster it is told about."""

from __future__ import annotations

import socket
import time

import pytest

from edgekd.cli.preflight import UsageError
from edgekd.cli.ray_cluster import backend_config, check_ray_address, ray_address
from edgekd.core.config import ConfigError, EdgeKDConfig


def test_without_an_address_ray_starts_locally_with_every_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 6)

    got = backend_config(EdgeKDConfig())

    assert got["init_args"] == {"num_cpus": 6, "include_dashboard": False}
    assert got["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_ray_address_env_attaches_without_num_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray refuses num_cpus from a driver that attaches to a cluster.
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    cfg = EdgeKDConfig().with_overrides({"sim.client-cpus": "2", "sim.client-gpus": "0.5"})

    got = backend_config(cfg)

    assert got["init_args"] == {"address": "10.0.0.5:6379"}
    assert got["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}


def test_the_config_key_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    cfg = EdgeKDConfig().with_overrides({"sim.ray-address": "auto"})

    assert ray_address(cfg) == "auto"
    assert backend_config(cfg)["init_args"] == {"address": "auto"}


def test_an_address_where_nothing_listens_fails_in_seconds() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()

    with pytest.raises(UsageError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        check_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5


def test_a_listening_address_passes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_ray_address(f"127.0.0.1:{s.getsockname()[1]}")


@pytest.mark.parametrize("address", ["nohost", "host:", ":6379", "host:port"])
def test_a_malformed_address_is_named(address: str) -> None:
    with pytest.raises(UsageError, match="is not HOST:PORT"):
        check_ray_address(address)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("sim.client-cpus", "0", "sim.client-cpus must be > 0"),
        ("sim.client-gpus", "-1", "sim.client-gpus must be >= 0"),
    ],
)
def test_bad_client_resources_are_refused(key: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        EdgeKDConfig().with_overrides({key: value})
