"""DirectoryLocker: a reader/writer lock made only of marker files in one directory.

Every holder or claimant owns one marker whose name nobody else will use,
``.lock-shared-{pid}-{nonce}`` or ``.lock-exclusive-{pid}-{ticket}``, published
complete (written under a private ``.lock-pending-`` name, then renamed onto the
fresh unique name). A claim counts only if a directory listing that *started
after* the claimant's own marker existed shows no conflict; because a marker
exists continuously from its publication until its release, two conflicting
claimants can never both pass (whichever published later scanned after the
other's marker existed). ``docs/locking.md`` gives the whole argument, the
costs and the limits.

This file is self-contained (stdlib plus :mod:`htmlgraph._platform`) so that it
can be pasted into :mod:`htmlgraph.atomic_ops`; every module-level name is
private except :class:`DirectoryLocker` and :class:`LockTimeout`, and carries a
``_lock`` prefix so it cannot collide with the writer half of that module.
Tests replace the seams (``_lock_token``, ``_lock_sleep``, ``_lock_listdir``,
``_lock_pid_exists``, ``_lock_start_token``, ...) through the module.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from htmlgraph import _platform

__all__ = ["DirectoryLocker", "LockTimeout"]

_lock_logger = logging.getLogger(__name__)

_LockMode = Literal["shared", "exclusive"]

_LOCK_SHARED_PREFIX = ".lock-shared-"
_LOCK_EXCLUSIVE_PREFIX = ".lock-exclusive-"
_LOCK_PENDING_PREFIX = ".lock-pending-"

# Jittered exponential backoff between attempts: about 1 ms doubling up to
# about 50 ms, each step drawn from [d/2, d] so that contenders desynchronise
# (Metcalfe & Boggs' Ethernet backoff; filelock's strict lock caps at 50 ms).
_LOCK_BACKOFF_FIRST = 0.001
_LOCK_BACKOFF_MAX = 0.05

# A marker whose record cannot be parsed is held for this long (by its mtime)
# and then counts as stale. Our own markers are never unreadable (they appear
# by rename with their record complete), so this only delays the clean-up of
# garbage: an empty marker left by a power cut, a foreign file.
_LOCK_UNREADABLE_GRACE = 2.0
# A ".lock-pending-" file seen by one scanner for this long belongs to a
# publisher that died between create and rename. Removing a live publisher's
# pending file is harmless (its rename fails and it publishes again).
_LOCK_PENDING_GRACE = 10.0
# A live holder's start token is re-read at most this often per marker; the
# pid's existence (one kill(pid, 0)) is checked on every scan. Caching can only
# delay breaking a marker, never break a live one.
_LOCK_RECHECK_INTERVAL = 0.5
_LOCK_PUBLISH_ATTEMPTS = 16
_LOCK_RECORD_MAX = 4096
_LOCK_MARKER_MODE = 0o644  # peers of other users must be able to read the record

_O_LOCK_PENDING = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_O_LOCK_READ = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


# --------------------------------------------------------------------------
# Seams: the code below calls these by their module-level names, so tests can
# replace them (monkeypatch.setattr(lockmod, "_lock_token", fake)).
# --------------------------------------------------------------------------
def _lock_token(nbytes: int) -> str:
    """Return ``2 * nbytes`` random hex digits: the one source of marker-name randomness."""
    return secrets.token_hex(nbytes)


_lock_sleep: Callable[[float], None] = time.sleep
_lock_clock: Callable[[], float] = time.monotonic
_lock_listdir: Callable[[str], list[str]] = os.listdir
_lock_pid_exists: Callable[[int], bool] = _platform.pid_exists
_lock_start_token: Callable[[int], str | None] = _platform.process_start_token
_lock_hostname: Callable[[], str] = _platform.hostname


# --------------------------------------------------------------------------
# Platform block: these belong in htmlgraph._platform (asked of the lead);
# they live here until they are moved.
# --------------------------------------------------------------------------
_lock_pidns_cache: list[str | None] = []


def _lock_pid_namespace() -> str | None:
    """Return this process's pid-namespace identity (Linux), or None elsewhere.

    Two containers that share a directory and a host name but not a pid
    namespace must not judge each other's pids, so the namespace goes into the
    record and a marker from another namespace counts as foreign. A process
    keeps its pid namespace for life (unshare(CLONE_NEWPID) only affects its
    children, pid_namespaces(7)), so the answer is cached.
    """
    if not _lock_pidns_cache:
        try:
            _lock_pidns_cache.append(os.readlink("/proc/self/ns/pid"))
        except OSError:
            _lock_pidns_cache.append(None)
    return _lock_pidns_cache[0]


def _lock_pid_is_zombie(pid: int) -> bool:
    """Return whether ``pid`` is a zombie (Linux), i.e. dead but not yet reaped.

    ``kill(pid, 0)`` succeeds on a zombie, yet a zombie can never release a
    marker. proc(5): field 3 of ``/proc/<pid>/stat`` is the state, ``Z`` for a
    zombie and ``X`` for a dead task; it follows the parenthesised command
    name, which may itself contain ``)``.
    """
    if sys.platform != "linux":
        return False
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        stat = os.read(fd, 4096)  # 3 syscalls; open() would take 9
    except OSError:
        return False
    finally:
        os.close(fd)
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state in (b"Z", b"X")


def _lock_unlink(path: str) -> None:
    """Remove ``path``; on Windows retry briefly while a reader has it open.

    Windows refuses to delete a file another process holds open without
    FILE_SHARE_DELETE (PermissionError); our peers hold a marker open only for
    the microseconds of reading its record, so a short backoff suffices
    (filelock does the same, ten tries from 1 ms doubling).
    """
    if not _platform.IS_WINDOWS:
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


# ------------------------------------------------------------------ end block


_lock_record_heads: dict[int, str] = {}


def _lock_record_head(pid: int) -> str:
    """Return the unchanging start of this process's marker record (JSON, unclosed).

    pid, host name, pid namespace and start token, the token read for the
    pid that publishes - never cached across a fork: keyed by pid, and cleared
    in a forked child - so a child does not publish its parent's start time
    (the prototype bug that made peers evict live children as "pid reused").
    """
    try:
        return _lock_record_heads[pid]
    except KeyError:
        head = json.dumps(
            {
                "pid": pid,
                "host": _lock_hostname(),
                "pidns": _lock_pid_namespace(),
                "start": _lock_start_token(pid),
            },
            separators=(",", ":"),
        )[:-1]
        _lock_record_heads.clear()
        _lock_record_heads[pid] = head
        return head


def _lock_deadline(timeout: float) -> float | None:
    """Return the monotonic deadline for ``timeout`` (None: wait without limit)."""
    timeout = float(timeout)
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds, not NaN")
    if timeout < 0 or math.isinf(timeout):
        return None
    return _lock_clock() + timeout


def _lock_backoff(attempt: int) -> float:
    """Return the sleep before retry number ``attempt`` (0-based), jittered."""
    ceiling = min(_LOCK_BACKOFF_MAX, _LOCK_BACKOFF_FIRST * (1 << min(attempt, 16)))
    return ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not secrecy


def _lock_make_dir(directory: str) -> None:
    """Create ``directory`` (and parents); a non-directory there is a clear error."""
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(
            errno.ENOTDIR, "lock directory path exists and is not a directory", directory
        ) from None


def _lock_write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _LockRecord:
    """The parsed content of a marker: who holds it."""

    __slots__ = ("host", "pid", "pidns", "start")

    def __init__(self, pid: int, host: str, pidns: str | None, start: str | None) -> None:
        self.pid = pid
        self.host = host
        self.pidns = pidns
        self.start = start


def _lock_parse_record(data: bytes, name_pid: int | None) -> _LockRecord | None:
    """Return the record in ``data``, or None if it is not one of ours."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    pid, host = obj.get("pid"), obj.get("host")
    pidns, start = obj.get("pidns"), obj.get("start")
    if not (isinstance(pid, int) and not isinstance(pid, bool) and isinstance(host, str)):
        return None
    if not (pidns is None or isinstance(pidns, str)) or not (
        start is None or isinstance(start, str)
    ):
        return None
    if name_pid is not None and pid != name_pid:
        return None  # a record that contradicts its own name is garbage
    return _LockRecord(pid, host, pidns, start)


class _LockSeen:
    """What one scanner knows about one marker (records never change once visible)."""

    __slots__ = ("dead", "forbidden", "mtime", "read", "record", "verified_at")

    def __init__(
        self, record: _LockRecord | None, mtime: float, *, forbidden: bool, read: bool = True
    ) -> None:
        self.record = record
        self.mtime = mtime
        self.forbidden = forbidden
        self.read = read  # False: seen once with a live pid in its name, not read yet
        self.verified_at = -math.inf
        self.dead = False  # proven stale but could not be removed


def _lock_name_pid(name: str, prefix: str) -> int | None:
    """Return the pid encoded in marker ``name`` (after ``prefix``), or None."""
    head = name[len(prefix) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _lock_name_ticket(name: str) -> str:
    """Return the ticket of an exclusive marker name (its part after the pid)."""
    parts = name[len(_LOCK_EXCLUSIVE_PREFIX) :].split("-", 1)
    return parts[1] if len(parts) == 2 else ""


class LockTimeout(TimeoutError):
    """A :class:`DirectoryLocker` context manager could not take its lock in time.

    A :class:`TimeoutError` (so ``except TimeoutError`` catches it) carrying
    the directory, the mode and the wait as attributes; it pickles, so it
    crosses process boundaries (multiprocessing results).

    Attributes:
        lock_dir: The lock directory.
        mode: ``"shared"`` or ``"exclusive"``.
        timeout: The wait, in seconds, that ran out.
    """

    def __init__(self, lock_dir: str | os.PathLike[str], mode: str, timeout: float) -> None:
        self.lock_dir = Path(lock_dir)
        self.mode = mode
        self.timeout = timeout
        super().__init__(
            f"could not acquire the {mode} lock on directory {os.fspath(lock_dir)!r} "
            f"within {timeout:g} s"
        )

    def __reduce__(self) -> tuple[type[LockTimeout], tuple[Path, str, float]]:
        return (type(self), (self.lock_dir, self.mode, self.timeout))


_lock_instances: weakref.WeakSet[DirectoryLocker] = weakref.WeakSet()


class DirectoryLocker:
    """A reader/writer lock between processes, threads and instances, from marker files.

    Many shared holders or one exclusive holder at a time, across processes
    on one host and a local filesystem, and between instances and threads in
    one process (each instance is its own owner; threads sharing an instance
    take turns). It is advisory: only code that takes the lock is excluded.
    A waiting writer stops new readers (writers cannot starve; readers can,
    under an unbroken stream of writers) and the oldest waiting writer goes
    first. A marker left by a crashed holder is broken only on proof of death
    (same host and pid namespace, and the pid is gone, a zombie, or reused).
    Nothing here is durable: markers are not fsynced, and a reboot kills
    every holder anyway.

    Re-acquiring on an instance that holds, from the thread that acquired:
    the same mode (or shared under exclusive) nests and returns True at once,
    and each :meth:`release_lock` undoes one level; asking for exclusive
    while holding shared raises :class:`RuntimeError` (an upgrade could
    deadlock against another upgrader). Another thread using the same
    instance waits, within its timeout, until the instance is released;
    :meth:`release_lock` releases the instance's hold whichever thread calls
    it. For concurrent readers in threads, give each thread its own instance.

    Attributes:
        lock_dir: The directory the markers live in (created if missing).
        pid: The process that owns this instance (updated in a forked child).
        shared_lock_path: The shared marker this instance holds or last held;
            before its first shared acquire, ``lock_dir / f".lock-shared-{pid}"``
            (made absolute), a name no marker ever has (markers carry a
            suffix), so ``.exists()`` is True exactly while this instance
            holds it.
        exclusive_lock_path: The same for the exclusive marker.
    """

    def __init__(self, lock_dir: str | os.PathLike[str]) -> None:
        self.lock_dir = Path(lock_dir)
        # Resolved once, so a later chdir does not move the lock.
        self._dir = os.path.abspath(self.lock_dir)
        _lock_make_dir(self._dir)
        self.pid = os.getpid()
        self._shared_path = os.path.join(self._dir, f"{_LOCK_SHARED_PREFIX}{self.pid}")
        self._exclusive_path = os.path.join(self._dir, f"{_LOCK_EXCLUSIVE_PREFIX}{self.pid}")
        self._reset_state()
        _lock_instances.add(self)

    def _reset_state(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None  # thread holding, or acquiring through, this instance
        self._mode: _LockMode | None = None
        self._depth = 0
        self._marker: str | None = None  # full path of the marker we hold
        self._claim: str | None = None  # name of our published, not (yet) held marker
        # Only the owning thread touches these two caches.
        self._seen: dict[str, _LockSeen] = {}
        self._pending_seen: dict[str, float] = {}
        self._view: frozenset[str] = frozenset()  # marker names of the last scan

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's hold without touching its marker."""
        self.pid = os.getpid()
        self._reset_state()

    @property
    def shared_lock_path(self) -> Path:
        """The shared marker this instance holds or last held (see the class doc)."""
        return Path(self._shared_path)

    @property
    def exclusive_lock_path(self) -> Path:
        """The exclusive marker this instance holds or last held (see the class doc)."""
        return Path(self._exclusive_path)

    def __repr__(self) -> str:
        return f"DirectoryLocker({os.fspath(self.lock_dir)!r}, held={self._mode!r})"

    # ------------------------------------------------------------ public API
    def acquire_shared_lock(self, timeout: float = 5.0) -> bool:
        """Take the lock shared (many readers), waiting at most ``timeout`` seconds.

        Args:
            timeout: Seconds to wait; ``0`` makes exactly one attempt, a
                negative value or ``math.inf`` waits without limit.

        Returns:
            True if the lock is now held, False if the wait ran out.

        Raises:
            OSError: The lock directory cannot be written (PermissionError,
                EROFS, ...), raised at the first attempt, with its filename.
            ValueError: ``timeout`` is NaN.
        """
        return self._acquire("shared", timeout)

    def acquire_exclusive_lock(self, timeout: float = 5.0) -> bool:
        """Take the lock exclusive (one writer, no readers), waiting at most ``timeout`` s.

        Args:
            timeout: Seconds to wait; ``0`` makes exactly one attempt, a
                negative value or ``math.inf`` waits without limit.

        Returns:
            True if the lock is now held, False if the wait ran out.

        Raises:
            OSError: The lock directory cannot be written (raised at once).
            RuntimeError: This thread holds this instance shared (no upgrades).
            ValueError: ``timeout`` is NaN.
        """
        return self._acquire("exclusive", timeout)

    def release_lock(self) -> None:
        """Release one level of this instance's hold; the marker goes with the last.

        Idempotent and safe when nothing is held; never raises (a marker that
        vanished while held - its directory deleted - is logged as a WARNING,
        since exclusion was not guaranteed meanwhile); never removes a marker
        this instance did not create; does nothing in a forked child, whose
        parent still holds the lock.
        """
        with self._cond:
            if self._mode is None or os.getpid() != self.pid:
                return
            self._depth -= 1
            if self._depth > 0:
                return
            marker, mode = self._marker, self._mode
            self._mode, self._marker, self._owner, self._depth = None, None, None, 0
            try:
                if marker is not None:
                    _lock_unlink(marker)
                    _lock_logger.debug("released %s lock %s", mode, marker)
            except FileNotFoundError:
                _lock_logger.warning(
                    "lock marker %s vanished while its %s lock was held (lock directory "
                    "deleted or marker removed by hand): exclusion was not guaranteed",
                    marker,
                    mode,
                )
            except OSError as exc:
                _lock_logger.warning("could not remove lock marker %s: %s", marker, exc)
            finally:
                self._cond.notify()

    @contextlib.contextmanager
    def shared(self, timeout: float = 5.0) -> Iterator[DirectoryLocker]:
        """Hold the lock shared for a ``with`` block.

        Args:
            timeout: As for :meth:`acquire_shared_lock`.

        Yields:
            This locker.

        Raises:
            LockTimeout: The lock was not acquired within ``timeout``.
        """
        if not self.acquire_shared_lock(timeout):
            raise LockTimeout(self.lock_dir, "shared", timeout)
        try:
            yield self
        finally:
            self.release_lock()

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 5.0) -> Iterator[DirectoryLocker]:
        """Hold the lock exclusive for a ``with`` block.

        Args:
            timeout: As for :meth:`acquire_exclusive_lock`.

        Yields:
            This locker.

        Raises:
            LockTimeout: The lock was not acquired within ``timeout``.
        """
        if not self.acquire_exclusive_lock(timeout):
            raise LockTimeout(self.lock_dir, "exclusive", timeout)
        try:
            yield self
        finally:
            self.release_lock()

    # -------------------------------------------------------------- acquire
    def _acquire(self, mode: _LockMode, timeout: float) -> bool:
        deadline = _lock_deadline(timeout)
        me = threading.get_ident()
        if os.getpid() != self.pid:  # inherited through a fork that bypassed the hook
            self._forget_after_fork()
        with self._cond:
            if self._owner == me and self._mode is not None:
                if mode == self._mode or self._mode == "exclusive":
                    self._depth += 1
                    return True
                raise RuntimeError(
                    f"this DirectoryLocker already holds the shared lock on {self._dir!r}; "
                    "release it before asking for the exclusive lock (no upgrades)"
                )
            # Another thread holds or is acquiring through this instance: take turns.
            while self._owner is not None:
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - _lock_clock()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._owner = me
        marker: str | None = None
        try:
            marker = self._run(mode, deadline)
        finally:
            with self._cond:
                if marker is not None:
                    self._mode, self._depth, self._marker = mode, 1, marker
                else:
                    self._owner = None
                    self._cond.notify()
        return marker is not None

    def _run(self, mode: _LockMode, deadline: float | None) -> str | None:
        """Run the marker protocol; return the held marker's path or None on timeout."""
        ticket_time = f"{time.time_ns():020d}"  # fixed for this call: age priority
        attempt = 0
        step = 0  # backoff step; back to the first when a marker we saw is gone
        last_view: frozenset[str] = frozenset()
        try:
            while True:
                if self._attempt(mode, ticket_time, first=attempt == 0) and self._claim:
                    path = os.path.join(self._dir, self._claim)
                    self._claim = None  # the instance owns it now: keep it on the way out
                    _lock_logger.debug("acquired %s lock %s", mode, path)
                    return path
                now = _lock_clock()
                if deadline is not None and now >= deadline:
                    return None
                # A marker we saw last time is gone: the lock may be ours soon,
                # so poll fast again. Arrivals do not reset (they cannot help
                # us), so a standing conflict backs off towards the cap and
                # waiters do not stampede on every newcomer's brief marker.
                step = 0 if not last_view <= self._view else step + 1
                last_view = self._view
                delay = _lock_backoff(step)
                if deadline is not None:
                    delay = min(delay, deadline - now)
                _lock_sleep(delay)
                attempt += 1
        finally:
            # Timeout or any exception (KeyboardInterrupt included) at any
            # point after a publish: take our claim back.
            if self._claim is not None:
                self._withdraw()

    def _attempt(self, mode: _LockMode, ticket_time: str, *, first: bool) -> bool:
        """Make one attempt; return whether the lock is now held (by ``self._claim``).

        The first attempt publishes at once: an uncontended acquire then costs
        one publish and one scan, and a directory we cannot write fails at
        once. Later attempts publish only if a scan shows no conflict, so that
        waiters do not churn markers (test-and-test-and-set).
        """
        if mode == "shared":
            if not first and self._readers_blocked(self._scan(None)):
                return False
            mine = self._publish("shared", lambda: _lock_token(8))
            if not self._readers_blocked(self._scan(mine)):
                return True
            self._withdraw()  # a writer is waiting or holding: it goes first
            return False
        if (
            self._claim is None
            and not first
            and self._writer_verdict(self._scan(None), ticket_time) == "yield"
        ):
            return False
        claim = self._claim or self._publish("exclusive", lambda: ticket_time + _lock_token(4))
        verdict = self._writer_verdict(self._scan(claim), _lock_name_ticket(claim))
        if verdict == "yield":
            self._withdraw()
            return False
        # "wait": we are the oldest visible claimant; keep the marker (new
        # readers see it and withdraw) while the holders drain.
        return verdict == "hold"

    # ------------------------------------------------------------- verdicts
    def _readers_blocked(self, scan: tuple[list[str], list[str]] | None) -> bool:
        """Return whether a live exclusive marker is in ``scan`` (None: our marker vanished)."""
        if scan is None:
            return True
        return any(self._live(n, _LOCK_EXCLUSIVE_PREFIX) for n in scan[1])

    def _writer_verdict(self, scan: tuple[list[str], list[str]] | None, ticket: str) -> str:
        """Return "hold", "wait" (keep our marker) or "yield" (withdraw it)."""
        if scan is None:
            return "yield"
        shared, exclusive = scan
        others = [n for n in exclusive if self._live(n, _LOCK_EXCLUSIVE_PREFIX)]
        # Ties cannot happen (tickets end in random digits); a ticket we cannot
        # parse sorts as oldest, so we yield to it. Tickets decide only who
        # waits, never safety.
        if any(_lock_name_ticket(n) < ticket for n in others):
            return "yield"
        if others:
            return "wait"  # younger claimants will see us and withdraw
        if any(self._live(n, _LOCK_SHARED_PREFIX) for n in shared):
            return "wait"
        return "hold"

    # ----------------------------------------------------- markers and scans
    def _publish(self, mode: _LockMode, new_token: Callable[[], str]) -> str:
        """Make a complete marker appear under a fresh unique name; return the name.

        The record is written to ``.lock-pending-{pid}-{token}`` (created
        O_EXCL|O_NOFOLLOW) and renamed onto ``.lock-{mode}-{pid}-{token}``, so
        no scanner ever reads a partial record. The pending name, held by
        O_EXCL, reserves the token within this pid; the final name is checked
        unused before the rename, so even a forced token collision cannot
        clobber another marker (other pids cannot collide: the pid is in the
        name).
        """
        pid = self.pid
        record = f'{_lock_record_head(pid)},"created":{time.time()!r},"mode":"{mode}"}}'.encode()
        prefix = _LOCK_SHARED_PREFIX if mode == "shared" else _LOCK_EXCLUSIVE_PREFIX
        for _ in range(_LOCK_PUBLISH_ATTEMPTS):
            token = new_token()
            name = f"{prefix}{pid}-{token}"
            final = os.path.join(self._dir, name)
            pending = os.path.join(self._dir, f"{_LOCK_PENDING_PREFIX}{pid}-{token}")
            try:
                fd = os.open(pending, _O_LOCK_PENDING, _LOCK_MARKER_MODE)
            except FileExistsError:
                continue  # token in use by another instance of this process
            except FileNotFoundError:
                _lock_make_dir(self._dir)  # the lock directory was deleted
                continue
            try:
                try:
                    if sys.platform != "win32":
                        os.fchmod(fd, _LOCK_MARKER_MODE)  # readable whatever the umask
                    _lock_write_all(fd, record)
                finally:
                    os.close(fd)
                if os.path.lexists(final):
                    _lock_unlink(pending)
                    continue
                os.rename(pending, final)
            except (FileNotFoundError, FileExistsError):
                # Pending file removed as an orphan, directory deleted, or (on
                # Windows, where rename does not replace) the name taken.
                with contextlib.suppress(OSError):
                    _lock_unlink(pending)
                continue
            except BaseException:
                with contextlib.suppress(OSError):
                    _lock_unlink(pending)
                raise
            self._claim = name
            if mode == "shared":
                self._shared_path = final
            else:
                self._exclusive_path = final
            return name
        raise FileExistsError(
            errno.EEXIST,
            f"no unused lock marker name after {_LOCK_PUBLISH_ATTEMPTS} tries",
            self._dir,
        )

    def _withdraw(self) -> None:
        """Remove our published, not-held marker (contention, timeout or exception)."""
        name, self._claim = self._claim, None
        if name is not None:
            # FileNotFoundError: the directory was deleted; nothing left to withdraw.
            with contextlib.suppress(FileNotFoundError):
                _lock_unlink(os.path.join(self._dir, name))

    def _scan(self, mine: str | None) -> tuple[list[str], list[str]] | None:
        """List the directory: (shared, exclusive) marker names other than ``mine``.

        Returns None when ``mine`` is given but missing from the listing (our
        marker was removed behind our back), so the caller withdraws and
        publishes again instead of trusting a claim nobody can see.
        """
        try:
            names = _lock_listdir(self._dir)
        except FileNotFoundError:
            _lock_make_dir(self._dir)
            names = []
        shared: list[str] = []
        exclusive: list[str] = []
        pending: list[str] = []
        found = mine is None
        for name in names:
            if not name.startswith(".lock-"):
                continue
            if name == mine:
                found = True
            elif name.startswith(_LOCK_SHARED_PREFIX):
                shared.append(name)
            elif name.startswith(_LOCK_EXCLUSIVE_PREFIX):
                exclusive.append(name)
            elif name.startswith(_LOCK_PENDING_PREFIX):
                pending.append(name)
        self._view = frozenset(shared).union(exclusive)
        if len(self._seen) > len(shared) + len(exclusive):
            current = set(shared).union(exclusive)
            self._seen = {k: v for k, v in self._seen.items() if k in current}
        if pending or self._pending_seen:
            self._sweep_pending(pending)
        if not found:
            _lock_logger.warning(
                "own lock marker %s vanished before the lock was taken; publishing again",
                os.path.join(self._dir, mine or ""),
            )
            return None
        return shared, exclusive

    def _sweep_pending(self, pending: list[str]) -> None:
        """Remove pending files that outlived their publisher (killed before rename)."""
        now = _lock_clock()
        seen = {name: self._pending_seen.get(name, now) for name in pending}
        for name, first in list(seen.items()):
            if now - first > _LOCK_PENDING_GRACE:
                with contextlib.suppress(OSError):
                    _lock_unlink(os.path.join(self._dir, name))
                    _lock_logger.warning("removed orphaned lock file %s", name)
                del seen[name]
        self._pending_seen = seen

    # ----------------------------------------------------------- staleness
    def _live(self, name: str, prefix: str) -> bool:
        """Return whether marker ``name`` counts as held; break it if proven stale."""
        seen = self._seen.get(name)
        if seen is not None and seen.dead:
            return False
        if seen is None:
            # First sight. Counting a marker as held needs no proof, only
            # breaking one does: if the pid in its name is alive here, call it
            # held without reading anything. Most markers are gone by the next
            # scan; one still there is read and judged in full then (one
            # backoff step later), which catches zombies, reused pids and
            # records that contradict their name.
            pid = _lock_name_pid(name, prefix)
            if pid is not None and _lock_pid_exists(pid):
                self._seen[name] = _LockSeen(None, math.inf, forbidden=False, read=False)
                return True
        if seen is None or not seen.read or (seen.record is None and not seen.forbidden):
            try:
                seen = self._read(name, prefix)
            except FileNotFoundError:
                # Released meanwhile. Names are never reused, so it is gone for
                # good: remember that rather than judging it again.
                gone = _LockSeen(None, 0.0, forbidden=False)
                gone.dead = True
                self._seen[name] = gone
                return False
            self._seen[name] = seen
        if seen.forbidden:
            return True  # cannot read it: fail closed
        record = seen.record
        if record is None:
            if time.time() - seen.mtime <= _LOCK_UNREADABLE_GRACE:
                return True
            self._break(name, "its record is unreadable and older than the grace period")
            return False
        if record.host != _lock_hostname() or record.pidns != _lock_pid_namespace():
            return True  # another host or pid namespace: its pids mean nothing here
        if not _lock_pid_exists(record.pid):
            self._break(name, f"its process {record.pid} is gone")
            return False
        now = _lock_clock()
        if now - seen.verified_at < _LOCK_RECHECK_INTERVAL:
            return True
        if _lock_pid_is_zombie(record.pid):
            self._break(name, f"its process {record.pid} is a zombie")
            return False
        if record.start is not None:
            token = _lock_start_token(record.pid)
            if token is not None and token != record.start:
                self._break(name, f"pid {record.pid} now belongs to another process")
                return False
        seen.verified_at = now
        return True

    def _read(self, name: str, prefix: str) -> _LockSeen:
        path = os.path.join(self._dir, name)
        try:
            fd = os.open(path, _O_LOCK_READ)
        except PermissionError:
            return _LockSeen(None, math.inf, forbidden=True)
        except FileNotFoundError:
            raise
        except OSError:  # a symlink (ELOOP) or other oddity: garbage
            try:
                mtime = os.lstat(path).st_mtime
            except FileNotFoundError:
                raise
            except OSError:
                mtime = -math.inf
            return _LockSeen(None, mtime, forbidden=False)
        try:
            mtime = os.fstat(fd).st_mtime
            try:
                data = os.read(fd, _LOCK_RECORD_MAX)
            except OSError:  # EISDIR and friends: garbage
                data = b""
        finally:
            os.close(fd)
        return _LockSeen(
            _lock_parse_record(data, _lock_name_pid(name, prefix)), mtime, forbidden=False
        )

    def _break(self, name: str, why: str) -> None:
        """Remove a marker proven stale; harmless if another scanner got there first.

        Marker names are never reused, so the name cannot have passed to a
        live holder between our verdict and the unlink.
        """
        seen = self._seen.pop(name, None)
        path = os.path.join(self._dir, name)
        try:
            _lock_unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            # Proven dead, so ignoring it is still safe; it just stays on disk.
            # Remember the verdict so that we neither retry nor warn on every scan.
            if seen is not None:
                seen.dead = True
                self._seen[name] = seen
            _lock_logger.warning(
                "stale lock marker %s (%s) could not be removed: %s", path, why, exc
            )
            return
        _lock_logger.warning("broke stale lock marker %s: %s", path, why)


def _lock_after_fork_in_child() -> None:
    """Forget, in a forked child, every hold inherited from the parent."""
    _lock_record_heads.clear()
    for locker in list(_lock_instances):
        locker._forget_after_fork()


if sys.platform != "win32":
    os.register_at_fork(after_in_child=_lock_after_fork_in_child)
