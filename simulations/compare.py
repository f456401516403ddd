"""Run `edgekd simulate` (with `--baseline` unless `--no-baseline`) over several seeds and
print a markdown table.

    python simulations/compare.py --seeds 0 1 2 -- --partition dirichlet:0.1

Everything after ``--`` goes to ``edgekd simulate``. Each run writes its folder under
``simulations/results/<name>/seed<k>`` (ignored by git); the table shows mean ± std
of the test accuracy (devices' data) and the min-class recall.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = [
    ("teacher", "teacher (server)"),
    ("student", "edgekd student"),
    ("server_only", "server-only KD (tuned)"),
    ("ceiling", "centralised ceiling"),
    ("baseline", "FedAvg from scratch"),
    ("fedavg_warm", "FedAvg from the warm start"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="default")
    parser.add_argument("--no-baseline", action="store_true", help="edgekd student only")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = [a for a in args.rest if a != "--"]
    reports = []
    for seed in args.seeds:
        out = Path("simulations/results") / args.name / f"seed{seed}"
        cmd = ["edgekd", "simulate", "--seed", str(seed), "--out", str(out), *extra]
        if not args.no_baseline:
            cmd.append("--baseline")
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        reports.append(json.loads((out / "report.json").read_text()))
    print(f"\n{args.name}: {' '.join(extra) or 'defaults'}, seeds {args.seeds}\n")
    print("| model | accuracy | min-class recall | ECE |")
    print("|---|---|---|---|")
    for key, label in MODELS:
        if key not in reports[0]:
            continue
        cells = []
        for metric in ("accuracy", "min_class_recall", "ece"):
            vals = [r[key][metric] for r in reports]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if all("server_only" in r for r in reports):
        leads = [r["student"]["accuracy"] - r["server_only"]["accuracy"] for r in reports]
        print(
            "\nedgekd - tuned server-only, per seed: "
            + ", ".join(f"{100 * d:+.2f}" for d in leads)
            + f" points (mean {100 * statistics.mean(leads):+.2f})"
        )
        gaps = [r.get("gap_closed") for r in reports]
        print("share of the server-only -> ceiling gap closed, per seed: " + ", ".join(
            "n/a" if g is None else f"{100 * g:.0f} %" for g in gaps
        ))  # fmt: skip
        chosen = [r["server_only"]["chosen"] for r in reports]
        print("server-only chosen on the clients' validation shares: " + "; ".join(
            f"lr {c['lr']:g}, augment {c['augment'] or 'off'}" for c in chosen
        ))  # fmt: skip
    secs = [r["seconds"] for r in reports]
    print(
        f"\nteacher on server-domain test: "
        f"{statistics.mean(r['teacher']['server_domain_accuracy'] for r in reports):.3f}; "
        f"mean wall time {statistics.mean(secs):.0f} s per run"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
