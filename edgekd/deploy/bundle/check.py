"""`check_bundle`: verify a bundle, re-run parity on its stored samples with this host's
runtimes, and time the inference model (the device itself included; no torch needed for
onnxruntime and LiteRT bundles)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.core.errors import one_line_error
from edgekd.deploy.bundle.layout import (
    FEATURES,
    HEAD,
    HEAD_STEP,
    INFERENCE,
    PARITY_DATA,
    REFERENCE,
    STEP_LAYOUT,
    STEP_PARAMS,
    TRAIN_INFER,
    TRAIN_STEP,
    Bundle,
    BundleError,
    load_bundle,
)
from edgekd.deploy.host import int8_host
from edgekd.deploy.parity import (
    ParityResult,
    measure_latency,
    measure_parity,
    parity_problems,
    predictor_for,
)
from edgekd.deploy.profiles import DeviceProfile

if TYPE_CHECKING:
    pass


def _torch_device(profile: DeviceProfile) -> tuple[str, bool]:
    """Where a torch bundle runs here: CUDA with FP16 autocast if asked and present."""
    import torch

    if profile.device == "cuda" and torch.cuda.is_available():
        return "cuda", profile.precision == "fp16"
    return "cpu", False


def _head_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / HEAD) as head:
        return head["weight"], head["bias"]


def _feature_path_parity(
    folder: Path, features: str, step: str, x: np.ndarray, y: np.ndarray, reference: np.ndarray
) -> ParityResult:
    """The on-device training path at inference: the features file, then ``head.npz``
    (at build time and in `check_bundle`)."""
    from edgekd.deploy.runtimes import runtime_for

    runtime = runtime_for(str(folder / features), str(folder / step))
    weight, bias = _head_arrays(folder)
    kind = "litert" if features.endswith(".tflite") else "onnxruntime"
    return measure_parity(
        runtime.logits(x, weight, bias),
        reference,
        y,
        model_file=features,
        precision="fp32",
        runtime=f"{kind} features + {HEAD}",
    )


def step_graph_runtime(folder: Path, step: str, infer: str | None) -> Any:
    """The runtime of a bundle's whole-student step graph, with its layout."""
    from edgekd.deploy.step_layout import StepLayout
    from edgekd.deploy.step_runtime import step_runtime_for

    layout = StepLayout.from_json((folder / STEP_LAYOUT).read_text())
    return step_runtime_for(str(folder / step), str(folder / infer) if infer else None, layout)


def step_params(folder: Path, names: tuple[str, ...]) -> list[np.ndarray]:
    """The student's tensors the bundle's step graph starts from, in layout order."""
    with np.load(folder / STEP_PARAMS) as params:
        return [np.asarray(params[name], np.float32) for name in names]


def _step_graph_parity(
    folder: Path, step: str, infer: str | None, x: np.ndarray, y: np.ndarray, reference: np.ndarray
) -> ParityResult:
    """The graphs the device trains, at inference: the student's logits from the step
    file's ``infer`` (LiteRT) or the ONNX ``train_infer`` graph, with the shipped tensors
    (at build time and in `check_bundle`)."""
    runtime = step_graph_runtime(folder, step, infer)
    kind = "litert" if step.endswith(".tflite") else "onnxruntime"
    return measure_parity(
        runtime.logits(x, step_params(folder, runtime.layout.names)),
        reference,
        y,
        model_file=step,
        precision="fp32",
        runtime=f"{kind} {infer or 'infer signature'} + {STEP_PARAMS}",
    )


# ------------------------------------------------------------------ check on this host
def _rss_mb() -> float | None:
    """Resident set size of this process from /proc (Linux, Android); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def check_bundle(
    path: str | Path,
    *,
    threads: int | None = None,
    runs: int = 200,
    verify_key: str | Path | None = None,
) -> dict[str, Any]:
    """Verify ``path`` (`load_bundle`), re-run parity on the shipped test samples with this
    host's runtimes, and time the inference model at batch 1.

    ``threads`` overrides the profile's runtime threads (for latency); parity always runs
    single-threaded. A model whose runtime is missing here (torch on a Pi, LiteRT
    elsewhere) is reported as skipped with the reason. The result's ``ok`` is False when a
    parity threshold or a budget is missed; ``problems`` says which and by how much.
    """
    bundle = load_bundle(path, verify_key=verify_key)
    threads = threads or bundle.profile.threads
    signature = {"signature": "verified" if verify_key is not None else "not checked"}
    if bundle.inference_model.suffix != ".pt":
        return {**_check_loaded(bundle, threads, runs), **signature}
    try:
        import torch  # the torch backend: its intra-op threads are process-wide
    except ImportError:
        raise BundleError(
            f"{bundle.inference_model.name} needs torch, which is not installed here"
        ) from None

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {**_check_loaded(bundle, threads, runs), **signature}
    finally:
        torch.set_num_threads(before)


def _check_loaded(bundle: Bundle, threads: int, runs: int) -> dict[str, Any]:
    profile = bundle.profile
    try:
        with np.load(bundle.file(PARITY_DATA), allow_pickle=False) as stored:
            x, y, reference = stored["x"], stored["y"], stored["logits"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise BundleError(f"{PARITY_DATA}: unreadable ({type(exc).__name__}: {exc})") from None

    # Memory first, while the inference runtime is not yet loaded in this process.
    before = _rss_mb()
    try:
        predict, runtime, precision, note = _inference_predictor(bundle, threads)
        predict(x[:1])
    except ImportError as exc:
        raise BundleError(f"cannot run {bundle.inference_model.name} here: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types for bad files
        raise BundleError(
            f"{bundle.inference_model.name}: the runtime cannot load or run it "
            f"({one_line_error(exc)})"
        ) from None
    after = _rss_mb()
    growth = None if before is None or after is None else max(after - before, 0.0)

    problems: list[str] = []
    parity: dict[str, dict[str, Any]] = {}
    for name in bundle.files_with_role(INFERENCE, REFERENCE, FEATURES, TRAIN_STEP):
        entry = bundle.manifest["files"][name]
        try:
            if entry["role"] == FEATURES:
                step = bundle.files_with_role(HEAD_STEP)[0]
                result = _feature_path_parity(bundle.path, name, step, x, y, reference)
            elif entry["role"] == TRAIN_STEP:
                infer = next(iter(bundle.files_with_role(TRAIN_INFER)), None)
                result = _step_graph_parity(bundle.path, name, infer, x, y, reference)
            elif name == bundle.inference_model.name:
                result = measure_parity(
                    predict(x), reference, y, model_file=name, precision=precision, runtime=runtime
                )
            else:
                p, rt = predictor_for(bundle.file(name), threads=1)
                result = measure_parity(
                    p(x), reference, y, model_file=name, precision=entry["precision"], runtime=rt
                )
        except ImportError as exc:
            parity[name] = {"skipped": f"runtime not installed here: {exc}"}
            continue
        except Exception as exc:  # noqa: BLE001 - a file that verifies but does not run
            raise BundleError(f"{name}: cannot be run here ({one_line_error(exc)})") from None
        found = parity_problems(result, profile)
        parity[name] = {**result.to_dict(), "ok": not found}
        problems += found

    latency = {
        "model": bundle.inference_model.name,
        "runtime": runtime,
        "threads": threads,
        "batch_size": 1,
        **measure_latency(predict, x[:1], runs=runs),
    }
    size = bundle.inference_model.stat().st_size
    budget = profile.budget
    if size > budget.max_model_bytes:
        problems.append(
            f"{bundle.inference_model.name}: {size:,} bytes exceeds max_model_bytes "
            f"{budget.max_model_bytes:,} by {size - budget.max_model_bytes:,}"
        )
    if growth is not None and growth > budget.max_memory_mb:
        problems.append(
            f"memory: loading and running the model grew RSS by {growth:.1f} MB, over "
            f"max_memory_mb {budget.max_memory_mb:g} by {growth - budget.max_memory_mb:.1f}"
        )
    return {
        "bundle": str(bundle.path),
        "target": profile.name,
        "backend": profile.backend,
        "host": int8_host(),
        "build_host": bundle.manifest.get("build_host"),
        "verified_files": len(bundle.manifest["files"]),
        "parity_samples": int(len(y)),
        "parity": parity,
        "latency": latency,
        "model_bytes": {
            "file": bundle.inference_model.name,
            "bytes": size,
            "max_model_bytes": budget.max_model_bytes,
        },
        "memory": {"rss_growth_mb": growth, "max_memory_mb": budget.max_memory_mb},
        "notes": [note] if note else [],
        "problems": problems,
        "ok": not problems,
    }


def _inference_predictor(bundle: Bundle, threads: int) -> tuple[Any, str, str, str]:
    """The inference model's predictor as the profile runs it on this host, with its
    runtime, the precision actually run and a note when that differs from the profile."""
    profile = bundle.profile
    name = bundle.inference_model.name
    precision = bundle.manifest["files"][name]["precision"]
    note = ""
    device, fp16 = "cpu", False
    if bundle.inference_model.suffix == ".pt":
        device, fp16 = _torch_device(profile)
        if precision == "fp16" and not fp16:
            precision = "fp32"
            note = f"{name}: no CUDA here, so parity and latency are FP32 on the CPU"
    predict, runtime = predictor_for(
        bundle.inference_model,
        threads=threads,
        providers=profile.execution_providers,
        device=device,
        fp16=fp16,
    )
    return predict, runtime, precision, note
