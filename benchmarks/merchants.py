"""Does a simulation's cost follow the merchants sampled, or the merchants registered? Measured in one run.

The same federation twice, each a `fedaug simulate` subprocess: synthetic data with USERS_PER_MERCHANT users per
merchant, SAMPLED merchants trained per round (fraction_train = SAMPLED / registered, the same for evaluation),
ROUNDS rounds, one CPU per merchant (as many at once as the machine has cores), the server scoring through the
sampled merchants only ([simulation] central_evaluation = false, as in a deployment). Once with the small registry
(the baseline), once with the large one. Per run: the peak RSS of the whole process tree (the driver, Ray's
processes and its workers; sampled every 0.2 s from /proc) and the seconds per round (the rounds' wall time from
metrics.json; round 1 also starts the engine's workers, so the steady rounds 2.. are reported beside it). The driver
generates the data set once and writes it to the run's state dir; every worker maps it (simulations/apps.py,
SHARED_DATA), so neither case generates it again in round 1.

    python benchmarks/merchants.py --out benchmarks/results/merchants_cpu.json [--registered 100 1000]

Writes {"runs": [...], "rss_ratio", "seconds_per_round_ratio", ...}: large registry over the small one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--registered", type=int, nargs=2, default=[100, 1000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--sampled", type=int, default=50)
    parser.add_argument("--users-per-merchant", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--hidden", type=int, default=16)
    args = parser.parse_args()
    runs = [measure(n, args) for n in args.registered]
    small, large = runs
    report = {
        "runs": runs,
        "rss_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
        "seconds_per_round_ratio": large["seconds_per_round"] / small["seconds_per_round"],
        "steady_seconds_per_round_ratio": (large["steady_seconds_per_round"] / small["steady_seconds_per_round"]
                                           if small["steady_seconds_per_round"] else None),
        "settings": {"sampled": args.sampled, "users_per_merchant": args.users_per_merchant,
                     "rounds": args.rounds, "items": args.items, "hidden": args.hidden, "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


def measure(registered: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedaug-merchants-") as folder:
        folder = Path(folder)
        config = {
            "synthetic": {"users": registered * args.users_per_merchant, "items": args.items},
            "simulation": {"merchants": registered, "central_evaluation": False, "client_cpus": 1},
            "federation": {"rounds": args.rounds, "fraction_train": args.sampled / registered,
                           "fraction_evaluate": args.sampled / registered},
            "local": {"batch_size": 32},
            # A small model: what is measured is how a round's cost grows with the registry, not the model's.
            "model": {"hidden": args.hidden, "blocks": 1, "max_len": 20},
        }
        (folder / "config.toml").write_text(tomli_w.dumps(config))
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "fedaug", "simulate", "--config", str(folder / "config.toml"),
                                    "--out", str(folder / "run")], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        peak = PeakTreeRss(process.pid)
        output = process.communicate()[0]
        peak.stop()
        if process.returncode != 0:
            raise SystemExit(f"{registered} merchants: fedaug simulate failed:\n{output[-3000:]}")
        metrics = json.loads((folder / "run" / "metrics.json").read_text())
    seconds = [r["seconds"] for r in metrics["rounds"]]
    sampled = [r["participants"] for r in metrics["rounds"]]
    run = {"registered": registered, "users": metrics["data"]["users"], "sampled_per_round": sampled,
           "peak_rss_mb": round(peak.peak / 2**20, 1), "round_seconds": seconds,
           "seconds_per_round": statistics.fmean(seconds),
           "steady_seconds_per_round": statistics.fmean(seconds[1:]) if len(seconds) > 1 else None,
           "wall_seconds": round(time.monotonic() - started, 1)}
    print(f"{registered:5d} registered: peak RSS {run['peak_rss_mb']:8.1f} MB, {run['seconds_per_round']:.2f} s/round "
          f"(rounds {', '.join(f'{s:.2f}' for s in seconds)}), {sampled} trained", flush=True)
    return run


class PeakTreeRss:
    """The largest total resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, root: int, interval: float = 0.2):
        self.root, self.interval, self.peak = root, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss(self.root))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def tree_rss(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            statm = (entry / "statm").read_text().split()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(statm[1]) * PAGE
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


if __name__ == "__main__":
    main()
