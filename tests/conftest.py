"""Shared fixtures (shared plain helpers live in ``_helpers.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Run the test with umask 0o022; it may set another (``umask(0o077)``). Restored after."""
    original = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(original)
