"""What a simulation costs as the fleet grows and the clients sampled per round stay fixed.

    python benchmarks/scale.py [--clients 20 200 2000 10000] [--sampled 50] [--rounds 3]
                               [--out benchmarks/results/scale] [--set KEY=VALUE ...]

Each fleet size is one `edgekd simulate` process (a fresh local Ray instance, the same
cached teacher), with ``train.fraction-train = sampled / clients`` (all of them when the
fleet is smaller). While it runs, every process it starts (Ray's GCS, raylet and
workers included: they inherit a tag in their environment) is read from /proc twice a
second; peak memory is the largest sum of their PSS (proportional set size, so pages
Ray's workers share are counted once). Seconds per round come from the run's
``report.json``; round 1 also pays for the teacher's ONNX export and for starting the
nodes' actors, so later rounds are reported on their own. Writes ``scale.json``,
``scale.md`` (the table in docs/scale.md) and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

TAG = "EDGEKD_SCALE_TAG"


def _tree_pss(tag: str) -> tuple[int, int]:
    """(sum of PSS in bytes, number of processes) of every process carrying ``tag``."""
    needle = f"{TAG}={tag}".encode()
    total = count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    count += 1
                    break
        except OSError:  # gone, or not readable
            continue
    return total, count


def run_one(clients: int, sampled: int, rounds: int, out: Path, extra: list[str]) -> dict:
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG: tag}
    fraction = min(1.0, sampled / clients)
    command = [sys.executable, "-m", "edgekd.cli", "simulate", "--num-clients", str(clients)]
    command += ["--rounds", str(rounds), "--out", str(out), "--force"]
    command += ["--set", f"train.fraction-train={fraction}", *extra]
    peak = {"pss": 0, "processes": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            pss, count = _tree_pss(tag)
            if pss > peak["pss"]:
                peak.update(pss=pss, processes=count)

    watcher = threading.Thread(target=watch, daemon=True)
    start = time.monotonic()
    watcher.start()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    done.set()
    watcher.join()
    if result.returncode != 0:
        raise SystemExit(f"{clients} clients failed:\n{result.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    seconds = [r["seconds"] for r in report["rounds"] if r["round"] >= 1]
    return {
        "clients": clients,
        "sampled": round(fraction * clients),
        "evaluated": max(r["eval_messages"] for r in report["rounds"]),
        "wall_s": round(wall, 1),
        "round_s": [round(s, 2) for s in seconds],
        "later_round_s": round(sum(seconds[1:]) / max(1, len(seconds) - 1), 2),
        "peak_pss_gb": round(peak["pss"] / 2**30, 2),
        "processes": peak["processes"],
        "accuracy": report["student"]["accuracy"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| clients | trained / evaluated per round | round 1 (s) | later rounds (s) "
        "| wall (s) | peak memory, process tree (GB) | processes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']:,} | {r['sampled']} / {r['evaluated']} | {r['round_s'][0]:.1f} "
            f"| {r['later_round_s']:.2f} | {r['wall_s']:.0f} | {r['peak_pss_gb']:.2f} "
            f"| {r['processes']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    n = [r["clients"] for r in rows]
    ax1.plot(n, [r["round_s"][0] for r in rows], "o-", label="round 1")
    ax1.plot(n, [r["later_round_s"] for r in rows], "s-", label="later rounds")
    ax1.set(xscale="log", xlabel="simulated clients", ylabel="seconds per round")
    ax1.legend()
    ax2.plot(n, [r["peak_pss_gb"] for r in rows], "o-")
    ax2.set(xscale="log", xlabel="simulated clients", ylabel="peak memory (GB, PSS)")
    ax2.set_ylim(bottom=0)
    most = max(r["sampled"] for r in rows)
    fig.suptitle(f"edgekd simulate, up to {most} clients trained per round (3 rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 200, 2000, 10000])
    parser.add_argument("--sampled", type=int, default=50, help="clients trained per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [arg for kv in args.set for arg in ("--set", kv)]
    rows: list[dict[str, Any]] = []
    for clients in args.clients:
        run_dir = args.out / f"run-{clients}"
        row = run_one(clients, args.sampled, args.rounds, run_dir, extra)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if "--teacher" not in extra:  # every later fleet distils from this teacher
            extra += ["--teacher", str(run_dir / "teacher.pt")]
    (args.out / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "scale.md").write_text(table(rows))
    plot(rows, args.out / "scale.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
