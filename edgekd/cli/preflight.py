"""What every command checks before it starts anything: the config (defaults, then a
TOML file, then ``--set`` and flags), the data it names and the checkpoints it loads.

`edgekd simulate` (`edgekd.cli.main`) and `edgekd server start` (`edgekd.cli.fleet`) both call
these, so a bad key, a missing data file or a teacher of another architecture fails in a
second with one line, before Ray or a SuperLink starts.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from edgekd.core.config import EdgeKDConfig, parse_partition
from edgekd.core.errors import ConfigError, EdgeKDError

__all__ = ["UsageError", "build_config", "continual_preflight", "preflight"]


class UsageError(EdgeKDError):
    """A problem with the user's input, reported as one line."""


def build_config(
    config_file: str | None,
    sets: list[str] | None,
    flags: dict[str, Any],
    base: EdgeKDConfig | None = None,
) -> EdgeKDConfig:
    """``base`` (the defaults) ← ``--config FILE`` ← ``--set key=value`` ← named flags."""
    cfg = base or EdgeKDConfig()
    if config_file:
        path = Path(config_file)
        try:
            cfg = cfg.with_overrides(tomllib.loads(path.read_text()))
        except FileNotFoundError:
            raise UsageError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    overrides: dict[str, Any] = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set expects key=value, got '{item}'")
        overrides[key.strip()] = value.strip().strip("\"'")
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return cfg.with_overrides(overrides)


def preflight(cfg: EdgeKDConfig, num_clients: int | None = None) -> None:
    """Fail before Ray starts: load the data (and warm the cache the clients read), check
    that ``num_clients`` simulated nodes can split its device pool and that a given
    teacher checkpoint fits the dataset."""
    from edgekd.core.data import check_partition_count, load_federated_data
    from edgekd.core.data_files import DataFileError
    from edgekd.learn.models import CheckpointError, load_checkpoint, spec_for

    try:
        data = load_federated_data(cfg.data, cfg.seed)
        if num_clients is not None:
            check_partition_count(num_clients, len(data.pool))
    except (DataFileError, ConfigError) as exc:
        raise UsageError(str(exc)) from None
    for path, width in (
        (cfg.model.teacher_path, cfg.model.teacher_width),
        (cfg.model.student_path, cfg.model.student_width),
    ):
        if path:
            try:
                load_checkpoint(path, expected=spec_for(data.input_shape, data.num_classes, width))
            except CheckpointError as exc:
                raise UsageError(str(exc)) from None


def continual_preflight(cfg: EdgeKDConfig, num_clients: int | None = None) -> None:
    """Fail before Ray starts: build both streams (warming the caches the clients read),
    check that ``num_clients`` nodes can split every task and that a given teacher
    checkpoint fits them."""
    from edgekd.continual.scenario import client_stream, server_stream
    from edgekd.core.data import check_partition_count
    from edgekd.learn.models import CheckpointError, load_checkpoint, spec_for

    stream = client_stream(cfg)
    server_stream(cfg)
    kind, arg = parse_partition(cfg.data.partition)
    fewest = min(len(task.classes) for task in stream)
    if kind == "pathological" and int(arg) > fewest:
        raise UsageError(
            f"data.partition {cfg.data.partition!r} gives each node {int(arg)} classes of a "
            f"task, but a task of this stream holds {fewest}; use pathological:<k> with "
            f"k <= {fewest}, or dirichlet:<alpha>"
        )
    if num_clients is not None:
        try:
            smallest = min(len(t.y_train) for t in stream)
            check_partition_count(
                num_clients, smallest, "a task's training split", "continual.samples-per-task"
            )
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    if cfg.model.teacher_path:
        expected = spec_for(stream.input_shape, stream.num_classes, cfg.model.teacher_width)
        try:
            load_checkpoint(cfg.model.teacher_path, expected=expected)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None
