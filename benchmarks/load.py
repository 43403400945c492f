"""Loading a shop's event log: fedaug's events loader against pyarrow's raw read of the same file, in one run.

A generated log (``--events`` rows, default 10 million: text user and item ids with Zipf-like item popularity,
Unix-second timestamps, event names, one numeric context column) is written once as CSV and as Parquet. Each
measurement runs in its own process, so its peak resident memory is its own:

  raw-csv      pyarrow.csv.read_csv of the CSV            fedaug-csv      fedaug.common.data.loaders.load of the CSV
  raw-parquet  pyarrow.parquet.read_table of the Parquet  fedaug-parquet  fedaug.common.data.loaders.load of the Parquet

    python benchmarks/load.py --out benchmarks/results/load_cpu.json [--events 10000000] [--dir /tmp/fedaug-load]

Writes {"results": [{"mode", "seconds", "cpu_seconds", "peak_mb"}, ...], "csv": {"time_ratio", "cpu_ratio",
"memory_ratio"}, "parquet": {...}} (fedaug over raw; the goal is at most 1.5x the time and 2x the memory; the CPU
seconds, all threads together, say how much of a ratio a busy machine's sharing explains).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("raw-csv", "fedaug-csv", "raw-parquet", "fedaug-parquet")
EVENT_NAMES = np.array(["view", "click", "favourite", "cart", "purchase"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fedaug-load"))
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: one measurement, printed as JSON
    args = parser.parse_args()
    csv_path, parquet_path = args.dir / f"events-{args.events}.csv", args.dir / f"events-{args.events}.parquet"
    if args.mode:
        print(json.dumps(measure(args.mode, csv_path if args.mode.endswith("csv") else parquet_path)))
        return
    if not (csv_path.exists() and parquet_path.exists()):
        generate(args.events, csv_path, parquet_path)
    results = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--events", str(args.events),
                               "--dir", str(args.dir), "--mode", mode], capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{mode:15s} {results[-1]['seconds']:7.2f} s  cpu {results[-1]['cpu_seconds']:7.2f} s  "
              f"peak {results[-1]['peak_mb']:7.0f} MB", flush=True)
    by_mode = {r["mode"]: r for r in results}
    report = {"events": args.events, "results": results}
    for kind in ("csv", "parquet"):
        raw, ours = by_mode[f"raw-{kind}"], by_mode[f"fedaug-{kind}"]
        report[kind] = {"time_ratio": ours["seconds"] / raw["seconds"],
                        "cpu_ratio": ours["cpu_seconds"] / raw["cpu_seconds"],
                        "memory_ratio": ours["peak_mb"] / raw["peak_mb"],
                        "file_mb": (csv_path if kind == "csv" else parquet_path).stat().st_size / 2**20}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("csv", "parquet")}))


def generate(events: int, csv_path: Path, parquet_path: Path) -> None:
    """A shop-like log: ~20 events per user, Zipf-like item popularity, text ids."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    users = max(events // 20, 1)
    items = max(events // 100, 1)
    user = rng.integers(1, users + 1, events)
    item = np.minimum(rng.zipf(1.3, events), items)
    table = pa.table({
        "user_id": pc.binary_join_element_wise("u", pa.array(user.astype(str)), ""),
        "item_id": pc.binary_join_element_wise("i", pa.array(item.astype(str)), ""),
        "timestamp": rng.integers(1_600_000_000, 1_700_000_000, events),
        "event_type": EVENT_NAMES[rng.choice(len(EVENT_NAMES), events, p=[0.6, 0.2, 0.05, 0.1, 0.05])],
        "price": np.round(rng.gamma(2.0, 20.0, events), 2),
    })
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, csv_path)
    pq.write_table(table, parquet_path)


def measure(mode: str, path: Path) -> dict:
    """One read, timed without the imports (each process imports what it needs first)."""
    if mode == "raw-csv":
        import pyarrow.csv as pacsv

        def read():
            return pacsv.read_csv(path).num_rows
    elif mode == "raw-parquet":
        import pyarrow.parquet as pq

        def read():
            return pq.read_table(path).num_rows
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from fedaug.common.data.loaders import load

        def read():
            return load(path, "events").n_interactions
    started, cpu = time.perf_counter(), time.process_time()
    rows = read()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"mode": mode, "rows": rows, "seconds": seconds, "cpu_seconds": cpu,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    main()
