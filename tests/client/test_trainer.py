"""Local KD update and the on-device ONNX teacher, without Flower."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from edgekd.client.teacher_cache import TeacherMissingError, teacher_logits, teacher_session
from edgekd.client.trainer import RoundSettings, evaluate_state, local_kd_update
from edgekd.core.data import ArrayDataset
from edgekd.core.numerics import softmax
from edgekd.deploy.onnx_export import export_onnx_bytes
from edgekd.learn.models import build_model, model_state, spec_for
from edgekd.learn.training import predict_logits

SPEC = spec_for((1, 40), 10, 4)


def _settings(**kw: object) -> RoundSettings:
    base = dict(
        mode="kd",
        local_epochs=3,
        lr=3e-3,
        optimizer="adam",
        batch_size=16,
        clip_norm=2.0,
        temperature=4.0,
        alpha=0.5,
        class_weighting=True,
        max_class_weight=5.0,
        reference_batch=16,
        seed=0,
    )
    base.update(kw)
    return RoundSettings(**base)  # type: ignore[arg-type]


def _data(n: int = 200) -> ArrayDataset:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=n)
    x = rng.normal(size=(n, 1, 40)).astype(np.float32) + y[:, None, None].astype(np.float32) / 3
    return ArrayDataset(x, y.astype(np.int64))


def test_local_kd_update_moves_toward_the_teacher() -> None:
    # Prepare
    torch.manual_seed(0)
    teacher = build_model(spec_for((1, 40), 10, 8))
    data = _data()
    logits = predict_logits(teacher, data.x)
    state = model_state(build_model(SPEC))
    t_probs = softmax(logits)

    def kl(s: dict[str, np.ndarray]) -> float:
        from edgekd.learn.models import load_for_state as load_state

        p = softmax(predict_logits(load_state(SPEC, s), data.x))
        return float((t_probs * (np.log(t_probs) - np.log(p))).sum(1).mean())

    # Execute
    new_state, metrics = local_kd_update(
        SPEC, state, data, _settings(alpha=0.0), teacher_logits=logits
    )

    # Assert
    assert np.isfinite(metrics["train-loss"])
    assert kl(new_state) < 0.5 * kl(state)
    assert set(new_state) == set(state)


def test_temperature_follows_the_batch_size() -> None:
    data = _data(64)
    _, metrics = local_kd_update(
        SPEC,
        model_state(build_model(SPEC)),
        data,
        _settings(batch_size=1, local_epochs=1),
        teacher_logits=np.zeros((64, 10), dtype=np.float32),
    )
    assert metrics["temperature"] == pytest.approx(4.0 * 16**0.25)


def test_ce_mode_and_proxy_mode_learn_the_labels() -> None:
    data = _data(300)
    state = model_state(build_model(SPEC))
    before = evaluate_state(SPEC, state, data)["accuracy"]
    ce_state, _ = local_kd_update(
        SPEC, state, data, _settings(mode="ce", local_epochs=5), teacher_logits=None
    )
    probs = np.eye(10, dtype=np.float32)[data.y] * 0.9 + 0.01
    px_state, _ = local_kd_update(
        SPEC, state, data, _settings(local_epochs=5), teacher_logits=None, proxy=(data.x, probs)
    )
    assert evaluate_state(SPEC, ce_state, data)["accuracy"] > before + 0.2
    assert evaluate_state(SPEC, px_state, data)["accuracy"] > before + 0.2


def test_onnx_teacher_is_cached_by_hash_and_matches_torch(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path))
    teacher = build_model(SPEC)
    blob = export_onnx_bytes(teacher, (1, 40))
    digest = hashlib.sha256(blob).hexdigest()
    x = _data(8).x

    # Execute
    session = teacher_session(digest, blob)

    # Assert
    np.testing.assert_allclose(teacher_logits(session, x), predict_logits(teacher, x), atol=1e-4)
    assert (tmp_path / "teachers" / f"{digest}.onnx").read_bytes() == blob
    with pytest.raises(ValueError, match="hash"):
        teacher_session("0" * 64, blob)
    with pytest.raises(TeacherMissingError):
        teacher_session("1" * 64, None)


def test_a_peer_student_is_blended_into_the_teachers_logits(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a teacher and a wider peer, both as the server sends them (xz ONNX).
    import lzma

    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from edgekd.client.teacher_cache import round_teacher_logits
    from edgekd.core import records as R

    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    teacher, peer = build_model(SPEC), build_model(spec_for((1, 40), 10, 8))
    onnx = {name: export_onnx_bytes(m, (1, 40)) for name, m in (("t", teacher), ("p", peer))}

    def record(blob: bytes) -> ArrayRecord:
        return ArrayRecord({R.TEACHER_ONNX: Array(np.frombuffer(lzma.compress(blob), np.uint8))})

    x = _data(8).x
    config = ConfigRecord(
        {R.TEACHER_HASH: hashlib.sha256(onnx["t"]).hexdigest(), R.PEER_WEIGHT: 0.25}
    )
    alone = RecordDict({R.TEACHER: record(onnx["t"])})
    both = RecordDict({R.TEACHER: record(onnx["t"]), R.PEER: record(onnx["p"])})

    # Execute
    plain, blended = round_teacher_logits(alone, config, x), round_teacher_logits(both, config, x)

    # Assert
    t, p = predict_logits(teacher, x), predict_logits(peer, x)
    np.testing.assert_allclose(plain, t, atol=1e-4)
    np.testing.assert_allclose(blended, 0.75 * t + 0.25 * p, atol=1e-4)
    assert not np.allclose(blended, t, atol=1e-2)
    config[R.PEER_WEIGHT] = 1.0
    np.testing.assert_allclose(round_teacher_logits(both, config, x), p, atol=1e-4)
    config[R.PEER_WEIGHT] = 1.5
    with pytest.raises(ValueError, match="fleet.peer-weight must be in"):
        round_teacher_logits(both, config, x)


@pytest.mark.parametrize("quantizer", ["", "int8", "ternary"])
def test_masked_local_update_keeps_pruned_weights_at_zero(quantizer: str) -> None:
    # Prepare
    torch.manual_seed(0)
    state = model_state(build_model(SPEC))
    rng = np.random.default_rng(1)
    masks = {"head.weight": rng.random(state["head.weight"].shape) > 0.8}
    state["head.weight"][~masks["head.weight"]] = 0.0

    # Execute
    new, _ = local_kd_update(
        SPEC,
        state,
        _data(),
        _settings(mode="ce"),
        teacher_logits=None,
        masks=masks,
        quantizer=quantizer,
    )

    # Assert
    assert list(new) == list(state)
    assert np.all(new["head.weight"][~masks["head.weight"]] == 0.0)
    assert not np.allclose(new["head.weight"], state["head.weight"])
