"""Tests for htmlgraph.session_registry: unit tests, corruption repair, real processes."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing as mp
import os
import pickle
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from _helpers import dead_pid
from _writehelpers import temp_name_for
from htmlgraph import _platform, atomic_ops, session_registry
from htmlgraph.atomic_ops import DirectoryLocker, LockTimeout, cleanup_orphaned_temp_files
from htmlgraph.session_registry import MAX_ID_BYTES, SessionConflictError, SessionRegistry

LOGGER = "htmlgraph.session_registry"
JOIN_TIMEOUT = 120.0

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")

UNSAFE_IDS = [
    "",
    "a/b",
    "a\\b",
    "/abs",
    "..",
    ".",
    ".hidden",
    "../escape",
    "nul\0byte",
    "line\nbreak",
    "x" * (MAX_ID_BYTES + 1),
    "é" * (MAX_ID_BYTES // 2 + 1),  # 202 UTF-8 bytes, 101 characters
    "colon:name",
    "star*",
    "CON",
    "nul.txt",
    "trailing.",
    "trailing ",
    "\ud800surrogate",
]
SAFE_IDS = ["s", "sess-1_2.3", "a..b", "x" * MAX_ID_BYTES, "séance", "UUID-0f1e2d3c"]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _fresh_instance_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test computes the instance id afresh (the cache is per process)."""
    monkeypatch.setattr(session_registry, "_instance_cache", None)


@pytest.fixture(autouse=True)
def _no_leftover_children() -> Iterator[None]:
    yield
    assert mp.active_children() == []


@pytest.fixture
def reg(tmp_path: Path) -> SessionRegistry:
    return SessionRegistry(tmp_path / "registry")


def register(reg: SessionRegistry, session_id: str, **info: Any) -> str:
    """Register ``session_id`` and return the instance id (the record's file stem)."""
    path = reg.register_session(session_id, **info)
    assert path.parent == reg.active_dir
    assert path.suffix == ".json"
    return path.stem


def ts(moment: datetime) -> str:
    """``moment`` as htmlgraph writes it: ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _listing(directory: Path) -> set[str]:
    return set(os.listdir(directory)) if directory.is_dir() else set()


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _records_on_disk(reg: SessionRegistry) -> dict[str, dict[str, Any]]:
    return {
        name[: -len(".json")]: _load(reg.active_dir / name)
        for name in _listing(reg.active_dir)
        if name.endswith(".json")
    }


def assert_consistent(
    reg: SessionRegistry, *, allow_corrupt: bool = False, exact_times: bool = True
) -> None:
    """The disk after a scenario: index == active records, nothing stray anywhere.

    ``exact_times=False`` after a crash: a heartbeat killed between its record
    and its index write leaves the index's last_activity one beat behind.
    """
    assert _listing(reg.registry_dir) <= {"active", "archive", ".index.json", ".lock"}
    for directory in (reg.registry_dir, reg.active_dir, reg.archive_dir):
        strays = [n for n in _listing(directory) if n.startswith(".tmp-")]
        assert strays == [], f"temp files left in {directory}: {strays}"
    assert all(n.endswith(".json") for n in _listing(reg.active_dir))
    archived = _listing(reg.archive_dir)
    assert all(n.endswith(".json") or (allow_corrupt and n.endswith(".corrupt")) for n in archived)
    if reg.lock_dir.is_dir():
        held = [n for n in _listing(reg.lock_dir) if n.startswith((".lock-shared", ".lock-excl"))]
        assert held == [], f"lock markers left: {held}"
    records = _records_on_disk(reg)
    expected = {
        r["session_id"]: {
            "instance_id": iid,
            "created": r["created"],
            "last_activity": r["last_activity"],
        }
        for iid, r in records.items()
    }
    assert len(expected) == len(records), "two records claim one session"
    if reg.index_file.exists():
        index = _load(reg.index_file)
        assert set(index) == {"version", "updated_at", "active_sessions"}
        assert index["version"] == "1.0"
        assert TIMESTAMP.fullmatch(index["updated_at"])
        if not exact_times:
            for entries in (index["active_sessions"], expected):
                for entry in entries.values():
                    entry.pop("last_activity")
        assert index["active_sessions"] == expected
    else:
        assert records == {}


def plant_record(
    reg: SessionRegistry,
    instance_id: str,
    session_id: str,
    *,
    hostname: str | None = None,
    pid: int | None = None,
    process_start: str | None = None,
    pid_namespace: str | None = None,
    last_activity: datetime | None = None,
) -> dict[str, Any]:
    """Write a record as another process of this package would have (and index it).

    ``pid_namespace`` defaults to this process's (a record of this host).
    """
    moment = last_activity or datetime.now(timezone.utc)
    host = hostname if hostname is not None else session_registry._hostname()
    record: dict[str, Any] = {
        "instance_id": instance_id,
        "session_id": session_id,
        "created": ts(moment),
        "repo": {},
        "instance": {"pid": pid, "hostname": host},
        "status": "active",
        "last_activity": ts(moment),
        "format": 2,
        "hostname": host,
        "pid": pid if pid is not None else os.getpid(),
        "process_start": process_start,
        "pid_namespace": (
            pid_namespace if pid_namespace is not None else _platform.pid_namespace()
        ),
    }
    reg.active_dir.mkdir(parents=True, exist_ok=True)
    (reg.active_dir / f"{instance_id}.json").write_text(json.dumps(record), encoding="utf-8")
    index: dict[str, Any] = {"version": "1.0", "updated_at": ts(moment), "active_sessions": {}}
    if reg.index_file.exists():
        index = _load(reg.index_file)
    index["active_sessions"][session_id] = {
        "instance_id": instance_id,
        "created": record["created"],
        "last_activity": record["last_activity"],
    }
    reg.index_file.write_text(json.dumps(index), encoding="utf-8")
    return record


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------
# Module-level process targets (picklable for any start method)
# --------------------------------------------------------------------------
def _report_instance_id(conn: Connection) -> None:
    reg = SessionRegistry(Path.cwd())
    conn.send((os.getpid(), reg.get_instance_id(), reg.get_instance_id()))
    conn.close()


def _hold_session(registry_dir: str, session_id: str, conn: Connection) -> None:
    """Register, report the instance id, then wait for the parent to hang up.

    A Pipe, not an Event: a process SIGKILLed while it waits on a
    multiprocessing Event leaves the Event's condition broken for everyone.
    """
    reg = SessionRegistry(registry_dir)
    conn.send(register(reg, session_id, repo_info={"path": "/repo"}))
    conn.poll(JOIN_TIMEOUT)
    conn.close()


def start_holder(registry_dir: Path, session_id: str) -> tuple[Any, Any, str]:
    """Start a process holding ``session_id``; return it, its pipe and its instance id."""
    parent, child = mp.Pipe()
    proc = mp.Process(target=_hold_session, args=(str(registry_dir), session_id, child))
    proc.start()
    child.close()
    assert parent.poll(JOIN_TIMEOUT)
    instance_id: str = parent.recv()
    return proc, parent, instance_id


def _churn_worker(
    registry_dir: str,
    number: int,
    heartbeats: int,
    archive: bool,
    barrier: Barrier,
    conn: Connection,
) -> None:
    reg = SessionRegistry(registry_dir, lock_timeout=60.0)
    barrier.wait(JOIN_TIMEOUT)
    session_id = f"session-{number:02d}"
    instance_id = register(reg, session_id, repo_info={"n": number}, instance_info={"agent": "t"})
    ok = sum(reg.update_activity(instance_id) for _ in range(heartbeats))
    archived = reg.archive_session(instance_id) if archive else False
    conn.send((session_id, instance_id, ok, archived))
    conn.close()


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _crash_worker(registry_dir: str, conn: Connection) -> None:
    """Change the registry in a tight loop until SIGKILLed."""
    reg = SessionRegistry(registry_dir)
    conn.send("ready")
    n = 0
    while True:
        instance_id = register(reg, f"crash-{n % 3}", repo_info={"n": n})
        reg.update_activity(instance_id)
        if n % 2:
            reg.archive_session(instance_id)
        n += 1


def _reader(registry_dir: str, ready: Event, stop: Event, conn: Connection) -> None:
    """List the registry as fast as possible; count reads and anything partial."""
    reg = SessionRegistry(registry_dir, lock_timeout=60.0)
    warned = _Counter()
    logging.getLogger(LOGGER).addHandler(warned)
    listings = raw_reads = index_reads = locked_reads = bad = 0
    ready.set()
    while not stop.is_set():
        for record in reg.get_current_sessions():
            if not record["session_id"].startswith("session-"):
                bad += 1
        listings += 1
        names = [n for n in _listing(reg.active_dir) if not n.startswith(".")]
        for path in [reg.index_file, *(reg.active_dir / n for n in names)]:
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                data = json.loads(raw.decode("utf-8"))
            except ValueError:
                bad += 1
                continue
            wanted = ("version", "1.0") if path == reg.index_file else ("format", 2)
            if not isinstance(data, dict) or data.get(wanted[0]) != wanted[1]:
                bad += 1
            if path == reg.index_file:
                index_reads += 1
            else:
                raw_reads += 1
        if listings % 20 == 0 and reg.index_file.exists():
            # Under the shared lock no change is half done: the index
            # matches active/ exactly.
            with reg._shared():
                index = _load(reg.index_file)
                names = [n for n in _listing(reg.active_dir) if not n.startswith(".")]
            locked_reads += 1
            holders = sorted(e["instance_id"] + ".json" for e in index["active_sessions"].values())
            if holders != sorted(names):
                bad += 1
        time.sleep(0.001)  # leave the two cores to the writers
    conn.send((listings, raw_reads, index_reads, locked_reads, bad, warned.count))
    conn.close()


# --------------------------------------------------------------------------
# Construction and paths
# --------------------------------------------------------------------------
def test_default_directory_is_under_cwd_and_created_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    reg = SessionRegistry()
    assert reg.registry_dir == tmp_path / ".htmlgraph" / "sessions" / "registry"
    assert reg.registry_dir == tmp_path / SessionRegistry.DEFAULT_REGISTRY_SUBPATH
    assert (
        reg.active_dir
        == reg.registry_dir / SessionRegistry.ACTIVE_DIR
        == reg.registry_dir / "active"
    )
    assert (
        reg.archive_dir
        == reg.registry_dir / "archive"
        == reg.registry_dir / SessionRegistry.ARCHIVE_DIR
    )
    assert (
        reg.index_file
        == reg.registry_dir / ".index.json"
        == reg.registry_dir / SessionRegistry.INDEX_FILE
    )
    assert _listing(reg.registry_dir) == {"active", "archive"}
    assert _listing(reg.active_dir) == _listing(reg.archive_dir) == set()
    # A second construction on an existing registry is fine and changes nothing.
    SessionRegistry()
    assert _listing(reg.registry_dir) == {"active", "archive"}


def test_create_false_touches_nothing_until_the_first_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    reg = SessionRegistry(create=False)
    assert reg.get_current_sessions() == []
    assert reg.get_index() == {}
    assert reg.read_session(reg.get_instance_id()) is None
    assert reg.update_activity(reg.get_instance_id()) is False
    assert reg.archive_session(reg.get_instance_id()) is False
    assert reg.reap_stale() == []
    assert reg.find_session("nope") is None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", [str, Path])
def test_registry_dir_accepts_str_and_path_and_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: type[str] | type[Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    reg = SessionRegistry(kind("reg"))
    monkeypatch.chdir("/")
    assert reg.registry_dir == tmp_path / "reg"
    register(reg, "s1")
    assert (tmp_path / "reg" / "active" / f"{reg.get_instance_id()}.json").is_file()
    assert "reg" in repr(reg)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"registry_dir": b"bytes"}, TypeError),
        ({"registry_dir": 3}, TypeError),
        ({"lock_timeout": "1"}, TypeError),
        ({"lock_timeout": True}, TypeError),
        ({"lock_timeout": -1.0}, ValueError),
        ({"lock_timeout": float("nan")}, ValueError),
    ],
)
def test_constructor_rejects_bad_arguments(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        SessionRegistry(**{"registry_dir": tmp_path / "r", **kwargs})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("durable", [True, False])
def test_first_change_creates_the_registry_directories_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    synced: list[str] = []
    real = _platform.fsync_dir

    def recording(path: str) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(_platform, "fsync_dir", recording)
    reg = SessionRegistry(tmp_path / "a" / "b" / "registry", durable=durable)
    register(reg, "s1")
    parents = [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    assert synced[:3] == (parents if durable else [])
    assert_consistent(reg)


def test_registry_path_that_is_a_file_raises(tmp_path: Path) -> None:
    (tmp_path / "registry").write_text("a file", encoding="utf-8")
    with pytest.raises(FileExistsError):
        SessionRegistry(tmp_path / "registry")
    reg = SessionRegistry(tmp_path / "registry", create=False)
    with pytest.raises(FileExistsError):
        register(reg, "s1")
    assert (tmp_path / "registry").read_text(encoding="utf-8") == "a file"


def test_construction_raises_oserror_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root ignores permissions, so the refusal is injected at the one mkdir.
    real = Path.mkdir
    calls: list[Path] = []

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        calls.append(self)
        if self.name == "archive":
            raise PermissionError(13, "Permission denied", str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PermissionError) as info:
        SessionRegistry(tmp_path / "registry")
    assert info.value.filename == str(tmp_path / "registry" / "archive")
    assert calls[-1].name == "archive"


def _register_from_pickle(reg: SessionRegistry, conn: Connection) -> None:
    conn.send(register(reg, "from-child"))
    conn.close()


def test_registry_pickles_to_another_process(reg: SessionRegistry) -> None:
    register(reg, "s1")  # the parent's locker exists now
    clone = pickle.loads(pickle.dumps(reg))
    assert (clone.registry_dir, clone.lock_timeout, clone.durable) == (
        reg.registry_dir,
        reg.lock_timeout,
        reg.durable,
    )
    ctx: Any = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_register_from_pickle, args=(reg, sender))
    proc.start()
    sender.close()
    assert receiver.poll(JOIN_TIMEOUT)
    child_id = receiver.recv()
    proc.join(JOIN_TIMEOUT)
    assert proc.exitcode == 0
    assert reg.get_index()["from-child"]["instance_id"] == child_id != reg.get_instance_id()
    assert_consistent(reg)


def test_get_session_file_path(reg: SessionRegistry) -> None:
    path = reg.get_session_file_path("inst-1-host-99")
    assert path == reg.active_dir / "inst-1-host-99.json"
    assert not path.exists()  # no existence check


# --------------------------------------------------------------------------
# Unsafe ids and bad input: rejected before touching the disk
# --------------------------------------------------------------------------
@pytest.mark.parametrize("bad", UNSAFE_IDS)
@pytest.mark.parametrize(
    "method",
    [
        "register_session",
        "read_session",
        "update_activity",
        "archive_session",
        "get_session_file_path",
        "find_session",
    ],
)
def test_unsafe_ids_raise_value_error_naming_the_id(tmp_path: Path, method: str, bad: str) -> None:
    reg = SessionRegistry(tmp_path / "registry", create=False)
    with pytest.raises(ValueError, match="unsafe") as info:
        getattr(reg, method)(bad)
    shown = repr(bad)
    assert (shown if len(shown) <= 80 else shown[:77]) in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", [None, 5, b"bytes", ["list"]])
@pytest.mark.parametrize(
    "method", ["register_session", "read_session", "update_activity", "archive_session"]
)
def test_non_string_ids_raise_type_error(tmp_path: Path, method: str, bad: object) -> None:
    reg = SessionRegistry(tmp_path / "registry", create=False)
    with pytest.raises(TypeError, match="must be a str") as info:
        getattr(reg, method)(bad)
    assert isinstance(info.value, ValueError)  # htmlgraph documents ValueError
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("good", SAFE_IDS)
def test_safe_session_ids_are_accepted(reg: SessionRegistry, good: str) -> None:
    iid = register(reg, good)
    record = reg.read_session(iid)
    assert record is not None
    assert record["session_id"] == good
    assert reg.find_session(good) == record
    assert_consistent(reg)


@pytest.mark.parametrize(
    ("repo", "instance", "error"),
    [
        ("a string", None, TypeError),
        (None, ["a", "list"], TypeError),
        ({"x": object()}, None, TypeError),
        ({1: "int key"}, None, TypeError),
        ({"nan": float("nan")}, None, ValueError),
        (None, {"inf": float("inf")}, ValueError),
    ],
)
def test_register_rejects_bad_info_before_touching_disk(
    tmp_path: Path, repo: Any, instance: Any, error: type[Exception]
) -> None:
    reg = SessionRegistry(tmp_path / "registry", create=False)
    with pytest.raises(error, match=r"repo|instance"):
        register(reg, "s1", repo_info=repo, instance_info=instance)
    assert os.listdir(tmp_path) == []


def test_circular_info_is_rejected(tmp_path: Path) -> None:
    loop: dict[str, object] = {}
    loop["self"] = loop
    reg = SessionRegistry(tmp_path / "registry", create=False)
    with pytest.raises(ValueError, match="instance"):
        register(reg, "s1", instance_info=loop)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("max_idle", "error"), [(-1, ValueError), ("1", TypeError)])
def test_reap_rejects_bad_max_idle(
    reg: SessionRegistry, max_idle: Any, error: type[Exception]
) -> None:
    register(reg, "s1")
    with pytest.raises(error, match="max_idle"):
        reg.reap_stale(max_idle=max_idle)
    assert reg.read_session(reg.get_instance_id()) is not None


# --------------------------------------------------------------------------
# Instance ids
# --------------------------------------------------------------------------
def test_instance_id_is_inst_pid_hostname_start(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = socket.gethostname()
    iid = reg.get_instance_id()
    assert (
        iid
        == reg.get_instance_id()
        == SessionRegistry(Path("elsewhere"), create=False).get_instance_id()
    )
    prefix = f"inst-{os.getpid()}-{host}-"
    assert iid.startswith(prefix)
    start = iid[len(prefix) :]
    assert start.isdigit()
    assert session_registry._id_problem(iid) is None
    if session_registry._process_start_seconds(os.getpid()) is not None:
        # The process start time, not the clock at the first call.
        assert int(start) == session_registry._process_start_seconds(os.getpid())
        assert int(start) <= int(time.time())
        monkeypatch.setattr(session_registry, "_instance_cache", None)
        monkeypatch.setattr(time, "time", lambda: 4_000_000_000.0)
        assert reg.get_instance_id() == iid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_start_seconds_matches_the_kernel(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        started = session_registry._process_start_seconds(proc.pid)
        assert started is not None
        assert abs(started - time.time()) < 60
        assert started >= (session_registry._process_start_seconds(os.getpid()) or 0)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(JOIN_TIMEOUT) == 0


def test_instance_ids_differ_across_simulated_hosts(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}
    hosts = [
        "host-a",
        "db.example.com",
        "db_example_com",
        "",
        "ünïcode/host",
        "ünïcode_host",
        "tab\there",
        "x" * 253,
    ]
    for host in hosts:
        monkeypatch.setattr(session_registry, "_hostname", lambda host=host: host)
        iid = reg.get_instance_id()
        assert session_registry._id_problem(iid) is None, iid
        seen[host] = iid
    assert len(set(seen.values())) == len(seen)
    # Safe host names are kept as they are; only unsafe ones are changed.
    for host in ("host-a", "db.example.com", "db_example_com", "ünïcode_host"):
        assert f"-{host}-" in seen[host]
    assert "/" not in seen["ünïcode/host"]
    assert seen["ünïcode/host"].startswith(f"inst-{os.getpid()}-ünïcode_host~")


def test_instance_id_without_start_time_uses_the_import_time(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def no_token(pid: int) -> None:
        calls.append(pid)

    monkeypatch.setattr(session_registry, "_own_start_token", no_token)
    iid = reg.get_instance_id()
    assert calls == [os.getpid()]
    assert iid.endswith(f"-{session_registry._IMPORT_SECONDS}")
    assert reg.get_instance_id() == iid


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs os.fork")
def test_instance_id_is_recomputed_in_a_forked_child(reg: SessionRegistry) -> None:
    parent_id = reg.get_instance_id()  # cached before the fork
    ctx: Any = mp.get_context("fork")
    ids = []
    for _ in range(2):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_report_instance_id, args=(sender,))
        proc.start()
        sender.close()
        assert receiver.poll(JOIN_TIMEOUT)
        pid, first, second = receiver.recv()
        proc.join(JOIN_TIMEOUT)
        assert proc.exitcode == 0
        assert pid == proc.pid
        assert first == second
        assert f"-{pid}-" in first
        ids.append(first)
    assert len({parent_id, *ids}) == 3
    assert reg.get_instance_id() == parent_id


# --------------------------------------------------------------------------
# register / read / heartbeat / archive
# --------------------------------------------------------------------------
def test_register_writes_record_and_index(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    iid = register(reg, "s1", repo_info={"path": "/r", "branch": "main"}, instance_info={"a": 1})
    assert iid == reg.get_instance_id()
    record = reg.read_session(iid)
    assert record is not None
    # htmlgraph's fields first, in its order; ours beside them.
    assert list(record) == [
        "instance_id",
        "session_id",
        "created",
        "repo",
        "instance",
        "status",
        "last_activity",
        "format",
        "hostname",
        "pid",
        "process_start",
        "pid_namespace",
    ]
    assert record["format"] == 2
    assert record["status"] == "active"
    assert TIMESTAMP.fullmatch(record["created"])
    assert record["instance_id"] == iid
    assert record["session_id"] == "s1"
    assert record["pid"] == os.getpid()
    assert record["hostname"] == session_registry._hostname()
    assert record["process_start"] == session_registry._own_start_token(os.getpid())
    assert record["pid_namespace"] == _platform.pid_namespace()
    assert record["created"] == record["last_activity"]
    assert record["repo"] == {"path": "/r", "branch": "main"}
    assert record["instance"] == {"a": 1}
    assert _load(reg.get_session_file_path(iid)) == record
    assert reg.get_index() == {
        "s1": {"instance_id": iid, "created": record["created"], "last_activity": record["created"]}
    }
    assert reg.get_current_sessions() == [record]
    assert reg.process_state(record) == "alive"
    assert_consistent(reg)


def test_register_again_same_session_keeps_created(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    monkeypatch.setattr(session_registry, "_utcnow", lambda: t0)
    iid = register(reg, "s1", repo_info={"v": 1})
    monkeypatch.setattr(session_registry, "_utcnow", lambda: t0 + timedelta(seconds=5))
    assert register(reg, "s1", repo_info={"v": 2}) == iid
    record = reg.read_session(iid)
    assert record is not None
    assert record["created"] == ts(t0) == "2030-01-01T00:00:00.000000Z"
    assert record["last_activity"] == ts(t0 + timedelta(seconds=5))
    assert record["repo"] == {"v": 2}
    assert _listing(reg.archive_dir) == set()
    assert_consistent(reg)


def test_register_with_new_session_archives_the_previous_one(reg: SessionRegistry) -> None:
    iid = register(reg, "old")
    register(reg, "new")
    assert set(reg.get_index()) == {"new"}
    assert _listing(reg.archive_dir) == {f"{iid}.json"}
    data = _load(reg.archive_dir / f"{iid}.json")
    assert data["session_id"] == "old"
    assert data["archive_reason"] == "re-registered"
    assert reg.find_session("old") is None
    assert_consistent(reg)


def test_read_session_missing_is_none(reg: SessionRegistry) -> None:
    assert reg.read_session("nobody") is None
    register(reg, "s1")
    assert reg.read_session("nobody") is None


def test_update_activity_advances_record_and_index(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    monkeypatch.setattr(session_registry, "_utcnow", lambda: t0)
    iid = register(reg, "s1")
    monkeypatch.setattr(session_registry, "_utcnow", lambda: t0 + timedelta(minutes=3))
    assert reg.update_activity(iid) is True
    record = reg.read_session(iid)
    assert record is not None
    assert record["created"] == ts(t0)
    assert record["last_activity"] == ts(t0 + timedelta(minutes=3))
    assert reg.get_index()["s1"]["last_activity"] == record["last_activity"]
    assert_consistent(reg)


def test_update_activity_of_unknown_or_archived_instance_is_false(reg: SessionRegistry) -> None:
    assert reg.update_activity("nobody") is False
    iid = register(reg, "s1")
    assert reg.archive_session(iid) is True
    assert reg.update_activity(iid) is False
    assert not reg.get_session_file_path(iid).exists()  # not resurrected
    assert_consistent(reg)


def test_archive_session(reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    monkeypatch.setattr(session_registry, "_utcnow", lambda: t0)
    iid = register(reg, "s1", repo_info={"r": 1})
    before = reg.read_session(iid)
    assert reg.archive_session(iid) is True
    assert reg.read_session(iid) is None
    assert reg.get_current_sessions() == []
    assert reg.get_index() == {}
    assert _listing(reg.active_dir) == set()
    assert _listing(reg.archive_dir) == {f"{iid}.json"}
    data = _load(reg.archive_dir / f"{iid}.json")
    assert data == {**dict(before or {}), "archived": ts(t0), "archive_reason": "archived"}
    assert data["archived"] == "2030-01-02T03:04:05.678901Z"
    assert reg.archive_session(iid) is False
    assert_consistent(reg)


def test_a_second_archive_keeps_the_first_under_another_name(reg: SessionRegistry) -> None:
    iid = register(reg, "s1", repo_info={"n": 1})
    assert reg.archive_session(iid)
    first = (reg.archive_dir / f"{iid}.json").read_bytes()
    stamp = datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp()
    os.utime(reg.archive_dir / f"{iid}.json", (stamp, stamp))
    names = []
    for n in (2, 3):
        register(reg, "s1", repo_info={"n": n})
        assert reg.archive_session(iid)
        names.append(_listing(reg.archive_dir))
    # The latest is always archive/{id}.json; earlier ones are moved aside,
    # named by when they were archived (their mtime), never overwritten.
    assert names[0] == {f"{iid}.json", f"{iid}-20300101T000000000000Z.json"}
    assert (reg.archive_dir / f"{iid}-20300101T000000000000Z.json").read_bytes() == first
    assert len(names[1]) == 3
    repos = sorted(_load(reg.archive_dir / n)["repo"]["n"] for n in names[1])
    assert repos == [1, 2, 3]
    assert _load(reg.archive_dir / f"{iid}.json")["repo"] == {"n": 3}
    assert_consistent(reg)


def test_get_current_sessions_sorted_and_ignores_temps(reg: SessionRegistry) -> None:
    base = datetime(2030, 1, 1, tzinfo=timezone.utc)
    plant_record(reg, "inst-b", "sb", last_activity=base + timedelta(seconds=2))
    plant_record(reg, "inst-a", "sa", last_activity=base + timedelta(seconds=1))
    plant_record(reg, "inst-c", "sc", last_activity=base + timedelta(seconds=1))
    (reg.active_dir / ".tmp-1-00ff-inst-d.json").write_text("{partial", encoding="utf-8")
    (reg.active_dir / "notes.txt").write_text("not a record", encoding="utf-8")
    assert [r["instance_id"] for r in reg.get_current_sessions()] == ["inst-a", "inst-c", "inst-b"]


def test_find_session(reg: SessionRegistry) -> None:
    iid = register(reg, "s1")
    plant_record(reg, "other-1", "s2", hostname="elsewhere", pid=1)
    found = reg.find_session("s1")
    assert found is not None
    assert found["instance_id"] == iid
    other = reg.find_session("s2")
    assert other is not None
    assert other["instance_id"] == "other-1"
    assert reg.find_session("s3") is None


def test_threads_sharing_one_registry_lose_no_heartbeat(reg: SessionRegistry) -> None:
    iid = register(reg, "s1")
    errors: list[BaseException] = []
    results: list[bool] = []

    def beat() -> None:
        try:
            for _ in range(5):
                results.append(reg.update_activity(iid))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=beat) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
        assert not thread.is_alive()
    assert errors == []
    assert results == [True] * 30
    assert_consistent(reg)


# --------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------
def test_changes_wait_for_the_lock_and_time_out(tmp_path: Path) -> None:
    reg = SessionRegistry(tmp_path / "registry", lock_timeout=0.2)
    iid = register(reg, "s1")
    before = reg.get_session_file_path(iid).read_bytes()
    index_before = reg.index_file.read_bytes()
    holder = DirectoryLocker(reg.lock_dir)
    with holder.exclusive(timeout=5):
        with pytest.raises(LockTimeout):
            reg.update_activity(iid)
        with pytest.raises(LockTimeout):
            register(reg, "s2")
        with pytest.raises(LockTimeout):
            reg.archive_session(iid)
        with pytest.raises(LockTimeout):
            reg.reap_stale()
        with pytest.raises(LockTimeout):
            reg.get_index()
        # Lock-free readers still answer.
        assert reg.read_session(iid) is not None
        assert len(reg.get_current_sessions()) == 1
    assert reg.get_session_file_path(iid).read_bytes() == before
    assert reg.index_file.read_bytes() == index_before
    assert reg.update_activity(iid) is True
    assert_consistent(reg)


def test_every_change_holds_the_exclusive_lock(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each write of the index must happen while another locker cannot get in.
    probes: list[bool] = []
    real = atomic_ops.atomic_json_write

    def probing_write(path: Any, data: object, **kwargs: Any) -> None:
        probes.append(DirectoryLocker(reg.lock_dir).acquire_shared_lock(timeout=0))
        real(path, data, **kwargs)

    monkeypatch.setattr(session_registry, "atomic_json_write", probing_write)
    iid = register(reg, "s1")
    reg.update_activity(iid)
    reg.archive_session(iid)
    assert probes == [False, False, False]
    assert DirectoryLocker(reg.lock_dir).acquire_shared_lock(timeout=0)


# --------------------------------------------------------------------------
# Reaping
# --------------------------------------------------------------------------
def test_reap_archives_dead_and_pid_reused_instances_only(reg: SessionRegistry) -> None:
    mine = register(reg, "mine")
    plant_record(reg, "dead-1", "s-dead", pid=dead_pid())
    plant_record(reg, "remote-1", "s-remote", hostname="another-host", pid=dead_pid())
    expected = ["dead-1"]
    if session_registry._own_start_token(os.getpid()) is not None:
        # This pid is alive, but not the process that wrote the record.
        plant_record(reg, "reused-1", "s-reused", pid=os.getpid(), process_start="boot:0")
        expected.append("reused-1")
    assert reg.reap_stale(max_idle=None) == expected
    assert set(reg.get_index()) == {"mine", "s-remote"}
    reasons = {
        _load(p)["instance_id"]: _load(p)["archive_reason"] for p in reg.archive_dir.iterdir()
    }
    assert reasons == dict.fromkeys(expected, "process-gone")
    assert reg.read_session(mine) is not None
    assert reg.reap_stale(max_idle=None) == []
    assert_consistent(reg)


def test_reap_archives_idle_instances_on_any_host(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(timezone.utc)
    mine = register(reg, "mine")
    plant_record(
        reg, "remote-old", "s1", hostname="far", pid=7, last_activity=now - timedelta(hours=2)
    )
    plant_record(reg, "remote-new", "s2", hostname="far", pid=8, last_activity=now)
    assert reg.reap_stale(max_idle=None) == []
    assert reg.reap_stale(max_idle=3600) == ["remote-old"]
    (name,) = _listing(reg.archive_dir)
    assert _load(reg.archive_dir / name)["archive_reason"] == "idle"
    # Much later, even this live process's instance counts as idle.
    later = now + timedelta(days=2)
    monkeypatch.setattr(session_registry, "_utcnow", lambda: later)
    assert reg.reap_stale() == sorted([mine, "remote-new"])
    assert reg.get_current_sessions() == []
    assert_consistent(reg)


def test_reap_removes_orphaned_temp_files(reg: SessionRegistry) -> None:
    register(reg, "s1")
    orphan = reg.active_dir / temp_name_for(dead_pid(), "x.json")
    orphan.write_text("{", encoding="utf-8")
    old = time.time() - 2 * 3600
    os.utime(orphan, (old, old))
    fresh = reg.active_dir / temp_name_for(dead_pid(), "y.json")
    fresh.write_text("{", encoding="utf-8")
    assert reg.reap_stale(max_idle=None) == []
    assert not orphan.exists()
    assert fresh.exists()  # too young to be sure it is abandoned
    fresh.unlink()
    assert_consistent(reg)


def test_session_conflict_with_live_holder_then_takeover(reg: SessionRegistry) -> None:
    proc, pipe, holder = start_holder(reg.registry_dir, "shared")
    try:
        with pytest.raises(SessionConflictError) as info:
            register(reg, "shared")
        err = info.value
        assert isinstance(err, ValueError)
        assert (err.session_id, err.instance_id) == ("shared", holder)
        assert holder in str(err)
        clone = pickle.loads(pickle.dumps(err))
        assert (type(clone), clone.session_id, clone.instance_id) == (type(err), "shared", holder)
        assert str(clone) == str(err)
        assert reg.read_session(reg.get_instance_id()) is None
    finally:
        pipe.send("stop")
        proc.join(JOIN_TIMEOUT)
    assert proc.exitcode == 0
    # The holder is gone now: the session is taken over, its record archived.
    mine = register(reg, "shared")
    assert reg.get_index()["shared"]["instance_id"] == mine
    (name,) = _listing(reg.archive_dir)
    data = _load(reg.archive_dir / name)
    assert (data["instance_id"], data["archive_reason"]) == (holder, "superseded")
    assert_consistent(reg)


def test_session_held_on_another_host_is_a_conflict(reg: SessionRegistry) -> None:
    plant_record(reg, "remote-1", "s1", hostname="another-host", pid=dead_pid())
    with pytest.raises(SessionConflictError):
        register(reg, "s1")
    assert_consistent(reg)


# --------------------------------------------------------------------------
# Corruption: reported, skipped, rebuilt; never a crash
# --------------------------------------------------------------------------
CORRUPT_INDEXES = {
    "truncated": None,  # filled in from a real index below
    "empty": b"",
    "garbage": b"\x00\xff\xfegarbage{{{",
    "not-utf8": b'{"format": 1, "sessions": {"\xff": {}}}',
    "a-list": b"[1, 2, 3]",
    "deep": b"[" * 100000,
    "no-format": b'{"sessions": {}}',
    "format-string": b'{"format": "1", "sessions": {}}',
    "sessions-list": b'{"format": 1, "sessions": []}',
    "entry-not-object": b'{"format": 1, "sessions": {"s": 5}}',
    "instance-int": b'{"format": 1, "sessions": {"s": {"instance_id": 5, "created": "x"}}}',
}
# Readable, but naming other sessions or instances than the records: rewritten.
STALE_INDEXES = {
    "bad-time": (
        b'{"format": 1, "sessions": {"s": {"instance_id": "i", "created": "yesterday",'
        b' "last_activity": "now"}}}'
    ),
    "unsafe-session": (
        b'{"format": 1, "sessions": {"../x": {"instance_id": "i",'
        b' "created": "2030-01-01T00:00:00+00:00", "last_activity": "2030-01-01T00:00:00+00:00"}}}'
    ),
    "two-sessions-one-instance": (
        b'{"format": 1, "sessions": {'
        b'"s1": {"instance_id": "i", "created": "2030-01-01T00:00:00+00:00",'
        b' "last_activity": "2030-01-01T00:00:00+00:00"},'
        b'"s2": {"instance_id": "i", "created": "2030-01-01T00:00:00+00:00",'
        b' "last_activity": "2030-01-01T00:00:00+00:00"}}}'
    ),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT_INDEXES) + sorted(STALE_INDEXES))
@pytest.mark.parametrize("next_use", ["get_index", "update_activity", "register", "find"])
def test_corrupt_index_is_rebuilt_with_a_warning(
    reg: SessionRegistry, caplog: pytest.LogCaptureFixture, kind: str, next_use: str
) -> None:
    iid = register(reg, "s1")
    plant_record(reg, "remote-1", "s2", hostname="far", pid=1)
    good = reg.index_file.read_bytes()
    corrupt = CORRUPT_INDEXES[kind] if kind in CORRUPT_INDEXES else STALE_INDEXES[kind]
    reg.index_file.write_bytes(good[: len(good) // 2] if corrupt is None else corrupt)
    assert len(reg.get_current_sessions()) == 2  # listing never needs the index
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        if next_use == "get_index":
            assert set(reg.get_index()) == {"s1", "s2"}
        elif next_use == "update_activity":
            assert reg.update_activity(iid) is True
        elif next_use == "register":
            register(reg, "s1")
        else:
            found = reg.find_session("s2")
            assert found is not None
            assert found["instance_id"] == "remote-1"
    if kind in CORRUPT_INDEXES:
        assert any("rebuilt session index" in m and "corrupt" in m for m in warnings_of(caplog))
    else:
        assert any("out of step" in m for m in warnings_of(caplog))
    assert_consistent(reg)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert set(reg.get_index()) == {"s1", "s2"}
    assert warnings_of(caplog) == []  # repaired once, for good


def test_missing_index_is_rebuilt_from_active(
    reg: SessionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    iid = register(reg, "s1")
    reg.index_file.unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert reg.get_index()["s1"]["instance_id"] == iid
    assert any("missing" in m for m in warnings_of(caplog))
    assert_consistent(reg)


def test_fresh_registry_rebuilds_without_warning(
    reg: SessionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        iid = register(reg, "s1")
        assert reg.archive_session(iid)
        assert reg.get_index() == {}
    assert warnings_of(caplog) == []
    assert_consistent(reg)


CORRUPT_RECORDS = {
    "truncated": b'{"format": 1, "instance_id": "vic',
    "empty": b"",
    "garbage": b"\x89PNG\r\n\x1a\n",
    "a-list": b"[]",
    "not-utf8": b'{"session_id": "\xff"}',
    "no-session": b'{"instance_id": "victim", "status": "active"}',
    "session-int": b'{"instance_id": "victim", "session_id": 5}',
    "session-empty": b'{"instance_id": "victim", "session_id": ""}',
}
# Odd but readable: another tool's record, kept, listed, never judged dead.
ODD_RECORDS = {
    "pid-string": None,  # a valid record with one wrong type, built below
    "pid-zero": None,
    "no-format": None,
    "hostname-int": None,
    "start-int": None,
    "namespace-int": None,
    "naive-time": None,
    "repo-list": None,
    "wrong-instance": None,
    "unsafe-session": None,
}


def _broken_record(kind: str) -> bytes:
    record: dict[str, Any] = {
        "format": 1,
        "instance_id": "victim",
        "session_id": "sv",
        "hostname": "far",
        "pid": 1,
        "process_start": None,
        "created": "2030-01-01T00:00:00+00:00",
        "last_activity": "2030-01-01T00:00:00+00:00",
        "repo": None,
        "instance": None,
    }
    if kind == "pid-string":
        record["pid"] = "1"
    elif kind == "wrong-instance":
        record["instance_id"] = "someone-else"
    elif kind == "unsafe-session":
        record["session_id"] = "../../etc"
    elif kind == "pid-zero":
        record["pid"] = 0
    elif kind == "no-format":
        del record["format"]
    elif kind == "hostname-int":
        record["hostname"] = 5
    elif kind == "start-int":
        record["process_start"] = 17
    elif kind == "namespace-int":
        record["pid_namespace"] = 17
    elif kind == "naive-time":
        record["created"] = "2030-01-01T00:00:00"
    elif kind == "repo-list":
        record["repo"] = ["not", "an", "object"]
    return json.dumps(record).encode()


@pytest.mark.parametrize("kind", sorted(CORRUPT_RECORDS))
def test_corrupt_record_is_skipped_then_quarantined(
    reg: SessionRegistry, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    iid = register(reg, "s1")
    plant_record(reg, "victim", "sv", hostname="far", pid=1)
    content = CORRUPT_RECORDS[kind]
    (reg.active_dir / "victim.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert [r["instance_id"] for r in reg.get_current_sessions()] == [iid]
        assert reg.read_session("victim") is None
    assert sum("unreadable session record" in m for m in warnings_of(caplog)) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert reg.update_activity("victim") is False
    assert any("moved unreadable session record" in m for m in warnings_of(caplog))
    (quarantined,) = _listing(reg.archive_dir)
    assert (reg.archive_dir / quarantined).read_bytes() == content  # moved, not lost
    assert set(reg.get_index()) == {"s1"}
    (quarantined,) = _listing(reg.archive_dir)
    assert quarantined.startswith("victim-")
    assert quarantined.endswith(".corrupt")
    assert_consistent(reg, allow_corrupt=True)


def test_corrupt_record_found_by_rebuild_is_quarantined(
    reg: SessionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    register(reg, "s1")
    (reg.active_dir / "junk.json").write_bytes(b"not json")
    (reg.active_dir / ".dotfile.json").write_bytes(b"ignored: not ours")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert set(reg.get_index()) == {"s1"}
    messages = warnings_of(caplog)
    assert any("moved unreadable" in m for m in messages)
    (reg.active_dir / ".dotfile.json").unlink()
    assert_consistent(reg, allow_corrupt=True)


def test_record_that_is_a_directory_is_quarantined(
    reg: SessionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    register(reg, "s1")
    (reg.active_dir / "odd.json").mkdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(reg.get_current_sessions()) == 1
        assert set(reg.get_index()) == {"s1"}
    assert any("is a directory" in m for m in warnings_of(caplog))
    (quarantined,) = _listing(reg.archive_dir)
    assert (reg.archive_dir / quarantined).is_dir()
    assert quarantined.startswith("odd-")
    assert_consistent(reg, allow_corrupt=True)


def test_odd_file_names_in_active_are_records_like_any_other(reg: SessionRegistry) -> None:
    # Another tool may name its records as it likes: readable means kept.
    register(reg, "s1")
    for n, name in enumerate(("CON", "a:b", "trailing ")):
        now = ts(datetime.now(timezone.utc))
        record = {
            "instance_id": name,
            "session_id": f"odd-{n}",
            "created": now,
            "last_activity": now,
        }
        (reg.active_dir / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")
    assert set(reg.get_index()) == {"s1", "odd-0", "odd-1", "odd-2"}
    assert len(reg.get_current_sessions()) == 4
    assert _listing(reg.archive_dir) == set()
    assert_consistent(reg)


def test_two_records_claiming_one_session_are_both_kept(reg: SessionRegistry) -> None:
    # htmlgraph's own tools let two instances claim one session: neither is
    # archived (either may be alive); the index names the newest heartbeat,
    # and keeps naming whichever it named as long as that record exists.
    now = datetime.now(timezone.utc)
    plant_record(reg, "old-1", "s1", hostname="far", pid=1, last_activity=now)
    plant_record(reg, "new-1", "s1", hostname="far", pid=2, last_activity=now + timedelta(1))
    reg.index_file.unlink()
    assert reg.get_index()["s1"]["instance_id"] == "new-1"
    assert reg.update_activity("old-1") is True
    assert reg.get_index()["s1"]["instance_id"] == "new-1"
    assert {r["instance_id"] for r in reg.get_current_sessions()} == {"old-1", "new-1"}
    assert _listing(reg.archive_dir) == set()
    assert reg.archive_session("new-1") is True
    assert reg.get_index()["s1"]["instance_id"] == "old-1"


def test_register_repairs_an_entry_that_disagrees_with_its_record(
    reg: SessionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    plant_record(reg, "remote-1", "wanted", hostname="far", pid=1)
    path = reg.get_session_file_path("remote-1")
    record = _load(path)
    record["session_id"] = "moved-on"  # behind the index's back
    path.write_text(json.dumps(record), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        mine = register(reg, "wanted")  # not a conflict: nobody holds it
    assert any("out of step" in m for m in warnings_of(caplog))
    index = reg.get_index()
    assert index["wanted"]["instance_id"] == mine
    assert index["moved-on"]["instance_id"] == "remote-1"
    assert_consistent(reg)


# --------------------------------------------------------------------------
# Crash ordering: each intermediate state of an archive is repaired
# --------------------------------------------------------------------------
def test_crash_after_archive_copy_leaves_instance_active(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    iid = register(reg, "s1")
    hits = []

    def crash_on_unlink(path: Path) -> None:
        hits.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(session_registry, "_remove", crash_on_unlink)
    with pytest.raises(KeyboardInterrupt):
        reg.archive_session(iid)
    monkeypatch.undo()
    assert hits == [reg.get_session_file_path(iid)]
    # The copy is in archive/, the record still active and indexed.
    assert len(_listing(reg.archive_dir)) == 1
    assert reg.read_session(iid) is not None
    assert_consistent(reg)
    assert reg.archive_session(iid) is True
    assert len(_listing(reg.archive_dir)) == 2
    assert_consistent(reg)


def test_archive_removes_through_the_platform_unlink(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _platform.unlink retries Windows sharing violations (a lock-free reader
    # holding the record open); once it gives up, nothing is lost.
    iid = register(reg, "s1")
    calls: list[str] = []

    def still_busy(path: str) -> None:
        calls.append(path)
        raise PermissionError(13, "The process cannot access the file", path)

    monkeypatch.setattr(_platform, "unlink", still_busy)
    with pytest.raises(PermissionError):
        reg.archive_session(iid)
    assert calls == [str(reg.get_session_file_path(iid))]
    monkeypatch.undo()
    # Stopped between the archive copy and the unlink: still active.
    assert reg.read_session(iid) is not None
    assert len(_listing(reg.archive_dir)) == 1
    assert_consistent(reg)
    assert reg.archive_session(iid) is True
    assert_consistent(reg)


def test_crash_before_index_update_is_repaired(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    iid = register(reg, "s1")
    other = plant_record(reg, "remote-1", "s2", hostname="far", pid=1)
    hits = []

    def crash(path: Any, data: object, **kwargs: Any) -> None:
        hits.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(session_registry, "atomic_json_write", crash)
    with pytest.raises(OSError, match="No space"):
        reg.archive_session(iid)
    monkeypatch.undo()
    assert hits == [reg.index_file]
    assert not reg.get_session_file_path(iid).exists()
    assert "s1" in _load(reg.index_file)["active_sessions"]  # stale
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert set(reg.get_index()) == {"s2"}
    assert any("out of step" in m for m in warnings_of(caplog))
    assert reg.find_session("s2") == other
    assert_consistent(reg)


def test_record_whose_session_changed_behind_the_index(
    reg: SessionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    iid = register(reg, "first")
    # register() itself never leaves this (it finishes the archive of the old
    # session, index included, first), but a foreign writer or a hand edit can.
    path = reg.get_session_file_path(iid)
    record = _load(path)
    record["session_id"] = "second"
    path.write_text(json.dumps(record), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert reg.find_session("first") is None
        found = reg.find_session("second")
    assert found is not None
    assert found["instance_id"] == iid
    assert any("out of step" in m for m in warnings_of(caplog))
    assert_consistent(reg)


# --------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_then_reap_archives_exactly_that_instance(reg: SessionRegistry) -> None:
    procs, pipes, ids = [], [], []
    for n in range(3):
        proc, pipe, instance_id = start_holder(reg.registry_dir, f"kill-{n}")
        procs.append(proc)
        pipes.append(pipe)
        ids.append(instance_id)
    try:
        assert reg.reap_stale(max_idle=None) == []
        procs[1].kill()
        procs[1].join(JOIN_TIMEOUT)
        assert procs[1].exitcode == -9
        assert reg.reap_stale(max_idle=None) == [ids[1]]
        assert {r["instance_id"] for r in reg.get_current_sessions()} == {ids[0], ids[2]}
        assert set(reg.get_index()) == {"kill-0", "kill-2"}
        (name,) = _listing(reg.archive_dir)
        data = _load(reg.archive_dir / name)
        assert (data["instance_id"], data["archive_reason"]) == (ids[1], "process-gone")
        assert_consistent(reg)
    finally:
        for pipe, proc in zip(pipes, procs, strict=True):
            if proc.is_alive():
                pipe.send("stop")
        for proc in procs:
            proc.join(JOIN_TIMEOUT)
    assert [p.exitcode for p in procs] == [0, -9, 0]
    # The survivors exited without archiving: now they are gone too.
    assert reg.reap_stale(max_idle=None) == sorted([ids[0], ids[2]])
    assert_consistent(reg)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombie state is read from /proc")
def test_killed_but_unwaited_process_counts_as_gone(reg: SessionRegistry) -> None:
    proc, pipe, victim = start_holder(reg.registry_dir, "zombie")
    try:
        proc.kill()
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not _platform.pid_is_zombie(proc.pid or 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _platform.pid_exists(proc.pid or 0)  # not waited for yet: a zombie
        assert reg.reap_stale(max_idle=None) == [victim]
    finally:
        proc.join(JOIN_TIMEOUT)
        pipe.close()
    assert proc.exitcode == -9
    assert_consistent(reg)


def test_records_from_another_pid_namespace_are_not_judged(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_platform, "pid_namespace", lambda: "pid:[4026531836]")
    gone = dead_pid()
    plant_record(reg, "other-ns", "s1", pid=gone, pid_namespace="pid:[4026532999]")
    plant_record(reg, "same-ns", "s2", pid=gone, pid_namespace="pid:[4026531836]")
    plant_record(reg, "no-ns", "s3", pid=gone)  # written where namespaces are unknown
    states = {r["instance_id"]: reg.process_state(r) for r in reg.get_current_sessions()}
    assert states == {"other-ns": "unknown", "same-ns": "gone", "no-ns": "gone"}
    assert reg.reap_stale(max_idle=None) == ["no-ns", "same-ns"]
    assert_consistent(reg)


def run_churn(registry_dir: Path, workers: int, heartbeats: int) -> dict[str, Any]:
    barrier = mp.Barrier(workers)
    ready, stop = mp.Event(), mp.Event()
    reader_rx, reader_tx = mp.Pipe(duplex=False)
    reader = mp.Process(target=_reader, args=(str(registry_dir), ready, stop, reader_tx))
    reader.start()
    reader_tx.close()
    assert ready.wait(JOIN_TIMEOUT)
    pipes, procs = [], []
    for n in range(workers):
        rx, tx = mp.Pipe(duplex=False)
        proc = mp.Process(
            target=_churn_worker,
            args=(str(registry_dir), n, heartbeats, n % 2 == 0, barrier, tx),
        )
        proc.start()
        tx.close()
        pipes.append(rx)
        procs.append(proc)
    started = time.monotonic()
    results = []
    try:
        for rx in pipes:
            assert rx.poll(JOIN_TIMEOUT)
            results.append(rx.recv())
    finally:
        for proc in procs:
            proc.join(JOIN_TIMEOUT)
        stop.set()
        reader.join(JOIN_TIMEOUT)
    elapsed = time.monotonic() - started
    assert [p.exitcode for p in procs] == [0] * workers
    assert reader.exitcode == 0
    assert reader_rx.poll(JOIN_TIMEOUT)
    listings, raw_reads, index_reads, locked_reads, bad, warned = reader_rx.recv()
    return {
        "results": results,
        "elapsed": elapsed,
        "listings": listings,
        "raw_reads": raw_reads,
        "index_reads": index_reads,
        "locked_reads": locked_reads,
        "bad": bad,
        "warned": warned,
    }


def check_churn(reg: SessionRegistry, run: dict[str, Any], workers: int, heartbeats: int) -> None:
    results = run["results"]
    assert len(results) == workers
    assert all(ok == heartbeats for _, _, ok, _ in results)
    ids = [iid for _, iid, _, _ in results]
    assert len(set(ids)) == workers, "instance ids collided"
    kept = {sid: iid for sid, iid, _, archived in results if not archived}
    gone = {iid for _, iid, _, archived in results if archived}
    assert len(kept) == len(gone) == workers // 2
    # The index and active/ agree exactly: no entry lost, none duplicated.
    assert _listing(reg.active_dir) == {f"{iid}.json" for iid in kept.values()}
    index = reg.get_index()
    assert {sid: e["instance_id"] for sid, e in index.items()} == kept
    for record in reg.get_current_sessions():
        assert record["last_activity"] >= record["created"]
    archived = [_load(p) for p in reg.archive_dir.iterdir()]
    assert sorted(a["instance_id"] for a in archived) == sorted(gone)
    assert {a["archive_reason"] for a in archived} == {"archived"}
    assert_consistent(reg)
    # The concurrent reader read plenty and never saw a partial or corrupt file.
    assert run["listings"] > 0
    assert run["raw_reads"] > 0
    assert run["bad"] == 0
    assert run["warned"] == 0


@pytest.mark.slow
def test_32_processes_register_heartbeat_archive_at_once(tmp_path: Path) -> None:
    reg = SessionRegistry(tmp_path / "registry")
    run = run_churn(reg.registry_dir, workers=32, heartbeats=20)
    print(
        f"\n32x(register + 20 heartbeats) + 16 archives: {run['elapsed']:.1f}s;"
        f" reader: {run['listings']} listings, {run['raw_reads']} record reads,"
        f" {run['index_reads']} index reads, {run['locked_reads']} locked index reads"
    )
    check_churn(reg, run, workers=32, heartbeats=20)


def test_8_processes_register_heartbeat_archive_at_once(tmp_path: Path) -> None:
    reg = SessionRegistry(tmp_path / "registry", durable=False)
    run = run_churn(reg.registry_dir, workers=8, heartbeats=5)
    check_churn(reg, run, workers=8, heartbeats=5)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_at_random_instants_of_changes_is_repaired(tmp_path: Path) -> None:
    import random

    reg = SessionRegistry(tmp_path / "registry")
    far = datetime.now(timezone.utc) + timedelta(days=365)
    bystanders = {
        plant_record(reg, f"bystander-{n}", f"by-{n}", hostname="far", pid=1, last_activity=far)[
            "instance_id"
        ]
        for n in range(2)
    }
    rounds, repaired = 25, 0
    for _ in range(rounds):
        parent, child = mp.Pipe()
        proc = mp.Process(target=_crash_worker, args=(str(reg.registry_dir), child))
        proc.start()
        child.close()
        assert parent.poll(JOIN_TIMEOUT)
        assert parent.recv() == "ready"
        time.sleep(random.uniform(0.005, 0.15))
        proc.kill()
        proc.join(JOIN_TIMEOUT)
        parent.close()
        assert proc.exitcode == -9
        # Whatever instant the kill hit, no file is torn...
        for directory in (reg.active_dir, reg.archive_dir):
            for name in _listing(directory):
                if not name.startswith(".tmp-"):
                    assert isinstance(_load(directory / name), dict), name
        index_before = reg.index_file.read_bytes()
        # ...and the next use leaves the registry consistent.
        index = reg.get_index()
        repaired += reg.index_file.read_bytes() != index_before
        assert bystanders <= {e["instance_id"] for e in index.values()}
        for directory in (reg.registry_dir, reg.active_dir, reg.archive_dir):
            cleanup_orphaned_temp_files(directory, age_hours=0)
        assert_consistent(reg, exact_times=False)
        reaped = reg.reap_stale(max_idle=None)
        assert len(reaped) <= 1
        assert {p.stem for p in reg.active_dir.iterdir()} == bystanders
        assert_consistent(reg)
    print(f"\n{rounds} kills, {repaired} left an index the next use rebuilt")


# --------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120) | st.text(alphabet="a./\\\0:-_ é", max_size=8))
def test_every_accepted_id_is_a_plain_file_name(candidate: str) -> None:
    reg = SessionRegistry("/nonexistent-registry")
    if session_registry._id_problem(candidate) is not None:
        with pytest.raises(ValueError, match="unsafe instance id") as info:
            reg.get_session_file_path(candidate)
        assert repr(candidate)[:20] in str(info.value)
        return
    path = reg.get_session_file_path(candidate)
    assert path.parent == reg.active_dir
    with tempfile.TemporaryDirectory() as scratch:
        # Creatable as is, and listed back under exactly that name.
        for name in (path.name, f"{candidate}-20300101T000000000000Z-99.json"):
            with open(os.path.join(scratch, name), "x", encoding="utf-8"):
                pass
        assert sorted(os.listdir(scratch)) == sorted(
            [path.name, f"{candidate}-20300101T000000000000Z-99.json"]
        )


SIM_INSTANCES = 4
SIM_SESSIONS = ["a", "b", "c"]


class RegistryMachine(RuleBasedStateMachine):
    """Register/heartbeat/archive from simulated hosts against a model.

    Each simulated instance k is this process under host name ``sim-k`` (the
    hostname seam), so instances hold sessions against each other and see
    each other as "unknown" (another host): a taken session is a conflict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scratch = tempfile.mkdtemp()
        self.reg = SessionRegistry(Path(self.scratch) / "registry", durable=False)
        self.saved = (session_registry._hostname, session_registry._instance_cache)
        self.model: dict[int, str] = {}  # instance -> its session
        self.ids: dict[int, str] = {}
        self.archived = 0
        self.quarantined = 0
        for k in range(SIM_INSTANCES):
            self.ids[k] = self._become(k)

    def _become(self, k: int) -> str:
        session_registry._hostname = lambda: f"sim-{k}"
        session_registry._instance_cache = None
        return self.reg.get_instance_id()

    @rule(k=st.integers(0, SIM_INSTANCES - 1), session=st.sampled_from(SIM_SESSIONS))
    def register(self, k: int, session: str) -> None:
        self._become(k)
        holder = next((j for j, s in self.model.items() if s == session), None)
        if holder is not None and holder != k:
            with pytest.raises(SessionConflictError):
                register(self.reg, session)
            return
        assert register(self.reg, session) == self.ids[k]
        if self.model.get(k, session) != session:
            self.archived += 1
        self.model[k] = session

    @rule(k=st.integers(0, SIM_INSTANCES - 1), by=st.integers(0, SIM_INSTANCES - 1))
    def heartbeat(self, k: int, by: int) -> None:
        self._become(by)
        assert self.reg.update_activity(self.ids[k]) is (k in self.model)

    @rule(k=st.integers(0, SIM_INSTANCES - 1))
    def archive(self, k: int) -> None:
        assert self.reg.archive_session(self.ids[k]) is (k in self.model)
        if self.model.pop(k, None) is not None:
            self.archived += 1

    @rule(content=st.sampled_from([b"", b"{", b"[]", b'{"format": 1}', None]))
    def damage_index(self, content: bytes | None) -> None:
        if content is None:
            with contextlib.suppress(FileNotFoundError):
                self.reg.index_file.unlink()
        elif self.reg.registry_dir.exists():
            self.reg.index_file.write_bytes(content)

    @rule(k=st.integers(0, SIM_INSTANCES - 1))
    def damage_record(self, k: int) -> None:
        if k in self.model:
            self.reg.get_session_file_path(self.ids[k]).write_bytes(b"\0garbage")
            del self.model[k]
            self.quarantined += 1

    @invariant()
    def registry_matches_model(self) -> None:
        expected = {s: self.ids[k] for k, s in self.model.items()}
        assert {s: e["instance_id"] for s, e in self.reg.get_index().items()} == expected
        listed = {r["instance_id"] for r in self.reg.get_current_sessions()}
        assert listed == set(expected.values())
        archive = _listing(self.reg.archive_dir)
        assert len([n for n in archive if n.endswith(".json")]) == self.archived
        assert len([n for n in archive if n.endswith(".corrupt")]) == self.quarantined

    def teardown(self) -> None:
        session_registry._hostname, session_registry._instance_cache = self.saved
        shutil.rmtree(self.scratch)


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
)


# --------------------------------------------------------------------------
# htmlgraph's own format: read, kept, heartbeated, archived (issue 16)
# --------------------------------------------------------------------------
def htmlgraph_record(
    instance_id: str, session_id: str, moment: datetime, *, pid: object = 4242, host: str = "h"
) -> dict[str, Any]:
    """A record as htmlgraph's own tools write it: no format, pid inside "instance"."""
    return {
        "instance_id": instance_id,
        "session_id": session_id,
        "created": ts(moment),
        "repo": {"path": "/src/app", "branch": "main", "commit": "d78e458"},
        "instance": {"pid": pid, "hostname": host, "start_time": ts(moment)},
        "status": "active",
        "last_activity": ts(moment),
    }


def write_htmlgraph_registry(registry_dir: Path, records: list[dict[str, Any]]) -> None:
    """Lay out a registry exactly as htmlgraph's tools leave it (index included)."""
    (registry_dir / "active").mkdir(parents=True)
    (registry_dir / "archive").mkdir()
    sessions = {}
    for record in records:
        path = registry_dir / "active" / f"{record['instance_id']}.json"
        path.write_text(json.dumps(record, indent=2), encoding="utf-8")
        sessions[record["session_id"]] = {
            "instance_id": record["instance_id"],
            "created": record["created"],
            "last_activity": record["last_activity"],
        }
    index = {"version": "1.0", "updated_at": records[-1]["created"], "active_sessions": sessions}
    (registry_dir / ".index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def test_a_registry_written_by_htmlgraph_is_read_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(timezone.utc)
    theirs = [
        htmlgraph_record("inst-4242-h-1767875696", "sess-a", now - timedelta(minutes=5)),
        htmlgraph_record("inst-4343-h-1767875700", "sess-b", now, pid=4343),
    ]
    write_htmlgraph_registry(tmp_path / "registry", theirs)
    before = {p.name: p.read_bytes() for p in (tmp_path / "registry" / "active").iterdir()}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        reg = SessionRegistry(tmp_path / "registry")
        assert sorted(r["session_id"] for r in reg.get_current_sessions()) == ["sess-a", "sess-b"]
        assert reg.read_session("inst-4242-h-1767875696") == dict(theirs[0])
        assert reg.get_index() == {
            r["session_id"]: {
                "instance_id": r["instance_id"],
                "created": r["created"],
                "last_activity": r["last_activity"],
            }
            for r in theirs
        }
        mine = register(reg, "sess-c")  # a change under the lock: nothing quarantined
    assert warnings_of(caplog) == []
    assert _listing(reg.archive_dir) == set()
    for name, raw in before.items():
        assert (reg.active_dir / name).read_bytes() == raw  # untouched
    assert set(reg.get_index()) == {"sess-a", "sess-b", "sess-c"}
    # Heartbeat one of theirs: every field kept, the time moves, still their shape.
    assert reg.update_activity("inst-4242-h-1767875696") is True
    beaten = _load(reg.get_session_file_path("inst-4242-h-1767875696"))
    assert {k: v for k, v in beaten.items() if k != "last_activity"} == {
        k: v for k, v in theirs[0].items() if k != "last_activity"
    }
    assert beaten["last_activity"] > theirs[0]["last_activity"]
    assert TIMESTAMP.fullmatch(beaten["last_activity"])
    # Archive one of theirs: archive/{instance_id}.json.
    assert reg.archive_session("inst-4343-h-1767875700") is True
    archived = _load(reg.archive_dir / "inst-4343-h-1767875700.json")
    assert {k: archived[k] for k in theirs[1]} == theirs[1]
    assert archived["archive_reason"] == "archived"
    assert set(reg.get_index()) == {"sess-a", "sess-c"}
    assert reg.read_session(mine) is not None
    assert_consistent(reg)


@pytest.mark.skipif(_platform.pid_namespace() is None, reason="no pid namespaces here")
def test_htmlgraph_records_are_never_judged_by_pid_and_reaped_only_when_idle(
    tmp_path: Path,
) -> None:
    # Even a record naming this very host and a dead pid: htmlgraph records
    # carry no pid namespace, so the pid cannot be judged here (it may be a
    # container's). Only idle time reaps it.
    now = datetime.now(timezone.utc)
    host = _platform.hostname()
    old = htmlgraph_record(
        "inst-1-x-1", "s-old", now - timedelta(hours=3), pid=dead_pid(), host=host
    )
    new = htmlgraph_record("inst-2-x-2", "s-new", now, pid=dead_pid(), host=host)
    write_htmlgraph_registry(tmp_path / "registry", [old, new])
    reg = SessionRegistry(tmp_path / "registry")
    assert {reg.process_state(r) for r in reg.get_current_sessions()} == {"unknown"}
    assert reg.reap_stale(max_idle=None) == []
    assert reg.reap_stale(max_idle=3600) == ["inst-1-x-1"]
    assert _load(reg.archive_dir / "inst-1-x-1.json")["archive_reason"] == "idle"
    with pytest.raises(SessionConflictError):
        register(reg, "s-new")  # cannot be proven gone
    assert_consistent(reg)


def _htmlgraph_style_tool(registry_dir: str, instance_id: str, conn: Connection) -> None:
    """What htmlgraph's own code does, without a lock: register, beat, archive another."""
    root = Path(registry_dir)
    index_file = root / ".index.json"

    def put(path: Path, data: dict[str, Any]) -> None:
        temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(temp, path)

    now = ts(datetime.now(timezone.utc))
    record = htmlgraph_record(instance_id, "sess-theirs", datetime.now(timezone.utc))
    put(root / "active" / f"{instance_id}.json", record)
    index = json.loads(index_file.read_text(encoding="utf-8"))
    index["active_sessions"]["sess-theirs"] = {
        "instance_id": instance_id,
        "created": now,
        "last_activity": now,
    }
    index["updated_at"] = now
    put(index_file, index)
    # Heartbeat and archive what *we* wrote, their way.
    listed = sorted((root / "active").glob("*.json"))
    ours = [p for p in listed if json.loads(p.read_text(encoding="utf-8")).get("format") == 2]
    data = json.loads(ours[0].read_text(encoding="utf-8"))
    data["last_activity"] = ts(datetime.now(timezone.utc))
    put(ours[0], data)
    archived = json.loads(ours[1].read_text(encoding="utf-8"))
    put(root / "archive" / ours[1].name, archived)
    ours[1].unlink()
    index = json.loads(index_file.read_text(encoding="utf-8"))
    del index["active_sessions"][archived["session_id"]]
    put(index_file, index)
    conn.send([p.stem for p in ours])
    conn.close()


def test_mixed_use_with_htmlgraph_tools_works_both_ways(
    reg: SessionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = register(reg, "ours-1")
    monkeypatch.setattr(session_registry, "_hostname", lambda: "second-host")
    second = register(reg, "ours-2")
    monkeypatch.undo()
    parent, child = mp.Pipe()
    proc = mp.Process(
        target=_htmlgraph_style_tool, args=(str(reg.registry_dir), "inst-9-t-9", child)
    )
    proc.start()
    child.close()
    assert parent.poll(JOIN_TIMEOUT)
    beaten, archived = parent.recv()
    proc.join(JOIN_TIMEOUT)
    assert proc.exitcode == 0
    assert {beaten, archived} == {first, second}
    # They heartbeated one of ours and archived the other; we see both changes.
    assert {r["instance_id"] for r in reg.get_current_sessions()} == {beaten, "inst-9-t-9"}
    index = reg.get_index()
    assert set(index) == {"sess-theirs", reg.read_session(beaten)["session_id"]}  # type: ignore[index]
    assert (reg.archive_dir / f"{archived}.json").is_file()
    # And we heartbeat and archive theirs.
    assert reg.update_activity("inst-9-t-9") is True
    assert reg.archive_session("inst-9-t-9") is True
    assert _load(reg.archive_dir / "inst-9-t-9.json")["session_id"] == "sess-theirs"
    assert _listing(reg.archive_dir) == {f"{archived}.json", "inst-9-t-9.json"}
    assert_consistent(reg)


def test_a_registry_in_our_earlier_format_is_read_then_migrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "registry"
    (root / "active").mkdir(parents=True)
    earlier = {
        "format": 1,
        "instance_id": "host-77-0123456789abcdef",
        "session_id": "sess-old",
        "hostname": "far",
        "pid": 77,
        "process_start": None,
        "pid_namespace": None,
        "created": "2030-01-01T00:00:00.250000+00:00",
        "last_activity": "2030-01-01T00:05:00+00:00",
        "repo": {"path": "/r"},
        "instance": None,
    }
    path = root / "active" / "host-77-0123456789abcdef.json"
    path.write_text(json.dumps(earlier), encoding="utf-8")
    index = {
        "format": 1,
        "sessions": {
            "sess-old": {
                "instance_id": earlier["instance_id"],
                "created": earlier["created"],
                "last_activity": earlier["last_activity"],
            }
        },
    }
    (root / ".index.json").write_text(json.dumps(index), encoding="utf-8")
    reg = SessionRegistry(root)
    # Read in today's shape at once, before anything is written.
    view = reg.read_session("host-77-0123456789abcdef")
    assert view is not None
    assert view["created"] == "2030-01-01T00:00:00.250000Z"
    assert view["last_activity"] == "2030-01-01T00:05:00.000000Z"
    assert view["status"] == "active"
    assert view["format"] == 2
    assert view["repo"] == {"path": "/r"}
    assert view["instance"] == {"pid": 77, "hostname": "far"}
    assert json.loads(path.read_text(encoding="utf-8")) == earlier  # reading writes nothing
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        register(reg, "sess-new")  # the first change migrates
    assert not any("corrupt" in m or "unreadable" in m for m in warnings_of(caplog))
    assert _load(path) == view
    assert _listing(reg.archive_dir) == set()
    assert set(reg.get_index()) == {"sess-old", "sess-new"}
    assert_consistent(reg)


# --------------------------------------------------------------------------
# Foreign pids: never a crash, never proof of death (issue 11 item 5)
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pid", [1099511627776, 2**31, True, "١٢٣", "12 ", -5, 0, 3.0, None, [1]], ids=repr
)
@pytest.mark.parametrize("shape", ["ours", "htmlgraph"])
def test_a_pid_that_is_not_a_pid_is_unknown_and_never_crashes(
    reg: SessionRegistry, pid: object, shape: str
) -> None:
    mine = register(reg, "mine")
    now = datetime.now(timezone.utc)
    if shape == "ours":
        record = plant_record(reg, "odd-1", "s-odd", last_activity=now - timedelta(days=3))
        record["pid"] = pid
    else:
        record = htmlgraph_record("odd-1", "s-odd", now - timedelta(days=3), pid=pid)
        record["instance"]["hostname"] = _platform.hostname()
    reg.get_session_file_path("odd-1").write_text(json.dumps(record), encoding="utf-8")
    (listed,) = [r for r in reg.get_current_sessions() if r["instance_id"] == "odd-1"]
    assert reg.process_state(listed) == "unknown"
    assert reg.reap_stale(max_idle=None) == []  # not proof of death
    assert reg.read_session("odd-1") is not None
    assert reg.reap_stale(max_idle=3600) == ["odd-1"]  # idle time still reaps it
    assert reg.read_session(mine) is not None
    assert_consistent(reg)


# --------------------------------------------------------------------------
# The one directory fsync (issue 11 item 11)
# --------------------------------------------------------------------------
def test_registry_tolerates_a_directory_fsync_that_says_einval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sys.platform == "win32":
        pytest.skip("no directory fsync on Windows")
    real_fsync = os.fsync
    refused: list[int] = []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)  # the os module _platform calls
    reg = SessionRegistry(tmp_path / "a" / "registry")
    iid = register(reg, "s1")
    assert reg.update_activity(iid)
    assert reg.archive_session(iid)
    assert refused  # the fault was hit, and nothing failed
    monkeypatch.undo()
    assert_consistent(reg)


# --------------------------------------------------------------------------
# One id, two processes; htmlgraph's static helpers
# --------------------------------------------------------------------------
def test_a_record_of_an_earlier_process_with_our_id_is_archived_not_overwritten(
    reg: SessionRegistry,
) -> None:
    # A pid reused within the same second gives the same id: the record's
    # start token tells the two processes apart.
    iid = reg.get_instance_id()
    plant_record(reg, iid, "s-before", process_start="boot:1", pid=os.getpid())
    assert register(reg, "s-now") == iid
    archived = _load(reg.archive_dir / f"{iid}.json")
    assert (archived["session_id"], archived["archive_reason"]) == ("s-before", "superseded")
    assert set(reg.get_index()) == {"s-now"}
    assert_consistent(reg)


def test_register_validates_session_ids_as_htmlgraph_documents(reg: SessionRegistry) -> None:
    for bad in ("", None, 5):
        with pytest.raises(ValueError, match="session id"):
            reg.register_session(bad, {}, {})  # type: ignore[arg-type]
    path = reg.register_session("sess-1", {"path": "/r"}, {"pid": 1, "hostname": "h"})
    assert path == reg.get_session_file_path(reg.get_instance_id())
    record = _load(path)
    assert (record["repo"], record["instance"]) == ({"path": "/r"}, {"pid": 1, "hostname": "h"})
    # Without instance_info, the instance block describes this process.
    record = _load(reg.register_session("sess-1"))
    assert record["repo"] == {}
    assert record["instance"]["pid"] == os.getpid()
    assert record["instance"]["hostname"] == session_registry._hostname()
    assert TIMESTAMP.fullmatch(record["instance"]["start_time"])


def test_static_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = SessionRegistry._get_utc_timestamp()
    assert TIMESTAMP.fullmatch(stamp)
    moment = datetime(2030, 5, 6, 7, 8, 9, 10, tzinfo=timezone.utc)
    monkeypatch.setattr(session_registry, "_utcnow", lambda: moment)
    assert SessionRegistry._get_utc_timestamp() == "2030-05-06T07:08:09.000010Z"
    target = tmp_path / "x.json"
    SessionRegistry._write_atomic(target, {"a": {"b": 1}})
    SessionRegistry._write_atomic(target, {"a": {"b": 2}})
    assert target.read_text(encoding="utf-8") == '{\n  "a": {\n    "b": 2\n  }\n}\n'
    assert os.listdir(tmp_path) == ["x.json"]
    assert SessionRegistry._read_json(target) == {"a": {"b": 2}}
    assert SessionRegistry._read_json(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{ nope", encoding="utf-8")
    assert SessionRegistry._read_json(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1]", encoding="utf-8")
    assert SessionRegistry._read_json(tmp_path / "list.json") is None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and sockets")
@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_fifo_in_active_never_blocks_a_reader(reg: SessionRegistry, kind: str) -> None:
    if sys.platform == "win32":
        pytest.skip("no FIFOs")
    register(reg, "s1")
    if kind == "fifo":
        os.mkfifo(reg.active_dir / "trap.json")
    else:  # open() of a socket fails with ENXIO: still skipped, then quarantined
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(reg.active_dir / "trap.json"))
    assert [r["session_id"] for r in reg.get_current_sessions()] == ["s1"]
    assert reg.read_session("trap") is None
    assert set(reg.get_index()) == {"s1"}  # quarantined under the lock
    (name,) = _listing(reg.archive_dir)
    assert name.startswith("trap-")
    assert name.endswith(".corrupt")
