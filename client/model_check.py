"""The merchant's own check of the model it received: when the federation's final bundle lands in the state
directory (``STATE/model``, written by the ClientApp's ``query.model`` handler), the merchant daemon tests it on the
merchant's held-out users beside the public text prior and popularity (common/recommend/check.py), prints the figures
and keeps them in ``STATE/model-check.json``. Everything stays on the merchant's machine: nothing is sent, so no ε is
spent."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from fedaug.common.atomic import write_bytes_atomic
from fedaug.common.data import BehaviorData
from fedaug.common.errors import FedaugError
from fedaug.common.model.device import pick_device
from fedaug.common.recommend.bundle import CARD, bundle_hash, load_bundle
from fedaug.common.recommend.check import ModelCheck, check_model

MODEL_DIR = "model"
"""Where the ClientApp keeps the federation's final bundle in the merchant's state directory."""
MODEL_CHECK = "model-check.json"


def check_received_model(state_dir: Path, data: BehaviorData, device: str = "cpu",
                         source: str | Path | None = None) -> ModelCheck | None:
    """Test ``STATE/model`` on ``data`` (the merchant's own, numbered by the public catalog) and write the figures
    with the bundle's content hash to ``STATE/model-check.json``; None when no bundle has arrived. ``device``: auto
    | cpu | cuda | cuda:N."""
    state_dir, device = Path(state_dir), pick_device(device)
    path = state_dir / MODEL_DIR
    if not (path / CARD).is_file():
        return None
    digest = bundle_hash(path)
    result = check_model(load_bundle(path, device=device), data, device=device, source=source)
    record = result.to_json()
    record["bundle"] |= {"hash": digest}
    write_bytes_atomic(state_dir / MODEL_CHECK, (json.dumps(record, indent=2) + "\n").encode())
    return result


def checked_hash(state_dir: Path) -> str | None:
    """The content hash of the bundle ``STATE/model-check.json`` was made for (None: no check yet)."""
    try:
        return json.loads((Path(state_dir) / MODEL_CHECK).read_text())["bundle"]["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ModelCheckWatcher:
    """Checks each new final model that appears in ``STATE/model`` (looked for every ``interval`` seconds) with
    ``check_received_model`` on the data ``load`` returns, and says what it found; a bundle already checked (same
    content hash in ``STATE/model-check.json``) is not checked again, across daemon restarts too."""

    def __init__(self, state_dir: Path, load: Callable[[], BehaviorData], say: Callable[[str], None],
                 device: str = "cpu", source: str | Path | None = None, interval: float = 2.0):
        self.state_dir, self.load, self.say = Path(state_dir), load, say
        self.device, self.source, self.interval = device, source, interval
        self._seen: tuple | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _signature(self) -> tuple | None:
        """The card's inode and mtime: the bundle directory is replaced whole, so a new bundle has a new card."""
        try:
            stat = (self.state_dir / MODEL_DIR / CARD).stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> ModelCheck | None:
        """Check the bundle if it is new; the check's result (None: nothing new, or the check failed)."""
        signature = self._signature()
        if signature is None or signature == self._seen:
            return None
        self._seen = signature
        path = self.state_dir / MODEL_DIR
        try:
            if bundle_hash(path) == checked_hash(self.state_dir):
                return None
            self.say(f"final model received ({path}): testing it on your held-out users, locally")
            result = check_received_model(self.state_dir, self.load(), self.device, self.source)
        except OSError as exc:  # e.g. the bundle mid-swap: looked at again next time
            self._seen = None
            self.say(f"model check: {' '.join(str(exc).split())}")
            return None
        except Exception as exc:  # unreadable data, a bad bundle: said, never fatal to the daemon
            message = str(exc) if isinstance(exc, FedaugError) else f"{type(exc).__name__}: {exc}"
            self.say(f"model check failed: {' '.join(message.split())}")
            return None
        if result is not None:
            for line in result.lines():
                self.say(f"model check: {line}")
            self.say(f"model check: -> {self.state_dir / MODEL_CHECK} (stays here: nothing is sent)")
        return result

    def start(self) -> ModelCheckWatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Stop watching; a check under way is not waited for past ``timeout`` (its file is written atomically,
        and the thread does not keep the process alive)."""
        self._stop.set()
        self._thread.join(timeout)

    def __enter__(self) -> ModelCheckWatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
