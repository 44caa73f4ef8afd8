"""Atomic, crash-safe file writes and a marker-file reader/writer lock.

This module is the one home of htmlgraph's file-safety API:

* :class:`AtomicFileWriter` (and :func:`atomic_write`, :func:`atomic_json_write`)
  replace a file all-or-nothing: a reader of the target sees the complete old
  content or the complete new content, never a mix, an empty or a partial file
  - while the write runs, after a ``kill -9`` at any instant and, with
  ``durable=True`` (the default), after a power cut at any instant.
* :func:`atomic_rename`, :func:`safe_temp_file`,
  :func:`cleanup_orphaned_temp_files` and :func:`validate_atomic_write` are the
  helpers around it.

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
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, AnyStr, Generic, Literal, Union, cast, overload

from htmlgraph import _platform
from htmlgraph._locker import DirectoryLocker, LockTimeout

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
_fsync: Callable[[int], None] = _platform.fsync_file
_fsync_dir: Callable[[str], None] = _platform.fsync_dir
_replace: Callable[[str, str], None] = _platform.replace


def _random_token(nbytes: int = 8) -> str:
    """Return ``2 * nbytes`` random hex digits (the one source of temp-name randomness).

    Unpredictable (``os.urandom``), so another user cannot pre-create our
    temp names; ``O_EXCL`` makes a collision fail loudly anyway.
    """
    return os.urandom(nbytes).hex()


# Temp files are named ".tmp-{pid}-{token}-{target name}". The seed's cleanup
# pattern is ".tmp-*"; the pid and the hex token make the name ours (cleanup
# ignores other ".tmp-" files) and let cleanup spare the temp of a write still
# running in a live process.
TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"\.tmp-([0-9]{1,10})-[0-9a-f]{16,32}(?:-|\Z)")
_NAME_MAX = 255  # bytes; ext4, xfs, btrfs, tmpfs, NTFS (in UTF-16 units) and APFS
_TEMP_ATTEMPTS = 100

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
_UNSET_MODE = -1


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


def _temp_name(target_name: str) -> str:
    """Return a fresh temp file name for ``target_name``, at most 255 bytes long."""
    head = f"{TEMP_PREFIX}{_platform.current_pid()}-{_random_token()}-"
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


def _name_target(exc: OSError, target: str) -> None:
    """Let an error from a call on the temp's fd (write, fsync, close) name the target.

    Such calls carry no file name, and "No space left on device" alone does
    not say which write failed. The original exception is kept and re-raised.
    """
    if exc.filename is None:
        exc.filename = target


class _Staged:
    """One temp file in the making: the low-level state shared by every writer.

    Lifecycle: :meth:`create` opens the temp (creating missing directories),
    :meth:`commit` makes it the target, :meth:`discard` removes it. ``discard``
    is idempotent and a no-op after a successful commit, so it is safe in any
    ``finally``.
    """

    __slots__ = (
        "_created_dirs",
        "_overwrite",
        "committed",
        "directory",
        "fd",
        "target",
        "temp",
    )

    def __init__(self, target: str, directory: str, overwrite: bool) -> None:
        self.target = target
        self.directory = directory
        self._overwrite = overwrite
        self._created_dirs: list[str] = []
        self.fd = -1
        self.temp = ""
        self.committed = False

    @classmethod
    def create(
        cls,
        target_path: str,
        temp_parent: str | None,
        *,
        overwrite: bool,
        permissions: int | None,
    ) -> _Staged:
        """Resolve ``target_path``, check it, and open a fresh temp file for it.

        The arguments were checked by the caller (:func:`_check_path`,
        :func:`_check_permissions`).
        """
        target = target_path if os.path.isabs(target_path) else os.path.abspath(target_path)
        existing_mode = _UNSET_MODE
        owner = (-1, -1)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            # Write through the link: the temp goes beside the real file, so
            # the rename never crosses filesystems (DESIGN 2.6).
            link, target = target, os.path.realpath(target)
            try:
                st = os.lstat(target)
            except FileNotFoundError:
                st = None  # dangling link: the call creates the file it names
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), link)
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "target is a directory", target)
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "target exists (overwrite=False)", target)
            existing_mode = stat.S_IMODE(st.st_mode)
            if (st.st_uid, st.st_gid) != _platform.own_ids():
                owner = (st.st_uid, st.st_gid)
        directory, name = os.path.split(target)
        staged = cls(target, directory, overwrite)
        if temp_parent is not None:
            staged._created_dirs = _make_dirs(directory)
        staged._open_temp(temp_parent or directory, name)
        try:
            if permissions is not None:
                _platform.chmod_fd(staged.fd, permissions)
            elif existing_mode != _UNSET_MODE:
                # Keep the target's mode (and, where we may, its owner). On the
                # fd, never by name: pallets/click#3824 - chmod by path follows
                # a symlink swapped in meanwhile.
                _platform.chmod_fd(staged.fd, existing_mode)
                _platform.keep_owner(staged.fd, *owner)
        except BaseException:
            staged.discard()
            raise
        return staged

    def _open_temp(self, parent: str, name: str) -> None:
        """Open a new temp file in ``parent``, creating missing directories."""
        made_dirs = False
        for _ in range(_TEMP_ATTEMPTS):
            temp = os.path.join(parent, _temp_name(name))
            try:
                # 0o666: the kernel applies the umask, as open() does; no racy
                # os.umask() read, no mkstemp 0600 (DESIGN 2.5).
                self.fd = os.open(temp, _O_TEMP, 0o666)
            except FileExistsError:
                continue  # name collision (practically only when tests force it)
            except FileNotFoundError:
                # Only now, off the hot path, look for missing directories.
                if made_dirs:
                    raise
                made_dirs = True
                self._created_dirs = _make_dirs(parent)
                continue
            self.temp = temp
            return
        raise FileExistsError(
            errno.EEXIST, f"no free temp name after {_TEMP_ATTEMPTS} attempts", parent
        )

    def write_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write every byte of ``data`` to the temp (os.write may write less)."""
        written = os.write(self.fd, data)
        if written == len(data) and (type(data) is not memoryview or data.itemsize == 1):
            return
        view = memoryview(data).cast("B")[written:]
        while view:
            view = view[os.write(self.fd, view) :]

    def commit(self, *, durable: bool) -> None:
        """Make the temp file the target: fsync, close, rename, fsync directory.

        Args:
            durable: Sync the data before the rename and the directory after.
        """
        fd, self.fd = self.fd, -1
        try:
            if durable:
                # A failed fsync is final: never retried, never committed.
                _fsync(fd)
        finally:
            os.close(fd)
        if self._overwrite:
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
            _sync_created_dirs(self.directory, self._created_dirs)

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
        if mode == "wb" and (encoding, errors, newline) != (None, None, None):
            raise ValueError(f"binary mode takes no encoding, errors or newline ({target})")
        self._temp_dir = None if temp_dir is None else _check_path(temp_dir, "temp_dir")
        _check_permissions(permissions)
        self._target = target
        self.target_path = Path(target)
        self.temp_dir = None if temp_dir is None else Path(temp_dir)
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
            raise RuntimeError(f"AtomicFileWriter for {self.target_path} was already used")
        self._used = True
        staged = _Staged.create(
            self._target,
            self._temp_dir,
            overwrite=self.overwrite,
            permissions=self.permissions,
        )
        file: IO[bytes] | IO[str]
        try:
            if self.mode == "wb":
                file = open(staged.fd, "wb", closefd=False)  # noqa: SIM115 - closed in commit
            else:
                file = open(  # noqa: SIM115 - closed in commit/rollback
                    staged.fd,
                    "w",
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
            raise RuntimeError(f"AtomicFileWriter for {self.target_path} is not open")
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
            self.rollback()

    def __repr__(self) -> str:
        return f"AtomicFileWriter({str(self.target_path)!r}, mode={self.mode!r})"

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


def _to_bytes(path: str, content: object, encoding: str) -> bytes | bytearray | memoryview:
    if isinstance(content, str):
        if os.linesep != "\n":
            # Match open(path, "w"): "\n" becomes the platform's line separator.
            content = content.replace("\n", os.linesep)
        return content.encode(encoding)
    if isinstance(content, (bytes, bytearray, memoryview)):
        return content
    raise TypeError(f"content for {path} must be str or bytes, not {type(content).__name__}")


def _write_bytes(
    path: str,
    data: bytes | bytearray | memoryview,
    *,
    durable: bool,
    overwrite: bool,
    permissions: int | None,
    temp_dir: str | None = None,
) -> None:
    """Write ``data`` to ``path`` all-or-nothing (arguments already checked)."""
    staged = _Staged.create(path, temp_dir, overwrite=overwrite, permissions=permissions)
    try:
        staged.write_all(data)
        staged.commit(durable=durable)
    except OSError as exc:
        _name_target(exc, staged.target)
        raise
    finally:
        staged.discard()


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
    _check_permissions(permissions)
    data = _to_bytes(text_path, content, encoding)
    _write_bytes(
        text_path,
        data,
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
    _write_bytes(
        text_path,
        (text + "\n").encode("utf-8"),
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
    directory = _check_path(base_dir, "base_dir")
    if age_hours < 0:
        raise ValueError(f"age_hours must not be negative, not {age_hours!r}")
    cutoff = time.time() - age_hours * 3600.0
    me = _platform.current_pid()
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
            if pid == me or _platform.pid_exists(pid):
                continue
            yield Path(entry.path)


def cleanup_orphaned_temp_files(base_dir: StrPath, age_hours: float = 24.0) -> int:
    """Remove temp files that crashed writes left in ``base_dir``; return how many.

    Removes what :func:`find_orphaned_temp_files` yields: only this library's
    own temp files (``.tmp-{pid}-{hex}…`` regular files, never symlinks or
    directories, never followed), only when older than ``age_hours`` and only
    when their writer process is gone - the temp of a write still running in
    a live process is never removed. Files vanishing concurrently are
    skipped. Memory stays flat for any number of entries. Not recursive.
    Safe to run while other processes write. Logs a WARNING per removed file.

    Returns:
        The number of files removed (0 if ``base_dir`` does not exist).
    """
    removed = 0
    for path in find_orphaned_temp_files(base_dir, age_hours):
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed += 1
        logger.warning("removed orphaned temp file %s", path)
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
