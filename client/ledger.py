"""The merchant's durable privacy ledger: every DP training round it ever ran, in SQLite in its state-dir.

ε must compose over every round a merchant trained in, across runs and restarts. The ledger is the only source of
that history: on start the accountant is rebuilt from it, and a round's entry is committed (fsync'd by SQLite
with ``synchronous=FULL``) before the round's update may leave the merchant. A crash before the commit loses the
update with it; a crash after it loses only the update, never the accounting.

Every entry is a Gaussian mechanism (noise multiplier, sample rate, steps). Its ``mechanism`` says what was run:
``"gaussian"``, the merchant's own noise (DP-SGD, local releases), or ``"skellam"``, a pooled release through secure
aggregation (fedaug.common.privacy.skellam), recorded as its equivalent Gaussian noise multiplier at sample rate 1.
That Gaussian dominates the Skellam in Rényi DP only, so a history holding any ``"skellam"`` entry is accounted by
the RDP bound alone (``rdp_only``), never by PRV. The pooled guarantee assumes each user shops at one merchant, the
aggregator follows the protocol, and at most the tolerated number of merchants collude or drop.
"""

from __future__ import annotations

import math
import sqlite3
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from opacus.accountants import PRVAccountant, RDPAccountant

from fedaug.common.errors import FedaugError
from fedaug.common.records import LedgerStatus, RunSpend

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    epsilon REAL NOT NULL,
    recorded_at REAL NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    mechanism TEXT NOT NULL DEFAULT 'gaussian',
    UNIQUE (run_id, round, attempt)
)
"""
LEDGER_FILE = "privacy-ledger.sqlite"
COLUMNS = "run_id, round, noise_multiplier, sample_rate, steps, delta, epsilon, recorded_at"
"""The columns of the first ledgers (copied over when one is rebuilt)."""
GAUSSIAN, SKELLAM = "gaussian", "skellam"
MECHANISMS = (GAUSSIAN, SKELLAM)
"""An entry's ``mechanism``: the merchant's own Gaussian noise, or its share of a pooled Skellam release."""


@dataclass(frozen=True)
class RoundEntry:
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    mechanism: str = GAUSSIAN


class BudgetExceeded(FedaugError):
    """The next round would take ε past the merchant's budget: the merchant declines to train."""


ACCOUNTANT = "prv"
"""The ledger's accountant: Opacus' PRV accountant (Gopi et al., 2021; numerical composition of privacy random
variables, its certified upper bound), never above the RDP bound it replaces — for the same rounds it reports less
ε, so the same budget buys less noise. Where RDP already says ε > PRV_ABOVE, RDP's bound is kept: there the PRV
grid becomes huge (minutes per call) and such an ε protects nobody anyway."""
PRV_ABOVE = 100.0


def epsilon_of(history: list[tuple[float, float, int]], delta: float, rdp_only: bool = False) -> float:
    """ε after the subsampled Gaussian mechanisms in ``history`` = [(noise_multiplier, sample_rate, steps), ...]:
    the smaller of the PRV and RDP upper bounds (both are valid bounds, so their minimum is one too). ``rdp_only``:
    the RDP bound alone, as where ``history`` holds a pooled Skellam release (its Gaussian dominates it in RDP only)."""
    if not history:
        return 0.0
    if any(noise <= 0 for noise, _, _ in history):
        return math.inf
    merged: dict[tuple[float, float], int] = {}  # equal mechanisms compose as one with the summed steps
    for noise, rate, steps in history:
        merged[(float(noise), float(rate))] = merged.get((float(noise), float(rate)), 0) + int(steps)
    return _epsilon(tuple((noise, rate, steps) for (noise, rate), steps in merged.items()), float(delta),
                    bool(rdp_only))


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, rdp_only: bool) -> float:
    """Cached per plan: calibration and every round's check ask for the same histories again and again."""
    rdp = RDPAccountant()
    rdp.history = list(history)
    with warnings.catch_warnings():  # huge noise multipliers (tried while calibrating) hit the largest RDP order
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        epsilon = float(rdp.get_epsilon(delta))
    if rdp_only or epsilon > PRV_ABOVE:
        return epsilon
    prv = PRVAccountant()
    prv.history = list(history)
    with warnings.catch_warnings():  # sample rate 1 (a plain Gaussian release) takes log(1 - q) = -inf on the way
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")
        # PRV sizes its domain with an RDP bound, which for one heavily noised release (the selection's) peaks past
        # the largest order: that loose bound only sets the grid, the ε returned is PRV's own.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return min(epsilon, float(prv.get_epsilon(delta)))


MAX_NOISE_MULTIPLIER = 10.0
"""Past this, an update is noise: a merchant declines rather than train with it."""

RELEASE_MAX_NOISE_MULTIPLIER = 1e4
"""A one-off release of sums (the selection's figures) is still safe past MAX_NOISE_MULTIPLIER: heavily noised
figures only make its test keep the simpler candidate, so a small merchant reserves it instead of failing."""


def calibrate_noise(spent: list[tuple[float, float, int]], sample_rate: float, steps: int, delta: float,
                    budget: float, tolerance: float = 1e-3, limit: float = MAX_NOISE_MULTIPLIER,
                    rdp_only: bool = False) -> float:
    """Smallest noise multiplier (to ``tolerance``) such that ``spent`` plus ``steps`` more steps stays within
    ``budget``. Raises BudgetExceeded when the budget left would need more than ``limit``. ``rdp_only`` (as in
    ``epsilon_of``): where ``spent`` holds a pooled release (``PrivacyLedger.rdp_only``), or where the new one is
    pooled (its Skellam variance is then ``skellam.variance_for`` the multiplier returned)."""
    if math.isinf(budget):
        return 0.0

    def epsilon(noise: float) -> float:
        return epsilon_of(spent + [(noise, sample_rate, steps)], delta, rdp_only)

    if epsilon(limit) > budget:
        raise BudgetExceeded(f"privacy budget ε={budget:g} is spent (ε={epsilon_of(spent, delta, rdp_only):.3f} "
                             f"so far): even noise multiplier {limit:g} would exceed it")
    low, high = 0.05, 1.0
    while epsilon(high) > budget:
        low, high = high, high * 2
    while high - low > tolerance:
        mid = (low + high) / 2
        if epsilon(mid) > budget:
            low = mid
        else:
            high = mid
    return high


class PrivacyLedger:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LEDGER_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        self._migrate()

    def _columns(self) -> set[str]:
        return {row[1] for row in self._db.execute("PRAGMA table_info(rounds)")}

    def _migrate(self) -> None:
        """Bring a ledger written by an older fedaug to SCHEMA in place, its entries (and so its ε) unchanged:
        one from before rounds could repeat had UNIQUE (run_id, round) and is rebuilt with attempts; one from
        before pooled releases gets ``mechanism``, every old entry being a Gaussian one."""
        if {"attempt", "mechanism"} <= self._columns():
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            columns = self._columns()  # again under the lock: another process may have migrated it meanwhile
            if "attempt" not in columns:
                self._db.execute("ALTER TABLE rounds RENAME TO rounds_old")
                self._db.execute(SCHEMA)
                self._db.execute(f"INSERT INTO rounds (id, {COLUMNS}) SELECT id, {COLUMNS} FROM rounds_old")
                self._db.execute("DROP TABLE rounds_old")
            elif "mechanism" not in columns:
                self._db.execute(f"ALTER TABLE rounds ADD COLUMN mechanism TEXT NOT NULL DEFAULT '{GAUSSIAN}'")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    def entries(self) -> list[RoundEntry]:
        rows = self._db.execute(
            "SELECT run_id, round, noise_multiplier, sample_rate, steps, delta, epsilon, mechanism FROM rounds "
            "ORDER BY id"
        ).fetchall()
        return [RoundEntry(*row) for row in rows]

    def history(self) -> list[tuple[float, float, int]]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries()]

    @property
    def rdp_only(self) -> bool:
        """Whether a pooled (Skellam) release is among the entries: then only the RDP bound accounts them."""
        return self._db.execute(f"SELECT 1 FROM rounds WHERE mechanism != '{GAUSSIAN}' LIMIT 1").fetchone() is not None

    def epsilon(self, delta: float) -> float:
        """ε spent so far, rebuilt from every recorded round."""
        return epsilon_of(self.history(), delta, self.rdp_only)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                      mechanism: str = GAUSSIAN) -> float:
        """ε after one more entry: ``mechanism`` as in ``record``."""
        return epsilon_of(self.history() + [(noise_multiplier, sample_rate, steps)], delta,
                          self.rdp_only or mechanism != GAUSSIAN)

    def record(self, run_id: str, round_: int, noise_multiplier: float, sample_rate: float, steps: int,
               delta: float, budget: float = math.inf, mechanism: str = GAUSSIAN) -> float:
        """Commit one trained round and return ε after it. Refuses (BudgetExceeded) to go past ``budget``.

        A round trained again (the server retried it, or resumed after a crash) is a second release of the same
        data: it is recorded as the next attempt and composes like any other round.

        ``mechanism``: ``"gaussian"`` (the merchant's own noise) or ``"skellam"``, a pooled release recorded as
        ``skellam.equivalent_noise_multiplier`` of its pooled variance, at sample rate 1 (the dominance is shown for
        the release itself, not for a subsampled one).
        """
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}: one of {', '.join(MECHANISMS)}")
        if mechanism == SKELLAM and sample_rate != 1.0:
            raise ValueError(f"a pooled Skellam release is recorded at sample rate 1, got {sample_rate}")
        self._db.execute("BEGIN IMMEDIATE")  # one writer: the check and the insert see the same history
        try:
            epsilon = self.epsilon_after(noise_multiplier, sample_rate, steps, delta, mechanism)
            if epsilon > budget * (1 + 1e-9):
                raise BudgetExceeded(f"round would spend ε={epsilon:.3f}, past the budget ε={budget:g}")
            (attempts,) = self._db.execute("SELECT COUNT(*) FROM rounds WHERE run_id = ? AND round = ?",
                                           (run_id, int(round_))).fetchone()
            self._db.execute(
                f"INSERT INTO rounds ({COLUMNS}, attempt, mechanism) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, int(round_), float(noise_multiplier), float(sample_rate), int(steps), float(delta),
                 epsilon, time.time(), attempts + 1, mechanism),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return epsilon


def ledger_status(state_dir: Path) -> LedgerStatus | None:
    """The ledger in ``state_dir`` summarised for operators, read-only (None where there is none)."""
    path = Path(state_dir) / LEDGER_FILE
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT run_id, round, delta, epsilon, recorded_at FROM rounds ORDER BY id").fetchall()
    except sqlite3.Error as exc:
        raise FedaugError(f"{path}: not a readable privacy ledger ({exc})") from None
    finally:
        db.close()
    runs: dict[str, RunSpend] = {}
    for run_id, round_, _, epsilon, _ in rows:
        before = runs.get(run_id)
        runs[run_id] = RunSpend(run_id=run_id, rounds=(before.rounds if before else 0) + 1,
                                last_round=max(round_, before.last_round if before else 0), epsilon_after=epsilon)
    last = rows[-1] if rows else None
    return LedgerStatus(state_dir=str(Path(state_dir)), epsilon=last[3] if last else 0.0,
                        delta=last[2] if last else None, rounds=len(rows), runs=list(runs.values()),
                        last_recorded=None if last is None else
                        datetime.fromtimestamp(last[4], timezone.utc).isoformat(timespec="seconds"))

