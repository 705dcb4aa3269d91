"""Input validation against JSON Schemas: the very schemas the OpenAPI spec publishes.

Pure functions over parsed JSON; the HTTP layer calls them and turns errors into 422 answers.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Final

from jsonschema import Draft202012Validator, ValidationError, validators

from services.common.problems import FieldError

Schema = Mapping[str, Any]

MAX_AMOUNT: Final = 10**15
MAX_DESCRIPTION: Final = 1000

# JSON Schema's "integer" admits 1.0; money must be a JSON integer literal, so floats are out.
_STRICT_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
)
StrictValidator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, type_checker=_STRICT_TYPES
)

UUID_SCHEMA: Final[Schema] = {
    "type": "string",
    "format": "uuid",
    "examples": ["0190f7a4-5b6c-7d8e-9f00-112233445566"],
}
AMOUNT_SCHEMA: Final[Schema] = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_AMOUNT,
    "description": "Minor units (kopecks, cents): a positive JSON integer.",
    "examples": [10000],
}


def _field_of(error: ValidationError) -> list[str]:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required":
        missing = str(error.message).split("'")[1] if "'" in error.message else ""
        return [f"{path}.{missing}" if path else missing]
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        schema: Any = error.schema
        instance: Any = error.instance
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        return [f"{path}.{name}" if path else name for name in extra] or [path or "body"]
    return [path or "body"]


def _message_of(error: ValidationError) -> str:
    kind = error.validator
    if kind == "required":
        return "is required"
    if kind in ("additionalProperties", "unevaluatedProperties"):
        return "unknown field"
    if kind == "type":
        return f"must be of type {error.validator_value}"
    if kind == "minimum":
        return f"must be at least {error.validator_value}"
    if kind == "maximum":
        return f"must be at most {error.validator_value}"
    if kind == "maxLength":
        return f"must be at most {error.validator_value} characters"
    if kind == "minLength":
        return f"must be at least {error.validator_value} characters"
    if kind == "format":
        return f"must be a valid {error.validator_value}"
    if kind == "enum":
        allowed: Any = error.validator_value
        return f"must be one of {', '.join(map(str, allowed))}"
    return str(error.message)


# Building a validator costs far more than running it; schemas are long-lived constants.
_validators: dict[int, tuple[Schema, Any]] = {}


def _validator_for(schema: Schema) -> Any:
    cached = _validators.get(id(schema))
    if cached is None or cached[0] is not schema:
        validator = StrictValidator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        cached = _validators[id(schema)] = (schema, validator)
    return cached[1]


def check(schema: Schema, instance: Any) -> list[FieldError]:
    """Every way `instance` breaks `schema`, one error per field, in field order."""
    validator = _validator_for(schema)
    errors: dict[str, FieldError] = {}
    for error in validator.iter_errors(instance):
        for name in _field_of(error):
            errors.setdefault(name, FieldError(name, _message_of(error)))
    return [errors[name] for name in sorted(errors)]


def parse_uuid(name: str, text: str) -> uuid.UUID | FieldError:
    """A UUID in its canonical 8-4-4-4-12 form from a path or query string, or the error."""
    try:
        parsed = uuid.UUID(text)
        if str(parsed) == text.lower():
            return parsed
    except ValueError:
        pass
    return FieldError(name, "must be a valid uuid")
