"""`edgekd simulate --ray-address` on a real two-node Ray cluster (two `ray start`s here)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from processes import BIN_DIR, flower_env_for, kill_tagged  # tests/integration/processes.py

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL_KEYS = (
    "data.num-samples=4000",
    "model.teacher-epochs=10",
    "train.warm-start-epochs=5",
    "train.local-epochs=1",
)

# Run in a second driver once the simulation is over: the cluster's alive nodes, and the
# node each of Flower's ClientAppActors ran on (Ray's GCS keeps dead actors' records).
PLACEMENT = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR")
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [a["Address"]["NodeID"] for a in state.actors().values()
          if a["ActorClassName"] == "ClientAppActor"]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(
        [str(BIN_DIR / "ray"), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_simulation_attaches_to_a_two_node_ray_cluster_and_uses_both(tmp_path: Path) -> None:
    # Prepare: a head node and a worker node, one CPU each, as `ray start` makes them on
    # two hosts (Flower's multi-node recipe). Ray's socket paths must stay under 108
    # characters, so its temp dir is short rather than under tmp_path.
    tag = uuid.uuid4().hex
    env = flower_env_for(tmp_path / "cache", tag)
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="rk")
    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "run"
    try:
        _ray(
            ["start", "--head", "--port", address.rpartition(":")[2], "--num-cpus", "1"]
            + ["--include-dashboard=false", "--disable-usage-stats", "--temp-dir", ray_tmp],
            env,
        )
        _ray(["start", "--address", address, "--num-cpus", "1"], env)

        # Execute: the run on the cluster, each simulated node asking for one CPU.
        command = [str(BIN_DIR / "edgekd"), "simulate", "--ray-address", address]
        command += ["--num-clients", "4", "--rounds", "2", "--out", str(out)]
        command += [arg for key in SMALL_KEYS for arg in ("--set", key)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        placement = subprocess.run(
            [sys.executable, "-c", PLACEMENT, address],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        kill_tagged(tag)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # Assert: the run finished and learned; both nodes of the cluster held nodes of the
    # simulation (2 CPUs / 1 CPU a node = two actors, one a node).
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"attaching to the Ray cluster at {address}" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert sum(r["failures"] for r in report["rounds"]) == 0
    assert report["student"]["accuracy"] > 0.3
    assert placement.returncode == 0, placement.stderr[-4000:]
    where = json.loads(placement.stdout.strip().splitlines()[-1])
    assert len(where["nodes"]) == 2
    assert sorted(set(where["actors"])) == sorted(where["nodes"])
