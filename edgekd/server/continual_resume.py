"""Checkpoints and resume for a continual run (`edgekd.server.continual_run`).

After every round of every method, and again once a method's folder is written, the
server replaces ``RUN_DIR/checkpoint.npz`` (the same atomic file and format as an
ordinary run's, `edgekd.server.checkpoint`) with:

- the method running, its run tag and its last completed round, and the methods
  already complete (their summaries are in their folders' ``report.json``);
- the global student after that round and at the start of every task so far (a node
  rebuilds its method's state from those, `edgekd.client.continual_client`);
- the round records and every round's per-task accuracy so far, and the RNG states;
- the teacher's hash and the run's config.

A run with ``resume = true`` (``edgekd simulate ... --out RUN_DIR --set resume=true``, or
``edgekd server start --resume RUN_DIR``) refuses another config or teacher
(`check_resumable`), keeps the complete methods, and goes on with the interrupted one
from the round after its checkpoint. Nodes of a restarted federation have lost their
state; each rebuilds it from the history the server sends, exactly as a node that
trained every round holds it, so against a fake Grid the resumed run is bit-identical
to an uninterrupted one (`tests/server/test_continual_resume.py`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.core.config import EdgeKDConfig
from edgekd.server.checkpoint import (
    CHECKPOINT_FILE,
    ResumeError,
    RunCheckpoint,
    capture_rng,
    check_resumable,
    load_run_checkpoint,
    save_run_checkpoint,
)
from edgekd.server.federation import MOMENTUM

_EXTRA = "continual"
_START = "task-start/"


@dataclass
class MethodProgress:
    """One method's run so far: what its checkpoint holds, and where a resumed run goes on."""

    method: str
    run_tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    round: int = 0  # the last completed round (0: none yet)
    state: dict[str, np.ndarray] = field(default_factory=dict)  # the student after ``round``
    task_starts: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # round records 0..round
    per_round: dict[int, np.ndarray] = field(default_factory=dict)  # accuracy on every task
    seconds: dict[int, float] = field(default_factory=dict)
    wall_time: float = 0.0  # seconds spent on the method before this server started
    momentum: dict[str, np.ndarray] = field(default_factory=dict)  # FedAvgM's buffer, if any


@dataclass
class ContinualResume:
    """What a resumed continual run finds in its checkpoint."""

    completed: list[str]
    progress: MethodProgress  # the last method checkpointed (complete or not)
    rng: dict[str, Any]
    teacher_sha256: str


class ContinualCheckpointer:
    """Writes the run's checkpoint after each round (`round_done`) and method (`method_done`)."""

    def __init__(
        self, out_dir: Path, cfg: EdgeKDConfig, teacher_sha256: str, completed: list[str]
    ) -> None:
        self.out_dir, self.cfg, self.teacher_sha256 = out_dir, cfg, teacher_sha256
        self.completed = list(completed)

    def round_done(self, progress: MethodProgress) -> None:
        self._save(progress)

    def method_done(self, progress: MethodProgress) -> None:
        self.completed.append(progress.method)
        self._save(progress)

    def _save(self, progress: MethodProgress) -> None:
        extra = {
            _EXTRA: {
                "method": progress.method,
                "run_tag": progress.run_tag,
                "completed": self.completed,
                "per_round": {str(r): a.tolist() for r, a in progress.per_round.items()},
                "seconds": {str(r): s for r, s in progress.seconds.items()},
                "wall_time": progress.wall_time,
            }
        }
        starts = {
            f"{_START}{task}/{name}": value
            for task, state in progress.task_starts.items()
            for name, value in state.items()
        }
        save_run_checkpoint(
            self.out_dir,
            RunCheckpoint(
                round=progress.round,
                state=progress.state,
                rounds=progress.rounds,
                teacher_sha256=self.teacher_sha256,
                config=self.cfg.to_flat(),
                rng=capture_rng(),
                extra=extra,
                arrays={**starts, **progress.momentum},
            ),
        )


def continual_resume_point(cfg: EdgeKDConfig, out_dir: Path) -> ContinualResume | None:
    """The checkpoint a ``resume = true`` run goes on from, checked against the config;
    None for a new run. `ResumeError` names the file for a missing, unreadable, foreign
    (an ordinary run's) or mismatched checkpoint."""
    if not cfg.resume:
        return None
    ckpt = load_run_checkpoint(out_dir)
    check_resumable(ckpt, cfg.to_flat(), out_dir)
    where = out_dir / CHECKPOINT_FILE
    try:
        meta = ckpt.extra[_EXTRA]
        starts: dict[int, dict[str, np.ndarray]] = {}
        for key, value in ckpt.arrays.items():
            if key.startswith(_START):
                task, name = key[len(_START) :].split("/", 1)
                starts.setdefault(int(task), {})[name] = value
        progress = MethodProgress(
            method=str(meta["method"]),
            run_tag=str(meta["run_tag"]),
            round=ckpt.round,
            state=ckpt.state,
            task_starts=starts,
            rounds=ckpt.rounds,
            per_round={int(r): np.asarray(a, dtype=float) for r, a in meta["per_round"].items()},
            seconds={int(r): float(s) for r, s in meta["seconds"].items()},
            wall_time=float(meta["wall_time"]),
            momentum={k: v for k, v in ckpt.arrays.items() if k.startswith(MOMENTUM)},
        )
        completed = [str(m) for m in meta["completed"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ResumeError(
            f"{where}: not a continual run's checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    return ContinualResume(
        completed=completed, progress=progress, rng=ckpt.rng, teacher_sha256=ckpt.teacher_sha256
    )


def completed_summary(folder: Path, method: str) -> dict[str, Any]:
    """The ``continual`` summary of a method the checkpoint says is complete, from its
    folder's ``report.json``; `ResumeError` if that file is gone or is not its report."""
    path = folder / "report.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))["continual"][method]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResumeError(
            f"{path}: the checkpoint says {method} is complete, but its report is missing or "
            f"unreadable ({type(exc).__name__}: {exc}); restart the run without resume"
        ) from None
    if not isinstance(summary, dict) or "matrix" not in summary:
        raise ResumeError(f"{path}: no {method} summary with an accuracy matrix")
    return summary
