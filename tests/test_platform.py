"""The OS-specific calls of ``htmlgraph._platform``, run for real on this system.

The Windows and macOS branches are type-checked here (mypy --platform) and run
by the CI jobs of those systems; nothing simulates them.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from htmlgraph import _platform

if sys.platform == "win32":
    pytest.skip("POSIX behaviour", allow_module_level=True)


class FlakyReplace:
    """os.replace stand-in that fails with PermissionError ``failures`` times."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, src: str, dst: str) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise PermissionError(errno.EACCES, "sharing violation", dst)
        os.rename(src, dst)


def test_posix_replace_never_retries_permission_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = FlakyReplace(failures=1)
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(PermissionError):
        _platform.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert flaky.calls == 1


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP])
def test_fsync_dir_tolerates_filesystems_that_cannot_sync_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    calls: list[int] = []

    def unsupported(fd: int) -> None:
        calls.append(fd)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", unsupported)
    _platform.fsync_dir(str(tmp_path))  # "not supported" is not a failure
    assert len(calls) == 1


def test_fsync_dir_real_errors_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output") as info:
        _platform.fsync_dir(str(tmp_path))
    assert info.value.errno == errno.EIO


def test_fsync_dir_really_syncs_a_directory(tmp_path: Path) -> None:
    _platform.fsync_dir(str(tmp_path))  # must not raise on a local filesystem
    with pytest.raises(FileNotFoundError):
        _platform.fsync_dir(str(tmp_path / "missing"))


def test_pid_exists() -> None:
    assert _platform.pid_exists(os.getpid())
    assert not _platform.pid_exists(0)
    assert not _platform.pid_exists(-5)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(timeout=30) == 0
    assert not _platform.pid_exists(proc.pid)


def _report_token(queue: multiprocessing.Queue[tuple[int, str | None]]) -> None:
    queue.put((os.getpid(), _platform.process_start_token(os.getpid())))


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_start_token_is_per_process_and_read_at_call_time() -> None:
    mine = _platform.process_start_token(os.getpid())
    assert mine is not None
    assert mine == _platform.process_start_token(os.getpid())
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[tuple[int, str | None]] = ctx.Queue()
    child = ctx.Process(target=_report_token, args=(queue,))
    child.start()
    pid, token = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert pid == child.pid
    assert token is not None
    assert token != mine, "a forked child has its own start time"


def test_start_token_of_a_dead_pid_is_none() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(timeout=30) == 0
    assert _platform.process_start_token(proc.pid) is None


def test_start_token_parses_a_command_name_with_parentheses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fields = " ".join(str(n) for n in range(3, 30))
    stat = f"42 (evil) name) ) {fields}\n".encode()
    monkeypatch.setattr(
        _platform, "_read", lambda path, size=4096: stat if path == "/proc/42/stat" else None
    )
    token = _platform.process_start_token(42)
    assert token is not None
    assert token.endswith(":22")  # field 22 of proc(5)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_zombie_is_seen_until_reaped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while not _platform.pid_is_zombie(proc.pid):
        assert time.monotonic() < deadline, "the child never became a zombie"
        time.sleep(0.01)
    assert _platform.pid_exists(proc.pid), "kill(pid, 0) succeeds on a zombie"
    assert proc.wait(timeout=30) == 0
    assert not _platform.pid_is_zombie(proc.pid)
    assert not _platform.pid_is_zombie(os.getpid())


def _report_cached_pid(queue: multiprocessing.Queue[tuple[int, int]]) -> None:
    queue.put((os.getpid(), _platform.current_pid()))


def test_cached_pid_is_renewed_in_a_forked_child() -> None:
    assert _platform.current_pid() == os.getpid()
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[tuple[int, int]] = ctx.Queue()
    child = ctx.Process(target=_report_cached_pid, args=(queue,))
    child.start()
    real, cached = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert real == cached == child.pid
    assert _platform.current_pid() == os.getpid()


@pytest.mark.parametrize("pid", [0, -5, 2**31, 2**40, _platform.PID_MAX + 1])
def test_pid_out_of_range_does_not_exist_and_never_raises(pid: int) -> None:
    assert _platform.pid_exists(pid) is False


def test_hostname_is_stable() -> None:
    assert _platform.hostname() == _platform.hostname()
    assert _platform.hostname()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file away")
def test_keep_owner_as_root(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        _platform.keep_owner(fd, 65534, 65534)
    finally:
        os.close(fd)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_keep_owner_ignores_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []

    def refuse(fd: int, uid: int, gid: int) -> None:
        calls.append((fd, uid, gid))
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)
    _platform.keep_owner(7, 12345, 12345)
    assert calls == [(7, 12345, 12345)]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX owners")
def test_trusted_owner_is_us_or_root(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.write_text("x")
    assert _platform.trusted_owner(mine.stat())
    assert _platform.trusted_owner(os.stat("/"))  # root's
    if os.geteuid() != 0:
        pytest.skip("making a file of another user needs root")
    os.chown(mine, 2000, 2000)
    assert not _platform.trusted_owner(mine.stat())
