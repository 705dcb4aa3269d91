"""Input validation against JSON Schemas: the very schemas the OpenAPI spec publishes.

Pure functions over parsed JSON; the HTTP layer calls them and turns errors into 422 answers.

Almost every request is valid, and jsonschema took 22-31 us to say so, 30-60 under load (the
gateway and the service both check each request: 6-12% of a core at 1,000 orders/s). So each
schema is also compiled into a plain predicate (`compile_predicate`), exact for the keywords
our schemas use; jsonschema runs only to explain a rejection. A schema with any other keyword
is left to jsonschema alone.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final

from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators

from services.common.problems import FieldError

Schema = Mapping[str, Any]

MAX_AMOUNT: Final = 10**15
MAX_DESCRIPTION: Final = 1000


def _is_integer(value: Any) -> bool:
    """JSON Schema's "integer" admits 1.0; money must be a JSON integer literal, so floats are
    out (and so are booleans, which Python counts as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


_STRICT_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, value: _is_integer(value)
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
    if kind == "pattern":
        return f"must match {error.validator_value}"
    if kind == "format":
        return f"must be a valid {error.validator_value}"
    if kind == "enum":
        allowed: Any = error.validator_value
        return f"must be one of {', '.join(map(str, allowed))}"
    return str(error.message)


Predicate = Callable[[Any], bool]

# A UUID as ids are written: 8-4-4-4-12 hex digits, either case. `uuid.UUID`, and jsonschema's
# "uuid" format which calls it, also take braces, a `urn:uuid:` prefix, missing or extra
# hyphens and trailing hyphens ("…-117a4cf787ed-" named the same account as without them).
_CANONICAL_UUID: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def is_canonical_uuid(text: str) -> bool:
    return _CANONICAL_UUID.fullmatch(text) is not None


# The format checker every schema is checked with: jsonschema's, with "uuid" held to the
# canonical form (for strings only: a format asserts nothing about other types).
FORMAT_CHECKER: Final = FormatChecker()
FORMAT_CHECKER.checks("uuid")(lambda value: not isinstance(value, str) or is_canonical_uuid(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Keywords that say nothing about validity.
_ANNOTATIONS: Final = frozenset({"description", "examples", "default", "title", "$comment"})
# JSON types as StrictValidator sees them (`_STRICT_TYPES`).
_TYPES: Final[Mapping[str, Predicate]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def compile_predicate(schema: Schema) -> Predicate | None:
    """`schema` as a predicate that is true exactly when jsonschema (StrictValidator, with the
    format checker) finds no error; None when it uses a keyword the predicate does not know."""
    if not isinstance(schema, Mapping):  # a boolean schema
        return None
    checks = []
    for keyword, value in schema.items():
        if keyword not in _ANNOTATIONS:
            check = _keyword(keyword, value, schema)
            if check is None:
                return None
            checks.append(check)
    return checks[0] if len(checks) == 1 else _all_of(checks)


def _all_of(checks: list[Predicate]) -> Predicate:
    # Plain loops here and below: `all()` over a generator made the whole check 50% slower.
    def accepts(instance: Any) -> bool:
        for check in checks:  # noqa: SIM110 (see above)
            if not check(instance):
                return False
        return True

    return accepts


def _keyword(keyword: str, value: Any, schema: Schema) -> Predicate | None:
    """One keyword's check. As in JSON Schema, each applies only to instances of its JSON type:
    `minimum` passes a string, `required` passes a number."""
    if keyword == "type":
        names = [value] if isinstance(value, str) else list(value)
        if not all(name in _TYPES for name in names):
            return None
        tests = [_TYPES[name] for name in names]
        return tests[0] if len(tests) == 1 else lambda v: any(test(v) for test in tests)
    if keyword == "enum" and all(isinstance(e, str) or e is None for e in value):
        # With str and None only, Python's == is JSON's equality (with numbers, True == 1).
        allowed = list(value)
        return lambda v: v in allowed
    if keyword == "minimum":
        return lambda v: not (_is_number(v) and v < value)
    if keyword == "maximum":
        return lambda v: not (_is_number(v) and v > value)
    if keyword == "minLength":
        return lambda v: not (isinstance(v, str) and len(v) < value)
    if keyword == "maxLength":
        return lambda v: not (isinstance(v, str) and len(v) > value)
    if keyword == "format":
        return _format(value)
    if keyword == "required":
        return lambda v: not isinstance(v, dict) or all(name in v for name in value)
    if keyword == "properties":
        return _properties(value)
    if keyword == "additionalProperties" and value is False:
        known = frozenset(schema.get("properties", ()))
        return lambda v: not isinstance(v, dict) or known.issuperset(v)
    return None


def _format(name: str) -> Predicate:
    """The format checker's own function for `name`, without the dispatch of `conforms`."""
    known = FORMAT_CHECKER.checkers.get(name)
    if known is None:
        return lambda v: True  # a format the checker does not know asserts nothing
    func, raises = known

    def conforms(v: Any) -> bool:
        try:
            return bool(func(v))
        except raises:
            return False

    return conforms


def _properties(schemas: Mapping[str, Schema]) -> Predicate | None:
    subs: list[tuple[str, Predicate]] = []
    for name, schema in schemas.items():
        sub = compile_predicate(schema)
        if sub is None:
            return None
        subs.append((name, sub))

    def properties(v: Any) -> bool:
        if isinstance(v, dict):
            for name, sub in subs:
                if name in v and not sub(v[name]):
                    return False
        return True

    return properties


# Building a validator costs far more than running it; schemas are long-lived constants.
_validators: dict[int, tuple[Schema, Any, Predicate | None]] = {}


def _validator_for(schema: Schema) -> tuple[Any, Predicate | None]:
    cached = _validators.get(id(schema))
    if cached is None or cached[0] is not schema:
        validator = StrictValidator(schema, format_checker=FORMAT_CHECKER)
        cached = _validators[id(schema)] = (schema, validator, compile_predicate(schema))
    return cached[1], cached[2]


def check(schema: Schema, instance: Any) -> list[FieldError]:
    """Every way `instance` breaks `schema`, one error per field, in field order."""
    validator, accepts = _validator_for(schema)
    if accepts is not None and accepts(instance):
        return []
    errors: dict[str, FieldError] = {}
    for error in validator.iter_errors(instance):
        for name in _field_of(error):
            errors.setdefault(name, FieldError(name, _message_of(error)))
    return [errors[name] for name in sorted(errors)]


def parse_uuid(name: str, text: str) -> uuid.UUID | FieldError:
    """A UUID in its canonical 8-4-4-4-12 form from a path or query string, or the error."""
    if is_canonical_uuid(text):
        return uuid.UUID(text)
    return FieldError(name, "must be a valid uuid")
