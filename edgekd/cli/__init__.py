"""The `edgekd` command line: `main` parses and dispatches (`edgekd.cli.main`)."""

from edgekd.cli.main import main

__all__ = ["main"]
