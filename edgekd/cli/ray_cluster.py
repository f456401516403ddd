"""Which Ray instance `edgekd simulate` runs its simulated nodes on.

By default a private local instance with every CPU of this host. With
``sim.ray-address`` (``--ray-address``) or ``$RAY_ADDRESS`` the run attaches to a running
cluster instead, as Flower's simulation guide scales out: ``ray start --head`` on one
host, ``ray start --address=HEAD:PORT`` on the others (the same venv and edgekd at the
same path on every host), then ``edgekd simulate --ray-address HEAD:PORT`` on the head.
Ray refuses ``num_cpus`` from a driver that attaches, so the cluster's own resources
decide how many nodes train at once: its CPUs divided by ``sim.client-cpus``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from edgekd.cli.preflight import UsageError
from edgekd.core.config import EdgeKDConfig


def ray_address(cfg: EdgeKDConfig) -> str:
    """The cluster to attach to: ``sim.ray-address``, else ``$RAY_ADDRESS``; "" for none."""
    return cfg.sim.ray_address or os.environ.get("RAY_ADDRESS", "")


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before the teacher trains, when nothing listens at ``host:port``
    (Ray itself retries for a minute and then raises from inside Flower's engine).
    ``auto`` and ``ray://`` addresses are left to Ray."""
    if not address or address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"sim.ray-address: '{address}' is not HOST:PORT (or 'auto')")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UsageError(
            f"sim.ray-address: no Ray cluster answers at {address} ({exc.strerror or exc}); "
            "start one with `ray start --head`, or leave the address empty for a local one"
        ) from None


def backend_config(cfg: EdgeKDConfig) -> dict[str, Any]:
    """Flower's Ray backend config: each simulated node's resources, and how to start
    or reach Ray."""
    address = ray_address(cfg)
    if address:
        init_args: dict[str, Any] = {"address": address}
    else:
        init_args = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    return {
        "client_resources": {"num_cpus": cfg.sim.client_cpus, "num_gpus": cfg.sim.client_gpus},
        "init_args": init_args,
    }
