"""The ``edgekd`` command.

``edgekd simulate`` runs a federated distillation on Flower's simulation engine
(Ray) and writes a run folder; ``edgekd server start`` / ``edgekd client start`` run
the same apps on Flower's Deployment Engine (`edgekd.cli.fleet`). Bad input (unknown
dataset or key, a partition spec out of range, a teacher of another architecture, a
missing data file) ends with one line naming the problem and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from edgekd.cli.preflight import UsageError, build_config, continual_preflight, preflight
from edgekd.cli.ray_cluster import backend_config, check_ray_address, ray_address
from edgekd.cli.sim_poller import pending_inbox_poller
from edgekd.core.config import (
    CONTINUAL_METHODS,
    CONTINUAL_SCENARIOS,
    EdgeKDConfig,
)
from edgekd.core.errors import EdgeKDError, one_line_error
from edgekd.core.run_folder import claim_run_folder, writable_folder


def simulate_config(args: argparse.Namespace) -> EdgeKDConfig:
    flags = {
        "data.dataset": args.dataset,
        "data.partition": args.partition,
        "data.data-dir": args.data_dir,
        "train.num-rounds": args.rounds,
        "seed": args.seed,
        "out-dir": args.out,
        "baseline": True if args.baseline else None,
        "model.teacher-path": args.teacher,
        "faults": args.faults,
        "continual.scenario": args.scenario,
        "continual.tasks": args.tasks,
        "continual.rounds-per-task": args.rounds_per_task,
        "continual.method": args.cl_method,
        "sim.ray-address": args.ray_address,
    }
    cfg = build_config(args.config, args.set, flags)
    continual_flags = (args.tasks, args.rounds_per_task, args.cl_method)
    if not cfg.continual.scenario and any(v is not None for v in continual_flags):
        raise UsageError("--tasks, --rounds-per-task and --cl-method need --scenario")
    if cfg.continual.scenario and args.rounds is not None:
        raise UsageError("--rounds does not apply to a continual run; use --rounds-per-task")
    if cfg.continual.scenario and cfg.baseline:
        raise UsageError("--baseline does not apply to a continual run; --cl-method all compares")
    if args.num_clients < 1:
        raise UsageError(f"--num-clients must be >= 1, got {args.num_clients}")
    train = replace(cfg.train, min_nodes=min(cfg.train.min_nodes, args.num_clients))
    out = cfg.out_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}"
    return replace(cfg, train=train, out_dir=out)


def cmd_simulate(args: argparse.Namespace) -> int:
    cfg = simulate_config(args)
    check_ray_address(ray_address(cfg))
    # Input checks first, so refused input leaves no folder behind; then, before Ray or
    # any training, a finished run is never overwritten without --force.
    (continual_preflight if cfg.continual.scenario else preflight)(cfg, args.num_clients)
    claim_run_folder(cfg.out_dir, force=args.force or cfg.resume)
    if cfg.continual.scenario:
        return simulate_continual(cfg, args)

    from edgekd.client.app import make_client_app
    from edgekd.server.app import make_server_app

    _quiet_flower(args.verbose)
    print(
        f"edgekd simulate: {cfg.data.dataset}, {args.num_clients} clients, "
        f"{cfg.train.num_rounds} rounds, partition {cfg.data.partition}, "
        f"client shift {'on' if cfg.data.client_shift else 'off'} -> {cfg.out_dir}",
        flush=True,
    )
    report_path = _run_simulation(
        make_server_app(cfg), make_client_app(cfg), cfg, args.num_clients, args.verbose
    )
    print_summary(json.loads(report_path.read_text()))
    print(f"report: {report_path}")
    return round_verdict(Path(cfg.out_dir))


def _run_simulation(
    server_app: Any, client_app: Any, cfg: EdgeKDConfig, num_clients: int, verbose: bool
) -> Path:
    """Flower's Ray simulation (local, or the cluster of `ray_cluster`); the report's path."""
    from flwr.simulation import run_simulation

    if address := ray_address(cfg):
        print(
            f"edgekd simulate: attaching to the Ray cluster at {address} "
            f"({cfg.sim.client_cpus:g} CPU, {cfg.sim.client_gpus:g} GPU per simulated node)",
            flush=True,
        )
    try:
        with pending_inbox_poller():  # Flower's polls every node 10x a second
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config=backend_config(cfg),
                verbose_logging=verbose,
            )
    except KeyboardInterrupt:
        _leave_interrupted(Path(cfg.out_dir))
    report_path = Path(cfg.out_dir) / "report.json"
    if not report_path.exists():
        raise UsageError(
            f"the simulation ended without a report ({report_path}); rerun with --verbose"
        )
    return report_path


def _leave_interrupted(out_dir: Path) -> NoReturn:
    """Ctrl-C during a simulation: exit now, with status 130.

    Flower's simulation engine takes the KeyboardInterrupt in the main thread only; its
    server thread goes on waiting for nodes that have stopped (the message timeout, 10
    minutes a round), so returning normally would leave the process hanging for an
    hour. Leaving at once loses nothing saved: every round's checkpoint is written to a
    temporary file and renamed into place, and Ray's local processes share the driver's
    fate."""
    print(
        f"\nedgekd simulate: interrupted; continue from the last completed round with "
        f"the same command and --set resume=true (run folder {out_dir})",
        file=sys.stderr,
        flush=True,
    )
    logging.shutdown()
    os._exit(130)


def _quiet_flower(verbose: bool) -> None:
    if not verbose:
        # Flower warns that run_simulation is deprecated in favour of `flwr run`; both
        # are supported here, so keep the progress bars readable.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate_continual(cfg: EdgeKDConfig, args: argparse.Namespace) -> int:
    """``edgekd simulate --scenario ...``: a continual run (one method, or ``all`` of them on
    the same stream, teacher and initial student), ending with a comparison table."""
    # The ordinary apps hand a run with continual.scenario to the continual handlers.
    from edgekd.client.app import make_client_app
    from edgekd.server.app import make_server_app

    _quiet_flower(args.verbose)
    cl = cfg.continual
    print(
        f"edgekd simulate: {cl.scenario}, {cl.tasks} tasks x {cl.rounds_per_task} rounds, "
        f"method {cl.method}, {args.num_clients} clients, partition {cfg.data.partition} "
        f"within each task -> {cfg.out_dir}",
        flush=True,
    )
    report_path = _run_simulation(
        make_server_app(cfg),
        make_client_app(cfg),
        cfg,
        args.num_clients,
        args.verbose,
    )
    print()
    print(continual_table(json.loads(report_path.read_text())["continual"]))
    print(f"\nreport: {report_path}")
    return round_verdict(Path(cfg.out_dir))


def round_verdict(out_dir: Path) -> int:
    """Warn on stderr about the skipped rounds of every ``rounds.jsonl`` in the run folder
    (a method's sub-folder too); 1 when some run skipped every round, so its student is
    the one it started from, else 0.

    A round is skipped when fewer nodes than ``train.min-fraction`` of those asked sent a
    valid update: a node that fails on every round (bad data, a partition it cannot cut)
    otherwise leaves nothing but a normal-looking table."""
    status = 0
    for path in sorted(out_dir.glob("rounds.jsonl")) + sorted(out_dir.glob("*/rounds.jsonl")):
        rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rounds = [r for r in rounds if r.get("round", 0) > 0]
        skipped = [r for r in rounds if r.get("skipped")]
        if not skipped:
            continue
        failed = sum(r.get("failures", 0) for r in skipped)
        rejected = sum(r.get("rejected", 0) for r in skipped)
        reason = next((r["reasons"][0] for r in skipped if r.get("reasons")), "")
        every = len(skipped) == len(rounds)
        print(
            f"edgekd: {'error' if every else 'warning'}: {len(skipped)} of {len(rounds)} "
            f"rounds skipped in {path} (too few valid updates for train.min-fraction: "
            f"{failed} failed and {rejected} rejected replies)"
            + ("; the student never left its starting point" if every else "")
            + (f"; first reason: {_last_line(reason)}" if reason else ""),
            file=sys.stderr,
        )
        status = 1 if every else status
    return status


def _last_line(reason: str) -> str:
    """The line of a node's error that names it (a Ray traceback ends with the message)."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def continual_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the methods' final average accuracy, forgetting, BWT, FWT and
    wall time (the ``continual`` block of a report)."""

    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        "| method | avg accuracy | forgetting | BWT | FWT | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method, m in results.items():
        lines.append(
            f"| {method} | {num(m.get('avg_accuracy'))} | {num(m.get('forgetting'))} | "
            f"{num(m.get('bwt'))} | {num(m.get('fwt'))} | {m.get('wall_time', 0.0):.0f} |"
        )
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Fidelity of a student (torch, ONNX or TFLite) against the teacher."""
    from edgekd.inspection import ModelFileError, render_markdown, run_inspect

    run = Path(args.run) if args.run else None
    if run is not None and not (run / "report.json").exists():
        raise UsageError(f"--run {run}: no report.json there (expected a simulate run folder)")
    if args.bootstrap < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    teacher = args.teacher or (str(run / "teacher.pt") if run else None)
    student = args.student or (str(run / "student.pt") if run else None)
    if teacher is None or student is None:
        raise UsageError("give --teacher and --student, or --run RUN_DIR")
    base = EdgeKDConfig()
    if run is not None:  # the data the run was trained on, unless flags say otherwise
        base = base.with_overrides(run_report_config(run / "report.json"))
    flags = {"data.dataset": args.dataset, "data.data-dir": args.data_dir, "seed": args.seed}
    cfg = build_config(args.config, args.set, flags, base=base)
    out = writable_folder(args.out_dir or (run / "fidelity" if run else "fidelity"), "--out")
    try:
        report = run_inspect(
            teacher,
            student,
            dataset_cfg=cfg.data,
            seed=cfg.seed,
            out_dir=out,
            bootstrap=args.bootstrap,
            calibrate=args.calibrate,
            compressed_path=args.compressed,
        )
    except ModelFileError as exc:
        raise UsageError(str(exc)) from None
    print(render_markdown(report))
    print(f"fidelity report: {out / 'fidelity.md'}")
    return 0


def run_report_config(path: Path) -> dict[str, Any]:
    """The ``config`` block of a run's report.json; `UsageError` naming the file when it
    is truncated, not JSON, or has no config."""
    try:
        config = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} has no readable 'config' ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: 'config' is not a table of keys")
    return config


def print_summary(report: dict[str, Any]) -> None:
    if "fleet" in report:
        print(fleet_summary(report))
        return
    rows = [("teacher", report["teacher"]), ("edgekd student", report["student"])]
    for key, name in (
        ("student_int8", "student INT8 ONNX"),
        ("server_only", "server-only KD"),
        ("ceiling", "centralised ceiling"),
        ("baseline", "FedAvg from scratch"),
        ("fedavg_warm", "FedAvg, warm start"),
    ):
        if key in report:
            rows.append((name, report[key]))
    print(f"\n{'model':<20}{'accuracy':>9}{'params':>9}{'ECE':>7}{'min recall':>11}{'agree':>7}")
    for name, m in rows:
        agree = m.get("agreement")
        print(
            f"{name:<20}{m['accuracy']:>9.4f}{m['params']:>9d}{m['ece']:>7.3f}"
            f"{m['min_class_recall']:>11.3f}{'' if agree is None else f'{agree:.3f}':>7}"
        )
    t = report["teacher"]
    comm = report["communication"]
    print(
        f"teacher on server-domain test: {t['server_domain_accuracy']:.4f}; "
        f"bytes down {comm['bytes_down']:,}, up {comm['bytes_up']:,}; "
        f"{report['seconds']:.0f} s"
    )
    if "ceiling" in report:
        print(comparator_summary(report))
    int8 = report.get("student_int8")
    if int8 is not None:
        print(int8_verdict(int8))
    if report["config"].get("faults"):
        print(fault_drill_summary(report["config"]["faults"], report["rounds"]))
    print()


def fleet_summary(report: dict[str, Any]) -> str:
    """A fleet run's table: each class's student against its comparators."""
    lines = [
        f"\n{'class':<10}{'width':>6}{'nodes':>6}{'params':>8}{'accuracy':>9}"
        f"{'own class':>10}{'gain':>8}{'server-only':>12}{'MB up':>7}"
    ]
    for name, c in report["fleet"]["classes"].items():
        so = c.get("server_only", {}).get("accuracy")
        lines.append(
            f"{name:<10}{c['width']:>6}{c['nodes']:>6}{c['params']:>8}{c['accuracy']:>9.4f}"
            f"{c['own_class']['accuracy']:>10.4f}{100 * c['gain_over_own_class']:>+8.2f}"
            f"{'' if so is None else f'{so:.4f}':>12}{c['bytes_up'] / 1e6:>7.2f}"
        )
    t = report["teacher"]
    lines.append(
        f"teacher {t['accuracy']:.4f} on the devices' test split; {report['seconds']:.0f} s"
    )
    return "\n".join(lines) + "\n"


def comparator_summary(report: dict[str, Any]) -> str:
    """How the tuned comparators were chosen, and the share of the server-only ->
    ceiling gap the federated student closes (`edgekd.server.comparators`)."""
    so, ceiling, gap = report["server_only"], report["ceiling"], report.get("gap_closed")
    lead = report["student"]["accuracy"] - so["accuracy"]
    closed = "no gap to close" if gap is None else f"{100 * gap:.0f} % of the gap closed"
    return (
        f"server-only KD tuned on the clients' validation shares: lr {so['chosen']['lr']:g}, "
        f"augment {so['chosen']['augment'] or 'off'}; ceiling augment "
        f"{ceiling['chosen']['augment'] or 'off'}; edgekd vs server-only {100 * lead:+.2f} "
        f"points, {closed}"
    )


def fault_drill_summary(plan: str, rounds: list[dict[str, Any]]) -> str:
    """Per round: replies rejected, updates clipped, and why (each distinct reason once,
    with how many nodes gave it)."""
    import re
    from collections import Counter

    lines = [f"fault drill {plan!r}: per round rejected / clipped / skipped, and why"]
    for r in rounds[1:]:
        why = Counter(re.sub(r"^node \d+(?: \(evaluate\))?: ", "", x) for x in r.get("reasons", []))
        reasons = "; ".join(f"{n}x {text}" for text, n in why.most_common())
        lines.append(
            f"  round {r['round']:>3}: {r['rejected']} / {r.get('clipped', 0)} / {r['skipped']}"
            + (f"  ({reasons})" if reasons else "")
        )
    return "\n".join(lines)


def int8_verdict(int8: dict[str, Any]) -> str:
    """One line on the INT8 export: where it was measured and whether it passed the
    device profile's parity gate; a failure is loud."""
    from edgekd.deploy.host import describe_host

    parity = int8["parity"]
    where = f"on {describe_host(int8['host'])}"
    if not int8["ok"]:
        return (
            f"!!! INT8 ONNX student FAILS the {int8['profile']} parity gate {where}: "
            + "; ".join(int8["problems"])
            + " -- do not deploy student.int8.onnx from this run"
        )
    return (
        f"INT8 ONNX student: top-1 agreement with FP32 {parity['top1_agreement']:.4f}, "
        f"accuracy {parity['accuracy'] - parity['torch_accuracy']:+.4f} "
        f"({int8['profile']} parity gate passed {where})"
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgekd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated KD simulation (Flower + Ray)")
    sim.add_argument("--config", help="TOML file with config keys (see README)")
    sim.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a key; repeatable"
    )
    sim.add_argument("--dataset", help="mnist1d (default), digits, mnist, fashion-mnist, cifar10")
    sim.add_argument("--data-dir", help="folder with the IDX / CIFAR files for file datasets")
    sim.add_argument("--num-clients", type=int, default=20, help="simulated SuperNodes (20)")
    sim.add_argument("--rounds", type=int, help="federated rounds (20)")
    sim.add_argument(
        "--partition", help="iid | dirichlet:<alpha> | pathological:<k> (dirichlet:0.5)"
    )
    sim.add_argument("--seed", type=int, help="seed for data, partitions and training (42)")
    sim.add_argument("--teacher", help="load this teacher checkpoint instead of training one")
    sim.add_argument("--out", help="run folder (runs/<timestamp>)")
    sim.add_argument(
        "--force", action="store_true", help="overwrite a run folder that holds a run already"
    )
    sim.add_argument(
        "--baseline",
        action="store_true",
        help="also train FedAvg without a teacher and a server-only KD student",
    )
    sim.add_argument(
        "--faults",
        metavar="FAULT=SHARE,...",
        help="fault drill: a share of the nodes misbehave from round 1, e.g. "
        "'scale:1e6=0.1,nan=0.05,examples:1e9=0.05' (scale:<k>, nan, examples:<n>)",
    )
    sim.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the simulated nodes on this Ray cluster (`ray start --head`) instead of a "
        "local instance; $RAY_ADDRESS also does",
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's logs")
    cont = sim.add_argument_group("continual learning (tasks arrive one after another)")
    cont.add_argument(
        "--scenario",
        choices=CONTINUAL_SCENARIOS,
        help="run a continual federation on this mnist1d stream instead of plain KD",
    )
    cont.add_argument("--tasks", type=int, help="tasks in the stream (5)")
    cont.add_argument(
        "--rounds-per-task", type=int, help="federated rounds on each task before the next (15)"
    )
    cont.add_argument(
        "--cl-method",
        choices=[*CONTINUAL_METHODS, "all"],
        help="anti-forgetting method (teacher-kd); all: the seven on the same stream, compared",
    )
    sim.set_defaults(func=cmd_simulate)

    ins = sub.add_parser("inspect", help="fidelity of a student against its teacher")
    ins.add_argument("--run", help="a simulate run folder: its teacher.pt, student.pt and data")
    ins.add_argument("--teacher", help="teacher checkpoint (.pt)")
    ins.add_argument("--student", help="student: .pt checkpoint, .onnx or .tflite file")
    ins.add_argument("--compressed", help="compressed .pt student for per-layer robustness")
    ins.add_argument("--config", help="TOML file with data keys (see README)")
    ins.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
    ins.add_argument("--dataset", help="dataset the models were trained for")
    ins.add_argument("--data-dir", help="folder with the IDX / CIFAR files")
    ins.add_argument("--seed", type=int, help="data and bootstrap seed (the run's)")
    ins.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    ins.add_argument(
        "--calibrate", action="store_true", help="also fit temperature scaling on the public split"
    )
    ins.add_argument("--out", dest="out_dir", help="folder for fidelity.json/.md and PNGs")
    ins.set_defaults(func=cmd_inspect)

    from edgekd.cli import fleet
    from edgekd.deploy import commands as deploy_commands

    deploy_commands.register(sub)
    fleet.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except EdgeKDError as exc:  # every bad input or state edgekd names (common/errors.py)
        print(f"edgekd: error: {one_line_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
