"""Training-step speed of the sequential model, as ratios against a naive baseline measured in the same run.

naive        pad every batch to max_len, logits at every position (what a straightforward SASRec does)
trimmed      trim each batch to its longest sequence, logits at every position (the per-user path DP-SGD uses)
targets-only trim, and logits only where a target exists (the non-private path)

    python benchmarks/baseline_speed.py [--data ../shared/data/amazon-beauty/Beauty.txt] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedaug.common.config import ModelSection
from fedaug.common.data.loaders import load
from fedaug.common.data.split import leave_one_out
from fedaug.common.data.synthetic import generate
from fedaug.common.model.batching import UserSamples
from fedaug.common.model.sasrec import SASRec, SASRecConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="amazon-seq or events file; default: embedded synthetic data")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    data = load(args.data) if args.data else generate()
    split = leave_one_out(data)
    plain = ModelSection(tie_embeddings=False, behaviour=False, time_context=False)  # no tied tables, no side vectors
    model = SASRec(SASRecConfig.from_section(plain, data.n_items))
    examples = UserSamples(split.train.sequences(), model.cfg.max_len)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(examples), args.batch_size, replace=False) for _ in range(args.steps)]

    def naive(rows):
        inputs = torch.from_numpy(examples.inputs[rows])
        targets = torch.from_numpy(examples.targets[rows])
        return model.loss(inputs, targets, per_user=True).mean()

    def trimmed(rows):
        return model.loss(*examples.batch(rows, "cpu"), per_user=True).mean()

    def targets_only(rows):
        return model.loss(*examples.batch(rows, "cpu"))

    timings = {name: _time(fn, batches, model, optimizer)
               for name, fn in (("naive", naive), ("trimmed", trimmed), ("targets-only", targets_only))}
    print(f"data: {data.summary()}, {args.steps} steps of {args.batch_size} users, torch threads "
          f"{torch.get_num_threads()}")
    for name, seconds in timings.items():
        print(f"{name:13s} {seconds / args.steps * 1000:8.1f} ms/step   speed-up x{timings['naive'] / seconds:5.2f}")


def _time(loss_fn, batches, model, optimizer) -> float:
    loss_fn(batches[0]).backward()  # warm-up
    started = time.perf_counter()
    for rows in batches:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(rows).backward()
        optimizer.step()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
