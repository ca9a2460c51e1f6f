"""Validate a response body against OpenAI's published schemas, vendored in tests/openai_openapi/.

`assert_valid(body, "CreateChatCompletionResponse")` checks a decoded JSON body against that
component schema of OpenAI's OpenAPI document (3.1, so JSON Schema 2020-12), resolving its
`#/components/schemas/...` refs inside the extract, and fails naming every place the body breaks
the schema. Any schema in the extract can be named: see `SCHEMA_NAMES`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

EXTRACT = Path(__file__).parent / "openai_openapi" / "schemas.json"

# The most failures a message lists; past that the first ones say enough.
_SHOWN = 10


@functools.cache
def _components() -> dict[str, Any]:
    """The extract's `components`, with OpenAPI 3.0's `nullable` spelt as JSON Schema says it
    (a few of the document's schemas still use it, which a 2020-12 validator would ignore)."""
    components: dict[str, Any] = json.loads(EXTRACT.read_text())["components"]
    return {"schemas": {k: _nullable(v) for k, v in components["schemas"].items()}}


def _nullable(node: Any) -> Any:
    """`{..., nullable: true}` as `{anyOf: [{...}, {type: null}]}`, at any depth."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    converted = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


SCHEMA_NAMES: frozenset[str] = frozenset(_components()["schemas"])


@functools.cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    if schema_name not in SCHEMA_NAMES:
        raise KeyError(f"{schema_name!r} is not in {EXTRACT.name}; see extract.py's ROOTS")
    schema = {
        "$ref": f"#/components/schemas/{schema_name}",
        "components": _components(),
    }
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(instance: Any, schema_name: str) -> list[ValidationError]:
    """Where `instance` breaks component schema `schema_name`, most relevant first."""
    found = _validator(schema_name).iter_errors(instance)
    return sorted(found, key=jsonschema.exceptions.relevance, reverse=True)


def assert_valid(instance: Any, schema_name: str) -> None:
    """Fail, saying where and why, unless `instance` is valid against `schema_name`."""
    found = errors(instance, schema_name)
    if not found:
        return
    lines = [f"not a valid {schema_name} ({len(found)} errors):"]
    for error in found[:_SHOWN]:
        lines.append(f"  at {error.json_path}: {_why(error)}")
    lines.append(f"instance: {json.dumps(instance)[:2000]}")
    raise AssertionError("\n".join(lines))


def _why(error: ValidationError) -> str:
    """The error's message; for a failed anyOf/oneOf, the best-matching branch's reason too."""
    if error.context:
        best = jsonschema.exceptions.best_match(error.context)
        return f"{error.message[:200]} (closest: at {best.json_path}: {best.message[:200]})"
    return error.message[:300]
