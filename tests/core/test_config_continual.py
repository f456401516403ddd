"""The continual section of the config: defaults in step with edgekd.continual, one-line errors."""

from __future__ import annotations

import pytest

from edgekd.continual.regularizers import REGULARIZERS
from edgekd.continual.streams import SCENARIOS
from edgekd.core.config import (
    CONTINUAL_METHODS,
    CONTINUAL_SCENARIOS,
    ConfigError,
    EdgeKDConfig,
)


def test_config_names_mirror_the_continual_package() -> None:
    assert set(CONTINUAL_METHODS) == set(REGULARIZERS)
    assert CONTINUAL_SCENARIOS == SCENARIOS
    assert EdgeKDConfig().continual.scenario == ""  # off unless asked for


def test_continual_keys_parse() -> None:
    cfg = EdgeKDConfig().with_overrides(
        {
            "continual.scenario": "domain-incremental",
            "continual.tasks": "4",
            "continual.rounds-per-task": "2",
            "continual.method": "all",
        }
    )
    assert (cfg.continual.scenario, cfg.continual.tasks) == ("domain-incremental", 4)
    assert (cfg.continual.rounds_per_task, cfg.continual.method) == (2, "all")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"continual.scenario": "task-incremental"}, "continual.scenario"),
        ({"continual.method": "si"}, "continual.method"),
        ({"continual.lr-decay": "linear"}, "continual.lr-decay must be one of"),
        ({"continual.tasks": 0}, "continual.tasks"),
        ({"continual.scenario": "class-incremental", "continual.tasks": 11}, "continual.tasks"),
        ({"continual.rounds-per-task": 0}, "continual.rounds-per-task"),
        ({"continual.weight": -1}, "continual.weight"),
        ({"continual.temperature": 0}, "continual.temperature"),
        ({"continual.proxy-size": 0}, "continual.proxy-size"),
        ({"continual.buffer-size": 0}, "continual.buffer-size"),
        ({"continual.scenario": "class-incremental", "data.dataset": "digits"}, "mnist1d"),
    ],
)
def test_bad_continual_values_raise_one_line_errors(
    overrides: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        EdgeKDConfig().with_overrides(overrides)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)
