"""Cost of on-device training: one KD step of the whole student against the head-only
step, in onnxruntime and LiteRT, at a bundle's batch size.

Two stages, so the timing runs where torch is absent (an emulated Raspberry Pi):

    python benchmarks/train_step.py build DIR [--model CKPT] [--batch 32]   # needs torch
    python benchmarks/train_step.py time DIR [--runs 200] [--threads 1]     # torch-free

``build`` exports, for the student checkpoint (default: the default run's student,
tests/data/student_w16_default.pt), the step graphs a bundle ships: the whole-student
step (``train_step.onnx`` + ``train_infer.onnx``; ``train_step.tflite`` when
litert-torch is installed) and the head-only pair (``features`` + ``head_step``).
``time`` runs each case in a fresh process: it loads the graphs, runs ``--runs`` steps
on random batches (after 10 warm-up steps) and prints, per case, the median and 95th
percentile milliseconds of a step (a head-only step includes its batch's feature
extraction, as `edgekd.deploy.runtimes.local_head_kd` does it once per epoch, so the
head-only figure is an upper bound) and the process's peak resident memory (VmHWM) with
its growth over the interpreter that imported the runtime. The numbers are this
host's: an emulated CPU's are 10-50x slower than the device's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "tests" / "data" / "student_w16_default.pt"
CASES = ("full-onnxruntime", "head-onnxruntime", "full-litert", "head-litert")


def build(out: Path, model_path: Path, batch: int) -> None:
    import importlib.util

    from edgekd.deploy.head_step import (
        export_feature_extractor_onnx,
        export_head_step_onnx,
        split_student,
    )
    from edgekd.deploy.train_step import export_infer_onnx, export_train_step_onnx, layout_for
    from edgekd.learn.models import load_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    model, spec = load_checkpoint(str(model_path))
    shape = (spec.in_channels, spec.input_size)
    layout = layout_for(model, shape, spec.num_classes, "adam")
    _, head = split_student(model)
    files = {
        "train_step.onnx": export_train_step_onnx(model, layout),
        "train_infer.onnx": export_infer_onnx(model, layout),
        "features.onnx": export_feature_extractor_onnx(model, shape),
        "head_step.onnx": export_head_step_onnx(head.in_features, head.out_features),
        "step_layout.json": layout.to_json().encode(),
    }
    if importlib.util.find_spec("litert_torch") is not None:
        from edgekd.deploy.tflite_export import (
            export_features_tflite,
            export_head_step_tflite,
            export_train_step_tflite,
        )

        files["train_step.tflite"] = export_train_step_tflite(model, layout, batch)
        files["features.tflite"] = export_features_tflite(model, shape, batch)
        files["head_step.tflite"] = export_head_step_tflite(
            head.in_features, head.out_features, batch
        )
    for name, data in files.items():
        (out / name).write_bytes(data)
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    np.savez(out / "step_params.npz", **params)
    meta = {
        "batch": batch,
        "model": str(model_path),
        "params": sum(p.size for p in params.values()),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    print(f"wrote {len(files) + 2} files to {out}")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def time_one(folder: Path, case: str, runs: int, threads: int) -> dict[str, float]:
    """One case in this process (``time`` calls it in a fresh one per case)."""
    from edgekd.deploy.step_layout import StepLayout

    kind, backend = case.split("-", 1)
    meta = json.loads((folder / "meta.json").read_text())
    batch = int(meta["batch"])
    layout = StepLayout.from_json((folder / "step_layout.json").read_text())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *layout.input_shape)).astype(np.float32)
    y = rng.integers(0, layout.num_classes, batch)
    teacher = rng.normal(size=(batch, layout.num_classes)).astype(np.float32)
    weights = np.ones(layout.num_classes, np.float32)
    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401 - the baseline includes the runtime's import
    else:
        import ai_edge_litert.interpreter  # noqa: F401
    base = _peak_rss_mb()
    with np.load(folder / "step_params.npz") as saved:
        params = [np.asarray(saved[n], np.float32) for n in layout.names]
    if kind == "full":
        from edgekd.deploy.step_runtime import step_runtime_for

        suffix = ".onnx" if backend == "onnxruntime" else ".tflite"
        infer = str(folder / "train_infer.onnx") if backend == "onnxruntime" else None
        runtime = step_runtime_for(
            str(folder / f"train_step{suffix}"), infer, layout, threads=threads
        )
        zeros = [np.zeros_like(p) for p in params]
        ones = [np.ones_like(p) for p in params]
        state = [*zeros, *zeros]

        def one_step(step: int) -> None:
            nonlocal params, state
            scalars = [np.float32(v) for v in (4.0, 0.8, 0.01, 2.0, step, 0.0, 0.0)]
            out = runtime.step([x, y, teacher, weights, *scalars, *params, *ones, *state])
            count = len(params)
            params, state = out[:count], out[count : 3 * count]

    else:
        from edgekd.deploy.runtimes import runtime_for

        suffix = ".onnx" if backend == "onnxruntime" else ".tflite"
        head_runtime = runtime_for(
            str(folder / f"features{suffix}"), str(folder / f"head_step{suffix}"), threads=threads
        )
        weight, bias = params[-2], params[-1]

        def one_step(step: int) -> None:
            nonlocal weight, bias
            features = head_runtime.features(x)
            weight, bias, _ = head_runtime.head_step(
                features, y, teacher, weight, bias, weights, 4.0, 0.8, 0.01
            )

    for step in range(1, 11):
        one_step(step)
    times = []
    for step in range(11, 11 + runs):
        start = time.perf_counter()
        one_step(step)
        times.append((time.perf_counter() - start) * 1000)
    peak = _peak_rss_mb()
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "peak_rss_mb": peak,
        "rss_growth_mb": peak - base,
        "batch": batch,
    }


def time_all(folder: Path, runs: int, threads: int) -> None:
    import platform

    rows = {}
    for case in CASES:
        suffix = ".onnx" if case.endswith("onnxruntime") else ".tflite"
        if not (folder / f"train_step{suffix}").is_file():
            continue
        done = subprocess.run(
            [sys.executable, __file__, "_one", str(folder), case, str(runs), str(threads)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            rows[case] = {"error": done.stderr.strip().splitlines()[-1:]}
            continue
        rows[case] = json.loads(done.stdout.strip().splitlines()[-1])
    meta = json.loads((folder / "meta.json").read_text())
    print(f"host: {platform.machine()}, {runs} steps of batch {meta['batch']}, "
          f"{threads} thread(s), student of {meta['params']} parameters")  # fmt: skip
    print(f"{'case':<18} {'p50 ms':>8} {'p95 ms':>8} {'peak RSS MB':>12} {'growth MB':>10}")
    for case, row in rows.items():
        if "error" in row:
            print(f"{case:<18} error: {row['error']}")
            continue
        print(
            f"{case:<18} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} "
            f"{row['peak_rss_mb']:>12.1f} {row['rss_growth_mb']:>10.1f}"
        )
    print(json.dumps(rows))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        folder, case, runs, threads = sys.argv[2:6]
        print(json.dumps(time_one(Path(folder), case, int(runs), int(threads))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    b = sub.add_parser("build", help="export the graphs (needs torch)")
    b.add_argument("out", type=Path)
    b.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    b.add_argument("--batch", type=int, default=32)
    t = sub.add_parser("time", help="time them (torch-free)")
    t.add_argument("folder", type=Path)
    t.add_argument("--runs", type=int, default=200)
    t.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.stage == "build":
        build(args.out, args.model, args.batch)
    else:
        time_all(args.folder, args.runs, args.threads)


if __name__ == "__main__":
    main()
