"""The one-off experiments under simulations/experiments/ stay runnable: each imports with today's code, answers
--help with its arguments, and names no machine's paths; their recorded results hold no scripts saved as text."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest

import fedaug.simulations.experiments as experiments
from tests.support import ROOT

MODULES = sorted(info.name for info in pkgutil.iter_modules(experiments.__path__))


def test_the_experiments_are_found():
    assert {"release_rule", "serve_statistics", "dp_counts_probe"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_each_experiment_answers_help(name, monkeypatch, capsys):
    module = importlib.import_module(f"{experiments.__name__}.{name}")
    monkeypatch.setattr("sys.argv", [f"python -m {module.__name__}", "--help"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage:") and "--out" in shown, shown


@pytest.mark.parametrize("name", MODULES)
def test_no_experiment_names_a_machines_paths(name):
    source = (ROOT / "simulations" / "experiments" / f"{name}.py").read_text()
    assert not re.search(r"[\"'\s](/tmp/|/work/|/home/|/root/)", source), name


def test_results_hold_no_scripts_saved_as_text():
    assert sorted((ROOT / "simulations" / "results").rglob("*.py.txt")) == []
