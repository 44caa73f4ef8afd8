"""The operating-system specific calls, kept in one place.

Everything that differs between Linux, macOS and Windows lives here so that
:mod:`htmlgraph.atomic_ops` reads platform-free:

* how to make a file's data durable (``fsync``; ``F_FULLFSYNC`` on macOS),
* how to make a directory entry durable (``fsync`` of the directory on POSIX,
  nothing on Windows, where directories cannot be opened for syncing),
* how to replace a file (``os.replace``; on Windows with a short bounded retry
  on sharing violations),
* how to tell whether a process is alive, and when it started (to detect a
  reused pid).

The Windows and macOS branches cannot run on the Linux CI machine; they are
type-checked with ``mypy --platform win32`` / ``--platform darwin`` and unit
tested by simulation (the branch is chosen by the ``IS_WINDOWS`` / ``IS_MACOS``
flags, which tests may patch).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from functools import lru_cache

__all__ = [
    "IS_MACOS",
    "IS_WINDOWS",
    "PID_MAX",
    "current_pid",
    "facts",
    "fsync_dir",
    "fsync_file",
    "hostname",
    "keep_owner",
    "pid_exists",
    "pid_is_zombie",
    "pid_namespace",
    "process_start_token",
    "replace",
    "set_mode",
    "unlink",
    "write_fsync",
    "write_replace",
]

IS_WINDOWS = sys.platform == "win32"
IS_MACOS = sys.platform == "darwin"
# The largest process id there can be: pid_t is a signed 32-bit int on POSIX
# (os.kill raises OverflowError past it); Windows process ids are DWORDs.
PID_MAX = 2**32 - 1 if IS_WINDOWS else 2**31 - 1
# Directory fsync is not supported everywhere (EINVAL on some FUSE, SMB and
# VirtualBox shared folders, atomicwrites#27). There is nothing more a caller
# can do there, so these mean "not supported", not failure, as in SQLite's
# unixSync.
_DIR_FSYNC_UNSUPPORTED = frozenset(
    e for e in (errno.EINVAL, getattr(errno, "ENOTSUP", None), errno.EOPNOTSUPP) if e is not None
)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)

# Windows: a replace that races an open handle on the target fails with
# ERROR_ACCESS_DENIED (5) or ERROR_SHARING_VIOLATION (32) surfacing as
# PermissionError (Eryk Sun on bpo-46003). Retry briefly; never on POSIX, where
# EACCES is a real permission problem.
_WINDOWS_REPLACE_ATTEMPTS = 10
_WINDOWS_REPLACE_FIRST_DELAY = 0.001
_WINDOWS_REPLACE_MAX_DELAY = 0.1


def fsync_file(fd: int) -> None:
    """Flush a file's data and metadata to stable storage.

    On macOS ``fsync`` only reaches the drive's cache; ``fcntl(F_FULLFSYNC)``
    asks the drive to flush it (Apple's fsync(2) man page). Some filesystems
    (SMB, some FUSE mounts) reject ``F_FULLFSYNC`` with ENOTSUP/EINVAL; then we
    fall back to ``fsync``, as SQLite's ``full_fsync`` does.

    An error from ``fsync`` itself is final: the kernel may already have
    dropped the dirty pages and cleared the error, so a retry could "succeed"
    without the data (PostgreSQL "fsyncgate"). Callers must not retry.
    """
    if IS_MACOS and _full_fsync(fd):
        return
    os.fsync(fd)


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` durable (POSIX); no-op on Windows.

    After ``rename`` the new name lives only in the directory's cached pages
    until the directory itself is synced (SQLite ``unixSync``; atomic-write-file
    0.2.0). Windows cannot open a directory for ``FlushFileBuffers`` without
    backup semantics, and NTFS journals the rename itself.
    """
    if IS_WINDOWS:
        return
    fd = os.open(path, _DIR_FLAGS)
    try:
        if IS_MACOS:
            fsync_file(fd)
        else:
            os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def replace(src: str, dst: str) -> None:
    """Atomically rename ``src`` onto ``dst``, replacing ``dst`` if it exists.

    On Windows a reader holding the target open makes ``MoveFileExW`` fail with
    a sharing violation for a moment; retry with jittered backoff for at most
    about half a second, then raise the last ``PermissionError``.
    """
    if not IS_WINDOWS:
        os.replace(src, dst)
        return
    delay = _WINDOWS_REPLACE_FIRST_DELAY
    for attempt in range(_WINDOWS_REPLACE_ATTEMPTS):
        try:
            os.replace(src, dst)
        except PermissionError:
            if attempt == _WINDOWS_REPLACE_ATTEMPTS - 1:
                raise
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter only
            delay = min(delay * 2, _WINDOWS_REPLACE_MAX_DELAY)
        else:
            return


# The write path's two calls, bound once for the platform we run on. Where
# the definitions above add nothing (fsync outside macOS, replace outside
# Windows) they are the bare os functions, one Python call less per write
# (docs/benchmarks.md). The definitions stay what other platforms run and
# what tests simulate them with.
write_fsync: Callable[[int], None] = fsync_file if IS_MACOS else os.fsync
write_replace: Callable[[str, str], None] = replace if IS_WINDOWS else os.replace


# The process id, which the write path needs on every call (a syscall):
# read once at import and again in a forked child, which has its own; hot
# paths read the attribute directly, without a function call.
class _ProcessFacts:
    pid: int

    def refresh(self) -> None:
        self.pid = os.getpid()


facts = _ProcessFacts()
facts.refresh()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=facts.refresh)


def current_pid() -> int:
    """Return ``os.getpid()``, cached (and renewed in a forked child)."""
    return facts.pid


@lru_cache(maxsize=1)
def hostname() -> str:
    """Return this machine's host name (cached: it names lock and temp owners)."""
    return socket.gethostname()


def pid_exists(pid: int) -> bool:
    """Return whether a process with id ``pid`` exists on this host.

    POSIX uses ``kill(pid, 0)``: EPERM means the process exists but belongs to
    someone else. On Windows ``os.kill`` with signal 0 *terminates* the target
    (python-list, 2016-06-30), so we ask ``OpenProcess`` instead.
    """
    if pid <= 0:
        return False
    if IS_WINDOWS:
        return _windows_pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start_token(pid: int) -> str | None:
    """Return a token that changes when ``pid`` is reused, or None if unknown.

    Linux: the process start time in clock ticks since boot
    (``/proc/<pid>/stat`` field 22, see proc(5)) joined with the boot id, so a
    reboot also changes it. Windows: the process creation time from
    ``GetProcessTimes``. Elsewhere (macOS included) None: liveness is then
    judged by pid existence alone.

    The token is read when asked, never cached per process: a forked child
    has its own start time.
    """
    if IS_WINDOWS:
        return _windows_start_token(pid)
    stat = _read_proc_stat(pid)
    if stat is None:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or
    # ')' itself, so split after the *last* ')'. Field 22 is then index 19.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        return None
    return f"{_boot_id()}:{fields[19].decode('ascii')}"


@lru_cache(maxsize=1)
def pid_namespace() -> str | None:
    """Return this process's pid-namespace identity (Linux), or None elsewhere.

    Two containers that share a directory and a host name but not a pid
    namespace must not judge each other's pids, so lock records carry it and
    a marker from another namespace counts as foreign. A process keeps its
    pid namespace for life (unshare(CLONE_NEWPID) only affects its children,
    pid_namespaces(7)), so the answer is cached.
    """
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_is_zombie(pid: int) -> bool:
    """Return whether process ``pid`` is dead but not yet reaped (Linux).

    ``kill(pid, 0)`` succeeds on a zombie, yet a zombie can never release a
    lock. proc(5): field 3 of ``/proc/<pid>/stat`` is the state, ``Z`` for a
    zombie and ``X`` for a dead task; it follows the parenthesised command
    name, which may itself contain ``)``. The leader's state alone is not
    enough: when the main thread of a multi-threaded process exits, the
    leader shows ``Z`` while its other threads run on (and hold what the
    process holds), so every task under ``/proc/<pid>/task`` must be dead.
    """
    if not _is_dead_state(_read_proc_stat(pid)):
        return False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # reaped meanwhile, or no task list: the leader is dead
    return all(_is_dead_state(_read_proc_stat(pid, task)) for task in tasks)


def _is_dead_state(stat: bytes | None) -> bool:
    if stat is None:
        return False
    end = stat.rfind(b")")
    return stat[end + 2 : end + 3] in (b"Z", b"X")


def unlink(path: str) -> None:
    """Remove ``path``; on Windows retry briefly while another process has it open.

    Windows refuses to delete a file another process holds open without
    FILE_SHARE_DELETE (PermissionError); lock peers hold a marker open only
    for the microseconds of reading it, so ten tries from 1 ms doubling
    suffice. POSIX never retries: EACCES there is a real permission problem.
    """
    if not IS_WINDOWS:
        os.unlink(path)
        return
    delay = 0.001
    for attempt in range(10):
        try:
            os.unlink(path)
        except PermissionError:
            if attempt == 9:
                raise
            time.sleep(delay)
            delay *= 2
        else:
            return


def _read_proc_stat(pid: int, task: str | None = None) -> bytes | None:
    """Return ``/proc/<pid>/stat`` (or a task's) on Linux, else None; 3 syscalls, not 9."""
    if sys.platform != "linux":
        return None
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


if sys.platform != "win32":
    import fcntl

    def _full_fsync(fd: int) -> bool:
        """Try macOS ``F_FULLFSYNC``; return False where it is not available."""
        full_fsync = getattr(fcntl, "F_FULLFSYNC", None)
        if full_fsync is None:
            return False
        try:
            fcntl.fcntl(fd, full_fsync)
        except OSError as exc:
            # SMB and some FUSE mounts refuse it: fall back to fsync (SQLite
            # full_fsync, golang/go PR #64258). Other errors are real.
            if exc.errno in (errno.ENOTSUP, errno.EINVAL, errno.ENOTTY):
                return False
            raise
        return True

    def set_mode(fd: int, mode: int) -> None:
        """Give the open file ``fd`` exactly ``mode`` (``fchmod``)."""
        os.fchmod(fd, mode)

    def keep_owner(fd: int, uid: int, gid: int) -> None:
        """Best-effort: give the open file ``fd`` this owner and group.

        Only root (CAP_CHOWN) may give a file away, and a user may only pick
        a group they belong to; anything refused is left as the kernel made
        it (the mode is still kept). Negative ids do nothing.
        """
        if uid < 0:
            return
        with contextlib.suppress(PermissionError):
            os.fchown(fd, uid, gid)


if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    _PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
    _STILL_ACTIVE = 259

    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)

    def _open_process(pid: int) -> int:
        handle: int = _kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
        return handle

    def _windows_pid_exists(pid: int) -> bool:
        handle = _open_process(pid)
        if not handle:
            # ERROR_ACCESS_DENIED means it exists but is protected.
            return ctypes.get_last_error() == 5
        try:
            code = wintypes.DWORD()
            if not _kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == _STILL_ACTIVE
        finally:
            _kernel32.CloseHandle(handle)

    def _windows_start_token(pid: int) -> str | None:
        handle = _open_process(pid)
        if not handle:
            return None
        try:
            created, exited, kernel, user = (wintypes.FILETIME() for _ in range(4))
            ok = _kernel32.GetProcessTimes(
                handle,
                ctypes.byref(created),
                ctypes.byref(exited),
                ctypes.byref(kernel),
                ctypes.byref(user),
            )
            if not ok:
                return None
            return str((created.dwHighDateTime << 32) | created.dwLowDateTime)
        finally:
            _kernel32.CloseHandle(handle)

    def _full_fsync(fd: int) -> bool:
        return False

    def set_mode(fd: int, mode: int) -> None:
        """No-op: Windows keeps only a read-only flag, which a new temp never has."""

    def keep_owner(fd: int, uid: int, gid: int) -> None:
        """No-op: Windows files have ACLs, not POSIX owners."""

else:

    def _windows_pid_exists(pid: int) -> bool:
        raise OSError(errno.ENOSYS, "Windows process query called on a non-Windows platform")

    def _windows_start_token(pid: int) -> str | None:
        raise OSError(errno.ENOSYS, "Windows process query called on a non-Windows platform")
