"""INT8 static QDQ quantization of an ONNX student with onnxruntime."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekd.deploy.onnx_export import export_onnx_bytes
from edgekd.deploy.parity import avx2_emulator, emulated_avx2_predictor, onnx_predictor
from edgekd.deploy.quantize import (
    SATURATION_FREE_WEIGHT_CODE,
    QuantizationError,
    max_weight_code,
    quantize_onnx_int8,
    static_qdq,
)
from edgekd.learn.models import build_model, spec_for
from edgekd.learn.training import KDSettings, kd_train


def test_int8_qdq_model_agrees_with_fp32() -> None:
    # Prepare: a small trained student, so the logits have a clear argmax.
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=600)
    x = (rng.normal(size=(600, 1, 40)) + y[:, None, None] / 2).astype(np.float32)
    model = build_model(spec_for((1, 40), 10, 8))
    kd_train(
        model, x, y, None, KDSettings(epochs=5, lr=3e-3, batch_size=32), num_classes=10, seed=0
    )
    fp32 = export_onnx_bytes(model, (1, 40))

    # Execute
    int8 = quantize_onnx_int8(fp32, x[:200])

    # Assert
    ops = {node.op_type for node in onnx.load_from_string(int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    z32 = ort.InferenceSession(fp32).run(None, {"x": x})[0]
    z8 = ort.InferenceSession(int8).run(None, {"x": x})[0]
    # Synthetic data leaves many near-ties, so top-1 agreement is looser than on mnist1d
    # (where the default run's INT8 student is within 0.1 point of FP32).
    assert (z32.argmax(1) == z8.argmax(1)).mean() > 0.85
    assert abs((z32.argmax(1) == y).mean() - (z8.argmax(1) == y).mean()) < 0.03
    assert np.abs(z32 - z8).max() < 0.5 * np.abs(z32).max()


def test_int8_weight_twin_rounds_each_channel_to_int8_levels() -> None:
    from edgekd.deploy.quantize import int8_weight_fake_quant

    torch.manual_seed(1)
    model = build_model(spec_for((1, 40), 10, 8))
    twin = int8_weight_fake_quant(model)
    for (name, w), w8 in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        if not name.endswith("weight"):
            assert torch.equal(w, w8)  # biases stay float
            continue
        flat, flat8 = w.reshape(w.shape[0], -1), w8.reshape(w.shape[0], -1)
        scale = flat.abs().amax(dim=1, keepdim=True) / SATURATION_FREE_WEIGHT_CODE
        assert torch.all((flat - flat8).abs() <= scale / 2 + 1e-7)
        levels = flat8 / scale
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert levels.abs().max() <= SATURATION_FREE_WEIGHT_CODE + 1e-3


# ---------------------------------------------------------------- the same on every CPU
DATA = Path(__file__).resolve().parents[1] / "data"
# The default run's student (tests/data/README.md): a trained model whose INT8 export is
# scored on the 4 000 samples of the default data's test split, where 1 point is 40.
TRAINED = DATA / "student_w16_default.pt"


@pytest.fixture(scope="module")
def trained_export() -> tuple[bytes, bytes, np.ndarray, np.ndarray]:
    """FP32 and INT8 ONNX of the trained student, and the default data's test split."""
    from edgekd.core.config import EdgeKDConfig
    from edgekd.core.data import load_federated_data
    from edgekd.learn.models import load_checkpoint

    cfg = EdgeKDConfig()
    data = load_federated_data(cfg.data, cfg.seed)
    model, _ = load_checkpoint(str(TRAINED))
    fp32 = export_onnx_bytes(model, data.input_shape)
    int8 = quantize_onnx_int8(fp32, data.public.x[: cfg.kd.proxy_size])
    return fp32, int8, data.test.x, data.test.y


def _full_range(fp32: bytes) -> bytes:
    """The export as it was before 7-bit weights: ``reduce_range`` off, all else equal."""
    from edgekd.core.config import EdgeKDConfig
    from edgekd.core.data import load_federated_data

    cfg = EdgeKDConfig()
    public = load_federated_data(cfg.data, cfg.seed).public.x[: cfg.kd.proxy_size]
    return static_qdq(fp32, public, reduce_range=False)


def test_trained_student_int8_is_within_one_point_of_fp32(trained_export) -> None:
    # Prepare
    fp32, int8, x, y = trained_export

    # Execute
    z32 = ort.InferenceSession(fp32).run(None, {"x": x})[0]
    z8 = ort.InferenceSession(int8).run(None, {"x": x})[0]

    # Assert: 4 000 samples, so one point is 40 of them.
    assert len(y) == 4000
    accuracy32, accuracy8 = (z32.argmax(1) == y).mean(), (z8.argmax(1) == y).mean()
    assert accuracy32 > 0.8  # a trained student, not near-ties
    assert abs(accuracy32 - accuracy8) <= 0.01
    assert (z32.argmax(1) == z8.argmax(1)).mean() >= 0.97


def test_int8_weight_codes_leave_int16_headroom_on_avx2(trained_export) -> None:
    # Execute / Assert: a pair of u8*s8 products, 255 * (|w0| + |w1|), fits int16.
    _, int8, _, _ = trained_export
    assert max_weight_code(int8) <= SATURATION_FREE_WEIGHT_CODE == 64
    assert 255 * 2 * SATURATION_FREE_WEIGHT_CODE <= np.iinfo(np.int16).max


def test_quantizer_that_writes_full_range_weights_is_refused(
    trained_export, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An onnxruntime that ignored reduce_range would write 8-bit weights: refused."""
    import edgekd.deploy.quantize as quantize

    # Prepare
    fp32, _, x, _ = trained_export
    full_range = functools.partial(static_qdq, reduce_range=False)
    monkeypatch.setattr(quantize, "static_qdq", lambda *a, reduce_range, **k: full_range(*a, **k))

    # Execute / Assert
    assert max_weight_code(_full_range(fp32)) == 127
    with pytest.raises(QuantizationError, match="code 127 exceeds 64"):
        quantize.quantize_onnx_int8(fp32, x[:500])


@pytest.mark.skipif(avx2_emulator() is None, reason="needs qemu-x86_64 on an x86-64 host")
def test_int8_export_gives_the_same_logits_on_an_avx2_cpu_without_vnni(trained_export) -> None:
    """The export on onnxruntime's AVX2 kernels (emulated, whatever this host has) gives
    this host's logits; the full-range export it replaced does not, so the emulation
    does reach the saturating kernel."""
    # Prepare
    fp32, int8, x, _ = trained_export
    full = _full_range(fp32)
    x = x[:1000]

    def native_and_avx2(model: bytes, path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
        path.write_bytes(model)
        predict, host = emulated_avx2_predictor(path)
        return onnx_predictor(path)(x), predict(x), host

    # Execute
    with tempfile.TemporaryDirectory() as tmp:
        native, avx2, host = native_and_avx2(int8, Path(tmp, "int8.onnx"))
        full_native, full_avx2, _ = native_and_avx2(full, Path(tmp, "full.onnx"))

    # Assert
    assert host["isa"] == ["avx2"] and "saturating int16" in host["int8_kernel"]
    scale = np.abs(native).max()
    assert np.abs(avx2 - native).max() <= 0.01 * scale
    assert (avx2.argmax(1) == native.argmax(1)).mean() >= 0.999
    # The old export saturates there: its logits move by a good part of their range.
    assert np.abs(full_avx2 - full_native).max() > 0.1 * np.abs(full_native).max()


def test_an_emulators_passed_through_cpuinfo_is_not_taken_for_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """qemu-user shows the host's /proc/cpuinfo (AVX-512, AVX-VNNI) while CPUID, which
    onnxruntime dispatches on, says AVX2 only: the VNNI flag is then not this CPU's."""
    import edgekd.deploy.host as host

    # Prepare: a Zen 5 host's flags, under an emulated AVX2 CPU and natively
    flags = {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni"}
    emulated = {"AVX2": True, "AVX512F": False, "AVX512BW": False, "AVX512VNNI": False}
    native = {"AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": True}
    monkeypatch.setattr(host, "_cpuinfo", lambda: ("AMD EPYC", flags))

    # Execute / Assert
    monkeypatch.setattr(host, "_numpy_features", lambda: emulated)
    assert host.int8_host()["isa"] == ["avx2"]
    assert "saturating int16" in host.int8_host()["int8_kernel"]
    monkeypatch.setattr(host, "_numpy_features", lambda: native)
    assert host.int8_host()["isa"] == ["avx2", "avx512_vnni", "avx512bw", "avx512f", "avx_vnni"]
    # An AVX-VNNI CPU without AVX-512 (Alder Lake): cpuinfo and CPUID agree, VNNI is kept
    monkeypatch.setattr(host, "_cpuinfo", lambda: ("Intel Core", {"avx2", "avx_vnni"}))
    monkeypatch.setattr(host, "_numpy_features", lambda: {"AVX2": True, "AVX512F": False})
    assert host.int8_host()["isa"] == ["avx2", "avx_vnni"]
