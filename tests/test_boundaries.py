"""The folders' boundaries (ARCHITECTURE.md), checked on the source: who imports whom, and what the production
apps contain."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> dict[str, set[str]]:
    """module path -> the top-level packages and modules it imports (absolute, or relative resolved to folder)."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(folder if node.level else (node.module or ""))
        found[str(path.relative_to(ROOT))] = names
    return found


def _roots(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("folder,forbidden", [
    ("common", {"client", "server", "simulations", "deploy", "serving", "fedaug", "flwr", "subprocess",
                "cryptography", "fastapi", "uvicorn"}),
    ("client", {"server", "simulations", "fedaug"}),
    ("server", {"client", "simulations", "fedaug"}),
    ("deploy", {"client", "server", "simulations", "fedaug", "flwr"}),
    ("serving", {"client", "server", "simulations", "deploy", "fedaug", "flwr"}),
])
def test_folders_import_only_what_they_may(folder, forbidden):
    offenders = {module: sorted(_roots(names) & forbidden) for module, names in _imports(folder).items()
                 if _roots(names) & forbidden}
    assert not offenders, offenders


def test_the_production_client_app_has_no_attack_code():
    """Byzantine behaviour exists for robustness simulations only; merchants run client.client_app:app."""
    for path in sorted((ROOT / "client").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for word in ("poison", "attack", "byzantine", "flip_labels"):
            assert word not in text.lower(), f"{path.name} mentions {word!r}"
    from client.client_app import app

    assert not app._mods  # no mod wraps the production handlers
