"""Writes what is derived from the config models (fedaug.common.config, fedaug.simulations.scenario): the
``[tool.flwr.app.config]`` tables of pyproject.toml and the settings reference blocks of README.md.

    python scripts/settings_doc.py           # exit 1, naming the file, where either differs from the models
    python scripts/settings_doc.py --write   # rewrite both

The models are the one definition of every setting (its name, default, bounds and docstring); tests/test_config.py
fails when either file differs from what this writes. It is a development tool, not part of the installed package.

pyproject.toml: every key of a federation's run_config at its default (FederationConfig()): Flower accepts
``--run-config`` overrides only of the keys declared there. Flower configs have no null and no lists, so "" = not
set and a list is comma-separated text, as fedaug.common.config.from_run_config reads them.

README.md: each block between ``<!-- settings: begin SECTION … -->`` and ``<!-- settings: end -->`` gets one table per
named section (``model``, ``model.target_weights``, …): each key, the section's own default and the field's
docstring. What surrounds the blocks is written by hand.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import typing
from pathlib import Path

import tomli_w
from pydantic import BaseModel

from fedaug.client.daemon import MerchantDaemonConfig
from fedaug.common.config import BaselineConfig, FederationConfig, MerchantRunConfig, Section
from fedaug.server.aggregator import AggregatorConfig
from fedaug.simulations.scenario import SimulationConfig

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT, README = ROOT / "pyproject.toml", ROOT / "README.md"
COMMAND = "python scripts/settings_doc.py --write"
FLWR_CONFIG = "[tool.flwr.app.config]"
FLWR_NOTE = f"# Generated from FederationConfig ({COMMAND}); do not edit by hand.\n"
BLOCK = re.compile(r"(<!-- settings: begin (?P<names>[^>]*?) -->\n)(?P<body>.*?)(<!-- settings: end -->)", re.S)
ROLES = (SimulationConfig, BaselineConfig, MerchantRunConfig, AggregatorConfig, MerchantDaemonConfig)
"""The role configs whose tables the README documents, between them every section."""


def sections() -> dict[str, type[Section]]:
    """Every table of the role configs by its dotted name; a table two roles define differently (``local``) is
    the one with more keys (`fedaug local`'s, which adds rounds and seed)."""
    found: dict[str, type[Section]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, Section):
                dotted = prefix + name
                if dotted not in found or len(kind.model_fields) > len(found[dotted].model_fields):
                    found[dotted] = kind
                walk(kind, dotted + ".")

    for role in ROLES:
        walk(role, "")
    return found


# --- pyproject.toml -------------------------------------------------------------------------------------------


def _flower_value(value):
    """A value as Flower's run_config holds it: "" for not set, lists as comma-separated text."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return value


def _flower_tables(node: dict) -> dict:
    scalars = {k: _flower_value(v) for k, v in node.items() if not isinstance(v, dict)}
    tables = {k: _flower_tables(v) for k, v in node.items() if isinstance(v, dict) and v}  # [data.events] {}: none
    return scalars | tables


def flwr_tables() -> str:
    """The ``[tool.flwr.app.config]`` tables: a federation's run_config at its defaults."""
    config = _flower_tables(FederationConfig().model_dump(mode="json"))
    text = tomli_w.dumps({"tool": {"flwr": {"app": {"config": config}}}})
    return FLWR_NOTE + text[text.index(FLWR_CONFIG):]


def with_flwr_tables(pyproject: str) -> str:
    """``pyproject`` with its ``[tool.flwr.app.config*]`` tables (and the note above them) replaced."""
    start = pyproject.index(FLWR_CONFIG)
    if pyproject[:start].endswith(FLWR_NOTE):
        start -= len(FLWR_NOTE)
    later = re.compile(r"^\[(?!tool\.flwr\.app\.config[].])", re.M).search(pyproject, start)
    end = later.start() if later else len(pyproject)
    return pyproject[:start] + flwr_tables() + ("\n" + pyproject[end:] if later else "")


# --- README.md ------------------------------------------------------------------------------------------------


def _literal(value) -> str:
    """``value`` as an inline TOML literal."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):  # a mapping table ([data.events])
        return "{" + ", ".join(f"{k} = {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and math.isinf(value):
        return '"inf"'
    return tomli_w.dumps({"k": str(value) if isinstance(value, Path) else value}).strip().removeprefix("k = ")


def _default(value) -> str:
    return "not set" if value is None else f"`{_literal(value)}`"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def is_section(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, Section)


def section_table(name: str, section: type[Section]) -> str:
    """One section as a Markdown table: key, the section's own default, what it does."""
    defaults = section()
    heading = next(doc for kind in section.__mro__ if (doc := kind.__doc__ or "").startswith(f"[{name}]: "))
    rows = [f"**`[{name}]`**: {_one_line(heading.removeprefix(f'[{name}]: '))}", "",
            "| key | default | |", "|---|---|---|"]
    for key, field in section.model_fields.items():
        if not is_section(field.annotation) and not is_section(typing.get_origin(field.annotation)):
            rows.append(f"| `{key}` | {_default(getattr(defaults, key))} | {_one_line(field.description)} |")
    return "\n".join(rows) + "\n"


def reference_block(names: str) -> str:
    found = sections()
    unknown = [name for name in names.split() if name not in found]
    if unknown:
        raise SystemExit(f"README.md: settings block names unknown table {unknown[0]!r} (known: {', '.join(found)})")
    note = f"<!-- generated from the config models by `{COMMAND}`: edit the models' docstrings, not this -->\n"
    return note + "\n".join(section_table(name, found[name]) for name in names.split())


def with_reference(readme: str) -> str:
    """``readme`` with every settings block regenerated."""
    return BLOCK.sub(lambda m: m.group(1) + reference_block(m.group("names")) + m.group(4), readme)


# --- command line ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the files instead of checking them")
    args = parser.parse_args(argv)
    stale = []
    for path, derive in ((PYPROJECT, with_flwr_tables), (README, with_reference)):
        text = path.read_text(encoding="utf-8")
        derived = derive(text)
        if derived != text:
            stale.append(path.name)
            if args.write:
                path.write_text(derived, encoding="utf-8")
    if stale and not args.write:
        print(f"{', '.join(stale)}: differs from the config models; run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
