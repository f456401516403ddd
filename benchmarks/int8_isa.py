"""INT8 ONNX students on two kinds of x86 CPU: this host's, and AVX2 without VNNI.

    python benchmarks/int8_isa.py --run runs/<ts> [--json OUT]

onnxruntime's AVX2 INT8 kernels sum pairs of u8*s8 products in a saturating int16;
VNNI and ARM dot-product kernels do not (`edgekd.deploy.host`). This script scores the
run's student on its test split as FP32 ONNX and as the two INT8 exports, with the
7-bit weights edgekd ships and with the full-range weights it shipped before
(`edgekd.deploy.quantize.static_qdq`), each on this host and on an emulated AVX2 CPU
(``qemu-x86_64 -cpu max``; `edgekd.deploy.parity.avx2_emulator`). Emulation is
exact for the arithmetic and slow: accuracy only, no timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def run(run_dir: Path) -> dict[str, Any]:
    from edgekd.core.config import EdgeKDConfig
    from edgekd.core.data import load_federated_data
    from edgekd.deploy.host import int8_host
    from edgekd.deploy.onnx_export import export_onnx_bytes
    from edgekd.deploy.parity import avx2_emulator, emulated_avx2_predictor, onnx_predictor
    from edgekd.deploy.quantize import (
        CALIBRATION_SAMPLES,
        max_weight_code,
        quantize_onnx_int8,
        static_qdq,
    )
    from edgekd.learn.models import load_checkpoint

    report = json.loads((run_dir / "report.json").read_text())
    cfg = EdgeKDConfig().with_overrides(report["config"])
    data = load_federated_data(cfg.data, cfg.seed)
    x, y = data.test.x, data.test.y
    student, _ = load_checkpoint(str(run_dir / "student.pt"))
    fp32 = export_onnx_bytes(student, data.input_shape)
    calibration = data.public.x[:CALIBRATION_SAMPLES]
    models = {
        "FP32": fp32,
        "INT8, 7-bit weights (shipped)": quantize_onnx_int8(fp32, calibration),
        "INT8, 8-bit weights (before)": static_qdq(fp32, calibration, reduce_range=False),
    }
    emulator = avx2_emulator()
    rows, emulated_host = [], None
    with tempfile.TemporaryDirectory() as tmp:
        reference = onnx_predictor(_write(tmp, "fp32", fp32))(x)
        for i, (name, blob) in enumerate(models.items()):
            path = _write(tmp, str(i), blob)
            row: dict[str, Any] = {"model": name, "weight_code_max": max_weight_code(blob)}
            hosts = {"native": onnx_predictor(path)}
            if emulator is not None:
                hosts["avx2"], emulated_host = emulated_avx2_predictor(path, emulator=emulator)
            for where, predict in hosts.items():
                z = predict(x)
                row[f"{where}_accuracy"] = float((z.argmax(1) == y).mean())
                row[f"{where}_agreement"] = float((z.argmax(1) == reference.argmax(1)).mean())
            rows.append(row)
    return {
        "run": str(run_dir),
        "test_samples": int(len(y)),
        "host": int8_host(),
        "emulated_host": emulated_host,
        "emulator": emulator,
        "models": rows,
    }


def _write(folder: str, name: str, blob: bytes) -> Path:
    path = Path(folder, f"{name}.onnx")
    path.write_bytes(blob)
    return path


def render(result: dict[str, Any]) -> str:
    from edgekd.deploy.host import describe_host

    lines = [
        f"run {result['run']}: {result['test_samples']} test samples",
        f"native: {describe_host(result['host'])}",
        f"avx2:   {describe_host(result['emulated_host'])} under {result['emulator']}"
        if result["emulated_host"]
        else "avx2:   skipped (no qemu-x86_64 here: apt-get install qemu-user-static)",
        f"{'model':<32}{'|w| max':>8}{'acc native':>12}{'agree':>8}{'acc AVX2':>10}{'agree':>8}",
    ]
    for r in result["models"]:
        lines.append(
            f"{r['model']:<32}{r['weight_code_max']:>8}{r['native_accuracy']:>12.4f}"
            f"{r['native_agreement']:>8.4f}{r.get('avx2_accuracy', float('nan')):>10.4f}"
            f"{r.get('avx2_agreement', float('nan')):>8.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="an edgekd simulate run folder")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if not (args.run / "report.json").is_file() or not (args.run / "student.pt").is_file():
        print(f"error: {args.run} has no report.json and student.pt", file=sys.stderr)
        return 2
    result = run(args.run)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
