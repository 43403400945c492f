"""A merchant's last update, kept so that a round it is asked to train again costs no privacy.

When the aggregator dies after a merchant trained round r but before it aggregated, the resumed aggregator sends
round r again from the same checkpoint (and a retried round resends the same global model). Training again would be
a second release of the merchant's data: the ledger would pay for it, and with noise calibrated to the plan the
merchant could then afford no more rounds. Sending back the update already released is the same release, so it
costs nothing. An update is reused only for the same run, round, global weights and training config (the digest).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from fedaug.common.atomic import write_bytes_atomic

FILE = "last-update.npz"


def digest(run_key: str, round_: int, arrays: dict[str, bytes], config: dict) -> str:
    """What an update was computed from: run, round, the global weights' bytes and the train config."""
    h = hashlib.sha256(json.dumps([run_key, int(round_), sorted(config.items())], default=str).encode())
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(arrays[key])
    return h.hexdigest()


class ReplayCache:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / FILE

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict | None] | None:
        """The update and the figures reported with it stored under digest ``key``, or None (an update stored by
        a version before the typed protocol, whose figures it cannot read, is not reused)."""
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as stored:
            meta = json.loads(bytes(stored["__meta__"]).decode())
            if meta["digest"] != key or "figures" not in meta:
                return None
            return {name: stored[f"a/{name}"] for name in meta["keys"]}, meta["figures"]

    def put(self, key: str, arrays: dict[str, np.ndarray], figures: dict | None) -> None:
        """Replace the stored update and its figures (client/client_app.py: TrainFigures, None for a private
        merchant; only the latest update can be asked for again), atomically."""
        meta = {"digest": key, "keys": list(arrays), "figures": figures}
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **{f"a/{name}": value for name, value in arrays.items()})
        write_bytes_atomic(self.path, buffer.getvalue())
