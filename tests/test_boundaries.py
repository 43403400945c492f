"""The house's shape (ARCHITECTURE.md), checked on the source: what installs, who imports whom, where torch and
Flower may load, Flower's private API behind one module, no folder too big, no file cycles, and ARCHITECTURE.md's
folder lines matching the folders on disk."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path, PurePosixPath

import pytest

from tests.support import ROOT, setup_folders

FOLDERS = setup_folders()
CODE = (*FOLDERS, "fedaug")
"""Production code: the folders that install as fedaug.<folder>, and fedaug/ itself (the command line)."""
DESIGN_CARD = ("server", "client", "common", "tests", "simulations", "docker")
"""The folders the user's design card puts at the repository root."""
TORCH = ("torch", "opacus", "safetensors.torch", "sentence_transformers", "transformers")
"""Modules whose import loads torch."""
MODEL_PACKAGES = ("common/model", "common/priors", "common/recommend")
"""Where common/ may load torch at import time: the model and its training and evaluation, the priors' scorers (the
text prior, popularity and DP-statistics scorers, fused with the model), and the bundle and Recommender that load
and run those models. Everything else in common/ — its root (config, records, errors, ...), data/ and protocol/ —
loads neither torch nor Flower, except that protocol/ speaks Flower's records (flwr.app)."""


def _files(*folders: str) -> list[Path]:
    """The repository's files under ``folders`` as git sees them (tracked, or new and not ignored)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *folders],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    return sorted({ROOT / name for name in listed if name and (ROOT / name).is_file()})


def _modules() -> dict[str, Path]:
    """Our modules by their installed name (common/data/events.py -> fedaug.common.data.events)."""
    found = {}
    for path in _files(*CODE):
        if path.suffix == ".py":
            folder, *parts = path.relative_to(ROOT).with_suffix("").parts
            parts = [part for part in parts if part != "__init__"]
            found[".".join(["fedaug", *([] if folder == "fedaug" else [folder]), *parts])] = path
    return found


def _imports(folder: str) -> dict[str, set[str]]:
    """module path -> the modules it imports anywhere in it (absolute; the folders install as fedaug.<folder>)."""
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


def _import_time(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs when imported: its top level, inside top-level if / try blocks, but not under
    ``if TYPE_CHECKING`` and not inside functions or classes."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
    return found


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names, with ``from M import x`` as both M and M.x."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]


def _is(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == module or name.startswith(module + ".") for module in modules)


# 1. one namespaced package ---------------------------------------------------------------------------------------


def test_the_distribution_installs_only_fedaug_as_a_top_level_name():
    """setup.py maps each folder to fedaug.<folder>: nothing generic (common, server, ...) lands in site-packages."""
    distribution = importlib.metadata.distribution("fedaug")
    top_level = distribution.read_text("top_level.txt")
    if top_level is not None:
        names = set(top_level.split())
    else:  # no top_level.txt: the first part of every installed file but the metadata and the launcher scripts
        names = {PurePosixPath(str(f)).parts[0].removesuffix(".py") for f in distribution.files or ()
                 if not str(f).startswith("..") and ".dist-info" not in str(f)
                 and not PurePosixPath(str(f)).name.startswith("__editable__")  # setuptools' own finder
                 and PurePosixPath(str(f)).parts[0] != "__pycache__"}
    assert names == {"fedaug"}, f"the installed distribution has top-level names {sorted(names)}"
    finders = [f for f in distribution.files or () if re.fullmatch(r"__editable___fedaug_.*_finder\.py", f.name)]
    for finder in finders:  # an editable install: the names it maps, and where
        tree = ast.parse(Path(distribution.locate_file(finder)).read_text(encoding="utf-8"))
        mapping = next(ast.literal_eval(node.value) for node in tree.body
                       if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "MAPPING"
                       or isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "MAPPING")
        assert {name: Path(path) for name, path in mapping.items()} == {
            "fedaug": ROOT / "fedaug", **{f"fedaug.{folder}": ROOT / folder for folder in FOLDERS}}


def test_the_design_card_folders_are_at_the_root_and_setup_lists_every_code_folder():
    assert all((ROOT / folder).is_dir() for folder in DESIGN_CARD)
    assert {"runtime", "serving"} <= set(FOLDERS) and set(DESIGN_CARD) - {"tests", "docker"} <= set(FOLDERS)
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages == {*FOLDERS, "fedaug"}, "setup.py's FOLDERS and the packages at the root differ"
    for folder in FOLDERS:  # every installed module imports as fedaug.<folder>...
        importlib.import_module(f"fedaug.{folder}")


# the folders' import rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder,forbidden", [
    ("common", {"client", "server", "simulations", "runtime", "serving", "cli", "fedaug", "subprocess",
                "cryptography", "fastapi", "uvicorn"}),
    ("client", {"server", "simulations", "cli", "fedaug"}),
    ("server", {"client", "simulations", "cli", "fedaug"}),
    ("runtime", {"client", "server", "simulations", "serving", "cli", "fedaug", "flwr"}),
    ("serving", {"client", "server", "simulations", "runtime", "cli", "fedaug", "flwr"}),
])
def test_folders_import_only_what_they_may(folder, forbidden):
    offenders = {module: sorted(_roots(names) & forbidden) for module, names in _imports(folder).items()
                 if _roots(names) & forbidden}
    assert not offenders, offenders


def test_common_speaks_flower_only_in_its_protocol_and_only_through_flwr_app():
    offenders = {module: sorted(n for n in names if n.split(".")[0] == "flwr")
                 for module, names in _imports("common").items()
                 if any(n.split(".")[0] == "flwr" for n in names)
                 and not (module.startswith("common/protocol/") and all(
                     n == "flwr.app" for n in names if n.split(".")[0] == "flwr"))}
    assert not offenders, offenders


def test_the_production_client_app_has_no_attack_code():
    """Byzantine behaviour exists for robustness simulations only; merchants run fedaug.client.client_app:app."""
    for path in sorted((ROOT / "client").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for word in ("poison", "attack", "byzantine", "flip_labels"):
            assert word not in text.lower(), f"{path.name} mentions {word!r}"
    from fedaug.client.client_app import app

    assert not app._mods  # no mod wraps the production handlers


# 2. torch and Flower load where the model is ----------------------------------------------------------------------


def _light_modules() -> dict[str, Path]:
    """common/'s modules outside MODEL_PACKAGES."""
    return {name: path for name, path in _modules().items() if name.startswith("fedaug.common")
            and not any(path.relative_to(ROOT).as_posix().startswith(package + "/") for package in MODEL_PACKAGES)}


def test_common_loads_torch_only_in_its_model_packages():
    """Outside common/model, priors and recommend, no module of common/ imports torch or Flower when imported —
    neither itself nor through one of our modules that does (an import inside a function runs when called)."""
    light, ours = _light_modules(), _modules()
    offenders = {}
    for name, path in light.items():
        for node in _import_time(ast.parse(path.read_text(encoding="utf-8"))):
            for imported in _names(node):
                protocol_speaks_flower = name.startswith("fedaug.common.protocol") and _is(imported, ("flwr.app",))
                if (_is(imported, TORCH) or (_is(imported, ("flwr",)) and not protocol_speaks_flower)
                        or (imported in ours and imported.startswith("fedaug.") and imported not in light)):
                    offenders.setdefault(name, []).append(imported)
    assert not offenders, offenders
    assert "fedaug.common.config" in light and "fedaug.common.data.events" in light


@pytest.mark.integration  # a fresh interpreter
def test_importing_common_outside_its_model_packages_loads_neither_torch_nor_flower():
    """The same, measured: a fresh interpreter imports every such module and has not loaded torch (nor Flower, but
    for the protocol's flwr.app)."""
    light = sorted(_light_modules())
    protocol = [name for name in light if name.startswith("fedaug.common.protocol")]
    for modules, absent in (([m for m in light if m not in protocol], ("torch", "flwr")), (protocol, ("torch",))):
        probe = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
                 f"print(sorted(m for m in {absent!r} if m in sys.modules))")
        loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT.parent,
                                check=True).stdout.strip()
        assert loaded == "[]", f"importing {modules} loads {loaded}"


# Flower's private API behind one module --------------------------------------------------------------------------


def test_flower_is_imported_through_its_public_api_or_the_adapter():
    """A Flower import anywhere in the code names a documented package and a name in its __all__; anything else
    is re-exported by fedaug.runtime.flower, the one module to fix when a Flower upgrade moves it."""
    from fedaug.runtime.flower import PUBLIC

    offenders = []
    for path in _files(*CODE):
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([(alias.name, None) for alias in node.names] if isinstance(node, ast.Import)
                     else [(node.module, alias.name) for alias in node.names] if isinstance(node, ast.ImportFrom)
                     else [])
            for module, name in names:
                if module and module.split(".")[0] == "flwr" and (
                        module not in PUBLIC or name not in importlib.import_module(module).__all__):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {module} {name or ''}")
    assert not offenders, offenders


def _private_names() -> list[str]:
    from fedaug.runtime.flower import PRIVATE

    return sorted(PRIVATE)


@pytest.mark.parametrize("name", _private_names())
def test_every_private_flower_name_the_adapter_reexports_is_where_it_says(name):
    """Fails with FlowerMoved ("Flower X.Y has no flwr.m.name (re-exported as fedaug.runtime.flower.name) ...")
    when a Flower upgrade moves one."""
    from fedaug.runtime import flower

    module, attribute = flower.PRIVATE[name]
    assert flower.resolve(name) is getattr(importlib.import_module(module), attribute)
    assert getattr(flower, name) is flower.resolve(name)


def test_a_moved_flower_name_fails_loudly_with_the_name_and_flowers_version(monkeypatch):
    from fedaug.runtime import flower

    monkeypatch.setitem(flower.PRIVATE, "Gone", ("flwr.supercore.nowhere", "Gone"))
    monkeypatch.setitem(flower.PRIVATE, "Renamed", ("flwr.app", "NoSuchName"))
    version = importlib.metadata.version("flwr")
    for name, where in (("Gone", "flwr.supercore.nowhere.Gone"), ("Renamed", "flwr.app.NoSuchName")):
        with pytest.raises(flower.FlowerMoved, match=rf"Flower {re.escape(version)} has no {re.escape(where)} "
                                                      rf"\(re-exported as fedaug.runtime.flower.{name}\)"):
            exec(f"from fedaug.runtime.flower import {name}", {})
    with pytest.raises(ImportError, match="cannot import name"):
        exec("from fedaug.runtime.flower import NeverListed", {})


# 5. the look of the house -----------------------------------------------------------------------------------------


def test_no_folder_holds_more_than_a_quarter_of_the_production_lines():
    """Each folder counted apart from its subfolders (common/'s own files, common/data/, ...)."""
    lines: dict[str, int] = {}
    for path in _files(*CODE):
        if path.suffix == ".py":
            folder = path.parent.relative_to(ROOT).as_posix()
            lines[folder] = lines.get(folder, 0) + len(path.read_text(encoding="utf-8").splitlines())
    total = sum(lines.values())
    assert total > 5_000 and "common/data" in lines
    heavy = {folder: f"{n / total:.0%}" for folder, n in lines.items() if n > total / 4}
    assert not heavy, f"of {total:,} production lines: {heavy}"


def test_no_import_cycles_between_our_files():
    """Every import counts, inside functions too: an import moved into a function to dodge a cycle is still one."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name] |= {n for n in _names(node) if n in modules and n != name}
    assert sum(map(len, graph.values())) > 200  # the graph is really built
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


FOLDER_LINE = re.compile(r"^- `([\w./-]+)/`: (.+)$")


def _folders_on_disk() -> set[str]:
    """Every folder at the root (not hidden) and each of its subfolders, as git sees them."""
    folders = set()
    for path in _files("."):
        parts = path.relative_to(ROOT).parts[:-1]
        if parts and not parts[0].startswith("."):
            folders |= {"/".join(parts[:depth]) for depth in (1, 2) if len(parts) >= depth}
    return folders


def test_architecture_has_one_short_line_per_folder_and_subfolder():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("\n## Folders\n", 1)[1].split("\n## ", 1)[0]
    listed = [(m.group(1), m.group(2)) for m in map(FOLDER_LINE.match, section.splitlines()) if m]
    names = [name for name, _ in listed]
    assert len(names) == len(set(names)), "a folder is listed twice"
    on_disk = _folders_on_disk()
    assert {"common/data", "docker", "tests"} <= on_disk
    assert not on_disk - set(names), f"folders missing from ARCHITECTURE.md: {sorted(on_disk - set(names))}"
    assert not set(names) - on_disk, f"ARCHITECTURE.md lists folders not on disk: {sorted(set(names) - on_disk)}"
    long = [name for name, line in listed if len(line) > 200]
    assert not long, f"lines over 200 characters: {long}"
