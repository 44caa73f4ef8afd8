"""The lock contenders: htmlgraph's DirectoryLocker and its peers, built one way.

:func:`make_lock` gives every library the same shape (shared and exclusive
acquire/release callables), used the way that library's docs show, with its
default polling policy. The timing runs (``locks``) and the syscall traces
(``strace_peers``) build their locks here, so what is traced is what is timed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks._common import importable, ours

Acquire = Callable[[], object]


@dataclass(frozen=True)
class LockPair:
    """Shared and exclusive acquire/release for one library."""

    acquire_shared: Acquire
    release_shared: Acquire
    acquire_exclusive: Acquire
    release_exclusive: Acquire
    has_shared: bool


def _checked(fn: Callable[..., object], timeout: float) -> Acquire:
    def call() -> None:
        if fn(timeout=timeout) is False:
            raise RuntimeError(f"{fn!r} failed to acquire")

    return call


def make_lock(lib: str, lock_dir: str) -> LockPair:
    """Build library ``lib``'s lock on ``lock_dir`` (a directory it may use)."""
    path = os.path.join(lock_dir, "the.lock")
    if lib == "htmlgraph DirectoryLocker":
        locker = ours("DirectoryLocker")(lock_dir)
        return LockPair(
            _checked(locker.acquire_shared_lock, timeout=120),
            locker.release_lock,
            _checked(locker.acquire_exclusive_lock, timeout=120),
            locker.release_lock,
            True,
        )
    if lib in ("filelock.FileLock", "filelock.SoftFileLock"):
        import filelock

        cls = filelock.FileLock if lib == "filelock.FileLock" else filelock.SoftFileLock
        fl = cls(path)
        return LockPair(fl.acquire, fl.release, fl.acquire, fl.release, False)
    if lib == "fasteners.InterProcessLock":
        import fasteners  # type: ignore[import-untyped]

        ipl = fasteners.InterProcessLock(path)
        return LockPair(ipl.acquire, ipl.release, ipl.acquire, ipl.release, False)
    if lib == "fasteners.InterProcessReaderWriterLock":
        import fasteners

        rw = fasteners.InterProcessReaderWriterLock(path)
        return LockPair(
            rw.acquire_read_lock,
            rw.release_read_lock,
            rw.acquire_write_lock,
            rw.release_write_lock,
            True,
        )
    if lib == "portalocker.Lock":
        import portalocker

        pl = portalocker.Lock(path, timeout=120)
        return LockPair(pl.acquire, pl.release, pl.acquire, pl.release, False)
    if lib == "portalocker.lock(fh)":
        import portalocker

        fh = open(path, "a")  # noqa: SIM115 - held for the lifetime of the benchmark
        return LockPair(
            lambda: portalocker.lock(fh, portalocker.LockFlags.SHARED),
            lambda: portalocker.unlock(fh),
            lambda: portalocker.lock(fh, portalocker.LockFlags.EXCLUSIVE),
            lambda: portalocker.unlock(fh),
            True,
        )
    raise ValueError(lib)


def available_libs() -> list[str]:
    """The lock libraries that can run here (ours first)."""
    libs = []
    if ours("DirectoryLocker") is not None:
        libs.append("htmlgraph DirectoryLocker")
    if importable("filelock"):
        libs += ["filelock.FileLock", "filelock.SoftFileLock"]
    if importable("fasteners"):
        libs += ["fasteners.InterProcessLock", "fasteners.InterProcessReaderWriterLock"]
    if importable("portalocker"):
        libs += ["portalocker.Lock", "portalocker.lock(fh)"]
    return libs


MECHANISM = {
    "floor-marker": "O_EXCL create + close + unlink, bare os calls",
    "floor-flock": "flock(LOCK_EX) + flock(LOCK_UN) on an open fd",
    "htmlgraph DirectoryLocker": "marker files (publish, then scan)",
    "filelock.FileLock": "flock(2), exclusive only",
    "filelock.SoftFileLock": "O_EXCL marker file, exclusive only",
    "fasteners.InterProcessLock": "lockf(3), exclusive only",
    "fasteners.InterProcessReaderWriterLock": "lockf(3) shared/exclusive",
    "portalocker.Lock": "flock(2), opens the file per acquire, exclusive",
    "portalocker.lock(fh)": "flock(2) on a held handle, blocking",
}
