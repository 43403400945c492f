"""The folders' boundaries (ARCHITECTURE.md), checked on the source: who imports whom, and what the production
apps contain."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> dict[str, set[str]]:
    """module path -> the modules it imports (absolute; the folders install as fedaug.<folder>)."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert not node.level, f"{path}: relative import (the house imports fedaug.<folder>.<module>)"
                names.add(node.module or "")
        found[str(path.relative_to(ROOT))] = names
    return found


def _roots(names: set[str]) -> set[str]:
    """Our own folders by name (fedaug.server.x -> server), anything else by its top-level package."""
    roots = set()
    for name in names:
        parts = name.split(".")
        roots.add(parts[1] if parts[0] == "fedaug" and len(parts) > 1 else parts[0])
    return roots


@pytest.mark.parametrize("folder,forbidden", [
    ("common", {"client", "server", "simulations", "runtime", "serving", "cli", "fedaug", "flwr", "subprocess",
                "cryptography", "fastapi", "uvicorn"}),
    ("client", {"server", "simulations", "cli", "fedaug"}),
    ("server", {"client", "simulations", "cli", "fedaug"}),
    ("runtime", {"client", "server", "simulations", "cli", "fedaug", "flwr"}),
    ("serving", {"client", "server", "simulations", "runtime", "cli", "fedaug", "flwr"}),
])
def test_folders_import_only_what_they_may(folder, forbidden):
    offenders = {module: sorted(_roots(names) & forbidden) for module, names in _imports(folder).items()
                 if _roots(names) & forbidden}
    assert not offenders, offenders


def test_the_production_client_app_has_no_attack_code():
    """Byzantine behaviour exists for robustness simulations only; merchants run fedaug.client.client_app:app."""
    for path in sorted((ROOT / "client").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for word in ("poison", "attack", "byzantine", "flip_labels"):
            assert word not in text.lower(), f"{path.name} mentions {word!r}"
    from fedaug.client.client_app import app

    assert not app._mods  # no mod wraps the production handlers
