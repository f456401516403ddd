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


def _cli_sections() -> dict[str, str]:
    """docs/cli.md's sections by heading: ``{"edgekd deploy build": "...", ...}``."""
    parts = re.split(r"^## `([^`]+)`$", (ROOT / "docs" / "cli.md").read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _rows_naming(text: str, name: str) -> int:
    """How many table rows name ``name`` (a key or a flag) in their first cell."""
    first_cells = re.findall(r"^\| ([^|]*) \|", text, flags=re.M)
    return sum(bool(re.search(rf"`{re.escape(name)}[ `]", cell)) for cell in first_cells)


def test_every_command_and_flag_has_one_row_in_the_cli_reference() -> None:
    commands = _commands(make_parser())
    assert len(commands) == 8  # simulate, inspect, deploy build|check, server x3, client start
    sections = _cli_sections()
    assert sorted(sections) == sorted(commands)
    rows = {
        f"{name} {flag}": _rows_naming(sections[name], flag)
        for name, flags in commands.items()
        for flag in flags
    }
    assert {key: n for key, n in rows.items() if n != 1} == {}


def test_every_config_key_has_one_row_in_the_configuration_page() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    rows = {key: _rows_naming(page, key) for key in flat_defaults()}
    assert {key: n for key, n in rows.items() if n != 1} == {}


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


def test_every_module_and_name_the_docs_mention_exists() -> None:
    import importlib

    text = _all_text()
    missing = [
        p for p in set(re.findall(r"edgekd(?:/[a-z_]+)+\.py", text)) if not (ROOT / p).exists()
    ]
    for dotted in sorted(set(re.findall(r"`(edgekd(?:\.[a-z_]+)+)", text))):
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                missing.append(dotted)
                break
            obj = getattr(obj, attr)
    assert missing == []
