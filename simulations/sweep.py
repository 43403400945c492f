"""`fedaug sweep`: a grid of simulations (ε × augmentation × mode) and one combined report with a privacy–utility
plot. Each run writes its own directory; a run whose metrics.json exists is not run again, so an interrupted sweep
continues where it stopped."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from fedaug.common.atomic import write_bytes_atomic, write_json_atomic
from fedaug.common.config import Section, load_config, parse_inf, read_toml
from fedaug.common.errors import ConfigError
from fedaug.common.records import OnRound
from fedaug.simulations.attacks import ATTACKS
from fedaug.simulations.plots import privacy_utility_plot
from fedaug.simulations.report import COLD_BELOW, METRIC_KEYS
from fedaug.simulations.scenario import DEFENCES, MODES, SimulationConfig
from fedaug.simulations.simulate import run_simulate


class SweepSection(Section):
    """[sweep]: the grid; every other table is the base simulation config each run starts from."""

    epsilon: list[float] = Field([1.0, 3.0, 8.0, math.inf], min_length=1)
    augment: list[bool] = Field([True, False], min_length=1)
    modes: list[Literal[MODES]] = Field(["federated"], min_length=1)  # type: ignore[valid-type]
    attacks: list[Literal[("",) + ATTACKS]] = Field([""], min_length=1)  # type: ignore[valid-type]
    """Byzantine behaviours to try ("" = nobody attacks); each run with an attack has `attackers` of them."""
    attackers: float = Field(0.2, gt=0, lt=1)
    defences: list[Literal[tuple(DEFENCES)] | None] = Field([None], min_length=1)  # type: ignore[valid-type]
    """Aggregations to try (None = the base [federation] as it is)."""

    @field_validator("epsilon", mode="before")
    @classmethod
    def _parse_inf(cls, values):
        if not isinstance(values, list):
            return values
        return [parse_inf(v) for v in values]

    @field_validator("epsilon")
    @classmethod
    def _positive(cls, values):
        if any(v <= 0 for v in values):
            raise ValueError("every ε must be positive (or inf)")
        return values


class SweepConfig(Section):
    sweep: SweepSection = SweepSection()


def load_sweep(path: Path) -> tuple[SweepSection, SimulationConfig]:
    """The grid and the base config from one TOML file (errors name the file and key)."""
    raw = read_toml(path)
    grid = raw.pop("sweep", {})
    sweep = load_config(None, None, SweepConfig, where=str(path), raw={"sweep": grid}).sweep
    return sweep, load_config(None, None, SimulationConfig, where=str(path), raw=raw)


def run_name(mode: str, epsilon: float, augment: bool, attack: str = "", defence: str | None = None) -> str:
    name = f"{mode}-eps{'inf' if math.isinf(epsilon) else f'{epsilon:g}'}-{'aug' if augment else 'noaug'}"
    return name + (f"-{attack}" if attack else "") + (f"-{defence}" if defence else "")


def _grid_config(base: SimulationConfig, sweep: SweepSection, mode: str, epsilon: float, augment: bool,
                 attack: str, defence: str | None) -> SimulationConfig:
    """The base config at one grid point (validated again, so a defence sets [federation] as usual)."""
    federation = {key: None for key in DEFENCES[defence]({})} if defence else {}  # the defence decides these
    return base.changed(privacy={"epsilon": epsilon}, augment={"enabled": augment}, federation=federation,
                        simulation={"mode": mode, "attack": attack, "attackers": sweep.attackers if attack else 0.0,
                                    "defence": defence})


def run_sweep(sweep: SweepSection, base: SimulationConfig, out: Path, baselines: dict[str, dict] | None = None,
              on_run=None, on_round: OnRound | None = None, report_only: bool = False) -> dict:
    """Run every grid point not already done; write ``out/sweep.json``, ``out/report.md`` and the plot.

    ``report_only``: run nothing, report the runs that have finished (a long sweep's progress so far)."""
    started = time.monotonic()
    out = Path(out)
    grid = [(mode, eps, aug, attack, defence) for mode in sweep.modes for aug in sweep.augment
            for eps in sweep.epsilon for attack in sweep.attacks for defence in sweep.defences
            if attack or defence in (None, "none") or len(sweep.defences) == 1]  # attack-free: once per grid point
    results = []
    for i, (mode, epsilon, augment, attack, defence) in enumerate(grid):
        name = run_name(mode, epsilon, augment, attack, defence)
        run_dir = out / name
        if on_run:
            on_run(i, len(grid), name)
        done = run_dir / "metrics.json"
        if done.exists():
            metrics = json.loads(done.read_text())
        elif report_only:
            continue
        else:
            config = _grid_config(base, sweep, mode, epsilon, augment, attack, defence)
            metrics = run_simulate(config, run_dir, on_round=on_round, baselines=baselines).to_json()
        fusion = metrics.get("fusion") or {}
        results.append({"name": name, "mode": mode, "epsilon": "inf" if math.isinf(epsilon) else epsilon,
                        "augment": augment, "attack": attack or None, "defence": metrics.get("defence"),
                        "test": metrics["test"], "privacy": metrics["privacy"], "seconds": metrics["seconds"],
                        "model_test": fusion.get("model_test"), "test_cold": metrics.get("test_cold"),
                        "model_test_cold": fusion.get("model_test_cold"),
                        "prior_weight": fusion.get("weight"), "recipe": _recipe(metrics)})
        baselines = baselines or {}
        for baseline in ("popularity", "text prior"):  # the same for every run of one data set
            if baseline in metrics["baselines"]:
                baselines.setdefault(baseline, metrics["baselines"][baseline])
    if not results:
        raise ConfigError(f"{out}: no finished runs to report")
    summary = {"runs": results, "missing": [run_name(*point) for point in grid
                                            if run_name(*point) not in {r["name"] for r in results}],
               "baselines": baselines or {}, "seconds": round(time.monotonic() - started, 2),
               "config": base.model_dump(mode="json") | {"sweep": sweep.model_dump(mode="json")}}
    out.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[tuple[float, float]]] = {}
    augments = {r["augment"] for r in results}
    for r in results:
        if r["attack"]:
            continue
        label = r["mode"] + (f", augmentation {'on' if r['augment'] else 'off'}" if len(augments) > 1 else "")
        eps = math.inf if r["epsilon"] == "inf" else float(r["epsilon"])
        if r["model_test"] is None:
            lines.setdefault(label, []).append((eps, r["test"]["ndcg@10"]))
        else:  # the item side: the model over item ids alone, and fused with the public text prior
            lines.setdefault(f"{label}, item ids", []).append((eps, r["model_test"]["ndcg@10"]))
            lines.setdefault(f"{label}, + text prior", []).append((eps, r["test"]["ndcg@10"]))
    plot = privacy_utility_plot(lines, out, {name: b["ndcg@10"] for name, b in summary["baselines"].items()})
    write_json_atomic(out / "sweep.json", summary)
    write_bytes_atomic(out / "report.md", _report(summary, plot).encode())
    return summary


def _recipe(metrics: dict) -> str:
    """A run's recipe in a few words (regimes differ: ε = inf trains the central model's recipe)."""
    cfg = metrics.get("config") or {}
    rounds = len(metrics.get("rounds") or [])
    local = cfg.get("local") or {}
    parts = [f"{rounds} rounds × {local.get('local_epochs', '?')} epochs, batch {local.get('batch_size', '?')}"]
    if metrics.get("rounds") and metrics["rounds"][-1].get("budgets_spent"):
        parts.append("budgets spent")
    if metrics.get("model"):
        parts.append(metrics["model"])
    return "; ".join(parts)


def _report(summary: dict, plot: str) -> str:
    cfg = summary["config"]
    lines = ["# fedaug sweep", "",
             f"Data: {cfg['data']['path'] or 'embedded synthetic'}; {cfg['simulation']['merchants']} merchants "
             f"({cfg['simulation']['partition']}); up to {cfg['federation']['rounds']} rounds; strategy "
             f"{cfg['federation']['strategy']}; each run with its regime's recipe (its row).", "",
             "| run | mode | ε budget | augmentation | max ε spent | recipe | " + " | ".join(METRIC_KEYS) +
             " | seconds |",
             "|---|---|---|---|---|---|" + "---|" * (len(METRIC_KEYS) + 1)]
    for r in summary["runs"]:
        spent = r["privacy"].get("epsilon_max")
        spent = f"{spent:.3f}" if isinstance(spent, float) else "non-private" if r["epsilon"] == "inf" else "—"
        lines.append(f"| {r['name']} | {r['mode']} | {r['epsilon']} | {'on' if r['augment'] else 'off'} | {spent} | "
                     f"{r.get('recipe') or '—'} | " + " | ".join(f"{r['test'][k]:.4f}" for k in METRIC_KEYS)
                     + f" | {r['seconds']:.0f} |")
    for name, b in summary["baselines"].items():
        lines.append(f"| {name} | — | — | — | — | — | " + " | ".join(f"{b[k]:.4f}" for k in METRIC_KEYS) + " | |")
    fused = [r for r in summary["runs"] if r.get("model_test")]
    if fused:
        lines += ["", "## Item side: item ids alone vs with the public text prior (test NDCG@10)", "",
                  f"Cold: the test users whose target item had fewer than {COLD_BELOW} training interactions.", "",
                  "| run | item ids (model alone) | + text prior | prior weight | cold: item ids | "
                  "cold: + text prior |",
                  "|---|---|---|---|---|---|"]
        for r in fused:
            cold = [f"{m['ndcg@10']:.4f}" if m else "—" for m in (r["model_test_cold"], r["test_cold"])]
            lines.append(f"| {r['name']} | {r['model_test']['ndcg@10']:.4f} | {r['test']['ndcg@10']:.4f} | "
                         f"{r['prior_weight']} | {cold[0]} | {cold[1]} |")
    attacked = [r for r in summary["runs"] if r.get("attack")]
    if attacked:
        lines += _attack_table(summary["runs"], attacked)
    if summary["missing"]:
        lines += ["", f"Not run yet: {', '.join(summary['missing'])} (run the same `fedaug sweep` command to finish)."]
    lines += ["", f"![privacy–utility]({plot})", ""]
    return "\n".join(lines)


def _attack_table(runs: list[dict], attacked: list[dict]) -> list[str]:
    """Test NDCG@10 for each attack × defence, and its ratio to the attack-free run of the same ε."""
    clean = {r["epsilon"]: r["test"]["ndcg@10"] for r in runs if not r.get("attack")}
    order = list(DEFENCES)
    defences = sorted({r["defence"] for r in attacked}, key=lambda d: (order.index(d) if d in order else 99, str(d)))
    lines = ["", "## Attacks × defences (test NDCG@10; in brackets: ratio to the attack-free run)", "",
             "| ε | attack | " + " | ".join(defences) + " |", "|---|---|" + "---|" * len(defences)]
    for (epsilon, attack) in sorted({(r["epsilon"], r["attack"]) for r in attacked}, key=str):
        cells = []
        for defence in defences:
            run = next((r for r in attacked if (r["epsilon"], r["attack"], r["defence"]) == (epsilon, attack,
                                                                                           defence)), None)
            value = run["test"]["ndcg@10"] if run else None
            ratio = f" ({value / clean[epsilon]:.2f})" if value is not None and clean.get(epsilon) else ""
            cells.append("—" if value is None else f"{value:.4f}{ratio}")
        lines.append(f"| {epsilon} | {attack} | " + " | ".join(cells) + " |")
    for epsilon, value in clean.items():
        lines.append(f"| {epsilon} | none (attack-free) | {value:.4f} |" + " |" * (len(defences) - 1))
    return lines
