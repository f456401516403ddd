"""Run `edgekd simulate --scenario S --cl-method all` over several seeds and print a markdown
table of the seven methods (mean ± std over the seeds).

    python simulations/continual.py --scenario class-incremental --seeds 0 1 2 -- \\
        --num-clients 10 --partition dirichlet:0.5

Everything after ``--`` goes to ``edgekd simulate``. Each seed's run folder lands in
``simulations/results/<name>/seed<k>`` (ignored by git; ``<name>`` defaults to the scenario),
with one sub-folder per method; the table and the per-seed numbers are also written to
``simulations/results/<name>/summary.json`` and ``summary.md``. A seed whose folder already
holds a finished ``continual.json`` is not run again (``--rerun`` forces it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

METRICS = [
    ("avg_accuracy", "avg accuracy"),
    ("min_diagonal", "lowest R_ii, any seed"),
    ("forgetting", "forgetting"),
    ("bwt", "BWT"),
    ("fwt", "FWT"),
    ("wall_time", "wall time (s)"),
]


def mean_std(values: list[float], digits: int) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.mean(finite):.{digits}f} ± {sd:.{digits}f}"


def metric(entry: dict[str, Any], key: str) -> float:
    """One method's metric; ``min_diagonal`` is the lowest accuracy on a task right after
    training on it (the smallest diagonal entry of its accuracy matrix R)."""
    if key == "min_diagonal":
        matrix = entry["matrix"]
        return min(row[i] for i, row in enumerate(matrix))
    return entry[key]


def table(reports: list[dict[str, Any]]) -> str:
    methods = list(reports[0]["continual"])
    lines = [
        "| method | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for method in methods:
        cells = []
        for key, _ in METRICS:
            values = [metric(r["continual"][method], key) for r in reports]
            if key == "min_diagonal":  # the must-show is a floor for every seed: the minimum
                cells.append(f"{min(values):.3f}")
            else:
                cells.append(mean_std(values, 0 if key == "wall_time" else 3))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    teacher = [r["teacher"]["avg_accuracy"] for r in reports]
    lines.append("")
    lines.append(f"teacher (trained on every task): avg accuracy {mean_std(teacher, 3)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", required=True, choices=["class-incremental", "domain-incremental"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", help="results folder name (default: the scenario)")
    parser.add_argument("--rerun", action="store_true", help="run seeds that already finished")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = [a for a in args.rest if a != "--"]
    root = Path("simulations/results") / (args.name or args.scenario)
    reports = []
    for seed in args.seeds:
        out = root / f"seed{seed}"
        done = out / "continual.json"
        if args.rerun or not done.exists():
            cmd = [
                "edgekd",
                "simulate",
                "--scenario",
                args.scenario,
                "--cl-method",
                "all",
                "--seed",
                str(seed),
                "--out",
                str(out),
                *(["--force"] if args.rerun else []),  # replace the earlier run's folder
                *extra,
            ]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        reports.append(json.loads(done.read_text()))
    header = f"{args.scenario}: {' '.join(extra) or 'defaults'}, seeds {args.seeds}"
    text = f"{header}\n\n{table(reports)}\n"
    print(f"\n{text}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.md").write_text(text)
    per_seed = {
        str(seed): {
            m: {k: metric(r["continual"][m], k) for k, _ in METRICS} for m in r["continual"]
        }
        for seed, r in zip(args.seeds, reports, strict=True)
    }
    (root / "summary.json").write_text(json.dumps({"header": header, "seeds": per_seed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
