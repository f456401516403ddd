"""Run `edgekd simulate --set fleet.classes=...` over several seeds and print a markdown
table: each class's student (the fleet, with the FedDF step across classes) against the
same student in a federation of its own class only, on the devices' test split, with
each seed's numbers and the nodes' pooled validation shares (the tuning split).

    python simulations/fleet.py --seeds 0 1 2 -- --set fleet.classes=pi:0.5,jetson:0.5

Everything after ``--`` goes to ``edgekd simulate``. Each seed's run folder lands in
``simulations/results/<name>/seed<k>`` (ignored by git; ``--name``, default ``fleet``);
the table is also written to ``summary.md`` there. A seed whose folder holds a finished
``report.json`` is not run again (``--rerun`` forces it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_seed(folder: Path, seed: int, extra: list[str], rerun: bool) -> dict[str, Any]:
    report = folder / "report.json"
    if rerun or not report.is_file():
        command = ["edgekd", "simulate", "--seed", str(seed), "--out", str(folder), *extra]
        if folder.exists():
            command.append("--force")
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads(report.read_text())


def table(reports: dict[int, dict[str, Any]]) -> str:
    seeds = sorted(reports)
    names = list(reports[seeds[0]]["fleet"]["classes"])
    blocks = {n: [reports[s]["fleet"]["classes"][n] for s in seeds] for n in names}
    server_only = all("server_only" in b for bs in blocks.values() for b in bs)
    head = "| class | width | fleet | own class only | gain, points (min) | per seed, fleet vs own "
    head += "| val, fleet vs own |" + (" server-only KD |" if server_only else "")
    lines = [head, "|---" * (8 if server_only else 7) + "|"]
    for name in names:
        fleet = [b["accuracy"] for b in blocks[name]]
        own = [b["own_class"]["accuracy"] for b in blocks[name]]
        gains = [100 * (f - o) for f, o in zip(fleet, own, strict=True)]
        per_seed = " / ".join(f"{f:.4f} vs {o:.4f}" for f, o in zip(fleet, own, strict=True))
        val = " / ".join(
            f"{b['val_accuracy']:.4f} vs {b['own_class']['val_accuracy']:.4f}" for b in blocks[name]
        )
        row = (
            f"| {name} | {blocks[name][0]['width']} | {_mean_sd(fleet)} | {_mean_sd(own)} | "
            f"{statistics.mean(gains):+.2f} ({min(gains):+.2f}) | {per_seed} | {val} |"
        )
        if server_only:
            row += f" {_mean_sd([b['server_only']['accuracy'] for b in blocks[name]])} |"
        lines.append(row)
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="fleet", help="results sub-folder (fleet)")
    parser.add_argument("--rerun", action="store_true", help="run seeds that have a report")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then edgekd simulate flags")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    if not any(e.startswith("fleet.classes=") for e in extra):
        extra = [*extra, "--set", "fleet.classes=pi:0.5,jetson:0.5"]
    root = Path(__file__).parent / "results" / args.name
    reports = {s: run_seed(root / f"seed{s}", s, extra, args.rerun) for s in args.seeds}
    text = table(reports)
    (root / "summary.md").write_text(f"edgekd simulate {' '.join(extra)}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
