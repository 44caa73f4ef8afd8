"""Many files under one root committed all or nothing, durably, with crash recovery.

:class:`AtomicBatch` collects writes and deletes of files under one root
directory and commits them as one: after ``commit()`` returns every change is
in place (and, with ``durable=True``, survives a power cut); after a crash at
any instant (``kill -9``, power cut) and :func:`recover`, the tree holds every
change of the batch or none of them. :func:`read_snapshot` reads several files
as one consistent state. ``docs/batch.md`` gives the protocol step by step,
why each fsync is there, the recovery argument, the costs and the limits.

The library's own files live in one hidden directory, ``ROOT/.htmlgraph-batch``:

* ``lock/`` - the :class:`~htmlgraph.DirectoryLocker` markers that serialise
  commits (exclusive) against each other and against snapshots (shared);
* ``txn-{pid}-{tag}-{token}/`` - one per batch being built: the staged new
  contents (``0``, ``1``, ... one file per write, streamed there as the caller
  writes) and, once committed, the ``journal`` that lists the operations.

Protocol (redo only; nothing in the tree changes before the commit point)::

    stage: write each new content to txn/N                (no fsync yet)
    lock exclusive; recover any earlier interrupted batch
    journal.pending: ops + each target's identity before the batch + crc32
    R1 (parallel): fsync(txn/N...), fsync(journal.pending), fsync(txn), fsync(hidden)
    rename(journal.pending, journal)
    R2: fsync(txn)                                         <- commit point
    apply: rename(txn/N, target) / unlink(target), in order
    R3 (parallel): fsync(every directory touched, txn)
    unlink(journal), rmdir(txn); unlock

One operation (no journal: one rename is atomic by itself)::

    stage txn/0; fsync(txn/0); lock exclusive; recover
    rename(txn/0, target) / unlink(target)                 <- commit point
    fsync(target's directory, parents of created ones); rmdir(txn); unlock

Recovery (under the exclusive lock, by whichever process comes first) rolls
a committed journal forward - renaming only staged files that still exist,
and skipping a target changed after the batch began - and removes the
staging directories of batches that never committed and whose process is
gone. Operating-system calls go through the module seams ``_fsync``,
``_fsync_dir`` and ``_replace``; ``_step(name)`` is called at every step of
the protocol so that tests can crash there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import io
import json
import logging
import os
import shutil
import stat
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, NamedTuple, Union, overload

from htmlgraph import _identity, _platform, metrics
from htmlgraph.atomic_ops import (
    DirectoryLocker,
    LockTimeout,
    _check_may_replace,
    _check_path,
    _check_permissions,
    _json_document,
    _make_dirs,
    _match_target,
    _remove_dirs,
    _resolve_unusual,
)

__all__ = ["HIDDEN_DIR", "AtomicBatch", "RecoveryReport", "read_snapshot", "recover"]

logger = logging.getLogger(__name__)

StrPath = Union[str, "os.PathLike[str]"]

HIDDEN_DIR = ".htmlgraph-batch"
_LOCK_DIR = "lock"
_TXN_PREFIX = "txn-"
# A batch's first write is staged as a file in the hidden directory itself,
# ``stage-{pid}-{tag}-{token}``: a batch that stays one write needs no staging
# directory (its mkdir and rmdir cost more than the write's own fsyncs on a
# fast disk); a batch that grows moves the file into its ``txn-*`` at commit.
_LONE_PREFIX = "stage-"
_JOURNAL = "journal"
_PENDING = "journal.pending"
_FORMAT = "htmlgraph-batch 1"
_DEFAULT_TIMEOUT = 60.0
# Threads for the parallel fsync rounds: 64 beat 16 in R1 of a 100-file batch by
# 10-20 % on loop ext4 and xfs (benchmarks/batch.py --pools; docs/batch.md).
_POOL_THREADS = 64
_COPY_CHUNK = 1 << 20

# Windows: FlushFileBuffers needs a handle opened for writing.
_O_SYNC_AGAIN = os.O_WRONLY | _platform.O_NOFOLLOW | _platform.O_BINARY
# Reads never block on a FIFO planted under the root, nor follow a symlink.
_O_READ = _platform.O_READ | _platform.O_NOFOLLOW
# Path separators a name may use here ("/" always; "\\" too on Windows).
_SEPARATORS = "".join(sorted({"/", os.sep, os.altsep or "/"}))

# --------------------------------------------------------------------------
# Seams: tests replace these through the module and assert they were hit.
# --------------------------------------------------------------------------
_fsync: Callable[[int], None] = _platform.fsync_file
_fsync_dir: Callable[[str], None] = _platform.fsync_dir
_replace: Callable[[str, str], None] = _platform.replace


def _no_step(name: str) -> None:
    """Called at every step of the commit and recovery protocol (a test seam)."""


_step: Callable[[str], None] = _no_step

# A thread pool for the parallel fsync rounds: os.fsync releases the GIL,
# and concurrent fsyncs on ext4 and xfs share one journal commit
# (Documentation/filesystems/ext4.rst, max_batch_time). Created on first use,
# never at import; threads start only as calls wait for one; a forked child
# makes its own.
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _run_parallel(calls: Sequence[Callable[[], None]]) -> None:
    """Run every call, several at a time; raise the first error after all finished."""
    global _pool, _pool_pid
    if len(calls) <= 1:
        for call in calls:
            call()
        return
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=_POOL_THREADS, thread_name_prefix="htmlgraph-fsync"
            )
            _pool_pid = os.getpid()
        pool = _pool
    futures = [pool.submit(call) for call in calls]
    error: BaseException | None = None
    for future in futures:
        try:
            future.result()
        except BaseException as exc:  # re-raised below, after all finished
            if error is None:
                error = exc
    if error is not None:
        raise error


def _sync_file_by_name(path: str) -> None:
    fd = os.open(path, _O_SYNC_AGAIN)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------


def _check_root(root: object) -> str:
    """Return the real path of an existing root directory, or raise a clear error."""
    text = _check_path(root, "root")
    real = os.path.realpath(text)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "batch root does not exist", text) from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "batch root is not a directory", text)
    return real


def _split_rel(rel: object) -> list[str]:
    """Check a path relative to the root and return its components."""
    text = _check_path(rel, "batch path")
    separators = _SEPARATORS
    if os.path.isabs(text) or text[0] in separators or os.path.splitdrive(text)[0]:
        raise ValueError(f"batch path must be relative to the root, not absolute: {text!r}")
    for separator in separators:
        text = text.replace(separator, "/")
    parts = text.split("/")
    if ".." in parts:
        raise ValueError(f"batch path must not contain '..': {text!r}")
    if text[-1] in separators:
        raise IsADirectoryError(errno.EISDIR, "batch path ends with a separator", text)
    parts = [part for part in parts if part not in ("", ".")]
    if not parts:
        raise ValueError(f"batch path names the root itself: {text!r}")
    if parts[0] == HIDDEN_DIR:
        raise ValueError(f"batch path is inside the library's own directory {HIDDEN_DIR}: {text!r}")
    return parts


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def _rel_of(path: str, root: str) -> str:
    """``path`` relative to ``root`` (which contains it), "/"-separated."""
    prefix = os.path.join(root, "")
    # The usual case needs no relpath (which normalises both paths again).
    rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, root)
    return rel.replace(os.sep, "/") if os.sep != "/" else rel


class _Target(NamedTuple):
    """Where one batch path lands: its real path, inside the real root."""

    rel: str  # relative to the real root, "/"-separated (the journal's name)
    path: str  # absolute real path
    lstat: os.stat_result | None  # the target now (None: missing)
    nearest_dir: str  # the nearest directory that exists on the way to it


def _resolve(
    real_root: str,
    given: str,
    parts: list[str],
    *,
    follow: bool,
    replace: bool = False,
    parents: dict[str, str] | None = None,
) -> _Target:
    """Resolve a checked batch path under ``real_root``; refuse escapes and directories.

    Every directory on the way is resolved (symlinks followed); the path must
    stay inside the root and out of the hidden directory. ``follow``: a
    symlink as the last component is written through (writes) or removed
    itself (deletes). ``replace``: the path will be written, so it obeys
    :func:`~htmlgraph.atomic_ops.atomic_write`'s rules - a symlink is followed
    and another user's file replaced only where the kernel would let
    ``open()`` (``fs.protected_symlinks``, ``fs.protected_regular``), and a
    FIFO, socket or device is refused (``EINVAL``). ``parents`` caches
    resolved parent directories (realpath costs one lstat per component: ten
    per file, without it, in a batch).
    """
    key = "/".join(parts[:-1])
    parent = parents.get(key) if parents is not None else None
    if parent is None:
        parent = os.path.realpath(os.path.join(real_root, *parts[:-1]))
        if parent != real_root and not _inside(parent, real_root):
            raise ValueError(f"batch path leaves the root through a symlink: {given!r}")
        if parents is not None and os.path.isdir(parent):
            parents[key] = parent
    path = os.path.join(parent, parts[-1])
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise NotADirectoryError(
            errno.ENOTDIR, "a parent of the batch path is a file", given
        ) from None
    if replace and st is not None and not stat.S_ISDIR(st.st_mode):
        if stat.S_ISREG(st.st_mode):
            _check_may_replace(path, st)
        else:
            _resolve_unusual(path, st)  # raises where atomic_write refuses
    if follow and st is not None and stat.S_ISLNK(st.st_mode):
        path = os.path.realpath(path)
        if not _inside(path, real_root):
            raise ValueError(f"batch path leaves the root through a symlink: {given!r}")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
    rel = _rel_of(path, real_root)
    if rel.split("/")[0] == HIDDEN_DIR:
        raise ValueError(f"batch path resolves into the library's own directory: {given!r}")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "batch path names a directory", given)
    return _Target(rel, path, st, _nearest_dir(path, given))


def _nearest_dir(path: str, given: str) -> str:
    """The nearest existing directory above ``path``, where its missing ones will be made.

    Raises:
        NotADirectoryError: A parent is a file, or a symlink that leads to
            no directory (no directory could be made there).
    """
    nearest = os.path.dirname(path)
    while not os.path.isdir(nearest):
        if os.path.lexists(nearest):
            raise NotADirectoryError(errno.ENOTDIR, "a parent of the batch path is a file", given)
        nearest = os.path.dirname(nearest)
    return nearest


def _identity_of(st: os.stat_result | None) -> list[int] | None:
    """What recovery compares to tell "untouched since the batch began" (None: missing)."""
    if st is None:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


# --------------------------------------------------------------------------
# The hidden directory and the journal
# --------------------------------------------------------------------------


def _stranger(st: os.stat_result, real_root: str) -> bool:
    """Is ``st``, the hidden directory, a stranger's?

    In a sticky directory (``/tmp``) other users may create names but not
    touch ours, so a hidden directory another user made there is theirs to
    fill (lock markers, journals): refused. Ours, root's and the root
    directory's owner's are trusted; so is one under a root that is not
    sticky, whose writers could replace it anyway. (Staging directories are
    judged more strictly: :func:`_txn_state`.)
    """
    if _platform.trusted_owner(st):
        return False
    root_st = os.stat(real_root)
    return bool(root_st.st_mode & stat.S_ISVTX) and root_st.st_uid != st.st_uid


def _hidden(real_root: str, *, create: bool) -> str:
    """Return ``ROOT/.htmlgraph-batch``, creating it (durably) when asked.

    Raises:
        NotADirectoryError: Something else has its name.
        PermissionError: A stranger made it, in a sticky root (:func:`_stranger`).
    """
    hidden = os.path.join(real_root, HIDDEN_DIR)
    try:
        st = os.lstat(hidden)
    except FileNotFoundError:
        if not create:
            return hidden
        try:
            # No more open than the root (its sticky bit included): whoever
            # can plant a staging directory here can write the root itself.
            os.mkdir(hidden, stat.S_IMODE(os.stat(real_root).st_mode) & 0o3777)
        except FileExistsError:
            pass
        else:
            # Journals live below it: its own entry must be durable first.
            _fsync_dir(real_root)
        st = os.lstat(hidden)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "the batch directory is not a directory", hidden)
    if _stranger(st, real_root):
        raise PermissionError(
            errno.EPERM,
            f"the batch directory belongs to uid {st.st_uid}, a stranger, in a sticky "
            "directory; refusing it",
            hidden,
        )
    return hidden


def _txn_state(txn: str, name: str, real_root: str) -> Literal["ours", "skip", "discard"]:
    """What recovery may do with the staging directory ``txn`` (named ``name``).

    ``"ours"``: the caller's own; its journal is read, and the batch
    finished or discarded. Any other user's (root's included, when the
    caller is not root) is never replayed with the caller's rights - its
    journal could name changes its writer may not make - so it is
    ``"skip"``ped while its writer may still be staging, ``"discard"``ed
    by root when it never committed and its process is gone, and refused
    loudly when it committed: only its user may finish it. ``"skip"`` also
    for a symlink, or a stranger's in a sticky root (:func:`_stranger`:
    never even looked into).

    Raises:
        PermissionError: Another user's batch committed and is not finished,
            or it cannot be looked into and its process is gone (it may have
            committed). It names ``txn``; that user's next batch or recover
            finishes it.
    """
    st = _lstat(txn)
    if st is None or not stat.S_ISDIR(st.st_mode) or _stranger(st, real_root):
        return "skip"
    if _platform.own(st):
        return "ours"
    try:
        os.lstat(os.path.join(txn, _JOURNAL))
    except FileNotFoundError:
        # Never committed: root may remove it once its writer is gone.
        return "discard" if _platform.is_root() and _owner_gone(name) else "skip"
    except PermissionError:
        if not _owner_gone(name):
            return "skip"  # staging, most likely: its writer will commit or discard it
        raise PermissionError(
            errno.EACCES,
            f"an interrupted batch of uid {st.st_uid} cannot be looked into: it may have "
            "committed, and only that user can finish it (recover, as that user)",
            txn,
        ) from None
    raise PermissionError(
        errno.EPERM,
        f"a batch of uid {st.st_uid} committed and is not finished: only that user may "
        "finish it (recover, as that user), its journal could name changes it may not make",
        txn,
    )


def _lone_usable(path: str, name: str) -> bool:
    """Is ``path`` (``stage-*``) a dead writer's staged file that this process may remove?"""
    if not _owner_gone(name, _LONE_PREFIX):
        return False
    st = _lstat(path)
    return st is not None and (_platform.own(st) or _platform.is_root())  # root may remove any


def _locker(real_root: str) -> DirectoryLocker:
    return DirectoryLocker(os.path.join(_hidden(real_root, create=True), _LOCK_DIR))


class _Op(NamedTuple):
    """One operation as the journal records it."""

    kind: Literal["write", "delete"]
    rel: str  # target, relative to the real root
    staged: str | None  # staged file name in the transaction directory (writes)
    before: list[int] | None  # the target's identity when the batch committed


def _encode_journal(start_ns: int, ops: Iterable[_Op]) -> bytes:
    body = json.dumps(
        {
            "format": _FORMAT,
            "start_ns": start_ns,
            "ops": [[op.kind, op.rel, op.staged, op.before] for op in ops],
        },
        separators=(",", ":"),
    ).encode("ascii")
    return body + b"\n" + f"{zlib.crc32(body):08x}\n".encode("ascii")


def _decode_journal(data: bytes) -> tuple[int, list[_Op]] | None:
    """Parse a journal; None if it is torn or not ours (then it never committed)."""
    body, sep, tail = data.rstrip(b"\n").rpartition(b"\n")
    if not sep or tail != f"{zlib.crc32(body):08x}".encode("ascii"):
        return None
    try:
        doc = json.loads(body)
        if doc["format"] != _FORMAT:
            return None
        ops = [_Op(kind, rel, staged, before) for kind, rel, staged, before in doc["ops"]]
        start_ns = doc["start_ns"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    # Strictly what _encode_journal writes: an int (never 1e400, NaN, a string).
    if type(start_ns) is not int:
        return None
    for op in ops:
        if op.kind not in ("write", "delete") or not _journal_rel_ok(op.rel):
            return None
        if op.kind == "write" and not (isinstance(op.staged, str) and op.staged.isdigit()):
            return None
    return start_ns, ops


def _journal_rel_ok(rel: object) -> bool:
    """A journaled path must stay under root and out of the hidden directory.

    The journal is data on disk: a damaged or planted one must not make
    recovery rename or delete anything elsewhere.
    """
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return False
    if any(separator in rel for separator in _SEPARATORS if separator != "/"):
        return False
    parts = rel.split("/")
    if os.path.isabs(rel) or os.path.splitdrive(rel)[0] or parts[0] == HIDDEN_DIR:
        return False
    return all(part not in ("", ".", "..") for part in parts)


# --------------------------------------------------------------------------
# Recovery
# --------------------------------------------------------------------------


class RecoveryReport(NamedTuple):
    """What :func:`recover` did.

    Attributes:
        finished: Interrupted batches that had committed and were rolled forward.
        discarded: Batches that never committed, whose staged files were removed.
        applied: Paths (relative to the root) that recovery wrote or deleted.
        kept: Paths recovery left alone because they changed after the batch began.
    """

    finished: int = 0
    discarded: int = 0
    applied: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        """True if recovery changed anything."""
        return bool(self.finished or self.discarded)


def _changed_after(st: os.stat_result, before: list[int] | None, start_ns: int) -> bool:
    """Did someone else write this target after the batch began? Then it wins.

    Its identity differs from the one recorded at commit, and it was modified
    at or after the batch's start (a filesystem timestamp taken from the
    journal file itself). A target that differs but is older is what the
    batch replaced, come back after a power cut (the pre-batch content was
    not durable): the batch goes on over it.
    """
    return _identity_of(st) != before and st.st_mtime_ns >= start_ns


def _roll_forward(
    real_root: str, txn: str, start_ns: int, ops: list[_Op]
) -> tuple[list[str], list[str]]:
    """Finish a committed batch; idempotent, crash-safe. Returns (applied, kept)."""
    applied: list[str] = []
    kept: list[str] = []
    dirs: set[str] = set()
    for op in ops:
        _step("recover-op")
        target = os.path.join(real_root, *op.rel.split("/"))
        st = _lstat(target)
        if op.kind == "write":
            if op.staged is None:
                continue  # _decode_journal lets no such write through
            staged = os.path.join(txn, op.staged)
            if not os.path.lexists(staged):
                continue  # renamed before the crash
            if st is not None and (
                stat.S_ISDIR(st.st_mode) or _changed_after(st, op.before, start_ns)
            ):
                logger.warning("batch recovery: %s changed after the batch began; kept", target)
                kept.append(op.rel)
                continue
            directory = os.path.dirname(target)
            try:
                for made in _make_dirs(directory):
                    dirs.add(os.path.dirname(made))
                _replace(staged, target)
            except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
                logger.warning("batch recovery: cannot write %s (%s); kept", target, exc)
                kept.append(op.rel)
                continue
            dirs.update((directory, txn))
            applied.append(op.rel)
        else:
            if st is None:
                continue  # deleted before the crash
            if stat.S_ISDIR(st.st_mode) or _changed_after(st, op.before, start_ns):
                logger.warning("batch recovery: %s changed after the batch began; kept", target)
                kept.append(op.rel)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            dirs.add(os.path.dirname(target))
            applied.append(op.rel)
    _step("recover-applied")
    _run_parallel([functools.partial(_fsync_dir, d) for d in sorted(dirs)])
    _step("recover-synced")
    _remove_txn(txn)
    _step("recover-retired")
    return applied, kept


def _remove_txn(txn: str) -> None:
    """Remove a transaction directory: the journal first, so a crash leaves no half-journal."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(txn, _JOURNAL))
    shutil.rmtree(txn, ignore_errors=True)


def _remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_tree(path: str) -> None:
    try:
        os.rmdir(path)  # the usual case after a commit: already empty
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _owner_gone(name: str, prefix: str = _TXN_PREFIX) -> bool:
    """Is the process that stages in ``{prefix}{pid}-{tag}-{token}`` gone (proof only)?

    A process whose start cannot be read (``/proc`` mounted ``hidepid``, for
    another user's) is alive while its pid exists; one of another host or
    pid namespace cannot be judged.
    """
    fields = name[len(prefix) :].split("-")
    if len(fields) != 3:
        return False
    pid = _identity.parse_pid(fields[0])
    tag = fields[1]
    if pid is None or len(tag) != 16:
        return False
    if pid == os.getpid():  # our pid: reused from a dead process of this place?
        mine = _identity.owner_tag(pid)
        return tag[:8] == mine[:8] and tag != mine
    return _identity.tagged_owner_state(pid, tag) == "gone"


def _recover_locked(real_root: str, *, skip: str | None = None) -> RecoveryReport:
    """Recover every interrupted batch under ``real_root``; the caller holds the lock."""
    hidden = _hidden(real_root, create=False)
    try:
        names = sorted(os.listdir(hidden))
    except FileNotFoundError:
        return RecoveryReport()
    finished = discarded = 0
    applied: list[str] = []
    kept: list[str] = []
    # Oldest first would matter only for two committed journals, which the
    # lock makes impossible: a journal exists only while its writer holds it.
    for name in names:
        txn = os.path.join(hidden, name)
        if name.startswith(_LONE_PREFIX) and _lone_usable(txn, name):
            # A one-write batch that never committed (or committed: then this
            # is a second name of the target's inode). Only a name goes.
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(txn)
                logger.warning("batch recovery: discarding the uncommitted batch %s", txn)
                discarded += 1
                metrics.counter("htmlgraph_batch_recoveries_total", action="rolled_back").inc()
            continue
        if not name.startswith(_TXN_PREFIX) or txn == skip:
            continue
        state = _txn_state(txn, name, real_root)
        if state == "skip":
            continue
        if state == "discard":
            logger.warning("batch recovery: discarding the uncommitted batch %s", txn)
            _remove_txn(txn)
            discarded += 1
            metrics.counter("htmlgraph_batch_recoveries_total", action="rolled_back").inc()
            continue
        try:
            data: bytes | None = _read_file(os.path.join(txn, _JOURNAL))
        except FileNotFoundError:
            data = None
        parsed = None if data is None else _decode_journal(data)
        if parsed is not None:
            logger.warning("batch recovery: finishing the interrupted batch %s", txn)
            done, left = _roll_forward(real_root, txn, *parsed)
            applied += done
            kept += left
            finished += 1
            metrics.counter("htmlgraph_batch_recoveries_total", action="rolled_forward").inc()
        elif data is not None or _owner_gone(name):
            # Never committed (a torn journal cannot be one that committed:
            # the commit renames a journal already fsynced): undo = forget.
            logger.warning("batch recovery: discarding the uncommitted batch %s", txn)
            _remove_txn(txn)
            discarded += 1
            metrics.counter("htmlgraph_batch_recoveries_total", action="rolled_back").inc()
    return RecoveryReport(finished, discarded, tuple(applied), tuple(kept))


def _needs_recovery(real_root: str, *, abandoned: bool = False) -> bool:
    """Is there a committed journal to finish (``abandoned``: or a dead writer's staging)?"""
    hidden = os.path.join(real_root, HIDDEN_DIR)
    try:
        names = os.listdir(hidden)
    except (FileNotFoundError, NotADirectoryError):
        return False
    for name in names:
        path = os.path.join(hidden, name)
        if name.startswith(_TXN_PREFIX):
            try:
                state = _txn_state(path, name, real_root)
            except PermissionError:
                return True  # recovery refuses it, loudly
            if state == "skip":
                continue
            if state == "discard" or not os.path.lexists(os.path.join(path, _JOURNAL)):
                if abandoned and (state == "discard" or _owner_gone(name)):
                    return True
                continue
            return True
        elif abandoned and name.startswith(_LONE_PREFIX) and _lone_usable(path, name):
            return True
    return False


def recover(root: StrPath, *, timeout: float = _DEFAULT_TIMEOUT) -> RecoveryReport:
    """Finish or undo every interrupted batch under ``root``; return what was done.

    A batch that committed (its journal is durable) is rolled forward: each
    staged file still present is renamed into place and each delete not yet
    done is done, except on a target changed after the batch began, which is
    kept. A batch that never committed is discarded (its staged files
    removed) once its process is gone. Only the caller's own batches are
    finished: another user's journal could name changes that user may not
    make, so a committed batch of another user's is refused with
    ``PermissionError`` (that user's next batch or recover finishes it),
    and its staging that never committed is removed by root only. Runs
    under the root's exclusive lock; idempotent, and itself crash-safe (a
    crash during recovery is recovered next time). Batches and
    :func:`read_snapshot` call it by themselves.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        LockTimeout: The lock was not acquired within ``timeout`` seconds.
    """
    real_root = _check_root(root)
    with _locker(real_root).exclusive(timeout):
        return _recover_locked(real_root)


# --------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------


def _read_file(path: str) -> bytes:
    """Read a regular file of ours (journal, staged data); refuse anything else."""
    fd = os.open(path, _O_READ)
    with open(fd, "rb", closefd=True) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return f.read()


def _all_files(real_root: str) -> list[str]:
    found: list[str] = []
    for directory, dirnames, filenames in os.walk(real_root):
        if directory == real_root and HIDDEN_DIR in dirnames:
            dirnames.remove(HIDDEN_DIR)
        dirnames.sort()
        found += sorted(_rel_of(os.path.join(directory, name), real_root) for name in filenames)
    return found


def _snapshot_file(real_root: str, rel: str) -> str | None:
    """Return the regular file a whole-tree snapshot reads for ``rel``, or None to skip it.

    ``os.walk`` lists symlinks, FIFOs and sockets among the files: a symlink
    is read through when it leads to a regular file inside the root (and out
    of the library's directory), as a named path is; anything else - a
    dangling link, one leading out, a FIFO, socket or device - is not a file
    of the tree, and a stranger who plants one must not make the snapshot
    fail.
    """
    path = os.path.join(real_root, rel)
    st = _lstat(path)
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            target = _resolve(real_root, rel, rel.split("/"), follow=True)
        except (ValueError, OSError):
            return None  # leads out of the root or into the library's directory
        path, st = target.path, target.lstat
    return path if st is not None and stat.S_ISREG(st.st_mode) else None


def read_snapshot(
    root: StrPath, paths: Iterable[StrPath] | None = None, *, timeout: float = _DEFAULT_TIMEOUT
) -> dict[str, bytes]:
    """Read files under ``root`` as one consistent state: no batch half-applied.

    Holds the root's lock shared while reading (a committing batch waits for
    it, and it for the batch's short commit); an interrupted batch is
    recovered first. Plain readers that just open files never block and see
    each file old or new, but may see a batch half-applied during its commit
    (``docs/batch.md`` measures that window).

    Args:
        root: The batch root.
        paths: Paths relative to ``root`` (checked like batch paths); ``None``
            reads every file under ``root`` except the library's own.
        timeout: Seconds to wait for the lock.

    Returns:
        Each path (as given, or "/"-separated for ``None``) that names a file,
        mapped to its bytes. A missing file is absent from the result. With
        ``None``, a symlink is read through when it leads to a file inside
        the root; dangling links, links that lead out, FIFOs, sockets and
        devices are skipped (named in ``paths``, they raise).

    Raises:
        ValueError, IsADirectoryError: A path is invalid (as for a batch).
        LockTimeout: The lock was not acquired within ``timeout``.
    """
    real_root = _check_root(root)
    wanted: list[tuple[str, list[str]]] | None = None
    if paths is not None:
        wanted = [(os.fspath(p), _split_rel(p)) for p in paths]
    locker = _locker(real_root)
    while True:
        with locker.shared(timeout):
            if not _needs_recovery(real_root):
                result: dict[str, bytes] = {}
                if wanted is None:
                    for rel in _all_files(real_root):
                        path = _snapshot_file(real_root, rel)
                        if path is not None:
                            with contextlib.suppress(FileNotFoundError):
                                result[rel] = _read_file(path)
                    return result
                for given, parts in wanted:
                    target = _resolve(real_root, given, parts, follow=True)
                    if target.lstat is not None:
                        result[given] = _read_file(target.path)
                return result
        with locker.exclusive(timeout):
            _recover_locked(real_root)


# --------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------


class _Entry:
    """One operation as the caller gave it (state per file, never its content)."""

    __slots__ = ("given", "kind", "missing_ok", "staged", "stream", "target")

    def __init__(
        self, kind: Literal["write", "delete"], given: str, target: _Target, staged: str | None
    ) -> None:
        self.kind = kind
        self.given = given
        self.target = target
        self.staged = staged
        self.missing_ok = False
        self.stream: IO[bytes] | IO[str] | None = None


def _check_change(
    directory: str,
    target_st: os.stat_result | None,
    given: str,
    checked: dict[str, os.stat_result],
) -> os.stat_result:
    """Refuse a change the kernel would refuse; return ``directory``'s stat.

    ``directory`` (existing) is where the name is created, replaced or
    removed; ``target_st`` the file there now, if any. ``checked`` caches the
    directories already found changeable.

    Raises:
        PermissionError: No write and search permission on ``directory``
            (a read-only mount included), or the target is another user's
            file in a sticky directory (only its owner, the directory's owner
            or root may replace or remove it).
    """
    st = checked.get(directory)
    if st is None:
        st = os.stat(directory)
        if not _platform.may_change_entries(directory):
            raise PermissionError(
                errno.EACCES,
                f"no permission to create or remove names in {directory!r}, where the "
                "batch path lands",
                given,
            )
        checked[directory] = st
    if target_st is not None and not _platform.may_remove(st, target_st):
        raise PermissionError(
            errno.EPERM,
            "the batch path is another user's file in a sticky directory: only its "
            "owner, the directory's owner or root may replace or delete it",
            given,
        )
    return st


def _target_now(entry: _Entry) -> os.stat_result | None:
    """The target as the commit finds it, checked before anything changes (None: missing).

    Something else may have changed it since it was added: a target that
    became a directory, or a write whose parent became a file (its directory
    could not be made), fails the commit while nothing has changed yet.
    """
    try:
        st = os.lstat(entry.target.path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        if entry.kind == "delete":
            return None  # no file can be there
        raise NotADirectoryError(
            errno.ENOTDIR, "a parent of the batch path is not a directory", entry.given
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "batch path names a directory", entry.given)
    return st


class AtomicBatch:
    """Write and delete many files under one root, all or nothing.

    Atomic: after a crash at any instant (``kill -9``, power cut with
    ``durable=True``) and recovery, the tree under ``root`` holds every
    change of the batch or none. Durable: once :meth:`commit` returns (the
    ``with`` block exits normally) every change survives a power cut;
    ``durable=False`` skips the fsyncs and covers process crashes only.
    Content is staged in ``ROOT/.htmlgraph-batch`` as it is written (memory
    stays flat); nothing under root changes before the commit. An exception
    in the ``with`` block discards the batch. Batches from any number of
    processes on one root serialise on the root's lock; plain readers see
    each file old or new, and may see a batch half-applied during its commit.
    One instance is one batch, used from one thread.

    Args:
        root: An existing directory; every path is relative to it.
        durable: fsync so that a returned commit survives a power cut.
        timeout: Seconds to wait for the root's lock at commit (and at the
            first path, when an interrupted batch must be finished first).
        sync: How the data is made durable. ``"fsync"`` (default, portable):
            each staged file and directory is fsynced, in parallel threads.
            ``"syncfs"`` (Linux only): one syncfs(2) of root's filesystem
            instead, several times faster for many files, but it also waits
            for every other process's unwritten data on that filesystem. A
            batch of one operation fsyncs its one file either way.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a directory.

    Example:
        >>> with AtomicBatch("site") as batch:  # doctest: +SKIP
        ...     batch.write("nodes/a.html", "<p>a</p>")
        ...     batch.delete("nodes/old.html")
    """

    def __init__(
        self,
        root: StrPath,
        *,
        durable: bool = True,
        timeout: float = _DEFAULT_TIMEOUT,
        sync: Literal["fsync", "syncfs"] = "fsync",
    ) -> None:
        if sync not in ("fsync", "syncfs"):
            raise ValueError(f"sync must be 'fsync' or 'syncfs', not {sync!r}")
        if sync == "syncfs" and not _platform.HAS_SYNCFS:
            raise ValueError("sync='syncfs' needs Linux (syncfs(2))")
        self._root = _check_root(root)
        self.sync = sync
        self._sync_fd = -1
        self._given_root = os.fspath(root)
        self.durable = durable
        self.timeout = timeout
        self._entries: list[_Entry] = []
        self._by_rel: dict[str, _Entry] = {}
        self._dirs_of: set[str] = set()  # every directory a batch path needs
        self._txn: str | None = None
        self._hidden_path: str | None = None
        self._txn_dev = -1  # the hidden directory's filesystem: staged files live there
        # The first write's staged file while it is outside a txn-* (see _LONE_PREFIX).
        self._lone: str | None = None
        self._lone_entry: _Entry | None = None
        self._lone_finalizer: weakref.finalize[[str], AtomicBatch] | None = None
        self._staged_count = 0
        self._parents: dict[str, str] = {}  # resolved parent directories
        self._dir_stats: dict[str, os.stat_result] = {}  # the directories changes land in
        self._looked = False  # for a committed batch to finish, before the first path
        self._state: Literal["open", "committed", "discarded"] = "open"
        self._finalizer: weakref.finalize[[str], AtomicBatch] | None = None

    @property
    def root(self) -> Path:
        """The root directory, as given."""
        return Path(self._given_root)

    def __repr__(self) -> str:
        return f"AtomicBatch({self._given_root!r}, {len(self._entries)} ops, {self._state})"

    def __enter__(self) -> AtomicBatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    # ------------------------------------------------------------ operations
    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"this batch on {self._given_root} is already {self._state}")

    def _hidden_dir(self) -> str:
        """The root's hidden directory, created (and its filesystem noted) on first use."""
        if self._hidden_path is None:
            hidden = _hidden(self._root, create=True)
            self._txn_dev = os.stat(hidden).st_dev
            self._hidden_path = hidden
            if self.sync == "syncfs" and self.durable:
                # Opened before the first staged byte, so syncfs reports every
                # writeback error of this batch's files from here on.
                self._sync_fd = os.open(hidden, _O_READ | getattr(os, "O_DIRECTORY", 0))
        return self._hidden_path

    def _txn_dir(self) -> str:
        if self._txn is None:
            hidden = self._hidden_dir()
            pid = os.getpid()
            name = f"{_TXN_PREFIX}{pid}-{_identity.owner_tag(pid)}-{os.urandom(8).hex()}"
            txn = os.path.join(hidden, name)
            os.mkdir(txn, 0o700)
            self._txn = txn
            self._finalizer = weakref.finalize(self, _remove_tree, txn)
        return self._txn

    def _add(self, kind: Literal["write", "delete"], rel: StrPath) -> _Entry:
        """Check ``rel`` (before anything is written) and register it."""
        self._check_open()
        parts = _split_rel(rel)
        given = os.fspath(rel)
        if not self._looked:
            # Paths are resolved (symlinks followed, modes kept) against the
            # tree as it is: first finish a batch that committed and was
            # interrupted, whose changes belong to that tree.
            if _needs_recovery(self._root):
                recover(self._root, timeout=self.timeout)
            self._looked = True
        write = kind == "write"
        target = _resolve(
            self._root, given, parts, follow=write, replace=write, parents=self._parents
        )
        if target.rel in self._by_rel:
            raise ValueError(f"path appears twice in one batch: {given!r}")
        if target.rel in self._dirs_of:
            raise ValueError(f"path is a directory of another path in this batch: {given!r}")
        pieces = target.rel.split("/")
        ancestors = ["/".join(pieces[:i]) for i in range(1, len(pieces))]
        for ancestor in ancestors:
            if ancestor in self._by_rel:
                raise ValueError(f"path lies under {ancestor!r}, a file in this batch: {given!r}")
        if kind == "write" or target.lstat is not None:
            # Refused now (and checked again at commit), not after the commit
            # point, where a refused rename or unlink would stop the batch
            # half-applied.
            dir_st = _check_change(target.nearest_dir, target.lstat, given, self._dir_stats)
            if kind == "write":
                self._hidden_dir()
                if dir_st.st_dev != self._txn_dev:
                    # Staged files are renamed into place: one filesystem per root.
                    raise OSError(
                        errno.EXDEV, "batch path is on another filesystem than root", given
                    )
        return _Entry(kind, given, target, None)

    def _register(self, entry: _Entry) -> None:
        self._entries.append(entry)
        self._by_rel[entry.target.rel] = entry
        pieces = entry.target.rel.split("/")
        self._dirs_of.update("/".join(pieces[:i]) for i in range(1, len(pieces)))

    def _stage(self, entry: _Entry, permissions: int | None) -> int:
        """Create the staged file for a write; return its fd.

        The first write of a batch is staged as a file of its own in the
        hidden directory (``stage-*``), the others in the batch's ``txn-*``.
        """
        _check_permissions(permissions)
        if self._txn is None and self._lone_entry is None:
            pid = os.getpid()
            name = f"{_LONE_PREFIX}{pid}-{_identity.owner_tag(pid)}-{os.urandom(8).hex()}"
            path = os.path.join(self._hidden_dir(), name)
            # Recorded before the call that creates it: an interruption right
            # after the open still leaves the file to discard().
            self._lone, self._lone_entry = path, entry
            self._lone_finalizer = weakref.finalize(self, _remove_file, path)
        else:
            name = str(self._staged_count)
            self._staged_count += 1
            path = os.path.join(self._txn_dir(), name)
            entry.staged = name
        st = entry.target.lstat
        mode = permissions if permissions is not None else None
        if mode is None and st is not None:
            mode = stat.S_IMODE(st.st_mode)
        # Owner-writable while staged (Windows: a read-only file cannot be
        # replaced); the exact mode is set on the fd below.
        try:
            fd = os.open(path, _platform.O_NEW_FILE, 0o666 if mode is None else mode | stat.S_IWUSR)
        except FileExistsError:
            # Not ours (a 64-bit random name, planted): never remove it.
            if entry is self._lone_entry:
                self._forget_lone(remove=False)
            raise
        try:
            if mode is not None:
                _match_target(fd, mode, st, created_with=True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _forget(self, entry: _Entry) -> None:
        """Remove the staged file of a write whose staging failed (the batch stays usable)."""
        if entry is self._lone_entry:
            self._forget_lone(remove=True)
        elif entry.staged is not None and self._txn is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._txn, entry.staged))

    def _forget_lone(self, *, remove: bool) -> None:
        """Stop tracking the lone staged file; remove it (``remove``) or leave it."""
        finalizer, self._lone_finalizer = self._lone_finalizer, None
        self._lone = self._lone_entry = None
        if finalizer is not None:
            if remove:
                finalizer()
            else:
                finalizer.detach()

    def _adopt_lone(self) -> None:
        """Move the lone staged file into ``txn-*``: the batch has more than one operation."""
        entry, lone = self._lone_entry, self._lone
        if entry is None or lone is None:
            return
        name = str(self._staged_count)
        self._staged_count += 1
        os.rename(lone, os.path.join(self._txn_dir(), name))
        entry.staged = name
        self._forget_lone(remove=False)  # renamed: the txn-* finalizer covers it now

    def write(
        self,
        path: StrPath,
        content: str | bytes,
        *,
        encoding: str = "utf-8",
        permissions: int | None = None,
    ) -> None:
        """Stage ``content`` (str or bytes) as the new content of ``path``.

        Text is encoded with ``encoding``. Missing parent directories are
        created at commit. An existing file keeps its mode unless
        ``permissions`` is given; a new one gets ``0o666 & ~umask``.

        Raises:
            TypeError: ``content`` is neither str nor bytes.
            ValueError: ``path`` is absolute, contains ``..``, leaves the root
                through a symlink, or is already in this batch.
            IsADirectoryError: ``path`` names a directory.
            PermissionError: ``path`` is, or leads through, a file or symlink
                that ``atomic_write`` would refuse (another user's, in a
                sticky directory: the kernel's ``fs.protected_*`` rules), or
                lands in a directory this process may not change (its write
                permission, a read-only mount, the sticky bit).
            OSError: ``path`` is a FIFO, socket or device (``EINVAL``).
            LockTimeout: The first path of a batch finishes a batch that
                committed and was interrupted, if one waits, under the
                root's lock, and it was not acquired within ``timeout``.
        """
        if not isinstance(content, (bytes, bytearray, memoryview, str)):
            kind = type(content).__name__
            raise TypeError(f"content for {os.fspath(path)!r} must be str or bytes, not {kind}")
        data = (
            content.replace("\n", os.linesep).encode(encoding)
            if isinstance(content, str)
            else content
        )
        entry = self._add("write", path)
        try:
            fd = self._stage(entry, permissions)
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except BaseException:
            self._forget(entry)
            raise
        self._register(entry)

    def write_json(
        self,
        path: StrPath,
        data: object,
        *,
        indent: int | None = 2,
        sort_keys: bool = False,
        permissions: int | None = None,
    ) -> None:
        """Stage ``data`` as JSON (UTF-8, trailing newline), like :func:`atomic_json_write`.

        Raises:
            TypeError, ValueError: ``data`` is not JSON-serialisable (or holds
                NaN/infinity); nothing is staged.
        """
        document = _json_document(data, os.fspath(path), indent=indent, sort_keys=sort_keys)
        self.write(path, document, permissions=permissions)

    @overload
    def open(
        self,
        path: StrPath,
        mode: Literal["wb"] = "wb",
        *,
        permissions: int | None = None,
    ) -> IO[bytes]: ...

    @overload
    def open(
        self,
        path: StrPath,
        mode: Literal["w"],
        *,
        encoding: str = "utf-8",
        errors: str | None = None,
        newline: str | None = None,
        permissions: int | None = None,
    ) -> IO[str]: ...

    def open(
        self,
        path: StrPath,
        mode: Literal["w", "wb"] = "wb",
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        permissions: int | None = None,
    ) -> IO[bytes] | IO[str]:
        """Open the new content of ``path`` for streaming; close it before the commit.

        Memory stays flat however much is written: the data goes straight
        to the staged file. ``mode`` is ``"wb"`` (default) or ``"w"`` (text).

        Raises:
            ValueError: Bad mode or path (as for :meth:`write`).
        """
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
        if mode == "wb" and (encoding is not None or errors is not None or newline is not None):
            raise ValueError("binary mode takes no encoding, errors or newline")
        entry = self._add("write", path)
        try:
            fd = self._stage(entry, permissions)
        except BaseException:
            self._forget(entry)
            raise
        stream: IO[bytes] | IO[str]
        if mode == "wb":
            stream = open(fd, "wb", buffering=io.DEFAULT_BUFFER_SIZE * 16, closefd=True)  # noqa: SIM115
        else:
            stream = open(  # noqa: SIM115 - the caller closes it
                fd, "w", encoding=encoding or "utf-8", errors=errors, newline=newline, closefd=True
            )
        entry.stream = stream
        self._register(entry)
        return stream

    def delete(self, path: StrPath, *, missing_ok: bool = False) -> None:
        """Delete ``path`` (a file or a symlink, never followed) with the batch.

        Raises:
            FileNotFoundError: ``path`` does not exist and ``missing_ok`` is
                false (also once an interrupted batch that committed, which
                might have made it, was finished).
            IsADirectoryError: ``path`` names a directory.
            PermissionError: ``path`` is in a directory this process may not
                change, or is another user's file in a sticky directory.
            ValueError: As for :meth:`write`.
            LockTimeout: Finishing that batch needed the root's lock, and it
                was not acquired within ``timeout``.
            OSError: Finishing that batch failed (what stops it is raised).
        """
        entry = self._add("delete", path)
        if entry.target.lstat is None and not missing_ok and _needs_recovery(self._root):
            # A batch that committed but was not finished may have made it:
            # finish that batch (under the lock), then look again.
            recover(self._root, timeout=self.timeout)
            entry = self._add("delete", path)
        if entry.target.lstat is None and not missing_ok:
            raise FileNotFoundError(errno.ENOENT, "batch delete of a missing file", entry.given)
        entry.missing_ok = missing_ok
        self._register(entry)

    # ---------------------------------------------------------------- commit
    def discard(self) -> None:
        """Drop the batch: remove its staged files; idempotent, a no-op after commit."""
        if self._state != "open":
            return
        self._state = "discarded"
        for entry in self._entries:
            if entry.stream is not None:
                with contextlib.suppress(OSError):
                    entry.stream.close()
        self._close_sync_fd()
        if self._lone_finalizer is not None:
            self._forget_lone(remove=True)
        if self._finalizer is not None:
            self._finalizer()  # removes the staging directory

    def _close_sync_fd(self) -> None:
        if self._sync_fd >= 0:
            fd, self._sync_fd = self._sync_fd, -1
            os.close(fd)

    def commit(self) -> None:
        """Apply every operation, all or nothing; durable when it returns (``durable=True``).

        Takes the root's exclusive lock, recovers any interrupted batch,
        then runs the protocol in ``docs/batch.md``. A batch of exactly one
        operation needs no journal: its staged file is fsynced, then renamed
        into place (or the file unlinked) and its directory fsynced, like
        :func:`atomic_write`; a lone write takes the lock only when an
        interrupted batch must be recovered first. An error before the
        commit point discards the batch (nothing changed); an error after it
        leaves a committed journal that is finished here if possible, else by
        the next :func:`recover`.

        Raises:
            RuntimeError: The batch is not open, or a stream from
                :meth:`open` is still open.
            LockTimeout: The root's lock was not acquired within ``timeout``.
            OSError: The commit failed (see above for what it left).
        """
        self._check_open()
        for entry in self._entries:
            if entry.stream is not None and not entry.stream.closed:
                raise RuntimeError(f"close the stream of {entry.given!r} before committing")
        if not self._entries:
            self.discard()
            self._state = "committed"
            return
        # One operation needs no journal: one rename (or unlink) is atomic by
        # itself (docs/batch.md, "A batch of one operation"). A missing_ok
        # delete of a file missing when it was added still counts: a batch
        # that committed meanwhile (or waits to be finished) may have made the
        # file, so only the commit, after recovery, may judge it gone.
        single = self._entries[0] if len(self._entries) == 1 else None
        started = time.perf_counter()
        try:
            if single is None:
                self._adopt_lone()  # every staged file of a journaled batch is in txn-*
            elif single.kind == "write":
                if self.durable:
                    # The staged data is private until the rename: make it
                    # durable before the lock, so the lock is held for less.
                    _sync_file_by_name(self._staged_path(single))
                    _step("one-durable")
                if not _needs_recovery(self._root, abandoned=True):
                    # Nothing to finish or clear first: one rename, as
                    # atomic_write does, needs no lock (docs/batch.md, "A batch
                    # of one operation").
                    try:
                        self._commit_one(single, started, locked=False)
                    finally:
                        self._close_sync_fd()
                    return
        except BaseException:
            if self._state == "open":
                self.discard()
            raise
        locker = _locker(self._root)
        # The acquisition is inside the try whose finally releases (a fresh
        # locker: release_lock is a no-op unless it holds), so an interrupt
        # handled as the call returns cannot leave the lock held.
        try:
            try:
                if not locker.acquire_exclusive_lock(self.timeout):
                    raise LockTimeout(locker.lock_dir, "exclusive", self.timeout)
            except BaseException:
                self.discard()
                raise
            if single is not None:
                self._commit_one(single, started, locked=True)
            else:
                self._commit_locked()
        finally:
            locker.release_lock()
            self._close_sync_fd()

    def _staged_path(self, entry: _Entry) -> str:
        if entry is self._lone_entry and self._lone is not None:
            return self._lone
        if self._txn is None or entry.staged is None:  # every write is staged
            raise RuntimeError(f"batch write of {entry.given!r} has no staged file")
        return os.path.join(self._txn, entry.staged)

    def _commit_one(self, entry: _Entry, started: float, *, locked: bool) -> None:
        """Commit a batch of exactly one operation: no journal, one rename or unlink.

        The caller (``durable``) has made a staged file durable and, when
        ``locked``, holds the lock: then any interrupted batch is recovered
        first. A write goes unlocked when nothing waits for recovery - no
        committed journal, no dead writer's staging (the caller checked):
        like ``atomic_write``, it is one atomic rename, and a batch that
        commits meanwhile treats it as a later write.
        Before the rename (or unlink) nothing under root changed and an error
        discards the batch; after it the batch is committed, and an error (a
        failed directory fsync) is raised with the change in place.
        """
        target = entry.target.path
        directory = os.path.dirname(target)
        applied = False
        try:
            if locked:
                _recover_locked(self._root, skip=self._txn)
            _step("one-checked")
            now = _target_now(entry)
            dirs = {directory}
            if entry.kind == "write":
                staged = self._staged_path(entry)
                created = _make_dirs(directory)
                try:
                    _replace(staged, target)
                except BaseException:
                    _remove_dirs(created)
                    raise
                applied = True
                if entry is self._lone_entry:
                    self._forget_lone(remove=False)  # renamed: the name is the target's now
                # A created directory's own entry lives in its parent.
                dirs.update(os.path.dirname(made) for made in created)
            elif now is None:
                if not entry.missing_ok:
                    raise FileNotFoundError(
                        errno.ENOENT, "batch delete of a missing file", entry.given
                    )
                dirs.clear()  # nothing to delete: nothing changed
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
            applied = True
            self._state = "committed"
            _step("one-applied")
            if self.durable:
                _run_parallel([functools.partial(_fsync_dir, d) for d in sorted(dirs)])
            _step("one-synced")
        except BaseException:
            if not applied:
                self.discard()
                raise
            self._retire()
            raise
        self._retire()
        _step("one-retired")
        if not dirs:
            return  # nothing was deleted: no commit to count (as for a no-op batch)
        metrics.counter("htmlgraph_batch_commits_total").inc()
        metrics.histogram("htmlgraph_batch_files").observe(1)
        metrics.histogram("htmlgraph_batch_commit_seconds").observe(time.perf_counter() - started)

    def _retire(self) -> None:
        """Remove the (now empty) staging directory; no fsync needed (no journal)."""
        if self._finalizer is not None:
            self._finalizer()

    def _commit_locked(self) -> None:
        started = time.perf_counter()
        txn = self._txn_dir()
        hidden = os.path.dirname(txn)
        committed = retired = False
        try:
            _recover_locked(self._root, skip=txn)
            _step("locked")
            if all(
                e.kind == "delete" and e.missing_ok and _lstat(e.target.path) is None
                for e in self._entries
            ):
                # Only missing_ok deletes, each of a file already gone: nothing to change.
                self.discard()
                self._state = "committed"
                return
            pending = os.path.join(txn, _PENDING)
            fd = os.open(pending, _platform.O_NEW_FILE, 0o600)
            try:
                # The batch's start on the filesystem's own clock: a target
                # modified at or after it was written after the batch began.
                start_ns = os.fstat(fd).st_mtime_ns
                ops: list[_Op] = []
                checked: dict[str, os.stat_result] = {}
                for entry in self._entries:
                    now = _target_now(entry)
                    if entry.kind == "delete" and now is None:
                        if entry.missing_ok:
                            continue
                        raise FileNotFoundError(
                            errno.ENOENT, "batch delete of a missing file", entry.given
                        )
                    # Again under the lock: since the path was added, its
                    # directory's permissions may have changed, or its target
                    # appeared (made by a batch recovered just now).
                    directory = os.path.dirname(entry.target.path)
                    if directory not in checked:  # (one stat per directory, not per file)
                        directory = _nearest_dir(entry.target.path, entry.given)
                    _check_change(directory, now, entry.given, checked)
                    ops.append(_Op(entry.kind, entry.target.rel, entry.staged, _identity_of(now)))
                data = _encode_journal(start_ns, ops)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                _step("journal-written")
                if self.durable and self._sync_fd >= 0:
                    _platform.syncfs(self._sync_fd)  # R1, everything at once
                elif self.durable:
                    # R1: the staged data, the journal's data, and the entries
                    # of both (txn in hidden, the files in txn), all at once.
                    calls: list[Callable[[], None]] = [
                        functools.partial(_sync_file_by_name, os.path.join(txn, op.staged))
                        for op in ops
                        if op.staged is not None
                    ]
                    calls += [
                        functools.partial(_fsync, fd),
                        functools.partial(_fsync_dir, txn),
                        functools.partial(_fsync_dir, hidden),
                    ]
                    _run_parallel(calls)
                _step("staged-durable")
            finally:
                os.close(fd)
            _replace(pending, os.path.join(txn, _JOURNAL))
            _step("journal-renamed")
            if self.durable:
                _fsync_dir(txn)  # R2: the commit point
            committed = True
            if self._finalizer is not None:
                self._finalizer.detach()  # from here on, only recovery removes txn
            _step("committed")
            dirs = self._apply(txn, ops)
            _step("applied")
            if self.durable and self._sync_fd >= 0:
                _platform.syncfs(self._sync_fd)  # R3
            elif self.durable:
                _run_parallel([functools.partial(_fsync_dir, d) for d in sorted(dirs)])
            _step("synced")
            _remove_txn(txn)
            retired = True
            self._state = "committed"
            _step("retired")
            metrics.counter("htmlgraph_batch_commits_total").inc()
            metrics.histogram("htmlgraph_batch_files").observe(len(ops))
            metrics.histogram("htmlgraph_batch_commit_seconds").observe(
                time.perf_counter() - started
            )
        except BaseException:
            if not committed:
                self.discard()
                raise
            self._state = "committed"
            if retired:  # finished: the journal is already gone
                raise
            # Committed: finish now if we can (the lock is still held).
            try:
                parsed = _decode_journal(_read_file(os.path.join(txn, _JOURNAL)))
                if parsed is not None:
                    _roll_forward(self._root, txn, *parsed)
            except BaseException as exc:  # the original error is raised below
                logger.warning("batch %s committed but not finished (%s); recover() will", txn, exc)
            raise

    def _apply(self, txn: str, ops: list[_Op]) -> set[str]:
        """Rename each staged file into place and delete; return the directories touched."""
        dirs: set[str] = {txn}
        for op in ops:
            target = os.path.join(self._root, *op.rel.split("/"))
            directory = os.path.dirname(target)
            if op.kind == "write":
                if op.staged is None:
                    continue  # every write is staged
                if directory not in dirs:  # not yet known to exist
                    for made in _make_dirs(directory):
                        dirs.add(os.path.dirname(made))
                _replace(os.path.join(txn, op.staged), target)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
            dirs.add(directory)
            _step("apply-op")
        return dirs
