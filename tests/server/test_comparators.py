"""The --baseline comparators: tuned on the pooled validation shares (never on the
devices' test split), with the federation's budget, and the gap arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import client_split, load_federated_data, pooled_client_splits
from edgekd.learn.models import build_model, spec_for
from edgekd.learn.training import seed_everything
from edgekd.server import comparators
from edgekd.server.comparators import (
    DEFAULT_AUGMENT,
    SERVER_ONLY_LRS,
    accuracy,
    centralised_ceiling,
    gap_closed,
    tuned_server_only,
)
from edgekd.server.teacher import obtain_teacher, public_soft_targets


def test_gap_closed_is_the_share_of_the_gap() -> None:
    assert gap_closed(0.90, 0.86, 0.94) == pytest.approx(0.5)
    assert gap_closed(0.84, 0.86, 0.94) == pytest.approx(-0.25)  # worse than server-only
    assert gap_closed(0.90, 0.86, 0.86) is None  # no gap to close


def test_pooled_splits_are_the_clients_shares_exactly(small_config: EdgeKDConfig) -> None:
    # Prepare
    cfg = small_config
    data = load_federated_data(cfg.data, cfg.seed)
    # Execute
    train, val = pooled_client_splits(data, cfg.data.partition, 4, cfg.seed, 0.1)
    # Assert: the union of the four clients' shares, nothing lost or repeated
    shares = [client_split(data, cfg.data.partition, p, 4, cfg.seed, 0.1) for p in range(4)]
    assert len(train) == sum(len(t) for t, _ in shares)
    assert len(val) == sum(len(v) for _, v in shares)
    assert len(train) + len(val) == len(data.pool)
    assert np.array_equal(val.x[: len(shares[0][1])], shares[0][1].x)
    assert 0.08 < len(val) / len(data.pool) < 0.12


def test_comparators_pick_their_best_validation_candidate(
    small_config: EdgeKDConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a small teacher and student, and a validation split the test never sees
    cfg = small_config
    data = load_federated_data(cfg.data, cfg.seed)
    teacher = obtain_teacher(cfg, data, spec_for(data.input_shape, data.num_classes, 16))
    probs = public_soft_targets(teacher, data, cfg.kd.temperature)
    seed_everything(cfg.seed)
    init = build_model(spec_for(data.input_shape, data.num_classes, 8))
    train, val = pooled_client_splits(data, cfg.data.partition, 4, cfg.seed, 0.1)
    seen: list[int] = []
    real_accuracy = comparators.accuracy
    monkeypatch.setattr(
        comparators, "accuracy", lambda m, split: seen.append(len(split)) or real_accuracy(m, split)
    )
    # Execute
    server_only = tuned_server_only(cfg, data, init, teacher, probs, val, epochs=2)
    ceiling = centralised_ceiling(cfg, data, init, teacher, train, val)
    # Assert: the full grid, scored on val only, the best one kept
    grid = [(c["lr"], c["augment"]) for c in server_only.candidates]
    assert grid == [(lr, a) for lr in SERVER_ONLY_LRS for a in ("", DEFAULT_AUGMENT)]
    assert [c["augment"] for c in ceiling.candidates] == ["", DEFAULT_AUGMENT]
    assert set(seen) == {len(val)}
    for tuned in (server_only, ceiling):
        best = max(tuned.candidates, key=lambda c: c["val_accuracy"])
        assert tuned.chosen.items() <= best.items()
        assert real_accuracy(tuned.model, val) == best["val_accuracy"]
    assert ceiling.chosen["epochs"] == cfg.train.num_rounds * cfg.train.local_epochs
    assert ceiling.chosen["schedule"] == "cosine"
    assert accuracy(ceiling.model, data.test) > 0.2  # it learned something
