"""RFC 9457 problem details: the one shape of every error answer, and the errors that make it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

PROBLEM_MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True)
class FieldError:
    """One invalid input field and why."""

    field: str
    message: str


@dataclass
class Problem(Exception):
    """An error answer. Raise it anywhere in a handler; the app turns it into problem+json."""

    status: int
    title: str
    detail: str
    slug: str = "about:blank"
    errors: Sequence[FieldError] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.slug if self.slug == "about:blank" else f"/problems/{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = [{"field": e.field, "message": e.message} for e in self.errors]
        body.update(self.extra)
        return body

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = dict(self.headers)
        if request_id:
            headers["X-Request-ID"] = request_id
        return JSONResponse(
            self.to_json(), status_code=self.status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
        )


def validation_failed(errors: Sequence[FieldError]) -> Problem:
    fields = ", ".join(sorted({e.field for e in errors}))
    return Problem(422, "Validation failed", f"Invalid input: {fields}.", "validation", errors)


def malformed_json(detail: str) -> Problem:
    return Problem(400, "Malformed JSON", detail, "malformed-json")


def unsupported_media_type(got: str) -> Problem:
    return Problem(
        415,
        "Unsupported media type",
        f"Expected application/json, got {got!r}.",
        "unsupported-media-type",
    )


def payload_too_large(limit: int) -> Problem:
    return Problem(413, "Payload too large", f"Bodies are limited to {limit} bytes.", "too-large")


def idempotency_key_reused(what: str, key: str) -> Problem:
    """A request sent with the `Idempotency-Key` of an earlier one, but not the same request."""
    return Problem(
        422,
        "Idempotency key reused",
        f"Idempotency-Key {key!r} was sent before with another {what}; a retry must send the"
        " same request, and a new request a new key.",
        "idempotency-key-reused",
        [FieldError("Idempotency-Key", f"names another {what}")],
    )


def not_found(what: str, ident: object) -> Problem:
    return Problem(404, f"{what} not found", f"No {what.lower()} with id {ident}.", "not-found")


def service_unavailable(detail: str, retry_after: int = 1) -> Problem:
    return Problem(
        503, "Service unavailable", detail, "unavailable", headers={"Retry-After": str(retry_after)}
    )
