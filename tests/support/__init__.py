"""Helpers shared by the test modules: each module here is named for what it holds. Test modules import from
here, never from one another (tests/test_support_imports.py holds them to it)."""
