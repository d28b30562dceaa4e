"""Test modules import shared helpers from tests/support/ (or take fixtures from tests/conftest.py), never from
one another: a test module is a list of tests, and a helper that lives in one is hard to find from the others."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[str]:
    """The `tests.test_*` modules that `source` imports, in any of the forms Python allows."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            found.append(node.module)
            if node.module == "tests":  # `from tests import test_x`
                found += [f"tests.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # `from .test_x import y`, `from . import test_x`
            found += [f"tests.{name}" for name in [node.module or "", *(a.name for a in node.names)] if name]
    return [name for name in found if name.startswith("tests.test_")]


def test_every_import_form_of_a_test_module_is_found() -> None:
    source = "\n".join([
        "from tests.test_engine import make_adapter",
        "import tests.test_api",
        "from tests import test_drain, support",
        "from .test_limits import KEY_FILE",
        "def f():\n    from tests.test_tokenizer import write_llama3",
        "from tests.support.engines import make_adapter",
        "import tests.support.servers",
    ])
    assert imported_test_modules(source) == [
        "tests.test_engine", "tests.test_api", "tests.test_drain", "tests.test_limits", "tests.test_tokenizer",
    ]


def test_no_module_under_tests_imports_a_test_module() -> None:
    offenders = {
        str(path.relative_to(TESTS)): modules
        for path in sorted(TESTS.rglob("*.py"))
        if (modules := imported_test_modules(path.read_text()))
    }
    assert offenders == {}, f"move what these import into tests/support/ (fixtures: tests/conftest.py): {offenders}"
