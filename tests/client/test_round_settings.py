"""One round-settings object for every kind of node: the batch, the temperature coupled
to it and the seed mean the same on torch, onnxruntime and LiteRT nodes, and proxy-mode
soft targets are softened at the node's own temperature."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.core import records as R
from edgekd.core.numerics import softmax
from edgekd.core.round_settings import RoundSettings, round_seed, temperature_for_batch

CONFIG = {
    R.MODE: "kd", R.LOCAL_EPOCHS: 1, R.LR: 0.01, R.OPTIMIZER: "adam", R.BATCH_SIZE: 32,
    R.CLIP_NORM: 2.0, R.TEMPERATURE: 4.0, R.ALPHA: 0.8, R.CLASS_WEIGHTING: True,
    R.MAX_CLASS_WEIGHT: 5.0, R.REFERENCE_BATCH: 32, R.SEED: 7, R.ROUND: 3,
}  # fmt: skip


def test_the_batch_is_the_nodes_then_the_runtimes_then_the_servers() -> None:
    own = RoundSettings.from_round(CONFIG, {R.NODE_BATCH_SIZE: 8}, runtime_batch=16)
    static = RoundSettings.from_round(CONFIG, {}, runtime_batch=16)
    plain = RoundSettings.from_round(CONFIG, {})

    assert (own.batch_size, static.batch_size, plain.batch_size) == (8, 16, 32)
    assert own.effective_temperature() == pytest.approx(4.0 * (32 / 8) ** 0.25)
    assert plain.effective_temperature() == 4.0


def test_the_seed_differs_per_partition_and_round() -> None:
    seeds = {
        RoundSettings.from_round({**CONFIG, R.ROUND: rnd}, {R.PARTITION_ID: pid}).seed
        for rnd in (1, 2)
        for pid in (0, 1, 2)
    }
    assert len(seeds) == 6
    assert RoundSettings.from_round(CONFIG, {R.PARTITION_ID: 2}).seed == round_seed(7, 3, 2)


def test_proxy_targets_are_softened_at_the_nodes_temperature(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A torch node with batch 8 distils the proxy set at T(8), not the server's T0."""
    import edgekd.client.trainer as trainer
    from edgekd.core.data import ArrayDataset
    from edgekd.learn.models import build_model, spec_for

    # Prepare: capture the targets of every kd_train call.
    seen: list[np.ndarray | None] = []

    def capture(model, x, y, probs, settings, **kw):  # type: ignore[no-untyped-def]
        seen.append(probs)
        return {"loss": 0.0}

    monkeypatch.setattr(trainer, "kd_train", capture)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 10)).astype(np.float32) * 5
    px = rng.random((16, 1, 40), dtype=np.float32)
    train = ArrayDataset(rng.random((20, 1, 40), dtype=np.float32), np.arange(20) % 10)
    settings = RoundSettings.from_round(CONFIG, {R.NODE_BATCH_SIZE: 8})
    spec = spec_for((1, 40), 10, 4)
    state = {k: v.numpy() for k, v in build_model(spec).state_dict().items()}

    # Execute
    trainer.local_kd_update(spec, state, train, settings, teacher_logits=None, proxy=(px, logits))

    # Assert: the local CE epoch has no targets; the proxy epoch softmax(z / T(8)).
    proxy_targets = [p for p in seen if p is not None]
    assert proxy_targets, seen
    expected = softmax(logits, temperature_for_batch(4.0, 32, 8))
    np.testing.assert_allclose(proxy_targets[0], expected, rtol=1e-6)
    assert not np.allclose(proxy_targets[0], softmax(logits, 4.0))
