"""The one-run privacy audit: its statistics against hand-computed values, and real runs with and without DP."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fedaug.client.ledger import PrivacyLedger
from fedaug.common.config import MerchantRunConfig, load_config
from fedaug.simulations.audit import epsilon_lower_bound, guess, p_value, run_audit, run_federated_audit
from fedaug.simulations.scenario import SimulationConfig


def test_all_of_100_guesses_right_refute_every_epsilon_below_3_49():
    # p^100 = 0.05 at p = 0.05^(1/100) = 0.970487..., ε = ln(p / (1 - p)) = 3.4930
    assert epsilon_lower_bound(100, 100, 100, delta=0.0) == pytest.approx(3.4930, abs=1e-3)
    p = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(1000, 100, 100, 0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)


def test_p_value_by_hand():
    assert p_value(10, 10, 10, 0.0, 0.0) == pytest.approx(0.5 ** 10)  # ε = 0: coin flips
    assert p_value(10, 4, 3, math.log(3), 0.0) == pytest.approx(4 * 0.75 ** 3 * 0.25 + 0.75 ** 4)
    # δ adds 2·m·δ·max_i P[v - i <= Bin(r, q) < v] / i; here the max is at i = 1: P[Bin(4, ½) = 2] = 6/16
    assert p_value(10, 4, 3, 0.0, 0.01) == pytest.approx(5 / 16 + 2 * 10 * 0.01 * 6 / 16)
    values = [p_value(1000, 200, 180, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values)  # a larger ε explains more correct guesses
    with pytest.raises(ValueError):
        p_value(10, 5, 6, 1.0, 0.0)


def test_chance_level_guessing_refutes_nothing_and_delta_only_weakens_the_bound():
    assert epsilon_lower_bound(1000, 200, 100, 0.0) == 0.0
    assert epsilon_lower_bound(1000, 200, 190, 1e-4) < epsilon_lower_bound(1000, 200, 190, 0.0)


def test_guess_takes_the_most_confident_on_both_sides():
    scores = np.array([5.0, -3.0, 0.1, 4.0, -2.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    # in: 5.0 (right), 4.0 (wrong); out: -3.0 (right), -2.0 (right)
    assert guess(scores, included, 4) == (4, 3)


SMALL = {"synthetic.users": 200, "synthetic.items": 300, "synthetic.titles": False, "model.hidden": 32,
         "model.blocks": 1, "model.max_len": 20,
         "model.dropout": 0.0, "model.tie_embeddings": False, "local.batch_size": 64, "local.lr": 0.01,
         "augment.enabled": False}


def _config(epsilon: str, rounds: int, epochs: int) -> MerchantRunConfig:
    return load_config(None, SMALL | {"privacy.epsilon": epsilon, "local.rounds": rounds,
                                      "local.local_epochs": epochs}, MerchantRunConfig)


@pytest.mark.slow
def test_a_non_private_run_is_caught_and_a_private_one_is_not(tmp_path):
    leaky = run_audit(_config("inf", 1, 30), canaries=200, out=tmp_path / "inf", guesses=40, seed=1)
    assert leaky["epsilon_claimed"] == "inf" and leaky["epsilon_lower_bound"] > 1.0, leaky
    private = run_audit(_config("1.0", 1, 30), canaries=200, out=tmp_path / "dp", guesses=40, seed=1)
    assert 0 < private["epsilon_claimed"] <= 1.0
    assert private["epsilon_lower_bound"] <= private["epsilon_claimed"], private
    written = json.loads((tmp_path / "dp" / "audit.json").read_text())
    assert {"epsilon_claimed", "delta", "epsilon_lower_bound", "canaries", "guesses", "correct"} <= set(written)
    assert (tmp_path / "dp" / "audit.png").stat().st_size > 0


@pytest.mark.slow
def test_the_federated_path_audits_the_global_model_against_the_canary_merchants_ledger(tmp_path):
    def config(epsilon: str) -> SimulationConfig:
        return load_config(None, SMALL | {"privacy.epsilon": epsilon, "local.local_epochs": 30,
                                          "federation.rounds": 1, "simulation.merchants": 3}, SimulationConfig)

    leaky = run_federated_audit(config("inf"), canaries=200, out=tmp_path / "inf", guesses=40, seed=1,
                                canary_merchant=2)
    assert leaky["path"] == "federated" and leaky["epsilon_claimed"] == "inf"
    assert leaky["epsilon_lower_bound"] > 0.5, leaky  # memorised through one merchant of three, averaged
    events = pd.read_csv(tmp_path / "inf" / "data" / "events.csv")
    per_merchant = events.groupby("merchant_id")["user_id"].nunique()
    assert per_merchant["merchant-2"] - per_merchant["merchant-0"] == pytest.approx(leaky["included"], abs=1)
    canary_rows = events[events["user_id"] > 200]  # the synthetic users are 1..200; canaries follow
    assert set(canary_rows["merchant_id"]) == {"merchant-2"} and canary_rows["user_id"].nunique() == leaky["included"]
    private = run_federated_audit(config("1.0"), canaries=200, out=tmp_path / "dp", guesses=40, seed=1)
    assert 0 < private["epsilon_claimed"] <= 1.0 and private["delta"] > 0
    assert private["epsilon_lower_bound"] <= private["epsilon_claimed"], private
    ledger = PrivacyLedger(tmp_path / "dp" / "federation" / "state" / "merchant-0")
    assert [e.round for e in ledger.entries()] == [1]  # the canary merchant trained, and ε is from its ledger
    assert private["epsilon_claimed"] == pytest.approx(ledger.epsilon(private["delta"]))
    assert (tmp_path / "dp" / "audit.png").stat().st_size > 0
