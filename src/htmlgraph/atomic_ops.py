"""Atomic, crash-safe file writes and a marker-file reader/writer lock.

This module is the one home of htmlgraph's file-safety API:

* :class:`AtomicFileWriter` (and :func:`atomic_write`, :func:`atomic_json_write`)
  replace a file all-or-nothing: a reader of the target sees the complete old
  content or the complete new content, never a mix, an empty or a partial file
  - while the write runs, after a ``kill -9`` at any instant and, with
  ``durable=True`` (the default), after a power cut at any instant.
* :func:`atomic_rename`, :func:`safe_temp_file`,
  :func:`cleanup_orphaned_temp_files` (with its dry run
  :func:`find_orphaned_temp_files`) and :func:`validate_atomic_write` are the
  helpers around it.
* :class:`DirectoryLocker` is a reader/writer lock between processes made only
  of marker files, for read-modify-write of shared files (second half of this
  module; the protocol and its correctness argument are in
  ``docs/locking.md``). :class:`LockTimeout` is its ``TimeoutError``.

The commit order of a durable write (see ``docs/guarantees.md`` for why each
step is there) is::

    open(temp, O_CREAT|O_EXCL|O_NOFOLLOW) -> write all -> flush -> fsync(temp)
    -> close -> rename(temp, target) -> fsync(directory)

Operating-system specific calls live in :mod:`htmlgraph._platform`; this module
reaches them through the module-level seams ``_fsync``, ``_fsync_dir`` and
``_replace`` so that tests can inject faults.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import logging
import math
import os
import random
import re
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, AnyStr, Generic, Literal, Union, cast, overload

from htmlgraph import _platform

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

# --------------------------------------------------------------------------
# Seams. Tests replace these through the module (monkeypatch.setattr(
# atomic_ops, "_fsync", boom)); the code below always calls them by name.
# --------------------------------------------------------------------------
_fsync: Callable[[int], None] = _platform.write_fsync
_fsync_dir: Callable[[str], None] = _platform.fsync_dir
_replace: Callable[[str, str], None] = _platform.write_replace


# Temp-name tokens, drawn from os.urandom 32 at a time: one getrandom call
# per 32 writes instead of one per write. list.pop is atomic, so threads
# never share a token; a forked child drops the parent's unused ones.
_TOKEN_BATCH = 32
_tokens: list[str] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_tokens.clear)


def _random_token(nbytes: int = 8) -> str:
    """Return ``2 * nbytes`` random hex digits (the one source of temp-name randomness).

    Unpredictable (``os.urandom``), so another user cannot pre-create our
    temp names; ``O_EXCL`` makes a collision fail loudly anyway.
    """
    if nbytes != 8:
        return os.urandom(nbytes).hex()
    try:
        return _tokens.pop()
    except IndexError:
        batch = os.urandom(8 * _TOKEN_BATCH).hex()
        _tokens.extend(batch[i : i + 16] for i in range(16, len(batch), 16))
        return batch[:16]


# Temp files are named ".tmp-{pid}-{token}-{target name}". The seed's cleanup
# pattern is ".tmp-*"; the pid and the hex token make the name ours (cleanup
# ignores other ".tmp-" files) and let cleanup spare the temp of a write still
# running in a live process.
TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"\.tmp-([0-9]{1,10})-[0-9a-f]{16,32}(?:-|\Z)")
_NAME_MAX = 255  # bytes; ext4, xfs, btrfs, tmpfs, NTFS (in UTF-16 units) and APFS
_TEMP_ATTEMPTS = 100
_SEPARATORS = (os.sep, os.altsep or os.sep)

_O_TEMP = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
# Directory fsync is not supported everywhere (EINVAL on some FUSE, SMB and
# VirtualBox shared folders, atomicwrites#27). There is nothing more a caller
# can do there, so we treat these as "not supported" rather than failure, as
# SQLite does in unixSync.
_DIR_FSYNC_UNSUPPORTED = frozenset(
    e for e in (errno.EINVAL, getattr(errno, "ENOTSUP", None), errno.EOPNOTSUPP) if e is not None
)
# The file object's buffer: json.dump and other streaming writers emit many
# small pieces, and this sets how many write() calls they become. Given
# explicitly, it also spares open() its isatty ioctl and fstat.
_BUFFER_SIZE = 128 * 1024


def _check_path(path: object, what: str = "path") -> str:
    """Return ``path`` as a ``str``, raising a clear TypeError/ValueError for bad input."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be str or os.PathLike[str], not {type(path).__name__}")
    text = os.fspath(cast("str | os.PathLike[str]", path))
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str or os.PathLike[str], not a bytes path: {text!r}")
    if not text:
        raise ValueError(f"{what} must not be empty")
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL byte: {text!r}")
    return text


def _check_target(path: object) -> str:
    """Check a write target: a valid path that names a file, not a directory."""
    if type(path) is str and path and "\0" not in path and not path.endswith(_SEPARATORS):
        return path  # the common case, without the frames below
    text = _check_path(path, "target path")
    if text.endswith(_SEPARATORS):
        raise IsADirectoryError(errno.EISDIR, "target path ends with a separator", text)
    return text


def _check_permissions(permissions: int | None) -> None:
    if permissions is None:
        return
    if isinstance(permissions, bool) or not isinstance(permissions, int):
        raise TypeError(f"permissions must be an int such as 0o644, not {permissions!r}")
    if not 0 <= permissions <= 0o7777:
        raise ValueError(f"permissions must be between 0o0 and 0o7777, not {permissions:#o}")


def _temp_name(target_name: str) -> str:
    """Return a fresh temp file name for ``target_name``, at most 255 bytes long."""
    head = f"{TEMP_PREFIX}{_platform.facts.pid}-{_random_token()}-"
    room = _NAME_MAX - len(head)  # head is ASCII: characters are bytes
    if len(target_name) * 4 <= room:  # no UTF-8 character is longer than 4 bytes
        return head + target_name
    tail = target_name.encode("utf-8", "surrogateescape")[:room]
    # Cutting may split a multi-byte character: drop the broken tail.
    return head + tail.decode("utf-8", "ignore")


def _missing_dirs(directory: str) -> list[str]:
    """Return the missing ancestors of ``directory`` (itself included), outermost first."""
    missing: list[str] = []
    current = directory
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    missing.reverse()
    return missing


def _make_dirs(directory: str) -> list[str]:
    """Create ``directory`` and its missing parents; return those this call created."""
    created: list[str] = []
    for path in _missing_dirs(directory):
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
        else:
            created.append(path)
    return created


def _sync_created_dirs(directory: str, created: list[str]) -> None:
    """Make the target directory's entries and every directory we created durable.

    A new directory's own entry lives in its parent, so each parent of a
    created directory is synced too (innermost first, ending at the first
    directory that already existed).
    """
    done = {directory}
    _sync_dir(directory)
    for path in reversed(created):
        parent = os.path.dirname(path)
        if parent not in done:
            done.add(parent)
            _sync_dir(parent)


def _sync_dir(directory: str) -> None:
    try:
        _fsync_dir(directory)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
        logger.debug("directory fsync not supported for %s (%s)", directory, exc)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` to ``fd``: os.write may write less than asked."""
    written = os.write(fd, data)
    if written == len(data) and (type(data) is not memoryview or data.itemsize == 1):
        return
    view = memoryview(data).cast("B")[written:]
    while view:
        view = view[os.write(fd, view) :]


def _name_target(exc: OSError, target: str) -> None:
    """Let an error from a call on the temp's fd (write, fsync, close) name the target.

    Such calls carry no file name, and "No space left on device" alone does
    not say which write failed. The original exception is kept and re-raised.
    """
    if exc.filename is None:
        exc.filename = target


def _resolve_unusual(target: str, st: os.stat_result) -> tuple[str, os.stat_result | None]:
    """Handle a target that is not a regular file: follow a symlink, refuse a directory.

    Returns the path to write and its ``lstat`` (None if it does not exist).
    A symlink is written through: the temp goes beside the real file, so the
    rename never crosses filesystems (DESIGN 2.6); a dangling link makes the
    call create the file it names.
    """
    resolved: os.stat_result | None = st
    if stat.S_ISLNK(st.st_mode):
        link, target = target, os.path.realpath(target)
        try:
            resolved = os.lstat(target)
        except FileNotFoundError:
            resolved = None
        if resolved is not None and stat.S_ISLNK(resolved.st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), link)
    if resolved is not None and stat.S_ISDIR(resolved.st_mode):
        raise IsADirectoryError(errno.EISDIR, "target is a directory", target)
    return target, resolved


class _Staged:
    """One temp file in the making: the low-level state shared by every writer.

    Lifecycle: creating it opens the temp (creating missing directories),
    :meth:`commit` makes it the target, :meth:`discard` removes it. ``discard``
    is idempotent and a no-op after a successful commit, so it is safe in any
    ``finally``.

    This is every write's hot path, and its cost is what a small durable
    write pays on top of the kernel's: the common case (the target is a
    regular file or does not exist yet, its directory exists) runs straight
    through with one ``lstat``, one ``open``, one ``fstat`` and few Python
    calls. Anything unusual (a symlink, a directory, a missing directory,
    another owner, a name collision) branches off to a helper.
    """

    __slots__ = (
        "committed",
        "created_dirs",
        "directory",
        "fd",
        "overwrite",
        "target",
        "temp",
    )

    def __init__(
        self,
        target_path: str,
        temp_parent: str | None,
        *,
        overwrite: bool,
        permissions: int | None,
    ) -> None:
        """Resolve ``target_path``, check it, and open a fresh temp file for it.

        The arguments were checked by the caller (:func:`_check_path`,
        :func:`_check_permissions`).
        """
        target = target_path
        if _platform.IS_WINDOWS or not target.startswith("/"):  # POSIX isabs, inline
            target = os.path.abspath(target)
        try:
            st: os.stat_result | None = os.lstat(target)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            target, st = _resolve_unusual(target, st)
        # The mode the file must end with: permissions=, else the target's own;
        # None for a new file, which gets 0o666 & ~umask from the kernel, as
        # open() does (no racy os.umask() read, no mkstemp 0600, DESIGN 2.5).
        mode = permissions
        if st is not None:
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "target exists (overwrite=False)", target)
            if mode is None:
                mode = stat.S_IMODE(st.st_mode)
        if _platform.IS_WINDOWS:
            directory, name = os.path.split(target)
            prefix = os.path.join(directory, "")
        else:  # os.path.split, inline; prefix is the directory with its "/"
            cut = target.rfind("/") + 1
            prefix, name = target[:cut], target[cut:]
            directory = prefix.rstrip("/") or "/"
        self.target = target
        self.directory = directory
        self.overwrite = overwrite
        self.committed = False
        self.fd = -1
        self.temp = ""
        if temp_parent is None:
            self.created_dirs: list[str] = []
            parent = directory
        else:
            self.created_dirs = _make_dirs(directory)
            parent = temp_parent
            prefix = os.path.join(temp_parent, "")
        # Created with its final mode, the temp is never more open than the
        # target and usually needs no fchmod. Windows: 0o666, since a
        # read-only bit would block the replace.
        create_mode = 0o666 if mode is None or _platform.IS_WINDOWS else mode
        temp = prefix + _temp_name(name)
        try:
            self.fd = os.open(temp, _O_TEMP, create_mode)
        except (FileExistsError, FileNotFoundError):
            temp = self._open_temp_again(parent, prefix, name, create_mode)
        self.temp = temp
        if mode is None:
            return  # a new file: the kernel's mode and owner are the right ones
        try:
            self._match(mode, st)
        except BaseException:
            self.discard()
            raise

    def _match(self, mode: int, target: os.stat_result | None) -> None:
        """Give the temp ``mode`` and, when it replaces ``target``, its owner.

        One ``fstat`` shows what the kernel made: the umask may have removed
        bits from the mode the temp was created with, and the owner is ours,
        or the directory's group when it is setgid. Only what differs is
        changed (``fstat`` is cheaper than ``fchmod``, which dirties the inode,
        a journal write on ext4), on the fd, never by name (pallets/click#3824:
        chmod by path follows a symlink swapped in meanwhile). The owner goes
        first: ``chown`` clears set-user-ID and set-group-ID bits, even for root.
        """
        made = os.fstat(self.fd)
        if target is not None and (made.st_uid, made.st_gid) != (target.st_uid, target.st_gid):
            _platform.keep_owner(self.fd, target.st_uid, target.st_gid)
            _platform.set_mode(self.fd, mode)
        elif stat.S_IMODE(made.st_mode) != mode:
            _platform.set_mode(self.fd, mode)

    def _open_temp_again(self, parent: str, prefix: str, name: str, mode: int) -> str:
        """Open a temp file in ``parent`` after the first attempt failed; return its path.

        ``prefix`` is ``parent`` ending with a separator. A name collision
        (``FileExistsError``; practically only when tests force it) draws
        another name. A missing directory (``FileNotFoundError``) is looked
        for only now, off the hot path: the missing directories are created
        once and the open retried.
        """
        made_dirs = False
        for _ in range(_TEMP_ATTEMPTS):
            temp = prefix + _temp_name(name)
            try:
                self.fd = os.open(temp, _O_TEMP, mode)
            except FileExistsError:
                continue
            except FileNotFoundError:
                if made_dirs:
                    raise
                made_dirs = True
                self.created_dirs = _make_dirs(parent)
                continue
            return temp
        raise FileExistsError(
            errno.EEXIST, f"no free temp name after {_TEMP_ATTEMPTS} attempts", parent
        )

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
                _fsync(fd)
        finally:
            os.close(fd)
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
        if durable:
            if self.created_dirs:
                _sync_created_dirs(self.directory, self.created_dirs)
            else:
                _sync_dir(self.directory)

    def discard(self) -> None:
        """Close and remove the temp file; idempotent, a no-op after commit."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):  # cleaning up after another error
                os.close(fd)
        if self.temp and not self.committed:
            temp, self.temp = self.temp, ""
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.debug("could not remove temp file %s: %s", temp, exc)


class AtomicFileWriter(Generic[AnyStr]):
    """Write a file all-or-nothing through a temp file and an atomic rename.

    Atomic: readers see the old or the new content, never a mix, during the
    write and after a crash. Durable (``durable=True``, the default): once the
    ``with`` block exits normally the new content survives a power cut; with
    ``durable=False`` both fsyncs are skipped and only process crashes are
    covered. Any exception in the block (``KeyboardInterrupt`` included)
    leaves the target untouched and no temp file behind. Concurrent writers
    in threads or processes each commit whole files; the last rename wins
    (use :class:`DirectoryLocker` for read-modify-write). One instance is one
    write, used from one thread.

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
        self._temp_dir = None if temp_dir is None else _check_path(temp_dir, "temp_dir")
        if permissions is not None:
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
        staged = _Staged(
            self._target,
            self._temp_dir,
            overwrite=self.overwrite,
            permissions=self.permissions,
        )
        file: IO[bytes] | IO[str]
        try:
            if self.mode == "wb":
                file = open(  # noqa: SIM115 - closed in commit/rollback
                    staged.fd, "wb", buffering=_BUFFER_SIZE, closefd=False
                )
            else:
                file = open(  # noqa: SIM115 - closed in commit/rollback
                    staged.fd,
                    "w",
                    buffering=_BUFFER_SIZE,
                    encoding=self.encoding,
                    errors=self.errors,
                    newline=self.newline,
                    closefd=False,
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
            file.close()  # flushes Python's buffer into the fd (closefd=False)
            staged.commit(durable=self.durable)
        except OSError as exc:
            _name_target(exc, staged.target)
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

    __enter__ = open  # the same method: one call less on every ``with``

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def __repr__(self) -> str:
        return f"AtomicFileWriter({self._target!r}, mode={self.mode!r})"

    # -- the seed's static API ------------------------------------------------

    @staticmethod
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
        """Replace ``path`` with ``content`` all-or-nothing. See :func:`atomic_write`."""
        atomic_write(
            path,
            content,
            encoding=encoding,
            durable=durable,
            overwrite=overwrite,
            permissions=permissions,
            temp_dir=temp_dir,
        )

    @staticmethod
    def atomic_json_write(
        path: StrPath,
        data: object,
        *,
        indent: int | None = 2,
        sort_keys: bool = False,
        durable: bool = True,
        overwrite: bool = True,
        permissions: int | None = None,
    ) -> None:
        """Replace ``path`` with ``data`` as JSON. See :func:`atomic_json_write`."""
        atomic_json_write(
            path,
            data,
            indent=indent,
            sort_keys=sort_keys,
            durable=durable,
            overwrite=overwrite,
            permissions=permissions,
        )

    @staticmethod
    def safe_read_with_retry(
        path: StrPath,
        max_retries: int = 3,
        retry_delay: float = 0.1,
        *,
        encoding: str = "utf-8",
    ) -> str:
        """Read a text file, retrying briefly while a concurrent replace is in flight.

        Reads are atomic with respect to our writers (the old or the new file,
        whole). What can be transient is the *opening*: on Windows a reader
        racing a replace gets ``PermissionError`` for a moment, and a file
        being created by another process may not exist yet. Those two errors
        are retried ``max_retries`` times in all, sleeping ``retry_delay``,
        then twice that, and so on; the last error is raised. Other errors are
        raised at once. Safe across threads and processes.

        Args:
            path: The file to read.
            max_retries: Attempts in all (at least one is always made).
            retry_delay: First pause between attempts, in seconds.
            encoding: Text encoding.

        Returns:
            The file's whole content.
        """
        text_path = _check_path(path)
        if max_retries < 1:
            max_retries = 1
        delay = max(0.0, retry_delay)
        for attempt in range(max_retries):
            try:
                with open(text_path, encoding=encoding) as f:
                    return f.read()
            except (FileNotFoundError, PermissionError):
                if attempt == max_retries - 1:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover


Chunk = bytes | bytearray | memoryview
_ENCODE_SLICE = 1 << 20  # characters encoded at a time for large text


def _to_chunks(path: str, content: object, encoding: str) -> Iterable[Chunk]:
    """Return ``content`` as the bytes to write, checking its type first.

    Text is encoded with ``encoding``, each newline becoming the platform's
    line separator as with open(path, "w"). Small text is encoded here, before the
    disk is touched; large text (over a million characters) is encoded in
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
    temp_dir: str | None = None,
) -> None:
    """Write ``chunks`` to ``path`` all-or-nothing (arguments already checked)."""
    staged = _Staged(path, temp_dir, overwrite=overwrite, permissions=permissions)
    try:
        for chunk in chunks:
            _write_all(staged.fd, chunk)
        staged.commit(durable=durable)
    except OSError as exc:
        _name_target(exc, staged.target)
        raise
    finally:
        staged.discard()  # no-op after a successful commit


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
        TypeError: ``content`` is neither str nor bytes.
        FileExistsError: ``overwrite=False`` and the target exists.
        IsADirectoryError: ``path`` is a directory.
        OSError: The write failed; the target is untouched and no temp is left.
    """
    text_path = _check_target(path)
    temp_parent = None if temp_dir is None else _check_path(temp_dir, "temp_dir")
    if permissions is not None:
        _check_permissions(permissions)
    _write_chunks(
        text_path,
        (content,) if type(content) is bytes else _to_chunks(text_path, content, encoding),
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
    _check_permissions(permissions)
    try:
        text = json.dumps(
            data, indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False
        )
    except TypeError as exc:
        raise TypeError(f"cannot write {text_path} as JSON: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"cannot write {text_path} as JSON: {exc}") from exc
    data = text.encode("utf-8")  # a lone surrogate fails here, before the disk
    _write_chunks(
        text_path,
        (data, b"\n"),
        durable=durable,
        overwrite=overwrite,
        permissions=permissions,
    )


def atomic_rename(src: StrPath, dst: StrPath, *, durable: bool = True) -> None:
    """Rename ``src`` onto ``dst`` atomically, replacing ``dst`` if it exists.

    The rename itself is atomic: ``dst`` names the old file or ``src``'s file,
    never neither (POSIX rename(2); ``MoveFileExW`` on Windows, retried
    briefly on sharing violations). Missing parents of ``dst`` are created.
    With ``durable=True`` the file's data is synced before the rename and both
    directories after it, so the result survives a power cut. Both paths must
    be on one filesystem (else ``OSError`` with ``EXDEV``).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``src`` and ``dst`` are the same file.
        OSError: The rename failed; nothing was changed.
    """
    source = os.path.abspath(_check_path(src, "src"))
    target = os.path.abspath(_check_path(dst, "dst"))
    if not os.path.lexists(source):
        raise FileNotFoundError(errno.ENOENT, "rename source does not exist", source)
    if source == target or (os.path.lexists(target) and os.path.samefile(source, target)):
        raise ValueError(f"atomic_rename: {source} and {target} are the same file")
    directory = os.path.dirname(target)
    created = _make_dirs(directory)
    if durable and os.path.isfile(source):
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            _fsync(fd)
        finally:
            os.close(fd)
    _replace(source, target)
    if durable:
        _sync_created_dirs(directory, created)
        source_dir = os.path.dirname(source)
        if source_dir != directory:
            _sync_dir(source_dir)


def safe_temp_file(base_dir: StrPath, prefix: str = TEMP_PREFIX) -> Path:
    """Return a fresh path in ``base_dir`` that no other caller will get.

    The name is ``{prefix}{pid}-{32 random hex digits}``; ``base_dir`` is
    created if missing. The file itself is *not* created: open it with
    ``O_CREAT | O_EXCL`` (mode ``"x"``) so that even a collision would fail
    loudly. With the default prefix an abandoned file is an orphan that
    :func:`cleanup_orphaned_temp_files` removes once its process is gone.
    Thread- and process-safe.

    Raises:
        ValueError: ``prefix`` contains a path separator or a NUL byte.
    """
    directory = _check_path(base_dir, "base_dir")
    if "/" in prefix or os.sep in prefix or (os.altsep and os.altsep in prefix) or "\0" in prefix:
        raise ValueError(f"temp file prefix must be a plain name, not {prefix!r}")
    os.makedirs(directory, exist_ok=True)
    return Path(directory) / f"{prefix}{os.getpid()}-{_random_token(16)}"


def find_orphaned_temp_files(base_dir: StrPath, age_hours: float = 24.0) -> Iterator[Path]:
    """Yield the temp files that :func:`cleanup_orphaned_temp_files` would remove.

    The same rules, without removing anything (a dry run): this library's
    own temp files only (``.tmp-{pid}-{hex}…`` regular files, never symlinks
    or directories, never followed), older than ``age_hours``, whose writer
    process is gone - the temp of a write still running in a live process on
    this host is never listed, however old. The directory is streamed
    (flat memory); files vanishing meanwhile are skipped; a missing
    ``base_dir`` yields nothing. Read-only; safe while other processes write.
    """
    for path in _orphaned_temp_paths(base_dir, age_hours):
        yield Path(path)


def _orphaned_temp_paths(base_dir: StrPath, age_hours: float) -> Iterator[str]:
    """:func:`find_orphaned_temp_files` with ``str`` paths (no Path per file for cleanup)."""
    directory = _check_path(base_dir, "base_dir")
    if age_hours < 0:
        raise ValueError(f"age_hours must not be negative, not {age_hours!r}")
    cutoff = time.time() - age_hours * 3600.0
    me = _platform.current_pid()
    alive: dict[int, bool] = {}  # a crashed writer often leaves many temps
    try:
        entries = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    with entries:
        for entry in entries:
            match = _TEMP_NAME.match(entry.name)
            if match is None:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue  # removed under us
            if mtime > cutoff:
                continue
            pid = int(match.group(1))
            # A write still running in a live process on this host keeps its
            # temp, however old (a slow 10 GB stream). A temp from another
            # host whose pid happens to be alive here is kept too: safe side.
            if pid == me:
                continue
            if pid not in alive:
                alive[pid] = _platform.pid_exists(pid)
            if alive[pid]:
                continue
            yield entry.path


def cleanup_orphaned_temp_files(base_dir: StrPath, age_hours: float = 24.0) -> int:
    """Remove temp files that crashed writes left in ``base_dir``; return how many.

    Removes what :func:`find_orphaned_temp_files` yields: only this library's
    own temp files (``.tmp-{pid}-{hex}…`` regular files, never symlinks or
    directories, never followed), only when older than ``age_hours`` and only
    when their writer process is gone - the temp of a write still running in
    a live process is never removed. Files vanishing concurrently are
    skipped. Memory stays flat for any number of entries. Not recursive.
    Safe to run while other processes write. Logs one WARNING saying how
    many files it removed (each one at DEBUG).

    Returns:
        The number of files removed (0 if ``base_dir`` does not exist).
    """
    removed = 0
    for path in _orphaned_temp_paths(base_dir, age_hours):
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed += 1
        logger.debug("removed orphaned temp file %s", path)
    if removed:
        logger.warning("removed %d orphaned temp file(s) from %s", removed, base_dir)
    return removed


def validate_atomic_write(path: StrPath) -> bool:
    """Return whether ``path`` is a complete, readable UTF-8 regular file.

    Checks that the file exists, is a regular file (symlinks are followed),
    can be read, and decodes as UTF-8 throughout (read in chunks, so any
    size works). Returns False instead of raising for any of those failures.
    Read-only; safe across threads and processes.
    """
    text_path = _check_path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        if not os.path.isfile(text_path):
            return False
        with open(text_path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except (OSError, UnicodeDecodeError):
        return False
    return True


# ==========================================================================
# DirectoryLocker: a reader/writer lock made only of marker files.
#
# Every holder or claimant owns one marker whose name nobody else will use,
# ".lock-shared-{pid}-{nonce}" or ".lock-exclusive-{pid}-{ticket}", published
# complete (written under a private ".lock-pending-" name, then renamed onto
# the fresh unique name). A claim counts only if a directory listing that
# *started after* the claimant's own marker existed shows no conflict; since a
# marker exists continuously from its publication until its release, two
# conflicting claimants can never both pass (whichever published later scanned
# after the other's marker existed). docs/locking.md gives the whole argument,
# the costs and the limits. Names here carry a "_lock" prefix; tests replace
# the seams (_lock_token, _lock_sleep, _lock_listdir, _lock_pid_exists,
# _lock_start_token, ...) through this module.
# ==========================================================================

_lock_logger = logger

_LockMode = Literal["shared", "exclusive"]

_LOCK_SHARED_PREFIX = ".lock-shared-"
_LOCK_EXCLUSIVE_PREFIX = ".lock-exclusive-"
_LOCK_PENDING_PREFIX = ".lock-pending-"

# Jittered exponential backoff between attempts: about 1 ms doubling up to
# about 50 ms, each step drawn from [d/2, d] so that contenders desynchronise
# (Metcalfe & Boggs' Ethernet backoff; filelock's strict lock caps at 50 ms).
_LOCK_BACKOFF_FIRST = 0.001
_LOCK_BACKOFF_MAX = 0.05
# The oldest waiting writer polls at most this many doubling steps (~4 ms).
_LOCK_HEAD_STEP = 2

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
    """Return ``2 * nbytes`` random hex digits for a marker name (the lock's seam).

    Drawn like the temp-name tokens (:func:`_random_token`).
    """
    return _random_token(nbytes)


_lock_sleep: Callable[[float], None] = time.sleep
_lock_clock: Callable[[], float] = time.monotonic
_lock_listdir: Callable[[str], list[str]] = os.listdir
_lock_pid_exists: Callable[[int], bool] = _platform.pid_exists
_lock_start_token: Callable[[int], str | None] = _platform.process_start_token
_lock_hostname: Callable[[], str] = _platform.hostname


_lock_pid_namespace: Callable[[], str | None] = _platform.pid_namespace
_lock_pid_is_zombie: Callable[[int], bool] = _platform.pid_is_zombie
_lock_unlink: Callable[[str], None] = _platform.unlink


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
        self._in_dir = os.path.join(self._dir, "")  # marker path = this + name
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
    def _held(self, mode: _LockMode, timeout: float) -> Iterator[None]:
        if not self._acquire(mode, timeout):
            raise LockTimeout(self.lock_dir, mode, timeout)
        try:
            yield
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
                    path = self._in_dir + self._claim
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
                if self._claim is not None:
                    # We are the oldest writer and keep our marker: nobody can
                    # overtake us, and the holders' release is ours to catch
                    # quickly; only those behind us back off towards the cap.
                    step = min(step, _LOCK_HEAD_STEP)
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
            final = self._in_dir + name
            pending = f"{self._in_dir}{_LOCK_PENDING_PREFIX}{pid}-{token}"
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
                    _write_all(fd, record)
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
                _lock_unlink(self._in_dir + name)

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
        """Remove pending files that outlived their publisher (killed before rename).

        A pending file goes when the pid in its name is gone, or when this
        instance has seen it for longer than a grace period. Either rule is
        safe even when wrong (a pid reused, another host's publisher): a
        publisher whose pending file vanishes fails its rename and publishes
        again under a new name.
        """
        now = _lock_clock()
        seen = {name: self._pending_seen.get(name, now) for name in pending}
        for name, first in list(seen.items()):
            pid = _lock_name_pid(name, _LOCK_PENDING_PREFIX)
            dead = pid is not None and pid != self.pid and not _lock_pid_exists(pid)
            if dead or now - first > _LOCK_PENDING_GRACE:
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
