"""`fleet.classes`: parsing, the class of each simulated node, what it refuses."""

from __future__ import annotations

import pytest

from edgekd.core.config import ConfigError, EdgeKDConfig
from edgekd.core.fleet import DeviceClass, node_class, parse_fleet_classes


def test_classes_read_aliases_default_widths_and_given_widths() -> None:
    assert parse_fleet_classes("pi:0.5,jetson:0.5") == (
        DeviceClass("pi", "raspberry-pi", 16, 0.5),
        DeviceClass("jetson", "jetson", 32, 0.5),
    )
    classes = parse_fleet_classes("pi=12:0.3, phone:0.3, jetson=24:0.4")
    assert [(c.name, c.profile, c.width) for c in classes] == [
        ("pi", "raspberry-pi", 12),
        ("phone", "android", 16),
        ("jetson", "jetson", 24),
    ]
    assert parse_fleet_classes("") == ()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pi:0.5", "names one class"),
        ("pi:0.5,toaster:0.5", "unknown device class 'toaster'"),
        ("pi=x:0.5,jetson:0.5", "whole width"),
        ("pi=8.5:0.5,jetson:0.5", "whole width"),
        ("pi=0:0.5,jetson:0.5", "whole width"),
        ("pi=inf:0.5,jetson:0.5", "whole width"),
        ("pi:0.6,jetson:0.6", "add up to 1.2, not 1"),
        ("pi:0.5,pi:0.5", "named twice"),
        ("pi,jetson", "is not <profile>"),
        ("pi:1.0,jetson:0", "is not <profile>"),
        ("pi:nan,jetson:0.5", "is not <profile>"),
    ],
)
def test_a_malformed_class_list_is_refused_naming_the_item(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match="fleet.classes") as info:
        EdgeKDConfig().with_overrides({"fleet.classes": spec})
    assert message in str(info.value)


def test_partitions_are_dealt_to_classes_in_order_by_share() -> None:
    spec = "pi:0.3,phone:0.3,jetson:0.4"
    names = [node_class(spec, pid, 10).name for pid in range(10)]
    assert names == ["pi"] * 3 + ["phone"] * 3 + ["jetson"] * 4
    # Rounded shares never leave a partition without a class.
    assert [node_class("pi:0.5,jetson:0.5", pid, 3).name for pid in range(3)] == [
        "pi",
        "pi",
        "jetson",
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("continual.scenario", "class-incremental"),
        ("compression.prune", "magnitude:0.5"),
        ("compression.lowrank", "rank:2"),
        ("client.backend", "onnxruntime"),
    ],
)
def test_a_fleet_refuses_what_it_does_not_combine_with(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"fleet.classes .*{key.split('.')[0]}"):
        EdgeKDConfig().with_overrides({"fleet.classes": "pi:0.5,jetson:0.5", key: value})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fleet.ensemble", "everyone", "fleet.ensemble must be one of all, larger"),
        ("fleet.distill-epochs", -1, "fleet.distill-epochs must be >= 0"),
        ("fleet.backends", "onnx", "fleet.backends must be one of torch, profile"),
        ("fleet.peer-weight", 1.5, r"fleet.peer-weight must be in \[0, 1\]"),
        ("fleet.peer-alpha", -0.1, r"fleet.peer-alpha must be in \[0, 1\]"),
    ],
)
def test_the_server_step_settings_are_checked(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EdgeKDConfig().with_overrides({key: value})


def test_profile_backends_refuse_a_hint_loss_the_graphs_cannot_compute() -> None:
    fleet = {"fleet.classes": "pi:0.5,jetson:0.5", "fleet.backends": "profile"}
    assert EdgeKDConfig().with_overrides(fleet).fleet.backends == "profile"
    with pytest.raises(ConfigError, match="fleet.backends = profile: kd.hint-weight"):
        EdgeKDConfig().with_overrides({**fleet, "kd.hint-weight": 0.5})


def test_peer_targets_need_on_device_soft_targets() -> None:
    fleet = {"fleet.classes": "pi:0.5,jetson:0.5", "kd.soft-targets": "proxy"}
    with pytest.raises(ConfigError, match="fleet.peer-weight .* kd.soft-targets = on-device"):
        EdgeKDConfig().with_overrides(fleet)
    assert EdgeKDConfig().with_overrides({**fleet, "fleet.peer-weight": 0}).fleet.peer_weight == 0
