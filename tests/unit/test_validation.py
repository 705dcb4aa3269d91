"""The compiled predicates that accept valid requests without jsonschema must agree with
jsonschema on every instance, valid or not, for every schema the services declare."""

from __future__ import annotations

import json
import uuid
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from services.common import validation
from services.common.api import Endpoint
from services.common.problems import FieldError
from services.common.validation import Schema
from services.orders import app as orders
from services.payments import app as payments


def declared_schemas(endpoints: list[Endpoint]) -> list[Schema]:
    schemas: list[Schema] = []
    for endpoint in endpoints:
        if endpoint.body is not None:
            schemas.append(endpoint.body)
        schemas.extend(endpoint.path_params.values())
        schemas.extend(endpoint.query.values())
    return schemas


SCHEMAS = declared_schemas(orders.ENDPOINTS + payments.ENDPOINTS)


def jsonschema_accepts(schema: Schema, instance: Any) -> bool:
    return bool(
        validation.StrictValidator(schema, format_checker=validation.FORMAT_CHECKER).is_valid(
            instance
        )
    )


def names_in(schema: Schema) -> list[str]:
    return sorted(schema.get("properties", {}))


GOOD_UUID = "0190f7a4-5b6c-7d8e-9f00-112233445566"
UUID_LIKE = [
    GOOD_UUID,
    GOOD_UUID.upper(),
    GOOD_UUID.replace("-", ""),
    "{" + GOOD_UUID + "}",
    "urn:uuid:" + GOOD_UUID,
    GOOD_UUID[:-1],
    GOOD_UUID.replace("-", "_"),
    GOOD_UUID + "-",
    GOOD_UUID[:23] + "-" + GOOD_UUID[23:],
    GOOD_UUID[:-1] + "\u0661",  # ARABIC-INDIC DIGIT ONE: int() reads it as 1
    GOOD_UUID + "\n",
]
ODD_VALUES: list[Any] = [
    0,
    1,
    1.0,
    1.5,
    -1,
    float("nan"),
    float("inf"),
    True,
    False,
    None,
    "",
    "10",
    [],
    {},
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
# Schemas beyond the declared ones, for keywords that apply whatever the instance's type.
KEYWORD_SCHEMAS: list[Schema] = [
    {"minimum": 1, "maximum": 10},
    {"minLength": 2, "maxLength": 3},
    {"type": ["integer", "null"]},
    {"type": "number", "minimum": 0.5},
    {"enum": ["a", None]},
    {"format": "uuid"},
    {"required": ["a"], "properties": {"a": {"type": "boolean"}}},
    {"type": "object", "additionalProperties": False},
]


def edges(schema: Schema) -> list[Any]:
    """Values at and around every edge `schema` draws, of the right type and of others."""
    values: list[Any] = list(ODD_VALUES)
    if schema.get("format") == "uuid":
        values += UUID_LIKE
    for key in ("minimum", "maximum"):
        if key in schema:
            edge = schema[key]
            values += [edge - 1, edge, edge + 1, float(edge), edge + 0.5]
    for key in ("minLength", "maxLength"):
        if key in schema:
            n = schema[key]
            values += ["x" * max(n - 1, 0), "x" * n, "x" * (n + 1), "\U0001f600" * n]
    for value in schema.get("enum", ()):
        values += [value, value.upper() if isinstance(value, str) else value]
    return values


def values_for(schema: Schema) -> st.SearchStrategy[Any]:
    return st.sampled_from(edges(schema)) | JSON_VALUES


@st.composite
def instances(draw: st.DrawFn, schema: Schema) -> Any:
    """Mostly the schema's own edges; for an object, its fields (most of the time each one,
    at its edges) and now and then an undeclared one; sometimes any JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    properties = schema.get("properties")
    if not properties:
        return draw(values_for(schema))
    fields = {
        name: draw(values_for(sub))
        for name, sub in sorted(properties.items())
        if draw(st.integers(0, 5))
    }
    if draw(st.integers(0, 4)) == 0:
        fields[draw(st.sampled_from(["extra", "USER_ID", ""]))] = draw(JSON_VALUES)
    return fields


@pytest.mark.parametrize(
    "schema", SCHEMAS + KEYWORD_SCHEMAS, ids=lambda s: json.dumps(s, sort_keys=True)[:60]
)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_compiled_predicate_agrees_with_jsonschema(schema: Schema, data: st.DataObject) -> None:
    accepts = validation.compile_predicate(schema)
    assert accepts is not None  # every declared schema is served by the fast path
    instance = data.draw(instances(schema))
    assert accepts(instance) == jsonschema_accepts(schema, instance), instance


def test_valid_instances_come_up_in_the_agreement_test() -> None:
    # The agreement above means little if every drawn instance were invalid: the order body,
    # built right, passes both, and each of its fields alone can break it.
    body = next(s for s in SCHEMAS if names_in(s) == ["amount", "description", "user_id"])
    good = {"user_id": str(uuid.uuid4()), "amount": 1, "description": ""}
    accepts = validation.compile_predicate(body)
    assert accepts is not None and accepts(good) and jsonschema_accepts(body, good)
    for field, bad in (("user_id", GOOD_UUID[:-1]), ("amount", 1.0), ("description", None)):
        assert not accepts({**good, field: bad})
    assert not accepts({**good, "extra": 1})
    assert not accepts({k: v for k, v in good.items() if k != "amount"})


def test_a_schema_with_a_keyword_it_does_not_know_is_left_to_jsonschema() -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}}
    assert validation.compile_predicate(schema) is None
    assert validation.check(schema, {"code": "abc"}) == [FieldError("code", "must match ^[A-Z]+$")]
    assert validation.check(schema, {"code": "ABC"}) == []


def test_a_rejected_instance_still_gets_every_error_from_jsonschema() -> None:
    body = next(s for s in SCHEMAS if names_in(s) == ["amount", "description", "user_id"])
    errors = validation.check(body, {"amount": 1.5, "user_id": "nope", "x": 1})
    assert [(e.field, e.message) for e in errors] == [
        ("amount", "must be of type integer"),
        ("description", "is required"),
        ("user_id", "must be a valid uuid"),
        ("x", "unknown field"),
    ]


@pytest.mark.parametrize("text", UUID_LIKE[2:])
def test_an_id_is_taken_only_in_its_canonical_form(text: str) -> None:
    # uuid.UUID, and jsonschema's "uuid" format with it, read most of these as GOOD_UUID: an
    # account id with a trailing hyphen topped the account up.
    assert validation.check(validation.UUID_SCHEMA, text) == [
        FieldError("body", "must be a valid uuid")
    ]
    assert isinstance(validation.parse_uuid("id", text), FieldError)


@pytest.mark.parametrize("text", UUID_LIKE[:2])
def test_a_canonical_id_is_taken_in_either_case(text: str) -> None:
    assert validation.check(validation.UUID_SCHEMA, text) == []
    assert validation.parse_uuid("id", text) == uuid.UUID(GOOD_UUID)
