"""The docs keep up with the code: every config key and every command-line flag is
documented, the README stays short, and its links point at files that exist."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from edgekd.cli.main import make_parser
from edgekd.core.config import flat_defaults

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _all_text() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *DOCS])


def _commands(parser: argparse.ArgumentParser, prefix: str = "edgekd") -> dict[str, list[str]]:
    """``{"edgekd deploy build": ["--model", ...], ...}`` for every leaf command."""
    out: dict[str, list[str]] = {}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
        out[prefix] = [f for f in flags if f != "--help"]
    for action in subs:
        for name, sub in action.choices.items():
            out.update(_commands(sub, f"{prefix} {name}"))
    return out


def test_every_config_key_is_in_the_configuration_page() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [key for key in flat_defaults() if f"`{key}`" not in page]
    assert missing == []


def test_every_command_and_flag_is_documented() -> None:
    text = _all_text()
    commands = _commands(make_parser())
    assert len(commands) == 8  # simulate, inspect, deploy build|check, server x3, client start
    missing = [name for name in commands if f"`{name}" not in text]
    assert missing == []
    undocumented = [
        f"{name} {flag}" for name, flags in commands.items() for flag in flags if flag not in text
    ]
    assert undocumented == []


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    links = re.findall(
        r"\]\(([^)#]+)(?:#[^)]*)?\)", "\n".join(p.read_text() for p in [ROOT / "README.md", *DOCS])
    )
    local = [link for link in links if not link.startswith("http")]
    assert local, "the README links to its docs"
    broken = [
        link for link in local if not any((base / link).exists() for base in (ROOT, ROOT / "docs"))
    ]
    assert broken == []
