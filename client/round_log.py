"""A merchant's own log of the rounds it answered (``state-dir/rounds.jsonl``): written by the ClientApp, which
runs inside Flower's processes, and followed by the merchant daemon, which prints one line per entry. It stays
with the merchant; a simulation, which hosts every merchant, reads it to tell its merchants' own work from the
engine's overhead (``work_of``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fedaug.runtime.processes import LogFollower

ROUND_LOG = "rounds.jsonl"


@dataclass(frozen=True)
class MerchantRound:
    round: int
    run: str
    declined: bool
    epsilon: float | None
    """ε spent after the round (None: non-private)."""
    seconds: float
    bytes_sent: int
    """Size of the update as sent (0 when declined): compressed, when the server asked for it."""
    stage: str = "train"
    """train, evaluate (a non-private merchant scoring the global model), statistics or selection (its counts, or
    its figures for the candidate model, masked for a secure sum)."""
    work_seconds: float = 0.0
    """The handler's own time for this message: training or scoring, and encoding the reply."""
    setup_seconds: float = 0.0
    """Time spent building the merchant's state for this message (its data slice, split, trainer, ledger)."""

    def line(self) -> str:
        """What the daemon prints."""
        if self.stage == "evaluate":
            return f"round {self.round}: evaluated the global model in {self.work_seconds:.1f} s"
        spent = "non-private" if self.epsilon is None else f"ε {self.epsilon:.3f} spent"
        if self.stage == "statistics":
            return (f"before round 1: statistics counted and masked for a secure sum in {self.work_seconds:.1f} s, "
                    f"{spent}, {self.bytes_sent:,} bytes sent")
        if self.stage == "selection":
            return (f"after the last round: the candidate model scored and masked for a secure sum in "
                    f"{self.work_seconds:.1f} s, {spent}, {self.bytes_sent:,} bytes sent")
        if self.declined:
            return f"round {self.round}: declined (the round would pass the privacy budget; {spent})"
        return f"round {self.round}: trained in {self.seconds:.1f} s, {spent}, update of {self.bytes_sent:,} bytes sent"


def append_round(state_dir: Path, entry: MerchantRound) -> None:
    Path(state_dir).mkdir(parents=True, exist_ok=True)  # a non-private merchant has no ledger that made it
    with open(Path(state_dir) / ROUND_LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps(asdict(entry)) + "\n")


def read_rounds(state_dir: Path) -> list[MerchantRound]:
    """Every complete entry of the merchant's round log (none when it has no log yet)."""
    path = Path(state_dir) / ROUND_LOG
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return _parse(data)[0]


def _parse(data: bytes) -> tuple[list[MerchantRound], int]:
    """The complete entries in ``data`` (a line still being written is left for later) and the bytes they took;
    a line that is not an entry is skipped."""
    complete = data[: data.rfind(b"\n") + 1]
    entries = []
    for line in complete.decode(errors="replace").splitlines():
        try:
            entries.append(MerchantRound(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return entries, len(complete)


class RoundLogFollower(LogFollower):
    """Calls ``say`` with each round the ClientApp logs from now on (checked every ``interval`` seconds)."""

    def __init__(self, state_dir: Path, say: Callable[[str], None], interval: float = 1.0, since: int | None = None):
        """``since``: the byte to start from (default: the log's end now)."""
        super().__init__(Path(state_dir) / ROUND_LOG, self._entry, interval, since)
        self.say = say

    def _entry(self, line: str) -> None:
        entries, _ = _parse(f"{line}\n".encode())  # a line that is not an entry is skipped
        for entry in entries:
            self.say(entry.line())
