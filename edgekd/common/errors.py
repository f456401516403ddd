"""Turning library errors into the one-line messages edgekd promises its users."""

from __future__ import annotations

import re

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def one_line_error(exc: BaseException) -> str:
    """The first non-empty line of an error, without terminal colours, at most 200
    characters: torch's and onnxruntime's errors span many coloured lines."""
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(exc)).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."
