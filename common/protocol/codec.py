"""Compressed model updates: what a merchant sends instead of its dense fp32 weights.

A merchant sends the *delta* from the global model it trained from, which is small and centred on zero, in one of:

- ``none``: the weights themselves, dense fp32 (what every Flower strategy expects);
- ``fp16``: the delta in half precision (½ the bytes);
- ``int8``: the delta as int8 with one fp32 scale per tensor (max |delta| / 127), rounded stochastically so the
  de-quantised delta is unbiased (¼ the bytes).

Encoding is post-processing of the merchant's DP release, so it costs no privacy. Its rounding draws come from a
generator seeded by the update itself: distinct per merchant and round, and a replayed round re-encodes to the
same bytes. The server de-quantises (``decode``) before it validates and aggregates, so strategies, the norm bound
and the checks in server/replies.py see ordinary fp32 weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedaug.common.config import COMPRESSIONS

INT8_LEVELS = 127
"""int8 codes run over [-127, 127]: symmetric, so 0 stays exactly 0."""


@dataclass(frozen=True)
class Encoded:
    """An update as it travels: arrays of the encoded dtype, and the int8 scales per tensor."""

    kind: str
    arrays: dict[str, np.ndarray]
    scales: dict[str, float]

    @property
    def nbytes(self) -> int:
        """Payload bytes: the arrays plus 4 per scale."""
        return sum(a.nbytes for a in self.arrays.values()) + 4 * len(self.scales)


def encode(update: dict[str, np.ndarray], base: dict[str, np.ndarray], kind: str) -> Encoded:
    """``update`` as ``kind`` relative to ``base`` (the global model the merchant trained from). Tensors that are
    not floating point travel unchanged."""
    if kind not in COMPRESSIONS:
        raise ValueError(f"compression: unknown kind {kind!r} (expected one of: {', '.join(COMPRESSIONS)})")
    if kind == "none":
        return Encoded(kind, dict(update), {})
    rng = np.random.default_rng(_seed_of(update))
    arrays, scales = {}, {}
    for key, value in update.items():
        if value.dtype.kind != "f":
            arrays[key] = value
            continue
        delta = value.astype(np.float64) - base[key].astype(np.float64)
        if kind == "fp16":
            arrays[key] = delta.astype(np.float16)
            continue
        peak = float(np.abs(delta).max()) if delta.size else 0.0
        scale = peak / INT8_LEVELS if peak > 0 else 1.0
        scaled = delta / scale
        low = np.floor(scaled)
        # Stochastic rounding: up with probability equal to the fraction, so E[code] = scaled exactly.
        codes = low + (rng.random(scaled.shape) < (scaled - low))
        arrays[key] = np.clip(codes, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
        scales[key] = scale
    return Encoded(kind, arrays, scales)


def decode(encoded: Encoded, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights ``encoded`` stands for: ``base`` + the de-quantised delta, in ``base``'s dtypes. Raises
    ValueError naming the tensor where the encoding does not fit ``base`` (wrong dtype, missing or bad scale)."""
    if encoded.kind not in COMPRESSIONS:
        raise ValueError(f"compression: unknown kind {encoded.kind!r}")
    if encoded.kind == "none":
        return dict(encoded.arrays)
    expected = np.float16 if encoded.kind == "fp16" else np.int8
    unknown = set(encoded.scales) - set(encoded.arrays)
    if unknown:
        raise ValueError(f"compression: scales for tensors not sent: {sorted(unknown)[:3]}")
    out = {}
    for key, value in encoded.arrays.items():
        if key not in base or base[key].dtype.kind != "f":
            out[key] = value  # the usual checks name what is wrong with it
            continue
        if value.dtype != expected:
            raise ValueError(f"compression: array {key!r} has dtype {value.dtype}, expected {np.dtype(expected)} "
                             f"for {encoded.kind}")
        if encoded.kind == "fp16":
            delta = value.astype(np.float32)
        else:
            scale = encoded.scales.get(key)
            if scale is None or not np.isfinite(scale) or scale <= 0:
                raise ValueError(f"compression: array {key!r} has no positive finite int8 scale")
            if value.size and np.abs(value.astype(np.int16)).max() > INT8_LEVELS:
                raise ValueError(f"compression: array {key!r} has codes outside ±{INT8_LEVELS}")
            delta = value.astype(np.float32) * np.float32(scale)
        if delta.shape != base[key].shape:
            out[key] = delta  # the shape check names it
            continue
        out[key] = (base[key] + delta).astype(base[key].dtype)
    return out


def _seed_of(update: dict[str, np.ndarray]) -> int:
    digest = hashlib.sha256()
    for key in sorted(update):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(update[key]).tobytes())
    return int.from_bytes(digest.digest()[:8], "little")
