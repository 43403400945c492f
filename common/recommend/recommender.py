"""Recommendations and personalised search from a model bundle, in the shop's own item ids.

    from fedaug import Recommender
    rec = Recommender.load("run/model")
    rec.recommend(["B0001", "B0042"], k=10, explain=True)

Search ranks the catalog by a query's relevance: the bundle's sentence encoder over the item text vectors where
the bundle has them and the encoder is at hand, else BM25 (``bm25s``) over the item titles. With a history, the
query's relevance is blended with the user's sequence scores (both standardised per request, ``search_weight`` ×
relevance + scores); without one it is plain search, scored by the relevance itself (BM25 ranks only items that
match a query word). A history with no query (a new visitor) gets the bundle's popular items: the popularity its
DP statistics or popularity scorer holds (a bundle without one has none to give). Explanations leave each history
item out in turn (one batched pass) and report how much each raised the recommended item's score.

Histories come in the shop's vocabulary (``Recommender.shop_history``): the event names and timestamp unit the
bundle was trained with ([data.events], [data.columns] timestamp_unit on its card), ISO-8601 or Unix times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedaug.common.data import EVENT_TYPES
from fedaug.common.data.events import EventSchema, parse_times
from fedaug.common.data.features import N_CODES, history_rows
from fedaug.common.errors import ConfigError
from fedaug.common.model.device import pick_device
from fedaug.common.model.evaluate import score, side_columns
from fedaug.common.model.metrics import top_k
from fedaug.common.priors.dp_counts import PriorWithCounts
from fedaug.common.priors.fusion import standardise
from fedaug.common.priors.popularity import Popularity
from fedaug.common.priors.text_prior import TextPrior
from fedaug.common.recommend.bundle import Bundle, load_bundle

SEARCH_WEIGHT = 1.0
"""Default weight of a query's (standardised) relevance against the history's (standardised) scores: equal. What
fits a shop's queries is measured on validation by ``python -m fedaug.simulations.serving_eval``."""


QUERY_CACHE = 10_000
"""Encoded queries kept (cleared when full)."""


class UnknownItems(ConfigError):
    """History items the bundle's catalog does not know (reported to the caller, never a crash)."""

    def __init__(self, items: list[str]):
        self.items = items
        clipped = [repr(i if len(i) <= 40 else i[:39] + "…") for i in items[:5]]  # never echo unbounded input
        shown = ", ".join(clipped) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        super().__init__(f"history: unknown item id(s) {shown}")


@dataclass(frozen=True)
class Activity:
    """What a shopper's history says beyond its items, read by models with behaviour and context vectors (the
    rest ignore it); any part may be left out (unknown)."""

    events: list[str] | None = None
    """Each history item's event type: view | click | favourite | cart | purchase."""
    timestamps: list[int] | None = None
    """Each history item's time, Unix seconds."""
    at: int | None = None
    """The moment the recommendations are for (the request's time), Unix seconds."""

    def rows(self, n: int, width: int) -> np.ndarray:
        """The ``n + 1`` side-feature rows of a history of ``n`` items (fedaug.common.data.features.history_rows)."""
        for name, values in (("events", self.events), ("timestamps", self.timestamps)):
            if values is not None and len(values) != n:
                raise ConfigError(f"{name}: {len(values)} given for a history of {n} items")
        types = None
        if self.events is not None:
            unknown = [e for e in self.events if e not in EVENT_TYPES]
            if unknown:
                raise ConfigError(f"events: unknown event type {unknown[0]!r} (expected {', '.join(EVENT_TYPES)})")
            types = np.array([EVENT_TYPES.index(e) for e in self.events], dtype=np.int64)
        return history_rows(types, self.timestamps, self.at, n, width)


@dataclass(frozen=True)
class Because:
    """One history item behind a recommendation: how much leaving it out lowers the recommended item's score."""

    item: str
    title: str | None
    contribution: float


@dataclass(frozen=True)
class Recommendation:
    item: str
    score: float
    title: str | None = None
    because: tuple[Because, ...] | None = None
    """History items behind this recommendation, largest contribution first (``explain=True`` only)."""

    def to_json(self) -> dict:
        out = {"item": self.item, "score": self.score, "title": self.title}
        if self.because is not None:
            out["because"] = [{"item": b.item, "title": b.title, "contribution": b.contribution}
                              for b in self.because]
        return out


class Recommender:
    """A bundle's scorer over the shop's item ids.

    Args:
        bundle: a loaded model bundle (``Recommender.load`` reads one from a directory).
        device: torch device for scoring ("auto": CUDA when present).
        search_weight: weight of a query's relevance against the history's scores in personalised search.
        schema: the shop's event names and timestamp unit (default: those the bundle was trained with).
    """

    def __init__(self, bundle: Bundle, *, device="cpu", search_weight: float = SEARCH_WEIGHT,
                 schema: EventSchema | None = None):
        self.bundle, self.device, self.search_weight = bundle, device, search_weight
        self.schema = schema or bundle.card.schema()
        self._stages = self.schema.stage()
        self.ids = bundle.catalog.ids
        self.titles = bundle.catalog.titles
        self.index = {raw: i + 1 for i, raw in enumerate(self.ids)}
        self._lexical = None
        self._query_vectors: dict[str, torch.Tensor] = {}  # popular queries repeat

    @classmethod
    def load(cls, path, *, device="auto", search_weight: float = SEARCH_WEIGHT,
             schema: EventSchema | None = None) -> Recommender:
        """The bundle at ``path``; ``schema``: the shop's vocabulary (default: the one on the bundle's card)."""
        device = pick_device(device)
        return cls(load_bundle(Path(path), device), device=device, search_weight=search_weight, schema=schema)

    @property
    def n_items(self) -> int:
        return len(self.ids)

    def title(self, internal: int) -> str | None:
        return self.titles[internal - 1] if self.titles else None

    def internal(self, history: list) -> np.ndarray:
        """Internal ids of a history of shop ids; UnknownItems names those the catalog lacks."""
        unknown = [str(item) for item in history if str(item) not in self.index]
        if unknown:
            raise UnknownItems(unknown)
        return np.asarray([self.index[str(item)] for item in history], dtype=np.int64)

    def shop_history(self, history: list, *, events: list[str] | None = None, timestamps: list | None = None,
                     at: int | float | str | None = None) -> tuple[list[str], Activity | None]:
        """A history in the shop's vocabulary as the model reads it: its event names mapped as in training (events
        mapped to "drop" leave their item out), its times (ISO-8601 or Unix, the bundle's timestamp unit) as Unix
        seconds; ``at`` defaults to now when times are given. ConfigError names a bad value."""
        for name, values in (("events", events), ("timestamps", timestamps)):
            if values is not None and len(values) != len(history):
                raise ConfigError(f"{name}: {len(values)} given for a history of {len(history)} items")
        keep = list(range(len(history)))
        types = None
        if events is not None:
            codes = [self._stages.get(str(e).strip().lower()) for e in events]
            if None in codes:
                bad = codes.index(None)
                shop = [n for n in self.schema.events if n not in EVENT_TYPES]
                raise ConfigError(f"events[{bad}]: unknown event type {str(events[bad])[:40]!r} (expected one of "
                                  f"{', '.join(EVENT_TYPES + tuple(shop))})")
            keep = [i for i in keep if codes[i] >= 0]
            types = [EVENT_TYPES[codes[i]] for i in keep]
        try:
            times = None if timestamps is None else parse_times(timestamps, self.schema, "timestamps")[keep].tolist()
            moment = None if at is None else int(parse_times([at], self.schema, "at")[0])
        except ValueError as exc:
            raise ConfigError(str(exc).replace("at[0]", "at")) from None
        if moment is None and times is not None:
            moment = int(time.time())
        items = [str(history[i]) for i in keep]
        if types is None and times is None and moment is None:
            return items, None
        return items, Activity(events=types, timestamps=times, at=moment)

    # scores ----------------------------------------------------------------------------------------------------

    def side_rows(self, histories: list[np.ndarray], activities: list[Activity | None] | None
                  ) -> list[np.ndarray] | None:
        """Each history's side-feature rows where the bundle's model reads them (None: it reads none)."""
        columns = side_columns(self.bundle.scorer)
        if columns is None:
            return None
        activities = activities or [None] * len(histories)
        return [(a or Activity()).rows(len(h), N_CODES + len(columns)) for h, a in
                zip(histories, activities, strict=True)]

    def scores(self, histories: list[np.ndarray], features: list[np.ndarray] | None = None) -> torch.Tensor:
        """``[B, n_items + 1]`` raw scores of internal-id histories (an empty history scores by the query alone);
        ``features``: their side-feature rows (``side_rows``)."""
        rows = [i for i, h in enumerate(histories) if len(h)]
        out = torch.zeros(len(histories), self.n_items + 1, device=self.device)
        if rows:
            out[rows] = score(self.bundle.scorer, [histories[i] for i in rows],
                              None if features is None else [features[i] for i in rows]).to(self.device)
        return out

    def relevance(self, queries: list[str]) -> torch.Tensor:
        """``[B, n_items + 1]`` relevance of every item to each query (padding 0)."""
        vectors = _text_vectors(self.bundle.scorer)
        if vectors is not None and self.bundle.card.text_encoder is not None:
            try:
                from fedaug.common.priors.text import encode_queries

                encoder = None if self.bundle.card.text_encoder == "packaged" else Path(self.bundle.card.text_encoder)
                new = [q for q in dict.fromkeys(queries) if q not in self._query_vectors]
                if new:
                    if len(self._query_vectors) > QUERY_CACHE:
                        self._query_vectors.clear()
                    encoded = encode_queries(new, encoder=encoder, device=self.device)
                    self._query_vectors.update(zip(new, torch.from_numpy(encoded), strict=True))
                q = torch.stack([self._query_vectors[q] for q in queries]).to(vectors.device)
                return (q @ vectors.T).float().to(self.device)
            except ConfigError:
                pass  # the encoder is not installed here: lexical search below
        return self._bm25(queries)

    def warm(self) -> None:
        """Load what the first search would (the query encoder, where the bundle searches by one) now."""
        if _text_vectors(self.bundle.scorer) is not None and self.bundle.card.text_encoder is not None:
            self.relevance(["warm"])
            self._query_vectors.clear()

    def _bm25(self, queries: list[str]) -> torch.Tensor:
        import bm25s

        if not self.titles:
            raise ConfigError("query: this bundle's catalog has no item texts to search")
        if self._lexical is None:
            self._lexical = bm25s.BM25()
            self._lexical.index(bm25s.tokenize(self.titles, show_progress=False), show_progress=False)
        out = torch.zeros(len(queries), self.n_items + 1, device=self.device)
        for row, query in enumerate(queries):
            tokens = bm25s.tokenize([query], show_progress=False, return_ids=False)[0]
            out[row, 1:] = torch.from_numpy(self._lexical.get_scores(tokens).astype(np.float32)).to(self.device)
        return out

    def blended(self, histories: list[np.ndarray], queries: list[str | None] | None = None,
                features: list[np.ndarray] | None = None) -> torch.Tensor:
        """Sequence scores, blended with each query's relevance where a query is given."""
        scores = self.scores(histories, features)
        rows = [i for i, q in enumerate(queries or []) if q]
        if not rows:
            return scores
        relevance = standardise(self.relevance([queries[i] for i in rows]))
        with_history = torch.tensor([len(histories[i]) > 0 for i in rows], device=self.device).unsqueeze(1)
        mixed = torch.where(with_history, standardise(scores[rows]) + self.search_weight * relevance, relevance)
        scores[rows] = mixed
        return scores

    # public API ------------------------------------------------------------------------------------------------

    def recommend(self, history: list, *, k: int = 10, exclude_seen: bool = True, query: str | None = None,
                  explain: bool = False, activity: Activity | None = None) -> list[Recommendation]:
        """The top ``k`` items after ``history`` (shop ids, oldest first), optionally for a search ``query``;
        ``activity``: the history's event types and times and the request's moment (models with context)."""
        return self.recommend_many([history], k=k, exclude_seen=exclude_seen, queries=[query], explain=explain,
                                   activities=[activity])[0]

    def recommend_many(self, histories: list[list], *, k: int = 10, exclude_seen: bool = True,
                       queries: list[str | None] | None = None, explain: bool = False,
                       exclude: list[list] | None = None, activities: list[Activity | None] | None = None
                       ) -> list[list[Recommendation]]:
        """``recommend`` for a batch in one pass (at most ``k`` items each: fewer where the catalog has fewer left).
        ``exclude``: per history, further shop ids never to recommend."""
        return self.recommend_internal([self.internal(h) for h in histories], k=k, exclude_seen=exclude_seen,
                                       queries=queries, explain=explain, exclude=exclude, activities=activities)

    def recommend_internal(self, internal: list[np.ndarray], *, k: int = 10, exclude_seen: bool = True,
                           queries: list[str | None] | None = None, explain: bool = False,
                           exclude: list[list] | None = None, activities: list[Activity | None] | None = None
                           ) -> list[list[Recommendation]]:
        """``recommend_many`` for histories already mapped to internal ids (``internal``), as a caller that checked
        them item by item holds them."""
        if k < 1:
            raise ConfigError(f"k: must be at least 1, got {k}")
        features = self.side_rows(internal, activities)
        scores = self.blended(internal, queries, features)
        self._without_history(scores, internal, queries)
        masked = scores.clone() if explain else scores  # explanations read the unmasked scores; ``scores`` is ours
        masked[:, 0] = float("-inf")
        banned = [(h if exclude_seen else np.zeros(0, np.int64)) for h in internal]
        if exclude:
            banned = [np.concatenate([b, self.internal(extra)]) if extra else b
                      for b, extra in zip(banned, exclude, strict=True)]
        rows = np.repeat(np.arange(len(banned)), [len(b) for b in banned])
        if len(rows):  # one indexed write for the whole batch
            masked[torch.from_numpy(rows).to(self.device),
                   torch.from_numpy(np.concatenate(banned)).to(self.device)] = float("-inf")
        # Items at -inf (padding, excluded, unscored) may fill a row's tail; they are dropped below.
        top_scores, top = top_k(masked, min(k, masked.shape[1]))  # ties in the order the run's metrics rank them
        because = self._explain(internal, queries, scores, top, features) if explain else None
        return [[Recommendation(self.ids[int(i) - 1], float(s), self.title(int(i)),
                                because[row][col] if because else None)
                 for col, (i, s) in enumerate(zip(top[row].tolist(), top_scores[row].tolist(), strict=True))
                 if s != float("-inf")]  # a row with fewer candidates: only those
                for row in range(len(internal))]

    def _without_history(self, scores: torch.Tensor, histories: list[np.ndarray], queries) -> None:
        """Score rows of empty histories in place: plain search by the query's own relevance (items it does not
        match at all, relevance 0, are none of its results), or with no query the bundle's popular items (none
        where the bundle holds no popularity)."""
        empty = [i for i, h in enumerate(histories) if not len(h)]
        queries = queries or [None] * len(histories)
        searched = [i for i in empty if queries[i]]
        if searched:
            relevance = self.relevance([queries[i] for i in searched])
            scores[searched] = torch.where(relevance != 0, relevance, float("-inf"))
        cold = [i for i in empty if not queries[i]]
        if cold:
            popular = self.popularity()
            scores[cold] = (float("-inf") if popular is None
                            else torch.where(popular > 0, popular, float("-inf")).to(scores.device))

    @staticmethod
    def why_empty(query: str | None) -> str:
        """Why a visitor without history got no items: the query matched nothing, or (no query) the bundle holds
        no popularity to show."""
        return "no item matches the query" if query else "this model holds no popularity for a visitor without history"

    def popularity(self) -> torch.Tensor | None:
        """``[n_items + 1]`` popularity the bundle holds (its DP statistics' kept log-counts, or a popularity
        scorer's counts), what a visitor without history is shown; None: it holds none."""
        return _popularity(self.bundle.scorer)

    def _explain(self, internal: list[np.ndarray], queries, scores: torch.Tensor, top: torch.Tensor,
                 features: list[np.ndarray] | None) -> list[list[tuple[Because, ...]]]:
        """For every recommended item, each history item's contribution: full score − score without that item
        (and its event), all leave-one-out histories of the batch in one pass."""
        variants, owner, variant_features = [], [], []
        for row, h in enumerate(internal):
            for j in range(len(h)):
                variants.append(np.delete(h, j))
                owner.append(row)
                if features is not None:
                    variant_features.append(np.delete(features[row], j, axis=0))
        if not variants:
            return [[() for _ in range(top.shape[1])] for _ in internal]
        variant_queries = [queries[r] for r in owner] if queries else None
        without = self.blended(variants, variant_queries, variant_features if features is not None else None)
        out, start = [], 0
        for row, h in enumerate(internal):
            drop = scores[row].unsqueeze(0) - without[start : start + len(h)]  # [len(h), items]
            start += len(h)
            per_item = []
            for item in top[row].tolist():
                contributions = drop[:, item].tolist()
                order = sorted(range(len(h)), key=lambda j: -contributions[j])
                per_item.append(tuple(Because(self.ids[int(h[j]) - 1], self.title(int(h[j])), float(contributions[j]))
                                      for j in order))
            out.append(per_item)
        return out

    def search(self, query: str, *, k: int = 10) -> list[Recommendation]:
        """Plain search: the catalog ranked by relevance to ``query`` alone."""
        return self.recommend([], k=k, query=query)

    def item(self, raw: str) -> dict:
        internal = self.index.get(str(raw))
        if internal is None:
            raise UnknownItems([str(raw)])
        return {"item": str(raw), "title": self.title(internal)}


def _popularity(scorer) -> torch.Tensor | None:
    """The popularity inside a scorer (alone, within DP statistics that use it, or a fusion), if any."""
    if isinstance(scorer, Popularity):
        return scorer.counts
    if isinstance(scorer, PriorWithCounts):
        return scorer.popularity if scorer.popularity_weight else None
    for part in ("prior", "model"):
        inner = getattr(scorer, part, None)
        if inner is not None and (found := _popularity(inner)) is not None:
            return found
    return None


def _text_vectors(scorer) -> torch.Tensor | None:
    """The item text vectors inside a scorer (a text prior, alone or within statistics or a fusion), if any."""
    if isinstance(scorer, TextPrior):
        return scorer.vectors
    for part in ("prior", "model"):
        inner = getattr(scorer, part, None)
        if inner is not None and (found := _text_vectors(inner)) is not None:
            return found
    return None
