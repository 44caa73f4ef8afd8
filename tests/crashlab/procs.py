"""Start child processes quickly and safely for the crash tests.

``fork`` from a pytest process is fast but unsafe when another thread exists
(a lock held at fork time stays held in the child; Python 3.12+ warns, and the
suite turns warnings into errors). The ``forkserver`` start method forks from a
small single-threaded server instead, and with the library preloaded there a
child starts in milliseconds - short enough for kills to land inside writes.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from multiprocessing.process import BaseProcess

_PRELOAD = ["htmlgraph", "crashlab.children", "crashlab.killloop"]


def start_process(target: Callable[..., None], *args: object) -> BaseProcess:
    """Start ``target(*args)`` in a child from a preloaded fork server (POSIX only)."""
    if sys.platform == "win32":
        raise RuntimeError("no fork server on Windows")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    proc = ctx.Process(target=target, args=args)
    proc.start()
    return proc
