"""A real federation on loopback: `edgekd server start` (SuperLink + ServerApp via
``flwr run``) and `edgekd client start` nodes (SuperNodes), TLS by default.

The clean three-node run is made once (module fixture) and is the reference of the
resume and the poisoning tests. Each run takes about 100 s on 2 cores.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, accuracies  # tests/integration/fleet.py

from edgekd.fleet.certs import make_certificates, make_node_keys
from edgekd.server.checkpoint import load_run_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HONEST = (0, 1, 2)


def _fleet(root: Path, base_env: dict[str, str], tag_var: str, *, tls: bool = True) -> Fleet:
    root.mkdir(parents=True, exist_ok=True)
    env = {**base_env, "FLWR_HOME": str(root / "flwr-home"), tag_var: base_env[tag_var]}
    certs = None
    if tls:
        certs = root / "certs"
        make_certificates(certs, hosts=("127.0.0.1", "localhost"))
    return Fleet(root=root, env=env, certs=certs)


@pytest.fixture(scope="module")
def fleet_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], str]]:
    from processes import TAG_VAR, flower_env_for, kill_tagged

    tag = uuid.uuid4().hex
    env = flower_env_for(tmp_path_factory.mktemp("fleet-cache"), tag)
    try:
        yield env, TAG_VAR
    finally:
        kill_tagged(tag)


@pytest.fixture(scope="module")
def clean_run(
    fleet_env: tuple[dict[str, str], str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Fleet, dict[str, Any]]:
    """Three honest nodes over TLS, three rounds: the reference run."""
    env, tag_var = fleet_env
    fleet = _fleet(tmp_path_factory.mktemp("clean"), env, tag_var)
    nodes = [fleet.node(p) for p in HONEST]
    report = fleet.run(fleet.root / "run")
    for node in nodes:
        Fleet.kill(node)
    return fleet, report


def test_three_nodes_over_tls_write_a_report_and_learn(clean_run: tuple[Fleet, dict[str, Any]]):
    _, report = clean_run
    acc = accuracies(report)
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2, 3]
    assert all(r["replies"] == 3 and r["missing"] == 0 for r in report["rounds"][1:])
    assert acc[-1] > acc[0], acc


def test_node_auth_refuses_an_unregistered_key(
    fleet_env: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    # Prepare: three registered keys, and a fourth node whose key nobody registered.
    # A SuperNode refused at activation exits (Flower's exit code 305), so the devices
    # start once the server has registered their keys.
    env, tag_var = fleet_env
    fleet = _fleet(tmp_path, env, tag_var)
    keys = [make_node_keys(tmp_path / "keys", f"node{p}") for p in (*HONEST, 9)]
    authorize = [a for key in keys[:3] for a in ("--authorize", str(key.public_key))]
    server = fleet.server(tmp_path / "run", "--node-auth", *authorize)
    fleet.wait_for_log(server, "registered node key", count=3, timeout=120)

    # Execute
    for p, key in zip(HONEST, keys, strict=False):
        fleet.node(p, key=key.private_key)
    intruder = fleet.node(3, key=keys[-1].private_key, name="intruder")

    # Assert: the intruder is turned away; every round asked exactly the three others.
    assert fleet.wait(intruder, timeout=120) != 0
    assert "Failed to activate SuperNode" in (tmp_path / "node-intruder.log").read_text()
    assert fleet.wait(server, timeout=400) == 0, fleet.logs()
    report = fleet.report(tmp_path / "run")
    assert [r["messages"] for r in report["rounds"][1:]] == [3, 3, 3]
    assert accuracies(report)[-1] > accuracies(report)[0]
    refusals = (tmp_path / "run" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in refusals


def test_a_node_killed_in_flight_is_missing_and_tls_refuses_strangers(
    fleet_env: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    # Prepare: three honest nodes and a straggler that holds each training reply 20 s,
    # so that it is killed with its round-2 reply in flight; and two nodes the TLS
    # SuperLink must refuse: one trusting another CA, one without TLS.
    env, tag_var = fleet_env
    fleet = _fleet(tmp_path, env, tag_var)
    for p in HONEST:
        fleet.node(p)
    straggler = fleet.node(3, fault="delay:20", name="straggler")
    strangers = _fleet(tmp_path / "strangers", env, tag_var)  # TLS files of another CA,
    strangers.port = fleet.port  # dialling this SuperLink
    wrong_ca = strangers.node(4, name="wrong-ca")
    strangers.certs = None
    insecure = strangers.node(4, name="insecure")
    settings = ("--set", "train.min-fraction=0.5", "--set", "train.round-timeout=45")
    server = fleet.server(
        tmp_path / "run", "--rounds", "2", "--set", "train.min-nodes=4", *settings
    )

    # Execute: kill the straggler once round 1 is checkpointed: round 2 has begun and
    # its reply is at most 3 s into its 20 s delay.
    fleet.wait_for_checkpoint(tmp_path / "run", 1, timeout=200)
    Fleet.kill(straggler)

    # Assert: round 1 heard all four; round 2 asked four and got three, the run went on.
    assert fleet.wait(server, timeout=400) == 0, fleet.logs()
    first, second = fleet.report(tmp_path / "run")["rounds"][1:]
    assert (first["messages"], first["replies"], first["missing"]) == (4, 4, 0), first
    # The dead node's reply is either missing at the round timeout or an error reply
    # from the SuperLink once it has noticed the node is gone, whichever comes first.
    assert (second["messages"], second["replies"] - second["failures"]) == (4, 3), second
    assert second["missing"] + second["failures"] == 1 and second["skipped"] == 0, second
    # Four messages a round: neither stranger was ever a node of this SuperLink.
    for stranger in (wrong_ca, insecure):
        Fleet.kill(stranger)


def test_a_killed_server_resumes_and_matches_the_uninterrupted_run(
    fleet_env: tuple[dict[str, str], str],
    tmp_path: Path,
    clean_run: tuple[Fleet, dict[str, Any]],
) -> None:
    # Prepare: the clean run's setup; the server dies once round 2 is checkpointed.
    env, tag_var = fleet_env
    fleet = _fleet(tmp_path, env, tag_var)
    for p in HONEST:
        fleet.node(p)
    out = tmp_path / "run"
    server = fleet.server(out)
    fleet.wait_for_checkpoint(out, 2, timeout=250)
    Fleet.kill(server)
    killed = load_run_checkpoint(out)

    # Execute
    report = fleet.run(out, "--resume", str(out))

    # Assert
    _, reference = clean_run
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2, 3]
    assert abs(report["student"]["accuracy"] - reference["student"]["accuracy"]) <= 0.005
    # It resumed, not re-ran: the records of the checkpointed rounds (their wall times
    # included) are the killed run's, and the log says where it went on from.
    assert report["rounds"][: killed.round + 1] == killed.rounds
    log = (tmp_path / f"server-{out.name}.log").read_text()
    assert f"resuming {out} after round {killed.round}" in log


def test_robust_aggregation_holds_against_a_poisoned_and_a_nan_node(
    fleet_env: tuple[dict[str, str], str],
    tmp_path: Path,
    clean_run: tuple[Fleet, dict[str, Any]],
) -> None:
    # Prepare: one SuperLink for two runs; the three honest nodes, one scaling its
    # update by 1e6 and one sending NaN.
    env, tag_var = fleet_env
    fleet = _fleet(tmp_path, env, tag_var)
    fleet.superlink()
    for p in HONEST:
        fleet.node(p)
    fleet.node(3, fault="scale:1e6", name="poisoner")
    fleet.node(4, fault="nan", name="nan")
    shared = ["--superlink", fleet.address, "--set", "train.min-nodes=5"]

    # Execute
    robust = fleet.run(tmp_path / "median", *shared, "--set", "train.aggregation=median")
    default = fleet.run(tmp_path / "fedavg", *shared)

    # Assert: the median ignores the poisoner; FedAvg does not, but NaN never gets in.
    _, clean = clean_run
    # Within 2 points means no worse by more than 2: the median of four valid updates is
    # another estimate than the mean of three, and after 3 rounds it may well be ahead
    # (measured: +2.6 points).
    assert robust["student"]["accuracy"] >= clean["student"]["accuracy"] - 0.02
    rounds = robust["rounds"][1:]
    assert all((r["replies"], r["rejected"], r["skipped"]) == (5, 1, 0) for r in rounds), rounds
    # The default (FedAvg with the update-norm bound) clips the poisoner to three
    # median norms every round and rejects the NaN node; before the bound this run fell
    # to 0.12 against the clean run's 0.336.
    rounds = default["rounds"][1:]
    assert all((r["rejected"], r["clipped"]) == (1, 1) for r in rounds), rounds
    assert default["student"]["accuracy"] >= clean["student"]["accuracy"] - 0.02
