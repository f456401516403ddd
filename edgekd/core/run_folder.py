"""A run folder is written once: no command may overwrite or destroy a finished run.

`claim_run_folder` is called by ``edgekd simulate`` and ``edgekd server start`` before
anything starts (Ray, a SuperLink, the teacher's training): it refuses a folder that
already holds a run unless the user passed ``--force``, and proves the folder writable
by creating and removing a probe file, so that a typo'd ``--out`` fails in a second
with one line instead of after minutes of work.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgekd.core.errors import EdgeKDError

__all__ = ["RUN_FILES", "RunFolderError", "claim_run_folder", "run_files_in", "writable_folder"]

# Files only a run writes: one of them means the folder holds (part of) a run.
RUN_FILES = (
    "report.json",
    "checkpoint.npz",
    "rounds.jsonl",
    "teacher.pt",
    "student.pt",
    "run_config.toml",
)


class RunFolderError(EdgeKDError, ValueError):
    """The run folder holds a run already, or cannot be written."""


def run_files_in(folder: Path) -> list[str]:
    """The `RUN_FILES` present in ``folder`` (empty when there is none, or no folder)."""
    return [name for name in RUN_FILES if (folder / name).exists()]


def claim_run_folder(folder: str | Path, *, force: bool = False, flag: str = "--out") -> Path:
    """Create ``folder`` if needed and return it, after checking that it holds no run
    (unless ``force``) and can be written.

    Raises:
        RunFolderError: it is a file, holds a run and ``force`` is off, or is not
            writable (naming ``flag``, the option the user set it with).
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{flag} {path} is a file, not a folder")
    found = run_files_in(path)
    if found and not force:
        raise RunFolderError(
            f"{flag} {path} already holds a run ({', '.join(found)}); choose another folder, "
            "or pass --force to overwrite it"
        )
    return writable_folder(path, flag)


def writable_folder(folder: str | Path, flag: str) -> Path:
    """Create ``folder`` if needed and prove it writable with a probe file; else
    `RunFolderError` naming ``flag``."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".edgekd-write-test-", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise RunFolderError(f"{flag} {path} is not writable: {exc.strerror or exc}") from None
    return path
