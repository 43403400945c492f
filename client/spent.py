"""Which privacy ledgers have spent budget on which data: a registry per machine, so that a fresh state-dir (a new
``--out``, a new daemon folder) cannot silently start the budget of data already trained on from zero.

A ledger composes ε over every round in its own state-dir; nothing in a new, empty state-dir knows about the rounds
an older one recorded for the same users. ``claim`` binds a state-dir to its data's fingerprint
(``BehaviorData.fingerprint``) and refuses a new ledger for data that another ledger still on disk has spent on,
unless the user asks for a separate budget explicitly. The registry lives in ``$FEDAUG_STATE_HOME`` (default
``~/.local/state/fedaug``) and is rewritten atomically.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from fedaug.client.ledger import LEDGER_FILE
from fedaug.common.atomic import write_json_atomic
from fedaug.common.errors import FedaugError

STATE_HOME = "FEDAUG_STATE_HOME"


def registry_path() -> Path:
    return Path(os.environ.get(STATE_HOME) or Path.home() / ".local" / "state" / "fedaug") / "spent.json"


def claim(fingerprint: str, state_dir: Path, *, new_budget: bool = False, option: str = "--new-budget") -> None:
    """Bind ``state_dir``'s ledger to the data ``fingerprint``. A ledger with rounds keeps composing; a new one for
    data another ledger has spent on is refused (``FedaugError`` naming that ledger) unless ``new_budget``.
    ``option``: how the user asks for a separate budget, for the message."""
    state_dir = Path(state_dir).resolve()
    path = registry_path()
    try:
        registry = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        raise FedaugError(f"{path}: unreadable privacy registry (fix or remove it to start over)") from None
    known = [Path(d) for d in registry.get(fingerprint, [])]
    spent = [(d, rounds_in(d)) for d in known if d != state_dir]
    spent = [(d, n) for d, n in spent if n]
    if spent and not rounds_in(state_dir) and not new_budget:
        where, rounds = spent[0]
        raise FedaugError(f"{state_dir}: a new privacy ledger for data already trained on under {where} ({rounds} "
                          f"DP round{'s' * (rounds > 1)}): keep composing there (its state-dir), or start a separate "
                          f"budget knowingly with {option}")
    live = [str(d) for d in known if d == state_dir or (d / LEDGER_FILE).exists()]
    registry[fingerprint] = sorted({*live, str(state_dir)})
    write_json_atomic(path, registry)


def rounds_in(state_dir: Path) -> int:
    """DP rounds recorded in the ledger in ``state_dir`` (0 where there is none)."""
    ledger = Path(state_dir) / LEDGER_FILE
    if not ledger.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0
