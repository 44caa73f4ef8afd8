"""Shared fixtures (shared plain helpers live in ``_helpers.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess

import pytest


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Run the test with umask 0o022; it may set another (``umask(0o077)``). Restored after."""
    original = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(original)


@pytest.fixture
def reap() -> Iterator[list[BaseProcess]]:
    """Collect started processes; kill any still alive when the test ends (pass or fail)."""
    procs: list[BaseProcess] = []
    yield procs
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
