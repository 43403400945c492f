"""Check a model bundle against its run, and measure personalised search, through the public Recommender API.

1. Reproduction: every test user's top 10 from ``Recommender.recommend_many`` (the shop's ids in and out; the
   evaluation's exclusions: the history, but not the target; the history's event types and times and the test
   event's moment, as a shop would send them) gives the run's test HR@10 / NDCG@10.
2. Search: for every test user the query is the held-out item's category names (its named attributes, brand
   left out); NDCG@10 of search alone (the query, no history) vs personalised search (query + history). The blend
   weight is chosen on validation users (their held-out validation item's categories), then applied to test.

    python -m fedaug.simulations.serving_eval --model RUN/model --data ../shared/data/amazon-beauty/Beauty.txt --out DIR
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
from rich.progress import Progress

from fedaug.common.atomic import write_json_atomic
from fedaug.common.data import EVENT_TYPES
from fedaug.common.data.loaders import load
from fedaug.common.data.split import LeaveOneOut, leave_one_out
from fedaug.common.recommend.recommender import Activity, Recommender

WEIGHTS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Query-relevance weights against the history's scores, tried on validation."""
BATCH = 256


def category_queries(data) -> list[str]:
    """Per internal item: its category names (named attributes that occur after a first position anywhere, so
    brands, which only ever come first, are left out)."""
    catalog = data.catalog
    if not catalog.attributes or not catalog.attribute_names:
        raise SystemExit("the data has no named item attributes to build category queries from")
    later = {int(a) for attrs in catalog.attributes for a in list(attrs)[1:]}
    names = catalog.attribute_names
    return [" ".join(names[int(a)] for a in attrs if int(a) in later) for attrs in catalog.attributes]


def _ndcg(ranked: list[str], target: str, k: int = 10) -> tuple[float, float]:
    if target in ranked[:k]:
        position = ranked.index(target)
        return 1.0, 1.0 / math.log2(position + 2)
    return 0.0, 0.0


def activities(split: LeaveOneOut, stage: str) -> list[Activity]:
    """What a shop would send with each ``split.eval_inputs(stage)`` history: its events' types and times, and
    the held-out event's time as the moment asked about."""
    full, out = split.full, []
    for user in split.eval_users(stage).tolist():
        start = int(full.offsets[user])
        n = int(split.train.lengths[user]) + (1 if stage == "test" else 0)
        out.append(Activity(
            events=None if full.event_type is None else [EVENT_TYPES[t] for t in full.event_type[start:start + n]],
            timestamps=None if full.timestamps is None else full.timestamps[start:start + n].tolist(),
            at=None if full.timestamps is None else int(full.timestamps[start + n])))
    return out


def _run(recommender: Recommender, histories, targets, queries=None, exclude=None, exclude_seen=True,
         label="", progress=None, activity: list[Activity] | None = None) -> dict[str, float]:
    hits, gains = [], []
    task = progress.add_task(label, total=len(targets)) if progress else None
    for start in range(0, len(targets), BATCH):
        stop = start + BATCH
        results = recommender.recommend_many(histories[start:stop], k=10, exclude_seen=exclude_seen,
                                             queries=None if queries is None else queries[start:stop],
                                             exclude=None if exclude is None else exclude[start:stop],
                                             activities=None if activity is None else activity[start:stop])
        for recs, target in zip(results, targets[start:stop], strict=True):
            hit, gain = _ndcg([r.item for r in recs], target)
            hits.append(hit)
            gains.append(gain)
        if progress:
            progress.update(task, advance=len(results))
    return {"hr@10": float(np.mean(hits)), "ndcg@10": float(np.mean(gains)), "users": len(targets)}


def reproduce_test(recommender: Recommender, data, progress=None) -> dict[str, float]:
    """Test HR@10 / NDCG@10 through ``recommend_many`` with the evaluation's candidates (history masked, target
    kept), in the shop's ids."""
    split = leave_one_out(data)
    raw = [str(r) for r in data.catalog.raw_ids.tolist()]
    histories, targets = split.eval_inputs("test")
    exclude = [[raw[i] for i in set(h.tolist()) - {int(t)}] for h, t in zip(histories, targets, strict=True)]
    return _run(recommender, [[raw[i] for i in h] for h in histories], [raw[t] for t in targets], exclude=exclude,
                exclude_seen=False, label="reproducing test", progress=progress, activity=activities(split, "test"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--search-users", type=int, default=0, help="subsample for search (0: every test user)")
    args = parser.parse_args()
    started = time.monotonic()
    recommender = Recommender.load(args.model, device="auto")
    data = load(args.data)
    split = leave_one_out(data)
    raw = [str(r) for r in data.catalog.raw_ids.tolist()]
    out: dict = {"model": str(args.model), "card_test": recommender.bundle.card.metrics.get("test")}

    with Progress(transient=True) as progress:
        out["reproduced_test"] = reproduce_test(recommender, data, progress)

        # 2. search: validation picks the blend weight, test reports it
        queries = category_queries(data)
        rng = np.random.default_rng(0)
        search = {}
        for stage in ("valid", "test"):
            hist, targ = split.eval_inputs(stage)
            rows = np.arange(len(targ))
            if args.search_users and args.search_users < len(rows):
                rows = np.sort(rng.choice(rows, args.search_users, replace=False))
            rows = [r for r in rows if queries[targ[r]]]
            search[stage] = ([[raw[i] for i in hist[r]] for r in rows], [raw[targ[r]] for r in rows],
                             [queries[targ[r]] for r in rows])
        shop_hist, shop_targ, shop_q = search["valid"]
        tried = []
        for weight in WEIGHTS:
            recommender.search_weight = weight
            tried.append({"weight": weight, "valid": _run(recommender, shop_hist, shop_targ, shop_q,
                                                          label=f"search weight {weight}", progress=progress)})
        best = max(tried, key=lambda row: row["valid"]["ndcg@10"])["weight"]
        recommender.search_weight = best
        shop_hist, shop_targ, shop_q = search["test"]
        alone = _run(recommender, [[] for _ in shop_targ], shop_targ, shop_q, label="search alone", progress=progress)
        personal = _run(recommender, shop_hist, shop_targ, shop_q, label="personalised", progress=progress)
        history_only = _run(recommender, shop_hist, shop_targ, None, label="history alone", progress=progress)
    out["search"] = {"query": "the held-out item's category names (brand left out)", "weights_tried": tried,
                     "weight": best, "test_search_alone": alone, "test_personalised": personal,
                     "test_history_alone": history_only}
    out["seconds"] = round(time.monotonic() - started, 1)
    write_json_atomic(args.out / "serving.json", out)
    print(f"reproduced test NDCG@10 {out['reproduced_test']['ndcg@10']:.6f} HR@10 {out['reproduced_test']['hr@10']:.6f}"
          f" (card: {out['card_test']})")
    print(f"search alone {alone['ndcg@10']:.4f}, personalised {personal['ndcg@10']:.4f} (weight {best}), "
          f"history alone {history_only['ndcg@10']:.4f}")


if __name__ == "__main__":
    main()
