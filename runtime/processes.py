"""Running Flower's own processes (flower-superlink, flower-supernode, flwr) under our daemons: find the command
next to this Python, start it with its output in a log file, and stop it (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from fedaug.common.errors import FedaugError

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def flower_command(name: str) -> str:
    """Path of Flower's console script ``name`` from the environment running us (falls back to PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FedaugError(f"{name}: not found next to {sys.executable} or on PATH (is flwr installed?)")
    return found


def split_address(address: str, key: str = "") -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) -> (host, port); a one-line error naming ``key`` otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError((f"{key}: " if key else "") + f"expected host:port, got {address!r}")
    return host, int(port)


def _checked_address(address: str) -> str:
    split_address(address)
    return address


HostPort = Annotated[str, AfterValidator(_checked_address)]
"""A ``host:port`` config value, checked when the config is read (the error names its key)."""


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``command`` with stdout and stderr appended to ``log``. It stays in our process group, so a signal
    to the group (Ctrl+C, or `kill -9 -PGID` of a daemon) reaches it too."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_environment(env))


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment plus ``env``, with this Python's bin folder first on PATH: Flower's processes start their
    siblings by name (flower-supernode runs `flower-superexec`), and a daemon started by absolute path (systemd,
    cron) often has no venv on PATH — the SuperNode then waits forever for a child that never started."""
    merged = {**os.environ, **(env or {})}
    scripts = str(Path(sys.executable).parent)
    path = merged.get("PATH", "")
    if scripts not in path.split(os.pathsep):
        merged["PATH"] = scripts + (os.pathsep + path if path else "")
    return merged


def stop(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(ready: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.5) -> None:
    """Poll ``ready`` until it holds; a one-line error if ``process`` dies first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            raise FedaugError(f"{what}: the process exited with code {process.returncode}{_see(log)}")
        if time.monotonic() > deadline:
            raise FedaugError(f"{what}: not ready after {timeout:.0f} s{_see(log)}")
        time.sleep(interval)


def last_line(log: Path | None, containing: str = "", since: int = 0) -> str:
    """The last non-empty line of ``log`` (from byte ``since`` on) that contains ``containing`` ('' if none),
    without colour codes."""
    if log is None or not log.exists():
        return ""
    with open(log, "rb") as handle:
        handle.seek(since)
        text = handle.read().decode(errors="replace")
    lines = [" ".join(ANSI.sub("", line).split()) for line in text.splitlines()]
    return next((line for line in reversed(lines) if line and containing in line), "")


class LogFollower:
    """Calls ``on_line`` with each complete line appended to ``log`` from now on (colour codes removed), checked
    every ``interval`` seconds in a thread while used as a context manager: a daemon's console shows what its
    Flower process logs, as it happens (the process itself writes only to its log file)."""

    def __init__(self, log: Path, on_line: Callable[[str], None], interval: float = 0.5, since: int | None = None):
        """``since``: the byte to start from (default: the log's end now)."""
        self.log, self.on_line, self.interval = Path(log), on_line, interval
        self._offset = since if since is not None else self.log.stat().st_size if self.log.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        if not self.log.exists():
            return
        with open(self.log, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            line = " ".join(ANSI.sub("", line).split())
            if line:
                self.on_line(line)

    def __enter__(self) -> LogFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


def flower_error(log: Path | None, since: int = 0) -> str:
    """Why a Flower process stopped, from its log (from byte ``since``): its last ``[code: N]`` line, else its
    last ERROR line."""
    for marker in ("[code:", "[SSL:", "ERROR", ""):
        line = last_line(log, marker, since)
        if line:
            return line
    return "no log output"


def _see(log: Path | None) -> str:
    return f" (see {log})" if log is not None else ""
