"""Embedding a catalog's item texts: fedaug's encoding against one plain sentence-transformers ``encode`` of the same
texts, measured in the same run.

anchor      SentenceTransformer.encode over every text at once (it sorts them all by length; its batch of 32)
fedaug      fedaug.common.priors.text's encoding, as `fedaug baseline --model text` and every text prior run it
            (all texts sorted longest first, then [text] batch_size per forward pass, a progress bar step per
            chunk of 512; model loading included)
item-order  what fedaug did before: chunks in item order, the encoder sorting only inside each chunk
onnx        the anchor on sentence-transformers' ONNX backend (needs optimum and onnxruntime; exported in memory)
openvino    the same on the OpenVINO backend (needs optimum-intel and openvino)

Each variant's vectors are compared with the anchor's (largest absolute difference). A variant whose packages are
missing is recorded as such, not timed.

    python benchmarks/encoder.py [--data ../shared/data/amazon-beauty/Beauty.txt] [--variants anchor,fedaug]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fedaug.common.config import TextSection
from fedaug.common.data.loaders import load
from fedaug.common.data.synthetic import generate
from fedaug.common.priors.text import _encode, encoder_directory

VARIANTS = ("anchor", "fedaug", "item-order", "onnx", "openvino")


def _plain(directory: Path, texts: list[str], backend: str = "torch") -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(directory), device="cpu", local_files_only=True, backend=backend)
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


def _item_order(directory: Path, texts: list[str], batch_size: int) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(directory), device="cpu", local_files_only=True)
    chunks = [model.encode(texts[start : start + batch_size], batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
              for start in range(0, len(texts), batch_size)]
    return np.concatenate(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="amazon-seq or events file with item texts; default: synthetic")
    parser.add_argument("--variants", default="anchor,fedaug,item-order,onnx,openvino")
    parser.add_argument("--batch-size", type=int, default=TextSection().batch_size, help="fedaug's [text] batch_size")
    parser.add_argument("--out", default="benchmarks/results/encoder_cpu.json")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")

    data = load(args.data) if args.data else generate()
    texts = data.catalog.texts
    present = [i for i, text in enumerate(texts) if i > 0 and text.strip()]
    plain_texts = [texts[i] for i in present]
    directory = encoder_directory(None)
    print(f"{len(plain_texts)} item texts, {np.mean([len(t) for t in plain_texts]):.0f} characters on average, "
          f"torch threads {torch.get_num_threads()}")

    results: dict[str, dict] = {}
    anchor_vectors = None
    for variant in variants:
        began = time.perf_counter()
        try:
            if variant == "anchor":
                vectors = _plain(directory, plain_texts)
            elif variant == "fedaug":
                vectors = _encode(directory, texts, device="cpu", batch_size=args.batch_size, progress=False)[present]
            elif variant == "item-order":
                vectors = _item_order(directory, plain_texts, 256)  # the old [text] batch_size
            else:
                vectors = _plain(directory, plain_texts, backend=variant)
        except Exception as error:  # a backend whose packages are not installed is recorded, not fatal
            results[variant] = {"unavailable": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            print(f"{variant:>10}: unavailable ({results[variant]['unavailable']})")
            continue
        seconds = time.perf_counter() - began
        if variant == "anchor":
            anchor_vectors = vectors
        entry = {"seconds": round(seconds, 2)}
        if anchor_vectors is not None and variant != "anchor":
            entry["max_abs_diff_vs_anchor"] = float(np.abs(vectors - anchor_vectors).max())
        results[variant] = entry
        print(f"{variant:>10}: {seconds:7.1f} s")
    if "anchor" in results and "seconds" in results["anchor"]:
        for entry in results.values():
            if "seconds" in entry:
                entry["ratio_vs_anchor"] = round(entry["seconds"] / results["anchor"]["seconds"], 3)

    out = {"data": args.data or "synthetic", "texts": len(plain_texts), "batch_size": args.batch_size,
           "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
           "torch": torch.__version__, "goal": "fedaug <= 60 s on 2 CPU cores", "variants": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
