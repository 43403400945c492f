"""The one-run privacy audit: its statistics against hand-computed values, and real runs with and without DP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from client.config import MerchantConfig
from common.config import load_config
from simulations.audit import epsilon_lower_bound, guess, p_value, run_audit


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


def _config(epsilon: str, rounds: int, epochs: int) -> MerchantConfig:
    return load_config(None, {"synthetic.users": 200, "synthetic.items": 300, "model.hidden": 32,
                              "model.blocks": 1, "model.max_len": 20, "model.dropout": 0.0,
                              "model.tie_embeddings": False, "privacy.epsilon": epsilon, "local.rounds": rounds,
                              "local.local_epochs": epochs, "local.batch_size": 64, "local.lr": 0.01,
                              "augment.enabled": False}, MerchantConfig)


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
