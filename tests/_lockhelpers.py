"""Process targets and harness pieces for the DirectoryLocker tests.

Module-level functions only, so that multiprocessing can start them with any
start method. The torture harness runs the same workload against the real
lock and against :class:`NaiveLock` (a check-then-create lock kept as a
negative control, proving the harness can see violations).
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.sharedctypes
import multiprocessing.synchronize
import os
import random
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from types import FrameType
from typing import Protocol

from _helpers import mp_context
from htmlgraph import atomic_ops as lockmod
from htmlgraph.atomic_ops import DirectoryLocker


class Lock(Protocol):
    def acquire_shared_lock(self, timeout: float = ...) -> bool: ...
    def acquire_exclusive_lock(self, timeout: float = ...) -> bool: ...
    def release_lock(self) -> None: ...


class NaiveLock:
    """The seed's idea of a lock: look for conflicting markers, then create one.

    Not mutually exclusive: two contenders can both look, both see nothing and
    both create. ``window`` widens that gap (a sleep between check and create)
    so that the negative control fails reliably.
    """

    def __init__(self, lock_dir: str, window: float = 0.0005) -> None:
        self.lock_dir = lock_dir
        self.window = window
        self.marker: str | None = None
        self.count = 0

    def _try(self, pattern: str, kind: str) -> bool:
        if glob.glob(os.path.join(glob.escape(self.lock_dir), pattern)):
            return False
        time.sleep(self.window)
        self.count += 1
        self.marker = os.path.join(self.lock_dir, f".naive-{kind}-{os.getpid()}-{self.count}")
        with open(self.marker, "w") as f:
            f.write(str(os.getpid()))
        return True

    def _acquire(self, pattern: str, kind: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._try(pattern, kind):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def acquire_shared_lock(self, timeout: float = 5.0) -> bool:
        return self._acquire(".naive-exclusive-*", "shared", timeout)

    def acquire_exclusive_lock(self, timeout: float = 5.0) -> bool:
        return self._acquire(".naive-*", "exclusive", timeout)

    def release_lock(self) -> None:
        if self.marker is not None:
            os.unlink(self.marker)
            self.marker = None


class _BreakCounter(logging.Handler):
    """Count the stale markers this process broke (the lock's WARNING lines)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("broke stale lock marker"):
            self.count += 1


def torture_worker(
    kind: str,
    lock_dir: str,
    counter: str,
    out: str,
    n_ops: int,
    read_share: float,
    seed: int,
    barrier: multiprocessing.synchronize.Barrier,
) -> None:
    """Do ``n_ops`` locked operations; record every hold with monotonic timestamps.

    Exclusive holds read-modify-write the counter file; shared holds read it
    (a torn read - empty or non-numeric - is recorded). Each hold's interval
    is taken strictly inside acquire -> release, so an overlap in the record
    is an overlap that happened.
    """
    rng = random.Random(seed)
    lock: Lock = DirectoryLocker(lock_dir) if kind == "real" else NaiveLock(lock_dir)
    broken = _BreakCounter()
    logging.getLogger(lockmod.__name__).addHandler(broken)
    holds: list[tuple[int, int, int]] = []
    timeouts = 0
    torn_at: list[int] = []  # start of each hold that read a torn counter
    barrier.wait(60)
    for _ in range(n_ops):
        exclusive = rng.random() >= read_share
        ok = lock.acquire_exclusive_lock(60) if exclusive else lock.acquire_shared_lock(60)
        if not ok:
            timeouts += 1
            continue
        start = time.monotonic_ns()
        with open(counter) as f:
            text = f.read()
        if not text.strip().isdigit():
            torn_at.append(start)  # empty or half-written: a writer was inside with us
        if exclusive:
            value = int(text) if text.strip().isdigit() else 0
            with open(counter, "w") as f:
                f.write(str(value + 1))
        end = time.monotonic_ns()
        lock.release_lock()
        holds.append((start, end, int(exclusive)))
    with open(out, "w") as f:
        json.dump(
            {
                "holds": holds,
                "timeouts": timeouts,
                "torn": len(torn_at),
                "torn_at": torn_at,
                "broken": broken.count,
            },
            f,
        )


@dataclass
class TortureResult:
    holds: int
    exclusive_holds: int
    overlaps: int
    lost_increments: int
    torn_reads: int
    timeouts: int
    seconds: float


def count_overlaps(holds: list[tuple[int, int, int]]) -> int:
    """Count exclusive holds that overlap any other hold (shared/shared is fine).

    Sorted by start, an exclusive hold overlaps another iff an earlier-starting
    hold ends after it starts, or the next hold starts before it ends.
    """
    ordered = sorted(holds)
    bad = 0
    max_end = -1
    for i, (start, end, exclusive) in enumerate(ordered):
        if exclusive and (max_end > start or (i + 1 < len(ordered) and ordered[i + 1][0] < end)):
            bad += 1
        max_end = max(max_end, end)
    return bad


def run_torture(
    kind: str, root: str, *, processes: int, ops: int, read_share: float
) -> TortureResult:
    """Run ``processes`` workers doing ``ops`` acquisitions in total; check the record."""
    ctx = mp_context()
    lock_dir = os.path.join(root, "locks")
    os.makedirs(lock_dir, exist_ok=True)
    counter = os.path.join(root, "counter")
    with open(counter, "w") as f:
        f.write("0")
    barrier = ctx.Barrier(processes)
    per = ops // processes
    outs = [os.path.join(root, f"out-{i}.json") for i in range(processes)]
    procs = [
        ctx.Process(
            target=torture_worker,
            args=(kind, lock_dir, counter, outs[i], per, read_share, 1000 + i, barrier),
        )
        for i in range(processes)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    seconds = time.monotonic() - started
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * processes, f"worker exit codes {codes}"
    holds: list[tuple[int, int, int]] = []
    timeouts = torn = 0
    for out in outs:
        with open(out) as f:
            data = json.load(f)
        holds.extend((int(a), int(b), int(c)) for a, b, c in data["holds"])
        timeouts += data["timeouts"]
        torn += data["torn"]
    exclusive_holds = sum(1 for h in holds if h[2])
    with open(counter) as f:
        text = f.read()
    final = int(text) if text.strip().isdigit() else 0
    leftovers = [n for n in os.listdir(lock_dir) if n.startswith(".lock-")]
    if kind == "real":
        assert leftovers == [], f"markers left behind: {leftovers}"
    return TortureResult(
        holds=len(holds),
        exclusive_holds=exclusive_holds,
        overlaps=count_overlaps(holds),
        lost_increments=exclusive_holds - final,
        torn_reads=torn,
        timeouts=timeouts,
        seconds=seconds,
    )


def hold_until_killed(
    lock_dir: str, mode: str, ready: multiprocessing.synchronize.Event, conn_path: str
) -> None:
    """Take the lock, report the marker path, signal ``ready`` and wait to be killed."""
    locker = DirectoryLocker(lock_dir)
    ok = (
        locker.acquire_exclusive_lock(120)
        if mode == "exclusive"
        else locker.acquire_shared_lock(120)
    )
    marker = locker.exclusive_lock_path if mode == "exclusive" else locker.shared_lock_path
    with open(conn_path, "w") as f:
        f.write(str(marker) if ok else "")
    ready.set()
    time.sleep(120)


def hold_then_release(
    lock_dir: str,
    mode: str,
    ready: multiprocessing.synchronize.Event,
    release: multiprocessing.synchronize.Event,
    info_path: str,
) -> None:
    """Take the lock in a child, report (pid, marker, record), hold until told, release."""
    locker = DirectoryLocker(lock_dir)
    ok = (
        locker.acquire_exclusive_lock(10) if mode == "exclusive" else locker.acquire_shared_lock(10)
    )
    marker = locker.exclusive_lock_path if mode == "exclusive" else locker.shared_lock_path
    with open(marker) as f:
        record = f.read()
    with open(info_path, "w") as f:
        json.dump({"ok": ok, "pid": os.getpid(), "marker": str(marker), "record": record}, f)
    ready.set()
    if not release.wait(60):
        os._exit(3)
    locker.release_lock()
    os._exit(0 if ok and not os.path.exists(marker) else 4)


def continuous_reader(
    lock_dir: str,
    stop: multiprocessing.synchronize.Event,
    started: multiprocessing.synchronize.Event,
    hold: float,
    out: str,
) -> None:
    """Hold the shared lock again and again (``hold`` seconds each) until ``stop``."""
    locker = DirectoryLocker(lock_dir)
    holds = 0
    while not stop.is_set():
        if locker.acquire_shared_lock(60):
            holds += 1
            started.set()
            time.sleep(hold)
            locker.release_lock()
    with open(out, "w") as f:
        f.write(str(holds))


def barging_holder(
    lock_dir: str,
    holds: multiprocessing.sharedctypes.Synchronized[int],
    stop: multiprocessing.synchronize.Event,
) -> None:
    """Take the exclusive lock again the moment it is released, until ``stop``.

    The holder a waiter has to get past: no pause between its holds, so a
    polite waiter never sees the lock free. Counts its holds in ``holds``.
    """
    locker = DirectoryLocker(lock_dir)
    while not stop.is_set():
        if locker.acquire_exclusive_lock(60):
            with holds.get_lock():
                holds.value += 1
            locker.release_lock()


if sys.platform != "win32":

    def unprivileged_acquire(
        lock_dir: str, mode: str, uid: int, conn: multiprocessing.connection.Connection
    ) -> None:
        """Drop to ``uid`` and try to take the lock; report what happened (fork only)."""
        os.setgid(uid)
        os.setuid(uid)
        sleeps: list[float] = []
        lockmod._sleep = sleeps.append
        result: dict[str, object] = {"sleeps": 0}
        try:
            locker = DirectoryLocker(lock_dir)
            t0 = time.monotonic()
            ok = (
                locker.acquire_exclusive_lock(30)
                if mode == "exclusive"
                else locker.acquire_shared_lock(0 if mode == "shared0" else 30)
            )
            result.update(ok=ok, elapsed=time.monotonic() - t0)
        except OSError as exc:
            result.update(error=type(exc).__name__, errno=exc.errno, filename=exc.filename)
        result["sleeps"] = len(sleeps)
        try:
            result["listing"] = sorted(os.listdir(lock_dir))
        except OSError as exc:
            result["listing"] = type(exc).__name__
        conn.send(result)
        conn.close()


def acquire_once(
    lock_dir: str, mode: str, timeout: float, conn: multiprocessing.connection.Connection
) -> None:
    """Try once to take the lock within ``timeout``; send what happened, then release."""
    locker = DirectoryLocker(lock_dir)
    started = time.monotonic()
    try:
        ok = (
            locker.acquire_exclusive_lock(timeout)
            if mode == "exclusive"
            else locker.acquire_shared_lock(timeout)
        )
        result: dict[str, object] = {"ok": ok}
    except Exception as exc:  # reported to the test, which fails on it
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.monotonic() - started
    locker.release_lock()
    conn.send(result)
    conn.close()


def contender(
    lock_dir: str,
    seed: int,
    started: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
) -> None:
    """Take the lock in random modes with very short holds until ``stop`` (contention)."""
    rng = random.Random(seed)
    locker = DirectoryLocker(lock_dir)
    while not stop.is_set():
        exclusive = rng.random() < 0.5
        ok = locker.acquire_exclusive_lock(10) if exclusive else locker.acquire_shared_lock(10)
        if ok:
            started.set()
            time.sleep(rng.uniform(0, 0.001))
            locker.release_lock()
        time.sleep(rng.uniform(0, 0.001))


def _own_names(lock_dir: str, pid: int) -> list[str]:
    """The marker and pending files of process ``pid`` in ``lock_dir``."""
    tags = (f".lock-shared-{pid}-", f".lock-exclusive-{pid}-", f".lock-pending-{pid}-")
    return sorted(n for n in os.listdir(lock_dir) if n.startswith(tags))


if sys.platform != "win32":  # signal.pthread_kill

    def interrupted_loop(
        lock_dir: str,
        iterations: int,
        seed: int,
        out: str,
        finished: multiprocessing.synchronize.Event,
        done: multiprocessing.synchronize.Event,
    ) -> None:
        """Acquire and release again and again while SIGINT arrives at random instants.

        An application that catches ``KeyboardInterrupt`` and goes on. A second
        thread sends SIGINT to the main thread every few hundred microseconds;
        the handler raises ``KeyboardInterrupt`` only while the main thread is
        inside a lock call (a budget of 1 to 3 interrupts per call, so an
        interrupt can also land in the lock's own clean-up), and notes where each
        one landed (file:function:line). After every call the application releases what it may hold
        (as a ``finally`` would) and looks for markers or pending files of its
        own pid: there must be none. Any exception but ``KeyboardInterrupt`` is
        recorded. The report goes to ``out``; the process then stays alive until
        ``done``, so that the test can check that nothing of it blocks a peer.
        """
        rng = random.Random(seed)
        pid = os.getpid()
        main = threading.get_ident()
        package = os.path.dirname(lockmod.__file__)
        budget = [0]
        landed: dict[str, int] = {}
        raised = [0]

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            if budget[0] <= 0:
                return  # outside a lock call: dropped
            budget[0] -= 1
            raised[0] += 1
            if frame is not None and frame.f_code.co_filename.startswith(package):
                code = frame.f_code
                where = f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}"
                landed[where] = landed.get(where, 0) + 1
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)  # whatever the parent's disposition
        stop = threading.Event()

        def interrupter() -> None:
            r = random.Random(seed + 1)
            while not stop.is_set():
                time.sleep(r.uniform(0, 0.001))
                signal.pthread_kill(main, signal.SIGINT)

        locker = DirectoryLocker(lock_dir)
        caught = acquired = 0
        errors: list[str] = []
        leaks: list[tuple[int, str, list[str]]] = []
        fds_before = len(os.listdir("/dev/fd"))
        thread = threading.Thread(target=interrupter, daemon=True)
        thread.start()
        for i in range(iterations):
            op = rng.choice(["exclusive", "shared", "with-exclusive", "with-shared", "nested"])
            timeout = rng.choice([0.0, 0.01, 0.1])
            try:
                budget[0] = rng.randint(1, 3)
                if op in ("exclusive", "shared"):
                    acquire = (
                        locker.acquire_exclusive_lock
                        if op == "exclusive"
                        else locker.acquire_shared_lock
                    )
                    if acquire(timeout):
                        acquired += 1
                        locker.release_lock()
                elif op == "nested" and locker.acquire_exclusive_lock(timeout):
                    acquired += 1
                    locker.acquire_shared_lock(0)
                    locker.release_lock()
                    locker.release_lock()
                elif op.startswith("with-"):
                    cm = locker.exclusive if op == "with-exclusive" else locker.shared
                    try:
                        with cm(timeout):
                            acquired += 1
                    except TimeoutError:
                        pass
                budget[0] = 0
            except KeyboardInterrupt:
                budget[0] = 0
                caught += 1
            except BaseException:
                budget[0] = 0
                errors.append(traceback.format_exc())
            # No interrupt from here on: release what this instance may still hold
            # (an interrupt between a successful acquire and its release), as a
            # finally would; one more call finishes an interrupted clean-up.
            try:
                for _ in range(10):
                    if not (
                        locker.exclusive_lock_path.exists() or locker.shared_lock_path.exists()
                    ):
                        break
                    locker.release_lock()
                locker.release_lock()
            except BaseException:
                errors.append(traceback.format_exc())
            mine = _own_names(lock_dir, pid)
            if mine:
                leaks.append((i, op, mine))
        stop.set()
        thread.join(10)
        locker.release_lock()
        report = {
            "iterations": iterations,
            "acquired": acquired,
            "caught": caught,
            "raised": raised[0],
            "landed": landed,
            "errors": errors[:5],
            "n_errors": len(errors),
            "leaks": leaks[:5],
            "n_leaks": len(leaks),
            "final": _own_names(lock_dir, pid),
            "fds_leaked": len(os.listdir("/dev/fd")) - fds_before,
        }
        with open(out, "w") as f:
            json.dump(report, f)
        finished.set()
        done.wait(60)


if sys.platform == "linux":

    def leaderless_holder(
        lock_dir: str,
        info_path: str,
        ready: multiprocessing.synchronize.Event,
        release: multiprocessing.synchronize.Event,
    ) -> None:
        """Hold the lock exclusive from a second thread after the main thread has exited.

        The main thread starts the holder thread and leaves with
        ``pthread_exit``: the thread-group leader then shows ``Z`` in
        ``/proc/<pid>/stat`` while the holder thread runs on and holds. The
        holder releases when told and ends the process (exit code 0 if its
        marker is gone).
        """
        import ctypes

        locker = DirectoryLocker(lock_dir)

        def hold() -> None:
            code = 5
            try:
                ok = locker.acquire_exclusive_lock(30)
                with open(info_path, "w") as f:
                    f.write(str(locker.exclusive_lock_path) if ok else "")
                ready.set()
                if release.wait(60):
                    locker.release_lock()
                    code = 0 if ok and not locker.exclusive_lock_path.exists() else 4
                else:
                    code = 3
            finally:
                os._exit(code)

        threading.Thread(target=hold).start()
        ctypes.CDLL(None).pthread_exit(None)
