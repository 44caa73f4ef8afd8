"""Atomic, crash-safe file writes and a marker-file reader/writer lock.

This module is the one home of htmlgraph's file-safety API. It reads top to
bottom in three sections, each opening with what it guarantees:

1. **The writer** - :class:`AtomicFileWriter`, :func:`atomic_write`,
   :func:`atomic_json_write`: replace a file all-or-nothing. A reader of the
   target sees the complete old or the complete new content, never a mix, an
   empty or a partial file - while the write runs, after a ``kill -9`` at any
   instant and, with ``durable=True`` (the default), after a power cut.
2. **The helpers** around it - :func:`atomic_rename`, :func:`safe_temp_file`,
   :func:`cleanup_orphaned_temp_files` (and its dry run
   :func:`find_orphaned_temp_files`), :func:`validate_atomic_write`.
3. **The lock** - :class:`DirectoryLocker`, a reader/writer lock between
   processes made only of marker files, for read-modify-write of shared files
   (the protocol and its correctness argument are in ``docs/locking.md``);
   :class:`LockTimeout` is its ``TimeoutError``.

The commit order of a durable write (``docs/guarantees.md`` says why each step
is there)::

    mkstemp(O_CREAT|O_EXCL|O_NOFOLLOW) -> fchmod -> write all -> fsync(temp)
    -> close -> rename(temp, target) -> fsync(directory)

Whatever differs between operating systems is decided in
:mod:`htmlgraph._platform`; who owns a temp or a marker, and whether that owner
is gone, in :mod:`htmlgraph._identity`. Tests inject faults through the
seams ``_fsync``, ``_fsync_dir``, ``_replace``, ``_random_token``, ``_sleep``,
``_listdir`` and ``_unlink`` of this module.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import errno
import functools
import io
import json
import logging
import math
import os
import random
import re
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, AnyStr, Generic, Literal, NamedTuple, Union, cast, overload

from htmlgraph import _identity, _platform, metrics
from htmlgraph._validation import invalid_reason

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "AtomicFileWriter",
    "DirectoryLocker",
    "LockTimeout",
    "atomic_json_write",
    "atomic_rename",
    "atomic_write",
    "cleanup_orphaned_temp_files",
    "find_orphaned_temp_files",
    "safe_temp_file",
    "validate_atomic_write",
]

logger = logging.getLogger(__name__)

StrPath = Union[str, "os.PathLike[str]"]

# Seams: tests replace these through the module (monkeypatch.setattr(
# atomic_ops, "_fsync", boom)); the code below always calls them by name.
_fsync: Callable[[int], None] = _platform.fsync_file
_fsync_dir: Callable[[str], None] = _platform.fsync_dir
_replace: Callable[[str, str], None] = _platform.replace


def _random_token(nbytes: int = 8) -> str:
    """Return ``2 * nbytes`` random hex digits: the one source of randomness in our names.

    Unpredictable (``os.urandom``), so another user cannot pre-create a lock
    marker's or :func:`safe_temp_file`'s name; ``O_EXCL`` makes a collision
    fail loudly anyway. (Temp files take their random part from mkstemp.)
    """
    return os.urandom(nbytes).hex()


# ==========================================================================
# 1. The writer
#
# A write stages the new content in a temp file beside the target (created
# by tempfile.mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW, written through that fd and
# never reopened by name), makes it durable, and renames it onto the target.
# Any exception before the rename (KeyboardInterrupt included) removes the
# temp and leaves the target untouched. The target is resolved as open()
# would, under the kernel's rules for shared directories: a symlink is
# followed only where fs.protected_symlinks allows it, an existing file is
# replaced only where fs.protected_regular allows it, and a directory, FIFO,
# device or socket is refused, never replaced.
# ==========================================================================

# Temp files are named ".tmp-{pid}-{owner tag}-{random}-{target name}": the
# seed's cleanup pattern is ".tmp-*", and the pid with its owner tag (host,
# pid namespace and process start, _identity.owner_tag) let cleanup spare
# the temp of a write still running, in this namespace or any other.
TEMP_PREFIX = ".tmp-"
_OWN_TEMP = re.compile(r"\.tmp-([0-9]{1,10})-([0-9a-f]{16})-")
_NAME_MAX = 255  # bytes; ext4, xfs, btrfs, tmpfs, NTFS (in UTF-16 units) and APFS
_TEMP_RANDOM = 16  # random characters between prefix and suffix (8 hex + mkstemp's 8)
_TEMP_ATTEMPTS = 100
# The stdlib's mkstemp, to tell whether a caller replaced it (_Staged._create_with_mkstemp).
_STDLIB_MKSTEMP = tempfile.mkstemp
_MAX_LINKS = 40  # symlinks followed in a row, as Linux's MAXSYMLINKS
# The file object's buffer: json.dump and other streaming writers emit many
# small pieces, and this sets how many write() calls they become.
_BUFFER_SIZE = 128 * 1024

# What writes did and cost (htmlgraph.metrics; docs/metrics.md).
_WRITES = {
    durable: metrics.counter("htmlgraph_writes_total", durable=str(durable).lower())
    for durable in (True, False)
}
_WRITE_BYTES = metrics.counter("htmlgraph_write_bytes_total")
_FSYNC_FILE = metrics.histogram("htmlgraph_fsync_seconds", target="file")
_FSYNC_DIR = metrics.histogram("htmlgraph_fsync_seconds", target="directory")
_RENAME = metrics.histogram("htmlgraph_rename_seconds")


def _count_failure(exc: OSError) -> None:
    name = errno.errorcode.get(exc.errno, "unknown") if exc.errno else "unknown"
    metrics.counter("htmlgraph_write_failures_total", errno=name).inc()


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class _PathTypeError(TypeError, ValueError):
    """A path argument of the wrong type: a TypeError, and the seed's documented ValueError."""


def _check_path(path: object, what: str = "path") -> str:
    """Return ``path`` as a ``str``; raise ValueError (also a TypeError for a wrong type)."""
    if isinstance(path, str):
        text = path
    elif isinstance(path, os.PathLike):
        text = os.fspath(path)
        if not isinstance(text, str):
            raise _PathTypeError(f"{what} must be str or os.PathLike[str], not bytes: {text!r}")
    else:
        raise _PathTypeError(f"{what} must be str or os.PathLike[str], not {type(path).__name__}")
    if not text:
        raise ValueError(f"{what} must not be empty")
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL byte: {text!r}")
    return text


def _check_target(path: object) -> str:
    """Check a write target: a valid path that names a file, not a directory."""
    text = _check_path(path, "target path")
    if text.endswith((os.sep, os.altsep or os.sep)):
        raise IsADirectoryError(errno.EISDIR, "target path ends with a separator", text)
    return text


def _check_permissions(permissions: int | None) -> None:
    if permissions is None:
        return
    if isinstance(permissions, bool) or not isinstance(permissions, int):
        raise TypeError(f"permissions must be an int such as 0o644, not {permissions!r}")
    if not 0 <= permissions <= 0o7777:
        raise ValueError(f"permissions must be between 0o0 and 0o7777, not {permissions:#o}")


def _physical(path: str) -> str:
    """Return ``path`` with ".." in its directory resolved as the kernel does.

    Through a symlinked directory, ``link/../f`` is ``f`` beside the link's
    *target*, not ``./f`` - yet ``os.path.abspath`` (and ``tempfile.mkstemp``,
    which calls it) would drop ``link/..`` as text. Such a directory is
    resolved physically (``realpath``); other paths are left to the kernel.
    """
    if ".." not in path:
        return path
    head, name = os.path.split(path)
    if os.pardir in head.split(os.sep):
        return os.path.join(os.path.realpath(head), name)
    return path


def _resolve(target: str) -> tuple[str, os.stat_result | None]:
    """Return the file a write to ``target`` must replace, and its ``lstat`` (None: new).

    The common case (a regular file of ours, or no file yet) costs one
    ``lstat`` and one ``geteuid``; anything else branches to
    :func:`_resolve_unusual`.
    """
    target = _physical(target)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return target, None
    if not stat.S_ISREG(st.st_mode):
        return _resolve_unusual(target, st)
    _check_may_replace(target, st)
    return target, st


def _resolve_unusual(target: str, st: os.stat_result) -> tuple[str, os.stat_result | None]:
    """Follow symlinks as the kernel would let ``open()``; refuse what is not a regular file.

    A symlink is written through: the temp goes beside the file it names, so
    the rename never crosses filesystems, and a dangling link makes the call
    create the file it names (DESIGN 2.6). Each link is followed only where
    ``fs.protected_symlinks`` would let ``open()`` follow it.
    """
    link = target
    links = 0
    while stat.S_ISLNK(st.st_mode):
        links += 1
        if links > _MAX_LINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), link)
        if not _platform.may_follow_link(target, st):
            raise PermissionError(
                errno.EACCES,
                "refusing to follow a symlink that another user owns in a sticky "
                "world-writable directory (the kernel's fs.protected_symlinks rule)",
                target,
            )
        target = _physical(os.path.join(os.path.dirname(target), os.readlink(target)))
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return target, None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "target is a directory", target)
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise OSError(
            errno.EINVAL, f"target is {kind}, not a regular file: refusing to replace it", target
        )
    _check_may_replace(target, st)
    return target, st


def _check_may_replace(target: str, st: os.stat_result) -> None:
    if not _platform.may_replace(target, st):
        raise PermissionError(
            errno.EACCES,
            "refusing to write a file that another user owns in a sticky directory "
            "(the kernel's fs.protected_regular rule)",
            target,
        )


def _fit(name: str, room: int) -> str:
    """Return ``name`` cut to at most ``room`` UTF-8 bytes, without a broken character."""
    if len(name) * 4 <= room:  # no UTF-8 character is longer than 4 bytes
        return name
    return name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")


def _temp_affixes(name: str) -> tuple[str, str]:
    """Return the (prefix, suffix) around a temp's 16 random characters, for ``name``.

    ``.tmp-{pid}-{owner tag}-`` and ``-{name}``, the name cut so that the
    whole is at most 255 bytes.
    """
    prefix = _temp_head(_platform.current_pid())
    room = _NAME_MAX - len(prefix) - _TEMP_RANDOM - 1  # prefix is ASCII: chars are bytes
    return prefix, "-" + _fit(name, room)


@functools.lru_cache(maxsize=1)
def _temp_head(pid: int) -> str:
    """``.tmp-{pid}-{owner tag}-`` for this process (a forked child has another pid)."""
    return f"{TEMP_PREFIX}{pid}-{_identity.owner_tag(pid)}-"


def _make_dirs(directory: str) -> list[str]:
    """Create ``directory`` and its missing parents; return those this call created."""
    missing: list[str] = []
    current = directory
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    created: list[str] = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
        else:
            created.append(path)
    return created


def _remove_dirs(created: list[str]) -> None:
    """Remove directories :func:`_make_dirs` created, innermost first (cleaning up)."""
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            return  # not empty any more (someone else uses it) or gone: leave the rest


def _sync_created_dirs(directory: str, created: list[str]) -> None:
    """Make the target directory's entries and every directory we created durable.

    A new directory's own entry lives in its parent, so each parent of a
    created directory is synced too (innermost first, ending at the first
    directory that already existed).
    """
    done = {directory}
    _fsync_dir(directory)
    for path in reversed(created):
        parent = os.path.dirname(path)
        if parent not in done:
            done.add(parent)
            _fsync_dir(parent)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` to ``fd``: os.write may write less than asked."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        if written == 0:  # no progress and no error: do not spin
            raise OSError(errno.EIO, "write() wrote nothing")
        view = view[written:]


def _name_target(exc: OSError, target: str) -> None:
    """Let an error from a call on the temp's fd (write, fsync, close) name the target.

    Such calls carry no file name, and "No space left on device" alone does
    not say which write failed. The original exception is kept and re-raised.
    """
    if exc.filename is None:
        exc.filename = target


def _match_target(
    fd: int, mode: int, target: os.stat_result | None, *, created_with: bool = False
) -> None:
    """Give the new file open as ``fd`` ``mode`` and, when it replaces ``target``, its owner.

    One ``fstat`` shows what the kernel made: the umask may have removed bits
    from the mode the file was created with (``created_with``), and the owner
    is ours, or the directory's group when it is setgid. Only what differs is
    changed, on the fd, never by name (pallets/click#3824: chmod by path
    follows a symlink swapped in meanwhile). The owner goes first: ``chown``
    clears set-user-ID and set-group-ID bits, even for root. The owner given
    is only ever the replaced file's own. Used by every writer that stages a
    file: ``atomic_write``'s temp and a batch's staged files.
    """
    made = os.fstat(fd)
    if target is not None and (made.st_uid, made.st_gid) != (target.st_uid, target.st_gid):
        _platform.keep_owner(fd, target.st_uid, target.st_gid)
        _platform.set_mode(fd, mode)
    elif not created_with or stat.S_IMODE(made.st_mode) != mode:
        _platform.set_mode(fd, mode)


class _Staged:
    """One temp file in the making: the low-level state shared by every writer.

    Lifecycle: creating it resolves and checks the target and opens the temp
    (creating missing directories), :meth:`commit` makes it the target,
    :meth:`discard` removes it. ``discard`` is idempotent and a no-op after a
    successful commit, so it is safe in any ``finally``.
    """

    __slots__ = (
        "committed",
        "created_dirs",
        "directory",
        "fd",
        "overwrite",
        "size",
        "target",
        "temp",
    )

    def __init__(
        self,
        target_path: str,
        temp_dir: str | None,
        *,
        overwrite: bool,
        permissions: int | None,
    ) -> None:
        """Resolve ``target_path``, check it, and open a fresh temp file for it.

        The arguments were checked by the caller (:func:`_check_target`,
        :func:`_check_permissions`).
        """
        target, st = _resolve(_platform.absolute(target_path))
        # The mode the file must end with: permissions=, else the target's own,
        # else that of open() for a new file: 0o666 & ~umask (mkstemp's 0o600
        # is the most common complaint against the peers, DESIGN 2.5).
        mode = permissions
        if st is not None:
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "target exists (overwrite=False)", target)
            if mode is None:
                mode = stat.S_IMODE(st.st_mode)
        directory, name = os.path.split(target)
        self.target = target
        self.directory = directory
        self.overwrite = overwrite
        self.committed = False
        self.created_dirs: list[str] = []
        self.size = 0  # bytes written to the temp, for the metrics
        self.fd = -1
        self.temp = ""
        parent = directory
        if temp_dir is not None:
            self.created_dirs = _make_dirs(directory)
            parent = os.path.realpath(temp_dir)
        try:
            if tempfile.mkstemp is _STDLIB_MKSTEMP:
                self._create(parent, name, mode, created_here=temp_dir is None)
                if mode is not None:
                    _match_target(self.fd, mode, st, created_with=True)
            else:
                self._create_with_mkstemp(parent, name, created_here=temp_dir is None)
                _match_target(self.fd, 0o666 & ~_platform.umask() if mode is None else mode, st)
        except BaseException:
            self.discard()
            raise

    def _create(self, parent: str, name: str, mode: int | None, *, created_here: bool) -> None:
        """Create the temp in ``parent``: ``O_CREAT|O_EXCL|O_NOFOLLOW``, with its final mode.

        Created with the mode it must end with, the temp is never more open
        than the target and usually needs no ``fchmod`` (each one measurably
        slows a durable write on ext4). A new file gets ``0o666``, to which
        the kernel applies the umask (and a directory's default ACL), as for
        ``open()``. The name is chosen, and recorded, before the call that
        creates it, so an interruption right after it leaves nothing behind.
        """
        # Owner-writable while staged: Windows cannot replace a read-only file.
        create_mode = 0o666 if mode is None else mode | stat.S_IWUSR
        prefix, suffix = _temp_affixes(name)
        prefix = os.path.join(parent, prefix)
        made_dirs = False
        for _ in range(_TEMP_ATTEMPTS):
            self.temp = f"{prefix}{_random_token(8)}{suffix}"
            try:
                self.fd = os.open(self.temp, _platform.O_NEW_FILE, create_mode)
            except FileExistsError:
                self.temp = ""  # not ours: draw another name
                continue
            except FileNotFoundError:
                self.temp = ""
                if made_dirs:
                    raise
                # A missing directory, looked for only now, off the common path.
                made_dirs = True
                created = _make_dirs(parent)
                if created_here:
                    self.created_dirs = created
                continue
            return
        raise FileExistsError(
            errno.EEXIST, f"no free temp name after {_TEMP_ATTEMPTS} attempts", parent
        )

    def _create_with_mkstemp(self, parent: str, name: str, *, created_here: bool) -> None:
        """Create the temp through a ``tempfile.mkstemp`` that a caller replaced.

        htmlgraph 1.3 created its temps with ``tempfile.mkstemp``, and its
        users' tests simulate a full disk by patching it; a patched mkstemp is
        therefore honoured (the stdlib's own is bypassed for speed, see
        :meth:`_create`). A signal can raise after mkstemp created the file
        but before its name reached us; then the file is found by this
        call's own prefix and removed.
        """
        prefix, suffix = _temp_affixes(name)
        prefix += _random_token(4)
        try:
            try:
                self.fd, self.temp = tempfile.mkstemp(suffix, prefix, parent)
            except FileNotFoundError:
                created = _make_dirs(parent)
                if created_here:
                    self.created_dirs = created
                self.fd, self.temp = tempfile.mkstemp(suffix, prefix, parent)
        except OSError:
            raise  # nothing was created
        except BaseException:
            if not self.temp:
                with contextlib.suppress(OSError), os.scandir(parent) as entries:
                    for entry in entries:
                        if entry.name.startswith(prefix):
                            os.unlink(entry.path)
            raise

    def commit(self, *, durable: bool) -> None:
        """Make the temp file the target: fsync, close, rename, fsync directory.

        Args:
            durable: Sync the data before the rename and the directory after.
        """
        fd = self.fd
        self.fd = -1
        try:
            if durable:
                # A failed fsync is final: never retried, never committed.
                started = time.perf_counter()
                _fsync(fd)
                _FSYNC_FILE.observe(time.perf_counter() - started)
        finally:
            os.close(fd)
        started = time.perf_counter()
        if self.overwrite:
            _replace(self.temp, self.target)
            self.committed = True
        else:
            # Create-only: link() fails with EEXIST instead of clobbering a file
            # that appeared since we checked.
            os.link(self.temp, self.target)
            self.committed = True
            try:
                os.unlink(self.temp)
            except OSError as exc:  # the target is in place; the extra name is an orphan
                logger.warning("could not remove temp link %s: %s", self.temp, exc)
        _RENAME.observe(time.perf_counter() - started)
        if durable:
            started = time.perf_counter()
            _sync_created_dirs(self.directory, self.created_dirs)
            _FSYNC_DIR.observe(time.perf_counter() - started)
        _WRITES[durable].inc()
        _WRITE_BYTES.inc(self.size)

    def discard(self) -> None:
        """Close and remove the temp file; idempotent, a no-op after commit."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):  # cleaning up after another error
                os.close(fd)
        if self.temp and not self.committed:
            temp, self.temp = self.temp, ""
            try:
                _platform.unlink(temp)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.debug("could not remove temp file %s: %s", temp, exc)


class _TempFileIO(io.FileIO):
    """The temp file's raw stream: a write error names the target (the fd has no name)."""

    staged: _Staged

    def write(self, data: Buffer, /) -> int:
        try:
            written = super().write(data)
        except OSError as exc:
            _name_target(exc, self.staged.target)
            raise
        self.staged.size += written
        return written


Chunk = bytes | bytearray | memoryview
_ENCODE_SLICE = 1 << 20  # characters encoded at a time for large text


def _to_chunks(path: str, content: object, encoding: str) -> Iterable[Chunk]:
    """Return ``content`` as the bytes to write, checking its type first.

    Text is encoded with ``encoding``, each newline becoming the platform's
    line separator as with open(path, "w"). Small text is encoded here, before
    the disk is touched; large text (over a million characters) is encoded in
    slices while it is written, so that a 64 MiB str does not need a second
    64 MiB buffer (the codec is still looked up here).
    """
    if isinstance(content, (bytes, bytearray, memoryview)):
        return (content,)
    if not isinstance(content, str):
        raise TypeError(f"content for {path} must be str or bytes, not {type(content).__name__}")
    if len(content) <= _ENCODE_SLICE:
        if os.linesep != "\n":
            content = content.replace("\n", os.linesep)
        return (content.encode(encoding),)
    return _encode_slices(content, codecs.getincrementalencoder(encoding)())


def _encode_slices(text: str, encoder: codecs.IncrementalEncoder) -> Iterator[Chunk]:
    for start in range(0, len(text), _ENCODE_SLICE):
        piece = text[start : start + _ENCODE_SLICE]
        yield encoder.encode(piece.replace("\n", os.linesep) if os.linesep != "\n" else piece)
    yield encoder.encode("", True)


def _write_chunks(
    path: str,
    chunks: Iterable[Chunk],
    *,
    durable: bool,
    overwrite: bool,
    permissions: int | None,
    temp_dir: str | None,
) -> None:
    """Write ``chunks`` to ``path`` all-or-nothing (arguments already checked)."""
    try:
        staged = _Staged(path, temp_dir, overwrite=overwrite, permissions=permissions)
    except OSError as exc:
        _count_failure(exc)
        raise
    try:
        for chunk in chunks:
            _write_all(staged.fd, chunk)
            staged.size += chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)
        staged.commit(durable=durable)
    except OSError as exc:
        _name_target(exc, staged.target)
        _count_failure(exc)
        raise
    finally:
        staged.discard()  # no-op after a successful commit


def _check_temp_dir(temp_dir: StrPath | None) -> str | None:
    return None if temp_dir is None else _check_path(temp_dir, "temp_dir")


def atomic_write(
    path: StrPath,
    content: str | bytes,
    *,
    encoding: str = "utf-8",
    durable: bool = True,
    overwrite: bool = True,
    permissions: int | None = None,
    temp_dir: StrPath | None = None,
) -> None:
    """Replace ``path`` with ``content`` (text or bytes) all-or-nothing.

    Atomic against concurrent readers and any crash; durable against power
    loss unless ``durable=False``; safe to call from many threads and
    processes at once (last writer wins). Text is encoded with ``encoding``
    (UTF-8 by default). Missing parent directories are created (and synced
    when durable). The options are those of :class:`AtomicFileWriter`.

    Raises:
        ValueError: ``path`` is None, empty or not a path (also a TypeError).
        TypeError: ``content`` is neither str nor bytes.
        FileExistsError: ``overwrite=False`` and the target exists.
        IsADirectoryError: ``path`` is a directory.
        PermissionError: The kernel's rules for sticky directories forbid it.
        OSError: The write failed, or the target is a FIFO, device or socket;
            the target is untouched and no temp is left.
    """
    text_path = _check_target(path)
    temp_parent = _check_temp_dir(temp_dir)
    _check_permissions(permissions)
    _write_chunks(
        text_path,
        _to_chunks(text_path, content, encoding),
        durable=durable,
        overwrite=overwrite,
        permissions=permissions,
        temp_dir=temp_parent,
    )


def atomic_json_write(
    path: StrPath,
    data: object,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    durable: bool = True,
    overwrite: bool = True,
    permissions: int | None = None,
    temp_dir: StrPath | None = None,
) -> None:
    """Replace ``path`` with ``data`` serialised as JSON, all-or-nothing.

    ``data`` may be any JSON value (object, array, string, number, bool or
    None). It is serialised completely *before* the disk is touched, so a
    value that cannot be serialised (or NaN/Infinity, which JSON lacks)
    raises without creating anything. Written as UTF-8 with a trailing
    newline. Atomicity, durability and concurrency as :func:`atomic_write`.
    For large documents ``indent=None`` serialises about 3x faster: CPython's
    C encoder only runs without an indent.

    Raises:
        TypeError: ``data`` holds a value JSON cannot represent.
        ValueError: ``data`` holds NaN or infinity, or a circular reference.
    """
    text_path = _check_target(path)
    temp_parent = _check_temp_dir(temp_dir)
    _check_permissions(permissions)
    _write_chunks(
        text_path,
        (_json_document(data, text_path, indent=indent, sort_keys=sort_keys),),
        durable=durable,
        overwrite=overwrite,
        permissions=permissions,
        temp_dir=temp_parent,
    )


def _json_document(data: object, name: str, *, indent: int | None, sort_keys: bool) -> bytes:
    """Return ``data`` as the bytes of a JSON file: strict, UTF-8, with a trailing newline.

    Raises TypeError or ValueError naming ``name`` before anything is written.
    """
    try:
        text = json.dumps(
            data, indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False
        )
    except TypeError as exc:
        raise TypeError(f"cannot write {name} as JSON: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"cannot write {name} as JSON: {exc}") from exc
    text += "\n"  # one write() for the document and its newline; grows in place
    return text.encode("utf-8")  # a lone surrogate fails here, before the disk


def _open_regular(path: str, flags: int) -> int:
    """``open()``'s opener for reads: never blocks on a FIFO, refuses non-regular files."""
    fd = os.open(path, flags | _platform.O_READ)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # FileIO names a directory itself
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise OSError(errno.EINVAL, f"{kind}, not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


class AtomicFileWriter(Generic[AnyStr]):
    """Write a file all-or-nothing through a temp file and an atomic rename.

    Atomic: readers see the old or the new content, never a mix, during the
    write and after a crash. Durable (``durable=True``, the default): once the
    ``with`` block exits normally the new content survives a power cut; with
    ``durable=False`` both fsyncs are skipped and only process crashes are
    covered. Any exception in the block (``KeyboardInterrupt`` included)
    leaves the target untouched and no temp file behind. Concurrent writers
    in threads or processes each commit whole files; the last rename wins
    (use :func:`htmlgraph.atomic_update` or :class:`DirectoryLocker` for
    read-modify-write). One instance is one write, used from one thread.

    Args:
        target_path: The file to replace or create. If it is a symlink, the
            file it points to is written and the link kept.
        temp_dir: Where to stage the temp file; by default the target's own
            directory. It must be on the target's filesystem (else ``EXDEV``).
        mode: ``"w"`` for text (the default), ``"wb"`` for bytes.
        encoding: Text encoding (``"utf-8"`` by default, not the locale's).
        errors: Text encoding error handler, as for :func:`open`.
        newline: Newline translation, as for :func:`open`.
        durable: fsync the data before the rename and the directory after.
        overwrite: If false, create only: raise :class:`FileExistsError` when
            the target exists, before writing and again, atomically, at commit.
        permissions: Mode bits for the file. By default an existing target
            keeps its mode and a new file gets ``0o666 & ~umask``.

    Raises:
        ValueError: ``target_path`` is None, empty or not a path (for a wrong
            type the exception is also a TypeError), or a bad ``mode``.

    Example:
        >>> with AtomicFileWriter(Path("target.txt")) as f:  # doctest: +SKIP
        ...     f.write("content")
    """

    @overload
    def __init__(
        self: AtomicFileWriter[str],
        target_path: StrPath,
        temp_dir: StrPath | None = None,
        *,
        mode: Literal["w"] = "w",
        encoding: str = "utf-8",
        errors: str | None = None,
        newline: str | None = None,
        durable: bool = True,
        overwrite: bool = True,
        permissions: int | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self: AtomicFileWriter[bytes],
        target_path: StrPath,
        temp_dir: StrPath | None = None,
        *,
        mode: Literal["wb"],
        durable: bool = True,
        overwrite: bool = True,
        permissions: int | None = None,
    ) -> None: ...

    def __init__(
        self,
        target_path: StrPath,
        temp_dir: StrPath | None = None,
        *,
        mode: Literal["w", "wb"] = "w",
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        durable: bool = True,
        overwrite: bool = True,
        permissions: int | None = None,
    ) -> None:
        target = _check_target(target_path)
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', not {mode!r} (writing {target})")
        if mode == "wb" and (encoding is not None or errors is not None or newline is not None):
            raise ValueError(f"binary mode takes no encoding, errors or newline ({target})")
        self._temp_dir = _check_temp_dir(temp_dir)
        _check_permissions(permissions)
        self._target = target
        self.mode = mode
        self.encoding = encoding if encoding is not None or mode == "wb" else "utf-8"
        self.errors = errors
        self.newline = newline
        self.durable = durable
        self.overwrite = overwrite
        self.permissions = permissions
        self._staged: _Staged | None = None
        self._file: IO[AnyStr] | None = None
        self._used = False

    @property
    def target_path(self) -> Path:
        """The file this writer replaces or creates, as given."""
        return Path(self._target)

    @property
    def temp_dir(self) -> Path | None:
        """Where the temp file is staged if not beside the target, as given."""
        return None if self._temp_dir is None else Path(self._temp_dir)

    @property
    def temp_path(self) -> Path | None:
        """The temp file being written, or None before :meth:`open` and after the end."""
        staged = self._staged
        return Path(staged.temp) if staged is not None and staged.temp else None

    def open(self) -> IO[AnyStr]:
        """Create the temp file and return a file object writing to it.

        Prefer the ``with`` statement; without it, call :meth:`commit` or
        :meth:`rollback` (in a ``finally``) yourself.

        Raises:
            FileExistsError: ``overwrite=False`` and the target exists.
            IsADirectoryError: The target is a directory.
            OSError: Creating the temp file failed (with errno and filename).
            RuntimeError: This writer was already used.
        """
        if self._used:
            raise RuntimeError(f"AtomicFileWriter for {self._target} was already used")
        self._used = True
        try:
            staged = _Staged(
                self._target, self._temp_dir, overwrite=self.overwrite, permissions=self.permissions
            )
        except OSError as exc:
            _count_failure(exc)
            raise
        try:
            raw = _TempFileIO(staged.fd, "w", closefd=False)
            raw.staged = staged
            buffered = io.BufferedWriter(raw, _BUFFER_SIZE)
            file: IO[bytes] | IO[str] = buffered
            if self.mode == "w":
                file = io.TextIOWrapper(
                    buffered, encoding=self.encoding, errors=self.errors, newline=self.newline
                )
        except BaseException:
            staged.discard()
            raise
        self._staged = staged
        typed = cast("IO[AnyStr]", file)  # the mode chose str or bytes, as AnyStr did
        self._file = typed
        return typed

    def commit(self) -> None:
        """Flush, sync and close the temp file, then rename it onto the target.

        On failure before the rename the temp file is removed and the target
        is untouched. If only the final directory fsync fails, the target
        already holds the new content and the error is raised.
        """
        staged, file = self._staged, self._file
        if staged is None or file is None:
            raise RuntimeError(f"AtomicFileWriter for {self._target} is not open")
        self._file = self._staged = None
        try:
            file.close()  # flushes Python's buffers into the fd (closefd=False)
            staged.commit(durable=self.durable)
        except OSError as exc:
            _name_target(exc, staged.target)
            _count_failure(exc)
            raise
        finally:
            staged.discard()  # no-op after a successful commit

    def rollback(self) -> None:
        """Discard the temp file; the target is untouched. Idempotent; no-op after commit."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError, ValueError):  # the data is thrown away anyway
                file.close()
        staged, self._staged = self._staged, None
        if staged is not None:
            staged.discard()

    def __enter__(self) -> IO[AnyStr]:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            if isinstance(exc, OSError):  # e.g. ENOSPC from f.write in the block
                _count_failure(exc)
            self.rollback()

    def __repr__(self) -> str:
        return f"AtomicFileWriter({self._target!r}, mode={self.mode!r})"

    # The seed's static API: the module functions themselves.
    atomic_write = staticmethod(atomic_write)
    atomic_json_write = staticmethod(atomic_json_write)

    @staticmethod
    def safe_read_with_retry(
        path: StrPath,
        max_retries: int = 3,
        retry_delay: float = 0.1,
        *,
        encoding: str = "utf-8",
    ) -> str:
        """Read a text file, retrying transient errors with exponential backoff.

        Reads are atomic with respect to our writers (the old or the new file,
        whole). What can fail for a moment is the reading itself: on Windows a
        reader racing a replace gets ``PermissionError``, a file being created
        by another process may not exist yet, and network or FUSE filesystems
        return other transient errors. So any ``OSError`` is retried, each
        attempt opening the file afresh with the builtin :func:`open`:
        ``max_retries`` attempts in all, sleeping ``retry_delay``, then twice
        that, and so on; the last error is raised. A FIFO or device is
        refused (an ``OSError``), never read: reading could block forever.
        Safe across threads and processes.

        Args:
            path: The file to read.
            max_retries: Attempts in all (at least one is always made).
            retry_delay: First pause between attempts, in seconds.
            encoding: Text encoding.

        Returns:
            The file's whole content.
        """
        text_path = _check_path(path)
        delay = max(0.0, retry_delay)
        attempts = max(1, max_retries)
        for attempt in range(attempts):
            try:
                with open(text_path, encoding=encoding, opener=_open_regular) as f:
                    return f.read()
            except OSError:
                if attempt == attempts - 1:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover


# ==========================================================================
# 2. The helpers around the writer
#
# atomic_rename is as atomic and (by default) as durable as a write; the temp
# helpers name and clean up temp files without ever removing the temp of a
# write that is still running, here or in another pid namespace or host;
# validate_atomic_write only reads. None of them blocks on a FIFO or device.
# ==========================================================================


def atomic_rename(src: StrPath, dst: StrPath, *, durable: bool = True) -> None:
    """Rename ``src`` onto ``dst`` atomically, replacing ``dst`` if it exists.

    The rename itself is atomic: ``dst`` names the old file or ``src``'s file,
    never neither (POSIX rename(2); ``MoveFileExW`` on Windows, retried
    briefly on sharing violations). Missing parents of ``dst`` are created,
    and removed again if the rename fails. With ``durable=True`` the file's
    data is synced before the rename and both directories after it, so the
    result survives a power cut. Both paths must be on one filesystem (else
    ``OSError`` with ``EXDEV``).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``src`` and ``dst`` are the same file, or a path is None or empty.
        OSError: The rename failed; nothing was changed.
    """
    source = _platform.absolute(_check_path(src, "src"))
    target = _platform.absolute(_check_path(dst, "dst"))
    if not os.path.lexists(source):
        raise FileNotFoundError(errno.ENOENT, "rename source does not exist", source)
    if source == target or (os.path.lexists(target) and os.path.samefile(source, target)):
        raise ValueError(f"atomic_rename: {source} and {target} are the same file")
    directory = os.path.dirname(target)
    created = _make_dirs(directory)
    try:
        if durable and os.path.isfile(source):
            fd = os.open(source, _platform.O_READ)
            try:
                _fsync(fd)
            finally:
                os.close(fd)
        _replace(source, target)
    except BaseException:
        _remove_dirs(created)
        raise
    if durable:
        _sync_created_dirs(directory, created)
        source_dir = os.path.dirname(source)
        if source_dir != directory:
            _fsync_dir(source_dir)


def safe_temp_file(base_dir: StrPath, prefix: str = "tmp") -> Path:
    """Return a fresh hidden path ``base_dir/.{prefix}-...`` that no other caller will get.

    The name is ``.{prefix}-{pid}-{owner tag}-{32 random hex digits}``;
    ``base_dir`` is created if missing. The file itself is *not* created:
    open it with ``O_CREAT | O_EXCL`` (mode ``"x"``) so that even a collision
    would fail loudly. With the default prefix the name is a ``.tmp-`` name:
    :func:`cleanup_orphaned_temp_files` removes an abandoned one once it is
    old enough and its process is gone. Thread- and process-safe.

    Raises:
        ValueError: ``prefix`` contains a path separator or a NUL byte, or
            ``base_dir`` is None or empty.
    """
    directory = _check_path(base_dir, "base_dir")
    if not isinstance(prefix, str) or any(
        c and c in prefix for c in ("/", "\0", os.sep, os.altsep)
    ):
        raise ValueError(f"temp file prefix must be a plain name, not {prefix!r}")
    os.makedirs(directory, exist_ok=True)
    pid = _platform.current_pid()
    return Path(directory) / f".{prefix}-{pid}-{_identity.owner_tag(pid)}-{_random_token(16)}"


class _Orphan(NamedTuple):
    path: str
    mtime: float


def _orphaned_temps(base_dir: StrPath, age_hours: float) -> Iterator[_Orphan]:
    """The ``.tmp-*`` regular files in ``base_dir`` older than ``age_hours`` and not in use."""
    directory = _check_path(base_dir, "base_dir")
    age = float(age_hours)
    if not age >= 0:  # NaN too: it would disable the age filter
        raise ValueError(f"age_hours must be a number >= 0, not {age_hours!r}")
    cutoff = time.time() - age * 3600.0
    in_use: dict[tuple[str, str], bool] = {}  # a crashed writer often leaves many temps
    try:
        entries = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    with entries:
        for entry in entries:
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue  # removed under us, or unreadable: not ours to judge
            if mtime > cutoff:
                continue
            match = _OWN_TEMP.match(entry.name)
            if match is not None:
                # Our own name: spare the temp of a write still running (a slow
                # 10 GB stream), and of any writer we cannot judge from here.
                key = (match.group(1), match.group(2))
                if key not in in_use:
                    pid = _identity.parse_pid(key[0])
                    in_use[key] = pid is not None and _identity.tagged_owner_state(pid, key[1]) in (
                        "alive",
                        "unknown",
                    )
                if in_use[key]:
                    continue
            yield _Orphan(entry.path, mtime)


def find_orphaned_temp_files(base_dir: StrPath, age_hours: float = 24.0) -> Iterator[Path]:
    """Yield the temp files that :func:`cleanup_orphaned_temp_files` would remove.

    The same rules, without removing anything (a dry run). The directory is
    streamed (flat memory); files vanishing meanwhile are skipped; a missing
    ``base_dir`` yields nothing. Read-only; safe while other processes write.

    Raises:
        ValueError: ``age_hours`` is negative or NaN, or ``base_dir`` is empty.
    """
    for orphan in _orphaned_temps(base_dir, age_hours):
        yield Path(orphan.path)


class _CleanupResult(NamedTuple):
    removed: int
    skipped: int


def _cleanup(base_dir: StrPath, age_hours: float) -> _CleanupResult:
    """:func:`cleanup_orphaned_temp_files`, also counting what it could not remove."""
    removed = skipped = 0
    first_error: OSError | None = None
    for orphan in _orphaned_temps(base_dir, age_hours):
        try:
            os.unlink(orphan.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            # Another user's file in a sticky directory (EPERM), a read-only
            # mount: skip it and go on, so nobody can block everyone's cleanup.
            skipped += 1
            first_error = first_error or exc
            continue
        removed += 1
        logger.debug("removed orphaned temp file %s", orphan.path)
    metrics.counter("htmlgraph_cleanup_removed_total").inc(removed)
    metrics.counter("htmlgraph_cleanup_skipped_total").inc(skipped)
    if removed:
        logger.warning("removed %d orphaned temp file(s) from %s", removed, base_dir)
    if first_error is not None:
        logger.warning(
            "could not remove %d orphaned temp file(s) in %s (first: %s)",
            skipped,
            base_dir,
            first_error,
        )
    return _CleanupResult(removed, skipped)


def cleanup_orphaned_temp_files(base_dir: StrPath, age_hours: float = 24.0) -> int:
    """Remove the temp files that crashed writes left in ``base_dir``; return how many.

    Removes every regular file whose name matches the seed's pattern
    ``.tmp-*`` (this library's temps, the seed's ``mkstemp`` temps, any
    other) and whose modification time is more than ``age_hours`` ago
    (``0``: every such file), never symlinks or directories, never followed.
    The one exception is a temp whose name proves its writer may still be
    running - this library's ``.tmp-{pid}-{owner tag}-`` names: kept while
    that process lives (its pid not reused), and always when it ran in
    another pid namespace or on another host, whose pids cannot be judged
    here. A file that may not be removed (another user's, in a sticky
    directory) is skipped, and the rest still cleaned; one WARNING says how
    many. Not recursive; memory stays flat; safe while other processes write.

    Returns:
        The number of files removed (0 if ``base_dir`` does not exist).

    Raises:
        ValueError: ``age_hours`` is negative or NaN, or ``base_dir`` is empty.
    """
    return _cleanup(base_dir, age_hours).removed


def validate_atomic_write(path: StrPath) -> bool:
    """Return whether ``path`` is a complete, readable UTF-8 regular file.

    Checks that the file exists, is a regular file (symlinks are followed),
    can be read, and decodes as UTF-8 throughout (read in chunks, so any
    size works). Returns False instead of raising for any of those failures;
    a FIFO or device is never opened for reading. Read-only; safe across
    threads and processes.
    """
    return invalid_reason(_check_path(path)) is None


# ==========================================================================
# 3. The lock: DirectoryLocker
#
# Many shared holders or one exclusive holder at a time, across processes on
# one host (and between instances and threads of one process), made only of
# marker files. Every holder or claimant owns one marker whose name nobody
# else will use, ".lock-shared-{pid}-{nonce}" or ".lock-exclusive-{pid}-
# {ticket}", published complete (written under a private ".lock-pending-"
# name, then renamed). A claim counts only if a directory listing that
# *started after* the claimant's own marker existed shows no conflict; since
# a marker exists continuously from its publication until its release, two
# conflicting claimants can never both pass. A marker is broken only on proof
# that its owner is gone (_identity.owner_state); a file we did not write - a
# FIFO, a symlink, a name with a pid out of range - is never proof of
# anything, and nothing here blocks on it. docs/locking.md gives the whole
# argument, the costs and the limits.
# ==========================================================================

LockMode = Literal["shared", "exclusive"]
_Verdict = Literal["hold", "wait", "yield"]

_MARKER_PREFIX: dict[LockMode, str] = {
    "shared": ".lock-shared-",
    "exclusive": ".lock-exclusive-",
}
_PENDING_PREFIX = ".lock-pending-"

# Jittered exponential backoff between attempts: about 1 ms doubling up to
# about 50 ms, each step drawn from [d/2, d] so that contenders desynchronise
# (Metcalfe & Boggs' Ethernet backoff; filelock's strict lock caps at 50 ms).
_BACKOFF_FIRST = 0.001
_BACKOFF_MAX = 0.05
# The oldest waiting writer polls at most this many doubling steps (~1 ms).
_HEAD_STEP = 0
# A waiter without a marker sleeps at least this step on its first retry
# (~8 ms), one step less on each retry after it (see _run).
_NEWCOMER_STEP = 3
# Bounded barging (Go's sync.Mutex "normal" and "starvation" modes). A writer
# that has waited less than this is polite: after its first attempt it
# publishes a claim only when a listing shows no live exclusive marker, so a
# holder that releases and acquires again at once takes the lock back without
# a hand-off (a context switch and a polling gap), and it polls without
# racing for the brief gaps between a barging holder's holds. A writer that
# has waited this long claims its turn by ticket age as before, and the
# barging holder's next acquire sees the older claim and yields: no writer
# waits much longer than this plus the holds of the writers older than it.
# Only *when* a waiter publishes changes, never publish-then-scan (safety).
# Chosen by measurement (docs/locking.md): 20 ms doubled throughput but
# fairness fell below 0.8 over 3 s; 10 ms kept it.
_POLITE_WAIT = 0.010
# A regular marker whose record cannot be parsed is held for this long (by its
# mtime) and then counts as stale. Our own markers are never unreadable (they
# appear by rename with their record complete), so this only delays the
# clean-up of garbage: an empty marker left by a power cut, a foreign file.
_UNREADABLE_GRACE = 2.0
# A ".lock-pending-" file seen by one scanner for this long belongs to a
# publisher that died between create and rename. Removing a live publisher's
# pending file is harmless (its rename fails and it publishes again).
_PENDING_GRACE = 10.0
# A live holder's start token is re-read at most this often per marker; the
# pid's existence (one kill(pid, 0)) is checked on every scan. Caching can only
# delay breaking a marker, never break a live one.
_RECHECK_INTERVAL = 0.5
_PUBLISH_ATTEMPTS = 16
_RECORD_MAX = 4096
_MARKER_MODE = 0o644  # peers of other users must be able to read the record

# Never block on a FIFO a stranger named like a marker; never follow a link.
_O_MARKER_READ = _platform.O_READ | _platform.O_NOFOLLOW

# What the lock did and cost (htmlgraph.metrics; docs/metrics.md).
_MODES: tuple[LockMode, ...] = ("shared", "exclusive")
_LOCK_ACQUIRED = {m: metrics.counter("htmlgraph_lock_acquisitions_total", mode=m) for m in _MODES}
_LOCK_WAIT = {m: metrics.histogram("htmlgraph_lock_wait_seconds", mode=m) for m in _MODES}
_LOCK_HOLD = {m: metrics.histogram("htmlgraph_lock_hold_seconds", mode=m) for m in _MODES}
_LOCK_TIMEOUTS = {m: metrics.counter("htmlgraph_lock_timeouts_total", mode=m) for m in _MODES}
StaleReason = Literal["gone", "unreadable", "not_a_marker", "pending"]


def _count_stale(reason: StaleReason) -> None:
    metrics.counter("htmlgraph_lock_stale_broken_total", reason=reason).inc()


# Seams: the lock calls these by their module-level names, so tests can
# slow it down, hide a marker or refuse a removal.
_sleep: Callable[[float], None] = time.sleep
_monotonic: Callable[[], float] = time.monotonic  # a waiter's age (politeness), not deadlines
_listdir: Callable[[str], list[str]] = os.listdir
_unlink: Callable[[str], None] = _platform.unlink


class _Owner(NamedTuple):
    """The record inside a marker: who holds it."""

    pid: int
    host: str
    pidns: str | None
    start: str | None


_SeenKind = Literal["unread", "owner", "garbage", "forbidden", "gone"]


@dataclasses.dataclass
class _Seen:
    """What one scanner knows about one marker (records never change once visible).

    ``kind``: ``"unread"`` - seen once with a live pid in its name, held
    without reading; ``"owner"`` - its record was read; ``"garbage"`` - a
    regular file without a valid record, held until ``mtime`` is older than
    the grace period; ``"forbidden"`` - we may not read it: held (fail
    closed); ``"gone"`` - released, proven stale, or not a marker at all
    (a FIFO, a symlink, a directory): never a conflict.
    """

    kind: _SeenKind
    owner: _Owner | None = None
    mtime: float = math.inf
    verified_at: float = -math.inf


def _deadline(timeout: float) -> float | None:
    """Return the monotonic deadline for ``timeout`` (None: wait without limit)."""
    timeout = float(timeout)
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds, not NaN")
    if timeout < 0 or math.isinf(timeout):
        return None
    return time.monotonic() + timeout


def _backoff(attempt: int) -> float:
    """Return the sleep before retry number ``attempt`` (0-based), jittered."""
    ceiling = min(_BACKOFF_MAX, _BACKOFF_FIRST * (1 << min(attempt, 16)))
    return ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not secrecy


def _make_lock_dir(directory: str) -> None:
    """Create ``directory`` (and parents); a non-directory there is a clear error."""
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(
            errno.ENOTDIR, "lock directory path exists and is not a directory", directory
        ) from None


_record_head: list[tuple[int, str]] = []  # (pid, head) of the last publisher in this process


def _own_record_head(pid: int) -> str:
    """Return the unchanging start of this process's marker record (JSON, unclosed).

    pid, host name, pid namespace and start token, read for the pid that
    publishes and kept for that pid only - a forked child has another pid, so
    it never publishes its parent's start time (the prototype bug that made
    peers evict live children as "pid reused"). Saves reading /proc on every
    acquire.
    """
    if _record_head and _record_head[0][0] == pid:
        return _record_head[0][1]
    head = json.dumps(
        {
            "pid": pid,
            "host": _platform.hostname(),
            "pidns": _platform.pid_namespace(),
            "start": _platform.process_start_token(pid),
        },
        separators=(",", ":"),
    )[:-1]
    _record_head[:] = [(pid, head)]
    return head


def _parse_record(data: bytes, name_pid: int | None) -> _Owner | None:
    """Return the owner recorded in ``data``, or None if it is not a record of ours."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    pid, host = _identity.parse_pid(obj.get("pid")), obj.get("host")
    pidns, start = obj.get("pidns"), obj.get("start")
    if pid is None or not isinstance(host, str):
        return None
    if not isinstance(pidns, (str, type(None))) or not isinstance(start, (str, type(None))):
        return None
    if pid != name_pid:
        return None  # a record that contradicts its own name is garbage
    return _Owner(pid, host, pidns, start)


def _name_pid(name: str, prefix: str) -> int | None:
    """Return the pid in marker ``name`` (after ``prefix``), or None if it has none we accept."""
    return _identity.parse_pid(name[len(prefix) :].split("-", 1)[0])


def _ticket(name: str) -> str:
    """Return the ticket of an exclusive marker name (its part after the pid)."""
    parts = name[len(_MARKER_PREFIX["exclusive"]) :].split("-", 1)
    return parts[1] if len(parts) == 2 else ""


def _remove(path: str) -> None:
    """Remove a marker of ours; a marker already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        _unlink(path)


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


_instances: weakref.WeakSet[DirectoryLocker] = weakref.WeakSet()


class DirectoryLocker:
    """A reader/writer lock between processes, threads and instances, from marker files.

    Many shared holders or one exclusive holder at a time, across processes
    on one host and a local filesystem, and between instances and threads in
    one process (each instance is its own owner; threads sharing an instance
    take turns). It is advisory: only code that takes the lock is excluded.
    A waiting writer stops new readers (writers cannot starve; readers can,
    under an unbroken stream of writers); among writers that have waited
    ``handoff_after`` (10 ms by default) or more the oldest goes first, and a
    younger one leaves the lock to a holder that releases and acquires again
    at once (bounded barging). A marker left by a crashed holder is broken
    only on proof of death (same host and pid namespace, and the pid is
    gone, a zombie, or reused).
    Nothing here is durable: markers are not fsynced, and a reboot kills
    every holder anyway. A ``KeyboardInterrupt`` arriving inside an acquire
    or a release leaves no marker of this instance behind.

    Re-acquiring on an instance that holds, from the thread that acquired:
    the same mode (or shared under exclusive) nests and returns True at once,
    and each :meth:`release_lock` undoes one level; asking for exclusive
    while holding shared raises :class:`RuntimeError` (an upgrade could
    deadlock against another upgrader). Another thread using the same
    instance waits, within its timeout, until the instance is released;
    :meth:`release_lock` releases the instance's hold whichever thread calls
    it. For concurrent readers in threads, give each thread its own instance.

    Args:
        lock_dir: The directory the markers live in (created if missing).
        handoff_after: Seconds a waiting writer lets a holder that releases
            and acquires again at once keep the lock, before it claims its
            turn (at most half the writer's timeout). None: 10 ms, which keeps
            the fairness between eight looping processes above 0.8; larger
            values trade fairness and the longest wait for throughput when
            one process takes the lock over and over (``atomic_update`` uses
            1 s). 0: strict hand-off to the oldest writer.

    Attributes:
        lock_dir: The directory the markers live in (created if missing).
        handoff_after: As given (None: the 10 ms default).
        pid: The process that owns this instance (updated in a forked child).
        shared_lock_path: The shared marker this instance holds or last held;
            before its first shared acquire, ``lock_dir / f".lock-shared-{pid}"``
            (made absolute), a name no marker ever has (markers carry a
            suffix), so ``.exists()`` is True exactly while this instance
            holds it.
        exclusive_lock_path: The same for the exclusive marker.

    Raises:
        ValueError: ``lock_dir`` is empty or None.
        NotADirectoryError: ``lock_dir`` exists and is not a directory.
    """

    def __init__(
        self, lock_dir: str | os.PathLike[str], *, handoff_after: float | None = None
    ) -> None:
        if handoff_after is not None and not 0 <= handoff_after < math.inf:
            raise ValueError(f"handoff_after must be a finite number >= 0, not {handoff_after!r}")
        self.handoff_after = handoff_after
        self.lock_dir = Path(_check_path(lock_dir, "lock_dir"))
        # Resolved once, physically (symlinks, then ".."), so a later chdir
        # does not move the lock and two spellings of one directory are one lock.
        self._dir = os.path.realpath(self.lock_dir)
        self._in_dir = os.path.join(self._dir, "")  # marker path = this + name
        _make_lock_dir(self._dir)
        self.pid = os.getpid()
        self._paths: dict[LockMode, str] = {
            mode: self._in_dir + prefix + str(self.pid) for mode, prefix in _MARKER_PREFIX.items()
        }
        self._reset_state()
        _instances.add(self)

    def _reset_state(self) -> None:
        # _guard is held only for a few bytecodes, never across a wait.
        self._guard = threading.Lock()
        self._thread: int | None = None  # thread holding, or acquiring through, this instance
        self._mode: LockMode | None = None
        self._depth = 0
        self._held_at = 0.0  # time.monotonic() when the hold began (metrics)
        # Every marker this instance may have on disk is recorded here before
        # the call that creates it, and forgotten only after it is removed, so
        # an interruption at any point leaves a record to finish the job with:
        self._marker: str | None = None  # full path of the marker held (or being released)
        self._claim: str | None = None  # name of our published, not (yet) held marker
        self._pending: str | None = None  # full path of a pending file being published
        # Only the acquiring thread touches these caches.
        self._seen: dict[str, _Seen] = {}
        self._pending_seen: dict[str, float] = {}
        self._view: frozenset[str] = frozenset()  # marker names of the last scan

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's hold without touching its marker."""
        self.pid = os.getpid()
        self._reset_state()

    @property
    def shared_lock_path(self) -> Path:
        """The shared marker this instance holds or last held (see the class doc)."""
        return Path(self._paths["shared"])

    @property
    def exclusive_lock_path(self) -> Path:
        """The exclusive marker this instance holds or last held (see the class doc)."""
        return Path(self._paths["exclusive"])

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

        Idempotent and safe when nothing is held; never raises an error of
        its own (a marker that vanished while held - its directory deleted -
        is logged as a WARNING, since exclusion was not guaranteed
        meanwhile); never removes a marker this instance did not create; does
        nothing in a forked child, whose parent still holds the lock.
        """
        if os.getpid() != self.pid:
            return
        with self._guard:
            if self._mode is not None:
                self._depth -= 1
                if self._depth > 0:
                    return
                _LOCK_HOLD[self._mode].observe(time.monotonic() - self._held_at)
                self._mode, self._depth = None, 0
            elif self._thread is not None and self._thread != threading.get_ident():
                return  # another thread is acquiring through this instance
        # Not held any more. The marker stays recorded until it is gone, so an
        # interruption in between is finished by the next call on this instance.
        try:
            self._clear_leftovers()
        finally:
            self._thread = None

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
        with self._held("shared", timeout):
            yield self

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
        with self._held("exclusive", timeout):
            yield self

    @contextlib.contextmanager
    def _held(self, mode: LockMode, timeout: float) -> Iterator[None]:
        me = threading.get_ident()
        # This thread's hold before the call (a with block inside another):
        # the finally below releases only the level this call took, even when
        # an interrupt lands as _acquire returns, before the block begins.
        before = self._depth if self._thread == me and self._mode is not None else 0
        try:
            if not self._acquire(mode, timeout):
                raise LockTimeout(self.lock_dir, mode, timeout)
            yield
        finally:
            if self._thread == me and self._mode is not None and self._depth > before:
                self.release_lock()

    # -------------------------------------------------------------- acquire
    def _acquire(self, mode: LockMode, timeout: float) -> bool:
        started = time.monotonic()
        deadline = _deadline(timeout)
        if os.getpid() != self.pid:  # inherited through a fork that bypassed the hook
            self._forget_after_fork()
        me = threading.get_ident()
        turn = 0
        while True:
            with self._guard:
                if self._thread == me and self._mode is not None:
                    if mode == self._mode or self._mode == "exclusive":
                        self._depth += 1
                        return True
                    raise RuntimeError(
                        f"this DirectoryLocker already holds the shared lock on {self._dir!r}; "
                        "release it before asking for the exclusive lock (no upgrades)"
                    )
                if self._thread is None or self._thread == me:  # (== me: after an interruption)
                    self._thread = me
                    break
            # Another thread holds or is acquiring through this instance: take turns.
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            _sleep(_backoff(turn) if deadline is None else min(_backoff(turn), deadline - now))
            turn += 1
        held = False
        try:
            self._clear_leftovers()
            won = self._run(mode, deadline)
            # Counted before the hold is handed over: an interrupt in these
            # calls (a Ctrl-C runs its handler at any call) lets it go below.
            if won:
                self._held_at = time.monotonic()
                _LOCK_ACQUIRED[mode].inc()
                _LOCK_WAIT[mode].observe(self._held_at - started)
            else:
                _LOCK_TIMEOUTS[mode].inc()
            held = won
        finally:
            if not held:
                # Timeout or any exception (KeyboardInterrupt included) at any
                # point: whatever this call published or took goes.
                with self._guard:
                    self._mode, self._depth = None, 0
                self._clear_leftovers()
                self._thread = None
        return held

    def _clear_leftovers(self) -> None:
        """Remove every marker recorded by this instance that it does not hold."""
        if self._pending is not None:
            _remove(self._pending)
            self._pending = None
        if self._claim is not None:
            _remove(self._in_dir + self._claim)
            self._claim = None
        if self._marker is not None and self._mode is None:
            try:
                _unlink(self._marker)
            except FileNotFoundError:
                logger.warning(
                    "lock marker %s vanished while its lock was held (lock directory "
                    "deleted or marker removed by hand): exclusion was not guaranteed",
                    self._marker,
                )
            except OSError as exc:
                logger.warning("could not remove lock marker %s: %s", self._marker, exc)
            else:
                logger.debug("released lock %s", self._marker)
            self._marker = None

    def _run(self, mode: LockMode, deadline: float | None) -> bool:
        """Run the marker protocol until the lock is held (True) or the deadline passes."""
        ticket_time = f"{time.time_ns():020d}"  # fixed for this call: age priority
        started = _monotonic()
        # How long this writer stays polite (bounded barging, _POLITE_WAIT):
        # never more than half its timeout, so that it still claims a turn.
        polite_for = _POLITE_WAIT if self.handoff_after is None else self.handoff_after
        if deadline is not None:
            polite_for = min(polite_for, (deadline - time.monotonic()) / 2)
        attempt = 0
        step = 0  # backoff step; back to the first when a marker we saw is gone
        last_view: frozenset[str] = frozenset()
        while True:
            polite = mode == "exclusive" and _monotonic() - started < polite_for
            if self._attempt(mode, ticket_time, first=attempt == 0, polite=polite):
                claim = self._in_dir + cast(str, self._claim)
                with self._guard:  # the claim becomes the hold
                    self._marker, self._mode, self._depth = claim, mode, 1
                    self._claim = None
                self._paths[mode] = claim
                logger.debug("acquired %s lock %s", mode, claim)
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            # A marker we saw last time is gone: the lock may be ours soon, so
            # poll fast again. Arrivals do not reset (they cannot help us), so
            # a standing conflict backs off towards the cap and waiters do not
            # stampede on every newcomer's brief marker. A polite writer does
            # not reset either: a holder that keeps coming back makes markers
            # vanish all the time, and racing for its gaps only takes its CPU.
            step = 0 if not polite and not last_view <= self._view else step + 1
            if self._claim is not None:
                # We are the oldest writer and keep our marker: nobody can
                # overtake us, and the holders' release is ours to catch
                # quickly; only those behind us back off towards the cap.
                step = min(step, _HEAD_STEP)
            else:
                # Waiting without a marker: a newcomer starts slow and polls
                # faster as it ages, so the longest waiter is the likeliest to
                # see a release first, and the newcomers do not take the CPU
                # the holder needs (a hand-off resets only the older ones).
                step = max(step, _NEWCOMER_STEP - attempt)
            last_view = self._view
            delay = _backoff(step)
            if polite:  # wake when politeness ends, to claim a turn at once
                delay = min(delay, max(started + polite_for - _monotonic(), 0.0))
            if deadline is not None:
                delay = min(delay, deadline - now)
            _sleep(delay)
            attempt += 1

    def _attempt(self, mode: LockMode, ticket_time: str, *, first: bool, polite: bool) -> bool:
        """Make one attempt; return whether the lock is now held (by ``self._claim``).

        The first attempt publishes at once: an uncontended acquire then costs
        one publish and one scan, and a directory we cannot write fails at
        once. Later attempts publish only if a scan shows no conflict, so that
        waiters do not churn markers (test-and-test-and-set). A ``polite``
        writer (one that has waited less than its ``handoff_after``) counts every
        live exclusive marker as a conflict, younger ones too, so it never
        claims a turn behind a holder that keeps re-acquiring.
        """
        if mode == "shared":
            if not first and self._readers_blocked(self._scan(None)):
                return False
            mine = self._publish("shared", lambda: _random_token(8))
            if not self._readers_blocked(self._scan(mine)):
                return True
            self._withdraw()  # a writer is waiting or holding: it goes first
            return False
        if self._claim is None and not first:
            scan = self._scan(None) or ([], [])  # (None only when ``mine`` is missing)
            if polite:
                # Any live writer, younger ones too (a holder that came back):
                # leave it the lock. Readers do not stop us (writer preference).
                if any(self._live(name, "exclusive") for name in scan[1]):
                    return False
            elif self._writer_verdict(scan, ticket_time) == "yield":
                return False
        claim = self._claim or self._publish("exclusive", lambda: ticket_time + _random_token(4))
        verdict = self._writer_verdict(self._scan(claim), _ticket(claim))
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
        return any(self._live(name, "exclusive") for name in scan[1])

    def _writer_verdict(self, scan: tuple[list[str], list[str]] | None, ticket: str) -> _Verdict:
        """Say whether a writer holding ``ticket`` may hold, must wait, or must yield."""
        if scan is None:
            return "yield"
        shared, exclusive = scan
        others = [name for name in exclusive if self._live(name, "exclusive")]
        # Ties cannot happen (tickets end in random digits); a ticket we cannot
        # parse sorts as oldest, so we yield to it. Tickets decide only who
        # waits, never safety.
        if any(_ticket(name) < ticket for name in others):
            return "yield"
        if others or any(self._live(name, "shared") for name in shared):
            return "wait"  # younger claimants will see us and withdraw
        return "hold"

    # ----------------------------------------------------- markers and scans
    def _publish(self, mode: LockMode, new_token: Callable[[], str]) -> str:
        """Make a complete marker appear under a fresh unique name; return the name.

        The record is written to ``.lock-pending-{pid}-{token}`` (created
        O_EXCL|O_NOFOLLOW) and renamed onto ``.lock-{mode}-{pid}-{token}``, so
        no scanner ever reads a partial record. The pending name, held by
        O_EXCL, reserves the token within this pid; the final name is checked
        unused before the rename, so even a forced token collision cannot
        clobber another marker (other pids cannot collide: the pid is in the
        name). Each name is recorded on the instance before the call that
        creates it (see :meth:`_reset_state`).
        """
        pid = self.pid
        record = f'{_own_record_head(pid)},"created":{time.time()!r},"mode":"{mode}"}}'.encode()
        prefix = _MARKER_PREFIX[mode]
        for _ in range(_PUBLISH_ATTEMPTS):
            token = new_token()
            name = f"{prefix}{pid}-{token}"
            final = self._in_dir + name
            pending = f"{self._in_dir}{_PENDING_PREFIX}{pid}-{token}"
            self._pending = pending
            try:
                # A file object owns the fd at once: an interruption right
                # after the open cannot leak it ("x": O_CREAT|O_EXCL, which
                # also refuses a planted symlink).
                pending_file = open(pending, "xb", buffering=0)  # noqa: SIM115
            except FileExistsError:
                self._pending = None  # not ours: another instance of this process has it
                continue
            except FileNotFoundError:
                self._pending = None
                _make_lock_dir(self._dir)  # the lock directory was deleted
                continue
            try:
                with pending_file:
                    fd = pending_file.fileno()
                    _platform.set_mode(fd, _MARKER_MODE)  # readable whatever the umask
                    _write_all(fd, record)
                if os.path.lexists(final):
                    continue  # the pending file goes in the finally below
                self._claim = name
                os.rename(pending, final)
                self._pending = None  # renamed: nothing pending any more
            except (FileNotFoundError, FileExistsError):
                # Pending file removed as an orphan, directory deleted, or (on
                # Windows, where rename does not replace) the name taken.
                self._claim = None
                continue
            finally:
                if self._pending is not None:  # not renamed (or interrupted): remove it
                    _remove(pending)
                    self._pending = None
            return name
        raise FileExistsError(
            errno.EEXIST, f"no unused lock marker name after {_PUBLISH_ATTEMPTS} tries", self._dir
        )

    def _withdraw(self) -> None:
        """Remove our published, not-held marker (contention, timeout or exception)."""
        if self._claim is not None:
            # FileNotFoundError: the directory was deleted; nothing left to withdraw.
            _remove(self._in_dir + self._claim)
            self._claim = None

    def _scan(self, mine: str | None) -> tuple[list[str], list[str]] | None:
        """List the directory: (shared, exclusive) marker names other than ``mine``.

        Returns None when ``mine`` is given but missing from the listing (our
        marker was removed behind our back), so the caller withdraws and
        publishes again instead of trusting a claim nobody can see.
        """
        try:
            names = _listdir(self._dir)
        except FileNotFoundError:
            _make_lock_dir(self._dir)
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
            elif name.startswith(".lock-shared-"):
                shared.append(name)
            elif name.startswith(".lock-exclusive-"):
                exclusive.append(name)
            elif name.startswith(_PENDING_PREFIX):
                pending.append(name)
        self._view = frozenset(shared).union(exclusive)
        if len(self._seen) > len(shared) + len(exclusive):
            self._seen = {k: v for k, v in self._seen.items() if k in self._view}
        if pending or self._pending_seen:
            self._sweep_pending(pending)
        if not found:
            logger.warning(
                "own lock marker %s vanished before the lock was taken; publishing again",
                self._in_dir + (mine or ""),
            )
            return None
        return shared, exclusive

    def _sweep_pending(self, pending: list[str]) -> None:
        """Remove pending files that outlived their publisher (killed before rename).

        A pending file goes when the pid in its name is gone, or when this
        instance has seen it for longer than a grace period. Either rule is
        safe even when wrong (a pid reused, another host's publisher): a
        publisher whose pending file vanishes fails its rename and publishes
        again under a new name.
        """
        now = time.monotonic()
        seen = {name: self._pending_seen.get(name, now) for name in pending}
        for name, first in list(seen.items()):
            pid = _name_pid(name, _PENDING_PREFIX)
            dead = pid is not None and pid != self.pid and not _platform.pid_exists(pid)
            if dead or now - first > _PENDING_GRACE:
                with contextlib.suppress(OSError):
                    _unlink(self._in_dir + name)
                    _count_stale("pending")
                    logger.warning("removed orphaned lock file %s", name)
                del seen[name]
        self._pending_seen = seen

    # ----------------------------------------------------------- staleness
    def _live(self, name: str, mode: LockMode) -> bool:
        """Return whether marker ``name`` counts as held; break it if proven stale."""
        seen = self._seen.get(name)
        if seen is None:
            # First sight. Counting a marker as held needs no proof, only
            # breaking one does: if the pid in its name is alive here, call it
            # held without reading anything. Most markers are gone by the next
            # scan; one still there is read and judged in full then (one
            # backoff step later), which catches zombies, reused pids, records
            # that contradict their name and files that are no markers at all.
            pid = _name_pid(name, _MARKER_PREFIX[mode])
            if pid is not None and _platform.pid_exists(pid):
                self._seen[name] = _Seen("unread")
                return True
        if seen is None or seen.kind == "unread" or seen.kind == "garbage":
            read = self._read(name, mode)
            if read is None:
                return True  # could not look now (EMFILE, EIO...): not proof of anything
            seen = self._seen[name] = read
        if seen.kind in ("gone", "forbidden"):
            return seen.kind == "forbidden"  # we may not read it: fail closed
        owner = seen.owner
        if owner is None:  # garbage: a regular file without a valid record
            if time.time() - seen.mtime <= _UNREADABLE_GRACE:
                return True
            self._break(name, "unreadable", "its record is unreadable and older than the grace")
            return False
        now = time.monotonic()
        if now - seen.verified_at < _RECHECK_INTERVAL:
            # Existence is cheap (one kill(pid, 0)); the full judgement waits.
            if owner.host != _platform.hostname() or owner.pidns != _platform.pid_namespace():
                return True
            if _platform.pid_exists(owner.pid):
                return True
        state = _identity.owner_state(*owner)
        if state == "gone":
            self._break(name, "gone", f"its process {owner.pid} is gone, a zombie, or reused")
            return False
        seen.verified_at = now
        return True

    def _read(self, name: str, mode: LockMode) -> _Seen | None:
        """Read marker ``name``; None when it cannot be read *now* (our own resources)."""
        path = self._in_dir + name
        try:
            fd = os.open(path, _O_MARKER_READ)
        except FileNotFoundError:
            return _Seen("gone")  # released meanwhile; names are never reused
        except PermissionError:
            return _Seen("forbidden")
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: no marker of ours
                return self._not_a_marker(name, "it is a symbolic link")
            if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
                # A socket (ENXIO) or device cannot even be opened: look, don't read.
                try:
                    st = os.lstat(path)
                except OSError:
                    return None
                if not stat.S_ISREG(st.st_mode):
                    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
                    return self._not_a_marker(name, f"it is {kind}")
            return None  # EMFILE, ENFILE, ENOMEM, EIO: a problem of ours, not the holder's
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = _KINDS.get(stat.S_IFMT(st.st_mode), "a directory")
                return self._not_a_marker(name, f"it is {kind}")
            try:
                data = os.read(fd, _RECORD_MAX)
            except OSError:
                return None
        finally:
            os.close(fd)
        owner = _parse_record(data, _name_pid(name, _MARKER_PREFIX[mode]))
        return _Seen("owner", owner, st.st_mtime) if owner else _Seen("garbage", mtime=st.st_mtime)

    def _not_a_marker(self, name: str, why: str) -> _Seen:
        """A FIFO, device, socket, symlink or directory named like a marker: never a conflict.

        We only ever create regular markers, so such a file holds nothing; it
        is removed if we may (one WARNING) and ignored either way.
        """
        path = self._in_dir + name
        try:
            _unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("ignoring %s, named like a lock marker (%s): %s", path, why, exc)
        else:
            _count_stale("not_a_marker")
            logger.warning("removed %s, named like a lock marker but %s", path, why)
        return _Seen("gone")

    def _break(self, name: str, reason: StaleReason, why: str) -> None:
        """Remove a marker proven stale; from now on it never counts as held.

        Harmless if another scanner got there first: marker names are never
        reused, so the name cannot have passed to a live holder between our
        verdict and the unlink.
        """
        self._seen[name] = _Seen("gone")
        path = self._in_dir + name
        try:
            _unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            # Proven dead, so ignoring it is still safe; it just stays on disk.
            logger.warning("stale lock marker %s (%s) could not be removed: %s", path, why, exc)
            return
        _count_stale(reason)
        logger.warning("broke stale lock marker %s: %s", path, why)


def _forget_holds_after_fork() -> None:
    """Forget, in a forked child, every hold inherited from the parent."""
    for locker in list(_instances):
        locker._forget_after_fork()


_platform.after_fork(_forget_holds_after_fork)
