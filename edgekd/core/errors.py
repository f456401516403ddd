"""edgekd's error base, and turning library errors into the one-line messages edgekd
promises its users."""

from __future__ import annotations

import re


class EdgeKDError(Exception):
    """Base of every error edgekd raises for bad input or a bad state on disk or on the
    wire (a config, a data file, a checkpoint, a bundle, a payload, a run folder). Each
    subclass also derives from the builtin it refines (ValueError, RuntimeError,
    ImportError), so ``except ValueError`` keeps working; the CLI turns any of them into
    one line and exit code 2."""


class ConfigError(EdgeKDError, ValueError):
    """A configuration value is unknown, malformed or out of range."""


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def one_line_error(exc: BaseException) -> str:
    """The first non-empty line of an error, without terminal colours, at most 200
    characters: torch's and onnxruntime's errors span many coloured lines."""
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(exc)).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."
