"""The engine of ``htmlgraph check``: does a directory's filesystem keep our promises?

It runs, in a scratch directory inside the directory under test, with real
processes and a bounded time budget:

1. **Concurrent writers and readers** on one file. Every version written is
   self-describing (a header with its length and SHA-256), so a reader can
   tell a complete version from a torn one (a mix, a truncation, an empty or
   a missing file). Count: writes, reads, torn reads.
2. **Writers killed mid-write.** A child rewrites the target in a loop and is
   killed with SIGKILL (``TerminateProcess`` on Windows) at a random instant,
   many times; after each kill the target must still hold one complete
   version. Count: kills, torn/empty/missing targets, temp files left.
3. **Lock contention.** Several processes increment a counter file under
   :class:`~htmlgraph.atomic_ops.DirectoryLocker`'s exclusive lock, written
   *in place* on purpose so that only the lock protects it, and sometimes read
   it under the shared lock. Count: lock-protected updates, lost updates (sum
   of increments minus the final counter), overlapping holders (seen through
   an O_EXCL "inside" marker).
4. **Cleanup**: :func:`~htmlgraph.atomic_ops.cleanup_orphaned_temp_files`
   must remove every temp file the kills left, and nothing else may remain.
5. **Directory fsync**: tried on the scratch directory.

The writer under test is a parameter (``writer(path, data)``), so a test can
hand it a deliberately broken writer and watch the checker catch it. With the
"spawn" start method the writer must be picklable (a module-level function).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import stat
import statistics
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any, Literal, NamedTuple, Protocol

from htmlgraph import _platform
from htmlgraph.atomic_ops import (
    DirectoryLocker,
    atomic_write,
    cleanup_orphaned_temp_files,
)

__all__ = [
    "CheckReport",
    "Finding",
    "LockFactory",
    "LockLike",
    "Progress",
    "Verdict",
    "Writer",
    "atomic_writer",
    "content_is_complete",
    "fast_atomic_writer",
    "make_content",
    "run_check",
]

Writer = Callable[[str, bytes], None]
"""Replace the file at a path with the given bytes (the thing under test)."""

Progress = Callable[[str, float], None]
"""Called with (phase description, fraction of the whole run done, 0..1)."""


class LockLike(Protocol):
    """The seed's lock API, which :class:`~htmlgraph.atomic_ops.DirectoryLocker` has."""

    def acquire_shared_lock(self, timeout: float = ...) -> bool:
        """Take the lock shared; False on timeout."""

    def acquire_exclusive_lock(self, timeout: float = ...) -> bool:
        """Take the lock exclusive; False on timeout."""

    def release_lock(self) -> None:
        """Release whatever this instance holds."""


LockFactory = Callable[[str], LockLike]
"""Make the lock under test for a lock directory (a class such as DirectoryLocker)."""

_MAGIC = b"htmlgraph-check"
_TARGET = "target.bin"
_COUNTER = "counter"
_INSIDE = "inside"
_LOCK_DIR = "lock"
_PAYLOAD = 128 * 1024  # large enough that a write takes a while to kill inside
_JOIN_TIMEOUT = 30.0  # any single child join; generous for a loaded machine
_START_TIMEOUT = 60.0  # a spawned child imports Python and htmlgraph first
_LOCK_ATTEMPT = 0.5  # lock timeout per attempt, so children notice "stop" soon
# Phase shares of the time budget (the rest is process start-up and cleanup).
_SHARE_READWRITE = 0.35
_SHARE_KILL = 0.35
_SHARE_LOCK = 0.25


def atomic_writer(path: str, data: bytes) -> None:
    """The default writer under test: a durable ``atomic_write``."""
    atomic_write(path, data)


def fast_atomic_writer(path: str, data: bytes) -> None:
    """``atomic_write`` with ``durable=False`` (``check --no-fsync``)."""
    atomic_write(path, data, durable=False)


def make_content(generation: int, size: int = _PAYLOAD) -> bytes:
    """Return version ``generation`` of the test file: a header, then ``size`` bytes.

    The header carries the payload's length and SHA-256, so any mix of two
    versions, any truncation and an empty file all fail
    :func:`content_is_complete`.
    """
    unit = b"%d." % generation
    payload = (unit * (size // len(unit) + 1))[:size]
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    return b"%s %d %d %s\n" % (_MAGIC, generation, size, digest) + payload


def content_is_complete(data: bytes) -> bool:
    """Return whether ``data`` is one whole version made by :func:`make_content`."""
    header, newline, payload = data.partition(b"\n")
    if not newline:
        return False
    parts = header.split(b" ")
    if len(parts) != 4 or parts[0] != _MAGIC:
        return False
    try:
        size = int(parts[2])
    except ValueError:
        return False
    return len(payload) == size and hashlib.sha256(payload).hexdigest().encode() == parts[3]


Verdict = Literal["ok", "FAIL", ""]
"""A table row's verdict: the promise held, broke, or the row is a plain count."""


class Finding(NamedTuple):
    """One line of the report: a measurement and, if it breaks a promise, why."""

    label: str
    value: str
    problem: str | None = None
    """The broken promise, or None when it held."""
    judged: bool = True
    """False for a plain count that no promise is about (its verdict is blank)."""

    @classmethod
    def judge(cls, label: str, value: object, broken: bool, problem: str) -> Finding:
        """A finding held to a promise: ``problem`` applies when ``broken``."""
        return cls(label, str(value), problem if broken else None)

    @property
    def verdict(self) -> Verdict:
        """``"FAIL"``, ``"ok"``, or ``""`` for a plain count."""
        if self.problem is not None:
            return "FAIL"
        return "ok" if self.judged else ""


class Latency(NamedTuple):
    """Percentiles of one step's duration, in seconds."""

    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Latency:
        """Summarise ``samples`` (at least two)."""
        cuts = statistics.quantiles(samples, n=100, method="inclusive")
        return cls(cuts[49], cuts[89], cuts[98], max(samples))

    def text(self) -> str:
        """``0.61/0.93/1.20/1.31 ms``."""
        return "/".join(f"{v * 1e3:.2f}" for v in self) + " ms"


@dataclass
class CheckReport:
    """What ``htmlgraph check`` measured; :meth:`violations` lists broken promises."""

    directory: str
    filesystem: str
    writer: str
    locker: str
    seconds: float
    processes: int
    elapsed: float = 0.0
    writes: int = 0
    reads: int = 0
    torn_reads: int = 0
    kills: int = 0
    torn_after_kill: int = 0
    temps_after_kill: int = 0
    lock_updates: int = 0
    lost_updates: int = 0
    lock_overlaps: int = 0
    shared_reads: int = 0
    orphans_cleaned: int = 0
    leftovers: list[str] = field(default_factory=list)
    dir_fsync: str = "not tried"
    latency: dict[str, Latency] = field(default_factory=dict)
    """Seconds per step of a durable 4 KiB write here: fsync, directory fsync, rename."""
    errors: list[str] = field(default_factory=list)

    def findings(self) -> list[Finding]:
        """Return every measurement with its verdict: the one home of the rules.

        The table (:meth:`rows`) and the list of broken promises
        (:meth:`violations`) are both read off this list.
        """
        shown = ", ".join(self.leftovers[:5])
        more = f" and {len(self.leftovers) - 5} more" if len(self.leftovers) > 5 else ""
        return [
            Finding.judge(
                "writes (concurrent + kill loop)",
                self.writes,
                self.writes == 0,
                "no write completed: nothing was tested",
            ),
            Finding("reads", str(self.reads), judged=False),
            Finding.judge(
                "torn reads seen",
                self.torn_reads,
                self.torn_reads > 0,
                f"{self.torn_reads} reads saw a torn, empty or missing file",
            ),
            Finding.judge(
                "writers killed (SIGKILL)",
                self.kills,
                self.kills == 0,
                "no writer was killed: the crash promise was not tested",
            ),
            Finding.judge(
                "torn/empty/missing after kill",
                self.torn_after_kill,
                self.torn_after_kill > 0,
                f"{self.torn_after_kill} kills left the target torn, empty or missing",
            ),
            Finding.judge(
                "lock-protected updates",
                self.lock_updates,
                self.lock_updates == 0,
                "no lock-protected update completed: the lock was not tested",
            ),
            Finding("shared-lock reads", str(self.shared_reads), judged=False),
            Finding.judge(
                "lost lock-protected updates",
                self.lost_updates,
                self.lost_updates != 0,
                f"{self.lost_updates} lock-protected updates were lost",
            ),
            Finding.judge(
                "overlapping lock holders",
                self.lock_overlaps,
                self.lock_overlaps > 0,
                f"{self.lock_overlaps} times two holders overlapped in the lock",
            ),
            Finding.judge(
                "orphaned temp files cleaned",
                self.orphans_cleaned,
                self.orphans_cleaned < self.temps_after_kill,
                f"cleanup removed {self.orphans_cleaned} of the {self.temps_after_kill} "
                "temp files the kills left",
            ),
            Finding.judge(
                "files left after cleanup",
                len(self.leftovers),
                bool(self.leftovers),
                f"files left behind after cleanup: {shown}{more}",
            ),
            *(
                Finding(f"{step} p50/p90/p99/max", lat.text(), judged=False)
                for step, lat in self.latency.items()
            ),
            Finding.judge(
                "directory fsync supported",
                self.dir_fsync,
                self.dir_fsync.startswith("failed"),
                f"directory fsync {self.dir_fsync}",
            ),
        ]

    def violations(self) -> list[str]:
        """Return one line per broken promise (empty when everything held)."""
        broken = [f.problem for f in self.findings() if f.problem is not None]
        return broken + self.errors

    @property
    def ok(self) -> bool:
        """True when no promise was broken."""
        return not self.violations()

    def rows(self) -> list[tuple[str, str, Verdict]]:
        """Return the table rows: (label, value, "ok" / "FAIL" / "" for a plain count)."""
        return [(f.label, f.value, f.verdict) for f in self.findings()]

    def as_dict(self) -> dict[str, object]:
        """Return the report as JSON-ready data, with ``ok`` and ``violations``."""
        data: dict[str, object] = asdict(self)
        data["latency"] = {step: lat._asdict() for step, lat in self.latency.items()}
        data["ok"] = self.ok
        data["violations"] = self.violations()
        return data


# --------------------------------------------------------------------------
# Child processes (module level, so "spawn" can import them)
# --------------------------------------------------------------------------


class _Tally(NamedTuple):
    """What one child counted, sent to the parent through a Pipe (picklable)."""

    writes: int = 0
    reads: int = 0
    torn: int = 0
    increments: int = 0
    overlaps: int = 0
    shared_reads: int = 0
    error: str = ""


def _child_setup() -> None:
    # Ctrl-C reaches the whole process group; the parent decides what to do
    # and stops us itself, so a child must not die with a traceback.
    # A forked child inherits the CLI's SIGTERM handler (which raises); the
    # default (die quietly) is right for a child, which holds nothing.
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _writer_child(
    writer: Writer, path: str, first: int, step: int, stop: Event, conn: Connection
) -> None:
    _child_setup()
    writes = 0
    error = ""
    generation = first
    try:
        while True:  # at least one write, however short the budget
            writer(path, make_content(generation))
            writes += 1
            generation += step
            if stop.is_set():
                break
    except Exception as exc:  # reported to the parent, which fails the check
        error = f"writer {first}: {type(exc).__name__}: {exc}"
    conn.send(_Tally(writes=writes, error=error))
    conn.close()


def _reader_child(path: str, stop: Event, conn: Connection) -> None:
    _child_setup()
    reads = torn = 0
    error = ""
    try:
        while reads == 0 or not stop.is_set():
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                torn += 1  # the target existed before readers started
                continue
            except PermissionError:
                if sys.platform == "win32":
                    continue  # a reader racing MoveFileEx: not a torn read
                raise
            reads += 1
            if not content_is_complete(data):
                torn += 1
    except Exception as exc:
        error = f"reader: {type(exc).__name__}: {exc}"
    conn.send(_Tally(reads=reads, torn=torn, error=error))
    conn.close()


def _kill_target_child(writer: Writer, path: str, first: int, started: Event) -> None:
    _child_setup()
    # Build the versions first, so that once "started" is set the loop is
    # (nearly) all writing and a random kill lands inside a write.
    versions = [make_content(first + i) for i in range(3)]
    started.set()
    index = 0
    while True:
        writer(path, versions[index % 3])
        index += 1


def _lock_child(
    locker_factory: LockFactory,
    lock_dir: str,
    counter: str,
    inside: str,
    seed: int,
    stop: Event,
    conn: Connection,
) -> None:
    _child_setup()
    rng = random.Random(seed)  # noqa: S311 - choice of operation, not security
    locker = locker_factory(lock_dir)
    increments = overlaps = shared_reads = 0
    error = ""
    try:
        # At least one increment per process, however short the budget (each
        # attempt is bounded; the parent bounds the whole child).
        while increments == 0 or not stop.is_set():
            if increments and rng.random() < 0.25:
                if not locker.acquire_shared_lock(timeout=_LOCK_ATTEMPT):
                    continue
                try:
                    if os.path.exists(inside):
                        overlaps += 1  # a writer is inside while we read
                    with open(counter, "rb") as f:
                        int(f.read())
                    shared_reads += 1
                finally:
                    locker.release_lock()
                continue
            if not locker.acquire_exclusive_lock(timeout=_LOCK_ATTEMPT):
                continue
            try:
                try:
                    os.close(os.open(inside, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                    mine = True
                except FileExistsError:
                    overlaps += 1  # someone else holds the "exclusive" lock
                    mine = False
                with open(counter, "r+b") as f:
                    value = int(f.read())
                    time.sleep(0)  # widen the read-modify-write window
                    f.seek(0)
                    f.write(b"%d\n" % (value + 1))
                    f.truncate()
                increments += 1
                if mine:
                    os.unlink(inside)
            finally:
                locker.release_lock()
    except Exception as exc:
        error = f"lock user: {type(exc).__name__}: {exc}"
    conn.send(
        _Tally(increments=increments, overlaps=overlaps, shared_reads=shared_reads, error=error)
    )
    conn.close()


# --------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------


def _context() -> BaseContext:
    """Fork where it is cheap and safe (Linux, no threads), else spawn.

    Fork makes the kill loop fast (a few ms per child instead of ~100 ms of
    interpreter start-up); forking a threaded process can deadlock, and
    macOS system libraries are not fork-safe, hence spawn there.
    """
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def filesystem_type(path: str) -> str:
    """Return the type of the filesystem holding ``path`` ("ext4", "tmpfs"...), best effort."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return kind
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, parts[2]
    return kind


class _Receiver(Protocol):
    """The receiving end of a Pipe (Connection on POSIX, PipeConnection on Windows)."""

    def poll(self, timeout: float | None = ...) -> bool: ...
    def recv(self) -> Any: ...  # noqa: ANN401 - whatever the child sent
    def close(self) -> None: ...


class _Run:
    """State of one check: children to stop on the way out, the clock, progress."""

    def __init__(self, seconds: float, progress: Progress | None) -> None:
        self.ctx = _context()
        self.seconds = seconds
        self.progress = progress
        self.started = time.monotonic()
        self.children: list[BaseProcess] = []
        self.done_before = 0.0  # fraction of the run finished by earlier phases

    def report(self, phase: str, fraction_of_phase: float, share: float) -> None:
        if self.progress is not None:
            self.progress(phase, self.done_before + share * min(fraction_of_phase, 1.0))

    def start(self, target: Callable[..., None], *args: object) -> BaseProcess:
        # BaseContext's stub lacks Process; every concrete context has it.
        process: BaseProcess = self.ctx.Process(target=target, args=args, daemon=True)  # type: ignore[attr-defined]
        process.start()
        self.children.append(process)
        return process

    def wait_phase(self, phase: str, share: float, stop: Event) -> None:
        """Let a phase run for its share of the budget, reporting progress."""
        duration = self.seconds * share
        begin = time.monotonic()
        while True:
            spent = time.monotonic() - begin
            self.report(phase, spent / duration if duration else 1.0, share)
            if spent >= duration:
                break
            stop.wait(min(0.1, duration - spent))
        stop.set()

    def collect(
        self, children: Sequence[tuple[BaseProcess, _Receiver]], errors: list[str]
    ) -> list[_Tally]:
        """Receive each child's tally and join it, all bounded; problems go to ``errors``."""
        results = []
        for process, conn in children:
            try:
                if conn.poll(_JOIN_TIMEOUT):
                    result = conn.recv()
                    if isinstance(result, _Tally):
                        results.append(result)
                        if result.error:
                            errors.append(result.error)
                    else:
                        errors.append(f"a child (pid {process.pid}) sent {result!r}")
                else:
                    errors.append(f"a child (pid {process.pid}) sent no result in time")
            except (EOFError, OSError) as exc:
                errors.append(f"a child (pid {process.pid}) died without a result: {exc!r}")
            finally:
                conn.close()
            process.join(_JOIN_TIMEOUT)
            if process.exitcode is None:
                process.kill()
                process.join(_JOIN_TIMEOUT)
                errors.append(f"a child (pid {process.pid}) did not exit in time")
            elif process.exitcode != 0:
                errors.append(f"a child (pid {process.pid}) exited with {process.exitcode}")
        return results

    def close(self) -> None:
        for process in self.children:
            if process.exitcode is None:
                with contextlib.suppress(OSError, ValueError):
                    process.kill()
                process.join(_JOIN_TIMEOUT)


def _temp_names(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(".tmp-"))


def _leftovers(directory: str, scratch: str, expected: Collection[str] = ()) -> list[str]:
    """List what ``directory`` holds besides ``expected``, as paths relative to ``scratch``."""
    where = os.path.relpath(directory, scratch)
    return [
        os.path.join(where, name) for name in sorted(os.listdir(directory)) if name not in expected
    ]


def _phase_readwrite(run: _Run, report: CheckReport, writer: Writer, directory: str) -> None:
    os.mkdir(directory)
    target = os.path.join(directory, _TARGET)
    writer(target, make_content(0))
    report.writes += 1
    writers = max(1, report.processes // 2)
    readers = max(1, report.processes - writers)
    stop = run.ctx.Event()
    children = []
    for index in range(writers):
        receive, send = run.ctx.Pipe(duplex=False)
        children.append(
            (run.start(_writer_child, writer, target, index + 1, writers, stop, send), receive)
        )
        send.close()
    for _ in range(readers):
        receive, send = run.ctx.Pipe(duplex=False)
        children.append((run.start(_reader_child, target, stop, send), receive))
        send.close()
    run.wait_phase("concurrent writers and readers", _SHARE_READWRITE, stop)
    for tally in run.collect(children, report.errors):
        report.writes += tally.writes
        report.reads += tally.reads
        report.torn_reads += tally.torn
    if not content_is_complete(_read(target)):
        report.torn_reads += 1
    # Every writer finished normally: nothing but the target may remain.
    report.leftovers.extend(_leftovers(directory, os.path.dirname(directory), {_TARGET}))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _time_one_write(writer: Writer, target: str) -> float:
    begin = time.perf_counter()
    writer(target, make_content(1))
    return time.perf_counter() - begin


def _phase_kill(run: _Run, report: CheckReport, writer: Writer, directory: str) -> None:
    os.mkdir(directory)
    target = os.path.join(directory, _TARGET)
    writer(target, make_content(0))
    report.writes += 1
    write_time = _time_one_write(writer, target)
    report.writes += 1
    rng = random.Random()  # noqa: S311 - kill timing, not security
    share = _SHARE_KILL
    duration = run.seconds * share
    begin = time.monotonic()
    generation = 1000
    while time.monotonic() - begin < duration or report.kills == 0:
        if time.monotonic() - begin > duration + _START_TIMEOUT:
            break  # even the first kill could not be made: reported as "no kill"
        spent = time.monotonic() - begin
        run.report("writers killed mid-write", spent / duration if duration else 1.0, share)
        started = run.ctx.Event()
        child = run.start(_kill_target_child, writer, target, generation, started)
        generation += 3
        if not started.wait(_START_TIMEOUT):
            report.errors.append("a writer child did not start in time")
            break
        # A random instant within the next few writes: most kills land inside
        # one (the loop does nothing else), some between two.
        time.sleep(rng.uniform(0.0, 3.0 * write_time))
        if child.exitcode is not None:
            report.errors.append(f"a writer child died by itself with {child.exitcode}")
            break
        child.kill()
        child.join(_JOIN_TIMEOUT)
        run.children.remove(child)
        if child.exitcode is None:
            report.errors.append(f"a killed writer (pid {child.pid}) did not exit")
            break
        report.kills += 1
        if not content_is_complete(_read(target)):
            report.torn_after_kill += 1
            # Put a whole version back so that later kills are judged on their own.
            writer(target, make_content(generation))
            generation += 1
        report.temps_after_kill = len(_temp_names(directory))
    # Kills leave temp files by design; the cleanup must find every one.
    report.orphans_cleaned = cleanup_orphaned_temp_files(directory, age_hours=0)
    report.leftovers.extend(_leftovers(directory, os.path.dirname(directory), {_TARGET}))


def _phase_lock(run: _Run, report: CheckReport, locker: LockFactory, directory: str) -> None:
    os.mkdir(directory)
    lock_dir = os.path.join(directory, _LOCK_DIR)
    os.mkdir(lock_dir)
    counter = os.path.join(directory, _COUNTER)
    inside = os.path.join(directory, _INSIDE)
    with open(counter, "wb") as f:
        f.write(b"0\n")
    stop = run.ctx.Event()
    children = []
    for index in range(max(2, report.processes)):
        receive, send = run.ctx.Pipe(duplex=False)
        seed = secrets.randbits(32) + index
        children.append(
            (run.start(_lock_child, locker, lock_dir, counter, inside, seed, stop, send), receive)
        )
        send.close()
    run.wait_phase("lock contention", _SHARE_LOCK, stop)
    increments = 0
    for tally in run.collect(children, report.errors):
        increments += tally.increments
        report.lock_overlaps += tally.overlaps
        report.shared_reads += tally.shared_reads
    try:
        final = int(_read(counter))
    except ValueError:
        report.errors.append(f"the lock-protected counter is corrupt: {_read(counter)[:40]!r}")
        final = 0
    report.lock_updates = increments
    report.lost_updates = increments - final
    # Every holder released: no marker (and no "inside" flag) may remain.
    scratch = os.path.dirname(directory)
    report.leftovers.extend(_leftovers(directory, scratch, {_COUNTER, _LOCK_DIR}))
    if os.path.isdir(lock_dir):
        report.leftovers.extend(_leftovers(lock_dir, scratch))


def _try_dir_fsync(directory: str) -> str:
    """Whether this filesystem can fsync a directory (asked directly, not tolerated)."""
    if sys.platform == "win32":
        return "n/a (Windows)"
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        name = os.strerror(exc.errno) if exc.errno else str(exc)
        return f"failed ({name})"
    finally:
        os.close(fd)
    return "yes"


_PROBE_WRITES = 40
_PROBE_SIZE = 4096


def _probe_latency(directory: str) -> dict[str, Latency]:
    """Time the steps of durable 4 KiB replaces here: what a user's writes will cost.

    The steps of a durable write, each timed on its own: fsync of the data,
    the rename, fsync of the directory (where the platform has one).
    """
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, "latency.bin")
    data = os.urandom(_PROBE_SIZE)
    steps: dict[str, list[float]] = {"fsync": [], "rename": [], "directory fsync": []}
    for i in range(_PROBE_WRITES):
        temp = os.path.join(directory, f".tmp-probe-{i}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            started = time.perf_counter()
            _platform.fsync_file(fd)
            steps["fsync"].append(time.perf_counter() - started)
        finally:
            os.close(fd)
        started = time.perf_counter()
        _platform.replace(temp, target)
        steps["rename"].append(time.perf_counter() - started)
        if sys.platform != "win32":
            started = time.perf_counter()
            _platform.fsync_dir(directory)
            steps["directory fsync"].append(time.perf_counter() - started)
    return {step: Latency.of(samples) for step, samples in steps.items() if samples}


def _qualified_name(thing: object) -> str:
    module = getattr(thing, "__module__", "?")
    name = getattr(thing, "__qualname__", None) or getattr(thing, "__name__", repr(thing))
    return f"{module}.{name}"


def run_check(
    directory: str | os.PathLike[str],
    *,
    seconds: float = 10.0,
    processes: int = 4,
    writer: Writer = atomic_writer,
    locker: LockFactory = DirectoryLocker,
    progress: Progress | None = None,
) -> CheckReport:
    """Test ``directory``'s filesystem against htmlgraph's promises; return the report.

    Works in a fresh scratch directory inside ``directory`` and removes it
    afterwards. Runs about ``seconds`` (process start-up and cleanup come on
    top; every wait is bounded). Starts ``processes`` processes per
    concurrent phase. Not meant to run twice at once in one scratch
    directory (each run makes its own).

    Args:
        directory: An existing directory on the filesystem to test.
        seconds: Time budget for the three timed phases together.
        processes: Processes per concurrent phase (at least 1; the lock phase
            uses at least 2).
        writer: The writer under test, ``writer(path, data)``; picklable if
            the platform spawns processes.
        locker: The lock under test, ``locker(lock_dir)`` with the seed's
            acquire/release API; picklable likewise.
        progress: Called with (phase, fraction done) as the run advances.

    Returns:
        The measurements; ``report.ok`` is False if any promise broke.

    Raises:
        OSError: ``directory`` is unusable (missing, read-only, full...).
        ValueError: ``seconds`` is negative or ``processes`` below 1.
    """
    base = os.fspath(directory)
    if not seconds >= 0:
        raise ValueError(f"seconds must be >= 0, not {seconds!r}")
    if processes < 1:
        raise ValueError(f"processes must be at least 1, not {processes!r}")
    if not stat.S_ISDIR(os.stat(base).st_mode):  # a missing one raises FileNotFoundError
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), base)
    report = CheckReport(
        directory=os.path.abspath(base),
        filesystem=filesystem_type(base),
        writer=_qualified_name(writer),
        locker=_qualified_name(locker),
        seconds=seconds,
        processes=processes,
    )
    scratch = os.path.join(base, f".htmlgraph-check-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(scratch)
    run = _Run(seconds, progress)
    try:
        _phase_readwrite(run, report, writer, os.path.join(scratch, "readwrite"))
        run.done_before += _SHARE_READWRITE
        _phase_kill(run, report, writer, os.path.join(scratch, "kill"))
        run.done_before += _SHARE_KILL
        _phase_lock(run, report, locker, os.path.join(scratch, "lock"))
        run.done_before += _SHARE_LOCK
        run.report("directory fsync and cleanup", 0.0, 1.0 - run.done_before)
        report.dir_fsync = _try_dir_fsync(scratch)
        report.latency = _probe_latency(os.path.join(scratch, "latency"))
        run.report("done", 1.0, 1.0 - run.done_before)
    finally:
        run.close()
        shutil.rmtree(scratch, ignore_errors=True)
        report.elapsed = time.monotonic() - run.started
    return report
