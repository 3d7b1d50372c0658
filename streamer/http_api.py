"""The HTTP API of ``metarec serve`` (FastAPI; its OpenAPI schema at /openapi.json).

* ``POST /v1/score``: a user, an optional context and user features, and up to
  ``max_candidates`` items (each with optional features) in; each item's click
  probability out, in the request's order.
* ``POST /v1/rank``: the same, the ``top_n`` items by probability out.
* ``GET /health``: 200 once the server holds the topics' state, else 503; the
  model version, the users held, and how far behind the topics it is.
* ``GET /metrics``: Prometheus.

Bad input is a 4xx that says what is wrong (422 from the schema, 413 for a body
over ``max_request_bytes``, 411 without a length); a server not caught up yet
answers 503.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from metarec.events import Features, Identifier
from metarec.live_model import Candidate
from streamer.config import ServeSettings
from streamer.live_state import LiveState
from streamer.serving_metrics import ServingMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = ("/v1/score", "/v1/rank", "/health", "/metrics")


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Identifier
    item_features: Features = Field(default_factory=dict, description="the item's features "
                                    "(none: those the model last learned the item with)")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "user_id": "196", "context": {"platform": "ios"},
        "items": [{"item_id": "242", "item_features": {"genre": ["Comedy"]}},
                  {"item_id": "302"}]}]})

    user_id: Identifier
    context: Features = Field(default_factory=dict, description="the impression's context "
                              "(platform, page, ...), as events carry it")
    user_features: Features = Field(default_factory=dict, description="the user's features "
                                    "(none: those of the user's latest event)")
    items: list[Item] = Field(min_length=1, description="candidates to score")


class RankRequest(ScoreRequest):
    top_n: int = Field(10, ge=1, description="how many of the best to return")


class ItemScore(BaseModel):
    item_id: str
    p: float = Field(description="click probability")


class ScoreResponse(BaseModel):
    user_id: str
    known: bool = Field(description="the user has personal state (else: scored as a new "
                        "user, from the meta-learned initialisation and their features)")
    labels: int = Field(description="labels the user's personal state has learned from")
    model_version: int | None = Field(description="the newest model version whose updates "
                                      "the scores hold (none: none published yet)")
    scores: list[ItemScore]


class HealthResponse(BaseModel):
    status: str = Field(description="ready, or starting (not caught up with the topics yet)")
    model_version: int | None
    examples_learned: int
    users: int
    lag_records: dict[str, int]
    staleness_seconds: float
    updates_applied: int


def create_app(state: LiveState, metrics: ServingMetrics, settings: ServeSettings) -> ASGIApp:
    app = FastAPI(title="metarec", summary="Click probabilities from each user's live model",
                  version="1")

    def scored(req: ScoreRequest, top_n: int | None = None) -> Response:
        """The response as JSON made here: a pydantic model per candidate cost
        more than the scoring."""
        if len(req.items) > settings.max_candidates:
            raise HTTPException(422, f"{len(req.items)} items: at most "
                                     f"{settings.max_candidates} per request")
        if not state.wait_ready(0):
            raise HTTPException(503, "not caught up with the topics yet: see /health")
        metrics.candidates.observe(len(req.items))
        candidates = [Candidate(it.item_id, it.item_features) for it in req.items]
        s, version = state.score(req.user_id, candidates, context=req.context,
                                 user_features=req.user_features)
        picked = (range(len(candidates)) if top_n is None
                  else np.argsort(-s.p, kind="stable")[:top_n].tolist())
        p = s.p.tolist()
        body = {"user_id": req.user_id, "known": s.known, "labels": s.k,
                "model_version": version,
                "scores": [{"item_id": candidates[i].item_id, "p": p[i]} for i in picked]}
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(req: ScoreRequest) -> Response:
        return scored(req)

    @app.post("/v1/rank", response_model=ScoreResponse)
    async def rank(req: RankRequest) -> Response:
        return scored(req, req.top_n)

    @app.get("/health", response_model=HealthResponse,
             responses={503: {"model": HealthResponse}})
    async def health() -> JSONResponse:
        h = state.health()
        body = HealthResponse(status="ready" if h.ready else "starting",
                              model_version=h.model_version,
                              examples_learned=h.examples_learned, users=h.users,
                              lag_records=h.lag_records, staleness_seconds=h.staleness_seconds,
                              updates_applied=h.updates_applied)
        return JSONResponse(body.model_dump(), status_code=200 if h.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return _measured(_limited(app, settings.max_request_bytes), metrics)


def _limited(app: ASGIApp, max_bytes: int) -> ASGIApp:
    """Refuse a body over ``max_bytes`` (413) before it is read, and one of no
    stated length (411): a request must say how much it sends."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            problem: tuple[int, str] | None = None
            if length is None:
                problem = 411, "a Content-Length header is needed"
            elif not length.isdigit():
                problem = 400, "the Content-Length header is not a number"
            elif int(length) > max_bytes:
                problem = 413, f"the body is {int(length)} bytes; at most {max_bytes}"
            if problem is not None:
                await JSONResponse({"detail": problem[1]}, status_code=problem[0])(
                    scope, receive, send)
                return
        await app(scope, receive, send)

    return limited


def _measured(app: ASGIApp, metrics: ServingMetrics) -> ASGIApp:
    """Count every request by endpoint and status, and time it."""

    async def measured(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        code = 500

        async def sending(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await app(scope, receive, sending)
        finally:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            metrics.requests.labels(endpoint, str(code)).inc()

    return measured


__all__ = ["ENDPOINTS", "HealthResponse", "RankRequest", "ScoreRequest", "ScoreResponse",
           "create_app"]
