"""Validate our JSON against OpenAI's own published schemas (`shared/specs/openai-openapi.json`).

`assert_valid(body, "CreateChatCompletionResponse")` checks `body` against
`#/components/schemas/CreateChatCompletionResponse`, resolving every internal `$ref` through a
`referencing.Registry` holding the whole document.

Two adjustments to the document, both to make the published spec say what the API actually does:

* A few schemas still carry OpenAPI 3.0's `"nullable": true`, which JSON Schema 2020-12 ignores (so e.g.
  a chat chunk's `"finish_reason": null` or `"usage": null` would be rejected). Each such schema `S`
  becomes `{"anyOf": [S, {"type": "null"}]}`, which is what `nullable` means.
* The spec describes streamed completions with `CreateCompletionResponse` ("both the streamed and
  non-streamed response objects share the same shape") but types `finish_reason` as a non-null string
  and `usage` as a non-null object, while a streamed chunk carries `"finish_reason": null` until its
  choice's last, and, with `stream_options.include_usage`, `"usage": null` on all chunks but the final
  one (so say the `stream_options` docs; the real API and the `openai` SDK behave so).
  `CreateCompletionStreamResponse` - our name, not OpenAI's - is `CreateCompletionResponse` with just
  those two fields made nullable; use it for completion chunks.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_URI = "https://lorahive.invalid/openai-openapi.json"
_HERE = Path(__file__).resolve()
_CANDIDATES = [
    _HERE.parents[1] / "shared" / "specs" / "openai-openapi.json",
    _HERE.parents[2] / "shared" / "specs" / "openai-openapi.json",
]


def spec_path() -> Path:
    for path in _CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError(f"OpenAI's OpenAPI document not found; looked in {[str(p) for p in _CANDIDATES]}")


def _nullable_to_anyof(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_to_anyof(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _nullable_to_anyof(value) for key, value in node.items()}
    if converted.get("nullable") is True:
        del converted["nullable"]
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@cache
def _registry() -> Registry:
    document = _nullable_to_anyof(json.loads(spec_path().read_text()))
    schemas = document["components"]["schemas"]
    stream = copy.deepcopy(schemas["CreateCompletionResponse"])
    choice = stream["properties"]["choices"]["items"]
    for properties, name in ((choice["properties"], "finish_reason"), (stream["properties"], "usage")):
        properties[name] = {"anyOf": [properties[name], {"type": "null"}]}
    schemas["CreateCompletionStreamResponse"] = stream
    return Registry().with_resource(_URI, Resource.from_contents(document, default_specification=DRAFT202012))


@cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    registry = _registry()
    if schema_name not in registry.contents(_URI)["components"]["schemas"]:
        raise KeyError(f"no schema named {schema_name!r} in {spec_path()}")
    return jsonschema.Draft202012Validator(
        {"$ref": f"{_URI}#/components/schemas/{schema_name}"}, registry=registry
    )


def assert_valid(instance: Any, schema_name: str) -> None:
    """Raise AssertionError, listing every violation, unless `instance` matches the named schema."""
    errors = sorted(_validator(schema_name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors]
        raise AssertionError(
            f"not a valid {schema_name}:\n" + "\n".join(lines) + f"\n{json.dumps(instance)[:2000]}"
        )
