"""Inference benchmark of a run's models on the runtimes the device bundles use.

    python benchmarks/inference.py --run runs/<ts> [--json OUT] [--threads 1]

Models: the teacher and the student in FP32 torch, the student as FP32 and INT8 ONNX on
onnxruntime (built exactly as the raspberry-pi bundle builds them: static QDQ INT8,
per-channel, calibrated on the run's public split, then slimmed), and the student as
LiteRT FP32 and INT8-weight TFLite (skipped, with a note, without ``litert-torch``).

Per model: file size, latency p50/p95 at batch 1, throughput at batch 256 (samples/s)
and accuracy on the run's test split (the devices' domain). Every runtime gets the same
number of intra-op threads (``--threads``: torch.set_num_threads, onnxruntime's
intra_op_num_threads, LiteRT's num_threads); the output states it. LiteRT graphs have a
static batch, so a batch-1 and a batch-256 file are exported (the bundle ships batch 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]
THROUGHPUT_BATCH = 256
LATENCY_RUNS = 500
THROUGHPUT_RUNS = 40


def _throughput(predict: Predictor, x: np.ndarray, runs: int = THROUGHPUT_RUNS) -> float:
    """Samples per second at batch ``len(x)``, from the median of ``runs`` timed calls."""
    for _ in range(3):
        predict(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - start)
    return len(x) / float(np.median(times))


def _row(
    name: str,
    runtime: str,
    size: int,
    latency_predict: Predictor,
    batch_predict: Predictor,
    x: np.ndarray,
    y: np.ndarray,
) -> dict[str, Any]:
    from edgekd.deploy.parity import measure_latency

    latency = measure_latency(latency_predict, x[:1], warmup=50, runs=LATENCY_RUNS)
    accuracy = float((batch_predict(x).argmax(1) == y).mean())
    return {
        "model": name,
        "runtime": runtime,
        "file_bytes": size,
        "p50_ms": latency["p50_ms"],
        "p95_ms": latency["p95_ms"],
        "throughput_256": _throughput(batch_predict, x[:THROUGHPUT_BATCH]),
        "accuracy": accuracy,
    }


def run(run_dir: Path, threads: int) -> dict[str, Any]:
    import torch

    from edgekd.core.config import EdgeKDConfig
    from edgekd.core.data import load_federated_data
    from edgekd.deploy.bundle import slim_onnx
    from edgekd.deploy.host import describe_host, int8_host
    from edgekd.deploy.onnx_export import export_onnx_bytes
    from edgekd.deploy.parity import onnx_predictor, tflite_predictor, torch_predictor
    from edgekd.deploy.quantize import CALIBRATION_SAMPLES, quantize_onnx_int8
    from edgekd.learn.models import load_checkpoint

    report = json.loads((run_dir / "report.json").read_text())
    cfg = EdgeKDConfig().with_overrides(report["config"])
    data = load_federated_data(cfg.data, cfg.seed)
    x, y = data.test.x, data.test.y
    shape = data.input_shape
    torch.set_num_threads(threads)

    teacher, _ = load_checkpoint(str(run_dir / "teacher.pt"))
    student, _ = load_checkpoint(str(run_dir / "student.pt"))
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for name, model, path in (
        ("teacher FP32", teacher, run_dir / "teacher.pt"),
        ("student FP32", student, run_dir / "student.pt"),
    ):
        predict = torch_predictor(model)
        rows.append(_row(name, "torch", path.stat().st_size, predict, predict, x, y))

    teacher_onnx = slim_onnx(export_onnx_bytes(teacher, shape))
    fp32 = slim_onnx(export_onnx_bytes(student, shape))
    int8 = slim_onnx(
        quantize_onnx_int8(export_onnx_bytes(student, shape), data.public.x[:CALIBRATION_SAMPLES])
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in (("student FP32", fp32), ("student INT8", int8)):
            path = Path(tmp, name.replace(" ", "_") + ".onnx")
            path.write_bytes(blob)
            predict = onnx_predictor(path, threads=threads)
            rows.append(_row(name, "onnxruntime", len(blob), predict, predict, x, y))
        rows += _litert_rows(student, shape, threads, Path(tmp), x, y, skipped, tflite_predictor)

    teacher_row = rows[0]
    for row in rows:
        row["size_vs_teacher_pt"] = row["file_bytes"] / teacher_row["file_bytes"]
        row["speedup_vs_teacher"] = row["throughput_256"] / teacher_row["throughput_256"]
    int8_row = next(r for r in rows if r["model"] == "student INT8")
    student_fp32 = rows[1]
    return {
        "run": str(run_dir),
        "threads": threads,
        "host": f"{describe_host(int8_host())}, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "test_samples": int(len(y)),
        "teacher_onnx_bytes": len(teacher_onnx),
        "models": rows,
        "skipped": skipped,
        "targets": {
            "int8_accuracy_minus_fp32": int8_row["accuracy"] - student_fp32["accuracy"],
            "int8_bytes_over_teacher_pt": int8_row["size_vs_teacher_pt"],
            "int8_bytes_over_teacher_onnx": int8_row["file_bytes"] / len(teacher_onnx),
            "int8_ort_throughput_over_teacher_torch": int8_row["speedup_vs_teacher"],
        },
    }


def _litert_rows(
    student: Any,
    shape: tuple[int, ...],
    threads: int,
    folder: Path,
    x: np.ndarray,
    y: np.ndarray,
    skipped: list[str],
    tflite_predictor: Callable[..., Predictor],
) -> list[dict[str, Any]]:
    from edgekd.deploy.tflite_export import export_student_tflite, is_litert_torch_available

    if not is_litert_torch_available():
        skipped.append("student LiteRT FP32/INT8: litert-torch is not installed (edgekd[litert])")
        return []
    rows = []
    for name, int8 in (("student LiteRT FP32", False), ("student LiteRT INT8-w", True)):
        try:
            one = export_student_tflite(student, shape, batch_size=1, int8=int8)
            many = export_student_tflite(student, shape, batch_size=THROUGHPUT_BATCH, int8=int8)
        except ImportError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        paths = folder / f"{name}-1.tflite", folder / f"{name}-256.tflite"
        paths[0].write_bytes(one)
        paths[1].write_bytes(many)
        rows.append(
            _row(
                name,
                "litert",
                len(one),
                tflite_predictor(paths[0], threads=threads),
                tflite_predictor(paths[1], threads=threads),
                x,
                y,
            )
        )
    return rows


def render(result: dict[str, Any]) -> str:
    lines = [
        f"run {result['run']}: {result['test_samples']} test samples; {result['threads']} "
        f"intra-op thread(s) for every runtime; {result['host']}",
        f"{'model':<23}{'runtime':<13}{'bytes':>9}{'vs T.pt':>9}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'b256 /s':>11}{'vs T':>7}{'acc':>8}",
    ]
    for r in result["models"]:
        lines.append(
            f"{r['model']:<23}{r['runtime']:<13}{r['file_bytes']:>9,}"
            f"{r['size_vs_teacher_pt']:>9.4f}{r['p50_ms']:>9.3f}{r['p95_ms']:>9.3f}"
            f"{r['throughput_256']:>11,.0f}{r['speedup_vs_teacher']:>6.1f}x{r['accuracy']:>8.4f}"
        )
    t = result["targets"]
    lines += [f"skipped: {note}" for note in result["skipped"]]
    lines.append(
        f"INT8 ORT vs FP32 torch student: accuracy {t['int8_accuracy_minus_fp32']:+.4f}; "
        f"INT8 file = 1/{1 / t['int8_bytes_over_teacher_pt']:.1f} of teacher.pt "
        f"(1/{1 / t['int8_bytes_over_teacher_onnx']:.1f} of the teacher's FP32 ONNX, "
        f"{result['teacher_onnx_bytes']:,} B; target <= 1/20); batch-256 throughput "
        f"{t['int8_ort_throughput_over_teacher_torch']:.1f}x the torch teacher (target >= 5x)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="an `edgekd simulate` run folder")
    parser.add_argument("--json", help="write the result here as JSON")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    for name in ("report.json", "teacher.pt", "student.pt"):
        if not (run_dir / name).is_file():
            print(f"inference.py: error: {run_dir / name} not found", file=sys.stderr)
            return 2
    result = run(run_dir, args.threads)
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
