import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

BEAUTY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon-beauty"


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    if not (BEAUTY_DIR / "Beauty.txt").is_file():
        pytest.skip(f"Amazon Beauty data not found at {BEAUTY_DIR} (expected ../shared/data/amazon-beauty)")
    return BEAUTY_DIR


@pytest.fixture(autouse=True)
def _own_privacy_registry(tmp_path_factory, monkeypatch):
    """Each test has its own registry of spent budgets (client/spent.py): tests train the same synthetic data in
    many folders, which a real merchant's machine would (rightly) refuse."""
    monkeypatch.setenv("FEDAUG_STATE_HOME", str(tmp_path_factory.mktemp("fedaug-state")))
