"""Parity of an exported student with the FP32 torch student it came from.

An export is run on the test split with the runtime the device will use (onnxruntime
for ``.onnx``, LiteRT for ``.tflite``, torch for ``.pt``) and compared with the FP32
torch student's logits ``z`` on the same inputs:

* ``max_abs_logit_diff = max_{i,c} |z'_ic - z_ic|`` (an FP32 export must be the same
  function up to float rounding; reduced precisions are judged by the next two);
* ``top1_agreement = mean_i [argmax z'_i = argmax z_i]``;
* ``accuracy`` of the export and ``torch_accuracy`` of the torch student on the labels.

`check_parity` compares a `ParityResult` with a `DeviceProfile`'s thresholds and raises
`ParityError` naming each threshold that was missed and by how much.

numpy only at import time; onnxruntime, ai_edge_litert and torch are imported by the
predictor that needs them, so a device without torch checks its ONNX/TFLite files.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.core.errors import EdgeKDError

if TYPE_CHECKING:
    from torch import nn

    from edgekd.deploy.profiles import DeviceProfile

__all__ = [
    "ParityError",
    "ParityResult",
    "Predictor",
    "avx2_emulator",
    "check_parity",
    "emulated_avx2_predictor",
    "measure_latency",
    "measure_parity",
    "onnx_predictor",
    "parity_problems",
    "predictor_for",
    "run_parity",
    "tflite_predictor",
    "torch_predictor",
]

Predictor = Callable[[np.ndarray], np.ndarray]  # float32 [N, ...] -> logits [N, K]

# Samples per runtime call: amortises per-call cost, bounded memory on a device.
_CHUNK = 1024
FP32_PRECISIONS = ("fp32",)


class ParityError(EdgeKDError, ValueError):
    """An exported model missed a parity threshold of its device profile."""


@dataclass(frozen=True)
class ParityResult:
    model_file: str  # file name inside the bundle (or the path given)
    precision: str  # fp32 | fp16 | int8 | int8-weights
    runtime: str  # onnxruntime | litert | torch (+ device)
    samples: int
    max_abs_logit_diff: float
    top1_agreement: float
    accuracy: float
    torch_accuracy: float

    @property
    def top1_disagreement(self) -> float:
        return 1.0 - self.top1_agreement

    @property
    def accuracy_drop(self) -> float:
        return self.torch_accuracy - self.accuracy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ParityResult:
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


def measure_parity(
    logits: np.ndarray,
    reference_logits: np.ndarray,
    labels: np.ndarray,
    *,
    model_file: str,
    precision: str,
    runtime: str,
) -> ParityResult:
    """Compare an export's ``logits`` with the torch student's ``reference_logits``."""
    z = np.asarray(logits, dtype=np.float64)
    ref = np.asarray(reference_logits, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if z.shape != ref.shape or len(y) != len(z):
        raise ValueError(
            f"{model_file}: logits {z.shape} vs reference {ref.shape} vs {len(y)} labels"
        )
    finite = bool(np.isfinite(z).all())
    return ParityResult(
        model_file=model_file,
        precision=precision,
        runtime=runtime,
        samples=int(len(y)),
        max_abs_logit_diff=float(np.abs(z - ref).max()) if finite and z.size else math.inf,
        top1_agreement=float((z.argmax(1) == ref.argmax(1)).mean()),
        accuracy=float((z.argmax(1) == y).mean()),
        torch_accuracy=float((ref.argmax(1) == y).mean()),
    )


def parity_problems(result: ParityResult, profile: DeviceProfile) -> list[str]:
    """Each missed threshold as ``"<file>: <what> <value> exceeds <profile>'s <key>
    <limit> by <amount>"``; empty when the result passes."""
    checks = [
        ("top-1 disagreement", result.top1_disagreement, "max_top1_disagreement"),
        ("accuracy drop", result.accuracy_drop, "max_accuracy_drop"),
    ]
    if result.precision in FP32_PRECISIONS:
        checks.insert(0, ("max |logit diff|", result.max_abs_logit_diff, "max_abs_logit_diff_fp32"))
    problems = []
    for what, value, key in checks:
        limit = float(getattr(profile.parity, key))
        # A tiny tolerance: agreement over n samples moves in steps of 1/n.
        if not value <= limit + 1e-12:
            problems.append(
                f"{result.model_file}: {what} {value:.4g} exceeds {profile.name}'s {key} "
                f"{limit:g} by {value - limit:.4g}"
            )
    return problems


def check_parity(result: ParityResult, profile: DeviceProfile) -> None:
    """Raise `ParityError` listing every threshold of ``profile`` that ``result`` misses."""
    problems = parity_problems(result, profile)
    if problems:
        raise ParityError("; ".join(problems))


# ------------------------------------------------------------------ predictors
def onnx_predictor(
    path: str | Path, *, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",)
) -> Predictor:
    """onnxruntime session on ``path`` (providers not installed here are skipped)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    available = set(ort.get_available_providers())
    usable = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=options, providers=usable)
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [session.run(None, {name: x[i : i + _CHUNK]})[0] for i in range(0, len(x), _CHUNK)]
        return np.concatenate(parts)

    return predict


# Run by the emulated interpreter: the model's logits and the host as the emulated
# process sees it (its CPUID), so a caller can check that the emulation took.
_EMULATED_RUN = """
import json, sys
import numpy as np
from edgekd.deploy.host import int8_host
from edgekd.deploy.parity import onnx_predictor
model, x, out, host = sys.argv[1:5]
np.save(out, onnx_predictor(model)(np.load(x)))
open(host, "w").write(json.dumps(int8_host()))
"""


def avx2_emulator() -> str | None:
    """qemu's x86-64 user-mode emulator, where this host is x86-64 and has it.

    ``qemu-x86_64 -cpu max`` (QEMU ≥ 7.2, TCG) runs this very Python as a CPU with AVX2
    and without AVX-512 or VNNI, so onnxruntime dispatches its AVX2 INT8 kernels
    (`edgekd.deploy.host`): the way to check an INT8 model on the CPUs that saturate
    from a host that does not (Debian: ``apt-get install qemu-user-static``).
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")


def emulated_avx2_predictor(
    path: str | Path, *, emulator: str | None = None, timeout: float = 600.0
) -> tuple[Predictor, dict[str, Any]]:
    """A predictor that runs ``path`` with onnxruntime on an emulated AVX2 CPU without
    VNNI (`avx2_emulator`), single-threaded, and that CPU as `int8_host` saw it.

    Raises:
        RuntimeError: no emulator here, or the emulated run failed or timed out.
    """
    qemu = emulator or avx2_emulator()
    if qemu is None:
        raise RuntimeError("no qemu-x86_64 on this x86-64 host (apt-get install qemu-user-static)")
    seen: dict[str, Any] = {}

    def predict(x: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            src, out, host = Path(tmp, "x.npy"), Path(tmp, "z.npy"), Path(tmp, "host.json")
            np.save(src, np.ascontiguousarray(x, dtype=np.float32))
            command = [qemu, "-cpu", "max", sys.executable, "-c", _EMULATED_RUN]
            try:
                done = subprocess.run(
                    [*command, str(path), str(src), str(out), str(host)],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"emulated onnxruntime run timed out after {timeout:g} s"
                ) from None
            if done.returncode != 0 or not out.exists():
                tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"emulated onnxruntime run failed: {tail[0]}")
            seen.update(json.loads(host.read_text()))
            return np.load(out)

    return predict, seen


def _litert_interpreter(path: str | Path, threads: int) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ImportError(
            "running a .tflite model needs the LiteRT interpreter: pip install ai-edge-litert"
        ) from None
    return Interpreter(model_path=str(path), num_threads=threads)


def tflite_predictor(path: str | Path, *, threads: int = 1) -> Predictor:
    """LiteRT interpreter on ``path``. A static-batch model (litert-torch exports one)
    is fed chunks of exactly its batch, the last one padded with zeros and cut back."""
    interpreter = _litert_interpreter(path, threads)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    expected = tuple(int(s) for s in source["shape"][1:])
    signature = source.get("shape_signature", source["shape"])
    fixed_batch = int(source["shape"][0]) if len(signature) and signature[0] != -1 else 0
    in_scale, in_zero = source.get("quantization", (0.0, 0))
    out_scale, out_zero = target.get("quantization", (0.0, 0))
    in_dtype = np.dtype(source["dtype"])

    def quantize(x: np.ndarray) -> np.ndarray:
        if np.issubdtype(in_dtype, np.integer) and in_scale:
            info = np.iinfo(in_dtype)
            return np.clip(np.round(x / in_scale + in_zero), info.min, info.max).astype(in_dtype)
        return x.astype(in_dtype)

    def dequantize(z: np.ndarray) -> np.ndarray:
        if np.issubdtype(z.dtype, np.integer) and out_scale:
            return ((z.astype(np.float32) - out_zero) * out_scale).astype(np.float32)
        return z.astype(np.float32)

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        # A channels-last conversion is fed the same data with the channel axis moved.
        if expected != x.shape[1:] and expected == (*x.shape[2:], x.shape[1]):
            x = np.moveaxis(x, 1, -1)
        step = fixed_batch or _CHUNK
        parts = []
        for start in range(0, len(x), step):
            batch = x[start : start + step]
            n = len(batch)
            if fixed_batch:
                pad = np.zeros((step - n, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            else:
                interpreter.resize_tensor_input(source["index"], list(batch.shape))
                interpreter.allocate_tensors()
            interpreter.set_tensor(source["index"], quantize(np.ascontiguousarray(batch)))
            interpreter.invoke()
            parts.append(dequantize(interpreter.get_tensor(target["index"]))[:n])
        return np.concatenate(parts)

    return predict


def torch_predictor(model: nn.Module, *, device: str = "cpu", fp16: bool = False) -> Predictor:
    """``model`` in eval mode on ``device``; ``fp16`` wraps it in CUDA FP16 autocast."""
    import torch

    model = model.to(device).eval()

    def predict(x: np.ndarray) -> np.ndarray:
        parts = []
        with torch.inference_mode():
            for start in range(0, len(x), _CHUNK):
                batch = torch.from_numpy(np.ascontiguousarray(x[start : start + _CHUNK]))
                batch = batch.to(device, dtype=torch.float32)
                with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=fp16):
                    out = model(batch)
                parts.append(out.float().cpu().numpy())
        return np.concatenate(parts)

    return predict


def predictor_for(
    path: str | Path,
    *,
    threads: int = 1,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    device: str = "cpu",
    fp16: bool = False,
) -> tuple[Predictor, str]:
    """A predictor for a model file by its suffix, and the runtime it runs on."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return onnx_predictor(path, threads=threads, providers=providers), "onnxruntime"
    if suffix == ".tflite":
        return tflite_predictor(path, threads=threads), "litert"
    if suffix in (".pt", ".pth"):  # torch threads are the caller's (torch.set_num_threads)
        from edgekd.learn.models import load_checkpoint

        model, _ = load_checkpoint(str(path))
        runtime = f"torch-{device}" + ("-fp16" if fp16 else "")
        return torch_predictor(model, device=device, fp16=fp16), runtime
    raise ValueError(f"no runtime for model file {path} (use .onnx, .tflite or .pt)")


def run_parity(
    model_path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    reference_logits: np.ndarray,
    *,
    precision: str,
    threads: int = 1,
    device: str = "cpu",
    fp16: bool = False,
) -> ParityResult:
    """Run ``model_path`` on ``x`` with its runtime and compare with the torch logits."""
    predict, runtime = predictor_for(model_path, threads=threads, device=device, fp16=fp16)
    return measure_parity(
        predict(x),
        reference_logits,
        y,
        model_file=Path(model_path).name,
        precision=precision,
        runtime=runtime,
    )


def measure_latency(
    predict: Predictor, sample: np.ndarray, *, warmup: int = 20, runs: int = 200
) -> dict[str, float]:
    """p50/p95/mean wall time of ``predict(sample)`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        predict(sample)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        predict(sample)
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
        "runs": runs,
    }
