"""Config parsing: defaults, overrides, and one-line errors that name the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from edgekd.core.config import ConfigError, EdgeKDConfig, flat_defaults, parse_partition

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_defaults_equal_dataclass_defaults() -> None:
    # Prepare
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]

    # Execute
    parsed = EdgeKDConfig.from_run_config(app_config)

    # Assert
    assert parsed == EdgeKDConfig()
    assert set(EdgeKDConfig().to_flat()) == set(flat_defaults())
    # `flwr run` refuses a run config with a key the app does not declare ("Invalid run
    # configuration"), so every config key must be declared here, not only differ from none.
    assert set(_flat(app_config)) == set(flat_defaults())


def _flat(table: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_string_overrides_are_parsed_by_type() -> None:
    cfg = EdgeKDConfig().with_overrides(
        {"kd.temperature": "3.5", "train.num-rounds": "7", "kd.class-weighting": "false"}
    )
    assert cfg.kd.temperature == 3.5
    assert cfg.train.num_rounds == 7
    assert cfg.kd.class_weighting is False


def test_nested_tables_are_flattened() -> None:
    cfg = EdgeKDConfig().with_overrides({"kd": {"alpha": 0.25}, "data": {"num_samples": 500}})
    assert cfg.kd.alpha == 0.25
    assert cfg.data.num_samples == 500


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"kd.temprature": 2}, "unknown config key 'kd.temprature'"),
        ({"data.dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"train.num-rounds": "many"}, "cannot read 'many' as int"),
        ({"kd.alpha": 1.5}, "kd.alpha"),
        ({"data.partition": "dirichlet:0"}, "alpha > 0"),
        ({"kd.soft-targets": "cloud"}, "kd.soft-targets"),
    ],
)
def test_bad_values_raise_one_line_errors(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        EdgeKDConfig().with_overrides(overrides)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", ("iid", 0.0)),
        ("dirichlet:0.1", ("dirichlet", 0.1)),
        ("pathological:2", ("pathological", 2.0)),
    ],
)
def test_parse_partition(spec: str, expected: tuple[str, float]) -> None:
    assert parse_partition(spec) == expected


@pytest.mark.parametrize("spec", ["dirichlet", "dirichlet:-1", "pathological:1.5", "shards:3"])
def test_parse_partition_rejects(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_partition(spec)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("fedavg", ("fedavg", 0.0)),
        ("median", ("median", 0.0)),
        ("trimmed-mean:0.1", ("trimmed-mean", 0.1)),
    ],
)
def test_parse_aggregation(spec: str, expected: tuple[str, float]) -> None:
    from edgekd.core.config import parse_aggregation

    assert parse_aggregation(spec) == expected


@pytest.mark.parametrize("spec", ["mean", "trimmed-mean:0.5", "median:2", "trimmed-mean:x"])
def test_bad_aggregation_names_the_key(spec: str) -> None:
    with pytest.raises(ConfigError, match="train.aggregation"):
        EdgeKDConfig().with_overrides({"train.aggregation": spec})


def test_every_shipped_recipe_loads_and_validates() -> None:
    # configs/*.toml are documented recipes; a renamed or mistyped key must fail here
    from edgekd.cli.preflight import build_config

    recipes = sorted((ROOT / "configs").glob("*.toml"))
    assert recipes, "configs/ holds the documented recipes"
    for path in recipes:
        cfg = build_config(str(path), None, {})
        cfg.validate()
        assert cfg != EdgeKDConfig(), f"{path.name} changes nothing"
    adapted = build_config(str(ROOT / "configs" / "device-adapted.toml"), None, {})
    assert adapted.kd.trust == "correct" and adapted.train.server_momentum == 0.5


def test_client_backend_parses_and_places_mixed_nodes() -> None:
    from edgekd.core.config import node_backend, parse_client_backend

    assert parse_client_backend("litert") == ("litert", 0.0)
    assert parse_client_backend("mixed:0.25") == ("mixed", 0.25)
    assert [node_backend("mixed:0.5", pid, 4) for pid in range(4)] == [
        "onnxruntime", "onnxruntime", "torch", "torch",
    ]  # fmt: skip
    assert node_backend("onnxruntime", 3, 4) == "onnxruntime"
    for bad in ("tflite", "mixed", "mixed:1.5", "torch:1"):
        with pytest.raises(ConfigError, match="client.backend: cannot read"):
            parse_client_backend(bad)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"compression.quantize": "int8"}, "compression.quantize (QAT) needs"),
        ({"kd.hint-weight": 0.5}, "kd.hint-weight needs the torch teacher"),
        ({"continual.scenario": "class-incremental"}, "continual runs train on torch nodes"),
    ],
)
def test_graph_backends_refuse_what_only_torch_nodes_do(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        EdgeKDConfig().with_overrides({"client.backend": "onnxruntime", **overrides})
