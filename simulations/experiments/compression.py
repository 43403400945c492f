"""What compressed updates cost and save: the same federation run with each compression, over seeds.

Each (compression, seed) is one `fedaug simulate` run of the given config (``OUT/KIND-sSEED/``, skipped when its
metrics.json exists, so an interrupted comparison continues). Per run: the bytes of accepted updates the server
received — read from its Prometheus counter ``fedaug_bytes_received_total`` after every round it served, and
checked against the rounds' log —, test NDCG@10 of the final global model (fused with the public prior where the
data has item texts, and the model alone). Per compression and seed: the bytes ratio against the dense run of the
same seed and the relative loss of test NDCG@10; then their means and spread over seeds. ``OUT/compression.json``
and ``OUT/report.md`` are rebuilt from the runs found.

    python -m fedaug.simulations.experiments.compression --config simulations/configs/beauty_compression.toml \\
        --out simulations/results/beauty-compression --seeds 0 1 --kinds none int8
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import urllib.request
from pathlib import Path

from fedaug.common.atomic import write_bytes_atomic, write_json_atomic
from fedaug.common.config import load_config
from fedaug.common.protocol.codec import COMPRESSIONS
from fedaug.simulations.scenario import SimulationConfig
from fedaug.simulations.simulate import run_simulate

COUNTER = re.compile(r"^fedaug_bytes_received_total\s+(\S+)$", re.MULTILINE)


def run(config: Path | None, out: Path, seeds: list[int], kinds: list[str]) -> str:
    for seed in seeds:
        for kind in kinds:
            run_dir = out / f"{kind}-s{seed}"
            if (run_dir / "metrics.json").exists():
                continue
            port = _free_port()
            scraped: dict[int, float] = {}

            def on_round(done, total, record, port=port, scraped=scraped):
                value = _scrape(port) if record is not None else None
                if value is not None:
                    scraped[done] = value

            cfg = load_config(config, {"federation.compression": kind, "federation.seed": seed,
                                       "federation.metrics_port": port}, SimulationConfig)
            metrics = run_simulate(cfg, run_dir, on_round=on_round)
            write_json_atomic(run_dir / "prometheus.json", {"fedaug_bytes_received_total": scraped})
            print(f"{kind} seed {seed}: test NDCG@10 {metrics.test['ndcg@10']:.5f}  bytes "
                  f"{sum(r.bytes_received for r in metrics.rounds):,}  ({metrics.seconds:.0f} s)", flush=True)
    summary = summarise(out)
    write_json_atomic(out / "compression.json", summary)
    report = render(summary)
    write_bytes_atomic(out / "report.md", report.encode())
    return report


def summarise(out: Path) -> dict:
    """Every run found under ``out``, and each compression's ratios against the dense run of the same seed."""
    runs = {}
    for metrics_path in sorted(out.glob("*-s*/metrics.json")):
        kind, _, seed = metrics_path.parent.name.rpartition("-s")
        metrics = json.loads(metrics_path.read_text())
        logged = sum(r["bytes_received"] for r in metrics["rounds"])
        scraped = json.loads((metrics_path.parent / "prometheus.json").read_text())["fedaug_bytes_received_total"]
        last = max(scraped, key=int, default=None)
        runs[f"{kind}-s{seed}"] = {
            "kind": kind, "seed": int(seed), "test_ndcg@10": metrics["test"]["ndcg@10"],
            "model_test_ndcg@10": (metrics.get("fusion") or {}).get("model_test", {}).get("ndcg@10"),
            "bytes_received": logged, "rounds": len(metrics["rounds"]),
            "prometheus_bytes": {"after_round": int(last), "value": scraped[last],
                                 "rounds_log_to_then": sum(r["bytes_received"] for r in metrics["rounds"]
                                                           if r["round"] <= int(last))} if last else None,
            "seconds": metrics["seconds"],
        }
    compared = {}
    for name, entry in runs.items():
        dense = runs.get(f"none-s{entry['seed']}")
        if entry["kind"] == "none" or dense is None:
            continue
        compared[name] = {
            "bytes_ratio": entry["bytes_received"] / dense["bytes_received"],
            "relative_ndcg_loss": (dense["test_ndcg@10"] - entry["test_ndcg@10"]) / dense["test_ndcg@10"],
            "model_relative_ndcg_loss": (
                (dense["model_test_ndcg@10"] - entry["model_test_ndcg@10"]) / dense["model_test_ndcg@10"]
                if dense["model_test_ndcg@10"] and entry["model_test_ndcg@10"] is not None else None),
        }
    by_kind = {}
    for kind in sorted({c.partition("-s")[0] for c in compared}):
        rows = [v for k, v in compared.items() if k.partition("-s")[0] == kind]
        by_kind[kind] = {key: {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                               "seeds": len(values)}
                         for key in ("bytes_ratio", "relative_ndcg_loss", "model_relative_ndcg_loss")
                         if (values := [r[key] for r in rows if r[key] is not None])}
    return {"runs": runs, "against_dense": compared, "by_kind": by_kind}


def render(summary: dict) -> str:
    lines = ["# Compressed updates", "",
             "Each compression against the dense (none) run of the same seed: bytes of accepted updates the server "
             "received (Prometheus fedaug_bytes_received_total, checked against the rounds' log) and the relative "
             "loss of test NDCG@10 (positive: compression scored lower). Generated by `python -m "
             "fedaug.simulations.experiments.compression`.", "",
             "| run | test NDCG@10 | model alone | bytes received | bytes ratio | NDCG@10 loss | model alone loss | "
             "wall s |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["runs"].items():
        vs = summary["against_dense"].get(name, {})
        lines.append(f"| {name} | {entry['test_ndcg@10']:.5f} | {_fmt(entry['model_test_ndcg@10'], 5)} | "
                     f"{entry['bytes_received']:,} | {_fmt(vs.get('bytes_ratio'), 4)} | "
                     f"{_pct(vs.get('relative_ndcg_loss'))} | {_pct(vs.get('model_relative_ndcg_loss'))} | "
                     f"{entry['seconds']:.0f} |")
    for kind, stats in summary["by_kind"].items():
        parts = []
        for key, v in stats.items():
            shown = (lambda x: _fmt(x, 4)) if key == "bytes_ratio" else _pct  # a ratio, or a relative loss
            parts.append(f"{key} mean {shown(v['mean'])} [{shown(v['min'])}, {shown(v['max'])}] "
                         f"over {v['seeds']} seed(s)")
        lines += ["", f"**{kind}**: " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:+.2f} %"


def _scrape(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:  # the server has closed its endpoint (after the last round)
        return None
    found = COUNTER.search(text)
    return float(found.group(1)) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="simulation TOML; default: synthetic data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--kinds", nargs="+", choices=COMPRESSIONS, default=["none", "int8"])
    args = parser.parse_args()
    if "none" not in args.kinds:
        parser.error("--kinds: include none, the dense run every compression is compared with")
    print(run(args.config, args.out, args.seeds, args.kinds), end="")


if __name__ == "__main__":
    main()
