"""The story a run's output tells: what the model handed out is made of and, plainly, where its trained parts add
nothing (summary lines, report.md, the deployed report); report tables that read cleanly; plots that show what their
titles say; `fedaug local` set beside the public prior and popularity; a finished simulation not run again; a
federation named by its own key and Flower's run id."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from fedaug.common.model.metrics import METRIC_NAMES
from fedaug.common.records import MerchantRecord, MerchantWork, PrivacyRecord, RoundRecord, RunMetrics
from fedaug.server.summary import DASH, attribute, render_deployment_report
from fedaug.simulations.report import render_report
from fedaug.simulations.scenario import SimulationConfig
from tests.support import tiny_encoder


def _same(value: float) -> dict:
    return dict.fromkeys(METRIC_NAMES, value)


CUT = {"popularity_weight": 0.0, "popularity_cut_std": 0.0, "pair_weight": 0.0, "pair_cut_std": 0.0,
       "items_kept": 0, "pairs_kept": 0, "merchants": 3}
KEPT = CUT | {"popularity_weight": 0.03, "popularity_cut_std": 2.0, "pair_weight": 1.0, "pair_cut_std": 4.0,
              "items_kept": 80, "pairs_kept": 16}


def _metrics(*, weight="inf", statistics=CUT, gain=(0.0, 0.0, 0.0), mode="federated") -> RunMetrics:
    """A federation over 3 merchants at ε 8, its card's parts as compose() writes them: by default the issue's run
    (the model left out, every statistic cut, a gain of exactly zero)."""
    rounds = [RoundRecord(round=r, valid={"ndcg@10": 0.36}, model_valid={"ndcg@10": 0.01 * r},
                          fusion_weight=float("inf"), train_loss=4.5, epsilon_max=7.47 + 0.2 * r, participants=3,
                          seconds=19.45, train_seconds=6.77, evaluate_seconds=0.5, central_seconds=0.05,
                          work=MerchantWork(seconds={"merchant-0": 1.0, "merchant-1": 1.5}, setup={"merchant-0": .1}))
              for r in (1, 2)]
    merchants = [MerchantRecord(merchant=i, users=100, epsilon=7.999, test=_same(0.3 + 0.01 * i),
                                epsilon_by_round={"1": 7.67, "2": 7.999},
                                epsilon_releases={"selection": 0.4, "statistics": 7.2}) for i in range(3)]
    return RunMetrics(
        mode=mode, test=_same(0.3705), valid=_same(0.36), seconds=36.0, data={"users": 300, "items": 337},
        config=SimulationConfig().model_dump(mode="json"), rounds=rounds, merchants=merchants, merchants_total=3,
        privacy=PrivacyRecord(epsilon_budget=8.0, epsilon_max=7.999, epsilon_mean=7.999, max_grad_norm=1.0),
        baselines={"popularity": _same(0.0214), "text prior": _same(0.3705)},
        baselines_valid={"popularity": _same(0.02), "text prior": _same(0.36)},
        gain_over_text={"final": {"round": 2, "test_ndcg@10": 0.3705, "gain_over_text_prior": dict(
            zip(("gain", "low", "high"), gain, strict=True))}},
        selection="private", product="text prior (statistics all below their noise cut); the trained model adds "
        "nothing measured",
        parts={"text prior": {"decay": 0.5}, "statistics": statistics, "model": {"weight": weight, "note": "n"}},
        run_key="3f2a" * 8, flower_runs=[1234])


def test_a_run_whose_trained_parts_add_nothing_says_so_plainly():
    story = attribute(_metrics())
    assert story.source == "the public text prior alone"
    assert story.line() == ("the model handed out: the public text prior alone; the trained model adds nothing over "
                            "the public prior; the DP statistics were all below their noise cut (they add nothing); "
                            "ε spent: 8.00 of 8 per merchant")
    report = render_report(_metrics(), [])
    assert report.splitlines()[2].startswith("**The model handed out: the public text prior alone; the trained model "
                                             "adds nothing")
    assert "| **federated**: the public text prior alone | 0.3705 |" in report  # the headline, attributed
    deployed = render_deployment_report(_with(_metrics(mode="deployed"),
                                              merchant_keys={"merchant-0": "10", "merchant-1": "11"}))
    assert "the trained model adds nothing over the public prior" in deployed
    assert deployed.startswith(f"# fedaug federation {'3f2a' * 3}… (Flower run 1234) (deployed)")

    kept = attribute(_metrics(weight="inf", statistics=KEPT, gain=(0.002, 0.001, 0.003)))
    assert kept.source == "the public text prior + DP statistics"
    assert kept.nothing == "the trained model adds nothing over the public prior with the DP statistics"
    used = attribute(_metrics(weight=2.0, statistics=KEPT, gain=(0.002, 0.001, 0.003)))
    assert used.source == "the public text prior + DP statistics + the trained model (fused at prior weight 2)"
    assert used.nothing is None
    noisy = attribute(_metrics(weight=2.0, statistics=KEPT, gain=(0.001, -0.001, 0.003)))
    assert noisy.nothing == ("what the trained parts add over the public prior is within chance (test NDCG@10 gain "
                             "+0.0010 [-0.0010, +0.0030])")
    worse = attribute(_metrics(weight=2.0, statistics=KEPT, gain=(-0.04, -0.078, -0.008)))
    assert worse.nothing == ("the trained parts make it worse than the public prior alone (test NDCG@10 gain "
                             "-0.0400 [-0.0780, -0.0080])")
    alone = _metrics(weight=1.0)
    alone.parts, alone.test, alone.gain_over_text = {"model": {"weight": 1.0}}, _same(0.019), None
    alone.baselines = {"popularity": _same(0.035)}
    assert attribute(alone).line() == ("the model handed out: the trained model alone (no public text prior); below "
                                       "popularity (test NDCG@10 0.0190 vs 0.0350); ε spent: 8.00 of 8 per merchant")


def _with(metrics: RunMetrics, **changes) -> RunMetrics:
    for key, value in changes.items():
        setattr(metrics, key, value)
    return metrics


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table of ``markdown``: its rows (header first, the --- line left out) as cells."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_the_report_reads_cleanly():
    """Merchants named as everywhere else, ratios as "17.31×", no column with nothing in it, the engine's overhead
    in an appendix after the plots with one number format."""
    report = render_report(_metrics(), ["ndcg_per_round.png"])
    assert "| popularity | 0.0214 |" in report and "| 17.31× |" in report and "of it" not in report
    assert "| merchant-0 | 100 |" in report and "| 0 | 100 |" not in report
    for table in _tables(report):
        header, body = table[0], table[1:]
        for i, name in enumerate(header[1:], start=1):
            assert any(row[i] != DASH for row in body), f"column {name!r} holds nothing: {table}"
    assert "not aggregated" not in report  # no failures: the column is gone
    plots, appendix = report.index("## Plots"), report.index("## Appendix: engine overhead")
    assert plots < appendix and "## Engine overhead" not in report
    (engine,) = [t for t in _tables(report[appendix:])]
    assert all(re.fullmatch(r"\d+(\.\d{1,2})?", cell) for row in engine[1:] for cell in row), engine
    assert "| 19.45 | 7.27 |" in report  # round wall, merchant phases (6.77 + 0.5): seconds, two decimals
    assert "before any training, the budget went to the DP evaluation's reservation (ε 0.40 after it), then the DP " \
           "statistics (ε 7.20 after it)" in report


def test_the_plots_show_what_their_titles_say(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from fedaug.simulations import plots

    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.setdefault(path.name, fig) and path.name)
    assert plots.write_plots(_metrics(), tmp_path) == ["ndcg_per_round.png", "epsilon_per_merchant.png",
                                                       "merchant_ndcg.png"]
    try:
        (ndcg,) = figures["ndcg_per_round.png"].axes
        labels = ndcg.get_legend_handles_labels()[1]
        assert {"the trained model alone", "popularity (no training)", "text prior (no training)"} <= set(labels)
        (epsilon,) = figures["epsilon_per_merchant.png"].axes
        assert epsilon.get_ylim()[0] == 0  # from 0: the statistics' share before any training shows
        ticks = [t.get_text() for t in epsilon.get_xticklabels()]
        assert ticks == ["start", "DP evaluation's reservation", "DP statistics", "round 1", "round 2"]
        (merchant,) = figures["merchant_ndcg.png"].axes
        assert merchant.get_title() == "Test NDCG@10 per merchant: the public text prior alone"
        assert [t.get_text() for t in merchant.get_xticklabels()] == ["merchant-0", "merchant-1", "merchant-2"]
    finally:
        plt.close("all")


def test_a_finished_simulation_is_not_run_again(tmp_path):
    """Its metrics.json holds these very settings: the stored result, at once, and where the report is."""
    from fedaug.cli import app
    from fedaug.common.config import load_config
    from fedaug.common.records import write_metrics
    from fedaug.simulations.simulate import finished_run

    (tmp_path / "small.toml").write_text("[synthetic]\nusers = 150\nitems = 120\n")
    config = load_config(tmp_path / "small.toml", {"federation.rounds": 2}, SimulationConfig)
    out = tmp_path / "run"
    out.mkdir()
    stored = _with(_metrics(), config=config.model_dump(mode="json"))
    write_metrics(out, stored)
    assert finished_run(config, out).to_json() == stored.to_json()
    assert finished_run(config.changed(federation={"rounds": 3}), out) is None  # other settings: it runs
    written = (out / "metrics.json").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["simulate", "--config", str(tmp_path / "small.toml"), "--rounds", "2",
                                      "--out", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "holds this run, finished" in result.output and "not run again" in result.output
    assert str(out / "report.md") in result.output and "federated: test NDCG@10 0.3705" in result.output
    assert "the trained model adds nothing over the public prior" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # nothing ran: no state, no model
    assert (out / "metrics.json").stat().st_mtime_ns == written


def test_status_names_the_federation_by_its_key_and_flower_run(tmp_path):
    from fedaug.cli import app
    from fedaug.server.checkpoint import ServerState, save

    save(tmp_path / "server", ServerState(run_key="3f2a" * 8, strategy="fedavg", round=1, flower_runs=[1234],
                                          history=[RoundRecord(round=1)]))
    result = CliRunner().invoke(app, ["status", "--state-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"federation {'3f2a' * 3}… (Flower run 1234)" in result.output
    shown = CliRunner().invoke(app, ["status", "--state-dir", str(tmp_path), "--json"])
    assert json.loads(shown.stdout)["federations"][0]["flower_runs"] == [1234]


@pytest.mark.slow
def test_local_prints_and_reports_the_prior_and_popularity_beside_its_model(tmp_path):
    """`fedaug local` on data with titles: its figures beside the public text prior and popularity on the same test
    users, in the terminal and in a report.md written as simulate writes it."""
    from fedaug.cli import app

    encoder = tiny_encoder(tmp_path)
    (tmp_path / "m.toml").write_text(
        f'[synthetic]\nusers = 80\nitems = 60\ntitles = true\n[text]\nencoder = "{encoder}"\n'
        f'cache_dir = "{tmp_path / "cache"}"\n[model]\nhidden = 16\nmax_len = 10\n[local]\nrounds = 1\n'
        "batch_size = 16\n[privacy]\nepsilon = 20\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["local", "--config", str(tmp_path / "m.toml"), "--out", str(out)],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    prior, popularity = (metrics["baselines"][name]["ndcg@10"] for name in ("text prior", "popularity"))
    assert f"text prior {prior:.4f}" in result.output and f"popularity {popularity:.4f}" in result.output
    assert "the model handed out: the public text prior" in result.output and "ε spent: " in result.output
    report = (out / "report.md").read_text()
    assert report.startswith("# fedaug local: one merchant alone")
    assert f"| text prior | {metrics['baselines']['text prior']['hr@5']:.4f} |" in report
    assert f"| popularity | {metrics['baselines']['popularity']['hr@5']:.4f} |" in report
    assert "the budget went to the DP evaluation's reservation" in report
    for name in ("ndcg_per_round.png", "epsilon_per_merchant.png"):
        assert (out / name).stat().st_size > 0 and f"![{name}]({name})" in report
