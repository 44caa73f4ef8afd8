r"""Read-modify-write of one file in one call, under that file's own lock.

Atomic writes alone do not stop a *lost update*: two processes read
``state.json``, each changes its copy and writes it back atomically, and one
change silently disappears. :func:`atomic_update` and
:func:`atomic_json_update` do the whole cycle - lock, read, transform, replace
atomically, unlock - so concurrent updaters queue up and none is lost::

    atomic_json_update("state.json", lambda d: {**d, "runs": d.get("runs", 0) + 1}, default=dict)
    atomic_update("notes.txt", lambda text: text + "one more line\n", default="")

The lock is a :class:`~htmlgraph.atomic_ops.DirectoryLocker` held exclusive in
a hidden directory beside the (resolved) file, ``.{name}.htmlgraph-lock``
(:func:`update_lock_dir` computes it; ``docs/api.md`` says why it is there and
what it protects against). The lock is advisory: every process that updates
the file must go through it (these functions, ``htmlgraph update``, or
``DirectoryLocker(update_lock_dir(path)).exclusive()`` around code of its own).
Readers that only read the file need no lock and never wait: the replace is
atomic, so they see the old or the new content.

Imports run one way: :mod:`htmlgraph.atomic_ops` <- this module <- :mod:`htmlgraph.cli`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import json
import math
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, overload

from htmlgraph import _platform, metrics
from htmlgraph.atomic_ops import (
    Chunk,
    DirectoryLocker,
    _check_permissions,
    _check_target,
    _json_document,
    _physical,
    _to_chunks,
    _write_chunks,
)

__all__ = ["LOCK_SUFFIX", "atomic_json_update", "atomic_update", "update_lock_dir"]

StrPath = str | os.PathLike[str]
T = TypeVar("T")

#: The lock directory of ``dir/name`` is ``dir/.{name}{LOCK_SUFFIX}``.
LOCK_SUFFIX = ".htmlgraph-lock"
_NAME_MAX = 255  # bytes in one name: ext4, xfs, btrfs, tmpfs, APFS (NTFS: UTF-16 units)
_HASH_CHARS = 16  # hex digits of SHA-256 that stand for a name too long to repeat

_READ_CHUNK = 1 << 20


class _Missing(enum.Enum):
    """The type of :data:`_MISSING`: "no default given" (None is a valid JSON default)."""

    MISSING = enum.auto()


_MISSING = _Missing.MISSING


# --------------------------------------------------------------------------
# Where the lock lives
# --------------------------------------------------------------------------


def _check(path: StrPath) -> str:
    """Return ``path`` as an absolute ``str``, checked and resolved as a write target is.

    The same rules as :func:`~htmlgraph.atomic_ops.atomic_write` (one home):
    ``..`` after a symlinked directory is resolved as the kernel does, so the
    lock is beside the file the write will replace.
    """
    return _physical(_platform.absolute(_check_target(path)))


def _resolve(path: StrPath) -> str:
    """Return ``path`` absolute with every symlink resolved (the canonical spelling)."""
    # realpath resolves a dangling link to the file it would create.
    return os.path.realpath(_check(path))


def _target(path: StrPath) -> tuple[str, bool]:
    """Return the file an update of ``path`` works on, and whether it exists.

    The lock directory is named beside this path. Only a final symlink needs
    resolving for every spelling of a file to meet in one lock directory: a
    symlinked *parent* already leads into the same physical directory, so its
    lock directory is the same one. That spares the per-component ``lstat``
    of :func:`os.path.realpath` on every update. ``..`` is resolved
    as :func:`~htmlgraph.atomic_ops.atomic_write` resolves it (as the kernel does).
    """
    target = _check(path)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return target, False
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(target)
        return target, os.path.lexists(target)
    return target, True


def _lock_name(name: str) -> str:
    """Return the lock directory's name for a file called ``name`` (at most 255 bytes)."""
    full = f".{name}{LOCK_SUFFIX}"
    if len(full.encode("utf-8", "surrogateescape")) <= _NAME_MAX:
        return full
    # Too long to repeat whole: keep a readable head and let a hash of the
    # whole name keep two long names that share that head apart.
    raw = name.encode("utf-8", "surrogateescape")
    digest = hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]
    room = _NAME_MAX - len(f".~{digest}{LOCK_SUFFIX}")
    # "ignore" drops a character cut in two (and bytes that are not UTF-8):
    # what is left re-encodes to at most ``room`` bytes.
    head = raw[:room].decode("utf-8", "ignore")
    return f".{head}~{digest}{LOCK_SUFFIX}"


def update_lock_dir(path: StrPath) -> Path:
    """Return the lock directory every updater of ``path`` uses.

    ``path`` is resolved first (symlinks followed, made absolute), so every
    spelling of one file - through a symlink, relative, with ``..`` - gets
    one lock. The directory is ``.{name}.htmlgraph-lock`` beside the resolved
    file; for a name too long for that to fit in 255 bytes, its head plus
    ``~`` and 16 hex digits of the name's SHA-256. Pure computation: nothing
    is created or checked.

    Args:
        path: The file to be updated (it need not exist).

    Returns:
        The absolute lock directory path.
    """
    real = _resolve(path)
    directory, name = os.path.split(real)
    return Path(directory, _lock_name(name))


def _check_lock_dir(lock_dir: str, target: str) -> bool:
    """Refuse a lock directory a stranger planted: a symlink, a non-directory, another's.

    Returns whether it exists (if not, a stranger may plant one before our
    ``mkdir``: the caller checks again once the lock is held).

    The directory beside the file is a name anyone who can write the
    directory may create first. A symlink would move our markers somewhere
    else (and two updaters could disagree about where): refused. In a sticky
    world-writable directory such as ``/tmp`` a directory owned by someone
    other than us, root or the file's owner is a stranger's: its owner could
    hold or fake our lock at will, so it is refused too.
    """
    try:
        st = os.lstat(lock_dir)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "update lock directory is a symlink; refusing it", lock_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(
            errno.ENOTDIR, "update lock path exists and is not a directory", lock_dir
        )
    if _platform.trusted_owner(st):  # (always, on Windows: no owners, no sticky bit)
        return True
    with contextlib.suppress(OSError):
        if os.stat(target).st_uid == st.st_uid:
            return True  # the file's owner made it
    parent = os.stat(os.path.dirname(lock_dir))
    if parent.st_mode & stat.S_ISVTX and parent.st_mode & stat.S_IWOTH:
        raise PermissionError(
            errno.EPERM,
            f"update lock directory belongs to uid {st.st_uid}, a stranger, in a sticky "
            "world-writable directory; refusing it",
            lock_dir,
        )
    return True


# Each thread keeps its lockers (a DirectoryLocker per lock directory, the
# most recent _LOCKERS_KEPT of them): a new instance costs a makedirs per
# update. Each thread its own, so that threads exclude each other as separate
# owners. ``held`` lists the lock directories this thread holds right now.
_LOCKERS_KEPT = 32
# How long a waiting updater lets a process that updates again at once keep
# the file's lock before it claims its turn (DirectoryLocker's bounded
# barging; at most half the timeout). Updates are short and often come in
# runs from one process: a hand-off per update cost half the throughput of
# flock-based loops (docs/benchmarks.md, issue 17), and 1 s still bounds
# any updater's wait.
_HANDOFF_AFTER = 1.0
_local = threading.local()


def _thread_state() -> tuple[dict[str, DirectoryLocker], set[str]]:
    try:
        return _local.lockers, _local.held
    except AttributeError:
        _local.lockers, _local.held = {}, set()
        return _local.lockers, _local.held


def _forget_in_child() -> None:
    # A child forked inside an update does not hold its parent's lock.
    _local.__dict__.pop("held", None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@contextlib.contextmanager
def _locked(path: StrPath, timeout: float | None, *, create: bool) -> Iterator[str]:
    """Hold ``path``'s update lock; yield the path of the file to read and replace.

    Args:
        path: The file.
        timeout: Seconds to wait for the lock; None waits without limit.
        create: Whether the caller will create a missing file. If not and
            the file is missing, FileNotFoundError is raised at once, before
            anything is created.

    Raises:
        LockTimeout: The lock was not acquired within ``timeout``.
        RuntimeError: This thread is already updating the file (an update
            called from inside its own ``fn`` would wait for itself forever).
    """
    target, exists = _target(path)
    if not exists and not create:
        raise FileNotFoundError(errno.ENOENT, "file does not exist (and no default)", target)
    directory, name = os.path.split(target)
    lock_dir = os.path.join(directory, _lock_name(name))
    existed = _check_lock_dir(lock_dir, target)
    lockers, held = _thread_state()
    if lock_dir in held:
        raise RuntimeError(
            f"{target} is already being updated by this thread: an update from inside "
            "its own fn would wait for itself"
        )
    locker = lockers.pop(lock_dir, None)
    if locker is None:
        locker = DirectoryLocker(lock_dir, handoff_after=_HANDOFF_AFTER)
        if len(lockers) >= _LOCKERS_KEPT:
            del lockers[next(iter(lockers))]  # the least recently used
    lockers[lock_dir] = locker
    wait = math.inf if timeout is None else timeout
    try:
        held.add(lock_dir)  # inside: an interrupt in add must not leave it there
        with locker.exclusive(timeout=wait):
            if not existed:
                # Made since the check: ours, or planted in between (then
                # our marker went where a stranger chose; it goes now, and
                # so does the locker, which resolved the planted path).
                try:
                    _check_lock_dir(lock_dir, target)
                except OSError:
                    lockers.pop(lock_dir, None)
                    raise
            yield target
    finally:
        held.discard(lock_dir)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


_UPDATES = {
    True: metrics.counter("htmlgraph_updates_total", result="written"),
    False: metrics.counter("htmlgraph_updates_total", result="unchanged"),
}


def _count(result: object) -> None:
    _UPDATES[result is not None].inc()


def _read(real: str) -> bytes | None:
    """Return the whole content of regular file ``real``, or None if it does not exist.

    Opened no-follow and non-blocking, and checked to be a regular file
    before it is read (DESIGN 5: never block on a FIFO someone planted).
    """
    try:
        # No-follow: the path is resolved, so a symlink now is a swap.
        fd = os.open(real, _platform.O_READ | _platform.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "cannot update a directory", real)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "cannot update what is not a regular file", real)
        # One read of the size fstat gave, plus one byte: a regular file's
        # read comes back short only at its end, so that is the whole file
        # unless it grew meanwhile, when it is read on in chunks. Never a 1 MiB
        # buffer for a 100-byte file: a large bytes object costs an mmap and
        # page faults.
        first = os.read(fd, st.st_size + 1)
        if len(first) <= st.st_size:
            return first
        parts = [first]
        while parts[-1]:
            parts.append(os.read(fd, _READ_CHUNK))
        return b"".join(parts)
    finally:
        os.close(fd)


def _replace(real: str, chunks: Iterable[Chunk], durable: bool, permissions: int | None) -> None:
    """Replace ``real`` all-or-nothing: ``atomic_write``'s own steps, the arguments checked."""
    _write_chunks(
        real, chunks, durable=durable, overwrite=True, permissions=permissions, temp_dir=None
    )


def _initial(default: T | Callable[[], T] | _Missing, real: str) -> T:
    """Return the value standing for a missing file: ``default`` or ``default()``."""
    if default is _MISSING:  # pragma: no cover - the callers check first
        raise FileNotFoundError(errno.ENOENT, "file does not exist (and no default)", real)
    if callable(default):
        return default()
    return default


# --------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------


@overload
def atomic_update(
    path: StrPath,
    fn: Callable[[str], str | None],
    *,
    default: str | Callable[[], str] | _Missing = ...,
    binary: Literal[False] = False,
    encoding: str = "utf-8",
    timeout: float | None = None,
    durable: bool = True,
    permissions: int | None = None,
) -> str | None: ...


@overload
def atomic_update(
    path: StrPath,
    fn: Callable[[bytes], bytes | None],
    *,
    default: bytes | Callable[[], bytes] | _Missing = ...,
    binary: Literal[True],
    encoding: str = "utf-8",
    timeout: float | None = None,
    durable: bool = True,
    permissions: int | None = None,
) -> bytes | None: ...


def atomic_update(
    path: StrPath,
    fn: Callable[[str], str | None] | Callable[[bytes], bytes | None],
    *,
    default: str | bytes | Callable[[], str] | Callable[[], bytes] | _Missing = _MISSING,
    binary: bool = False,
    encoding: str = "utf-8",
    timeout: float | None = None,
    durable: bool = True,
    permissions: int | None = None,
) -> str | bytes | None:
    r"""Replace ``path`` with ``fn(current content)`` under the file's own lock.

    Under the exclusive lock that belongs to this one file
    (:func:`update_lock_dir`), reads the whole file, calls ``fn`` with it and,
    unless ``fn`` returns None, replaces the file with the result
    all-or-nothing (:func:`~htmlgraph.atomic_ops.atomic_write`). Concurrent
    updaters - threads or processes, each through this function,
    :func:`atomic_json_update` or ``htmlgraph update`` - run one at a time,
    so no update is lost. Atomic against readers and crashes; durable when
    ``durable`` (the default); readers need no lock. An exception in ``fn``
    (``KeyboardInterrupt`` included) changes nothing. The lock is released
    however the call ends; a process killed while holding it never blocks
    the next one (its marker is broken once its pid is gone).

    Text is decoded with ``encoding`` and, on POSIX, passed on exactly as
    stored (no newline translation; Windows turns ``\r\n`` into ``\n`` and
    back, as :func:`~htmlgraph.atomic_ops.atomic_write` does). An existing
    file keeps its mode and, as root, its owner; a symlink is followed and
    kept, and the lock is the resolved file's, shared by every spelling.

    Args:
        path: The file to update.
        fn: Takes the current content (``str``, or ``bytes`` when ``binary``)
            and returns the new content, or None to leave the file untouched.
        default: The content to start from when the file does not exist, or
            a zero-argument callable that makes it (called only then). Without
            a default a missing file raises FileNotFoundError.
        binary: Pass and expect ``bytes`` instead of ``str``.
        encoding: The text encoding (text mode only).
        timeout: Seconds to wait for the lock; ``0`` makes one attempt; None
            (the default) waits without limit.
        durable: Fsync the data and the directory (see ``atomic_write``).
        permissions: Mode bits for the result (default: keep the file's, or
            ``0o666 & ~umask`` for a new one); checked before the lock is taken.

    Returns:
        What ``fn`` returned: the new content, or None if the file was left
        untouched.

    Raises:
        FileNotFoundError: The file does not exist and there is no default.
        LockTimeout: The lock was not acquired within ``timeout`` (``fn`` was
            not called).
        TypeError: ``fn`` returned something other than ``str`` (``bytes``
            when ``binary``) or None; the file is untouched.
        UnicodeDecodeError: The file is not valid text in ``encoding``.
        OSError: Reading, locking or writing failed (the file is untouched).
    """
    _check_permissions(permissions)
    with _locked(path, timeout, create=default is not _MISSING) as real:
        data = _read(real)
        if data is None and default is _MISSING:
            raise FileNotFoundError(errno.ENOENT, "file does not exist (and no default)", real)
        if binary:
            current_bytes = (
                data
                if data is not None
                else _initial(cast("bytes | Callable[[], bytes]", default), real)
            )
            result: str | bytes | None = cast("Callable[[bytes], bytes | None]", fn)(current_bytes)
            if result is not None and not isinstance(result, (bytes, bytearray)):
                raise TypeError(
                    f"cannot update {real}: fn must return bytes or None in binary mode, "
                    f"not {type(result).__name__}"
                )
        else:
            if data is None:
                current = _initial(cast("str | Callable[[], str]", default), real)
            else:
                current = data.decode(encoding)
                if os.linesep != "\n":
                    current = current.replace(os.linesep, "\n")
            result = cast("Callable[[str], str | None]", fn)(current)
            if result is not None and not isinstance(result, str):
                raise TypeError(
                    f"cannot update {real}: fn must return str or None, not {type(result).__name__}"
                )
        if result is not None:
            _replace(real, _to_chunks(real, result, encoding), durable, permissions)
        _count(result)
        return result


# A JSON document's type is only known at run time, as for json.load (which
# returns Any): a type variable would make mypy reject valid calls such as
# ``atomic_json_update(p, lambda d: None, default=dict)``.
def atomic_json_update(
    path: StrPath,
    fn: Callable[[Any], object],
    *,
    default: object = _MISSING,
    timeout: float | None = None,
    durable: bool = True,
    permissions: int | None = None,
    indent: int | None = 2,
    sort_keys: bool = False,
) -> Any:  # noqa: ANN401 - see above
    """Replace JSON file ``path`` with ``fn(parsed content)`` under the file's own lock.

    :func:`atomic_update` for JSON: under the file's exclusive lock, parses
    the file (strict: UTF-8, no NaN or Infinity), calls ``fn`` with the value
    and, unless ``fn`` returns None, writes its result with
    :func:`~htmlgraph.atomic_ops.atomic_json_write` (UTF-8, ``indent=2`` by
    default, trailing newline) all-or-nothing. Atomic, durable and safe
    across threads and processes exactly as :func:`atomic_update`. A file
    that is not valid JSON raises ValueError naming it and stays untouched;
    so does a result JSON cannot represent (``fn`` may return any JSON value,
    serialised before the disk is touched).

    Args:
        path: The JSON file to update.
        fn: Takes the parsed value and returns the new one, or None to leave
            the file untouched. It may change the value in place and return it.
        default: The value to start from when the file does not exist, or a
            zero-argument callable that makes it (``default=dict`` gives a
            fresh ``{}`` each time). Without a default a missing file raises
            FileNotFoundError.
        timeout: Seconds to wait for the lock (None: without limit).
        durable: Fsync the data and the directory.
        permissions: Mode bits for the result (default: keep the file's);
            checked before the lock is taken.
        indent: As for ``atomic_json_write`` (None: compact, faster).
        sort_keys: As for ``atomic_json_write``.

    Returns:
        What ``fn`` returned, or None if the file was left untouched.

    Raises:
        FileNotFoundError: The file does not exist and there is no default.
        ValueError: The file is not valid JSON (the message names it; the
            parser's error is its ``__cause__``), or the result holds NaN,
            infinity or a cycle.
        TypeError: The result holds a value JSON cannot represent.
        LockTimeout: The lock was not acquired within ``timeout``.
        OSError: Reading, locking or writing failed (the file is untouched).
    """
    _check_permissions(permissions)
    with _locked(path, timeout, create=default is not _MISSING) as real:
        data = _read(real)
        if data is None:
            if default is _MISSING:
                raise FileNotFoundError(errno.ENOENT, "file does not exist (and no default)", real)
            value = default() if callable(default) else default
        else:
            value = _parse_json(data, real)
        result = fn(value)
        if result is not None:
            document = _json_document(result, real, indent=indent, sort_keys=sort_keys)
            _replace(real, (document,), durable, permissions)
        _count(result)
        return result


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_json(data: bytes, real: str) -> object:
    """Parse ``data`` as one strict JSON document; ValueError naming ``real`` if not."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{real} is not valid JSON: not UTF-8 at byte {exc.start}") from exc
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{real} is not valid JSON: {exc}") from exc
