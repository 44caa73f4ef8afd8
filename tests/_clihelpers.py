"""Helpers for tests/test_cli.py that child processes import by name.

Kept free of pytest so that ``htmlgraph check --writer _clihelpers:...`` and
spawned multiprocessing children import it cheaply.
"""

from __future__ import annotations

import time


def inplace_writer(path: str, data: bytes) -> None:
    """A deliberately broken writer: truncates and rewrites the target in place.

    The pause between the two halves makes the window in which a reader (or a
    kill) sees a truncated file wide enough to be hit in a short run.
    """
    half = len(data) // 2
    with open(path, "wb") as f:
        f.write(data[:half])
        f.flush()
        time.sleep(0.0005)
        f.write(data[half:])


def raising_writer(path: str, data: bytes) -> None:
    """A writer that always fails: the check must report it, not crash."""
    raise OSError(28, "No space left on device (simulated)", path)
