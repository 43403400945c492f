"""The privacy ledger: ε rebuilt from disk equals a live accountant's, budgets hold, crashes lose no entry, and a
pooled (Skellam) release is accounted by RDP alone, in agreement with an outside accountant (dp_accounting)."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import dp_accounting
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedaug.client.ledger import BudgetExceeded, PrivacyLedger, calibrate_noise, epsilon_of, ledger_status
from fedaug.common.privacy.skellam import equivalent_noise_multiplier, rho, variance_for
from fedaug.common.privacy.skellam import rdp as skellam_rdp

DELTA = 1e-5


def test_rebuilt_epsilon_equals_live_accountants(tmp_path):
    """Every recorded ε is the smaller of the two bounds that live Opacus accountants, stepped once per step, give
    for the same mechanisms; a restart rebuilds exactly the same ε from disk."""
    history = [(1.1, 0.01, 100), (0.9, 0.02, 50), (1.5, 0.01, 300)]
    live_prv, live_rdp = PRVAccountant(), RDPAccountant()
    ledger = PrivacyLedger(tmp_path)
    for round_, (noise, q, steps) in enumerate(history, start=1):
        for _ in range(steps):
            live_prv.step(noise_multiplier=noise, sample_rate=q)
            live_rdp.step(noise_multiplier=noise, sample_rate=q)
        recorded = ledger.record("run-a", round_, noise, q, steps, DELTA)
        expected = min(live_prv.get_epsilon(DELTA), live_rdp.get_epsilon(DELTA))
        assert recorded == pytest.approx(expected, rel=1e-6)
        assert recorded < live_rdp.get_epsilon(DELTA)  # here PRV is the tighter bound
    ledger.close()
    reopened = PrivacyLedger(tmp_path)  # a restart: the accountant comes back from disk only
    assert reopened.epsilon(DELTA) == recorded
    assert [e.round for e in reopened.entries()] == [1, 2, 3]


@pytest.mark.parametrize("history", [
    [(0.519, 0.0114, 88)],  # `fedaug local` on Beauty's 10 % share: 88 steps at q 0.0114
    [(0.519, 0.0114, 88)] * 10,  # ten such rounds
    [(0.8, 0.05, 40), (2.0, 0.5, 3), (0.6, 1.0, 2)],
    [(0.3, 0.5, 30)],  # a large ε: still never above RDP
    [(0.05, 0.01, 100)],  # past PRV_ABOVE: the RDP bound itself
])
def test_the_ledger_never_reports_more_than_rdp(history):
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert epsilon_of(history, DELTA) <= rdp.get_epsilon(DELTA)


def test_the_same_budget_buys_less_noise():
    """The point of the tighter accountant: at ε = 8 a merchant's calibrated noise is well below RDP's."""
    q, steps, delta = 0.0114, 88, 1 / (10 * 2236)
    rdp = RDPAccountant()
    rdp.history = [(0.519, q, steps)]
    assert epsilon_of([(0.519, q, steps)], delta) < 0.85 * rdp.get_epsilon(delta)
    noise = calibrate_noise([], q, steps, delta, 8.0)
    rdp.history = [(noise, q, steps)]
    assert noise < 0.519 and rdp.get_epsilon(delta) > 8.0


def test_budget_is_never_exceeded_and_rounds_compose_across_runs(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    budget, q, steps = 3.0, 0.02, 50
    noise = calibrate_noise([], q, steps * 4, DELTA, budget)  # plan: 4 rounds
    assert epsilon_of([(noise, q, steps * 4)], DELTA) <= budget
    assert epsilon_of([(noise * 0.98, q, steps * 4)], DELTA) > budget * 0.99  # calibration is tight
    for round_ in range(1, 5):
        ledger.record("run-1", round_, noise, q, steps, DELTA, budget)
    assert ledger.epsilon(DELTA) <= budget
    # a second run of the same merchant cannot spend it again
    with pytest.raises(BudgetExceeded):
        ledger.record("run-2", 1, noise, q, steps, DELTA, budget)
    with pytest.raises(BudgetExceeded):
        calibrate_noise(ledger.history(), q, steps, DELTA, ledger.epsilon(DELTA))
    assert len(ledger.entries()) == 4 and ledger.epsilon(DELTA) <= budget


def test_calibration_accounts_for_what_was_already_spent(tmp_path):
    spent = [(1.0, 0.02, 200)]
    fresh = calibrate_noise([], 0.02, 200, DELTA, 8.0)
    after = calibrate_noise(spent, 0.02, 200, DELTA, 8.0)
    assert after > fresh
    assert epsilon_of(spent + [(after, 0.02, 200)], DELTA) <= 8.0
    assert calibrate_noise([], 0.02, 200, DELTA, math.inf) == 0.0


def test_a_repeated_round_is_a_second_release(tmp_path):
    """A round the server retries (or replays after a crash) trains again on the same data: it must count twice."""
    ledger = PrivacyLedger(tmp_path)
    once = ledger.record("run", 1, 1.0, 0.01, 10, DELTA)
    twice = ledger.record("run", 1, 1.0, 0.01, 10, DELTA)
    assert len(ledger.entries()) == 2 and twice > once
    assert [row[0] for row in ledger._db.execute("SELECT attempt FROM rounds ORDER BY id")] == [1, 2]


def test_a_ledger_from_before_attempts_is_migrated(tmp_path):
    old = sqlite3.connect(tmp_path / "privacy-ledger.sqlite")
    old.execute("""CREATE TABLE rounds (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
                   round INTEGER NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
                   steps INTEGER NOT NULL, delta REAL NOT NULL, epsilon REAL NOT NULL, recorded_at REAL NOT NULL,
                   UNIQUE (run_id, round))""")
    old.execute("INSERT INTO rounds (run_id, round, noise_multiplier, sample_rate, steps, delta, epsilon, "
                "recorded_at) VALUES ('run', 1, 1.0, 0.01, 10, ?, 0.5, 0)", (DELTA,))
    old.commit()
    old.close()
    ledger = PrivacyLedger(tmp_path)
    before = ledger.epsilon(DELTA)
    ledger.record("run", 1, 1.0, 0.01, 10, DELTA)
    assert len(ledger.entries()) == 2 and ledger.epsilon(DELTA) > before > 0
    assert [e.mechanism for e in ledger.entries()] == ["gaussian", "gaussian"]


def test_a_ledger_from_before_pooled_releases_is_migrated_and_keeps_its_epsilon(tmp_path):
    old = sqlite3.connect(tmp_path / "privacy-ledger.sqlite")
    old.execute("""CREATE TABLE rounds (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
                   round INTEGER NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
                   steps INTEGER NOT NULL, delta REAL NOT NULL, epsilon REAL NOT NULL, recorded_at REAL NOT NULL,
                   attempt INTEGER NOT NULL DEFAULT 1, UNIQUE (run_id, round, attempt))""")
    history = [(1.1, 0.01, 100), (0.9, 0.02, 50)]
    for round_, (noise, q, steps) in enumerate(history, start=1):
        old.execute("INSERT INTO rounds (run_id, round, noise_multiplier, sample_rate, steps, delta, epsilon, "
                    "recorded_at) VALUES ('run', ?, ?, ?, ?, ?, 0.5, 0)", (round_, noise, q, steps, DELTA))
    old.commit()
    old.close()
    ledger = PrivacyLedger(tmp_path)
    assert [e.mechanism for e in ledger.entries()] == ["gaussian", "gaussian"] and not ledger.rdp_only
    assert ledger.epsilon(DELTA) == epsilon_of(history, DELTA)  # PRV still accounts it: ε unchanged
    ledger.close()
    assert ledger_status(tmp_path).rounds == 2
    assert PrivacyLedger(tmp_path).epsilon(DELTA) == epsilon_of(history, DELTA)  # migrated once, opened again


def test_a_pooled_release_makes_the_ledger_account_by_rdp_alone(tmp_path):
    """A Skellam release's Gaussian dominates it in RDP only: from then on the whole history is accounted by the
    RDP bound (Opacus' RDP accountant on every entry), above the PRV bound it had before; a restart agrees."""
    ledger = PrivacyLedger(tmp_path)
    rounds = [(1.1, 0.01, 100), (0.9, 0.02, 50)]
    for round_, (noise, q, steps) in enumerate(rounds, start=1):
        ledger.record("run", round_, noise, q, steps, DELTA)
    pooled = equivalent_noise_multiplier(variance=400.0, l1=4, l2=2)
    with pytest.raises(ValueError, match="sample rate 1"):
        ledger.record("run/statistics", 0, pooled, 0.5, 1, DELTA, mechanism="skellam")
    with pytest.raises(ValueError, match="unknown mechanism"):
        ledger.record("run/statistics", 0, pooled, 1.0, 1, DELTA, mechanism="laplace")
    history = [*rounds, (pooled, 1.0, 1)]
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert ledger.epsilon_after(pooled, 1.0, 1, DELTA, mechanism="skellam") == pytest.approx(rdp.get_epsilon(DELTA))
    recorded = ledger.record("run/statistics", 0, pooled, 1.0, 1, DELTA, mechanism="skellam")
    assert ledger.rdp_only and ledger.entries()[-1].mechanism == "skellam" and ledger.history() == history
    assert recorded == ledger.epsilon(DELTA) == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
    assert recorded > epsilon_of(history, DELTA)  # PRV would have said less: not valid here
    ledger.close()
    assert PrivacyLedger(tmp_path).epsilon(DELTA) == recorded


def test_a_pooled_release_is_calibrated_by_rdp_and_fits_its_budget(tmp_path):
    """Calibrated by RDP alone, the pooled release's variance fits the budget; calibrated as if PRV applied, its
    noise is too small and the ledger refuses it."""
    spent, budget, l1, l2 = [(1.0, 0.02, 200)], 3.0, 4, 2
    ledger = PrivacyLedger(tmp_path)
    ledger.record("run", 1, *spent[0], DELTA, budget)

    def pooled(rdp_only: bool) -> float:
        noise = calibrate_noise(spent, 1.0, 1, DELTA, budget, rdp_only=rdp_only)
        multiplier = equivalent_noise_multiplier(variance=variance_for(noise, l1=l1, l2=l2), l1=l1, l2=l2)
        assert multiplier >= noise
        return multiplier

    with pytest.raises(BudgetExceeded):
        ledger.record("run/statistics", 0, pooled(False), 1.0, 1, DELTA, budget, mechanism="skellam")
    assert budget * 0.99 < ledger.record("run/statistics", 0, pooled(True), 1.0, 1, DELTA, budget,
                                         mechanism="skellam") <= budget


def outside_epsilon(skellam: tuple[float, float, float] | None, rounds: list[tuple[float, float, int]]) -> float:
    """ε from Google's dp_accounting: its RDP accountant composing the Skellam release as zCDP with ρ (variance,
    l1, l2) and each DP-SGD round as Poisson-sampled Gaussians, at its own orders."""
    accountant = dp_accounting.rdp.RdpAccountant()
    if skellam is not None:
        variance, l1, l2 = skellam
        accountant.compose(dp_accounting.ZCDpEvent(rho(variance=variance, l1=l1, l2=l2)))
    for noise, q, steps in rounds:
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps))
    return accountant.get_epsilon(DELTA)


@pytest.mark.parametrize("skellam, rounds", [
    ((200.0, 4, 2), [(0.9, 0.02, 50)] * 3),  # statistics of 4 transitions a user, then three DP-SGD rounds
    ((2000.0, 50, math.sqrt(50)), [(1.1, 0.01, 300)]),  # 50 counts a user
    ((50.0, 4, 2), []),  # a pooled release alone
])
def test_the_ledgers_pooled_epsilon_agrees_with_dp_accounting(tmp_path, skellam, rounds):
    ledger = PrivacyLedger(tmp_path)
    variance, l1, l2 = skellam
    ledger.record("run/statistics", 0, equivalent_noise_multiplier(variance=variance, l1=l1, l2=l2), 1.0, 1, DELTA,
                  mechanism="skellam")
    for round_, (noise, q, steps) in enumerate(rounds, start=1):
        ledger.record("run", round_, noise, q, steps, DELTA)
    outside = outside_epsilon(skellam, rounds)
    assert outside * (1 - 1e-3) <= ledger.epsilon(DELTA) <= outside * 1.05


def test_a_pure_pooled_history_agrees_with_dp_accounting_both_ways(tmp_path):
    """From a budget to a variance (the ledger's calibration) and from that variance to ε (the outside accountant's
    zCDP, and its conversion of the Skellam's own RDP curve): the same ε within the orders' grids."""
    budget, l1, l2 = 1.0, 4, 2
    variance = variance_for(calibrate_noise([], 1.0, 1, DELTA, budget, rdp_only=True), l1=l1, l2=l2)
    ledger = PrivacyLedger(tmp_path)
    epsilon = ledger.record("run/statistics", 0, equivalent_noise_multiplier(variance=variance, l1=l1, l2=l2), 1.0,
                            1, DELTA, budget, mechanism="skellam")
    assert budget * 0.99 <= epsilon <= budget
    assert outside_epsilon((variance, l1, l2), []) == pytest.approx(epsilon, rel=1e-3)
    orders = dp_accounting.rdp.RdpAccountant()._orders
    curve = [skellam_rdp(alpha, variance=variance, l1=l1, l2=l2) for alpha in orders]
    direct, _ = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(orders, curve, DELTA)
    assert direct <= epsilon * (1 + 1e-3) and epsilon <= direct * 1.05  # ρ·α costs little over the exact curve


@pytest.mark.integration  # a process killed mid-commit
def test_a_kill_mid_commit_leaves_the_ledger_consistent(tmp_path):
    """SIGKILL a writer inside its transaction: after restart the entry is wholly absent, and the ledger works."""
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from fedaug.client.ledger import PrivacyLedger
        ledger = PrivacyLedger({str(tmp_path)!r})
        ledger.record("run", 1, 1.0, 0.01, 10, 1e-5)
        ledger._db.execute("BEGIN IMMEDIATE")
        ledger._db.execute("INSERT INTO rounds (run_id, round, noise_multiplier, sample_rate, steps, delta, epsilon,"
                           " recorded_at) VALUES ('run', 2, 1.0, 0.01, 10, 1e-5, 0.5, 0)")
        print("inside", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "inside"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ledger = PrivacyLedger(tmp_path)
    assert [e.round for e in ledger.entries()] == [1]
    ledger.record("run", 2, 1.0, 0.01, 10, DELTA)
    assert [e.round for e in ledger.entries()] == [1, 2]


def test_a_new_ledger_for_data_already_spent_on_is_refused_unless_asked_for(tmp_path):
    """The registry binds ledgers to their data's fingerprint: a fresh state-dir cannot restart a spent budget."""
    from fedaug.client.spent import claim, registry_path
    from fedaug.common.errors import FedaugError

    first, second = tmp_path / "run1" / "state", tmp_path / "run2" / "state"
    claim("shop-a", first)
    claim("shop-a", second)  # nothing spent yet under run1: nothing to protect
    ledger = PrivacyLedger(first)
    ledger.record("r", 1, noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5)
    ledger.close()
    claim("shop-a", first)  # the ledger that spent keeps composing
    with pytest.raises(FedaugError, match=r"run1/state \(1 DP round\): .* --new-budget"):
        claim("shop-a", tmp_path / "run3")
    claim("shop-b", tmp_path / "run3")  # other users: their own budget
    claim("shop-a", tmp_path / "run4", new_budget=True)  # asked for explicitly
    import shutil

    shutil.rmtree(first)  # a ledger deleted on purpose no longer binds the data
    claim("shop-a", tmp_path / "run5")
    assert str(first) not in registry_path().read_text()


def test_a_small_merchants_selection_release_is_reserved_past_the_training_limit():
    """ε 4 with 5 % for the selection: one Gaussian release at ε 0.2 and δ 1/1500 needs a multiplier past the
    training limit of 10; the one-off release takes it rather than failing the merchant's whole run."""
    from fedaug.client.ledger import MAX_NOISE_MULTIPLIER, RELEASE_MAX_NOISE_MULTIPLIER
    delta = 1 / 1500
    with pytest.raises(BudgetExceeded):
        calibrate_noise([], 1.0, 1, delta, 0.2)
    noise = calibrate_noise([], 1.0, 1, delta, 0.2, limit=RELEASE_MAX_NOISE_MULTIPLIER)
    assert MAX_NOISE_MULTIPLIER < noise < RELEASE_MAX_NOISE_MULTIPLIER
    assert epsilon_of([(noise, 1.0, 1)], delta) <= 0.2
