"""DP training throughput and peak memory against non-private training, measured in one run.

Modes, each in its own subprocess so peak memory is its own:
  nonprivate  fedaug's non-private step (fedaug.common.model.training.train_step): length-bucketed
              micro-batches, logits only at target positions; the baseline every ratio is taken against
  nonprivate-padded  the same without bucketing: each batch padded to its longest user
  hooks       Opacus per-sample gradients (grad_sample_mode="hooks"), per-user samples [users, views, positions]
  ghost       Opacus ghost clipping (grad_sample_mode="ghost")
  fedaug      fedaug's default DP path, LocalTrainer's PrivateStep: Poisson batches run as length-bucketed
              micro-batches clipped by book-keeping (client/ghost_norms.py: one backward pass, output layer on
              target positions only), noise once per batch

    python benchmarks/dp_throughput.py --out dp.json [--data ../shared/data/amazon-beauty/Beauty.txt] [--steps 20]
                                       [--threads N]

--threads sets torch's CPU threads in every mode (default: torch's own choice); on a busy machine one thread per
mode gives steadier ratios than threads that wait for each other.

Writes {"results": [{"mode", "seq_per_s", "peak_mb"}, ...], "ratio_fedaug", "mem_ratio_fedaug"}.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("nonprivate", "nonprivate-padded", "hooks", "ghost", "fedaug")
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon-beauty" / "Beauty.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=20, help="Training steps timed per mode (after 2 warm-up).")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, help="torch CPU threads in every mode (default: torch's choice)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode and print its JSON
    args = parser.parse_args()
    if args.mode:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.mode, args.data, args.steps, args.batch_size)))
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--out", str(args.out), "--data", str(args.data), "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--mode", mode]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{mode:11s} {results[-1]['seq_per_s']:9.1f} seq/s  peak {results[-1]['peak_mb']:8.0f} MB", flush=True)
    by_mode = {r["mode"]: r for r in results}
    report = {"results": results, "threads": args.threads or torch.get_num_threads()}
    if "nonprivate" in by_mode and "fedaug" in by_mode:
        report["ratio_fedaug"] = by_mode["fedaug"]["seq_per_s"] / by_mode["nonprivate"]["seq_per_s"]
        report["mem_ratio_fedaug"] = by_mode["fedaug"]["peak_mb"] / by_mode["nonprivate"]["peak_mb"]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))


def measure(mode: str, data_path: Path, steps: int, batch_size: int) -> dict:
    from fedaug.client.trainer import DP_MICRO_BATCH_TOKENS, PrivateStep, poisson_rows, privatize
    from fedaug.common.config import ModelSection
    from fedaug.common.data.loaders import load
    from fedaug.common.data.split import leave_one_out
    from fedaug.common.memory import single_malloc_arena
    from fedaug.common.model.batching import UserSamples
    from fedaug.common.model.sasrec import SASRec, SASRecConfig
    from fedaug.common.model.training import train_step

    single_malloc_arena()  # as the fedaug CLI and ClientApp do, in every mode alike
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load(data_path)
    split = leave_one_out(data)
    rng = np.random.default_rng(0)
    samples = UserSamples(split.train.sequences(), 50)
    torch.manual_seed(0)
    plain = ModelSection(tie_embeddings=False, behaviour=False, time_context=False, hidden=64, max_len=50)
    model = SASRec(SASRecConfig.from_section(plain, data.n_items)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [rng.choice(len(samples), batch_size, replace=False) for _ in range(steps + 2)]

    if mode == "nonprivate":
        step = functools.partial(train_step, model, optimizer, samples, device=device)
    elif mode == "nonprivate-padded":
        def step(rows):
            loss = model.loss(*samples.batch(rows, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    elif mode == "fedaug":
        step = functools.partial(PrivateStep(model, optimizer, len(samples), batch_size, 1.0, 1.0, "ghost",
                                             DP_MICRO_BATCH_TOKENS), samples, device=device)
        batches = [poisson_rows(rng, len(samples), batch_size / len(samples)) for _ in range(steps + 2)]
    else:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(len(samples))),
                                             batch_size=batch_size)
        private, dp_optimizer, criterion, _ = privatize(model, optimizer, loader, 1.0, 1.0, mode, poisson=False)

        def step(rows):
            inputs, targets = samples.batch(rows, device)
            criterion(private(inputs), targets).backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)

    for rows in batches[:2]:
        step(rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count after warm-up
    started = time.perf_counter()
    for rows in batches[2:]:
        step(rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mb()
    seconds = time.perf_counter() - started
    users = sum(len(rows) for rows in batches[2:])
    return {"mode": mode, "seq_per_s": users / seconds, "peak_mb": peak, "device": str(device)}


def _peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
