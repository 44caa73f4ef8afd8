"""Process targets for tests/test_update.py (module level, so spawned children import them).

Kept free of pytest so that forkserver/spawn children import it cheaply.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier

from htmlgraph import atomic_json_update, atomic_json_write, atomic_update

BARRIER_TIMEOUT = 60.0

# A filter for `htmlgraph update --json -- python -c FILTER ITEM`: append ITEM
# to the "items" list of the JSON object on stdin. jq may be missing.
APPEND_FILTER = (
    "import json, sys\n"
    "d = json.load(sys.stdin)\n"
    "d.setdefault('items', []).append(sys.argv[1])\n"
    "json.dump(d, sys.stdout)\n"
)
# The same shape with a counter: `... -- python -c INCREMENT_FILTER`.
INCREMENT_FILTER = (
    "import json, sys\n"
    "d = json.load(sys.stdin)\n"
    "d['runs'] = d.get('runs', 0) + 1\n"
    "json.dump(d, sys.stdout)\n"
)


def _reset_sigint() -> None:
    # Children rely on the default SIGINT behaviour (the common brief).
    signal.signal(signal.SIGINT, signal.default_int_handler)


def increment(path: str, count: int, barrier: Barrier, pause: float, durable: bool) -> None:
    """Add 1 to ``{"n": ...}`` in ``path`` ``count`` times through atomic_json_update.

    ``pause`` seconds pass between the read and the write of every update,
    inside ``fn``: the window in which an unlocked updater loses updates.
    """
    _reset_sigint()

    def bump(doc: dict[str, int]) -> dict[str, int]:
        time.sleep(pause)
        doc["n"] = doc.get("n", 0) + 1
        return doc

    barrier.wait(BARRIER_TIMEOUT)
    for _ in range(count):
        atomic_json_update(path, bump, default=dict, durable=durable)


def increment_unlocked(
    path: str, count: int, barrier: Barrier, pause: float, durable: bool
) -> None:
    """The negative control: :func:`increment` built from a read and atomic_json_write alone.

    Every write is atomic, so the file is never torn - but nothing stops two
    processes reading the same value: updates are lost.
    """
    _reset_sigint()
    barrier.wait(BARRIER_TIMEOUT)
    for _ in range(count):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        time.sleep(pause)
        doc["n"] = doc.get("n", 0) + 1
        atomic_json_write(path, doc, durable=durable)


def hold_update(path: str, conn: Connection) -> None:
    """Start an update whose ``fn`` reports in and then sleeps (to be SIGKILLed)."""
    _reset_sigint()

    def stall(text: str) -> str:
        conn.send("in")
        time.sleep(120)
        return text + "never\n"

    atomic_update(path, stall)


def increment_forever(path: str, log: str, durable: bool) -> None:
    """Increment ``{"n": ...}`` until killed; append one line to ``log`` after each commit.

    A kill between the commit and the log line makes the file one ahead of
    the log: the test allows one such update per kill.
    """
    _reset_sigint()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def bump(doc: dict[str, int]) -> dict[str, int]:
        doc["n"] = doc.get("n", 0) + 1
        return doc

    while True:
        atomic_json_update(path, bump, default=dict, durable=durable)
        os.write(fd, b"+\n")


def update_as(path: str, uid: int | None, conn: Connection) -> None:
    """Become ``uid`` (if given; needs root and a fork child), try one update, report.

    Sends ``("refused", filename, seconds)`` for a PermissionError, else
    ``("updated", None, seconds)``.
    """
    _reset_sigint()
    if uid is not None and sys.platform != "win32":
        # Codecs load lazily, from an interpreter tree ``uid`` may not read.
        for codec in ("ascii", "utf-8", "latin-1"):
            codecs.lookup(codec)
        os.setgid(uid)
        os.setuid(uid)
    started = time.monotonic()
    try:
        atomic_json_update(path, lambda d: {"n": 1}, timeout=30)
    except PermissionError as exc:
        conn.send(("refused", str(exc.filename), time.monotonic() - started))
        return
    conn.send(("updated", None, time.monotonic() - started))
