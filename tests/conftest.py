"""Shared fixtures (shared plain helpers live in ``_helpers.py``)."""

from __future__ import annotations

import compileall
import os
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

import htmlgraph


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the package and the test helpers once, before any child starts.

    Hundreds of tests start a fresh interpreter (the CLI, the crash lab's
    children) that imports the package. Where ``PYTHONDONTWRITEBYTECODE``
    is set, as on some CI machines, nothing caches the compiled modules, so
    every child compiles them again: 60-80 ms a child, 10 s of the quick
    suite here. Writing the ``__pycache__`` files once is what an ordinary
    import would have done.
    """
    for directory in (Path(htmlgraph.__file__).parent, Path(__file__).parent):
        compileall.compile_dir(directory, quiet=1)


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
