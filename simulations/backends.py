"""The same federation with the simulated nodes on each runtime (`client.backend`),
over several seeds, and each graph fleet's difference from the torch fleet.

    python simulations/backends.py --seeds 0 1 2 [--backends torch onnxruntime ...] [-- ARGS]

Everything after ``--`` goes to every ``edgekd simulate``. Runs land in
``simulations/results/backends/<backend>/seed<k>`` (ignored by git). ``litert`` needs
``edgekd[litert]`` (the converter runs in every Ray worker). The table gives the final
student's accuracy on the devices' test split per seed, and each backend's mean
difference from ``torch`` on the same seeds (the issue's bar: within 1 point).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--backends", nargs="+", default=["torch", "onnxruntime", "mixed:0.5", "litert"]
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = [a for a in args.rest if a != "--"]
    accuracy: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for backend in args.backends:
        for seed in args.seeds:
            out = Path("simulations/results/backends") / backend.replace(":", "-") / f"seed{seed}"
            cmd = ["edgekd", "simulate", "--seed", str(seed), "--out", str(out), "--force"]
            cmd += ["--set", f"client.backend={backend}", *extra]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            report = json.loads((out / "report.json").read_text())
            accuracy.setdefault(backend, []).append(report["student"]["accuracy"])
            seconds.setdefault(backend, []).append(report["seconds"])
    print(f"\nclient.backend, seeds {args.seeds}: {' '.join(extra) or 'defaults'}\n")
    seed_cols = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"| backend | {seed_cols} | mean | vs torch | run s |")
    print("|---|" + "---|" * (len(args.seeds) + 3))
    base = accuracy.get("torch")
    for backend, values in accuracy.items():
        cells = " | ".join(f"{v:.4f}" for v in values)
        diff = (
            f"{100 * statistics.mean(v - b for v, b in zip(values, base, strict=True)):+.2f} pt"
            if base is not None
            else "—"
        )
        print(
            f"| `{backend}` | {cells} | {statistics.mean(values):.4f} | {diff} | "
            f"{statistics.mean(seconds[backend]):.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
