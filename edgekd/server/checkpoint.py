"""The server's per-round checkpoint: what a restarted server needs to go on.

After every completed round the ServerApp writes ``RUN_DIR/checkpoint.npz``: the
global student, the pruning state (masks and movement pruning's W0), the round, the
RNG states, the round records so far, the teacher's hash and the run's config. It is
written to a temp file in the same folder and renamed over the old one, so a crash
leaves either the previous checkpoint or the new one, never half of one.
`edgekd server start --resume RUN_DIR` (run config ``resume = true``) reads it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.core.errors import EdgeKDError

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT_VERSION = 1
# Keys that may differ between the interrupted run and its resumption.
# Keys a resumed run may change: they do not change what it computes. The sim.* keys
# say where the simulated nodes run (another Ray cluster, more CPUs per node).
RESUMABLE_KEYS = frozenset(
    {
        "resume",
        "out-dir",
        "train.round-timeout",
        "train.num-rounds",
        "sim.ray-address",
        "sim.client-cpus",
        "sim.client-gpus",
    }
)

_META = "__meta__"
_STATE, _PRUNER, _RNG, _ARRAYS = "state/", "pruner/", "rng/", "arrays/"


class ResumeError(EdgeKDError, ValueError):
    """A checkpoint that is missing, unreadable, or belongs to a different run."""


@dataclass
class RunCheckpoint:
    """One completed round of a run."""

    round: int
    state: dict[str, np.ndarray]  # the global student after the round (FP32 master)
    rounds: list[dict[str, Any]]  # round records 0..round, as in rounds.jsonl
    teacher_sha256: str
    config: dict[str, Any]  # EdgeKDConfig.to_flat()
    pruner: dict[str, np.ndarray] = field(default_factory=dict)
    pruner_initial_round: int = 0
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able notes (e.g. structure)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # more state (continual runs)


def state_sha256(state: Mapping[str, np.ndarray]) -> str:
    """A content hash of a state dict (names, dtypes, shapes, bytes), stable across runs."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = np.ascontiguousarray(state[name])
        digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def capture_rng() -> dict[str, Any]:
    """Python's, numpy's and torch's global RNG states (torch only if it is loaded)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": _jsonable_random_state(random.getstate()),
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
        "numpy_keys": np.asarray(keys),
    }
    import torch

    out["torch"] = torch.get_rng_state().numpy().copy()
    return out


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Put back the states `capture_rng` took."""
    if not rng:
        return
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    meta = rng["numpy"]
    np.random.set_state(
        (meta["kind"], rng["numpy_keys"], meta["pos"], meta["has_gauss"], meta["cached"])
    )
    import torch

    torch.set_rng_state(torch.from_numpy(np.asarray(rng["torch"], dtype=np.uint8)))


def _jsonable_random_state(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_run_checkpoint(out_dir: Path, ckpt: RunCheckpoint) -> Path:
    """Write ``out_dir/checkpoint.npz`` atomically (temp file, fsync, rename)."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in ckpt.state.items():
        arrays[_STATE + name] = np.asarray(value)
    for name, value in ckpt.pruner.items():
        arrays[_PRUNER + name] = np.asarray(value)
    for name, value in ckpt.arrays.items():
        arrays[_ARRAYS + name] = np.asarray(value)
    rng_meta = {k: v for k, v in ckpt.rng.items() if not isinstance(v, np.ndarray)}
    for name, value in ckpt.rng.items():
        if isinstance(value, np.ndarray):
            arrays[_RNG + name] = value
    meta = {
        "format": FORMAT_VERSION,
        "round": ckpt.round,
        "rounds": ckpt.rounds,
        "teacher_sha256": ckpt.teacher_sha256,
        "config": ckpt.config,
        "pruner_initial_round": ckpt.pruner_initial_round,
        "rng": rng_meta,
        "extra": ckpt.extra,
    }
    arrays[_META] = np.frombuffer(json.dumps(meta, default=_json_default).encode(), np.uint8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_FILE
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".checkpoint-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_run_checkpoint(out_dir: Path) -> RunCheckpoint:
    """Read ``out_dir/checkpoint.npz``; `ResumeError` naming the file otherwise."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise ResumeError(
            f"{path}: no checkpoint to resume from (a run writes one after each completed round)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(arrays.pop(_META).tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise ResumeError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise ResumeError(f"{path}: unreadable checkpoint (its metadata is not an object)")
    if meta.get("format") != FORMAT_VERSION:
        raise ResumeError(
            f"{path}: checkpoint format {meta.get('format')!r}, this edgekd reads {FORMAT_VERSION}"
        )

    def section(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

    try:
        return RunCheckpoint(
            round=int(meta["round"]),
            state=section(_STATE),
            rounds=list(meta["rounds"]),
            teacher_sha256=str(meta["teacher_sha256"]),
            config=dict(meta["config"]),
            pruner=section(_PRUNER),
            pruner_initial_round=int(meta.get("pruner_initial_round", 0)),
            rng={**meta.get("rng", {}), **section(_RNG)},
            extra=dict(meta.get("extra", {})),
            arrays=section(_ARRAYS),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ResumeError(
            f"{path}: malformed checkpoint metadata ({type(exc).__name__}: {exc})"
        ) from None


def check_resumable(ckpt: RunCheckpoint, config: Mapping[str, Any], where: Path) -> None:
    """Refuse to resume under a config that changes what the run computes."""
    changed = sorted(
        key
        for key in set(ckpt.config) | set(config)
        if key not in RESUMABLE_KEYS and ckpt.config.get(key) != config.get(key)
    )
    if changed:
        details = ", ".join(
            f"{k}: {ckpt.config.get(k)!r} -> {config.get(k)!r}" for k in changed[:5]
        )
        raise ResumeError(
            f"{where / CHECKPOINT_FILE}: the run was started with another config ({details}); "
            "resume with the same settings"
        )
    if config.get("continual.scenario"):
        return  # its rounds come from the task schedule, not train.num-rounds
    if int(config.get("train.num-rounds", ckpt.round)) < ckpt.round:
        raise ResumeError(
            f"{where / CHECKPOINT_FILE}: already at round {ckpt.round}, "
            f"more than train.num-rounds={config.get('train.num-rounds')}"
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
