"""Secure aggregation's cost against the plain sum, measured in one run: bytes and seconds per merchant and for the
aggregator for one secure sum (SecAgg+, fedaug.runtime.secagg) of a vector of Beauty's model size.

Each setting runs the four stages as fedaug's ServerApp drives them, every merchant and the aggregator in this one
process, one party at a time: a party's seconds are its own compute, network excluded. A merchant's include storing
its state between messages (to_bytes/from_bytes, as the ClientApp does). Bytes are the payloads sent and received —
node ids as 8 bytes, public keys, encrypted shares, the masked vector as sent, unmask lists and shares — without
Flower's message framing. The baseline, measured beside each setting: every merchant sends its float32 vector and
the aggregator sums them. Dropouts: ``after-mask`` (one merchant sends its masked vector and then never answers:
still in the sum) and ``before-mask`` (one sends its shares and then nothing: out of the sum, its pairwise masks
rebuilt from its key shares).

    python benchmarks/secagg.py --out benchmarks/results/secagg_cpu.json [--length 800000] [--bits 32]

Writes {"runs": [{"merchants", "degree", "dropout", "secure": {...}, "plain": {...}, "ratios": {...}}],
"settings", "environment"}: per setting the median seconds of ``--repeats`` runs, and secure over plain ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DROPOUTS = ("none", "after-mask", "before-mask")
ID = 8  # bytes of a node id on the wire


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--length", type=int, default=800_000, help="Vector length (fedaug's Beauty model: ~0.8 M).")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--settings", default="10:all,100:10",
                        help="MERCHANTS:DEGREE pairs (DEGREE 'all': the complete graph).")
    parser.add_argument("--dropouts", default=",".join(DROPOUTS))
    parser.add_argument("--repeats", type=int, default=3, help="Runs per setting; seconds are their medians.")
    args = parser.parse_args()
    runs = []
    for setting in args.settings.split(","):
        merchants, degree = setting.split(":")
        for dropout in args.dropouts.split(","):
            run = median([measure(int(merchants), None if degree == "all" else int(degree), dropout, args.length,
                                  args.bits) for _ in range(args.repeats)])
            runs.append(run)
            secure, ratios = run["secure"], run["ratios"]
            print(f"{merchants:>4} merchants, degree {degree:>3}, dropout {dropout:11s}: merchant "
                  f"{secure['merchant_seconds_mean']:6.3f} s ({ratios['merchant_seconds']:7.1f}x), "
                  f"{secure['merchant_bytes_mean'] / 2**20:6.2f} MiB ({ratios['merchant_bytes']:.3f}x); aggregator "
                  f"{secure['aggregator_seconds']:6.2f} s ({ratios['aggregator_seconds']:7.1f}x), "
                  f"{secure['aggregator_bytes'] / 2**20:8.1f} MiB ({ratios['aggregator_bytes']:.3f}x)", flush=True)
    report = {"runs": runs, "settings": {"length": args.length, "bits": args.bits, "repeats": args.repeats},
              "environment": environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def measure(count: int, degree: int | None, dropout: str, length: int, bits: int) -> dict:
    from fedaug.runtime.secagg import AggregatorSecAgg, MerchantSecAgg

    nodes = list(range(1001, 1001 + count))
    gone = nodes[count // 2] if dropout != "none" else None
    seconds = {node: 0.0 for node in [*nodes, "aggregator"]}
    sent = dict.fromkeys(nodes, 0)
    got = dict.fromkeys(nodes, 0)
    stored: dict[int, bytes] = {}

    def timed(party, call, *args, **kwargs):
        started = time.perf_counter()
        if party == "aggregator":
            out = call(*args, **kwargs)
        else:  # a merchant: its state comes out of and goes back into the ClientApp's context.state
            merchant = MerchantSecAgg.from_bytes(stored[party])
            out = call(merchant, *args, **kwargs)
            stored[party] = merchant.to_bytes()
        seconds[party] += time.perf_counter() - started
        return out

    aggregator = timed("aggregator", AggregatorSecAgg, nodes=nodes, length=length, bits=bits, degree=degree)
    for node in nodes:  # setup
        started = time.perf_counter()
        stored[node] = MerchantSecAgg.setup(node_id=node, threshold=aggregator.threshold, bits=bits).to_bytes()
        seconds[node] += time.perf_counter() - started
        keys = timed(node, MerchantSecAgg.public_keys)
        sent[node] += sum(map(len, keys))
        timed("aggregator", aggregator.add_public_keys, node, keys)
    timed("aggregator", aggregator.check, "setup")
    shares = {}
    for node in nodes:  # share_keys
        keys = timed("aggregator", aggregator.keys_for, node)
        got[node] += sum(ID + len(a) + len(b) for a, b in keys.values())
        shares[node] = timed(node, MerchantSecAgg.share_keys, keys)
        sent[node] += sum(ID + len(text) for text in shares[node].values())
    for node in nodes:
        timed("aggregator", aggregator.add_ciphertexts, node, shares.pop(node))
    timed("aggregator", aggregator.check, "share_keys")
    for node in nodes:  # mask
        ciphertexts = timed("aggregator", aggregator.ciphertexts_for, node)
        got[node] += sum(ID + len(text) for text in ciphertexts.values())
        if dropout == "before-mask" and node == gone:
            continue
        vector = quantised(node, length, bits)
        masked = timed(node, MerchantSecAgg.mask, ciphertexts, vector)
        sent[node] += masked.nbytes
        timed("aggregator", aggregator.add_masked, node, masked)
    timed("aggregator", aggregator.check, "mask")
    for node in aggregator.survivors:  # unmask
        active, dead = timed("aggregator", aggregator.unmask_request, node)
        got[node] += ID * (len(active) + len(dead))
        if dropout == "after-mask" and node == gone:
            continue
        answer = timed(node, MerchantSecAgg.unmask_shares, active=active, dead=dead)
        sent[node] += sum(ID + len(share) for share in answer.values())
        timed("aggregator", aggregator.add_shares, node, answer)
    total = timed("aggregator", aggregator.result)
    expected = np.zeros(length, dtype=np.int64)
    for node in aggregator.survivors:
        expected += quantised(node, length, bits)
    assert np.array_equal(total, expected), "the secure sum is not the plain sum"

    merchant_seconds = [seconds[node] for node in nodes if node != gone]
    merchant_bytes = [sent[node] + got[node] for node in nodes if node != gone]
    secure = {
        "merchant_seconds_mean": float(np.mean(merchant_seconds)), "merchant_seconds_max": max(merchant_seconds),
        "merchant_bytes_mean": float(np.mean(merchant_bytes)),
        "merchant_sent_mean": float(np.mean([sent[node] for node in nodes if node != gone])),
        "merchant_received_mean": float(np.mean([got[node] for node in nodes if node != gone])),
        "aggregator_seconds": seconds["aggregator"], "aggregator_bytes": sum(sent.values()) + sum(got.values()),
        "aggregator_received": sum(sent.values()), "aggregator_sent": sum(got.values()),
        "threshold": aggregator.threshold, "survivors": len(aggregator.survivors),
        "neighbours": len(aggregator.neighbours[nodes[0]]),
    }
    return {"merchants": count, "degree": degree, "dropout": dropout, "secure": secure,
            "plain": plain_sum(nodes, length)}


def median(repeats: list[dict]) -> dict:
    """One setting's repeats as one run: each time its median (bytes do not vary), and the ratios of those."""
    run = repeats[0]
    for side in ("secure", "plain"):
        for name in run[side]:
            if "seconds" in name:
                run[side][name] = float(np.median([repeat[side][name] for repeat in repeats]))
    secure, plain = run["secure"], run["plain"]
    run["ratios"] = {"merchant_seconds": secure["merchant_seconds_mean"] / plain["merchant_seconds_mean"],
                     "merchant_bytes": secure["merchant_bytes_mean"] / plain["merchant_bytes_mean"],
                     "aggregator_seconds": secure["aggregator_seconds"] / plain["aggregator_seconds"],
                     "aggregator_bytes": secure["aggregator_bytes"] / plain["aggregator_bytes"]}
    return run


def quantised(node: int, length: int, bits: int) -> np.ndarray:
    """Merchant ``node``'s vector: quantised values, small enough that the sum of 100 does not wrap mod 2**bits."""
    high = 2 ** max(bits - 9, 0)
    return np.random.default_rng(node).integers(-high, high, size=length, dtype=np.int64)


def plain_sum(nodes: list[int], length: int) -> dict:
    """The baseline: each merchant sends its float32 vector (as bytes), the aggregator sums them."""
    merchant_seconds, payloads = [], []
    for node in nodes:
        vector = np.random.default_rng(node).standard_normal(length, dtype=np.float32)
        started = time.perf_counter()
        payloads.append(vector.tobytes())
        merchant_seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    total = np.zeros(length, dtype=np.float32)
    for payload in payloads:
        total += np.frombuffer(payload, dtype=np.float32)
    aggregator_seconds = time.perf_counter() - started
    sent = sum(map(len, payloads))
    return {"merchant_seconds_mean": float(np.mean(merchant_seconds)), "merchant_bytes_mean": sent / len(nodes),
            "aggregator_seconds": aggregator_seconds, "aggregator_bytes": sent}


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpus": len(os.sched_getaffinity(0)), "numpy": np.__version__, "cryptography": version("cryptography"),
            "flwr": version("flwr")}


if __name__ == "__main__":
    main()
