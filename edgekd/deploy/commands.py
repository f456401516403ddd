"""``edgekd deploy build`` and ``edgekd deploy check``: the argparse wiring.

`register` adds the ``deploy`` command to the ``edgekd`` parser's subparsers; `cmd_build`
and `cmd_check` return the exit code: 0 done (check: every threshold met), 1 the check
ran and a parity threshold or budget was missed (the table says which), 2 an error,
reported as one line (``edgekd: error: ...``) without a traceback.

Only argparse and the standard library at import time: ``edgekd --help`` stays fast and a
device without torch can run ``edgekd deploy check``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["cmd_build", "cmd_check", "register"]

TARGETS = ("raspberry-pi", "android", "jetson")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``deploy build`` / ``deploy check`` to ``subparsers`` (from ``add_subparsers``)."""
    from edgekd.deploy.bundle import DEFAULT_DEVICE_DATA_DIR, DEFAULT_SUPERLINK

    deploy = subparsers.add_parser("deploy", help="build and check device bundles")
    sub = deploy.add_subparsers(dest="deploy_command", required=True)

    build = sub.add_parser("build", help="build a device bundle from a student checkpoint")
    build.add_argument("--model", required=True, help="student checkpoint, e.g. RUN/student.pt")
    build.add_argument(
        "--target",
        required=True,
        help=f"device profile: {', '.join(TARGETS)}, or a profile .toml file",
    )
    build.add_argument("--out", required=True, help="bundle folder (must be empty or absent)")
    build.add_argument(
        "--superlink",
        default=DEFAULT_SUPERLINK,
        help=f"SuperLink Fleet API address HOST:PORT for client.toml ({DEFAULT_SUPERLINK})",
    )
    build.add_argument(
        "--data-dir",
        default=DEFAULT_DEVICE_DATA_DIR,
        help=f"the device's local data folder, for client.toml ({DEFAULT_DEVICE_DATA_DIR})",
    )
    build.add_argument(
        "--run",
        help="run folder whose report.json gives the data config (default: the model's folder)",
    )
    build.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    build.add_argument(
        "--sign-key", help="private key (EC or Ed25519) that signs the manifest: manifest.sig"
    )
    build.set_defaults(func=cmd_build)

    check = sub.add_parser("check", help="verify a bundle, re-run parity, time it on this host")
    check.add_argument("bundle", help="bundle folder")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument("--threads", type=int, help="runtime threads (the profile's)")
    check.add_argument("--verify-key", help="public key the manifest must be signed with")
    check.set_defaults(func=cmd_check)
    return deploy


def _fail(message: str) -> int:
    print(f"edgekd: error: {message}", file=sys.stderr)
    return 2


def _one_line(exc: BaseException) -> str:
    from edgekd.core.errors import one_line_error

    return one_line_error(exc)


def cmd_build(args: argparse.Namespace) -> int:
    from edgekd.deploy.bundle import BundleError, build_bundle, load_bundle
    from edgekd.deploy.parity import ParityError
    from edgekd.deploy.profiles import ProfileError

    try:
        out = build_bundle(
            args.model,
            args.target,
            args.out,
            superlink=args.superlink,
            data_dir=args.data_dir,
            run_dir=args.run,
            force=args.force,
            sign_key=args.sign_key,
        )
        bundle = load_bundle(out)
    except (BundleError, ParityError, ProfileError) as exc:
        return _fail(_one_line(exc))
    except OSError as exc:
        return _fail(f"cannot write {args.out}: {_one_line(exc)}")
    files = bundle.manifest["files"]
    print(f"bundle {out} ({bundle.profile.name}, {bundle.profile.backend}): {len(files)} files")
    print(_files_table(files))
    for note in bundle.manifest.get("notes", []):
        print(f"note: {note}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from edgekd.deploy.bundle import BundleError, check_bundle

    if args.threads is not None and args.threads < 1:
        return _fail(f"--threads must be >= 1, got {args.threads}")
    try:
        result = check_bundle(args.bundle, threads=args.threads, verify_key=args.verify_key)
    except BundleError as exc:
        return _fail(_one_line(exc))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_check(result))
    return 0 if result["ok"] else 1


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _files_table(files: dict[str, dict[str, Any]]) -> str:
    rows = [f"{'file':<22}{'bytes':>10}  {'role':<10}{'precision':<13}{'top-1 agree':>12}"]
    for name, entry in files.items():
        parity = entry.get("parity") or {}
        rows.append(
            f"{name:<22}{entry['bytes']:>10,}  {entry.get('role', '-'):<10}"
            f"{entry.get('precision', '-'):<13}{_num(parity.get('top1_agreement'), '.4f'):>12}"
        )
    return "\n".join(rows)


def render_check(result: dict[str, Any]) -> str:
    """The short table ``edgekd deploy check`` prints."""
    from edgekd.deploy.host import describe_host  # numpy only, like the check itself

    lines = [
        f"bundle {result['bundle']} ({result['target']}, {result['backend']}): "
        f"{result['verified_files']} files verified; parity on {result['parity_samples']} "
        "stored test samples vs FP32 torch",
        f"{'file':<22}{'precision':<13}{'runtime':<34}{'max|dz|':>9}{'top-1':>8}"
        f"{'acc':>8}{'torch':>8}  ok",
    ]
    for name, p in result["parity"].items():
        if "skipped" in p:
            lines.append(f"{name:<22}skipped: {p['skipped']}")
            continue
        lines.append(
            f"{name:<22}{p['precision']:<13}{p['runtime']:<34}{p['max_abs_logit_diff']:>9.2g}"
            f"{p['top1_agreement']:>8.4f}{p['accuracy']:>8.4f}{p['torch_accuracy']:>8.4f}"
            f"  {'yes' if p['ok'] else 'NO'}"
        )
    build = result.get("build_host")
    lines.append(f"signature: {result.get('signature', 'not checked')}")
    lines.append(f"this host:  {describe_host(result['host'])}")
    lines.append(
        f"build host: {describe_host(build)} (the manifest's parity)"
        if build
        else "build host: not recorded (a bundle built before edgekd recorded it)"
    )
    lat, size, mem = result["latency"], result["model_bytes"], result["memory"]
    lines.append(
        f"latency {lat['model']} ({lat['runtime']}, {lat['threads']} threads, batch 1): "
        f"p50 {lat['p50_ms']:.3f} ms, p95 {lat['p95_ms']:.3f} ms"
    )
    lines.append(
        f"model {size['bytes']:,} B (budget {size['max_model_bytes']:,}); memory "
        f"+{_num(mem['rss_growth_mb'], '.1f')} MB RSS (budget {mem['max_memory_mb']:g} MB)"
    )
    lines += [f"note: {note}" for note in result["notes"]]
    lines += [f"MISSED: {problem}" for problem in result["problems"]]
    lines.append("ok" if result["ok"] else "FAILED")
    return "\n".join(lines)
