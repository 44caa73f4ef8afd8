"""A registry of concurrent agent sessions sharing one project directory.

Many instances (processes) of an agent run at once in one repository; each
registers itself under ``.htmlgraph/sessions/registry/`` (the seed's
"Phase 1.4")::

    registry/
        active/{instance_id}.json              one record per live instance
        archive/{instance_id}-{stamp}.json     records of finished instances
        .index.json                            session id -> instance id
        .lock/                                 DirectoryLocker markers

Every file is replaced whole with :class:`~htmlgraph.atomic_ops.AtomicFileWriter`
(durable by default), so a reader never sees a partial record. Every change
(register, heartbeat, archive, reap) runs under the registry's exclusive
:class:`~htmlgraph.atomic_ops.DirectoryLocker` lock and does its
read-modify-write of the index inside it, so concurrent instances lose no
entry. The active records are the source of truth; the index is derived from
them and is rebuilt, with a WARNING, whenever it is missing, corrupt or out of
step (the state an interrupted update leaves). ``docs/session-registry.md``
gives the file formats, the concurrency argument and the crash ordering.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, TypedDict, cast

from htmlgraph import _platform
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

#: The ``format`` field written into records and the index. Readers accept
#: any version >= 1 whose required fields are valid and keep unknown fields.
FORMAT_VERSION = 1

#: Longest accepted session or instance id, in UTF-8 bytes: an archive name
#: (id + "-" + 22-character stamp + ".json") must stay below the 255-byte
#: file-name limit of ext4, xfs, btrfs, APFS and NTFS.
MAX_ID_BYTES = 200

# Orphaned temp files of crashed writers older than this are removed by
# reap_stale. Only temps whose writer pid is gone are candidates at all.
_ORPHAN_AGE_HOURS = 1.0

_REGISTRY_PARTS = (".htmlgraph", "sessions", "registry")
_INDEX_NAME = ".index.json"
_LOCK_NAME = ".lock"
_SUFFIX = ".json"

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
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9-]")

ArchiveReason = Literal["archived", "process-gone", "idle", "superseded", "re-registered"]
ProcessState = Literal["alive", "gone", "unknown"]


class SessionRecord(TypedDict):
    """The content of ``active/{instance_id}.json`` (see the module docs).

    Timestamps are ISO 8601 strings in UTC with an explicit ``+00:00`` offset.
    ``process_start`` is ``_platform.process_start_token`` of the registering
    process (None where the OS gives none); with ``hostname`` and ``pid`` it
    lets :meth:`SessionRegistry.reap_stale` prove the process gone even after
    its pid was reused. ``pid_namespace`` (Linux, else None) keeps containers
    that share a host name from judging each other's pids; a record without
    it reads as None.
    """

    format: int
    instance_id: str
    session_id: str
    hostname: str
    pid: int
    process_start: str | None
    pid_namespace: str | None
    created: str
    last_activity: str
    repo: dict[str, object] | None
    instance: dict[str, object] | None


class IndexEntry(TypedDict):
    """One value of ``.index.json``'s ``sessions`` map (keyed by session id)."""

    instance_id: str
    created: str
    last_activity: str


class SessionConflictError(ValueError):
    """A session id is already registered by another instance that may be alive.

    Raised by :meth:`SessionRegistry.register_session` when the session is held
    by an instance whose process is alive, or runs on another host, so it
    cannot be proven gone. Nothing was changed.

    Attributes:
        session_id: The session asked for.
        instance_id: The instance that holds it.
    """

    def __init__(self, session_id: str, instance_id: str) -> None:
        super().__init__(
            f"session {session_id!r} is already registered by instance {instance_id!r}, "
            "whose process is alive or on another host"
        )
        self.session_id = session_id
        self.instance_id = instance_id

    def __reduce__(self) -> tuple[type[SessionConflictError], tuple[str, str]]:
        return (type(self), (self.session_id, self.instance_id))


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


# (pid, hostname, instance id) of the last computation; recomputed when the
# pid changes (a forked child) or the host name seam answers differently.
_instance_cache: tuple[int, str, str] | None = None
# Per-process random stand-in for the start token where the OS has none.
_fallback_token: tuple[int, str] | None = None


def _own_start_token(pid: int) -> str | None:
    return _platform.process_start_token(pid)


def _current_instance_id() -> str:
    global _instance_cache, _fallback_token
    pid = os.getpid()
    host = _hostname()
    cached = _instance_cache
    if cached is not None and cached[0] == pid and cached[1] == host:
        return cached[2]
    token = _own_start_token(pid)
    if token is None:
        # No start token (macOS): a random value chosen once per process
        # makes a reused pid yield a new id all the same.
        if _fallback_token is None or _fallback_token[0] != pid:
            _fallback_token = (pid, "random:" + _random_token())
        token = _fallback_token[1]
    # The digest covers the full host name: the readable prefix is sanitised
    # and truncated, so two hosts could share it but not the digest.
    digest = hashlib.sha256(f"{host}\0{pid}\0{token}".encode()).hexdigest()[:16]
    readable = _HOST_UNSAFE.sub("_", host)[:63] or "host"
    instance_id = f"{readable}-{pid}-{digest}"
    _instance_cache = (pid, host, instance_id)
    return instance_id


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
        raise TypeError(f"{kind} must be a str, not {type(value).__name__}: {value!r}")
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


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%S%fZ")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path) -> object | None:
    """Return the parsed content of ``path``, None if it does not exist.

    Raises:
        _CorruptFileError: The file exists but is not UTF-8 JSON.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise _CorruptFileError("it is a directory") from exc
    if not raw:
        raise _CorruptFileError("it is empty")
    try:
        return cast(object, json.loads(raw.decode("utf-8")))
    except UnicodeDecodeError as exc:
        raise _CorruptFileError(f"it is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:
        raise _CorruptFileError(f"it is not JSON ({exc})") from exc


def _validate_record(data: object, instance_id: str) -> SessionRecord:
    """Check ``data`` against the record schema; raise _CorruptFileError if it fails."""
    if not isinstance(data, dict):
        raise _CorruptFileError(f"it holds a JSON {type(data).__name__}, not an object")
    problems = []
    version = data.get("format")
    if not _is_int(version) or cast(int, version) < 1:
        problems.append("format")
    if data.get("instance_id") != instance_id:
        problems.append("instance_id (must match the file name)")
    session_id = data.get("session_id")
    if not isinstance(session_id, str) or _id_problem(session_id) is not None:
        problems.append("session_id")
    if not isinstance(data.get("hostname"), str):
        problems.append("hostname")
    pid = data.get("pid")
    if not _is_int(pid) or cast(int, pid) <= 0:
        problems.append("pid")
    if not isinstance(data.get("process_start"), (str, type(None))):
        problems.append("process_start")
    data.setdefault("pid_namespace", None)
    if not isinstance(data["pid_namespace"], (str, type(None))):
        problems.append("pid_namespace")
    for key in ("created", "last_activity"):
        if _parse_time(data.get(key)) is None:
            problems.append(key)
    for key in ("repo", "instance"):
        if not isinstance(data.get(key), (dict, type(None))):
            problems.append(key)
    if problems:
        raise _CorruptFileError("bad or missing field(s): " + ", ".join(problems))
    return cast(SessionRecord, data)


def _validate_index(data: object) -> dict[str, IndexEntry]:
    """Check ``data`` against the index schema; raise _CorruptFileError if it fails."""
    if not isinstance(data, dict):
        raise _CorruptFileError(f"it holds a JSON {type(data).__name__}, not an object")
    version = data.get("format")
    if not _is_int(version) or cast(int, version) < 1:
        raise _CorruptFileError("bad or missing field: format")
    sessions = data.get("sessions")
    if not isinstance(sessions, dict):
        raise _CorruptFileError("bad or missing field: sessions")
    entries: dict[str, IndexEntry] = {}
    holders: set[str] = set()
    for session_id, entry in sessions.items():
        if _id_problem(session_id) is not None:
            raise _CorruptFileError(f"unsafe session id {_short_repr(session_id)}")
        if not isinstance(entry, dict):
            raise _CorruptFileError(f"entry of session {session_id!r} is not an object")
        instance_id = entry.get("instance_id")
        if not isinstance(instance_id, str) or _id_problem(instance_id) is not None:
            raise _CorruptFileError(f"bad instance_id for session {session_id!r}")
        if instance_id in holders:
            raise _CorruptFileError(f"instance {instance_id!r} holds two sessions")
        holders.add(instance_id)
        created, last = entry.get("created"), entry.get("last_activity")
        if _parse_time(created) is None or _parse_time(last) is None:
            raise _CorruptFileError(f"bad timestamps for session {session_id!r}")
        entries[session_id] = IndexEntry(
            instance_id=instance_id, created=cast(str, created), last_activity=cast(str, last)
        )
    return entries


def _entry_for(record: SessionRecord) -> IndexEntry:
    return IndexEntry(
        instance_id=record["instance_id"],
        created=record["created"],
        last_activity=record["last_activity"],
    )


def _record_text(data: Mapping[str, object]) -> str:
    return json.dumps(dict(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


class SessionRegistry:
    """The session registry of one project directory (see the module docs).

    Safe across threads and processes: every change takes the registry's
    exclusive marker-file lock (:class:`~htmlgraph.atomic_ops.DirectoryLocker`
    in ``registry/.lock/``; threads sharing one object take turns) and every
    file is replaced atomically, so N instances registering, heartbeating and
    archiving at once lose no entry and no reader ever sees a partial file.
    Writes are durable (fsynced) unless ``durable=False``. The lock is
    advisory and assumes a local filesystem; all users of one registry must go
    through this class. Nothing touches the disk until the first change:
    reading a registry that does not exist returns empty results without
    creating it.

    Args:
        registry_dir: The registry directory; by default
            ``.htmlgraph/sessions/registry`` under the current directory (made
            absolute now, so a later ``chdir`` does not move it).
        lock_timeout: Seconds each operation waits for the registry lock
            before raising :class:`~htmlgraph.atomic_ops.LockTimeout`.
        durable: fsync every write (the default). ``False`` keeps atomicity
            against process crashes only, not against a power cut.
    """

    def __init__(
        self,
        registry_dir: str | os.PathLike[str] | None = None,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        durable: bool = True,
    ) -> None:
        if registry_dir is None:
            directory = Path.cwd().joinpath(*_REGISTRY_PARTS)
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
        self.active_dir = directory / "active"
        self.archive_dir = directory / "archive"
        self.index_path = directory / _INDEX_NAME
        self.lock_dir = directory / _LOCK_NAME
        self.lock_timeout = float(lock_timeout)
        self.durable = durable
        self._lock: DirectoryLocker | None = None
        self._locker_guard = threading.Lock()

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
    # Public API
    # ------------------------------------------------------------------
    def get_instance_id(self) -> str:
        """Return the id of the calling process: ``{host}-{pid}-{16 hex}``.

        Stable for the life of the process and recomputed in a forked child
        (its pid differs). The hex digest covers the full host name, the pid
        and the process start token (Linux: boot id + start time; Windows:
        creation time; elsewhere a random value drawn once per process), so
        ids differ across hosts and across a reused pid. Always a safe file
        name. Touches no disk; thread-safe.
        """
        return _current_instance_id()

    def get_session_file_path(self, instance_id: str) -> Path:
        """Return ``active/{instance_id}.json`` for ``instance_id`` (no disk access).

        Raises:
            ValueError: ``instance_id`` is unsafe as a file name.
            TypeError: ``instance_id`` is not a str.
        """
        return self._active_path(_check_id("instance id", instance_id))

    def register_session(
        self,
        session_id: str,
        repo: Mapping[str, object] | None = None,
        instance: Mapping[str, object] | None = None,
    ) -> str:
        """Register the calling process as the instance running ``session_id``.

        Writes ``active/{instance_id}.json`` atomically and durably, then the
        index, both under the registry's exclusive lock: safe across threads
        and processes, and no concurrent registration is lost. Registering
        again with the same session refreshes the record (``created`` kept,
        ``repo``/``instance`` replaced); registering with a different session
        first archives this instance's previous record (reason
        ``re-registered``). A session held by another instance whose process
        is provably gone (same host, pid dead or reused) is taken over and the
        old record archived (reason ``superseded``).

        Args:
            session_id: The session this instance works on (a safe name).
            repo: JSON-serialisable facts about the repository (path, branch,
                commit...), stored as given.
            instance: JSON-serialisable facts about the instance (agent,
                model, version...), stored as given.

        Returns:
            This process's instance id (:meth:`get_instance_id`).

        Raises:
            ValueError: ``session_id`` is unsafe, or ``repo``/``instance``
                holds NaN/infinity or a cycle (checked before any disk access).
            TypeError: An argument has the wrong type or is not serialisable.
            SessionConflictError: Another, possibly live, instance holds the
                session.
            LockTimeout: The registry lock was not acquired in time.
        """
        _check_id("session id", session_id)
        repo_data = _check_info("repo", repo)
        instance_data = _check_info("instance", instance)
        instance_id = self.get_instance_id()
        pid = os.getpid()
        with self._exclusive():
            entries = self._load_index_locked()
            now = _utcnow()
            holder = entries.get(session_id)
            other = None
            if holder is not None and holder["instance_id"] != instance_id:
                other = self._read_record_locked(holder["instance_id"], entries)
                if other is None or other["session_id"] != session_id:
                    # The entry disagrees with the record (an update was cut
                    # short between its two writes): trust the records.
                    entries = self._rebuild_locked(
                        f"its entry for session {session_id!r} disagrees with the records"
                    )
                    holder = entries.get(session_id)
                    other = None
                    if holder is not None and holder["instance_id"] != instance_id:
                        other = self._read_record_locked(holder["instance_id"], entries)
            if other is not None:
                if self.process_state(other) != "gone":
                    raise SessionConflictError(session_id, other["instance_id"])
                self._archive_locked(other, "superseded", now)
                _drop_instance(entries, other["instance_id"])
            existing = self._read_record_locked(instance_id, entries)
            created = _iso(now)
            if existing is not None:
                if existing["session_id"] == session_id:
                    created = existing["created"]
                else:
                    # Finish the archive, index included, before the new
                    # record appears: a crash in between then leaves a
                    # membership mismatch (detected), never a record whose
                    # index entry names its old session.
                    self._archive_locked(existing, "re-registered", now)
                    _drop_instance(entries, instance_id)
                    self._write_index(entries)
            record = SessionRecord(
                format=FORMAT_VERSION,
                instance_id=instance_id,
                session_id=session_id,
                hostname=_hostname(),
                pid=pid,
                process_start=_own_start_token(pid),
                pid_namespace=_platform.pid_namespace(),
                created=created,
                last_activity=_iso(now),
                repo=repo_data,
                instance=instance_data,
            )
            self._write_record(record)
            _drop_instance(entries, instance_id)
            entries[session_id] = _entry_for(record)
            self._write_index(entries)
        logger.debug("registered instance %s for session %s", instance_id, session_id)
        return instance_id

    def read_session(self, instance_id: str) -> SessionRecord | None:
        """Return the active record of ``instance_id``, or None if it has none.

        Reads one atomically replaced file without taking the lock, so it
        never blocks and never sees a partial record; a record archived
        concurrently reads as None. A corrupt record is reported with a
        WARNING and read as None (:meth:`get_index`, :meth:`reap_stale` or a
        change to that instance moves it into ``archive/`` as ``.corrupt``).

        Raises:
            ValueError: ``instance_id`` is unsafe as a file name.
            TypeError: ``instance_id`` is not a str.
        """
        _check_id("instance id", instance_id)
        return self._read_record_unlocked(instance_id)

    def get_current_sessions(self) -> list[SessionRecord]:
        """Return every active record, oldest ``created`` first.

        Lock-free: lists ``active/`` and reads each atomically replaced file,
        so it never blocks behind writers, never sees a partial record and
        skips records archived while it runs. Corrupt records are skipped with
        a WARNING. Each record is read whole, but the list is not one
        snapshot: a change made while it runs may or may not be included
        (:meth:`get_index` gives one consistent state).
        Returns ``[]`` when the registry does not exist (and creates nothing).
        """
        records = []
        for instance_id in sorted(self._active_names()):
            record = self._read_record_unlocked(instance_id)
            if record is not None:
                records.append(record)
        records.sort(key=lambda r: (cast(datetime, _parse_time(r["created"])), r["instance_id"]))
        return records

    def get_index(self) -> dict[str, IndexEntry]:
        """Return the index: session id -> instance id, created, last activity.

        Read under the registry's shared lock, so it is one consistent state
        (no change is half-applied while it is held), and checked against the
        active records read under the same lock: every entry names a valid
        record of that session, and ``last_activity`` is the record's. If the
        index is missing, corrupt, out of step with ``active/`` or disagrees
        with a record (a corrupt record is quarantined), it is rebuilt from the
        records under the exclusive lock, with a WARNING. Costs one read per
        active record. Returns ``{}`` when the registry does not exist (and
        creates nothing).

        Raises:
            LockTimeout: The registry lock was not acquired in time.
        """
        if not self._exists():
            return {}
        with self._shared():
            entries = self._try_load_index()
            if entries is not None and self._agrees_with_records(entries):
                return entries
        with self._exclusive():
            entries = self._load_index_locked()
            if not self._agrees_with_records(entries):
                entries = self._rebuild_locked("it disagrees with the active records")
            return entries

    def find_session(self, session_id: str) -> SessionRecord | None:
        """Return the active record of the instance running ``session_id``, or None.

        Looks the session up in the index under the shared lock (rebuilding a
        missing or corrupt index as :meth:`get_index` does) and reads the
        instance's record while still holding it, so the answer is consistent.

        Raises:
            ValueError: ``session_id`` is unsafe.
            TypeError: ``session_id`` is not a str.
            LockTimeout: The registry lock was not acquired in time.
        """
        _check_id("session id", session_id)
        if not self._exists():
            return None
        with self._shared():
            entries = self._try_load_index()
            if entries is not None:
                entry = entries.get(session_id)
                if entry is None:
                    return None
                record = self._read_record_unlocked(entry["instance_id"])
                if record is not None and record["session_id"] == session_id:
                    return record
        # Missing, corrupt or stale index: repair it under the exclusive lock.
        with self._exclusive():
            entries = self._load_index_locked()
            entry = entries.get(session_id)
            record = (
                None if entry is None else self._read_record_locked(entry["instance_id"], entries)
            )
            if entry is not None and (record is None or record["session_id"] != session_id):
                entries = self._rebuild_locked(
                    f"its entry for session {session_id!r} disagrees with the records"
                )
                entry = entries.get(session_id)
                record = None if entry is None else self._read_record_unlocked(entry["instance_id"])
            return record

    def update_activity(self, instance_id: str) -> bool:
        """Record a heartbeat: set ``last_activity`` of ``instance_id`` to now.

        Rewrites the record atomically and durably, then the index entry,
        under the exclusive lock (so a heartbeat can never resurrect a record
        that a concurrent archive removed). Safe across threads and processes.

        Returns:
            True if the instance was active and is updated; False if it has no
            active record (never registered, archived or reaped).

        Raises:
            ValueError: ``instance_id`` is unsafe as a file name.
            TypeError: ``instance_id`` is not a str.
            LockTimeout: The registry lock was not acquired in time.
        """
        _check_id("instance id", instance_id)
        if not self._exists():
            return False
        with self._exclusive():
            entries, record = self._active_record_locked(instance_id)
            if record is None:
                return False
            updated = cast(SessionRecord, dict(record))
            updated["last_activity"] = _iso(_utcnow())
            self._write_record(updated)
            timestamp_only = _sessions_of(entries, instance_id) == [updated["session_id"]]
            _drop_instance(entries, instance_id)
            entries[updated["session_id"]] = _entry_for(updated)
            # A heartbeat only moves a timestamp the record already holds
            # durably, so its index write skips the fsyncs: a power cut can
            # lose it (the index lags) or tear it (the next use rebuilds it).
            self._write_index(entries, durable=self.durable and not timestamp_only)
        return True

    def archive_session(self, instance_id: str) -> bool:
        """Move the active record of ``instance_id`` into ``archive/``.

        Under the exclusive lock: writes ``archive/{instance_id}-{stamp}.json``
        (create-only, atomic, durable) with ``archived`` and
        ``archive_reason: "archived"`` added, then removes the active record,
        then updates the index. A crash between the steps leaves a state the
        next change repairs (see ``docs/session-registry.md``). Safe across
        threads and processes; archiving twice is harmless.

        Returns:
            True if a record was archived; False if there was none.

        Raises:
            ValueError: ``instance_id`` is unsafe as a file name.
            TypeError: ``instance_id`` is not a str.
            LockTimeout: The registry lock was not acquired in time.
        """
        _check_id("instance id", instance_id)
        if not self._exists():
            return False
        with self._exclusive():
            entries, record = self._active_record_locked(instance_id)
            if record is None:
                return False
            self._archive_locked(record, "archived", _utcnow())
            _drop_instance(entries, instance_id)
            self._write_index(entries)
        logger.debug("archived instance %s", instance_id)
        return True

    def reap_stale(self, max_idle: float | None = DEFAULT_MAX_IDLE) -> list[str]:
        """Archive instances that are gone or idle; return their ids, sorted.

        An instance is reaped (under the exclusive lock, each record archived
        as :meth:`archive_session` does) when its record names this host and
        its process is provably gone - the pid no longer exists, or it exists
        with a different start token (reused pid) - reason ``process-gone``;
        or when its last heartbeat is older than ``max_idle`` seconds on any
        host - reason ``idle``. Instances on other hosts are judged by
        heartbeat age only. Also removes orphaned temp files that crashed
        writers left in the registry. Safe across threads and processes.

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
        if max_idle is not None:
            if isinstance(max_idle, bool) or not isinstance(max_idle, (int, float)):
                raise TypeError(f"max_idle must be a number of seconds or None, not {max_idle!r}")
            if not max_idle >= 0:
                raise ValueError(f"max_idle must be >= 0 seconds, not {max_idle!r}")
        if not self._exists():
            return []
        reaped: list[str] = []
        with self._exclusive():
            entries = self._load_index_locked()
            before = dict(entries)
            now = _utcnow()
            for instance_id in sorted(self._active_names()):
                record = self._read_record_locked(instance_id, entries)
                if record is None:
                    continue
                reason: ArchiveReason | None = None
                if self.process_state(record) == "gone":
                    reason = "process-gone"
                elif max_idle is not None:
                    last = _parse_time(record["last_activity"])
                    if last is not None and (now - last).total_seconds() > max_idle:
                        reason = "idle"
                if reason is None:
                    continue
                self._archive_locked(record, reason, now)
                _drop_instance(entries, instance_id)
                reaped.append(instance_id)
                logger.info("reaped instance %s (%s)", instance_id, reason)
            if entries != before:
                self._write_index(entries)
        for directory in (self.active_dir, self.archive_dir, self.registry_dir):
            cleanup_orphaned_temp_files(directory, age_hours=_ORPHAN_AGE_HOURS)
        return reaped

    def process_state(self, record: Mapping[str, object]) -> ProcessState:
        """Say whether the process that wrote ``record`` still runs.

        ``"gone"`` only on proof: the record names this host (and, on Linux,
        this pid namespace) and its pid does not exist, is a zombie (killed,
        not yet waited for), or exists with a different start token (reused
        pid). ``"unknown"`` for another host or pid namespace (no way to ask
        it) or an unreadable pid; ``"alive"`` otherwise. Read-only, no lock;
        the answer may be out of date by the time it is used.
        """
        pid = record.get("pid")
        if record.get("hostname") != _hostname() or not _is_int(pid):
            return "unknown"
        namespace, ours = record.get("pid_namespace"), _platform.pid_namespace()
        if isinstance(namespace, str) and ours is not None and namespace != ours:
            return "unknown"
        pid = cast(int, pid)
        if not _platform.pid_exists(pid) or _platform.pid_is_zombie(pid):
            return "gone"
        recorded = record.get("process_start")
        if isinstance(recorded, str):
            current = _platform.process_start_token(pid)
            if current is not None and current != recorded:
                return "gone"
        return "alive"

    # ------------------------------------------------------------------
    # Internals. "_locked" methods run with the exclusive lock held.
    # ------------------------------------------------------------------
    def _exists(self) -> bool:
        return self.active_dir.is_dir() or self.index_path.exists()

    def _active_path(self, instance_id: str) -> Path:
        return self.active_dir / f"{instance_id}{_SUFFIX}"

    def _locker(self) -> DirectoryLocker:
        # One locker for the life of this registry object, made on first use
        # (its constructor creates the lock directory). Threads sharing the
        # object take turns on it, and a long-lived locker also sweeps the
        # pending files that killed claimants leave (DirectoryLocker only
        # removes one after seeing it for a while).
        with self._locker_guard:
            if self._lock is None:
                self._make_registry_dir()
                self._lock = DirectoryLocker(self.lock_dir)
            return self._lock

    def _make_registry_dir(self) -> None:
        """Create the registry directory and missing parents, durably.

        The writer makes the directories *it* creates durable (``active/``,
        ``archive/``), but the registry directory itself would otherwise come
        from the lock directory's plain ``mkdir``: a power cut could then take
        the whole registry, durably written records included, with it.
        """
        missing = []
        directory = self.registry_dir
        while not directory.is_dir():
            missing.append(directory)
            if directory.parent == directory:
                break
            directory = directory.parent
        for directory in reversed(missing):
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
            if name.endswith(_SUFFIX) and not name.startswith(".")
        }

    def _read_record_unlocked(self, instance_id: str) -> SessionRecord | None:
        path = self._active_path(instance_id)
        try:
            return _validate_record(_read_json(path), instance_id)
        except _CorruptFileError as exc:
            if not path.exists():
                return None  # archived between the read and the check
            logger.warning("skipping corrupt session record %s: %s", path, exc)
            return None

    def _active_record_locked(
        self, instance_id: str
    ) -> tuple[dict[str, IndexEntry], SessionRecord | None]:
        """Load the index and ``instance_id``'s active record, under the exclusive lock.

        Without an active record, index entries still naming the instance are
        dropped and the index written back, so the two agree again.
        """
        entries = self._load_index_locked()
        before = dict(entries)
        record = self._read_record_locked(instance_id, entries)
        if record is None:
            _drop_instance(entries, instance_id)
            if entries != before:
                self._write_index(entries)
        return entries, record

    def _read_record_locked(
        self, instance_id: str, entries: dict[str, IndexEntry]
    ) -> SessionRecord | None:
        """Read a record under the exclusive lock; quarantine it if corrupt.

        A corrupt record is moved to ``archive/`` (WARNING) and its index
        entries dropped from ``entries``; the caller writes the index.
        """
        path = self._active_path(instance_id)
        try:
            data = _read_json(path)
            if data is None:
                return None
            return _validate_record(data, instance_id)
        except _CorruptFileError as exc:
            self._quarantine_locked(path, str(exc))
            _drop_instance(entries, instance_id)
            return None

    def _quarantine_locked(self, path: Path, problem: str) -> None:
        stem = _HOST_UNSAFE.sub("_", path.name[: -len(_SUFFIX)])[:100] or "record"
        target = self.archive_dir / f"{stem}-{_stamp(_utcnow())}-{_random_token()}.corrupt"
        logger.warning("moved corrupt session record %s to %s: %s", path, target, problem)
        atomic_rename(path, target, durable=self.durable)

    def _write_record(self, record: Mapping[str, object]) -> None:
        text = _record_text(record)
        path = self._active_path(cast(str, record["instance_id"]))
        with AtomicFileWriter(path, durable=self.durable) as f:
            f.write(text)

    def _write_index(
        self, entries: Mapping[str, IndexEntry], *, durable: bool | None = None
    ) -> None:
        sessions = {session_id: dict(entries[session_id]) for session_id in sorted(entries)}
        atomic_json_write(
            self.index_path,
            {"format": FORMAT_VERSION, "sessions": sessions},
            durable=self.durable if durable is None else durable,
        )

    def _agrees_with_records(self, entries: dict[str, IndexEntry]) -> bool:
        """Check each entry against its record (lock held); sync ``last_activity``.

        The index's ``last_activity`` may lag its record by one heartbeat after
        a crash; the record's value is the true one, so it is copied over.
        """
        for session_id, entry in entries.items():
            record = self._read_record_unlocked(entry["instance_id"])
            if (
                record is None
                or record["session_id"] != session_id
                or record["created"] != entry["created"]
            ):
                return False
            entry["last_activity"] = record["last_activity"]
        return True

    def _try_load_index(self) -> dict[str, IndexEntry] | None:
        """Return the index if it is valid and matches ``active/``; None otherwise."""
        try:
            data = _read_json(self.index_path)
            entries = None if data is None else _validate_index(data)
        except _CorruptFileError:
            return None
        if entries is None:
            return None if self._active_names() else {}
        if {e["instance_id"] for e in entries.values()} != self._active_names():
            return None
        return entries

    def _load_index_locked(self) -> dict[str, IndexEntry]:
        """Load the index, rebuilding it (WARNING) if it is missing, corrupt or stale."""
        try:
            data = _read_json(self.index_path)
            entries = None if data is None else _validate_index(data)
        except _CorruptFileError as exc:
            return self._rebuild_locked(f"it is corrupt ({exc})")
        names = self._active_names()
        if entries is None:
            if not names:
                return {}
            return self._rebuild_locked("it is missing")
        if {e["instance_id"] for e in entries.values()} != names:
            # The state an update interrupted between its two writes leaves.
            return self._rebuild_locked("it is out of step with active/")
        return entries

    def _rebuild_locked(self, why: str) -> dict[str, IndexEntry]:
        """Rebuild the index from the active records and write it."""
        entries: dict[str, IndexEntry] = {}
        records: dict[str, SessionRecord] = {}
        for name in sorted(self._active_names()):
            if _id_problem(name) is not None:
                self._quarantine_locked(self._active_path(name), "unsafe file name")
                continue
            record = self._read_record_locked(name, entries)
            if record is None:
                continue
            session_id = record["session_id"]
            rival = records.get(session_id)
            if rival is not None:
                # Two records claim one session (only hand edits or a foreign
                # writer make this): keep the most recent heartbeat.
                older, newer = sorted((rival, record), key=_heartbeat_key)
                logger.warning(
                    "instances %s and %s both claim session %s; archiving %s",
                    older["instance_id"],
                    newer["instance_id"],
                    session_id,
                    older["instance_id"],
                )
                self._archive_locked(older, "superseded", _utcnow())
                record = newer
            records[session_id] = record
            entries[session_id] = _entry_for(record)
        logger.warning(
            "rebuilt session index %s from %d active record(s): %s",
            self.index_path,
            len(entries),
            why,
        )
        self._write_index(entries)
        return entries

    def _archive_locked(self, record: SessionRecord, reason: ArchiveReason, now: datetime) -> Path:
        """Copy ``record`` into ``archive/``, then remove its active file.

        The archive copy is written create-only and durably *before* the
        active file goes, so a crash in between leaves the record active (and
        archived once more next time), never lost.
        """
        data: dict[str, object] = dict(record)
        data["archived"] = _iso(now)
        data["archive_reason"] = reason
        text = _record_text(data)
        base = f"{record['instance_id']}-{_stamp(now)}"
        attempt = 0
        while True:
            suffix = "" if attempt == 0 else f"-{attempt}"
            target = self.archive_dir / f"{base}{suffix}{_SUFFIX}"
            try:
                with AtomicFileWriter(target, durable=self.durable, overwrite=False) as f:
                    f.write(text)
            except FileExistsError:
                attempt += 1
                continue
            break
        active = self._active_path(record["instance_id"])
        try:
            _remove(active)
        except FileNotFoundError:
            pass
        else:
            if self.durable:
                _platform.fsync_dir(str(self.active_dir))
        return target


def _sessions_of(entries: Mapping[str, IndexEntry], instance_id: str) -> list[str]:
    return [s for s, e in entries.items() if e["instance_id"] == instance_id]


def _drop_instance(entries: dict[str, IndexEntry], instance_id: str) -> None:
    """Remove every index entry that points at ``instance_id``."""
    for session_id in _sessions_of(entries, instance_id):
        del entries[session_id]


def _heartbeat_key(record: SessionRecord) -> tuple[datetime, str]:
    moment = _parse_time(record["last_activity"]) or datetime.min.replace(tzinfo=timezone.utc)
    return (moment, record["instance_id"])
