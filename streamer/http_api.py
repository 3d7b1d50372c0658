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
answers 503. With a token set, a /v1 request without ``Authorization: Bearer
<token>`` is refused (401); /health and /metrics stay open to probes and
Prometheus (they hold no user's data).
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any, TypeVar

import msgspec
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from metarec.events import Features, Identifier, UserId
from streamer.config import ServeSettings
from streamer.live_state import LiveState
from streamer.serving_metrics import ServingMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = ("/v1/score", "/v1/rank", "/health", "/metrics")
R = TypeVar("R", bound="ScoreRequest")


# The requests are msgspec structs: decoded and validated in one pass, several times
# cheaper than pydantic, with errors that name the field (``- at `$.items[0].item_id```)
class Item(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A candidate; without features, it is scored with those the model last
    learned it with."""

    item_id: Identifier
    item_features: Features = msgspec.field(default_factory=dict)


class ScoreRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A user (with optional features: else those of their latest event), an
    optional context (platform, page, ...) and the candidates to score."""

    user_id: UserId
    items: Annotated[list[Item], msgspec.Meta(min_length=1)]
    context: Features = msgspec.field(default_factory=dict)
    user_features: Features = msgspec.field(default_factory=dict)


class RankRequest(ScoreRequest, forbid_unknown_fields=True, frozen=True):
    """A score request, and how many of the best to return."""

    top_n: Annotated[int, msgspec.Meta(ge=1)] = 10


EXAMPLE = {"user_id": "196", "context": {"platform": "ios"},
           "items": [{"item_id": "242", "item_features": {"genre": ["Comedy"]}},
                     {"item_id": "302"}]}
_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    ScoreRequest: msgspec.json.Decoder(ScoreRequest),
    RankRequest: msgspec.json.Decoder(RankRequest)}


def decode(kind: type[R], body: bytes) -> R:
    """A request from its body, or a 422 that says what is wrong and where."""
    try:
        found: R = _DECODERS[kind].decode(body)
    except msgspec.MsgspecError as exc:
        raise HTTPException(422, str(exc)) from None
    return found


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
        if len(req.items) > settings.max_candidates:
            raise HTTPException(422, f"{len(req.items)} items: at most "
                                     f"{settings.max_candidates} per request")
        if not state.ready:
            raise HTTPException(503, "not caught up with the topics yet: see /health")
        metrics.candidates.observe(len(req.items))
        candidates = [(it.item_id, it.item_features) for it in req.items]
        s, version = state.score(req.user_id, candidates, context=req.context,
                                 user_features=req.user_features)
        picked = (range(len(candidates)) if top_n is None
                  else np.argsort(-s.p, kind="stable")[:top_n].tolist())
        p = s.p.tolist()
        body = {"user_id": req.user_id, "known": s.known, "labels": s.k,
                "model_version": version,
                "scores": [{"item_id": candidates[i][0], "p": p[i]} for i in picked]}
        return Response(msgspec.json.encode(body), media_type="application/json")

    @app.post("/v1/score", response_model=ScoreResponse, openapi_extra=_body("ScoreRequest"))
    async def score(request: Request) -> Response:
        return scored(decode(ScoreRequest, await request.body()))

    @app.post("/v1/rank", response_model=ScoreResponse, openapi_extra=_body("RankRequest"))
    async def rank(request: Request) -> Response:
        req = decode(RankRequest, await request.body())
        return scored(req, req.top_n)

    @app.get("/health", response_model=HealthResponse,
             responses={503: {"model": HealthResponse}})
    async def health() -> JSONResponse:
        figures = dataclasses.asdict(state.health())
        ready = figures.pop("ready")
        body = HealthResponse(status="ready" if ready else "starting", **figures)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    schema = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the request structs' (msgspec's) among its components."""
        doc = schema()
        _, components = msgspec.json.schema_components(
            [ScoreRequest, RankRequest], ref_template="#/components/schemas/{name}")
        components["ScoreRequest"]["examples"] = [EXAMPLE]
        doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
    token = settings.api_token()
    limited = _limited(app, settings.max_request_bytes)
    return _measured(limited if token is None else _authorised(limited, token), metrics)


def _body(name: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


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


def _authorised(app: ASGIApp, token: str) -> ASGIApp:
    """Refuse a /v1 request that does not carry the bearer token (401), before its
    body is read."""
    expected = f"Bearer {token}".encode()

    async def authorised(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):  # in constant time
                await JSONResponse(
                    {"detail": "a valid bearer token is needed (Authorization: Bearer ...)"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                        scope, receive, send)
                return
        await app(scope, receive, send)

    return authorised


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
