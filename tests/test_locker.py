"""DirectoryLocker and LockTimeout: the seed's API, the protocol's decisions, real processes."""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import dead_pid, mp_context, wait_for
from _lockhelpers import (
    acquire_once,
    barging_holder,
    contender,
    continuous_reader,
    hold_then_release,
    hold_until_killed,
)
from htmlgraph import _platform
from htmlgraph import atomic_ops as lockmod
from htmlgraph.atomic_ops import DirectoryLocker, LockTimeout

POSIX = sys.platform != "win32"
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
needs_proc = pytest.mark.skipif(
    _platform.process_start_token(os.getpid()) is None, reason="no process start token here"
)


def markers(lock_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(lock_dir) if n.startswith(".lock-"))


def plant(
    lock_dir: Path,
    mode: str,
    *,
    pid: int,
    ticket: str | None = None,
    host: str | None = None,
    pidns: str | None = "same",
    start: str | None = "same",
    raw: bytes | None = None,
) -> Path:
    """Create a marker as another holder would have left it."""
    suffix = ticket if ticket is not None else "f" * 16
    path = lock_dir / f".lock-{mode}-{pid}-{suffix}"
    if raw is None:
        record = {
            "pid": pid,
            "host": host if host is not None else _platform.hostname(),
            "pidns": _platform.pid_namespace() if pidns == "same" else pidns,
            "start": _platform.process_start_token(pid) if start == "same" else start,
            "created": time.time(),
            "mode": mode,
        }
        raw = json.dumps(record).encode()
    path.write_bytes(raw)
    return path


@pytest.fixture(autouse=True)
def fresh_record_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no cached record head, so a patched seam cannot leak."""
    monkeypatch.setattr(lockmod, "_record_head", [])


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "locks"


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record every backoff sleep (and still sleep, so deadlines pass)."""
    seen: list[float] = []

    def fake_sleep(seconds: float) -> None:
        seen.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(lockmod, "_sleep", fake_sleep)
    return seen


class TestDirectoryLocker:
    """The seed's eight cases."""

    def test_init(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert lock_dir.is_dir()
        assert locker.lock_dir == lock_dir
        assert locker.pid == os.getpid()
        assert locker.shared_lock_path == lock_dir / f".lock-shared-{os.getpid()}"
        assert locker.exclusive_lock_path == lock_dir / f".lock-exclusive-{os.getpid()}"
        assert not locker.shared_lock_path.exists()
        assert not locker.exclusive_lock_path.exists()

    def test_acquire_shared_lock(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock(timeout=1.0)
        assert locker.shared_lock_path.exists()
        assert locker.shared_lock_path.name.startswith(f".lock-shared-{os.getpid()}")
        assert markers(lock_dir) == [locker.shared_lock_path.name]
        locker.release_lock()

    def test_acquire_exclusive_lock(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock(timeout=1.0)
        assert locker.exclusive_lock_path.exists()
        assert locker.exclusive_lock_path.name.startswith(f".lock-exclusive-{os.getpid()}")
        assert markers(lock_dir) == [locker.exclusive_lock_path.name]
        locker.release_lock()

    def test_release_lock(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock()
        locker.release_lock()
        assert not locker.exclusive_lock_path.exists()
        assert markers(lock_dir) == []
        assert locker.acquire_shared_lock()
        locker.release_lock()
        assert not locker.shared_lock_path.exists()
        assert markers(lock_dir) == []

    def test_release_without_lock(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        locker.release_lock()
        locker.release_lock()
        assert markers(lock_dir) == []

    def test_multiple_shared_locks(self, lock_dir: Path) -> None:
        a, b = DirectoryLocker(lock_dir), DirectoryLocker(lock_dir)
        assert a.acquire_shared_lock(timeout=1.0)
        assert b.acquire_shared_lock(timeout=1.0)
        assert a.shared_lock_path != b.shared_lock_path
        assert markers(lock_dir) == sorted([a.shared_lock_path.name, b.shared_lock_path.name])
        a.release_lock()
        b.release_lock()
        assert markers(lock_dir) == []

    def test_exclusive_lock_blocks(self, lock_dir: Path) -> None:
        a, b = DirectoryLocker(lock_dir), DirectoryLocker(lock_dir)
        assert a.acquire_exclusive_lock(timeout=1.0)
        assert not b.acquire_exclusive_lock(timeout=0.1)
        assert not b.acquire_shared_lock(timeout=0.1)
        b.release_lock()  # the loser's release leaves the winner's marker
        assert markers(lock_dir) == [a.exclusive_lock_path.name]
        a.release_lock()
        assert b.acquire_exclusive_lock(timeout=1.0)
        b.release_lock()

    def test_lock_timeout(self, lock_dir: Path) -> None:
        a, b = DirectoryLocker(lock_dir), DirectoryLocker(lock_dir)
        assert a.acquire_shared_lock()
        started = time.monotonic()
        assert not b.acquire_exclusive_lock(timeout=0.2)
        assert time.monotonic() - started >= 0.2  # monotonic deadline, never early
        assert markers(lock_dir) == [a.shared_lock_path.name]  # b withdrew its claim
        a.release_lock()


class TestMarkers:
    def test_names_and_record(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock()
        pid = os.getpid()
        assert re.fullmatch(rf"\.lock-shared-{pid}-[0-9a-f]{{16}}", locker.shared_lock_path.name)
        record = json.loads(locker.shared_lock_path.read_text())
        assert record["pid"] == pid
        assert record["host"] == _platform.hostname()
        assert record["start"] == _platform.process_start_token(pid)
        assert record["mode"] == "shared"
        assert abs(record["created"] - time.time()) < 600
        locker.release_lock()
        assert locker.acquire_exclusive_lock()
        assert re.fullmatch(
            rf"\.lock-exclusive-{pid}-[0-9]{{20}}[0-9a-f]{{8}}", locker.exclusive_lock_path.name
        )
        if POSIX:
            assert locker.exclusive_lock_path.stat().st_mode & 0o777 == 0o644
        locker.release_lock()

    @pytest.mark.skipif(not POSIX, reason="POSIX umask")
    @pytest.mark.parametrize("umask", [0o077, 0o022])
    def test_marker_readable_whatever_the_umask(self, lock_dir: Path, umask: int) -> None:
        old = os.umask(umask)
        try:
            locker = DirectoryLocker(lock_dir)
            assert locker.acquire_exclusive_lock()
            assert locker.exclusive_lock_path.stat().st_mode & 0o777 == 0o644
            locker.release_lock()
        finally:
            os.umask(old)

    def test_forced_token_collision_gets_a_fresh_name(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        tokens = iter(["a" * 16, "a" * 16, "b" * 16])
        calls: list[int] = []

        def fake_token(nbytes: int) -> str:
            calls.append(nbytes)
            return next(tokens)

        monkeypatch.setattr(lockmod, "_random_token", fake_token)
        a, b = DirectoryLocker(lock_dir), DirectoryLocker(lock_dir)
        assert a.acquire_shared_lock()
        assert b.acquire_shared_lock()
        assert len(calls) == 3  # the seam was hit, and the collision forced a retry
        assert a.shared_lock_path.name.endswith("a" * 16)
        assert b.shared_lock_path.name.endswith("b" * 16)
        b.release_lock()
        assert markers(lock_dir) == [a.shared_lock_path.name]
        a.release_lock()

    def test_token_always_colliding_is_an_error_not_a_clobber(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(lockmod, "_random_token", lambda nbytes: "c" * 16)
        a, b = DirectoryLocker(lock_dir), DirectoryLocker(lock_dir)
        assert a.acquire_shared_lock()
        with pytest.raises(FileExistsError):
            b.acquire_shared_lock()
        assert markers(lock_dir) == [a.shared_lock_path.name]  # nothing pending left
        a.release_lock()
        assert b.acquire_shared_lock(timeout=0)  # b's instance is usable again
        b.release_lock()


class TestPublishFaults:
    def test_pending_file_swept_before_rename_is_republished(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real_rename = os.rename
        calls: list[str] = []

        def swept_first(src: str, dst: str) -> None:
            calls.append(dst)
            if len(calls) == 1:
                os.unlink(src)  # a peer's sweep removed our pending file
            real_rename(src, dst)

        monkeypatch.setattr(os, "rename", swept_first)
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock(timeout=0)
        assert len(calls) == 2
        assert markers(lock_dir) == [locker.exclusive_lock_path.name]
        assert str(locker.exclusive_lock_path) == calls[1]
        locker.release_lock()
        assert os.listdir(lock_dir) == []

    def test_write_failure_leaves_nothing_behind(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[int] = []

        def disk_full(fd: int, data: bytes) -> None:
            calls.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(lockmod, "_write_all", disk_full)
        locker = DirectoryLocker(lock_dir)
        with pytest.raises(OSError, match="No space left"):
            locker.acquire_exclusive_lock(timeout=5)
        assert len(calls) == 1
        assert os.listdir(lock_dir) == []  # no pending file, no marker

    def test_short_writes_are_completed(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real_write = os.write
        sizes: list[int] = []

        def dribble(fd: int, data: bytes | memoryview) -> int:
            sizes.append(len(data))
            return real_write(fd, bytes(data[:7]))

        monkeypatch.setattr(os, "write", dribble)
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock()
        monkeypatch.setattr(os, "write", real_write)
        assert len(sizes) > 10
        assert json.loads(locker.shared_lock_path.read_text())["pid"] == os.getpid()
        locker.release_lock()

    def test_repr(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert repr(locker) == f"DirectoryLocker({str(lock_dir)!r}, held=None)"
        with locker.exclusive():
            assert "held='exclusive'" in repr(locker)


class TestOddCases:
    """Rare paths: each test forces one and checks that it was taken."""

    def test_other_files_in_the_directory_are_ignored(self, lock_dir: Path) -> None:
        lock_dir.mkdir()
        (lock_dir / "index.json").write_text("{}")
        (lock_dir / ".lock-other-1-2").write_text("")  # not a marker kind we know
        a, b = DirectoryLocker(lock_dir), DirectoryLocker(lock_dir)
        assert a.acquire_exclusive_lock(timeout=0)
        assert not b.acquire_shared_lock(timeout=0)
        a.release_lock()
        assert sorted(os.listdir(lock_dir)) == [".lock-other-1-2", "index.json"]

    def test_directory_gone_during_the_scan(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real_listdir = os.listdir
        calls: list[str] = []

        def vanished_once(path: str) -> list[str]:
            calls.append(path)
            if len(calls) == 1:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            return real_listdir(path)

        monkeypatch.setattr(lockmod, "_listdir", vanished_once)
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock(timeout=30)  # claim not seen: published again
        assert len(calls) >= 2
        assert markers(lock_dir) == [locker.shared_lock_path.name]
        locker.release_lock()

    def test_reader_whose_marker_is_not_listed_publishes_again(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        real_listdir = os.listdir
        calls: list[str] = []

        def hide_once(path: str) -> list[str]:
            calls.append(path)
            return [] if len(calls) == 1 else real_listdir(path)

        monkeypatch.setattr(lockmod, "_listdir", hide_once)
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock(timeout=30)
        assert "vanished before the lock was taken" in caplog.text
        assert markers(lock_dir) == [locker.shared_lock_path.name]
        locker.release_lock()
        assert markers(lock_dir) == []

    def test_pending_name_in_use_takes_another_token(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        lock_dir.mkdir()
        busy = lock_dir / f".lock-pending-{os.getpid()}-{'a' * 16}"
        busy.write_text("")  # another instance of this process is publishing "aaaa..."
        tokens = iter(["a" * 16, "b" * 16])
        monkeypatch.setattr(lockmod, "_random_token", lambda nbytes: next(tokens))
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock(timeout=0)
        assert locker.shared_lock_path.name.endswith("b" * 16)
        assert busy.exists()
        locker.release_lock()

    def test_marker_we_may_not_read_is_held(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        lock_dir.mkdir()
        secret = plant(lock_dir, "exclusive", pid=dead_pid())
        old = time.time() - 3600
        os.utime(secret, (old, old))
        real_open = os.open
        refused: list[str] = []

        def deny_markers(path: str, flags: int, mode: int = 0o777) -> int:
            if os.path.basename(path) == secret.name:
                refused.append(path)
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_open(path, flags, mode)

        monkeypatch.setattr(os, "open", deny_markers)
        locker = DirectoryLocker(lock_dir)
        assert not locker.acquire_shared_lock(timeout=0.05)  # fail closed, however old
        assert refused
        assert secret.exists()

    def test_stale_marker_broken_by_someone_else_first(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        lock_dir.mkdir()
        pid = dead_pid()
        stale = plant(lock_dir, "exclusive", pid=pid)
        real_exists = _platform.pid_exists
        asked: list[int] = []

        def race(p: int) -> bool:
            asked.append(p)
            if asked.count(pid) == 2:  # 1: the name's pid; 2: the record's, then the verdict
                stale.unlink()  # a peer breaks it between our verdict and our unlink
            return real_exists(p)

        monkeypatch.setattr(_platform, "pid_exists", race)
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock(timeout=0)
        assert asked.count(pid) == 2
        assert not stale.exists()
        assert "broke stale" not in caplog.text  # the peer did it, not us
        locker.release_lock()

    def test_zombie_check_of_a_gone_pid(self) -> None:
        assert _platform.pid_is_zombie(dead_pid()) is False
        assert _platform.pid_is_zombie(os.getpid()) is False


if sys.platform == "linux":  # pid namespaces (and their cache) exist only there

    def test_pid_namespace_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
        def no_proc(path: str) -> str:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

        _platform.pid_namespace.cache_clear()
        monkeypatch.setattr(os, "readlink", no_proc)
        try:
            assert _platform.pid_namespace() is None
            monkeypatch.undo()
            assert _platform.pid_namespace() is None  # cached
        finally:
            _platform.pid_namespace.cache_clear()


class TestTimeouts:
    def test_timeout_zero_is_exactly_one_attempt(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
    ) -> None:
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock()
        listings: list[str] = []
        real_listdir = os.listdir

        def counting_listdir(path: str) -> list[str]:
            listings.append(path)
            return real_listdir(path)

        monkeypatch.setattr(lockmod, "_listdir", counting_listdir)
        other = DirectoryLocker(lock_dir)
        assert not other.acquire_shared_lock(timeout=0)
        assert (len(listings), len(sleeps)) == (1, 0)
        assert not other.acquire_exclusive_lock(timeout=0)
        assert (len(listings), len(sleeps)) == (2, 0)
        assert markers(lock_dir) == [holder.exclusive_lock_path.name]
        holder.release_lock()
        assert other.acquire_exclusive_lock(timeout=0)
        other.release_lock()

    def test_backoff_is_jittered_exponential_between_1_and_50_ms(self) -> None:
        for step in range(30):
            ceiling = min(0.05, 0.001 * 2**step)
            for _ in range(20):
                assert ceiling / 2 <= lockmod._backoff(step) <= ceiling
        assert len({lockmod._backoff(3) for _ in range(20)}) > 1

    def test_waiting_sleeps_within_bounds_and_deadline(
        self, lock_dir: Path, sleeps: list[float]
    ) -> None:
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock()
        assert not DirectoryLocker(lock_dir).acquire_exclusive_lock(timeout=0.3)
        assert len(sleeps) > 3
        assert all(0 < s <= 0.05 for s in sleeps)
        assert max(sleeps) > 0.002  # it backed off rather than spinning at 1 ms
        holder.release_lock()

    def test_a_waiter_without_a_marker_starts_slow_and_polls_faster_as_it_ages(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A reader behind a stream of writers withdraws its marker each time;
        # every hand-off (the marker it saw is gone) would reset its backoff,
        # but a newcomer's floor keeps it slow at first (8 ms, then 4, 2, 1).
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock()
        slept: list[float] = []

        def hand_off(seconds: float) -> None:
            slept.append(seconds)
            holder.release_lock()
            if len(slept) < 5:
                assert holder.acquire_exclusive_lock(timeout=0)

        monkeypatch.setattr(lockmod, "_sleep", hand_off)
        waiter = DirectoryLocker(lock_dir)
        assert waiter.acquire_shared_lock(timeout=5)
        assert len(slept) == 5
        ceilings = [0.008, 0.004, 0.002, 0.001, 0.001]
        for seconds, ceiling in zip(slept, ceilings, strict=True):
            assert ceiling / 2 <= seconds <= ceiling
        waiter.release_lock()
        assert markers(lock_dir) == []

    def test_a_standing_conflict_still_backs_off_to_the_cap(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A writer past its politeness (bounded barging, _POLITE_WAIT; the
        # polite start of the schedule is the next test's).
        monkeypatch.setattr(lockmod, "_POLITE_WAIT", 0.0)
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock()
        slept: list[float] = []

        def record(seconds: float) -> None:
            slept.append(seconds)
            if len(slept) == 8:
                holder.release_lock()

        monkeypatch.setattr(lockmod, "_sleep", record)
        waiter = DirectoryLocker(lock_dir)
        assert waiter.acquire_exclusive_lock(timeout=5)
        ceilings = [0.008, 0.016, 0.032, 0.05, 0.05, 0.05, 0.05, 0.05]
        for seconds, ceiling in zip(slept, ceilings, strict=True):
            assert ceiling / 2 <= seconds <= ceiling
        waiter.release_lock()
        assert markers(lock_dir) == []

    def test_a_polite_writer_wakes_when_its_politeness_ends_then_backs_off(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Young: slow, no reset, the last sleep ends at X exactly; then the cap as above."""
        monkeypatch.setattr(lockmod, "_POLITE_WAIT", 0.01)
        now = [0.0]
        monkeypatch.setattr(lockmod, "_monotonic", lambda: now[0])
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock()
        slept: list[float] = []

        def record(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds + 1e-9
            if len(slept) == 6:
                holder.release_lock()

        monkeypatch.setattr(lockmod, "_sleep", record)
        waiter = DirectoryLocker(lock_dir)
        assert waiter.acquire_exclusive_lock(timeout=5)
        assert 0.004 <= slept[0] <= 0.008  # the newcomer's floor
        assert slept[0] + slept[1] == pytest.approx(0.01, abs=1e-8)  # woke at X, not later
        for seconds, ceiling in zip(slept[2:], [0.032, 0.05, 0.05, 0.05], strict=True):
            assert ceiling / 2 <= seconds <= ceiling
        waiter.release_lock()
        assert markers(lock_dir) == []

    def test_negative_timeout_waits_without_limit(self, lock_dir: Path) -> None:
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock()
        result: list[bool] = []
        t = threading.Thread(
            target=lambda: result.append(DirectoryLocker(lock_dir).acquire_shared_lock(-1))
        )
        t.start()
        time.sleep(0.2)
        assert result == []
        holder.release_lock()
        t.join(30)
        assert result == [True]

    def test_nan_timeout_is_rejected(self, lock_dir: Path) -> None:
        with pytest.raises(ValueError, match="NaN"):
            DirectoryLocker(lock_dir).acquire_shared_lock(math.nan)
        assert markers(lock_dir) == []


class TestContextManagers:
    def test_shared_and_exclusive(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        with locker.shared(timeout=1) as held:
            assert held is locker
            assert locker.shared_lock_path.exists()
        assert markers(lock_dir) == []
        with locker.exclusive(timeout=1):
            assert locker.exclusive_lock_path.exists()
        assert markers(lock_dir) == []

    def test_released_on_exception(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        with pytest.raises(KeyError), locker.exclusive():
            raise KeyError("boom")
        assert markers(lock_dir) == []

    def test_timeout_raises_lock_timeout(self, lock_dir: Path) -> None:
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock()
        other = DirectoryLocker(lock_dir)
        with pytest.raises(LockTimeout) as info, other.shared(timeout=0.05):
            pytest.fail("must not enter")
        err = info.value
        assert isinstance(err, TimeoutError)
        assert (err.lock_dir, err.mode, err.timeout) == (lock_dir, "shared", 0.05)
        assert str(lock_dir) in str(err)
        assert "0.05 s" in str(err)
        clone = pickle.loads(pickle.dumps(err))
        assert type(clone) is LockTimeout
        assert (clone.lock_dir, clone.mode, clone.timeout, str(clone)) == (
            err.lock_dir,
            err.mode,
            err.timeout,
            str(err),
        )
        with pytest.raises(TimeoutError, match="exclusive"), other.exclusive(timeout=0):
            pytest.fail("must not enter")
        holder.release_lock()


class TestReentrancy:
    def test_same_mode_nests(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock()
        assert locker.acquire_shared_lock(timeout=0)
        assert markers(lock_dir) == [locker.shared_lock_path.name]
        locker.release_lock()
        assert markers(lock_dir) == [locker.shared_lock_path.name]
        locker.release_lock()
        assert markers(lock_dir) == []
        locker.release_lock()  # one more is harmless

    def test_nested_context_managers_keep_the_outer_hold(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        with locker.exclusive():
            with locker.exclusive(), locker.shared():
                pass
            assert locker.exclusive_lock_path.exists()  # the inner exits did not release
            assert not DirectoryLocker(lock_dir).acquire_shared_lock(timeout=0)
        assert markers(lock_dir) == []

    def test_shared_under_exclusive_nests(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock()
        assert locker.acquire_shared_lock(timeout=0)
        assert markers(lock_dir) == [locker.exclusive_lock_path.name]
        locker.release_lock()
        assert not DirectoryLocker(lock_dir).acquire_shared_lock(timeout=0)  # still exclusive
        locker.release_lock()
        assert markers(lock_dir) == []

    def test_upgrade_is_refused(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock()
        with pytest.raises(RuntimeError, match="upgrade"):
            locker.acquire_exclusive_lock(timeout=0)
        with pytest.raises(RuntimeError, match="upgrade"), locker.exclusive():
            pass
        assert markers(lock_dir) == [locker.shared_lock_path.name]  # still held, shared
        assert DirectoryLocker(lock_dir).acquire_shared_lock(timeout=0)
        locker.release_lock()


OPS = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(["shared", "exclusive", "release"])),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_instances_in_one_thread_follow_the_model(ops: list[tuple[int, str]]) -> None:
    """Random acquire/release sequences on three instances match a reader/writer model.

    Model: each instance holds (mode, depth) or nothing; a timeout=0 acquire
    nests on the holder (shared under exclusive too; an upgrade is a
    RuntimeError) and otherwise succeeds iff compatible with the other
    instances' holds. After every step the directory holds exactly the
    markers of the holding instances.
    """
    with tempfile.TemporaryDirectory() as tmp:
        lock_dir = Path(tmp) / "locks"
        lockers = [DirectoryLocker(lock_dir) for _ in range(3)]
        model: list[tuple[str, int] | None] = [None, None, None]
        for i, op in ops:
            held = model[i]
            others = [m[0] for j, m in enumerate(model) if j != i and m is not None]
            if op == "release":
                lockers[i].release_lock()
                if held is not None:
                    model[i] = (held[0], held[1] - 1) if held[1] > 1 else None
            elif held is not None and held[0] == "shared" and op == "exclusive":
                with pytest.raises(RuntimeError):
                    lockers[i].acquire_exclusive_lock(timeout=0)
            else:
                acquire = (
                    lockers[i].acquire_shared_lock
                    if op == "shared"
                    else lockers[i].acquire_exclusive_lock
                )
                got = acquire(timeout=0)
                if held is not None:
                    expected = True
                    model[i] = (held[0], held[1] + 1)
                else:
                    expected = not others if op == "exclusive" else "exclusive" not in others
                    if expected:
                        model[i] = (op, 1)
                assert got is expected, (i, op, model)
            want = sorted(
                (
                    lockers[j].shared_lock_path
                    if m[0] == "shared"
                    else lockers[j].exclusive_lock_path
                ).name
                for j, m in enumerate(model)
                if m is not None
            )
            assert markers(lock_dir) == want
        for locker in lockers:
            for _ in range(30):
                locker.release_lock()
        assert os.listdir(lock_dir) == []


class TestInstancesAndThreads:
    def test_two_instances_exclude_each_other(self, lock_dir: Path) -> None:
        a, b = DirectoryLocker(lock_dir), DirectoryLocker(lock_dir)
        assert a.acquire_shared_lock()
        assert not b.acquire_exclusive_lock(timeout=0.1)
        assert markers(lock_dir) == [a.shared_lock_path.name]
        b.release_lock()
        assert markers(lock_dir) == [a.shared_lock_path.name]
        a.release_lock()
        assert b.acquire_exclusive_lock()
        assert not a.acquire_shared_lock(timeout=0.05)
        a.release_lock()
        assert markers(lock_dir) == [b.exclusive_lock_path.name]
        b.release_lock()

    def test_threads_sharing_an_instance_take_turns(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        counter = lock_dir.parent / "counter"
        counter.write_text("0")
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(25):
                    with locker.exclusive(timeout=30):
                        value = int(counter.read_text())
                        time.sleep(0.0002)
                        counter.write_text(str(value + 1))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert counter.read_text() == "100"
        assert markers(lock_dir) == []

    def test_other_thread_waits_for_the_instance(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock()
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(locker.acquire_shared_lock(0)))
        t.start()
        t.join(30)
        assert result == [False]  # held by another thread through this instance
        t = threading.Thread(target=lambda: result.append(locker.acquire_exclusive_lock(-1)))
        t.start()
        time.sleep(0.05)
        assert result == [False]
        locker.release_lock()
        t.join(30)
        assert result == [False, True]
        assert markers(lock_dir) == [locker.exclusive_lock_path.name]
        locker.release_lock()
        assert markers(lock_dir) == []

    def test_separate_instances_in_threads_share(self, lock_dir: Path) -> None:
        barrier = threading.Barrier(4, timeout=30)
        results: list[bool] = []

        def read() -> None:
            locker = DirectoryLocker(lock_dir)
            results.append(locker.acquire_shared_lock(10))
            barrier.wait()  # all four hold at once
            locker.release_lock()

        threads = [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [True] * 4
        assert markers(lock_dir) == []


class TestFairness:
    def test_waiting_writer_stops_new_readers(self, lock_dir: Path) -> None:
        reader = DirectoryLocker(lock_dir)
        assert reader.acquire_shared_lock()
        writer = DirectoryLocker(lock_dir)
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(writer.acquire_exclusive_lock(30)))
        t.start()
        wait_for(
            lambda: any(n.startswith(".lock-exclusive-") for n in markers(lock_dir)),
            "the writer's claim",
        )
        late = DirectoryLocker(lock_dir)
        assert not late.acquire_shared_lock(timeout=0.05)  # writer preference
        reader.release_lock()
        t.join(30)
        assert result == [True]
        assert not late.acquire_shared_lock(timeout=0)
        writer.release_lock()
        assert late.acquire_shared_lock(timeout=0)
        late.release_lock()
        assert markers(lock_dir) == []

    @needs_proc
    def test_younger_writer_yields_to_an_older_claim(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        lock_dir.mkdir()
        older = plant(lock_dir, "exclusive", pid=os.getpid(), ticket="0" * 20 + "00000000")
        seen: list[list[str]] = []
        monkeypatch.setattr(lockmod, "_sleep", lambda s: seen.append(markers(lock_dir)))
        locker = DirectoryLocker(lock_dir)
        assert not locker.acquire_exclusive_lock(timeout=0.1)
        assert seen
        assert all(listing == [older.name] for listing in seen)  # never kept a claim
        assert markers(lock_dir) == [older.name]

    @needs_proc
    def test_older_writer_keeps_its_claim_against_a_younger(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        lock_dir.mkdir()
        younger = plant(lock_dir, "exclusive", pid=os.getpid(), ticket="9" * 20 + "ffffffff")
        seen: list[list[str]] = []
        monkeypatch.setattr(lockmod, "_sleep", lambda s: seen.append(markers(lock_dir)))
        locker = DirectoryLocker(lock_dir)
        assert not locker.acquire_exclusive_lock(timeout=0.1)
        assert seen
        assert all(len(listing) == 2 and younger.name in listing for listing in seen)
        assert markers(lock_dir) == [younger.name]  # withdrawn at the timeout


class TestBarging:
    """Bounded barging: a young writer leaves a returning holder the lock, up to _POLITE_WAIT."""

    @staticmethod
    def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
        """The waiters' age clock, advanced only by their own (fake) sleeps."""
        now = [0.0]
        monkeypatch.setattr(lockmod, "_monotonic", lambda: now[0])
        return now

    @needs_proc
    def test_a_young_waiter_lets_the_holder_take_the_lock_back(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(lockmod, "_POLITE_WAIT", 3600.0)  # young for the whole test
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock(timeout=0)
        waiter = DirectoryLocker(lock_dir)
        listings: list[list[str]] = []
        barges: list[bool] = []

        def between_polls(seconds: float) -> None:
            # The waiter is asleep: the holder releases and comes straight back.
            listings.append(markers(lock_dir))
            holder.release_lock()
            if len(barges) < 20:
                barges.append(holder.acquire_exclusive_lock(timeout=0))

        monkeypatch.setattr(lockmod, "_sleep", between_polls)
        assert waiter.acquire_exclusive_lock(timeout=60)
        # Every barge succeeded: the waiter never published while the holder was
        # there, so each listing between its polls shows the holder's marker alone.
        assert barges == [True] * 20
        assert len(listings) == 21
        assert all(len(listing) == 1 for listing in listings)
        assert waiter.exclusive_lock_path.name not in {n for ls in listings for n in ls}
        assert markers(lock_dir) == [waiter.exclusive_lock_path.name]
        waiter.release_lock()
        assert markers(lock_dir) == []

    @needs_proc
    def test_without_politeness_the_waiter_claims_its_turn_at_once(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """_POLITE_WAIT = 0 is the strict hand-off: the second barge already fails."""
        monkeypatch.setattr(lockmod, "_POLITE_WAIT", 0.0)
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock(timeout=0)
        waiter = DirectoryLocker(lock_dir)
        barges: list[bool] = []

        def between_polls(seconds: float) -> None:
            holder.release_lock()
            if len(barges) < 20:
                barges.append(holder.acquire_exclusive_lock(timeout=0))

        monkeypatch.setattr(lockmod, "_sleep", between_polls)
        assert waiter.acquire_exclusive_lock(timeout=60)
        assert barges == [True, False]  # claimed its turn at its second attempt
        waiter.release_lock()
        assert markers(lock_dir) == []

    @needs_proc
    @pytest.mark.parametrize("x", [0.002, 0.01, 0.05])
    def test_a_waiter_past_the_threshold_claims_and_goes_next(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch, x: float
    ) -> None:
        """Barges succeed while the waiter is young; at X it claims, the next barge yields."""
        monkeypatch.setattr(lockmod, "_POLITE_WAIT", x)
        now = self.fake_clock(monkeypatch)
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock(timeout=0)
        waiter = DirectoryLocker(lock_dir)
        start = now[0]  # the waiter's age counts from here (no sleep before its first try)
        log: list[tuple[float, bool, int]] = []  # (waiter's age, barge won, markers listed)

        def between_polls(seconds: float) -> None:
            now[0] += seconds + 1e-9  # a real sleep never ends early
            listed = len(markers(lock_dir))
            holder.release_lock()
            won = holder.acquire_exclusive_lock(timeout=0)
            log.append((now[0] - start, won, listed))
            if not won:  # the waiter claimed its turn: the holder goes away
                monkeypatch.setattr(lockmod, "_sleep", lambda s: pytest.fail("slept again"))

        monkeypatch.setattr(lockmod, "_sleep", between_polls)
        assert waiter.acquire_exclusive_lock(timeout=60)
        ages = [age for age, won, _ in log if won]
        lost = [(age, listed) for age, won, listed in log if not won]
        assert len(lost) == 1, log
        # Young: every barge won. Once its age reached X, one poll published the
        # claim (two markers listed), and the holder's very next acquire yielded.
        assert ages, log
        assert all(age < x for age in ages[:-1]), log
        assert x <= lost[0][0] < x + lockmod._BACKOFF_FIRST * 2**lockmod._HEAD_STEP, log
        assert lost[0][1] == 2
        assert all(listed == 1 for _, won, listed in log if won)
        # It slept no later than its politeness ran out: the last sleep before the
        # claim ended exactly at X (the sleep is capped at the time left).
        assert any(abs(age - x) < 1e-6 for age in ages), log
        waiter.release_lock()
        assert markers(lock_dir) == []

    @needs_proc
    @pytest.mark.parametrize(("handoff_after", "expected"), [(0.0, [True, False]), (3600.0, None)])
    def test_handoff_after_is_the_instance_s_own_threshold(
        self,
        lock_dir: Path,
        monkeypatch: pytest.MonkeyPatch,
        handoff_after: float,
        expected: list[bool] | None,
    ) -> None:
        """The module default is not consulted when the instance says otherwise."""
        monkeypatch.setattr(lockmod, "_POLITE_WAIT", 0.01 if handoff_after else 3600.0)
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock(timeout=0)
        waiter = DirectoryLocker(lock_dir, handoff_after=handoff_after)
        assert waiter.handoff_after == handoff_after
        now = self.fake_clock(monkeypatch)
        barges: list[bool] = []

        def between_polls(seconds: float) -> None:
            now[0] += seconds + 1e-9
            holder.release_lock()
            if len(barges) < 20:
                barges.append(holder.acquire_exclusive_lock(timeout=0))

        monkeypatch.setattr(lockmod, "_sleep", between_polls)
        assert waiter.acquire_exclusive_lock()  # no timeout: politeness is not capped
        # 0: strict hand-off, the second barge fails. 3600 s: all 20 barges win.
        assert barges == (expected if expected is not None else [True] * 20)
        waiter.release_lock()
        assert markers(lock_dir) == []

    @needs_proc
    def test_politeness_ends_at_half_the_timeout(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A patient writer behind a holder that keeps coming back still gets its turn in time."""
        now = self.fake_clock(monkeypatch)
        monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the deadline's clock too
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock(timeout=0)
        waiter = DirectoryLocker(lock_dir, handoff_after=3600.0)
        lost_at: list[float] = []

        def between_polls(seconds: float) -> None:
            now[0] += seconds + 1e-9
            holder.release_lock()
            if not lost_at and not holder.acquire_exclusive_lock(timeout=0):
                lost_at.append(now[0])

        monkeypatch.setattr(lockmod, "_sleep", between_polls)
        assert waiter.acquire_exclusive_lock(timeout=2.0)
        # Polite for 1 s (half the 2 s timeout, not 3600 s), then it claimed its
        # turn and the holder's next barge yielded.
        assert len(lost_at) == 1
        assert 1.0 <= lost_at[0] < 1.0 + 2 * lockmod._BACKOFF_FIRST
        waiter.release_lock()
        assert markers(lock_dir) == []

    @pytest.mark.parametrize("bad", [-0.001, math.nan, math.inf])
    def test_handoff_after_must_be_finite_and_not_negative(
        self, lock_dir: Path, bad: float
    ) -> None:
        with pytest.raises(ValueError, match="handoff_after"):
            DirectoryLocker(lock_dir, handoff_after=bad)

    def test_a_young_writer_still_stops_new_readers(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Politeness is towards writers only: readers holding do not keep a writer polite."""
        monkeypatch.setattr(lockmod, "_POLITE_WAIT", 3600.0)
        reader = DirectoryLocker(lock_dir)
        assert reader.acquire_shared_lock(timeout=0)
        writer = DirectoryLocker(lock_dir)
        late = DirectoryLocker(lock_dir)
        late_got: list[bool] = []

        def between_polls(seconds: float) -> None:
            assert any(n.startswith(".lock-exclusive-") for n in markers(lock_dir))
            late_got.append(late.acquire_shared_lock(timeout=0))
            if len(late_got) == 3:
                reader.release_lock()

        monkeypatch.setattr(lockmod, "_sleep", between_polls)
        assert writer.acquire_exclusive_lock(timeout=60)
        assert late_got == [False, False, False]  # the young writer's claim stopped them
        writer.release_lock()
        assert markers(lock_dir) == []

    def test_readers_do_not_barge_past_an_old_writer(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(lockmod, "_POLITE_WAIT", 0.01)
        now = self.fake_clock(monkeypatch)
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock(timeout=0)
        writer = DirectoryLocker(lock_dir)
        reader = DirectoryLocker(lock_dir)
        reads: list[bool] = []

        def between_polls(seconds: float) -> None:
            now[0] += seconds + 1e-9
            holder.release_lock()
            got = reader.acquire_shared_lock(timeout=0)
            reads.append(got)
            if got:
                reader.release_lock()
            if holder.acquire_exclusive_lock(timeout=0) is False:
                monkeypatch.setattr(lockmod, "_sleep", lambda s: None)

        monkeypatch.setattr(lockmod, "_sleep", between_polls)
        assert writer.acquire_exclusive_lock(timeout=60)
        assert not reader.acquire_shared_lock(timeout=0)  # the writer holds
        writer.release_lock()
        # The young writer left the gaps to the reader; the old one's claim closed them.
        assert reads[0] is True, reads
        assert reads[-1] is False, reads
        assert markers(lock_dir) == []

    @needs_fork
    def test_a_barging_process_cannot_starve_a_waiter(self, tmp_path: Path) -> None:
        """Real processes: a holder that comes back at once; a waiter still gets in, each time."""
        lock_dir = tmp_path / "locks"
        ctx = mp_context()
        holds, stop = ctx.Value("i", 0), ctx.Event()
        holder = ctx.Process(target=barging_holder, args=(str(lock_dir), holds, stop))
        holder.start()
        got: list[bool] = []

        def holds_reach(target: int) -> bool:
            return bool(holds.value >= target)

        try:
            waiter = DirectoryLocker(lock_dir)
            for _ in range(10):
                # Arrive while the holder is in its stride (it held 3 times since).
                wait_for(functools.partial(holds_reach, holds.value + 3), "the holder's holds")
                got.append(waiter.acquire_exclusive_lock(timeout=60))
                if got[-1]:
                    waiter.release_lock()
        finally:
            stop.set()
            holder.join(60)
            if holder.is_alive():
                holder.kill()
                holder.join(30)
        assert got == [True] * 10
        assert holder.exitcode == 0
        assert holds.value >= 30
        assert markers(lock_dir) == []


class TestStaleMarkers:
    def test_dead_pid_is_broken_with_a_warning(
        self, lock_dir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        lock_dir.mkdir()
        pid = dead_pid()
        stale = plant(lock_dir, "exclusive", pid=pid, start="gone")
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock(timeout=0)
        assert not stale.exists()
        assert any(
            r.levelno == logging.WARNING and stale.name in r.getMessage() for r in caplog.records
        )
        locker.release_lock()
        assert markers(lock_dir) == []

    @needs_proc
    def test_live_pid_with_another_start_token_is_reused(
        self, lock_dir: Path, caplog: pytest.LogCaptureFixture, sleeps: list[float]
    ) -> None:
        lock_dir.mkdir()
        stale = plant(lock_dir, "shared", pid=os.getpid(), start="boot:1")
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock(timeout=30)
        assert len(sleeps) <= 1  # judged in full on its second sighting
        assert not stale.exists()
        assert f"process {os.getpid()} is gone, a zombie, or reused" in caplog.text
        locker.release_lock()

    @needs_proc
    def test_live_holder_judged_by_the_start_token_seam(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock()
        other = DirectoryLocker(lock_dir)
        calls: list[int] = []
        real = _platform.process_start_token

        def same(pid: int) -> str | None:
            calls.append(pid)
            return real(pid)

        monkeypatch.setattr(_platform, "process_start_token", same)
        assert not other.acquire_shared_lock(timeout=0.1)  # live, same token: held
        assert calls
        assert set(calls) == {os.getpid()}
        assert holder.exclusive_lock_path.exists()

        def reused(pid: int) -> str | None:
            calls.append(pid)
            return "another-boot:42"

        monkeypatch.setattr(_platform, "process_start_token", reused)
        fresh = DirectoryLocker(lock_dir)  # no cached verdict
        assert fresh.acquire_shared_lock(timeout=30)  # pid "reused": the marker was stale
        assert calls[-1] == os.getpid()
        assert not holder.exclusive_lock_path.exists()
        fresh.release_lock()
        holder.release_lock()  # its marker vanished: logged, not raised

    def test_other_host_is_held(self, lock_dir: Path) -> None:
        lock_dir.mkdir()
        pid = dead_pid()
        foreign = plant(lock_dir, "exclusive", pid=pid, host="elsewhere.example", start=None)
        assert not DirectoryLocker(lock_dir).acquire_shared_lock(timeout=0.05)
        assert foreign.exists()

    def test_other_pid_namespace_is_held(self, lock_dir: Path) -> None:
        lock_dir.mkdir()
        pid = dead_pid()
        foreign = plant(lock_dir, "exclusive", pid=pid, pidns="pid:[1]", start=None)
        assert not DirectoryLocker(lock_dir).acquire_shared_lock(timeout=0.05)
        assert foreign.exists()

    def test_unknown_start_token_with_live_pid_is_held(self, lock_dir: Path) -> None:
        lock_dir.mkdir()
        live = plant(lock_dir, "exclusive", pid=os.getpid(), start=None)
        assert not DirectoryLocker(lock_dir).acquire_shared_lock(timeout=0.05)
        assert live.exists()

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b"{not json",
            b"[1, 2]",
            b'{"pid": 1}',
            b'{"pid": 999999, "host": "h"}',
            b'{"pid": true, "host": "h"}',
            b'{"pid": "1", "host": "h"}',
            b'{"pid": 1, "host": "h", "start": 5}',
            b"\xff\xfe",
        ],
    )
    def test_unreadable_record_held_for_a_grace_then_broken(
        self, lock_dir: Path, raw: bytes, caplog: pytest.LogCaptureFixture
    ) -> None:
        lock_dir.mkdir()
        junk = plant(lock_dir, "exclusive", pid=os.getpid(), raw=raw)
        locker = DirectoryLocker(lock_dir)
        assert not locker.acquire_shared_lock(timeout=0.05)
        assert junk.exists()
        old = time.time() - 60
        os.utime(junk, (old, old))
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        assert locker.acquire_shared_lock(timeout=0)
        assert not junk.exists()
        assert "unreadable" in caplog.text
        locker.release_lock()

    def test_non_marker_that_cannot_be_removed_is_ignored_quietly(
        self, lock_dir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        lock_dir.mkdir()
        odd = lock_dir / f".lock-exclusive-{os.getpid()}-{'0' * 28}"
        odd.mkdir()  # not a file: never a conflict, and unlink() refuses it
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker = DirectoryLocker(lock_dir)
        for _ in range(3):
            assert locker.acquire_exclusive_lock(timeout=30)
            locker.release_lock()
        assert odd.is_dir()
        warnings = [r for r in caplog.records if "named like a lock marker" in r.getMessage()]
        assert len(warnings) == 1
        assert "ignoring" in warnings[0].getMessage()
        assert "it is a directory" in warnings[0].getMessage()

    @pytest.mark.skipif(not POSIX, reason="symlinks need privileges on Windows")
    def test_symlinked_marker_is_never_followed(
        self, lock_dir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        lock_dir.mkdir()
        elsewhere = lock_dir.parent / "record.json"
        elsewhere.write_text('{"pid": 1, "host": "h"}')
        link = lock_dir / f".lock-exclusive-{os.getpid()}-{'0' * 28}"
        link.symlink_to(elsewhere)
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock(timeout=30)  # not a marker: never a conflict
        assert not link.is_symlink()  # the link was removed ...
        assert elsewhere.read_text() == '{"pid": 1, "host": "h"}'  # ... not its target
        assert "symbolic link" in caplog.text
        locker.release_lock()
        assert os.listdir(lock_dir) == []

    def test_marker_released_between_listing_and_reading(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ghost = f".lock-exclusive-{os.getpid()}-{'0' * 28}"
        real_listdir = os.listdir
        monkeypatch.setattr(lockmod, "_listdir", lambda p: [*real_listdir(p), ghost])
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock(timeout=30)  # gone when read: not a conflict
        locker.release_lock()

    def test_orphaned_pending_file_is_swept(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        lock_dir.mkdir()
        orphan = lock_dir / ".lock-pending-99999-0123456789abcdef"
        orphan.write_text("{}")
        monkeypatch.setattr(lockmod, "_PENDING_GRACE", 0.0)
        locker = DirectoryLocker(lock_dir)
        for _ in range(3):
            assert locker.acquire_shared_lock()
            locker.release_lock()
            time.sleep(0.01)
        assert not orphan.exists()
        assert os.listdir(lock_dir) == []

    def test_pending_file_of_a_dead_pid_goes_at_the_first_scan(self, lock_dir: Path) -> None:
        # A one-shot locker (a CLI call) must clean up a killed publisher's
        # pending file without waiting out the grace period.
        lock_dir.mkdir()
        orphan = lock_dir / f".lock-pending-{dead_pid()}-0123456789abcdef"
        orphan.write_text("{}")
        live = lock_dir / f".lock-pending-{os.getppid()}-0123456789abcdef"
        live.write_text("{}")
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock(timeout=0)
        locker.release_lock()
        assert not orphan.exists()
        assert live.exists(), "a live publisher's pending file waits out the grace period"


class TestDirectory:
    def test_deleted_while_held(self, lock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock()
        shutil.rmtree(lock_dir)
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker.release_lock()  # never raises
        assert "vanished" in caplog.text
        assert locker.acquire_shared_lock(timeout=0)  # re-creates the directory
        assert markers(lock_dir) == [locker.shared_lock_path.name]
        locker.release_lock()

    def test_deleted_before_acquire(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        lock_dir.rmdir()
        assert locker.acquire_exclusive_lock(timeout=0)
        assert lock_dir.is_dir()
        locker.release_lock()
        assert markers(lock_dir) == []

    def test_marker_removed_behind_a_waiting_writer_is_republished(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        reader = DirectoryLocker(lock_dir)
        assert reader.acquire_shared_lock()
        removed: list[str] = []

        def meddle(seconds: float) -> None:
            claims = [n for n in markers(lock_dir) if n.startswith(".lock-exclusive-")]
            if claims and not removed:
                os.unlink(lock_dir / claims[0])  # someone deletes the writer's claim
                removed.append(claims[0])
                reader.release_lock()
            time.sleep(seconds)

        monkeypatch.setattr(lockmod, "_sleep", meddle)
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        writer = DirectoryLocker(lock_dir)
        assert writer.acquire_exclusive_lock(timeout=10)
        assert removed
        assert writer.exclusive_lock_path.name != removed[0]
        assert "vanished before the lock was taken" in caplog.text
        writer.release_lock()
        assert markers(lock_dir) == []

    def test_path_is_a_file(self, tmp_path: Path) -> None:
        path = tmp_path / "file"
        path.write_text("x")
        with pytest.raises(NotADirectoryError) as info:
            DirectoryLocker(path)
        assert info.value.filename == str(path)
        assert path.read_text() == "x"

    def test_directory_replaced_by_a_file(self, lock_dir: Path) -> None:
        locker = DirectoryLocker(lock_dir)
        lock_dir.rmdir()
        lock_dir.write_text("x")
        with pytest.raises(NotADirectoryError):
            locker.acquire_exclusive_lock(timeout=5)
        assert lock_dir.read_text() == "x"

    def test_relative_path_is_fixed_at_construction(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        locker = DirectoryLocker("locks")
        monkeypatch.chdir(tmp_path.parent)
        assert locker.acquire_shared_lock()
        assert markers(tmp_path / "locks") == [locker.shared_lock_path.name]
        locker.release_lock()

    def test_release_never_raises(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_shared_lock()
        calls: list[str] = []

        def refuse(path: str) -> None:
            calls.append(path)
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(lockmod, "_unlink", refuse)
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker.release_lock()
        assert calls == [str(locker.shared_lock_path)]
        assert "could not remove" in caplog.text
        locker.release_lock()
        assert calls == [str(locker.shared_lock_path)]  # state cleared: not retried

    @pytest.mark.parametrize("mode", ["shared", "exclusive"])
    def test_error_after_publish_withdraws_the_claim(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str
    ) -> None:
        calls: list[str] = []

        def broken_listdir(path: str) -> list[str]:
            calls.append(os.listdir(path)[0])  # our claim is on disk at this point
            raise OSError(errno.EIO, "I/O error", path)

        monkeypatch.setattr(lockmod, "_listdir", broken_listdir)
        locker = DirectoryLocker(lock_dir)
        acquire = locker.acquire_shared_lock if mode == "shared" else locker.acquire_exclusive_lock
        with pytest.raises(OSError, match="I/O error"):
            acquire(5)
        assert len(calls) == 1
        assert calls[0].startswith(f".lock-{mode}-")
        assert os.listdir(lock_dir) == []  # withdrawn before the error propagated
        monkeypatch.setattr(lockmod, "_listdir", os.listdir)
        assert acquire(0)
        locker.release_lock()

    def test_interrupt_while_waiting_leaves_no_marker(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        reader = DirectoryLocker(lock_dir)
        assert reader.acquire_shared_lock()

        def interrupt(seconds: float) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(lockmod, "_sleep", interrupt)
        writer = DirectoryLocker(lock_dir)
        with pytest.raises(KeyboardInterrupt):
            writer.acquire_exclusive_lock(timeout=10)
        assert markers(lock_dir) == [reader.shared_lock_path.name]
        reader.release_lock()
        monkeypatch.setattr(lockmod, "_sleep", time.sleep)
        assert writer.acquire_exclusive_lock(timeout=0)  # the instance is free again
        writer.release_lock()


class TestHostileDirectory:
    """Files we did not write, and faults of our own, never hang us or break a live hold."""

    @pytest.mark.parametrize("pid_text", ["99999999999", "2147483648", "\u00b2", "0"])
    @pytest.mark.parametrize("mode", ["exclusive", "shared"])
    def test_marker_with_an_odd_pid_is_never_proof_of_death(
        self, lock_dir: Path, caplog: pytest.LogCaptureFixture, pid_text: str, mode: str
    ) -> None:
        # Issue 11 item 5: such names raised OverflowError/ValueError (and pid 0
        # counted as dead). They are foreign files: garbage, held for the grace.
        lock_dir.mkdir()
        ticket = "0" * 20 + "a" * 8 if mode == "exclusive" else "a" * 16
        odd = lock_dir / f".lock-{mode}-{pid_text}-{ticket}"
        record = {
            "pid": int(pid_text) if pid_text.isascii() else 2,
            "host": _platform.hostname(),
            "pidns": _platform.pid_namespace(),
            "start": None,
            "created": time.time(),
            "mode": mode,
        }
        odd.write_text(json.dumps(record))
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker = DirectoryLocker(lock_dir)
        assert not locker.acquire_exclusive_lock(timeout=0.1)  # young garbage: held
        if mode == "exclusive":
            assert not locker.acquire_shared_lock(timeout=0.05)
        assert odd.exists()
        old = time.time() - 60
        os.utime(odd, (old, old))
        assert locker.acquire_exclusive_lock(timeout=0)  # past the grace: broken as garbage
        assert not odd.exists()
        assert "unreadable" in caplog.text
        assert "is gone" not in caplog.text  # never judged by the number in its name
        locker.release_lock()
        assert markers(lock_dir) == []

    @pytest.mark.parametrize("pid_text", ["99999999999", "2147483648", "\u00b2", "0"])
    def test_pending_file_with_an_odd_pid_waits_out_the_grace(
        self, lock_dir: Path, monkeypatch: pytest.MonkeyPatch, pid_text: str
    ) -> None:
        lock_dir.mkdir()
        pending = lock_dir / f".lock-pending-{pid_text}-0123456789abcdef"
        pending.write_text("{}")
        locker = DirectoryLocker(lock_dir)
        assert locker.acquire_exclusive_lock(timeout=0)  # a pending file is no conflict
        locker.release_lock()
        assert pending.exists()  # its "pid" proves nothing: not removed as dead
        monkeypatch.setattr(lockmod, "_PENDING_GRACE", 0.0)
        for _ in range(3):
            assert locker.acquire_shared_lock(timeout=0)
            locker.release_lock()
            time.sleep(0.01)
        assert os.listdir(lock_dir) == []  # gone by the grace rule

    @pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE, errno.EIO])
    def test_read_error_of_our_own_never_breaks_a_live_holder(
        self,
        lock_dir: Path,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        err: int,
    ) -> None:
        # Issue 11 item 6: a waiter out of file descriptors counted the live
        # holder's marker as unreadable garbage and deleted it after the grace.
        holder = DirectoryLocker(lock_dir)
        assert holder.acquire_exclusive_lock()
        marker = holder.exclusive_lock_path
        old = time.time() - 3600  # far past any grace period
        os.utime(marker, (old, old))
        real_open = os.open
        refused: list[str] = []

        def out_of_fds(
            path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
        ) -> int:
            if os.path.basename(path).startswith((".lock-shared-", ".lock-exclusive-")):
                refused.append(path)
                raise OSError(err, os.strerror(err), path)
            return real_open(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", out_of_fds)
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        waiter = DirectoryLocker(lock_dir)
        assert not waiter.acquire_exclusive_lock(timeout=0.3)
        assert not waiter.acquire_shared_lock(timeout=0.1)
        assert refused == [str(marker)] * len(refused)
        assert refused  # the fault was hit
        monkeypatch.setattr(os, "open", real_open)
        assert marker.exists()
        assert "broke" not in caplog.text
        holder.release_lock()
        assert waiter.acquire_exclusive_lock(timeout=0)
        waiter.release_lock()
        assert markers(lock_dir) == []

    def test_empty_lock_dir_is_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Issue 11 item 12: "" silently locked the working directory.
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ValueError, match="lock_dir"):
            DirectoryLocker("")
        assert os.listdir(tmp_path) == []

    @pytest.mark.skipif(not POSIX, reason="symlinks need privileges on Windows")
    @pytest.mark.parametrize("spelling", ["relative", "absolute"])
    def test_dotdot_after_a_symlink_names_the_directory_the_kernel_does(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
    ) -> None:
        # Issue 11 item 12: "link/../d" was normalised as text to "./d", so two
        # lockers of one directory, spelled two ways, both held exclusive.
        real = Path(os.path.realpath(tmp_path)) / "real"
        (real / "sub").mkdir(parents=True)
        (tmp_path / "link").symlink_to(real / "sub")
        monkeypatch.chdir(tmp_path)
        via_link = os.path.join("link", "..", "d")  # the kernel: real/d
        if spelling == "absolute":
            via_link = os.path.join(tmp_path, via_link)
        spelled = DirectoryLocker(via_link)
        plain = DirectoryLocker(real / "d")
        assert spelled.acquire_exclusive_lock(timeout=0)
        assert not plain.acquire_exclusive_lock(timeout=0)
        assert not plain.acquire_shared_lock(timeout=0)
        assert spelled.exclusive_lock_path.parent == real / "d"
        assert markers(real / "d") == [spelled.exclusive_lock_path.name]
        assert not (tmp_path / "d").exists()  # textual normalisation would have made ./d
        spelled.release_lock()
        assert plain.acquire_exclusive_lock(timeout=0)
        assert not spelled.acquire_shared_lock(timeout=0)
        plain.release_lock()
        assert markers(real / "d") == []


if sys.platform != "win32":  # FIFOs, sockets and symlinks as POSIX has them

    class TestNonRegularMarkers:
        """Issue 11 item 4: nodes named like markers that are no regular files."""

        @staticmethod
        def make_node(
            lock_dir: Path, name: str, kind: str, monkeypatch: pytest.MonkeyPatch
        ) -> Path:
            path = lock_dir / name
            if kind == "fifo":
                os.mkfifo(path)
            elif kind == "symlink-to-fifo":
                os.mkfifo(lock_dir.parent / "fifo")
                path.symlink_to(lock_dir.parent / "fifo")
            elif kind == "directory":
                path.mkdir()
            else:  # a socket; AF_UNIX paths are short, so bind by the name inside the directory
                monkeypatch.chdir(lock_dir)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.bind(name)
            return path

        @pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo", "directory", "socket"])
        @pytest.mark.parametrize("mode", ["exclusive", "shared"])
        def test_non_regular_marker_never_blocks_and_never_conflicts(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, mode: str
        ) -> None:
            # Issue 11 item 4: a FIFO named like a marker made every acquirer block
            # in open() forever. Pid 1 exists, so the name alone says "held" and
            # the node is read on the second sighting.
            lock_dir = tmp_path / "locks"
            lock_dir.mkdir()
            ticket = "0" * 20 + "a" * 8 if mode == "exclusive" else "a" * 16
            node = self.make_node(lock_dir, f".lock-{mode}-1-{ticket}", kind, monkeypatch)
            ctx = mp_context()
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=acquire_once, args=(str(lock_dir), "exclusive", 1.0, child))
            p.start()
            child.close()
            try:
                answered = parent.poll(20)
            finally:
                if not answered:
                    p.kill()  # blocked in a filesystem call
                p.join(30)
            assert answered, f"acquire(timeout=1) did not return: blocked on a {kind}"
            result = parent.recv()
            assert "error" not in result, result
            assert result["ok"] is True  # not a marker of ours: never a conflict
            assert p.exitcode == 0
            # Removed where it can be (unlink cannot remove a directory): ignored otherwise.
            assert os.path.lexists(node) == (kind == "directory")
            if kind == "symlink-to-fifo":
                assert stat.S_ISFIFO(os.lstat(lock_dir.parent / "fifo").st_mode)  # not followed
            assert markers(lock_dir) == ([node.name] if kind == "directory" else [])


def test_writer_behind_continuous_readers_gets_in(tmp_path: Path) -> None:
    """A short version of the torture file's measurement: the writer is not starved."""
    lock_dir = tmp_path / "locks"
    ctx = mp_context()
    stop = ctx.Event()
    started = [ctx.Event() for _ in range(3)]
    outs = [tmp_path / f"reader-{i}" for i in range(3)]
    readers = [
        ctx.Process(
            target=continuous_reader, args=(str(lock_dir), stop, started[i], 0.005, str(outs[i]))
        )
        for i in range(3)
    ]
    for p in readers:
        p.start()
    try:
        assert all(e.wait(60) for e in started)
        writer = DirectoryLocker(lock_dir)
        for _ in range(3):
            assert writer.acquire_exclusive_lock(timeout=60)
            writer.release_lock()
    finally:
        stop.set()
        for p in readers:
            p.join(30)
    assert [p.exitcode for p in readers] == [0, 0, 0]
    assert all(int(o.read_text()) > 0 for o in outs)
    assert markers(lock_dir) == []


if sys.platform != "win32":  # fork, signals, uids: POSIX only
    from _lockhelpers import interrupted_loop

    def test_keyboard_interrupt_at_any_instant_leaks_nothing(tmp_path: Path) -> None:
        """Issue 11 item 8: Ctrl-C inside acquire or release, in an application that goes on.

        A real process loops over acquire/release (both APIs, nesting,
        timeouts, against a contending process) while SIGINT arrives at random
        instants; after each call it must hold no marker or pending file it
        does not know it holds, never see an exception but KeyboardInterrupt
        (``RuntimeError('release unlocked lock')`` was seen), and, once done,
        must not stop another process from taking the lock at once.
        """
        lock_dir = tmp_path / "locks"
        DirectoryLocker(lock_dir)
        ctx = mp_context()
        busy, stop = ctx.Event(), ctx.Event()
        rival = ctx.Process(target=contender, args=(str(lock_dir), 7, busy, stop))
        finished, done = ctx.Event(), ctx.Event()
        out = tmp_path / "report.json"
        iterations = 1500
        victim = ctx.Process(
            target=interrupted_loop, args=(str(lock_dir), iterations, 11, str(out), finished, done)
        )
        rival.start()
        try:
            assert busy.wait(60)
            victim.start()
            try:
                assert finished.wait(120), "the interrupted process did not finish its loop"
                stop.set()
                rival.join(30)
                report = json.loads(out.read_text())
                print(f"\ninterrupted loop: {report}")
                assert report["n_errors"] == 0, report["errors"]
                assert report["n_leaks"] == 0, report["leaks"]
                assert report["final"] == []
                # The faults were hit: many interrupts, landing all over the lock's code.
                # (At least a fifth of the calls: how many land depends on how long
                # the calls last, which the rival and the machine's load decide.)
                assert report["raised"] >= iterations // 5
                assert len([w for w in report["landed"] if w.startswith("atomic_ops.py:")]) >= 3
                assert report["acquired"] > 0
                assert victim.is_alive()  # its markers would count as held if any were left
                assert os.listdir(lock_dir) == []
                other = DirectoryLocker(lock_dir)
                assert other.acquire_exclusive_lock(timeout=0)
                other.release_lock()
            finally:
                done.set()
                victim.join(30)
                if victim.is_alive():  # stuck (a deadlock inside the lock): do not leave it
                    victim.kill()
                    victim.join(30)
        finally:
            stop.set()
            rival.join(30)
            if rival.is_alive():
                rival.kill()
                rival.join(30)
        assert (victim.exitcode, rival.exitcode) == (0, 0)

    class TestZombie:
        @needs_fork
        @pytest.mark.skipif(sys.platform != "linux", reason="zombie state read from /proc")
        def test_zombie_holder_is_dead(self, lock_dir: Path, sleeps: list[float]) -> None:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    child = DirectoryLocker(lock_dir)
                    os.write(w, b"1" if child.acquire_exclusive_lock(10) else b"0")
                    time.sleep(60)
                finally:
                    os._exit(1)
            try:
                os.close(w)
                assert os.read(r, 1) == b"1"
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: _platform.pid_is_zombie(pid), "the zombie")
                assert _platform.pid_exists(pid)  # kill(pid, 0) still succeeds
                locker = DirectoryLocker(lock_dir)
                assert locker.acquire_exclusive_lock(timeout=30)
                assert len(sleeps) <= 1  # not beyond one backoff step
                locker.release_lock()
            finally:
                os.close(r)
                _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status)
            assert os.WTERMSIG(status) == signal.SIGKILL
            assert markers(lock_dir) == []

    @pytest.mark.parametrize("mode", ["exclusive", "shared"])
    def test_sigkilled_holder_does_not_block(
        tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        lock_dir = tmp_path / "locks"
        ctx = mp_context()
        ready = ctx.Event()
        info = tmp_path / "marker.txt"
        p = ctx.Process(target=hold_until_killed, args=(str(lock_dir), mode, ready, str(info)))
        p.start()
        try:
            assert ready.wait(60)
            marker = Path(info.read_text())
            assert marker.exists()
            assert not DirectoryLocker(lock_dir).acquire_exclusive_lock(timeout=0)  # live: held
        finally:
            p.kill()
            p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert marker.exists()  # the dead holder left it behind
        caplog.set_level(logging.WARNING, logger=lockmod.__name__)
        locker = DirectoryLocker(lock_dir)
        started = time.perf_counter()
        assert locker.acquire_exclusive_lock(timeout=0)  # first attempt: no backoff step at all
        elapsed = time.perf_counter() - started
        print(f"\nSIGKILLed {mode} holder: next exclusive acquire took {elapsed * 1e3:.2f} ms")
        assert not marker.exists()
        assert f"process {p.pid} is gone" in caplog.text
        locker.release_lock()
        assert markers(lock_dir) == []

    class TestFork:
        @needs_fork
        def test_child_release_is_a_no_op_and_parent_still_holds(self, lock_dir: Path) -> None:
            locker = DirectoryLocker(lock_dir)
            assert locker.acquire_exclusive_lock()
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 1
                try:
                    locker.release_lock()
                    ok = locker.exclusive_lock_path.exists() and locker.pid == os.getpid()
                    # the inherited instance is fresh: it does not think it holds anything
                    ok = ok and not locker.acquire_shared_lock(timeout=0)
                    os.write(w, b"1" if ok else b"0")
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            try:
                assert os.read(r, 1) == b"1"
            finally:
                os.close(r)
                _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert locker.exclusive_lock_path.exists()
            assert markers(lock_dir) == [locker.exclusive_lock_path.name]
            locker.release_lock()
            assert markers(lock_dir) == []

        @needs_fork
        def test_fork_that_bypassed_the_hook_is_caught(self, lock_dir: Path) -> None:
            locker = DirectoryLocker(lock_dir)
            assert locker.acquire_exclusive_lock()
            parent = (locker.pid, locker._mode, locker._depth, locker._marker, locker._thread)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 1
                try:
                    # Put back the parent's state, as if the at-fork hook had not run.
                    (locker.pid, locker._mode, locker._depth, locker._marker, locker._thread) = (
                        parent
                    )
                    locker.release_lock()  # not ours: must not unlink the parent's marker
                    kept = locker.exclusive_lock_path.exists()
                    # Not "reentrant": the parent's exclusive hold still excludes the child.
                    refused = not locker.acquire_shared_lock(timeout=0)
                    os.write(w, b"1" if kept and refused and locker.pid == os.getpid() else b"0")
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            try:
                assert os.read(r, 1) == b"1"
            finally:
                os.close(r)
                _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert markers(lock_dir) == [locker.exclusive_lock_path.name]
            locker.release_lock()
            assert markers(lock_dir) == []

        @needs_fork
        @needs_proc
        def test_forked_children_holding_are_never_stale(self, tmp_path: Path) -> None:
            lock_dir = tmp_path / "locks"
            DirectoryLocker(lock_dir)  # created before the fork, like a pool's parent
            ctx = mp_context()
            ready, release = ctx.Event(), ctx.Event()
            procs, infos = [], []
            for i in range(3):
                info = tmp_path / f"info-{i}.json"
                p = ctx.Process(
                    target=hold_then_release,
                    args=(str(lock_dir), "shared", ready, release, str(info)),
                )
                p.start()
                procs.append(p)
                infos.append(info)
                assert ready.wait(60)
                ready.clear()
            try:
                for p, info in zip(procs, infos, strict=True):
                    data = json.loads(info.read_text())
                    assert data["ok"]
                    record = json.loads(data["record"])
                    assert record["pid"] == data["pid"] == p.pid
                    assert p.pid is not None
                    # each child published its own start time, not the parent's
                    assert record["start"] == _platform.process_start_token(p.pid)
                    assert record["start"] != _platform.process_start_token(os.getpid())
                writer = DirectoryLocker(lock_dir)
                assert not writer.acquire_exclusive_lock(timeout=0.3)
                assert len(markers(lock_dir)) == 3  # nobody broke a live child's marker
            finally:
                release.set()
                for p in procs:
                    p.join(30)
            assert [p.exitcode for p in procs] == [0, 0, 0]
            assert markers(lock_dir) == []
            assert writer.acquire_exclusive_lock(timeout=0)
            writer.release_lock()

        @needs_fork
        def test_inherited_instance_acquires_as_the_child(self, lock_dir: Path) -> None:
            locker = DirectoryLocker(lock_dir)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    ok = locker.acquire_exclusive_lock(10)
                    name = locker.exclusive_lock_path.name
                    os.write(w, f"{int(ok)} {name}\n".encode())
                    time.sleep(0.5)
                    locker.release_lock()
                finally:
                    os._exit(0)
            os.close(w)
            try:
                with os.fdopen(r) as f:
                    flag, name = f.readline().split()
                assert flag == "1"
                assert name.startswith(f".lock-exclusive-{pid}-")
            finally:
                _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert markers(lock_dir) == []

    @pytest.mark.skipif(not POSIX or os.geteuid() != 0, reason="needs root to drop to uid 65534")
    class TestUnprivileged:
        """A directory the caller cannot write fails at once, naming the path."""

        @pytest.fixture
        def root_owned_dir(self) -> Iterator[Path]:
            path = Path(tempfile.mkdtemp(prefix="htmlgraph-lock-", dir="/tmp"))
            path.chmod(0o755)
            try:
                yield path
            finally:
                shutil.rmtree(path)

        def run_child(self, lock_dir: Path, mode: str) -> dict[str, object]:
            from _lockhelpers import unprivileged_acquire

            ctx = mp_context()
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=unprivileged_acquire, args=(str(lock_dir), mode, 65534, child))
            p.start()
            child.close()
            assert parent.poll(60)
            result: dict[str, object] = parent.recv()
            p.join(30)
            assert p.exitcode == 0
            return result

        @pytest.mark.parametrize("mode", ["exclusive", "shared"])
        def test_not_writable_fails_at_once(self, root_owned_dir: Path, mode: str) -> None:
            result = self.run_child(root_owned_dir, mode)
            assert result["error"] == "PermissionError"
            assert str(result["filename"]).startswith(str(root_owned_dir) + os.sep)
            assert result["sleeps"] == 0  # no polling until the timeout
            assert result["listing"] == []

        def test_not_writable_fails_at_once_even_when_contended(self, root_owned_dir: Path) -> None:
            holder = DirectoryLocker(root_owned_dir)
            assert holder.acquire_exclusive_lock()
            result = self.run_child(root_owned_dir, "shared")
            assert result["error"] == "PermissionError"
            assert result["sleeps"] == 0
            assert result["listing"] == [holder.exclusive_lock_path.name]
            holder.release_lock()

        def test_unreadable_marker_is_held_not_broken(self, root_owned_dir: Path) -> None:
            root_owned_dir.chmod(0o777)
            # A dead pid, so that the child cannot hold it on its name alone: it must read.
            secret = plant(root_owned_dir, "exclusive", pid=dead_pid())
            secret.chmod(0o600)
            old = time.time() - 3600
            os.utime(secret, (old, old))
            result = self.run_child(root_owned_dir, "shared0")
            assert result["ok"] is False  # cannot read it: fail closed, even when old
            assert secret.exists()
            assert result["listing"] == [secret.name]

        def test_constructor_cannot_create(self, root_owned_dir: Path) -> None:
            result = self.run_child(root_owned_dir / "sub", "exclusive")
            assert result["error"] == "PermissionError"
            assert result["filename"] == str(root_owned_dir / "sub")


@pytest.mark.skipif(not POSIX, reason="Windows retries sharing violations (its CI job tests that)")
def test_marker_removal_refused_is_not_retried_on_posix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def denied(path: str) -> None:
        calls.append(path)
        raise PermissionError(13, "denied", path)

    monkeypatch.setattr(os, "unlink", denied)
    with pytest.raises(PermissionError):
        lockmod._unlink(str(tmp_path / "marker"))
    assert len(calls) == 1


@pytest.mark.skipif(
    sys.platform != "linux" or not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root on Linux to mount a read-only tmpfs",
)
def test_read_only_filesystem_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    import subprocess

    mnt = tmp_path / "ro"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        locker = DirectoryLocker(mnt)  # exists: the constructor need not write
        with pytest.raises(OSError, match=r"[Rr]ead-only") as info:
            locker.acquire_exclusive_lock(timeout=30)
        assert info.value.errno == errno.EROFS
        assert str(info.value.filename).startswith(str(mnt) + os.sep)
        assert sleeps == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


if sys.platform == "linux":  # thread groups and task states read from /proc
    from _lockhelpers import leaderless_holder

    def task_state(path: str) -> str:
        with open(path, "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2 :][:1].decode()

    @pytest.mark.slow  # real multi-threaded holders whose main thread exits
    class TestLeaderlessHolder:
        """Issue 11 item 7: a holder whose main thread exited is alive while a thread runs."""

        @pytest.fixture
        def holder(self, tmp_path: Path) -> Iterator[tuple[int, Path]]:
            lock_dir = tmp_path / "locks"
            ctx = mp_context()
            ready, release = ctx.Event(), ctx.Event()
            info = tmp_path / "marker.txt"
            p = ctx.Process(
                target=leaderless_holder, args=(str(lock_dir), str(info), ready, release)
            )
            p.start()
            try:
                assert ready.wait(60)
                marker = Path(info.read_text())
                assert marker.exists()
                assert p.pid is not None
                pid = p.pid
                wait_for(lambda: task_state(f"/proc/{pid}/stat") == "Z", "the leader's exit")
                tasks = os.listdir(f"/proc/{pid}/task")
                assert [t for t in tasks if task_state(f"/proc/{pid}/task/{t}/stat") != "Z"]
                yield pid, marker
            finally:
                release.set()
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join(30)
            assert p.exitcode == 0  # the holder thread released its own marker
            assert markers(lock_dir) == []

        def test_zombie_leader_with_a_live_thread_is_held(
            self, holder: tuple[int, Path], caplog: pytest.LogCaptureFixture
        ) -> None:
            _, marker = holder
            caplog.set_level(logging.WARNING, logger=lockmod.__name__)
            waiter = DirectoryLocker(marker.parent)
            # Long enough for several full judgements (recheck every 0.5 s).
            got = waiter.acquire_exclusive_lock(timeout=1.2)
            if got:
                waiter.release_lock()  # leave the directory as the holder expects it
            assert not got
            assert not waiter.acquire_shared_lock(timeout=0.1)
            assert marker.exists()
            assert "broke" not in caplog.text

        def test_task_list_we_cannot_read_is_not_proof(
            self,
            holder: tuple[int, Path],
            monkeypatch: pytest.MonkeyPatch,
            caplog: pytest.LogCaptureFixture,
        ) -> None:
            # Items 6 and 7 together: the waiter runs out of file descriptors
            # just when it lists the zombie leader's threads.
            pid, marker = holder
            real_listdir = os.listdir
            refused: list[str] = []

            def out_of_fds(path: str) -> list[str]:
                if path == f"/proc/{pid}/task":
                    refused.append(path)
                    raise OSError(errno.EMFILE, "Too many open files", path)
                return real_listdir(path)

            monkeypatch.setattr(os, "listdir", out_of_fds)
            caplog.set_level(logging.WARNING, logger=lockmod.__name__)
            waiter = DirectoryLocker(marker.parent)
            try:
                got = waiter.acquire_exclusive_lock(timeout=1.2)
            finally:
                monkeypatch.setattr(os, "listdir", real_listdir)
            if got:
                waiter.release_lock()  # leave the directory as the holder expects it
            assert not got
            assert refused  # the fault was hit
            assert marker.exists()
            assert "broke" not in caplog.text
