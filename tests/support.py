"""Helpers shared by test modules (which never import each other): the `fedaug` command as a real process, and a
small simulation config that trains in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = """
[synthetic]
users = 400
items = 300
merchants = 3
[model]
hidden = 16
heads = 2
max_len = 20
[simulation]
merchants = 3
[local]
batch_size = 64
"""


def fedaug(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m fedaug ARGS` from the repository root, in its own process group (so a test can kill it all)."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedaug", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def finish(process: subprocess.Popen, timeout: float) -> str:
    """Its output once it exits; the test fails (and the group is killed) past ``timeout`` seconds."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"fedaug {' '.join(process.args[3:5])} did not finish in {timeout:.0f} s:\n{output[-3000:]}")
    return output
