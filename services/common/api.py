"""Endpoints declared once, served and documented from the same declaration.

An `Endpoint` names its path, method, request schema and responses. `build_app` turns a list
of them into a Starlette app that validates every request against those schemas, answers
errors as problem+json, and publishes the same schemas at `/openapi.json` with Swagger UI at
`/swagger/index.html`. Documentation and behaviour cannot drift apart.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from uuid import UUID

import swagger_ui_bundle
from apispec import APISpec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common import fastjson, problems, validation
from services.common.events import rfc3339
from services.common.ids import uuid7
from services.common.problems import FieldError, Problem
from services.common.validation import Schema

log = logging.getLogger(__name__)
access_log = logging.getLogger("access")
# Requests slower than this get an access line even when they succeed.
SLOW_REQUEST_SECONDS = 1.0
# The level of the access line of a request that succeeded in time: DEBUG (not written) unless
# ACCESS_LOG=all.
ROUTINE_ACCESS_LEVEL = (
    logging.INFO if os.environ.get("ACCESS_LOG", "").lower() == "all" else logging.DEBUG
)


def configure_logging() -> None:
    """One log format for every HTTP process: time, logger, message (with the request id)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


MAX_BODY_BYTES = 64 * 1024
REQUEST_ID_HEADER = "X-Request-ID"
# Milliseconds the gateway still waits for this answer when it sent the request (writes only).
BUDGET_HEADER = "X-Request-Budget-Ms"
# A client's name for one write (an order, a top-up), sent again with the request when it
# retries: the service answers the retry with what the first one did, and does it once.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_SCHEMA: Final[Schema] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "pattern": "^[!-~]+$",  # visible ASCII: a UUID, say
}
# On an answer to a request whose Idempotency-Key was seen before: "true".
IDEMPOTENT_REPLAYED_HEADER = "Idempotent-Replayed"


@dataclass(frozen=True)
class Reply:
    """One documented response of an endpoint; `headers`: (name, description, required) of the
    headers it carries (every 503 also carries `Retry-After`, declared for all of them)."""

    description: str
    schema: Schema | None = None
    example: Any = None
    headers: tuple[tuple[str, str, bool], ...] = ()


RETRY_AFTER: Final = ("Retry-After", "Seconds to wait before trying again.", True)


def _declared_headers(status: int, reply: Reply) -> dict[str, Any]:
    """The OpenAPI `headers` of a response."""
    headers = list(reply.headers)
    if status == 503 and RETRY_AFTER not in headers:
        headers.append(RETRY_AFTER)
    return {
        name: {
            "description": description,
            "required": required,
            "schema": {"type": "integer" if name == RETRY_AFTER[0] else "string"},
        }
        for name, description, required in headers
    }


@dataclass(frozen=True)
class Call:
    """A validated request, as a handler sees it."""

    request: Request
    body: Any
    path: Mapping[str, Any]
    query: Mapping[str, Any]
    # The endpoint's declared request headers that were sent, by their declared name.
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return str(self.request.state.request_id)


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """One HTTP operation: what it accepts, what it answers, and the code that does it."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    handler: Handler
    responses: Mapping[int, Reply]
    body: Schema | None = None
    body_required: bool = True
    path_params: Mapping[str, Schema] = field(default_factory=dict)
    query: Mapping[str, Schema] = field(default_factory=dict)
    required_query: frozenset[str] = frozenset()
    # Optional request headers the handler reads (validated, documented, and forwarded by the
    # gateway), by name as documented.
    headers: Mapping[str, Schema] = field(default_factory=dict)
    description: str = ""

    def with_handler(self, handler: Handler) -> Endpoint:
        """The same operation served by other code (the gateway's proxy)."""
        return Endpoint(**{**self.__dict__, "handler": handler})


# Errors every endpoint with a body, or with path ids, can answer; documented everywhere.
PROBLEM_SCHEMA: Schema = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}


_QUERY_INTEGER: Final = re.compile(r"-?[0-9]+")


def _convert_query(name: str, schema: Schema, text: str) -> Any | FieldError:
    """Query strings arrive as text; integers and UUIDs are converted before validation."""
    kind = schema.get("type")
    if kind == "integer":
        # ASCII digits only: int() also takes "1_0", "+5", " 1" and other scripts' digits.
        if not _QUERY_INTEGER.fullmatch(text):
            return FieldError(name, "must be of type integer")
        try:
            return int(text)
        except ValueError:  # more digits than Python converts: far beyond any bound
            return FieldError(name, "must be of type integer")
    if schema.get("format") == "uuid":
        return validation.parse_uuid(name, text)
    return text


# An optional body that was not sent, as opposed to one that was sent as JSON `null`.
ABSENT: Any = object()


async def _read_json(request: Request, required: bool) -> Any:
    """The parsed JSON body, enforcing size, media type and syntax; `ABSENT` when not sent."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise problems.payload_too_large(MAX_BODY_BYTES)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise problems.payload_too_large(MAX_BODY_BYTES)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:  # not sent (whitespace was sent: as JSON it is malformed, below)
        if required:
            raise problems.validation_failed([FieldError("body", "is required")])
        return ABSENT
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise problems.unsupported_media_type(media_type)
    try:
        return fastjson.loads(raw)
    except fastjson.NumberTooLong as exc:  # well-formed, and far above any amount we take
        raise problems.validation_failed([FieldError("body", f"has {exc}")]) from exc
    except fastjson.TooDeep as exc:
        raise problems.malformed_json(f"The body cannot be read: {exc}.") from exc
    except ValueError as exc:  # bad syntax or bad UTF-8
        raise problems.malformed_json(f"The body is not valid JSON: {exc}.") from exc


def _route(endpoint: Endpoint) -> Route:
    async def serve(request: Request) -> Response:
        errors: list[FieldError] = []
        path: dict[str, Any] = {}
        for name, schema in endpoint.path_params.items():
            value = _convert_query(name, schema, request.path_params[name])
            if isinstance(value, FieldError):
                errors.append(value)
            else:
                path[name] = value
        query: dict[str, Any] = {}
        for name, schema in endpoint.query.items():
            text = request.query_params.get(name)
            if text is None:
                if name in endpoint.required_query:
                    errors.append(FieldError(name, "is required"))
                continue
            value = _convert_query(name, schema, text)
            if isinstance(value, FieldError):
                errors.append(value)
                continue
            # A converted UUID is checked as the string it came as (the schema says string).
            checked = str(value) if isinstance(value, UUID) else value
            errors.extend(FieldError(name, e.message) for e in validation.check(schema, checked))
            query[name] = value
        headers: dict[str, str] = {}
        for name, schema in endpoint.headers.items():
            text = request.headers.get(name)
            if text is not None:
                errors.extend(FieldError(name, e.message) for e in validation.check(schema, text))
                headers[name] = text
        if errors:
            raise problems.validation_failed(errors)
        body = None
        if endpoint.body is not None:
            body = await _read_json(request, endpoint.body_required)
            if body is ABSENT:
                body = None
            else:  # whatever was sent is checked, JSON `null` included
                errors.extend(validation.check(endpoint.body, body))
        if errors:
            raise problems.validation_failed(errors)
        call = Call(request=request, body=body, path=path, query=query, headers=headers)
        return await endpoint.handler(call)

    return Route(endpoint.path, serve, methods=[endpoint.method], name=endpoint.operation_id)


def openapi_spec(title: str, description: str, endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `endpoints`, generated with apispec."""
    spec = APISpec(
        title=title, version="1.0.0", openapi_version="3.1.0", info={"description": description}
    )
    spec.components.schema("Problem", dict(PROBLEM_SCHEMA))
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    by_path: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        parameters = (
            [
                {"name": n, "in": "path", "required": True, "schema": dict(s)}
                for n, s in ep.path_params.items()
            ]
            + [
                {"name": n, "in": "query", "required": n in ep.required_query, "schema": dict(s)}
                for n, s in ep.query.items()
            ]
            + [
                {
                    "name": n,
                    "in": "header",
                    "required": False,
                    "schema": {k: v for k, v in s.items() if k != "description"},
                    **({"description": s["description"]} if "description" in s else {}),
                }
                for n, s in ep.headers.items()
            ]
        )
        responses: dict[str, Any] = {}
        for status, reply in sorted(ep.responses.items()):
            media = "application/json" if status < 400 else problems.PROBLEM_MEDIA_TYPE
            content: dict[str, Any] = {}
            if reply.schema is not None or status >= 400:
                content = {media: {"schema": dict(reply.schema) if reply.schema else problem_ref}}
                if reply.example is not None:
                    content[media]["example"] = reply.example
            responses[str(status)] = {"description": reply.description, "content": content}
            if headers := _declared_headers(status, reply):
                responses[str(status)]["headers"] = headers
        operation: dict[str, Any] = {
            "operationId": ep.operation_id,
            "summary": ep.summary,
            "tags": [ep.tag],
            "responses": responses,
        }
        if ep.description:
            operation["description"] = ep.description
        if parameters:
            operation["parameters"] = parameters
        if ep.body is not None:
            operation["requestBody"] = {
                "required": ep.body_required,
                "content": {"application/json": {"schema": dict(ep.body)}},
            }
        by_path.setdefault(ep.path, {})[ep.method.lower()] = operation
    for path, operations in by_path.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


SWAGGER_ASSETS = Path(swagger_ui_bundle.swagger_ui_path)
SWAGGER_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} — Swagger UI</title>
<link rel="stylesheet" href="swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "../openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
</script></body></html>
"""


class RequestContext:
    """Pure-ASGI middleware: assigns `X-Request-ID`, rejects oversized bodies early, counts
    requests and their latency for `/metrics`."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:200] or str(uuid7())
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived"] = started  # time.perf_counter(): a handler can tell how long it took
        status_holder = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                # Replace, not add: a problem answer already carries the id (`Problem.response`).
                message["headers"] = [
                    *(h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            route_path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            self.requests.labels(scope["method"], route_path, str(status_holder[0])).inc()
            self.latency.labels(scope["method"], route_path).observe(elapsed)
            # Every request is counted above; a line is written for the ones worth reading
            # (ACCESS_LOG=all: every one). Two lines per order through a supervisor's pipe were
            # a visible share of the system's CPU under load.
            status = status_holder[0]
            if status >= 400 or elapsed >= SLOW_REQUEST_SECONDS:
                level = logging.WARNING if status >= 500 else logging.INFO
            else:
                level = ROUTINE_ACCESS_LEVEL
            access_log.log(
                level,
                "%s %s %d %.1fms request_id=%s",
                scope["method"],
                scope["path"],
                status_holder[0],
                elapsed * 1000,
                request_id,
            )


ReadinessCheck = Callable[[], Awaitable[None]]


def build_app(
    *,
    title: str,
    description: str,
    endpoints: Sequence[Endpoint],
    readiness: Mapping[str, ReadinessCheck],
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    refresh_metrics: Callable[[CollectorRegistry], Awaitable[None]] | None = None,
    registry: CollectorRegistry | None = None,
    unavailable: tuple[type[BaseException], ...] = (),
) -> Starlette:
    """A service's Starlette app: its endpoints plus health, readiness, metrics and docs.

    Exceptions of the `unavailable` types (a database or service out of reach) become 503
    with `Retry-After`; any other unexpected exception a problem+json 500, never a trace."""
    registry = registry or CollectorRegistry()
    spec = openapi_spec(title, description, endpoints)

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> Response:
        results: dict[str, str] = {}
        for name, check in readiness.items():
            try:
                await check()
                results[name] = "ok"
            except Exception as exc:
                results[name] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
        down = sorted(name for name, result in results.items() if result != "ok")
        if not down:
            return JSONResponse({"status": "ready", "checks": results})
        # An error answer like every other: problem+json, the checks as an extension member.
        return problems.Problem(
            503,
            "Not ready",
            f"Unavailable: {', '.join(down)}.",
            "unavailable",
            headers={"Retry-After": "1"},
            extra={"checks": results},
        ).response()

    async def metrics(_: Request) -> Response:
        if refresh_metrics is not None:
            await refresh_metrics(registry)
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(_: Request) -> Response:
        return JSONResponse(spec)

    async def swagger_index(_: Request) -> Response:
        return HTMLResponse(SWAGGER_INDEX.format(title=title))

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return exc.response(getattr(request.state, "request_id", None))

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("dependency unavailable: %s: %s", type(exc).__name__, exc)
        problem = problems.service_unavailable(
            "A service this request needs is unreachable; retry shortly."
        )
        return problem.response(getattr(request.state, "request_id", None))

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        problem = Problem(500, "Internal error", "The request failed; it was logged.", "internal")
        return problem.response(getattr(request.state, "request_id", None))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        titles = {404: "Not found", 405: "Method not allowed"}
        problem = Problem(status, titles.get(status, "HTTP error"), str(getattr(exc, "detail", "")))
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 405:
            # Starlette names the methods of the first route that matched the path only; a path
            # served by several routes (GET and POST /orders) allows all of theirs.
            headers["Allow"] = ", ".join(allowed_methods(request))
        return Problem(problem.status, problem.title, problem.detail, headers=headers).response(
            getattr(request.state, "request_id", None)
        )

    def allowed_methods(request: Request) -> list[str]:
        methods: set[str] = set()
        for route in routes:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= getattr(route, "methods", None) or set()
        return sorted(methods)

    routes = [_route(ep) for ep in endpoints] + [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/swagger/index.html", swagger_index, methods=["GET"]),
        # The page's assets are relative to /swagger/: served at /swagger, it found none.
        Route("/swagger", lambda _: RedirectResponse("swagger/index.html"), methods=["GET"]),
        Route("/swagger/", lambda _: RedirectResponse("index.html"), methods=["GET"]),
        Mount("/swagger", app=StaticFiles(directory=SWAGGER_ASSETS), name="swagger"),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        Problem: on_problem,
        HTTPException: on_http_error,
        Exception: on_error,
    }
    for kind in unavailable:
        handlers[kind] = on_unavailable
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,
        lifespan=lifespan,
        middleware=[Middleware(RequestContext, registry=registry)],
    )
    app.state.openapi = spec
    return app


def _json_default(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def respond(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer; UUIDs become strings and datetimes RFC 3339 UTC."""
    body = fastjson.dumps(data, default=_json_default)
    return Response(body, status_code=status, headers=headers, media_type="application/json")
