"""Fixtures shared by every test module (shared helpers live in plain modules such as
``tiny.py``, so that test files never import a conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (2 contended threads are ~10x slower here);
    tests that need more threads set them inside the test."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
