"""Device classes of a heterogeneous federation: ``fleet.classes``.

``fleet.classes = "pi:0.5,jetson:0.5"`` splits the nodes into classes, each named by a
device profile (``pi`` and ``phone`` are short for ``raspberry-pi`` and ``android``),
each with its own student: the profile's default width (`DEFAULT_WIDTHS`) or the one
given as ``pi=12:0.5``. A simulated node's class comes from its partition id
(`node_class`: the first ``round(0.5 · N)`` partitions are ``pi``, the rest ``jetson``);
the server asks each node for it before round 1 (`edgekd.server.fleet_run`).

torch-free and flwr-free: the config reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgekd.core.errors import ConfigError

ALIASES = {"pi": "raspberry-pi", "phone": "android"}
# The student a class gets when its spec names no width: a Pi or a phone the default
# student's 16 channels (width 8 missed the Pi profile's INT8 parity gate on every seed
# tried: 3.5 to 5.5 % of top-1 answers flipped, 3 % allowed), a Jetson twice that.
DEFAULT_WIDTHS = {"raspberry-pi": 16, "android": 16, "jetson": 32}
ENSEMBLES = ("all", "larger")
# How simulated nodes of a fleet train: "torch", every class; "profile", each class on its
# profile's runtime (a Pi's onnxruntime or a phone's LiteRT step graphs, a Jetson's torch)
BACKENDS = ("torch", "profile")


@dataclass(frozen=True)
class FleetConfig:
    """A federation of device classes (`edgekd.server.fleet_run`); "" is one student."""

    # "" | "<profile>[=<width>]:<share>,...", e.g. "pi:0.5,jetson:0.5" or "pi=8:0.3,..."
    classes: str = ""
    # Whose soft targets each class distils toward after every round, on the public split
    # (edgekd.server.fleet_run), besides the teacher's: "all", every class's student, its
    # own included (FedDF's ensemble), or "larger", every other class at least as wide (a
    # small class learns from larger ones; the widest from the teacher alone). Chosen on
    # held-out seeds: docs/device-classes.md
    ensemble: str = "all"
    # Epochs of that server step a round, in the fleet and in its own-class comparator alike
    distill_epochs: int = 6
    # One of BACKENDS: what a simulated node trains with (a bundled node: its bundle's)
    backends: str = "torch"
    # The share of the widest class's current student in a narrower class's on-device soft
    # targets: the nodes distil toward (1 - w) * teacher logits + w * its logits, on their
    # own data (it learned the devices' domain, which the teacher did not). 0 is off.
    # Chosen on held-out seeds: docs/device-classes.md
    peer_weight: float = 1.0
    # The CE weight (kd.alpha's role) of those nodes' local loss while they distil toward
    # the peer; the KD term gets 1 - this. kd.alpha everywhere else (the own-class
    # comparator, the widest class, the server step). Chosen on held-out seeds:
    # docs/device-classes.md
    peer_alpha: float = 0.8
    # Whether a wider class's nodes also train every narrower class's student on their own
    # data in the fleet's pass (a Jetson can run a Pi's student; not the other way). The
    # own-class comparator has only its own nodes either way.
    train_narrower: bool = False


@dataclass(frozen=True)
class DeviceClass:
    name: str  # as written in the spec ("pi"), the key of its report block
    profile: str  # the shipped profile it stands for ("raspberry-pi")
    width: int  # its student's channel width
    share: float  # of the nodes


def parse_fleet_classes(spec: str) -> tuple[DeviceClass, ...]:
    """``"pi:0.5,jetson=24:0.5"`` -> the classes in order; ``""`` -> ``()`` (off).

    Raises:
        ConfigError: an unknown profile, a width or share that is not a number in range,
            a class named twice, fewer than two classes, or shares that do not add to 1.
    """
    out: list[DeviceClass] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, colon, share_text = item.rpartition(":")
        name, eq, width_text = head.partition("=")
        profile = ALIASES.get(name, name)
        share, given = _number(share_text), _number(width_text)
        width = DEFAULT_WIDTHS.get(profile, 0)
        if eq:
            whole = math.isfinite(given) and given >= 1 and given == int(given)
            width = int(given) if whole else 0
        if not colon or not 0.0 < share < 1.0:
            raise ConfigError(
                f"fleet.classes: '{item}' is not <profile>[=<width>]:<share in (0, 1)>"
            )
        if profile not in DEFAULT_WIDTHS:
            known = ", ".join([*ALIASES, *DEFAULT_WIDTHS])
            raise ConfigError(f"fleet.classes: unknown device class '{name}' (use {known})")
        if width < 1:
            raise ConfigError(f"fleet.classes: '{item}' needs a whole width >= 1 after '='")
        if name in (c.name for c in out):
            raise ConfigError(f"fleet.classes: class '{name}' is named twice")
        out.append(DeviceClass(name, profile, width, share))
    if spec.strip() and len(out) < 2:
        raise ConfigError(f"fleet.classes: '{spec}' names one class; a fleet needs two or more")
    if out and abs(sum(c.share for c in out) - 1.0) > 1e-6:
        raise ConfigError(f"fleet.classes: the shares of '{spec}' add up to "
                          f"{sum(c.share for c in out):.3g}, not 1")  # fmt: skip
    return tuple(out)


def node_class(spec: str, partition_id: int, num_partitions: int) -> DeviceClass:
    """The class of simulated partition ``partition_id``: partitions in order, the first
    ``round(s1 · N)`` to the first class, up to ``round((s1 + s2) · N)`` to the second..."""
    classes = parse_fleet_classes(spec)
    if not classes:
        raise ConfigError("fleet.classes is empty: this run has no device classes")
    end = 0.0
    for c in classes:
        end += c.share
        if partition_id < round(end * num_partitions):
            return c
    return classes[-1]


def check_fleet(flat: Mapping[str, Any]) -> None:
    """Refuse a bad ``fleet.*`` key, and what a fleet run does not combine with (yet),
    naming the key; ``flat`` is the config as `EdgeKDConfig.to_flat` gives it."""
    if flat["fleet.ensemble"] not in ENSEMBLES:
        raise ConfigError(
            f"fleet.ensemble must be one of {', '.join(ENSEMBLES)}, got '{flat['fleet.ensemble']}'"
        )
    if flat["fleet.distill-epochs"] < 0:
        raise ConfigError(f"fleet.distill-epochs must be >= 0, got {flat['fleet.distill-epochs']}")
    if not 0.0 <= flat["fleet.peer-weight"] <= 1.0:
        raise ConfigError(f"fleet.peer-weight must be in [0, 1], got {flat['fleet.peer-weight']}")
    if not 0.0 <= flat["fleet.peer-alpha"] <= 1.0:
        raise ConfigError(f"fleet.peer-alpha must be in [0, 1], got {flat['fleet.peer-alpha']}")
    if flat["fleet.backends"] not in BACKENDS:
        raise ConfigError(
            f"fleet.backends must be one of {', '.join(BACKENDS)}, got '{flat['fleet.backends']}'"
        )
    if not parse_fleet_classes(flat["fleet.classes"]):
        return
    for key in (
        "continual.scenario",
        "compression.prune",
        "compression.quantize",
        "compression.lowrank",
        "resume",
        "model.student-path",
    ):
        if flat[key]:
            raise ConfigError(f"fleet.classes does not combine with {key} (yet); unset one")
    if flat["client.backend"] != "torch":
        raise ConfigError(
            "fleet.classes does not combine with a client.backend other than torch; "
            "fleet.backends = profile trains each class on its profile's runtime"
        )
    if flat["fleet.peer-weight"] and flat["kd.soft-targets"] != "on-device":
        raise ConfigError(
            "fleet.peer-weight blends the widest class's student into the nodes' on-device "
            "soft targets: it needs kd.soft-targets = on-device (or fleet.peer-weight = 0)"
        )
    if flat["fleet.backends"] == "profile" and flat["kd.hint-weight"]:
        raise ConfigError(
            "fleet.backends = profile: kd.hint-weight needs the torch teacher on every node; "
            "set it to 0"
        )


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")
