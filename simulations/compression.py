"""Compression recipes on the same run: accuracy, KL to the teacher, sparsity and bytes.

    python simulations/compression.py --seeds 42 0 1 --recipes none magnitude80-lean \
        movement80-lean -- --set model.student-width=48

Each recipe is a set of ``--set`` overrides for ``edgekd simulate`` (see `RECIPES`).
The first run of a seed trains the teacher; the others load it, so every recipe of a
seed distils the same teacher. Runs go to ``simulations/results/compression/`` (ignored
by git); the table is markdown, mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SHIPPED = [
    "compression.end-round=6",  # prune over rounds 1-6, then 14 rounds to recover
    "compression.quantize=int8",
    "compression.upload=int8-delta-ef",
    "compression.teacher=int8",
]
# The lean wire: pruned on the server before round 1 (start-round 0), QAT from round
# 10, lossless INT8 code changes down, INT4 deltas with error feedback up, all deflated.
LEAN = [
    "compression.start-round=0",
    "compression.end-round=10",
    "compression.quantize=int8",
    "compression.download=delta",
    "compression.upload=int4-delta-ef",
    "compression.entropy=zlib",
    "compression.teacher=int8",
]
RECIPES: dict[str, list[str]] = {
    "none": [],
    "magnitude80-lean": ["compression.prune=magnitude:0.8", *LEAN],
    "movement80-lean": ["compression.prune=movement:0.8", *LEAN],
    # the lean wire, but pruned across rounds 1-6 (QAT from 6): masks change each round
    "magnitude80-lean-rounds": [
        "compression.prune=magnitude:0.8",
        "compression.start-round=1",
        "compression.end-round=6",
        *LEAN[2:],
    ],
    "int8": SHIPPED,
    "magnitude80-int8": ["compression.prune=magnitude:0.8", *SHIPPED],
    "magnitude90-int8": ["compression.prune=magnitude:0.9", *SHIPPED],
    "movement80-int8": ["compression.prune=movement:0.8", *SHIPPED],
    "movement90-int8": ["compression.prune=movement:0.9", *SHIPPED],
    "magnitude80-ternary": [
        "compression.prune=magnitude:0.8",
        "compression.end-round=6",
        "compression.quantize=ternary",
    ],
    "filter50": ["compression.prune=filter:0.5"],
    "lowrank-e90": ["compression.lowrank=energy:0.9"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="after --: for edgekd simulate")
    args = parser.parse_args()
    extra = [a for a in args.rest if a != "--"]
    reports: dict[str, list[dict]] = {name: [] for name in args.recipes}
    for seed in args.seeds:
        teacher: Path | None = None
        for name in args.recipes:
            out = Path("simulations/results/compression") / name / f"seed{seed}"
            cmd = ["edgekd", "simulate", "--seed", str(seed), "--out", str(out), *extra]
            cmd += [arg for item in RECIPES[name] for arg in ("--set", item)]
            if teacher is not None:
                cmd += ["--teacher", str(teacher)]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            teacher = teacher or out / "teacher.pt"
            reports[name].append(json.loads((out / "report.json").read_text()))
    print(f"\ncompression recipes, seeds {args.seeds} {' '.join(extra)}\n")
    print(
        "| recipe | accuracy | Δ vs none | KL to teacher | sparsity | bits | bytes down+up "
        "| ÷ FP32 FedAvg | ÷ teacher FedAvg | artifact bytes | params |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    baseline = reports.get("none")
    for name, runs in reports.items():
        comm = [r["communication"] for r in runs]
        total = [c["bytes_down"] + c["bytes_up"] for c in comm]
        fp32 = [c["fp32_fedavg_bytes"] / t for c, t in zip(comm, total, strict=True)]
        teach = [c["teacher_fedavg_bytes"] / t for c, t in zip(comm, total, strict=True)]
        diff = (
            _ms(
                [
                    r["student"]["accuracy"] - b["student"]["accuracy"]
                    for r, b in zip(runs, baseline, strict=True)
                ]
            )
            if baseline
            else "—"
        )
        print(
            f"| {name} | {_ms([r['student']['accuracy'] for r in runs])} | {diff} "
            f"| {_ms([r['student']['kl_to_teacher'] for r in runs])} "
            f"| {_ms([r['student']['sparsity'] for r in runs], 2)} "
            f"| {runs[0]['student']['bits']} | {statistics.mean(total) / 1e6:.2f} MB "
            f"| {statistics.mean(fp32):.1f}× | {statistics.mean(teach):.1f}× "
            f"| {statistics.mean(r['student']['bytes'] for r in runs):,.0f} "
            f"| {runs[0]['student']['params']:,} |"
        )
    return 0


def _ms(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
