"""A registry of concurrent agent sessions sharing one project directory.

Many instances (processes) of an agent run at once in one repository; each
registers itself under ``.htmlgraph/sessions/registry/`` (the seed's
"Phase 1.4"). Layout and file formats are htmlgraph's own, so its dashboard
and hooks read these files and its tools can share a registry with this
class::

    registry/
        active/{instance_id}.json       one record per live instance
        archive/{instance_id}.json      the latest archived record of an instance
        archive/{instance_id}-{stamp}.json   earlier ones, moved aside, never lost
        .index.json                     {"version": "1.0", "active_sessions": ...}
        .lock/                          DirectoryLocker markers (ours only)

Every file is replaced whole with :class:`~htmlgraph.atomic_ops.AtomicFileWriter`
(durable by default), so a reader never sees a partial record. Every change
(register, heartbeat, archive, reap) runs under the registry's exclusive
:class:`~htmlgraph.atomic_ops.DirectoryLocker` lock and does its
read-modify-write of the index inside it, so concurrent instances lose no
entry. The active records are the source of truth; the index is derived from
them and rewritten whenever it disagrees with them (a crash between two
writes, or a tool that writes without the lock). Records that other tools
wrote in htmlgraph's format are valid input; only a file that is not a JSON
object with a session id is quarantined. ``docs/session-registry.md`` gives
the formats, the concurrency argument and the crash ordering.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, NamedTuple, TypedDict, cast

from htmlgraph import _identity, _platform, metrics
from htmlgraph.atomic_ops import (
    AtomicFileWriter,
    DirectoryLocker,
    atomic_json_write,
    atomic_rename,
    cleanup_orphaned_temp_files,
)

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_MAX_IDLE",
    "FORMAT_VERSION",
    "INDEX_VERSION",
    "IndexEntry",
    "SessionConflictError",
    "SessionRecord",
    "SessionRegistry",
]

logger = logging.getLogger(__name__)

#: Seconds a registry operation waits for the registry lock before raising
#: :class:`~htmlgraph.atomic_ops.LockTimeout`. Critical sections are a few
#: file writes, so this is only reached when a holder is stuck, not when
#: dozens of instances contend.
DEFAULT_LOCK_TIMEOUT = 30.0

#: Default heartbeat age (seconds) after which :meth:`SessionRegistry.reap_stale`
#: archives an instance even if its process may still exist: one day, like
#: ``cleanup_orphaned_temp_files``' default age.
DEFAULT_MAX_IDLE = 24 * 3600.0

#: The ``format`` field this package adds to the records it writes (beside
#: htmlgraph's fields). 1 was this package's earlier format (read and
#: migrated); records without the field are htmlgraph's own.
FORMAT_VERSION = 2

#: The ``version`` of the index, htmlgraph's.
INDEX_VERSION = "1.0"

#: Longest accepted session or instance id, in UTF-8 bytes: an archive name
#: (id + "-" + 22-character stamp + ".json") must stay below the 255-byte
#: file-name limit of ext4, xfs, btrfs, APFS and NTFS.
MAX_ID_BYTES = 200

# Orphaned temp files of crashed writers older than this are removed by
# reap_stale. Only temps whose writer is provably gone are candidates at all.
_ORPHAN_AGE_HOURS = 1.0

_SUFFIX = ".json"
_LOCK_NAME = ".lock"
# How long a process waiting for the registry lets one that changes it again
# at once keep the lock (DirectoryLocker's bounded barging; at most half
# lock_timeout). A registration is often followed at once by a heartbeat or
# an archive from the same process; a hand-off between each, with fsyncs
# inside every hold, made 32 processes churning take 2-4x longer
# (docs/session-registry.md). 1 s still bounds anyone's wait.
_HANDOFF_AFTER = 1.0

# Characters Windows refuses in file names, and its reserved device names
# ("CON.json" still opens the console there): Microsoft Learn, "Naming Files,
# Paths, and Namespaces". Rejected on every OS so a registry can move between
# them.
_WINDOWS_FORBIDDEN = frozenset('<>:"|?*')
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)
# What a host name may not carry into a file name (see _id_problem).
_HOST_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\<>:"|?*]')
_QUARANTINE_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# Host names are at most 253 bytes; ours keeps the id within MAX_ID_BYTES.
_HOST_MAX_BYTES = 150

# Seconds between 1601-01-01 (Windows FILETIME epoch) and 1970-01-01.

ArchiveReason = Literal["archived", "process-gone", "idle", "superseded", "re-registered"]
ProcessState = Literal["alive", "gone", "unknown"]


class SessionRecord(TypedDict, total=False):
    """The content of ``active/{instance_id}.json`` (see the module docs).

    The first seven keys are htmlgraph's format, written by every tool:
    ``instance_id``, ``session_id``, ``created``, ``repo``, ``instance``,
    ``status`` (``"active"``) and ``last_activity``, timestamps as
    ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC. Records this package writes add,
    beside them, ``format`` (:data:`FORMAT_VERSION`), ``hostname``, ``pid``,
    ``process_start`` (``_platform.process_start_token``, None where the OS
    gives none) and ``pid_namespace`` (Linux, else None): the facts that let
    :meth:`SessionRegistry.process_state` prove the writer gone. Archived
    copies add ``archived`` and ``archive_reason``. Records read from disk may
    lack any key but ``session_id`` (another tool wrote them); unknown keys
    are kept.
    """

    instance_id: str
    session_id: str
    created: str
    repo: dict[str, object]
    instance: dict[str, object]
    status: str
    last_activity: str
    format: int
    hostname: str
    pid: int
    process_start: str | None
    pid_namespace: str | None
    archived: str
    archive_reason: str


class IndexEntry(TypedDict):
    """One value of ``.index.json``'s ``active_sessions`` map (keyed by session id)."""

    instance_id: str
    created: str
    last_activity: str


class SessionConflictError(ValueError):
    """A session id is already registered by another instance that may be alive.

    Raised by :meth:`SessionRegistry.register_session` when the session is held
    by an instance whose process is alive, or cannot be judged from here
    (another host or pid namespace, or a record in htmlgraph's own format,
    which carries no pid namespace), so it cannot be proven gone. Nothing was
    changed.

    Attributes:
        session_id: The session asked for.
        instance_id: The instance that holds it.
    """

    def __init__(self, session_id: str, instance_id: str) -> None:
        super().__init__(
            f"session {session_id!r} is already registered by instance {instance_id!r}, "
            "whose process is alive or cannot be judged from here"
        )
        self.session_id = session_id
        self.instance_id = instance_id

    def __reduce__(self) -> tuple[type[SessionConflictError], tuple[str, str]]:
        return (type(self), (self.session_id, self.instance_id))


class _IdTypeError(TypeError, ValueError):
    """An id that is not a str: a TypeError, and the ValueError htmlgraph documents."""


class _CorruptFileError(Exception):
    """Internal: a registry file exists but does not hold what it must."""


# --------------------------------------------------------------------------
# Seams: tests replace these through the module (monkeypatch.setattr(
# session_registry, "_hostname", lambda: "other-host")). Code calls them by name.
# --------------------------------------------------------------------------
def _hostname() -> str:
    return _platform.hostname()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _random_token() -> str:
    return secrets.token_hex(8)


def _remove(path: Path) -> None:
    # _platform.unlink retries briefly on Windows, where a lock-free reader
    # holding the record open for a moment makes the delete fail.
    _platform.unlink(str(path))


def _count(operation: str) -> None:
    metrics.counter("htmlgraph_registry_operations_total", operation=operation).inc()


def _own_start_token(pid: int) -> str | None:
    return _platform.process_start_token(pid)


# --------------------------------------------------------------------------
# Instance ids: inst-{pid}-{hostname}-{start}
# --------------------------------------------------------------------------
# When this module was imported: the stand-in for the process start time
# where the OS does not tell it (macOS).
_IMPORT_SECONDS = int(time.time())

# (pid, hostname, instance id) of the last computation; recomputed when the
# pid changes (a forked child) or the host name seam answers differently.
_instance_cache: tuple[int, str, str] | None = None


def _process_start_seconds(pid: int) -> int | None:
    """Return when process ``pid`` started, in whole seconds since the epoch, or None."""
    token = _own_start_token(pid)
    return None if token is None else _platform.start_token_seconds(token)


def _host_part(host: str) -> str:
    """Return ``host`` as it goes into an instance id: as is unless unsafe in a file name.

    An unsafe host name (a path separator, a control or Windows-forbidden
    character, or too long) has those characters replaced by ``_`` and 8 hex
    digits of its SHA-256 appended, so two hosts whose cleaned names
    coincide still get different ids.
    """
    cleaned = _HOST_UNSAFE.sub("_", host)
    encoded = cleaned.encode("utf-8", "replace")
    if cleaned == host and 0 < len(encoded) <= _HOST_MAX_BYTES and host.isprintable():
        return host
    head = encoded[:_HOST_MAX_BYTES].decode("utf-8", "ignore")
    head = "".join(ch if ch.isprintable() else "_" for ch in head) or "host"
    digest = hashlib.sha256(host.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{head}~{digest}"


def _current_instance_id() -> str:
    global _instance_cache
    pid = os.getpid()
    host = _hostname()
    cached = _instance_cache
    if cached is not None and cached[0] == pid and cached[1] == host:
        return cached[2]
    start = _process_start_seconds(pid)
    if start is None:
        start = _IMPORT_SECONDS
    instance_id = f"inst-{pid}-{_host_part(host)}-{start}"
    _instance_cache = (pid, host, instance_id)
    return instance_id


# --------------------------------------------------------------------------
# Ids, info, timestamps
# --------------------------------------------------------------------------
def _short_repr(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _id_problem(value: str) -> str | None:
    """Say why ``value`` cannot be a session or instance id, or None if it can."""
    if not value:
        return "it is empty"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid Unicode (lone surrogate)"
    if size > MAX_ID_BYTES:
        return f"it is {size} bytes long (limit {MAX_ID_BYTES})"
    if "\0" in value:
        return "it contains a NUL character"
    if "/" in value or "\\" in value:
        return "it contains a path separator"
    if value.startswith("."):
        return "it starts with '.' (hidden file, '.' or '..')"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return "it contains a control character"
    if any(ch in _WINDOWS_FORBIDDEN for ch in value):
        return 'it contains one of <>:"|?* (not allowed in Windows file names)'
    if value[-1] in " .":
        return "it ends with a space or '.' (Windows drops them)"
    if value.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        return "it is a reserved device name on Windows"
    return None


def _check_id(kind: str, value: object) -> str:
    if not isinstance(value, str):
        raise _IdTypeError(f"invalid {kind} {value!r}: must be a str, not {type(value).__name__}")
    problem = _id_problem(value)
    if problem is not None:
        raise ValueError(f"unsafe {kind} {_short_repr(value)}: {problem}")
    return value


def _check_info(name: str, value: object) -> dict[str, object] | None:
    """Return ``value`` as it will read back from JSON, or raise before any disk access."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping or None, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, not {type(key).__name__}: {key!r}")
    try:
        text = json.dumps(dict(value), ensure_ascii=False, allow_nan=False)
    except TypeError as exc:
        raise TypeError(f"{name} is not JSON-serialisable: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{name} is not JSON-serialisable: {exc}") from exc
    return cast("dict[str, object]", json.loads(text))


def _timestamp(moment: datetime) -> str:
    """Format ``moment`` as htmlgraph does: ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: object) -> datetime | None:
    """Parse a timestamp any writer of this registry used; None if it is not one.

    Accepts htmlgraph's ``...Z`` (with or without fractions), this package's
    earlier ``+00:00`` form, and a naive time, read as UTC (no writer of the
    registry used local time).
    """
    if not isinstance(value, str) or not value.isascii():
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------
# Reading files: foreign ground (no-follow, non-blocking, regular files only)
# --------------------------------------------------------------------------


def _read_file(path: Path) -> tuple[bytes, float] | None:
    """Return the bytes and mtime of regular file ``path``, None if it does not exist.

    Opens no-follow and non-blocking, so a symlink or a FIFO someone put in
    the registry neither redirects nor blocks the read.

    Raises:
        _CorruptFileError: ``path`` is a symlink, a directory or not a regular file.
        OSError: Any other failure to read it.
    """
    try:
        fd = os.open(path, _platform.O_READ | _platform.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _CorruptFileError("it is a symbolic link") from exc
        # A socket (ENXIO) or device cannot even be opened: look, don't read.
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISDIR(mode):
            raise _CorruptFileError("it is a directory") from exc
        if not stat.S_ISREG(mode):
            raise _CorruptFileError("it is not a regular file") from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise _CorruptFileError(f"it is {kind}")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks), info.st_mtime


def _load_json(path: Path) -> tuple[object, float] | None:
    """Return the parsed content and mtime of ``path``, None if it does not exist.

    Raises:
        _CorruptFileError: The file exists but is not a UTF-8 JSON document.
    """
    found = _read_file(path)
    if found is None:
        return None
    raw, mtime = found
    if not raw:
        raise _CorruptFileError("it is empty")
    try:
        return cast(object, json.loads(raw.decode("utf-8"))), mtime
    except UnicodeDecodeError as exc:
        raise _CorruptFileError(f"it is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:
        raise _CorruptFileError(f"it is not JSON ({exc})") from exc


# --------------------------------------------------------------------------
# Records and the index
# --------------------------------------------------------------------------
def _is_earlier_format(data: Mapping[str, object]) -> bool:
    """Whether ``data`` is a record in this package's earlier format (``"format": 1``)."""
    return data.get("format") == 1 and not isinstance(data.get("format"), bool)


def _upgrade(data: dict[str, object]) -> dict[str, object]:
    """Return a record of the earlier format in today's (htmlgraph's fields first)."""
    record: dict[str, object] = {}
    for key in ("instance_id", "session_id", "created", "repo", "instance"):
        if key in data:
            record[key] = data[key]
    for key in ("created", "last_activity"):
        moment = _parse_time(data.get(key))
        if moment is not None:
            data = {**data, key: _timestamp(moment)}
    record["created"] = data.get("created")
    if not isinstance(record.get("repo"), dict):
        record["repo"] = {}
    if not isinstance(record.get("instance"), dict):
        record["instance"] = {"pid": data.get("pid"), "hostname": data.get("hostname")}
    record["status"] = "active"
    record["last_activity"] = data.get("last_activity")
    record.update({k: v for k, v in data.items() if k not in record})
    record["format"] = FORMAT_VERSION
    return record


def _parse_record(data: object, instance_id: str, mtime: float) -> SessionRecord:
    """Return ``data`` as a record, or raise _CorruptFileError if it cannot be one.

    Only what no reader could use is rejected: not a JSON object, or no
    non-empty string ``session_id``. Everything else (htmlgraph's own records,
    unknown fields, odd values) is kept; a missing ``instance_id`` is taken
    from the file name and missing timestamps from the file's mtime.
    """
    if not isinstance(data, dict):
        raise _CorruptFileError(f"it holds a JSON {type(data).__name__}, not an object")
    session_id = data.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        raise _CorruptFileError("it has no session_id")
    record = _upgrade(data) if _is_earlier_format(data) else dict(data)
    if not isinstance(record.get("instance_id"), str):
        record["instance_id"] = instance_id
    for key in ("created", "last_activity"):
        if not isinstance(record.get(key), str):
            record[key] = _timestamp(datetime.fromtimestamp(mtime, timezone.utc))
    return cast(SessionRecord, record)


def _parse_index(data: object) -> tuple[dict[str, IndexEntry], bool]:
    """Return the index's entries and whether it is in today's (htmlgraph's) format.

    Reads htmlgraph's ``{"version", "active_sessions"}`` and this package's
    earlier ``{"format": 1, "sessions"}``.

    Raises:
        _CorruptFileError: ``data`` is neither.
    """
    if not isinstance(data, dict):
        raise _CorruptFileError(f"it holds a JSON {type(data).__name__}, not an object")
    if "active_sessions" in data:
        sessions, current = data["active_sessions"], True
    elif data.get("format") == 1 and "sessions" in data:
        sessions, current = data["sessions"], False
    else:
        raise _CorruptFileError("it has no active_sessions")
    if not isinstance(sessions, dict):
        raise _CorruptFileError("active_sessions is not an object")
    entries: dict[str, IndexEntry] = {}
    for session_id, entry in sessions.items():
        if not isinstance(entry, dict):
            raise _CorruptFileError(f"entry of session {session_id!r} is not an object")
        values = [entry.get(key) for key in ("instance_id", "created", "last_activity")]
        if not all(isinstance(value, str) for value in values):
            raise _CorruptFileError(f"entry of session {session_id!r} lacks a field")
        instance_id, created, last = cast("list[str]", values)
        entries[session_id] = IndexEntry(
            instance_id=instance_id, created=created, last_activity=last
        )
    return entries, current


def _heartbeat_key(record: SessionRecord) -> tuple[datetime, str]:
    moment = _parse_time(record.get("last_activity")) or datetime.min.replace(tzinfo=timezone.utc)
    return (moment, record["instance_id"])


def _derive_index(
    records: Mapping[str, SessionRecord], previous: Mapping[str, IndexEntry] | None
) -> dict[str, IndexEntry]:
    """Derive the index from the active records (keyed by file name).

    One entry per session id that has an active record. When several records
    claim a session (htmlgraph's tools do not prevent it), the one the
    previous index named stays, else the one with the latest heartbeat.
    """
    claims: dict[str, list[tuple[str, SessionRecord]]] = {}
    for name, record in records.items():
        claims.setdefault(record["session_id"], []).append((name, record))
    entries: dict[str, IndexEntry] = {}
    for session_id in sorted(claims):
        candidates = claims[session_id]
        named = None if previous is None else previous.get(session_id)
        chosen = next((c for c in candidates if named and c[0] == named["instance_id"]), None)
        if chosen is None:
            chosen = max(candidates, key=lambda c: _heartbeat_key(c[1]))
        name, record = chosen
        entries[session_id] = IndexEntry(
            instance_id=name, created=record["created"], last_activity=record["last_activity"]
        )
    return entries


def _membership(entries: Mapping[str, IndexEntry]) -> dict[str, str]:
    return {session_id: entry["instance_id"] for session_id, entry in entries.items()}


def _record_text(data: Mapping[str, object]) -> str:
    return json.dumps(dict(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


class _State(NamedTuple):
    """What a locked change starts from: the index and the readable active records."""

    entries: dict[str, IndexEntry]
    records: dict[str, SessionRecord]


class SessionRegistry:
    """The session registry of one project directory (see the module docs).

    Safe across threads and processes: every change takes the registry's
    exclusive marker-file lock (:class:`~htmlgraph.atomic_ops.DirectoryLocker`
    in ``registry/.lock/``; threads sharing one object take turns) and every
    file is replaced atomically, so N instances registering, heartbeating and
    archiving at once lose no entry and no reader ever sees a partial file.
    Writes are durable (fsynced) unless ``durable=False``. The lock is
    advisory: htmlgraph's own tools write without it, and the registry stays
    readable and loses nothing when they do (the index is re-derived), but
    only users of this class are excluded from each other.

    Args:
        registry_dir: The registry directory; by default
            ``.htmlgraph/sessions/registry`` under the current directory (made
            absolute now, so a later ``chdir`` does not move it).
        lock_timeout: Seconds each operation waits for the registry lock
            before raising :class:`~htmlgraph.atomic_ops.LockTimeout`.
        durable: fsync every write (the default). ``False`` keeps atomicity
            against process crashes only, not against a power cut.
        create: Create ``registry_dir``, ``active/`` and ``archive/`` now
            (the default, as htmlgraph does). ``False`` creates nothing until
            the first change, and reading a registry that does not exist
            returns empty results (what ``htmlgraph sessions list`` uses).

    Raises:
        OSError: ``create`` is true and the directories cannot be created.
        TypeError: ``registry_dir`` or ``lock_timeout`` has the wrong type.
        ValueError: ``lock_timeout`` is negative or NaN.
    """

    #: Where the registry lives under the current directory by default.
    DEFAULT_REGISTRY_SUBPATH = ".htmlgraph/sessions/registry"
    #: The index file's name in ``registry_dir``.
    INDEX_FILE = ".index.json"
    #: The directory of active records.
    ACTIVE_DIR = "active"
    #: The directory of archived records.
    ARCHIVE_DIR = "archive"

    def __init__(
        self,
        registry_dir: str | os.PathLike[str] | None = None,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        durable: bool = True,
        create: bool = True,
    ) -> None:
        if registry_dir is None:
            directory = Path.cwd() / self.DEFAULT_REGISTRY_SUBPATH
        elif isinstance(registry_dir, (str, os.PathLike)):
            directory = Path(os.fspath(registry_dir)).absolute()
        else:
            kind = type(registry_dir).__name__
            raise TypeError(f"registry_dir must be a str, os.PathLike or None, not {kind}")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)):
            raise TypeError(f"lock_timeout must be a number, not {lock_timeout!r}")
        if not lock_timeout >= 0:
            raise ValueError(f"lock_timeout must be >= 0, not {lock_timeout!r}")
        self.registry_dir = directory
        self.active_dir = directory / self.ACTIVE_DIR
        self.archive_dir = directory / self.ARCHIVE_DIR
        self.index_file = directory / self.INDEX_FILE
        self.lock_dir = directory / _LOCK_NAME
        self.lock_timeout = float(lock_timeout)
        self.durable = durable
        self._lock: DirectoryLocker | None = None
        self._locker_guard = threading.Lock()
        if create:
            self._make_dirs()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.registry_dir)!r})"

    def __getstate__(self) -> dict[str, object]:
        # Picklable (to hand to a worker process): the locker stays behind,
        # each process makes its own.
        state = dict(self.__dict__)
        state["_lock"] = None
        del state["_locker_guard"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._locker_guard = threading.Lock()

    # ------------------------------------------------------------------
    # htmlgraph's helpers
    # ------------------------------------------------------------------
    @staticmethod
    def _get_utc_timestamp() -> str:
        """Return the time now as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC, microseconds)."""
        return _timestamp(_utcnow())

    @staticmethod
    def _write_atomic(path: str | os.PathLike[str], data: Mapping[str, object]) -> None:
        """Replace ``path`` with ``data`` as JSON (indent 2), atomically and durably.

        A reader sees the old file or the new one, the new one survives a
        power cut once this returns, and no temp file is left either way
        (:func:`~htmlgraph.atomic_ops.atomic_json_write`). Takes no lock.
        """
        atomic_json_write(path, dict(data), indent=2)

    @staticmethod
    def _read_json(path: str | os.PathLike[str]) -> dict[str, object] | None:
        """Return the JSON object in ``path``; None if it is missing or not a JSON object.

        Reads without following a symlink or blocking on a FIFO.

        Raises:
            OSError: The file exists but cannot be read (other than missing).
        """
        try:
            found = _load_json(Path(os.fspath(path)))
        except _CorruptFileError:
            return None
        if found is None or not isinstance(found[0], dict):
            return None
        return cast("dict[str, object]", found[0])

    # ------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------
    def get_instance_id(self) -> str:
        """Return the id of the calling process: ``inst-{pid}-{hostname}-{start}``.

        ``hostname`` is ``socket.gethostname()`` as is (made safe only if it
        holds characters a file name cannot, see ``docs/session-registry.md``)
        and ``start`` the process start time in whole seconds since the epoch
        (from the OS: Linux ``/proc``, Windows creation time; on macOS the
        time this module was imported). Stable for the life of the process,
        recomputed in a forked child, and different for a later process that
        reuses the pid (unless it started in the same second: then the start
        token in the record tells them apart). Touches no disk; thread-safe.
        """
        return _current_instance_id()

    def get_session_file_path(self, instance_id: str) -> Path:
        """Return ``active/{instance_id}.json`` (no check that it exists).

        Raises:
            ValueError: ``instance_id`` is not a str or is unsafe as a file name.
        """
        return self._active_path(_check_id("instance id", instance_id))

    def register_session(
        self,
        session_id: str,
        repo_info: Mapping[str, object] | None = None,
        instance_info: Mapping[str, object] | None = None,
    ) -> Path:
        """Register the calling process as the instance running ``session_id``.

        Writes ``active/{instance_id}.json`` atomically and durably, then the
        index, both under the registry's exclusive lock: safe across threads
        and processes, and no concurrent registration is lost. Registering
        again with the same session refreshes the record (``created`` kept,
        ``repo``/``instance`` replaced); registering with a different session
        first archives this instance's previous record (reason
        ``re-registered``). A session held by another instance whose process
        is provably gone (same host and pid namespace, pid dead or reused) is
        taken over and the old record archived (reason ``superseded``).

        Args:
            session_id: The session this instance works on (a safe name).
            repo_info: JSON-serialisable facts about the repository (path,
                remote, branch, commit), stored as ``repo`` (``{}`` if None).
            instance_info: JSON-serialisable facts about the instance, stored
                as ``instance``; if None, this process's ``pid``,
                ``hostname`` and ``start_time``.

        Returns:
            The path of the record written, ``active/{instance_id}.json``.

        Raises:
            ValueError: ``session_id`` is empty, not a str (also a
                ``TypeError``) or unsafe, or the info holds NaN/infinity or a
                cycle (checked before any disk access).
            TypeError: The info is not a mapping or not serialisable.
            SessionConflictError: Another, possibly live, instance holds the
                session.
            LockTimeout: The registry lock was not acquired in time.
        """
        _count("register")
        _check_id("session id", session_id)
        repo_data = _check_info("repo_info", repo_info)
        instance_data = _check_info("instance_info", instance_info)
        instance_id = self.get_instance_id()
        pid = os.getpid()
        host = _hostname()
        token = _own_start_token(pid)
        namespace = _platform.pid_namespace()
        if instance_data is None:
            start = _process_start_seconds(pid)
            moment = datetime.fromtimestamp(_IMPORT_SECONDS if start is None else start)
            instance_data = {"pid": pid, "hostname": host, "start_time": _timestamp(moment)}
        with self._exclusive():
            state = self._scan_locked()
            now = _utcnow()
            entry = state.entries.get(session_id)
            holders = sorted(
                (name != (entry and entry["instance_id"]), name)
                for name, record in state.records.items()
                if record["session_id"] == session_id and name != instance_id
            )
            for _, name in holders:
                if self.process_state(state.records[name]) != "gone":
                    raise SessionConflictError(session_id, name)
            for _, name in holders:
                self._archive_locked(state, name, "superseded", now)
            created = _timestamp(now)
            existing = state.records.get(instance_id)
            if existing is not None:
                same_process = (
                    existing.get("format") == FORMAT_VERSION
                    and existing.get("pid") == pid
                    and existing.get("hostname") == host
                    and existing.get("process_start") == token
                    and existing.get("pid_namespace") == namespace
                )
                if not same_process:
                    # An earlier process under the same id (a pid reused in
                    # the same second) or another tool's record: keep it.
                    self._archive_locked(state, instance_id, "superseded", now)
                elif existing["session_id"] == session_id:
                    created = existing["created"]
                else:
                    # Finish the archive, index included, before the new
                    # record appears: a crash in between then leaves an
                    # instance with no record, never a record whose index
                    # entry names its old session.
                    self._archive_locked(state, instance_id, "re-registered", now)
                    self._write_index(state)
            record = SessionRecord(
                instance_id=instance_id,
                session_id=session_id,
                created=created,
                repo=repo_data if repo_data is not None else {},
                instance=instance_data,
                status="active",
                last_activity=_timestamp(now),
                format=FORMAT_VERSION,
                hostname=host,
                pid=pid,
                process_start=token,
                pid_namespace=namespace,
            )
            path = self._write_record(instance_id, record)
            state.records[instance_id] = record
            self._write_index(state)
        logger.debug("registered instance %s for session %s", instance_id, session_id)
        return path

    def read_session(self, instance_id: str) -> SessionRecord | None:
        """Return the active record of ``instance_id``, or None if it has none.

        Reads one atomically replaced file without taking the lock, so it
        never blocks and never sees a partial record; a record archived
        concurrently reads as None. A record that is not a JSON object with a
        session id is reported with a WARNING and read as None (the next
        change moves it into ``archive/`` as ``.corrupt``). A record in this
        package's earlier format reads in today's.

        Raises:
            ValueError: ``instance_id`` is not a str or is unsafe as a file name.
        """
        _count("read")
        _check_id("instance id", instance_id)
        return self._read_record_unlocked(instance_id)

    def get_current_sessions(self) -> list[SessionRecord]:
        """Return every readable record in ``active/``, oldest ``created`` first.

        Every tool's records are listed, htmlgraph's own included. Lock-free:
        lists ``active/`` and reads each atomically replaced file, so it never
        blocks behind writers, never sees a partial record and skips records
        archived while it runs. Unreadable records are skipped with a WARNING.
        Each record is read whole, but the list is not one snapshot
        (:meth:`get_index` gives one consistent state). Returns ``[]`` when
        ``active/`` does not exist.
        """
        _count("list")
        records = []
        for instance_id in sorted(self._active_names()):
            record = self._read_record_unlocked(instance_id)
            if record is not None:
                records.append(record)
        epoch = datetime.min.replace(tzinfo=timezone.utc)
        records.sort(
            key=lambda r: (_parse_time(r.get("created")) or epoch, r.get("instance_id", ""))
        )
        return records

    def get_index(self) -> dict[str, IndexEntry]:
        """Return the index: session id -> instance id, created, last activity.

        Read under the registry's shared lock, so it is one consistent state
        (no change is half-applied while it is held), and checked against the
        active records read under the same lock. If the index is missing,
        corrupt, in the earlier format or disagrees with the records (a crash,
        or a tool that writes without the lock), it is re-derived from them
        and rewritten under the exclusive lock. Costs one read per active
        record. Returns ``{}`` when the registry does not exist.

        Raises:
            LockTimeout: The registry lock was not acquired in time.
        """
        _count("index")
        return self._consistent_state().entries

    def find_session(self, session_id: str) -> SessionRecord | None:
        """Return the active record of the instance running ``session_id``, or None.

        The index and the record are read in one consistent state, as
        :meth:`get_index` does.

        Raises:
            ValueError: ``session_id`` is not a str or is unsafe.
            LockTimeout: The registry lock was not acquired in time.
        """
        _count("find")
        _check_id("session id", session_id)
        state = self._consistent_state()
        entry = state.entries.get(session_id)
        return None if entry is None else state.records[entry["instance_id"]]

    def update_activity(self, instance_id: str) -> bool:
        """Record a heartbeat: set ``last_activity`` of ``instance_id`` to now.

        Rewrites the record atomically and durably (in today's format, every
        other field kept), then the index entry, under the exclusive lock, so
        a heartbeat can never resurrect a record that a concurrent archive
        removed. Works on any tool's record. Safe across threads and processes.

        Returns:
            True if the instance was active and is updated; False if it has no
            active record (never registered, archived or reaped).

        Raises:
            ValueError: ``instance_id`` is not a str or is unsafe as a file name.
            LockTimeout: The registry lock was not acquired in time.
        """
        with self._active_record("update_activity", instance_id) as found:
            if found is None:
                return False
            state, record = found
            updated = cast(SessionRecord, dict(record))
            updated["last_activity"] = _timestamp(_utcnow())
            self._write_record(instance_id, updated)
            before = _membership(state.entries)
            state.records[instance_id] = updated
            # A heartbeat that only moves a timestamp the record already holds
            # durably skips the index's fsyncs: a power cut can lose it (the
            # index lags by one beat) or tear it (the next change rebuilds it).
            self._write_index(state, timestamps_only=before == _membership(state.entries))
        return True

    def archive_session(self, instance_id: str) -> bool:
        """Move the active record of ``instance_id`` to ``archive/{instance_id}.json``.

        Under the exclusive lock: writes the archive copy (create-only,
        atomic, durable) with ``archived`` and ``archive_reason: "archived"``
        added, then removes the active record, then updates the index. An
        earlier archive of the same instance is first moved aside to
        ``archive/{instance_id}-{stamp}.json``, never overwritten. A crash
        between the steps leaves a state the next change repairs (see
        ``docs/session-registry.md``). Safe across threads and processes.

        Returns:
            True if a record was archived; False if there was none.

        Raises:
            ValueError: ``instance_id`` is not a str or is unsafe as a file name.
            LockTimeout: The registry lock was not acquired in time.
        """
        with self._active_record("archive", instance_id) as found:
            if found is None:
                return False
            state = found[0]
            self._archive_locked(state, instance_id, "archived", _utcnow())
            self._write_index(state)
        logger.debug("archived instance %s", instance_id)
        return True

    def reap_stale(self, max_idle: float | None = DEFAULT_MAX_IDLE) -> list[str]:
        """Archive instances that are gone or idle; return their ids, sorted.

        An instance is reaped (under the exclusive lock, each record archived
        as :meth:`archive_session` does) when :meth:`process_state` proves its
        process gone - reason ``process-gone`` - or when its last heartbeat
        is older than ``max_idle`` seconds - reason ``idle``. Records of other
        hosts or pid namespaces, records with an unusable pid, and records in
        htmlgraph's own format (no pid namespace) are reaped by heartbeat age
        only. Also removes orphaned temp files that crashed writers left in
        the registry. Safe across threads and processes.

        Args:
            max_idle: Heartbeat age in seconds beyond which an instance is
                reaped; None reaps only instances whose process is gone.

        Returns:
            The archived instance ids.

        Raises:
            ValueError: ``max_idle`` is negative or NaN.
            TypeError: ``max_idle`` is not a number or None.
            LockTimeout: The registry lock was not acquired in time.
        """
        _count("reap")
        if max_idle is not None:
            if isinstance(max_idle, bool) or not isinstance(max_idle, (int, float)):
                raise TypeError(f"max_idle must be a number of seconds or None, not {max_idle!r}")
            if not max_idle >= 0:
                raise ValueError(f"max_idle must be >= 0 seconds, not {max_idle!r}")
        if not self._exists():
            return []
        reaped: list[str] = []
        with self._exclusive():
            state = self._scan_locked()
            now = _utcnow()
            for name, record in sorted(state.records.items()):
                reason: ArchiveReason | None = None
                if self.process_state(record) == "gone":
                    reason = "process-gone"
                elif max_idle is not None:
                    last = _parse_time(record["last_activity"])
                    if last is not None and (now - last).total_seconds() > max_idle:
                        reason = "idle"
                if reason is None:
                    continue
                self._archive_locked(state, name, reason, now)
                reaped.append(name)
                logger.info("reaped instance %s (%s)", name, reason)
            if reaped:
                self._write_index(state)
        for directory in (self.active_dir, self.archive_dir, self.registry_dir):
            if directory.is_dir():
                cleanup_orphaned_temp_files(directory, age_hours=_ORPHAN_AGE_HOURS)
        return reaped

    def process_state(self, record: Mapping[str, object]) -> ProcessState:
        """Say whether the process that wrote ``record`` still runs.

        Decided by ``_identity.owner_state`` (the one rule the lock and the
        temp cleanup also use): ``"gone"`` only on proof - this host, this
        pid namespace, and the pid does not exist, is a zombie, or now
        belongs to a process with another start token. Our records carry
        ``hostname``, ``pid``, ``process_start`` and ``pid_namespace``.
        htmlgraph's own records carry only ``instance.pid`` and
        ``instance.hostname``, no namespace: on Linux they are always
        ``"unknown"`` (a pid from an unknown namespace is never judged) and
        are reaped by idle time alone. A pid that is not one (out of range, a
        bool, a string of non-ASCII digits) is ``"unknown"`` too, never proof
        of death. Read-only, no lock; the answer may be out of date by the
        time it is used.
        """
        fmt = record.get("format")
        if _is_int(fmt) and cast(int, fmt) >= 1:
            pid_value, host = record.get("pid"), record.get("hostname")
            namespace, start = record.get("pid_namespace"), record.get("process_start")
        else:
            instance = record.get("instance")
            if not isinstance(instance, dict):
                return "unknown"
            pid_value, host = instance.get("pid"), instance.get("hostname")
            namespace = start = None
        pid = _identity.parse_pid(pid_value)
        if (
            pid is None
            or not isinstance(host, str)
            or not isinstance(namespace, (str, type(None)))
            or not isinstance(start, (str, type(None)))
        ):
            return "unknown"
        return _identity.owner_state(pid, host, namespace, start)

    # ------------------------------------------------------------------
    # Internals. "_locked" methods run with the exclusive lock held.
    # ------------------------------------------------------------------
    def _exists(self) -> bool:
        return self.active_dir.is_dir() or self.index_file.exists()

    def _active_path(self, instance_id: str) -> Path:
        return self.active_dir / f"{instance_id}{_SUFFIX}"

    def _locker(self) -> DirectoryLocker:
        # One locker for the life of this registry object, made on first use
        # (its constructor creates the lock directory). Threads sharing the
        # object take turns on it, and a long-lived locker also sweeps the
        # pending files that killed claimants leave.
        with self._locker_guard:
            if self._lock is None:
                self._make_dirs()
                self._lock = DirectoryLocker(self.lock_dir, handoff_after=_HANDOFF_AFTER)
            return self._lock

    def _make_dirs(self) -> None:
        """Create the registry directory (and parents), ``active/`` and ``archive/``, durably.

        Each directory made is followed by an fsync of its parent (with
        ``durable``), so a power cut cannot take the registry, durably written
        records included, with it.
        """
        missing = []
        directory = self.registry_dir
        while not directory.is_dir():
            missing.append(directory)
            if directory.parent == directory:
                break
            directory = directory.parent
        missing.reverse()
        missing.extend(d for d in (self.active_dir, self.archive_dir) if not d.is_dir())
        for directory in missing:
            try:
                directory.mkdir()
            except FileExistsError:
                if not directory.is_dir():
                    raise
                continue  # made concurrently; its maker syncs it
            if self.durable:
                _platform.fsync_dir(str(directory.parent))

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._locker().exclusive(timeout=self.lock_timeout):
            yield

    @contextmanager
    def _shared(self) -> Iterator[None]:
        with self._locker().shared(timeout=self.lock_timeout):
            yield

    def _active_names(self) -> set[str]:
        """Instance ids of the ``*.json`` files in ``active/`` (temps and dot files skipped)."""
        try:
            names = os.listdir(self.active_dir)
        except (FileNotFoundError, NotADirectoryError):
            return set()
        return {
            name[: -len(_SUFFIX)]
            for name in names
            if name.endswith(_SUFFIX) and not name.startswith(".") and len(name) > len(_SUFFIX)
        }

    def _read_record_unlocked(self, instance_id: str) -> SessionRecord | None:
        path = self._active_path(instance_id)
        try:
            found = _load_json(path)
            return None if found is None else _parse_record(found[0], instance_id, found[1])
        except _CorruptFileError as exc:
            if not os.path.lexists(path):
                return None  # archived between the read and the check
            logger.warning("skipping unreadable session record %s: %s", path, exc)
            return None

    def _read_record_locked(self, instance_id: str) -> SessionRecord | None:
        """Read a record under the exclusive lock; quarantine it if unreadable.

        A record in the earlier format is rewritten in today's (the migration).
        """
        path = self._active_path(instance_id)
        try:
            found = _load_json(path)
            if found is None:
                return None
            record = _parse_record(found[0], instance_id, found[1])
        except _CorruptFileError as exc:
            self._quarantine_locked(path, str(exc))
            return None
        if isinstance(found[0], dict) and _is_earlier_format(found[0]):
            logger.info("migrating session record %s to format %d", path, FORMAT_VERSION)
            self._write_record(instance_id, record)
        return record

    def _quarantine_locked(self, path: Path, problem: str) -> None:
        stem = _QUARANTINE_UNSAFE.sub("_", path.name[: -len(_SUFFIX)])[:100] or "record"
        target = self.archive_dir / f"{stem}-{_stamp(_utcnow())}-{_random_token()}.corrupt"
        logger.warning("moved unreadable session record %s to %s: %s", path, target, problem)
        atomic_rename(path, target, durable=self.durable)

    def _write_record(self, instance_id: str, record: Mapping[str, object]) -> Path:
        path = self._active_path(instance_id)
        with AtomicFileWriter(path, durable=self.durable) as f:
            f.write(_record_text(record))
        return path

    def _write_index(self, state: _State, *, timestamps_only: bool = False) -> None:
        """Derive the index from ``state.records`` into ``state.entries`` and write it."""
        state.entries.clear()
        state.entries.update(_derive_index(state.records, dict(state.entries)))
        self._put_index(state.entries, durable=self.durable and not timestamps_only)

    def _put_index(self, entries: Mapping[str, IndexEntry], *, durable: bool) -> None:
        sessions = {session_id: dict(entries[session_id]) for session_id in sorted(entries)}
        atomic_json_write(
            self.index_file,
            {
                "version": INDEX_VERSION,
                "updated_at": _timestamp(_utcnow()),
                "active_sessions": sessions,
            },
            durable=durable,
        )

    def _stored_index(self) -> tuple[dict[str, IndexEntry] | None, str | None]:
        """Return the index on disk (None if missing or unusable) and what is wrong with it."""
        try:
            found = _load_json(self.index_file)
            if found is None:
                return None, "it is missing"
            entries, current = _parse_index(found[0])
        except _CorruptFileError as exc:
            return None, f"it is corrupt ({exc})"
        return entries, None if current else "it is in the earlier format"

    @contextmanager
    def _active_record(
        self, operation: str, instance_id: str
    ) -> Iterator[tuple[_State, SessionRecord] | None]:
        """Count ``operation``, check the id, and hold the exclusive lock over its record.

        Yields the registry's state and the active record of ``instance_id``,
        or None when there is no registry (then nothing is locked) or no such record.
        """
        _count(operation)
        _check_id("instance id", instance_id)
        if not self._exists():
            yield None
            return
        with self._exclusive():
            state = self._scan_locked()
            record = state.records.get(instance_id)
            yield None if record is None else (state, record)

    def _scan_locked(self) -> _State:
        """Read every active record (quarantining the unreadable) and bring the index in line.

        Runs at the start of every change. The index is rewritten if it is
        missing (with records present), corrupt, in the earlier format, or
        disagrees with the records. A WARNING says why when it was corrupt,
        missing while records exist, or named other instances or sessions than
        the records (a crash between two writes, or a tool writing without the
        lock); timestamps that lag (an interrupted heartbeat, or htmlgraph's
        own heartbeat, which resets ``created``) are corrected silently.
        """
        records: dict[str, SessionRecord] = {}
        for name in sorted(self._active_names()):
            record = self._read_record_locked(name)
            if record is not None:
                records[name] = record
        stored, problem = self._stored_index()
        entries = _derive_index(records, stored)
        if problem is None and stored is not None and stored == entries:
            return _State(entries, records)
        if stored is None and not records and problem == "it is missing":
            return _State(entries, records)
        if stored is None and problem is not None and (records or "corrupt" in problem):
            logger.warning(
                "rebuilt session index %s from %d active record(s): %s",
                self.index_file,
                len(records),
                problem,
            )
        elif stored is not None and _membership(stored) != _membership(entries):
            logger.warning(
                "rewrote session index %s: it was out of step with the records in active/",
                self.index_file,
            )
        self._put_index(entries, durable=self.durable)
        return _State(entries, records)

    def _consistent_state(self) -> _State:
        """The index and records in one consistent state (shared lock; exclusive to repair)."""
        if not self._exists():
            return _State({}, {})
        with self._shared():
            records: dict[str, SessionRecord] = {}
            for name in sorted(self._active_names()):
                record = self._read_record_unlocked(name)
                if record is None and os.path.lexists(self._active_path(name)):
                    records = {}
                    break  # unreadable: quarantine it under the exclusive lock
                if record is not None:
                    records[name] = record
            else:
                stored, problem = self._stored_index()
                if problem is None and stored is not None:
                    if stored == _derive_index(records, stored):
                        return _State(stored, records)
                elif stored is None and not records and problem == "it is missing":
                    return _State({}, {})
        with self._exclusive():
            return self._scan_locked()

    def _archive_locked(
        self, state: _State, name: str, reason: ArchiveReason, now: datetime
    ) -> Path:
        """Copy the record of instance ``name`` to ``archive/{name}.json``, then remove it.

        The archive copy is written create-only and durably *before* the
        active file goes, so a crash in between leaves the record active (and
        archived once more next time), never lost. An existing
        ``archive/{id}.json`` is first copied aside (see :meth:`_move_aside_locked`).
        Drops the record from ``state.records``; the caller writes the index.
        """
        data: dict[str, object] = dict(state.records[name])
        data["archived"] = _timestamp(now)
        data["archive_reason"] = reason
        text = _record_text(data)
        target = self.archive_dir / f"{name}{_SUFFIX}"
        for _ in range(100):
            try:
                with AtomicFileWriter(target, durable=self.durable, overwrite=False) as f:
                    f.write(text)
            except FileExistsError:
                self._move_aside_locked(target, name)
                continue
            break
        else:  # pragma: no cover - only a writer racing us without the lock
            raise FileExistsError(errno.EEXIST, "archive name keeps reappearing", str(target))
        active = self._active_path(name)
        try:
            _remove(active)
        except FileNotFoundError:
            pass
        else:
            if self.durable:
                _platform.fsync_dir(str(self.active_dir))
        del state.records[name]
        return target

    def _move_aside_locked(self, target: Path, name: str) -> None:
        """Keep an earlier ``archive/{name}.json`` as ``archive/{name}-{stamp}.json``.

        The stamp is the earlier file's mtime (when it was archived), with
        ``-1``, ``-2``... if taken. Copied create-only and durably, then
        removed: a crash in between leaves two copies, never none.
        """
        try:
            found = _read_file(target)
        except _CorruptFileError as exc:
            self._quarantine_locked(target, str(exc))
            return
        if found is None:
            return
        content, mtime = found
        base = f"{name}-{_stamp(datetime.fromtimestamp(mtime, timezone.utc))}"
        attempt = 0
        while True:
            suffix = "" if attempt == 0 else f"-{attempt}"
            aside = self.archive_dir / f"{base}{suffix}{_SUFFIX}"
            try:
                with AtomicFileWriter(aside, mode="wb", durable=self.durable, overwrite=False) as f:
                    f.write(content)
            except FileExistsError:
                attempt += 1
                continue
            break
        with suppress(FileNotFoundError):
            _remove(target)
