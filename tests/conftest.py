"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Run the test with umask 022 and restore the previous umask afterwards."""
    old = os.umask(0o022)
    try:
        yield None
    finally:
        os.umask(old)
