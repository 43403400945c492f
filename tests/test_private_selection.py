"""Private selection: the model a private federation hands out is chosen from public settings and accounted
releases alone (fedaug.common.priors.composite, fedaug.common.priors.dp_counts.ReleaseRule), never from anyone's
held-out data — and it is the model the simulation reports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedaug.common.config import SyntheticSection
from fedaug.common.data.source import load_data
from fedaug.common.data.synthetic import generate
from fedaug.common.priors.dp_counts import Counts, ReleaseRule, bounded_counts, noised, release_cut, text_neighbours
from fedaug.common.priors.text_prior import TextPrior
from tests.support import WORDS, tiny_encoder


def test_exact_counts_keep_every_positive_cell():
    counts = np.array([0.0, 3.0, 0.0, 1.0])
    assert release_cut(counts, 0.0) == 0.0


def test_pure_noise_is_cut_away_and_strong_counts_are_kept():
    rng = np.random.default_rng(0)
    cells = 20_000
    noise = rng.normal(0, 2.0, cells + 1)
    assert release_cut(noise, 2.0) == math.inf  # nothing but noise: the term is dropped
    signal = noise.copy()
    signal[1:2001] += 20.0  # a tenth of the cells carry counts ten noise stds high
    cut = release_cut(signal, 2.0)
    assert 2.0 <= cut <= 4.0
    kept = signal[1:] > cut * 2.0
    assert kept[:2000].mean() > 0.99 and kept[2000:].sum() <= 0.1 * kept.sum()


def test_the_rule_drops_a_term_whose_cells_are_all_noise():
    split_data = generate(SyntheticSection(users=300, items=80, titles=False))
    vectors = np.random.default_rng(1).normal(size=(81, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    neighbours = text_neighbours(vectors, 6)
    prior = TextPrior(vectors, decay=0.25)
    exact = bounded_counts(split_data.sequences(), neighbours, max_items=4, max_pairs=1)
    drowned = noised(exact, noise_multiplier=1e4, max_items=4, max_pairs=1, rng=np.random.default_rng(0))
    scorer = ReleaseRule(0.03, 0.3).scorer(prior, drowned, neighbours)
    assert scorer.popularity_weight == 0 and scorer.pair_weight == 0
    clear = ReleaseRule(0.03, 0.3).scorer(prior, Counts(exact.popularity, exact.pairs), neighbours)
    assert clear.popularity_weight == 0.03 and clear.pair_weight == 0.3 and clear.threshold == 0


def write_titled_set(directory: Path, users: int = 240, items: int = 60) -> Path:
    """The synthetic generator's users as an Amazon-style set whose titles name each item's category (the text
    neighbours then follow the categories, as real titles do)."""
    data = generate(SyntheticSection(users=users, items=items, categories=4, merchants=3, titles=False))
    lines = [" ".join(map(str, [u + 1, *data.items[data.offsets[u]:data.offsets[u + 1]].tolist()]))
             for u in range(data.n_users)]
    (directory / "Shop.txt").write_text("\n".join(lines) + "\n")
    category = data.catalog.category
    titles = [f"{WORDS[int(category[i]) % 4]} {WORDS[4 + int(category[i]) % 6]} {WORDS[i % len(WORDS)]}"
              for i in range(1, data.n_items + 1)]
    (directory / "Shop_item_titles.tsv").write_text(
        "item_id\tasin\ttitle\n" + "".join(f"{i}\tA{i}\t{t}\n" for i, t in enumerate(titles, start=1)))
    return directory / "Shop.txt"


def _config(tmp_path: Path, pooled: bool):
    from fedaug.common.config import load_config
    from fedaug.simulations.scenario import SimulationConfig

    path = write_titled_set(tmp_path)
    encoder = tiny_encoder(tmp_path)
    (tmp_path / "run.toml").write_text(f"""
[data]
path = "{path}"
[text]
encoder = "{encoder}"
cache_dir = "{tmp_path / 'cache'}"
[model]
hidden = 16
blocks = 1
max_len = 20
[simulation]
merchants = 3
pooled_selection = {str(pooled).lower()}
[federation]
rounds = 1
[local]
batch_size = 32
""")
    return load_config(tmp_path / "run.toml", {"privacy.epsilon": 8.0}, SimulationConfig)


def _forbid_choosing_on_validation(monkeypatch, calls: list[str]) -> None:
    """Every function that chooses on validation records a call (and fails a private run below)."""
    import fedaug.common.priors.dp_counts
    import fedaug.common.priors.fusion
    import fedaug.common.priors.text_prior
    import fedaug.simulations.apps
    import fedaug.simulations.baseline

    def spy(name, real):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return wrapper

    for module, name in ((fedaug.common.priors.fusion, "fit_fusion"), (fedaug.simulations.apps, "fit_fusion"),
                         (fedaug.common.priors.dp_counts, "fit_prior_with_counts"),
                         (fedaug.simulations.apps, "fit_prior_with_counts"),
                         (fedaug.common.priors.text_prior, "fit_text_prior"),
                         (fedaug.simulations.baseline, "fit_text_prior"),
                         (fedaug.simulations.apps, "text_prior")):
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))


@pytest.mark.slow
def test_a_private_federation_hands_out_the_composite_chosen_without_held_out_data(tmp_path, monkeypatch):
    """No choice of a private run reads the pooled validation users: none of the functions that choose on
    validation is called while the federation runs and builds its bundle (they may run after it only for the
    baselines' report lines). The merchants all hold the aggregator's bundle, the prior fused with the DP
    statistics; the simulation reports exactly that bundle's test metrics."""
    from fedaug.common.data.split import leave_one_out
    from fedaug.common.model.evaluate import evaluate
    from fedaug.common.priors.fusion import Fused
    from fedaug.common.recommend.bundle import bundle_hash, load_bundle
    from fedaug.simulations import simulate

    calls: list[str] = []
    _forbid_choosing_on_validation(monkeypatch, calls)
    config = _config(tmp_path, pooled=False)
    during: list[str] = []
    real_save = simulate._save_global_models

    def after_the_run(*args, **kwargs):
        during.extend(calls)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(simulate, "_save_global_models", after_the_run)
    metrics = simulate.run_simulate(config, tmp_path / "out")
    assert during == [], f"a private run chose on validation: {during}"
    assert metrics.selection == "private" and "text prior + DP statistics" in metrics.product
    out = tmp_path / "out"
    final = bundle_hash(out / "state" / "model")
    assert bundle_hash(out / "model") == final
    assert [bundle_hash(out / "state" / f"merchant-{i}" / "model") for i in range(3)] == [final] * 3
    bundle = load_bundle(out / "model")
    assert bundle.card.scorer["kind"] == "fused" and bundle.card.scorer["prior"]["kind"] == "text+statistics"
    assert set(bundle.card.parts) >= {"text prior", "statistics", "model", "selection"}
    data = load_data(config.data, config.synthetic)
    assert bundle.card.privacy["epsilon"] <= 8.0 and bundle.card.items == data.n_items
    assert isinstance(bundle.scorer, Fused)
    test = evaluate(bundle.scorer, leave_one_out(data), "test")
    assert metrics.test["ndcg@10"] == pytest.approx(test["ndcg@10"], abs=1e-12)
    from fedaug.common.recommend.check import check_model  # what `fedaug evaluate` reports for the bundle the run wrote

    checked = check_model(bundle, data)
    assert checked.test["ndcg@10"] == pytest.approx(metrics.test["ndcg@10"], abs=1e-12)
    assert checked.test["hr@10"] == pytest.approx(metrics.test["hr@10"], abs=1e-12)
    assert checked.text_prior["ndcg@10"] == pytest.approx(metrics.baselines["text prior"]["ndcg@10"], abs=1e-12)
    report = (out / "report.md").read_text()
    assert "private selection" in report and "NOT PRIVATE" not in report
    # The model's weight came from the merchants' federated DP evaluation, which every ledger lists.
    evaluation = bundle.card.parts["model"]["evaluation"]
    assert evaluation["merchants"] == 3 and len(evaluation["candidates"]) == 3 and evaluation["noise_std"] > 0
    for release in (evaluation["release"], bundle.card.parts["statistics"]["release"]):  # three merchants: SecAgg+
        assert (release["secure_aggregation"], release["noise"], release["survivors"]) == ("SecAgg+", "pooled", 3)
    assert bundle.scorer.weight == evaluation["weight"]
    assert "Federated DP evaluation (3 merchants" in report
    from fedaug.client.ledger import PrivacyLedger

    for i in range(3):
        ledger = PrivacyLedger(out / "state" / f"merchant-{i}")
        runs = [e.run_id for e in ledger.entries()]
        ledger.close()
        assert runs[0].endswith("/selection") and runs[1].endswith("/statistics") and len(runs) > 2
    releases = bundle.card.privacy["releases"]
    assert [r["release"].split(" (")[0] for r in releases] == [
        "the federated DP evaluation's reservation", "DP-SGD updates", "the federated DP evaluation's figures"]
    assert 0 < releases[0]["epsilon_after"] < releases[1]["epsilon_after"] <= 8.0


@pytest.mark.slow
def test_the_pooled_research_switch_chooses_on_validation_and_says_not_private(tmp_path, monkeypatch):
    from fedaug.simulations.simulate import run_simulate

    calls: list[str] = []
    _forbid_choosing_on_validation(monkeypatch, calls)
    metrics = run_simulate(_config(tmp_path, pooled=True), tmp_path / "out")
    assert "fit_fusion" in calls and "fit_prior_with_counts" in calls
    assert metrics.selection == "pooled validation (not private)"
    assert "NOT PRIVATE" in (tmp_path / "out" / "report.md").read_text()


# federated DP evaluation (common/priors/fusion_weights.py)
# ---------------------------------------------------------------------


def _per_user(gain: float, users: int = 2000, seed: int = 0) -> dict[float, np.ndarray]:
    from fedaug.common.priors.fusion_weights import WEIGHTS

    rng = np.random.default_rng(seed)
    base = rng.uniform(0.1, 0.8, users)
    return {w: base if math.isinf(w) else base + gain * (w == 2.0) + rng.choice([-0.05, 0.05], users)
            for w in WEIGHTS}  # per-user differences without a systematic part, bar the gain at weight 2


def test_one_user_moves_the_released_vector_by_at_most_its_sensitivity():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fedaug.common.priors.fusion_weights import WEIGHTS, coordinates, sensitivity

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(*[st.floats(0, 1)] * len(WEIGHTS)), min_size=2, max_size=30))
    def check(rows):
        table = np.asarray(rows)
        full = coordinates({w: table[:, i] for i, w in enumerate(WEIGHTS)})
        less = coordinates({w: table[1:, i] for i, w in enumerate(WEIGHTS)})
        assert np.linalg.norm(full - less) <= sensitivity() + 1e-9

    check()


def test_a_clear_gain_is_kept_and_one_drowned_in_noise_is_not():
    from fedaug.common.priors.fusion_weights import choose, coordinates

    exact = coordinates(_per_user(0.05))
    clear = choose(exact, noise_std=5.0)
    assert clear["weight"] == 2.0 and clear["users"] == 2000
    assert choose(exact, noise_std=500.0)["weight"] == math.inf  # the same gain, but within the noise
    assert choose(coordinates(_per_user(0.0)), noise_std=0.0)["weight"] == math.inf  # no gain: the simpler model


def test_a_merchant_reserves_its_selection_before_its_statistics_and_releases_it_once(tmp_path):
    from fedaug.client.merchant import build_merchant
    from fedaug.client.releases import release_selection, release_statistics
    from fedaug.common.config import FederationConfig
    from fedaug.common.priors.fusion_weights import WEIGHTS, coordinates

    data = generate(SyntheticSection(users=200, items=60, titles=False))
    merchant = build_merchant(FederationConfig(), data, tmp_path)
    vectors = np.random.default_rng(1).normal(size=(data.n_items + 1, 8))
    neighbours = text_neighbours(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), 5)
    exact = coordinates(_per_user(0.0, users=50))
    with pytest.raises(Exception, match="no selection release was reserved"):
        release_selection(merchant.trainer, "run-1", exact, state_dir=tmp_path, weights=WEIGHTS)
    release_statistics(merchant.trainer, "run-1", neighbours, share=0.5, max_items=4, max_pairs=1,
                       state_dir=tmp_path, serve_sequences=merchant.split.seen_sequences(), selection_share=0.1)
    entries = merchant.trainer.ledger.entries()
    assert [e.run_id for e in entries][0] == "run-1/selection"  # reserved first: DP-SGD is calibrated after both
    spent = merchant.trainer.epsilon_spent()
    released, noise = release_selection(merchant.trainer, "run-1", exact, state_dir=tmp_path, weights=WEIGHTS)
    assert noise == entries[0].noise_multiplier > 0 and not np.array_equal(released, exact)
    again, _ = release_selection(merchant.trainer, "run-1", exact, state_dir=tmp_path, weights=WEIGHTS)
    assert np.array_equal(again, released) and merchant.trainer.epsilon_spent() == spent  # resent, not re-spent


def test_an_aggregator_that_needs_item_texts_and_has_none_stops_before_the_run():
    from fedaug.common.config import FederationConfig
    from fedaug.common.errors import ConfigError
    from fedaug.server.server_app import public_prior

    data = generate(SyntheticSection(users=60, items=60, categories=3, titles=False))  # no titles
    assert public_prior(FederationConfig(), data) is None  # statistics "auto": none needed, the model alone
    with pytest.raises(ConfigError, match="no item texts"):
        public_prior(FederationConfig(federation={"statistics": True}), data)
