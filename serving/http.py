"""`fedaug serve`: a model bundle over HTTP (FastAPI + uvicorn).

    POST /v1/recommend   {"history": ["SKU-1", ...], "k": 10, "query": null, "explain": false,
                          "events": ["view", "add_to_cart", ...], "timestamps": ["2024-03-01T10:00:00Z", ...],
                          "at": 1700003600}
    GET  /v1/search?q=lipstick&k=10
    GET  /v1/items/{id}
    GET  /healthz, /metrics (Prometheus), /docs (OpenAPI, its assets served from here), / (a page to try it)

Histories speak the shop's vocabulary: the event names and timestamp unit the bundle was trained with (its card's
[data.events] / [data.columns]; the standard names always work), times as ISO-8601 text or Unix numbers. An empty
history is a new visitor: plain search with a query, else the bundle's popular items. Request bodies are limited
(``max_body_bytes``, 413 beyond), unknown fields refused, and a 422 names the field without echoing long input.

Concurrent recommend requests are micro-batched: they wait up to ``max_wait_ms`` for each other and are scored in
one forward pass (``Recommender.recommend_many``). The bundle directory is watched; a new bundle (the next
federation's) is loaded beside the old one and swapped in between batches, so no request is dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, ORJSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StringConstraints

from fedaug.common.data import EVENT_TYPES
from fedaug.common.data.events import DROP, MAX_ID_CHARS, EventSchema
from fedaug.common.errors import FedaugError
from fedaug.common.recommend.bundle import FILES, bundle_hash
from fedaug.common.recommend.recommender import Activity, Recommendation, Recommender, UnknownItems

MAX_K = 100
MAX_HISTORY = 200
MAX_BODY_BYTES = 1_000_000
"""Default request body limit (``create_app(max_body_bytes=...)``, ``fedaug serve --max-body-bytes``)."""
SHOWN = 80
"""Longest piece of a request echoed in an error."""

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Moment = StrictInt | StrictFloat | Annotated[str, StringConstraints(max_length=64)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY,
                                  description="The shopper's items, shop ids, oldest first (empty: a new visitor: "
                                              "plain search with a query, else popular items).")
    k: int = Field(10, ge=1, le=MAX_K)
    query: str | None = Field(None, max_length=500, description="A search query: personalised search.")
    explain: bool = Field(False, description="Say which history items drove each recommendation.")
    exclude_seen: bool = True
    events: list[Name] | None = Field(None, max_length=MAX_HISTORY, description="Each history item's event, in the "
                                      "shop's names the model was trained with (GET /healthz lists them; "
                                      + " | ".join(EVENT_TYPES) + " always work).")
    timestamps: list[Moment] | None = Field(None, max_length=MAX_HISTORY, description="Each history item's time: "
                                            "ISO-8601 text or Unix seconds (milliseconds from 1e11 on).")
    at: Moment | None = Field(None, description="The moment the recommendations are for, like timestamps (default: "
                              "now when timestamps are given).")


class Ranking(BaseModel):
    items: list[Recommendation]
    model: str = Field(description="The served bundle's content hash (16 hex digits).")
    note: str | None = Field(None, description="Why the list is empty or short, when it is.")


class CatalogItem(BaseModel):
    item: str
    title: str | None


class CatalogItems(BaseModel):
    items: list[CatalogItem]


class Health(BaseModel):
    status: str
    model: str
    items: int
    kind: str | None
    privacy: dict | None
    events: list[str] = Field(description="The event names this model takes: the shop's in the funnel's order "
                              "(view ... purchase), then the standard ones.")
    timestamp_unit: str = Field(description="How numeric times are read: auto | s | ms | iso.")


class Problem(BaseModel):
    detail: str


PROBLEMS = {code: {"model": Problem} for code in (404, 413, 422)}


@dataclass
class _Ask:
    """A request in the model's vocabulary: internal ids, standard event names, Unix seconds."""

    internal: np.ndarray
    activity: Activity | None
    k: int
    query: str | None
    explain: bool
    exclude_seen: bool


def _clip(text: str, limit: int = SHOWN) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Pending:
    ask: _Ask
    future: asyncio.Future


@dataclass
class Service:
    """The loaded bundle, its watcher and the micro-batcher."""

    model_dir: Path
    device: str = "auto"
    max_batch: int = 64
    max_wait_ms: float = 0.5
    watch_seconds: float = 2.0
    batching: bool = True
    schema: EventSchema | None = None
    recommender: Recommender | None = None
    model_hash: str = ""
    queue: asyncio.Queue | None = None
    tasks: list = field(default_factory=list)
    batches: int = 0
    files: tuple = ()

    def load(self) -> None:
        self.files = self._files()  # before reading: a bundle written meanwhile shows as changed at the next look
        recommender = Recommender.load(self.model_dir, device=self.device, schema=self.schema)
        recommender.warm()  # the query encoder loads now, once, not on the first search
        self.recommender, self.model_hash = recommender, bundle_hash(self.model_dir)  # one swap: old or new

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._batcher()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    def ask(self, request: RecommendRequest) -> _Ask:
        """The request in the model's vocabulary; ConfigError (a 422) names a bad item, event or time."""
        history, activity = self.recommender.shop_history(request.history, events=request.events,
                                                          timestamps=request.timestamps, at=request.at)
        return _Ask(self.recommender.internal(history), activity, request.k, request.query, request.explain,
                    request.exclude_seen)

    async def recommend(self, ask: _Ask) -> list:
        if not self.batching:
            return (await asyncio.to_thread(self._score, [ask]))[0]
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(ask, future))
        return await future

    def _score(self, asks: list[_Ask]) -> list:
        """One forward pass for requests that share ``explain`` and ``exclude_seen`` (k: the largest, cut after)."""
        recommender, out = self.recommender, [None] * len(asks)
        groups: dict[tuple, list[int]] = {}
        for i, ask in enumerate(asks):
            groups.setdefault((ask.explain, ask.exclude_seen), []).append(i)
        for (explain, exclude_seen), rows in groups.items():
            k = min(max(asks[i].k for i in rows), recommender.n_items)
            results = recommender.recommend_internal([asks[i].internal for i in rows], k=k, explain=explain,
                                                     exclude_seen=exclude_seen, queries=[asks[i].query for i in rows],
                                                     activities=[asks[i].activity for i in rows])
            for i, result in zip(rows, results, strict=True):
                out[i] = result[: asks[i].k]
        return out

    async def _batcher(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = time.monotonic() + self.max_wait_ms / 1000
            while len(batch) < self.max_batch:
                if not self.queue.empty():  # those already waiting join at once
                    batch.append(self.queue.get_nowait())
                    continue
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(self._score, [p.ask for p in batch])
            except Exception as exc:  # a failed pass fails its requests, never the service
                results = [exc] * len(batch)
            self.batches += 1
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    if isinstance(result, Exception):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)

    def _files(self) -> tuple:
        """The bundle files' identity (inode, size, modification time): a new bundle changes it, so its content is
        read and hashed only then, not every few seconds."""
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in (os.stat(self.model_dir / n) for n in FILES))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_seconds)
            try:
                seen = self._files()
                if seen == self.files:
                    continue
                current = await asyncio.to_thread(bundle_hash, self.model_dir)
                if current != self.model_hash:
                    await asyncio.to_thread(self.load)
                else:
                    self.files = seen  # the same bundle written again
            except (OSError, FedaugError):
                continue  # mid-swap or a bad new bundle: keep serving the loaded one


def create_app(model_dir: Path, *, device: str = "auto", batching: bool = True, max_batch: int = 64,
               max_wait_ms: float = 0.5, watch_seconds: float = 2.0, max_body_bytes: int = MAX_BODY_BYTES,
               schema: EventSchema | None = None) -> FastAPI:
    """The HTTP service over the bundle at ``model_dir`` (loaded now: a bad bundle fails here, in one line).

    Args:
        model_dir: the bundle directory; a new bundle written there is picked up between batches.
        device: torch device for scoring ("auto": CUDA when present).
        batching: micro-batch concurrent recommend requests into one forward pass.
        max_batch: most requests scored in one pass.
        max_wait_ms: how long a request waits for others to share its pass.
        watch_seconds: how often the bundle directory is checked for a new bundle.
        max_body_bytes: the largest request body taken (413 beyond).
        schema: the shop's event names and timestamp unit (default: those on the bundle's card, each bundle's own).
    """
    service = Service(Path(model_dir), device=device, batching=batching, max_batch=max_batch,
                      max_wait_ms=max_wait_ms, watch_seconds=watch_seconds, schema=schema)
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

    # Swagger UI and ReDoc from fastapi-offline's own copies of their assets: /docs works without the internet.
    app = FastAPIOffline(title="fedaug", summary="Recommendations and personalised search from a fedaug model bundle",
                         lifespan=lifespan, static_url="/docs-assets")
    app.state.service = service

    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_Measure, requests=requests, latency=latency, routes=app.router.routes)

    def one_line(exc: Exception, status: int = 422) -> HTTPException:
        return HTTPException(status, detail=_clip(exc, 300))

    def ranked(results, note: str | None = None) -> ORJSONResponse:  # not FastAPI's encoder: it is the hot path
        body = {"items": [r.to_json() for r in results], "model": service.model_hash[:16]}
        if note:
            body["note"] = note
        return ORJSONResponse(body)

    @app.post("/v1/recommend", response_model=Ranking, responses=PROBLEMS)
    async def recommend(body: RecommendRequest) -> ORJSONResponse:
        try:
            results = await service.recommend(service.ask(body))
        except (UnknownItems, FedaugError) as exc:
            raise one_line(exc) from None
        note = None
        if not results and not body.history:
            note = Recommender.why_empty(body.query) + ("" if body.query else ": give a query")
        return ranked(results, note)

    @app.get("/v1/search", response_model=Ranking, responses=PROBLEMS)
    async def search(q: str = Query(..., min_length=1, max_length=500),
                     k: int = Query(10, ge=1, le=MAX_K)) -> ORJSONResponse:
        try:
            results = await service.recommend(service.ask(RecommendRequest(history=[], k=k, query=q)))
        except FedaugError as exc:
            raise one_line(exc) from None
        return ranked(results, None if results else Recommender.why_empty(q))

    @app.get("/v1/items/{item_id}", response_model=CatalogItem, responses=PROBLEMS)
    async def item(item_id: str) -> dict:
        try:
            return service.recommender.item(item_id)
        except UnknownItems:
            raise HTTPException(404, detail=f"item {_clip(item_id, 40)!r}: not in the catalog") from None

    @app.get("/v1/items", response_model=CatalogItems, responses=PROBLEMS)
    async def items(prefix: str = Query("", max_length=200), limit: int = Query(20, ge=1, le=200)) -> dict:
        """Catalog items whose id or title contains ``prefix`` (for the page's picker)."""
        rec, needle, found = service.recommender, prefix.lower(), []
        for i, raw in enumerate(rec.ids, start=1):
            title = rec.title(i) or ""
            if needle in raw.lower() or needle in title.lower():
                found.append({"item": raw, "title": title or None})
                if len(found) == limit:
                    break
        return {"items": found}

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict:
        rec = service.recommender
        card = rec.bundle.card
        shop = sorted((name for name, target in rec.schema.events.items() if target != DROP),
                      key=lambda name: EVENT_TYPES.index(rec.schema.events[name]))  # the funnel's order
        return {"status": "ok", "model": service.model_hash[:16], "items": card.items,
                "kind": card.scorer.get("kind"), "privacy": card.privacy,
                "events": list(dict.fromkeys([*shop, *EVENT_TYPES])), "timestamp_unit": rec.schema.timestamp_unit}

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
        where = ".".join(_clip(part, 40) for part in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {_clip(first.get('msg', 'invalid'), 200)}"}, status_code=422)

    return app


class _BodyLimit:
    """Request bodies over ``max_bytes`` answered 413 before the app reads them (by their declared length, or
    while they stream in); the body of a request within the limit is handed on as it came."""

    def __init__(self, app, *, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes:,} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _Measure:
    """Request counts and latency per route, as plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs
    about a millisecond a request). Every route is labelled by its path (FastAPI's own /docs and /openapi.json
    too, and the docs' assets by their mount); a request no route matched is ``unmatched``."""

    def __init__(self, app, *, requests: Counter, latency: Histogram, routes: list):
        self.app, self.requests, self.latency, self.routes = app, requests, latency, routes

    def _endpoint(self, scope) -> str:
        route = scope.get("route")
        if route is not None:
            return route.path
        endpoint = scope.get("endpoint")
        for candidate in self.routes:
            if endpoint is not None and endpoint in (getattr(candidate, "endpoint", None),
                                                     getattr(candidate, "app", None)):
                return candidate.path
        return "unmatched"

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
            endpoint = self._endpoint(scope)
            self.requests.labels(endpoint, str(status[0])).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - started)


PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
