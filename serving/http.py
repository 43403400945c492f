"""`fedaug serve`: a model bundle over HTTP (FastAPI + uvicorn).

    POST /v1/recommend   {"history": ["B0001", ...], "k": 10, "query": null, "explain": false,
                          "events": ["view", ...], "timestamps": [1700000000, ...], "at": 1700003600}
    GET  /v1/search?q=lipstick&k=10
    GET  /v1/items/{id}
    GET  /healthz, /metrics (Prometheus), /docs (OpenAPI), / (a page to try it)

Concurrent recommend requests are micro-batched: they wait up to ``max_wait_ms`` for each other and are scored in
one forward pass (``Recommender.recommend_many``). The bundle directory is watched; a new bundle (the next
federation's) is loaded beside the old one and swapped in between batches, so no request is dropped.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, model_validator

from common.bundle import bundle_hash
from common.data import EVENT_TYPES
from common.errors import FedaugError
from common.recommender import Activity, Recommender, UnknownItems

MAX_K = 100
MAX_HISTORY = 200


class RecommendRequest(BaseModel):
    history: list[str] = Field(default_factory=list, max_length=MAX_HISTORY,
                               description="The shopper's items, shop ids, oldest first (empty: plain search).")
    k: int = Field(10, ge=1, le=MAX_K)
    query: str | None = Field(None, max_length=500, description="A search query: personalised search.")
    explain: bool = Field(False, description="Say which history items drove each recommendation.")
    exclude_seen: bool = True
    events: list[str] | None = Field(None, max_length=MAX_HISTORY, description="Each history item's event type ("
                                     + " | ".join(EVENT_TYPES) + "), for models with behaviour vectors.")
    timestamps: list[int] | None = Field(None, max_length=MAX_HISTORY, description="Each history item's time, "
                                         "Unix seconds, for models with time context.")
    at: int | None = Field(None, description="The moment the recommendations are for, Unix seconds (default: now "
                           "when timestamps are given).")

    @model_validator(mode="after")
    def _aligned(self):
        for name in ("events", "timestamps"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.history):
                raise ValueError(f"{name}: {len(values)} given for a history of {len(self.history)} items")
        unknown = [e for e in self.events or [] if e not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"events: unknown event type {unknown[0]!r} (expected {', '.join(EVENT_TYPES)})")
        return self

    def activity(self) -> Activity | None:
        if self.events is None and self.timestamps is None and self.at is None:
            return None
        at = self.at if self.at is not None or self.timestamps is None else int(time.time())
        return Activity(events=self.events, timestamps=self.timestamps, at=at)


@dataclass
class _Pending:
    request: RecommendRequest
    future: asyncio.Future


@dataclass
class Service:
    """The loaded bundle, its watcher and the micro-batcher."""

    model_dir: Path
    device: str = "auto"
    max_batch: int = 64
    max_wait_ms: float = 2.0
    watch_seconds: float = 2.0
    batching: bool = True
    recommender: Recommender | None = None
    model_hash: str = ""
    queue: asyncio.Queue | None = None
    tasks: list = field(default_factory=list)
    batches: int = 0

    def load(self) -> None:
        recommender = Recommender.load(self.model_dir, device=self.device)
        self.recommender, self.model_hash = recommender, bundle_hash(self.model_dir)  # one swap: old or new

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._batcher()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    async def recommend(self, request: RecommendRequest) -> list:
        if not self.batching:
            return (await asyncio.to_thread(self._score, [request]))[0]
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(request, future))
        return await future

    def _score(self, requests: list[RecommendRequest]) -> list:
        """One forward pass for requests that share ``explain`` and ``exclude_seen`` (k: the largest, cut after).
        A request's own error (an unknown item) is returned in its place, not raised for the batch."""
        recommender, out = self.recommender, [None] * len(requests)
        internal: dict[int, np.ndarray] = {}
        for i, r in enumerate(requests):
            try:
                internal[i] = recommender.internal(r.history)
            except UnknownItems as exc:
                out[i] = exc
        groups: dict[tuple, list[int]] = {}
        for i in internal:
            groups.setdefault((requests[i].explain, requests[i].exclude_seen), []).append(i)
        for (explain, exclude_seen), rows in groups.items():
            k = min(max(requests[i].k for i in rows), recommender.n_items)
            results = recommender.recommend_internal([internal[i] for i in rows], k=k, explain=explain,
                                                     exclude_seen=exclude_seen,
                                                     queries=[requests[i].query for i in rows],
                                                     activities=[requests[i].activity() for i in rows])
            for i, result in zip(rows, results, strict=True):
                out[i] = result[: requests[i].k]
        return out

    async def _batcher(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = time.monotonic() + self.max_wait_ms / 1000
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(self._score, [p.request for p in batch])
            except Exception as exc:  # a failed pass fails its requests, never the service
                results = [exc] * len(batch)
            self.batches += 1
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    if isinstance(result, Exception):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_seconds)
            try:
                current = await asyncio.to_thread(bundle_hash, self.model_dir)
                if current != self.model_hash:
                    await asyncio.to_thread(self.load)
            except (OSError, FedaugError):
                continue  # mid-swap or a bad new bundle: keep serving the loaded one


def create_app(model_dir: Path, *, device: str = "auto", batching: bool = True, max_batch: int = 64,
               max_wait_ms: float = 2.0, watch_seconds: float = 2.0) -> FastAPI:
    """The HTTP service over the bundle at ``model_dir`` (loaded now: a bad bundle fails here, in one line)."""
    service = Service(Path(model_dir), device=device, batching=batching, max_batch=max_batch,
                      max_wait_ms=max_wait_ms, watch_seconds=watch_seconds)
    service.load()
    registry = CollectorRegistry()
    requests = Counter("fedaug_serve_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("fedaug_serve_latency_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
    model_info = Gauge("fedaug_serve_model_info", "The bundle being served", ["hash", "fedaug_version"],
                       registry=registry)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="fedaug", summary="Recommendations and personalised search from a fedaug model bundle",
                  lifespan=lifespan)
    app.state.service = service

    app.add_middleware(_Measure, requests=requests, latency=latency)

    def one_line(exc: Exception, status: int = 422) -> HTTPException:
        return HTTPException(status, detail=" ".join(str(exc).split()))

    def ranked(results) -> JSONResponse:  # built here, not by FastAPI's encoder: it is the hot path
        return JSONResponse({"items": [r.to_json() for r in results], "model": service.model_hash[:16]})

    @app.post("/v1/recommend")
    async def recommend(body: RecommendRequest) -> JSONResponse:
        if not body.history and not body.query:
            raise HTTPException(422, detail="history: empty (give item ids, or a query for plain search)")
        try:
            return ranked(await service.recommend(body))
        except (UnknownItems, FedaugError) as exc:
            raise one_line(exc) from None

    @app.get("/v1/search")
    async def search(q: str = Query(..., min_length=1, max_length=500),
                     k: int = Query(10, ge=1, le=MAX_K)) -> JSONResponse:
        try:
            return ranked(await service.recommend(RecommendRequest(history=[], k=k, query=q)))
        except FedaugError as exc:
            raise one_line(exc) from None

    @app.get("/v1/items/{item_id}")
    async def item(item_id: str) -> dict:
        try:
            return service.recommender.item(item_id)
        except UnknownItems:
            raise HTTPException(404, detail=f"item {item_id!r}: not in the catalog") from None

    @app.get("/v1/items")
    async def items(prefix: str = "", limit: int = Query(20, ge=1, le=200)) -> dict:
        """Catalog items whose id or title contains ``prefix`` (for the page's picker)."""
        rec, needle, found = service.recommender, prefix.lower(), []
        for i, raw in enumerate(rec.ids, start=1):
            title = rec.title(i) or ""
            if needle in raw.lower() or needle in title.lower():
                found.append({"item": raw, "title": title or None})
                if len(found) == limit:
                    break
        return {"items": found}

    @app.get("/healthz")
    async def healthz() -> dict:
        card = service.recommender.bundle.card
        return {"status": "ok", "model": service.model_hash[:16], "items": card.items,
                "kind": card.scorer.get("kind"), "privacy": card.privacy}

    @app.get("/metrics")
    async def metrics() -> Response:
        model_info.clear()
        model_info.labels(service.model_hash[:16], service.recommender.bundle.card.fedaug_version).set(1)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    return app


class _Measure:
    """Request counts and latency per route, as plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs
    about a millisecond a request)."""

    def __init__(self, app, *, requests: Counter, latency: Histogram):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.requests.labels(endpoint, str(status[0])).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - started)


PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
