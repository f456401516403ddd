"""Compression recipes: schedule, server-side pruner, rebuilt architectures, QAT views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.core.config import CompressionConfig, ConfigError, EdgeKDConfig
from edgekd.learn.compression import (
    WARM_PRUNE_STEPS,
    CompressionSchedule,
    Pruner,
    finalize,
    plain_state,
    structural_compress,
    training_view,
)
from edgekd.learn.models import build_model, count_params, load_for_state, spec_for
from edgekd.learn.pruning import prunable_parameters

SPEC = spec_for((1, 40), 10, 8)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(SPEC)


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_schedule_reaches_the_final_sparsity_at_end_round_and_qat_starts_there() -> None:
    # Prepare
    schedule = CompressionSchedule.from_config(
        CompressionConfig(prune="magnitude:0.8", quantize="int8", start_round=2, end_round=5)
    )

    # Execute
    sparsity = [schedule.sparsity_for(r) for r in range(1, 8)]
    qat = [schedule.qat_for(r) for r in range(1, 8)]

    # Assert: nothing before start, s_t = s_f(1 - (1 - (t-1)/4)^3) during, s_f after
    assert sparsity[0] == 0.0
    assert sparsity[1] == pytest.approx(0.8 * (1 - 0.75**3))
    assert sparsity[3] == pytest.approx(0.8 * (1 - 0.25**3))
    assert sparsity[4:] == [pytest.approx(0.8)] * 3
    assert sparsity == sorted(sparsity)
    assert qat == ["", "", "", "", "int8", "int8", "int8"]
    assert schedule.int8_wire and schedule.bits == 8


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("compression.prune", "magnitude:1.5", "compression.prune"),
        ("compression.prune", "random:0.5", "compression.prune"),
        ("compression.lowrank", "rank:2.5", "compression.lowrank"),
        ("compression.quantize", "int4", "compression.quantize"),
        ("compression.upload", "zip", "compression.upload"),
        ("compression.download", "diff", "compression.download"),
        ("compression.entropy", "xz", "compression.entropy"),
        ("compression.start-round", -1, "start-round must be >= 0"),
        ("compression.end-round", -1, "end-round"),
    ],
)
def test_bad_recipes_are_refused_naming_the_key(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        EdgeKDConfig().with_overrides({key: value})


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"compression.download": "delta"}, "needs compression.quantize"),
        ({"compression.start-round": 0, "compression.prune": "filter:0.5"}, "warm start"),
        ({"compression.start-round": 0}, "warm start"),
    ],
)
def test_recipes_whose_parts_do_not_fit_are_refused(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        EdgeKDConfig().with_overrides(overrides)


def test_start_round_zero_prunes_in_the_warm_start_and_every_round_at_the_final() -> None:
    # Prepare
    schedule = CompressionSchedule.from_config(
        CompressionConfig(prune="magnitude:0.8", quantize="int8", start_round=0, end_round=3)
    )

    # Execute
    warm = [schedule.warm_start_sparsity(step) for step in range(1, WARM_PRUNE_STEPS + 1)]
    rounds = [schedule.sparsity_for(r) for r in range(1, 6)]

    # Assert: the cubic schedule over the server's steps, s_f in every round
    assert schedule.prunes_in_warm_start
    assert warm[0] == pytest.approx(0.8 * (1 - (1 - 1 / WARM_PRUNE_STEPS) ** 3))
    assert warm == sorted(warm) and warm[-1] == pytest.approx(0.8)
    assert rounds == [pytest.approx(0.8)] * 5
    assert [schedule.qat_for(r) for r in range(1, 6)] == ["", "", "int8", "int8", "int8"]


@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_pruner_never_unprunes_and_zeroes_the_model(method: str) -> None:
    # Prepare
    schedule = CompressionSchedule(prune_method=method, prune_amount=0.9, end_round=4)
    pruner, model = Pruner(schedule), _model()

    # Execute: the global student moves between rounds, as after aggregation
    history = []
    for server_round in range(1, 6):
        with torch.no_grad():
            for w in prunable_parameters(model).values():
                w.add_(0.05 * torch.randn_like(w))
        masks = pruner.step(server_round, model)
        if not masks:  # movement: nothing has moved before round 1
            continue
        for name, w in prunable_parameters(model).items():
            assert torch.all(w[~torch.from_numpy(masks[name])] == 0)
        history.append(masks)

    # Assert
    assert pruner.sparsity == pytest.approx(0.9, abs=1e-3)
    for earlier, later in zip(history, history[1:], strict=False):
        for name in earlier:
            assert not np.any(later[name] & ~earlier[name])  # kept set only shrinks


def test_structural_compression_is_rebuilt_from_the_state_alone() -> None:
    # Prepare
    model = _model()
    schedule = CompressionSchedule(
        prune_method="filter", prune_amount=0.5, lowrank_kind="rank", lowrank_value=2
    )
    x = torch.randn(5, 1, 40)

    # Execute
    small, info = structural_compress(model, schedule)
    rebuilt = load_for_state(SPEC, _state(small))

    # Assert: fewer parameters, same module tree and outputs after a rebuild
    assert count_params(small) < count_params(model) / 2
    assert info["filter_ratio"] == 0.5 and "head" in info["lowrank"]
    assert list(rebuilt.state_dict()) == list(small.state_dict())
    small.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), small(x))


@pytest.mark.parametrize("quantizer", ["int8", "ternary"])
def test_training_views_keep_the_plain_state_names(quantizer: str) -> None:
    # Prepare
    base = _model()
    names = list(base.state_dict())

    # Execute
    view = training_view(base, quantizer)
    out = view(torch.randn(4, 1, 40))
    out.sum().backward()
    state = plain_state(view, names)

    # Assert
    assert list(state) == names
    assert all(isinstance(v, np.ndarray) for v in state.values())
    if quantizer == "ternary":  # the forward weight takes three values per layer
        assert len(torch.unique(view.head.weight.detach())) <= 3


def test_finalize_ternarizes_and_keeps_masks() -> None:
    # Prepare
    model = _model()
    masks = {"head.weight": np.random.default_rng(0).random((10, 80)) > 0.5}

    # Execute
    finalize(model, CompressionSchedule(quantize="ternary"), masks)

    # Assert
    for w in prunable_parameters(model).values():
        assert len(torch.unique(w.detach())) <= 3
    assert torch.all(model.head.weight.detach()[~torch.from_numpy(masks["head.weight"])] == 0)


def test_movement_pruning_waits_until_the_weights_have_moved() -> None:
    # Prepare: schedule from round 1; in round 1 nothing has moved since W0
    schedule = CompressionSchedule(prune_method="movement", prune_amount=0.8, end_round=3)
    pruner, model = Pruner(schedule), _model()

    # Execute
    first = pruner.step(1, model)
    with torch.no_grad():
        for w in prunable_parameters(model).values():
            w.add_(0.01 * torch.randn_like(w))
    second = pruner.step(2, model)

    # Assert: no masks from all-zero scores, then every layer keeps some weights
    assert first == {}
    assert second and all(m.any() for m in second.values())
