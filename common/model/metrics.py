"""Full-ranking metrics: HR@K, NDCG@K over all items and per-user AUC.

Each user's target is ranked against every item except padding and the items already in the user's input
history (the target itself is never excluded). Ties are broken by a fixed pseudo-random order of the items
(``tie_key``), the same order a served top-k list uses (``top_k``), so a bundle's recommendations reproduce its
run's metrics exactly; a model that scores everything equally gets chance-level ranks, not perfect ones.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np
import torch

KS = (5, 10, 20)
METRIC_NAMES = tuple(f"{m}@{k}" for m in ("hr", "ndcg") for k in KS) + ("auc",)


def select(metrics: dict) -> dict:
    """The reported metrics of an evaluation result (which also carries counts such as ``users``)."""
    return {k: metrics[k] for k in METRIC_NAMES}


def json_number(value):
    """ε as metrics.json holds it: JSON has no infinity, so a non-private ε is the string "inf"."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


@functools.lru_cache(maxsize=8)
def tie_key(n: int, device=None) -> torch.Tensor:
    """``[n]`` int64: each item id's place among tied items (Knuth's multiplicative hash mod 2**32, a bijection:
    pseudo-random, so ties favour neither low nor high ids, and fixed, so every ranking agrees). Kept per size and
    device (every served request and evaluated batch asks for the same one): read it, never write to it."""
    return (torch.arange(n, device=device, dtype=torch.int64) * 2654435761) % (1 << 32)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items per row (values, item ids), ties in ``tie_key`` order: what ``rank_metrics`` ranks.

    ``topk`` finds them; only ties need more: within the k they are reordered by key, and a row whose k-th value
    ties with items left out is sorted in full (rare outside constant scorers)."""
    values, items = scores.topk(k, dim=1)
    key = tie_key(scores.shape[1], scores.device)
    # Within the k: order by (value desc, key asc) — a stable sort by value of the items sorted by key.
    by_key = torch.argsort(key[items], dim=1)
    values, items = values.gather(1, by_key), items.gather(1, by_key)
    values, by_value = torch.sort(values, dim=1, descending=True, stable=True)
    items = items.gather(1, by_value)
    kth = values[:, -1:]
    spill = ((scores == kth).sum(1) > (values == kth).sum(1)).nonzero().flatten().tolist()
    if spill:  # the boundary tie reaches past the k: rank those rows over the whole catalog
        order = torch.argsort(key)
        full_values, positions = torch.sort(scores[spill][:, order], dim=1, descending=True, stable=True)
        values[spill], items[spill] = full_values[:, :k], order[positions[:, :k]]
    return values, items


def mask_history(scores: torch.Tensor, histories: list[np.ndarray], targets: torch.Tensor) -> torch.Tensor:
    """Set padding and history items to -inf (in place), keeping each target's own score."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    scores[torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device)] = float("-inf")
    scores[:, 0] = float("-inf")
    scores.scatter_(1, targets.unsqueeze(1), target_scores)
    return scores


def rank_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-user metrics from masked scores ``[B, V+1]`` (excluded items at -inf) and target ids ``[B]``."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    candidates = torch.isfinite(scores)
    higher = ((scores > target_scores) & candidates).sum(1).double()
    key = tie_key(scores.shape[1], scores.device)
    ahead = ((scores == target_scores) & candidates & (key < key[targets].unsqueeze(1))).sum(1).double()
    rank = higher + ahead  # 0-based
    others = candidates.sum(1).double() - 1
    out = {}
    for k in KS:
        hit = rank < k
        out[f"hr@{k}"] = hit.double().cpu().numpy()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(rank + 2), torch.zeros_like(rank)).cpu().numpy()
    out["auc"] = ((others - rank) / others.clamp(min=1)).cpu().numpy()
    return out


def mean_metrics(per_user: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Average per-user metric arrays gathered over batches."""
    if not per_user:
        return {name: 0.0 for name in METRIC_NAMES}
    return {name: float(np.concatenate([p[name] for p in per_user]).mean()) for name in METRIC_NAMES}


def paired_gain(a: np.ndarray, b: np.ndarray, comparisons: int = 1) -> dict[str, float]:
    """Mean per-user difference ``a - b`` of one metric over the same users, with its normal-approximation 95 %
    interval (``low``, ``high``): a gain is real when ``low`` > 0. ``comparisons``: how many candidates ``a`` was
    the best of (Bonferroni: the interval widens so the best of many noise candidates rarely looks real)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    z = NormalDist().inv_cdf(1 - 0.025 / max(comparisons, 1))
    half = z * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
    return {"gain": float(diff.mean()), "low": float(diff.mean() - half), "high": float(diff.mean() + half),
            "users": len(diff)}


SIGN_FLIPS = 2000
"""Random sign patterns ``best_gain_p_value`` draws: p-values in steps of 1/2001."""
SIGN_FLIP_SEED = 0
"""The seed of those patterns: the same per-user figures always give the same p-value (and decision)."""


def best_gain_p_value(candidates: np.ndarray, baseline: np.ndarray, *, flips: int = SIGN_FLIPS,
                      seed: int = SIGN_FLIP_SEED) -> float:
    """One-sided p-value that the best of ``candidates`` (``[C, users]``: each candidate's metric per user) beats
    ``baseline`` (``[users]``, the same users) in mean by chance alone, its choice among the ``C`` accounted for.

    A sign-flip test over users with the max statistic (Westfall–Young): with nothing to gain, each user's
    differences from the baseline are as likely negated, so the observed best mean gain is compared with the best
    mean gain under ``flips`` random sign patterns, one sign per user shared by every candidate (their
    correlation kept). p = (1 + patterns at least as good) / (1 + flips). Exact in finite samples, however sparse
    or skewed the differences (most users' NDCG moves by 0), where a normal interval is too narrow."""
    diff = np.atleast_2d(np.asarray(candidates, dtype=np.float64)) - np.asarray(baseline, dtype=np.float64)
    diff = diff[:, (diff != 0).any(axis=0)]  # a user no candidate moves adds 0 under either sign
    if diff.size == 0:
        return 1.0
    observed = diff.sum(axis=1).max()  # sums: the same order as means over the same users
    tolerance = 1e-9 * np.abs(diff).sum(axis=1).max()  # the identity pattern summed in another order
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // diff.shape[1])  # ~32 MB of signs at a time
    at_least = 0
    for start in range(0, flips, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, flips - start), diff.shape[1])).astype(np.float64) * 2 - 1
        at_least += int(((signs @ diff.T).max(axis=1) >= observed - tolerance).sum())
    return (1 + at_least) / (1 + flips)
