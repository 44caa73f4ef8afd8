"""The operating-system specific calls, kept in one place.

Every decision that differs between Linux, macOS and Windows is made here,
once, at import: each branch below defines the same names, and
:mod:`htmlgraph.atomic_ops` calls them without asking which platform it runs
on (as py-filelock keeps ``_unix.py``/``_windows.py`` behind one API). The
calls:

* durability: :func:`fsync_file` (``F_FULLFSYNC`` on macOS), :func:`fsync_dir`
  (POSIX only; tolerates filesystems that cannot sync a directory);
* replacing and removing: :func:`replace`, :func:`unlink` (Windows retries a
  sharing violation briefly, POSIX never retries);
* opening on shared ground: :data:`O_READ` (never blocks on a FIFO or
  device someone planted), :data:`O_NEW_FILE` (exclusive creation, never
  through a link), :data:`O_NOFOLLOW` and :data:`O_BINARY` (0 where there
  is none);
* permissions: :func:`set_mode`, :func:`keep_owner`, :func:`umask`, and the
  kernel's protections for sticky directories, :func:`may_follow_link`,
  :func:`may_replace` and :func:`trusted_owner`;
* processes: :func:`current_pid`, :func:`hostname`, :func:`pid_exists`,
  :func:`pid_is_zombie`, :func:`pid_namespace`, :func:`process_start_token`,
  :func:`after_fork`.

The Windows and macOS branches cannot run on the Linux gate; they are
type-checked with ``mypy --platform win32`` / ``--platform darwin`` and run by
the GitHub jobs of those systems.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import cast

__all__ = [
    "HAS_SYNCFS",
    "O_BINARY",
    "O_NEW_FILE",
    "O_NOFOLLOW",
    "O_READ",
    "PID_MAX",
    "absolute",
    "after_fork",
    "current_pid",
    "fsync_dir",
    "fsync_file",
    "hostname",
    "keep_owner",
    "may_follow_link",
    "may_replace",
    "pid_exists",
    "pid_is_zombie",
    "pid_namespace",
    "process_start_token",
    "replace",
    "set_mode",
    "start_token_seconds",
    "syncfs",
    "trusted_owner",
    "umask",
    "unlink",
]

# Flags for opening on shared ground (os.open makes every descriptor
# non-inheritable by itself, PEP 446). O_NOFOLLOW, added where a symlink in
# the last component must be refused, and O_BINARY (Windows: no newline
# translation) are 0 where the platform has none. A read never blocks on a
# FIFO or device a stranger put where a file was expected (O_NONBLOCK; the
# caller fstats what it opened). A file of ours is created new: O_EXCL, so
# never through a planted symlink nor over someone else's file.
O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
O_BINARY: int = getattr(os, "O_BINARY", 0)
O_READ: int = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | O_BINARY
O_NEW_FILE: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_BINARY

# The largest process id there can be: pid_t is a signed 32-bit int on POSIX
# (os.kill raises OverflowError past it); Windows process ids are DWORDs.
PID_MAX = 2**32 - 1 if sys.platform == "win32" else 2**31 - 1


def after_fork(callback: Callable[[], None]) -> None:
    """Call ``callback`` in the child after every ``fork`` (nothing where there is none)."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=callback)


# The process id, which the write path needs on every call (getpid is a
# syscall): read once at import and again in a forked child, which has its own.
_pid = [os.getpid()]
after_fork(lambda: _pid.__setitem__(0, os.getpid()))


def current_pid() -> int:
    """Return ``os.getpid()``, cached (and renewed in a forked child)."""
    return _pid[0]


if sys.platform == "win32":
    absolute = os.path.abspath
else:

    def absolute(path: str) -> str:
        """Return ``path`` made absolute as the kernel resolves it: against the cwd.

        No textual normalisation: ``link/../f`` names ``f`` beside the link's
        *target*, as for ``open()``, not ``./f`` (os.path.abspath's answer).
        """
        return path if path.startswith("/") else os.path.join(os.getcwd(), path)


@lru_cache(maxsize=1)
def hostname() -> str:
    """Return this machine's host name (cached: it names lock and temp owners)."""
    return socket.gethostname()


# What a platform without the feature answers (Windows; POSIX other than Linux).
def _never_a_zombie(pid: int) -> bool:
    """Return False: no cheap process state here; liveness is judged by existence."""
    return False


def _no_pid_namespace() -> str | None:
    """Return None: no pid namespaces here."""
    return None


def _no_syncfs(fd: int) -> None:
    """Raise ENOSYS: no syncfs here."""
    raise OSError(errno.ENOSYS, "syncfs is not available on this platform")


if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    # A replace or delete that races another process's open handle fails with
    # ERROR_ACCESS_DENIED (5) or ERROR_SHARING_VIOLATION (32), surfacing as
    # PermissionError (Eryk Sun on bpo-46003); lock peers and readers hold
    # files open only briefly, so retry with backoff for about half a second.
    _SHARING_ATTEMPTS = 10
    _SHARING_FIRST_DELAY = 0.001
    _SHARING_MAX_DELAY = 0.1
    _FILETIME_EPOCH_OFFSET = 11_644_473_600  # seconds from 1601-01-01 to 1970-01-01
    _PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
    _STILL_ACTIVE = 259
    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)

    def _retry_sharing(call: Callable[[], None]) -> None:
        delay = _SHARING_FIRST_DELAY
        for attempt in range(_SHARING_ATTEMPTS):
            try:
                call()
            except PermissionError:
                if attempt == _SHARING_ATTEMPTS - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, _SHARING_MAX_DELAY)
            else:
                return

    def fsync_file(fd: int) -> None:
        """Flush a file's data to stable storage (``FlushFileBuffers``). Never retry a failure."""
        os.fsync(fd)

    def fsync_dir(path: str) -> None:
        """No-op: a directory cannot be opened for syncing, and NTFS journals the rename."""

    def replace(src: str, dst: str) -> None:
        """Atomically rename ``src`` onto ``dst``, retrying sharing violations briefly."""
        _retry_sharing(lambda: os.replace(src, dst))

    def unlink(path: str) -> None:
        """Remove ``path``, retrying sharing violations briefly."""
        _retry_sharing(lambda: os.unlink(path))

    def set_mode(fd: int, mode: int) -> None:
        """No-op: Windows keeps only a read-only flag, which a new temp never has."""

    def keep_owner(fd: int, uid: int, gid: int) -> None:
        """No-op: Windows files have ACLs, not POSIX owners."""

    def umask() -> int:
        """Return 0: Windows has no umask."""
        return 0

    def may_follow_link(link: str, link_stat: os.stat_result) -> bool:
        """Return True: Windows has no sticky directories."""
        return True

    def may_replace(path: str, file_stat: os.stat_result) -> bool:
        """Return True: Windows has no sticky directories."""
        return True

    def trusted_owner(file_stat: os.stat_result) -> bool:
        """Return True: Windows files have ACLs, not POSIX owners to compare."""
        return True

    def own(file_stat: os.stat_result) -> bool:
        """Return True: Windows files have ACLs, not POSIX owners to compare."""
        return True

    def is_root() -> bool:
        """Return False: Windows has no uid 0 that bypasses permissions."""
        return False

    def may_change_entries(directory: str) -> bool:
        """Return True: Windows has no directory write bit (a refusal shows at the rename)."""
        return True

    def may_remove(dir_stat: os.stat_result, file_stat: os.stat_result) -> bool:
        """Return True: Windows has no sticky directories."""
        return True

    def _open_process(pid: int) -> int:
        handle: int = _kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
        return handle

    def pid_exists(pid: int) -> bool:
        """Return whether process ``pid`` exists (``OpenProcess``: ``os.kill(pid, 0)`` kills)."""
        if pid <= 0:
            return False
        handle = _open_process(pid)
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: exists, protected
        try:
            code = wintypes.DWORD()
            if not _kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == _STILL_ACTIVE
        finally:
            _kernel32.CloseHandle(handle)

    def process_start_token(pid: int) -> str | None:
        """Return the process creation time (``GetProcessTimes``), or None."""
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

    def start_token_seconds(token: str) -> int | None:
        """Return the start time in ``token`` (a FILETIME) as seconds since the epoch."""
        try:
            return int(token) // 10_000_000 - _FILETIME_EPOCH_OFFSET
        except ValueError:
            return None

    # An exited Windows process is not STILL_ACTIVE (see pid_exists).
    pid_is_zombie = _never_a_zombie
    pid_namespace = _no_pid_namespace
    HAS_SYNCFS = False
    syncfs = _no_syncfs

else:
    import fcntl

    # Directory fsync is not supported everywhere (EINVAL on some FUSE, SMB and
    # VirtualBox shared folders, atomicwrites#27). There is nothing more a
    # caller can do there, so these mean "not supported", not failure, as in
    # SQLite's unixSync.
    _DIR_FSYNC_UNSUPPORTED = frozenset(
        e
        for e in (errno.EINVAL, getattr(errno, "ENOTSUP", None), errno.EOPNOTSUPP)
        if e is not None
    )
    _DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC
    _STICKY_WORLD = stat.S_ISVTX | stat.S_IWOTH
    _umask_lock = threading.Lock()

    if sys.platform == "darwin":

        def fsync_file(fd: int) -> None:
            """Flush a file to stable storage: ``F_FULLFSYNC``, else ``fsync``.

            On macOS ``fsync`` only reaches the drive's cache; ``F_FULLFSYNC``
            asks the drive to flush it (Apple's fsync(2)). SMB and some FUSE
            mounts refuse it; then ``fsync`` (SQLite's ``full_fsync``). A
            failure is final: never retry it (PostgreSQL "fsyncgate").
            """
            try:
                fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EINVAL, errno.ENOTTY):
                    raise
                os.fsync(fd)

    else:

        def fsync_file(fd: int) -> None:
            """Flush a file's data and metadata to stable storage (``fsync``).

            An error is final: the kernel may already have dropped the dirty
            pages and cleared the error, so a retry could "succeed" without
            the data (PostgreSQL "fsyncgate"). Callers must not retry.
            """
            os.fsync(fd)

    def fsync_dir(path: str) -> None:
        """Make the entries of directory ``path`` durable.

        After ``rename`` the new name lives only in the directory's cached
        pages until the directory itself is synced (SQLite ``unixSync``).
        EINVAL/ENOTSUP (a filesystem that cannot sync directories) is not an
        error: there is nothing more to do there.
        """
        fd = os.open(path, _DIR_FLAGS)
        try:
            fsync_file(fd)
        except OSError as exc:
            if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
                raise
        finally:
            os.close(fd)

    def replace(src: str, dst: str) -> None:
        """Atomically rename ``src`` onto ``dst`` (rename(2); never retried)."""
        os.replace(src, dst)

    def unlink(path: str) -> None:
        """Remove ``path`` (EACCES is a real permission problem: never retried)."""
        os.unlink(path)

    def set_mode(fd: int, mode: int) -> None:
        """Give the open file ``fd`` exactly ``mode`` (``fchmod``)."""
        os.fchmod(fd, mode)

    def keep_owner(fd: int, uid: int, gid: int) -> None:
        """Best-effort: give the open file ``fd`` this owner and group.

        Only root (CAP_CHOWN) may give a file away, and a user may only pick
        a group they belong to; anything refused is left as the kernel made it.
        """
        with contextlib.suppress(PermissionError):
            os.fchown(fd, uid, gid)

    def umask() -> int:
        """Return the process's umask.

        Linux reads it from ``/proc/self/status`` (kernel 4.7+), which changes
        nothing. Elsewhere it must be set to be read: ``os.umask`` twice,
        under a lock (another thread creating a file in that instant, outside
        this library, could still see the intermediate value 0o022).
        """
        mask = _proc_umask()
        if mask is not None:
            return mask
        with _umask_lock:
            mask = os.umask(0o022)
            os.umask(mask)
        return mask

    _EFFECTIVE_ACCESS = os.access in os.supports_effective_ids

    def _sysctl(name: str, default: int) -> int:
        """Return the integer sysctl ``fs.<name>`` (Linux), or ``default``."""
        try:
            with open(f"/proc/sys/fs/{name}", "rb") as f:
                return int(f.read().strip() or default)
        except (OSError, ValueError):
            return default

    def may_follow_link(link: str, link_stat: os.stat_result) -> bool:
        """Apply the kernel's ``fs.protected_symlinks`` rule to following ``link``.

        In a sticky, world-writable directory (``/tmp``) a symlink is followed
        only if it belongs to the follower or to the directory's owner
        (fs/namei.c ``may_follow_link``; Documentation/admin-guide/sysctl/fs.rst).
        Where the sysctl cannot be read the rule applies (the safe side).
        """
        if _sysctl("protected_symlinks", 1) == 0 or link_stat.st_uid == os.geteuid():
            return True
        parent = os.stat(os.path.dirname(link) or ".")
        if parent.st_mode & _STICKY_WORLD != _STICKY_WORLD:
            return True
        return parent.st_uid == link_stat.st_uid

    def trusted_owner(file_stat: os.stat_result) -> bool:
        """Return whether the file belongs to this process's user or to root.

        What a stranger planted in a shared directory (a lock directory, a
        batch's hidden or staging directory) is told apart from ours by this.
        """
        return file_stat.st_uid in (0, os.geteuid())

    def is_root() -> bool:
        """Is this process root (effective uid 0)?"""
        return os.geteuid() == 0

    def own(file_stat: os.stat_result) -> bool:
        """Is the file this process's own, not root's or another user's?

        (Root, for whom every file is "trusted", owns only root's: a
        journal another user wrote is not root's to replay.)
        """
        return file_stat.st_uid == os.geteuid()

    def may_replace(path: str, file_stat: os.stat_result) -> bool:
        """Apply the kernel's ``fs.protected_regular`` rule to writing the existing ``path``.

        ``open(path, "w")`` of an existing regular file in a sticky directory
        is refused when the file belongs neither to the caller nor to the
        directory's owner, and the directory is world-writable (or, with the
        sysctl at 2, group-writable) - fs/namei.c ``may_create_in_sticky``.
        Where the sysctl cannot be read, the stricter level 2 applies.
        """
        if file_stat.st_uid == os.geteuid():
            return True
        level = _sysctl("protected_regular", 2)
        if level == 0:
            return True
        parent = os.stat(os.path.dirname(path) or ".")
        if not parent.st_mode & stat.S_ISVTX or parent.st_uid == file_stat.st_uid:
            return True
        if parent.st_mode & stat.S_IWOTH:
            return False
        return not (level >= 2 and parent.st_mode & stat.S_IWGRP)

    def may_change_entries(directory: str) -> bool:
        """May this process create, rename and remove names in ``directory``?

        Write and search permission, for the effective ids, as the kernel
        judges it (ACLs and a read-only mount included): ``faccessat``.
        """
        return os.access(directory, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE_ACCESS)

    def may_remove(dir_stat: os.stat_result, file_stat: os.stat_result) -> bool:
        """Apply the sticky bit to renaming over, or unlinking, a file (``check_sticky``).

        In a sticky directory only the file's owner, the directory's owner
        and root may remove or replace a name, whatever the write bits say.
        """
        if not dir_stat.st_mode & stat.S_ISVTX:
            return True
        euid = os.geteuid()
        return euid in (0, file_stat.st_uid, dir_stat.st_uid)

    def pid_exists(pid: int) -> bool:
        """Return whether a process with id ``pid`` exists (``kill(pid, 0)``; EPERM: it does)."""
        if not 0 < pid <= PID_MAX:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    if sys.platform == "linux":

        def _read(path: str, size: int = 4096) -> bytes | None:
            """Return the start of a /proc file, or None; os.open/read/close: 3 syscalls."""
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                return os.read(fd, size)
            except OSError:
                return None
            finally:
                os.close(fd)

        def _proc_umask() -> int | None:
            status = _read("/proc/self/status", 1 << 16)
            if status is None:
                return None
            start = status.find(b"\nUmask:")
            if start < 0:
                return None
            return int(status[start + 7 : status.find(b"\n", start + 1)].strip(), 8)

        @lru_cache(maxsize=1)
        def _boot_id() -> str:
            data = _read("/proc/sys/kernel/random/boot_id")
            return "" if data is None else data.decode("ascii", "replace").strip()

        def process_start_token(pid: int) -> str | None:
            """Return a token that changes when ``pid`` is reused, or None if unknown.

            The start time in clock ticks since boot (``/proc/<pid>/stat``
            field 22, proc(5)) joined with the boot id, so a reboot changes it
            too. Read when asked, never cached: a forked child has its own.
            """
            data = _read(f"/proc/{pid}/stat")
            if data is None:
                return None
            # The command name (field 2) is in parentheses and may contain
            # spaces or ')', so split after the *last* ')'; field 22 is then
            # index 19.
            fields = data[data.rfind(b")") + 2 :].split()
            if len(fields) < 20:
                return None
            return f"{_boot_id()}:{fields[19].decode('ascii')}"

        @lru_cache(maxsize=1)
        def _boot_seconds() -> int | None:
            data = _read("/proc/stat", 1 << 16)
            start = -1 if data is None else data.find(b"\nbtime ")
            if data is None or start < 0:
                return None
            return int(data[start + 7 : data.find(b"\n", start + 1)])

        def start_token_seconds(token: str) -> int | None:
            """Return the start time in ``token`` as seconds since the epoch (proc(5) btime)."""
            boot = _boot_seconds()
            try:
                ticks = int(token.rsplit(":", 1)[-1])
            except ValueError:
                return None
            return None if boot is None else boot + ticks // os.sysconf("SC_CLK_TCK")

        def _dead(data: bytes | None) -> bool:
            if data is None:
                return False
            end = data.rfind(b")")
            return data[end + 2 : end + 3] in (b"Z", b"X")

        def pid_is_zombie(pid: int) -> bool:
            """Return whether process ``pid`` is dead but not yet reaped.

            ``kill(pid, 0)`` succeeds on a zombie, yet a zombie can never
            release a lock. proc(5): field 3 of ``/proc/<pid>/stat`` is the
            state, ``Z`` zombie, ``X`` dead. The leader's state is not enough:
            when the main thread of a multi-threaded process exits, the leader
            shows ``Z`` while its other threads run on (and hold what the
            process holds), so every task under ``/proc/<pid>/task`` must be
            dead.
            """
            if not _dead(_read(f"/proc/{pid}/stat")):
                return False
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                return True  # reaped meanwhile
            except OSError:
                return False  # EMFILE and the like: a problem of ours, not proof
            return all(_dead(_read(f"/proc/{pid}/task/{task}/stat")) for task in tasks)

        def _load_syncfs() -> Callable[[int], int] | None:
            try:
                func = ctypes.CDLL(None, use_errno=True).syncfs
            except (OSError, AttributeError):
                return None
            func.argtypes = [ctypes.c_int]
            func.restype = ctypes.c_int
            return cast("Callable[[int], int]", func)

        _libc_syncfs = _load_syncfs()
        HAS_SYNCFS = _libc_syncfs is not None

        def syncfs(fd: int) -> None:
            """Flush the whole filesystem holding ``fd`` (syncfs(2)); raise OSError on failure.

            The same guarantees as fsync of every file of that filesystem; it
            reports writeback errors since Linux 5.8, for errors after ``fd``
            was opened.
            """
            if _libc_syncfs is None:
                raise OSError(errno.ENOSYS, "syncfs is not available on this platform")
            if _libc_syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))

        @lru_cache(maxsize=1)
        def pid_namespace() -> str | None:
            """Return this process's pid-namespace identity, e.g. ``pid:[4026531836]``.

            Two containers that share a directory and a host name but not a
            pid namespace must not judge each other's pids. A process keeps
            its pid namespace for life (pid_namespaces(7)): cached.
            """
            try:
                return os.readlink("/proc/self/ns/pid")
            except OSError:
                return None

    else:

        def _proc_umask() -> int | None:
            return None

        def process_start_token(pid: int) -> str | None:
            """Return None: no cheap start time here; liveness is judged by existence."""
            return None

        def start_token_seconds(token: str) -> int | None:
            """Return None: there are no start tokens here."""
            return None

        pid_is_zombie = _never_a_zombie
        pid_namespace = _no_pid_namespace
        HAS_SYNCFS = False
        syncfs = _no_syncfs
