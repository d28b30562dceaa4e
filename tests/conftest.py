"""Fixtures shared by every suite: a reproducible torch generator, and `gpu` tests skipped without CUDA."""

from __future__ import annotations

import zlib

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test's id: every test gets its own stream, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
