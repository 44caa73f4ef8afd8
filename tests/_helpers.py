"""Helpers every test module shares: dead pids, bounded waits, back-dating, processes.

One home each (issue 14): a test that needs a pid nobody has, a bounded poll,
an old file or a multiprocessing context takes it from here.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

from htmlgraph import _platform

if sys.platform == "linux":

    def mp_context() -> multiprocessing.context.ForkContext:
        """Fork where it is the native, cheap choice (Linux)."""
        return multiprocessing.get_context("fork")

else:

    def mp_context() -> multiprocessing.context.SpawnContext:
        """Spawn where fork is not the native choice (macOS, Windows)."""
        return multiprocessing.get_context("spawn")


def dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped (free right now)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(timeout=60) == 0
    assert not _platform.pid_exists(proc.pid)
    return proc.pid


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate()`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def age(path: str | os.PathLike[str], hours: float) -> None:
    """Back-date ``path``'s access and modification times by ``hours`` (no symlink follow)."""
    then = time.time() - hours * 3600
    os.utime(path, (then, then), follow_symlinks=False)


def cheap_context(preload: str) -> BaseContext:
    """Children without fork's inherited state; a forkserver preloading ``preload`` keeps
    many starts cheap (spawn where there is no forkserver)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([preload])
        return context
    return multiprocessing.get_context("spawn")


def new_process(ctx: BaseContext, target: Callable[..., None], *args: object) -> BaseProcess:
    """Create (not start) a process in ``ctx``."""
    # typeshed declares Process on each concrete context class, not on BaseContext.
    proc: BaseProcess = ctx.Process(target=target, args=args)  # type: ignore[attr-defined]
    return proc
