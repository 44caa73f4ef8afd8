"""Tests of the ``htmlgraph`` command line.

Every command runs as a real subprocess (``python -m htmlgraph``) with real
signals; a few in-process ``main()`` calls cover paths a subprocess cannot
reach (a stdin that fails mid-way, the progress bar on a terminal). After each
scenario the disk is checked: the target holds old-or-new content and the
directory holds nothing else. Every wait is bounded; exit codes are asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import _clihelpers
import htmlgraph
from _helpers import wait_for
from _lockhelpers import NaiveLock
from _writehelpers import temp_name_for
from htmlgraph import DirectoryLocker, _selfcheck, cli
from htmlgraph.session_registry import SessionRegistry

POSIX = sys.platform != "win32"
SIGKILL = int(getattr(signal, "SIGKILL", 9))  # absent on Windows
posix_only = pytest.mark.skipif(not POSIX, reason="POSIX signals")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

SRC = str(Path(htmlgraph.__file__).resolve().parent.parent)
TESTS = str(Path(__file__).resolve().parent)
TIMEOUT = 60.0  # any single CLI run or wait; generous for a loaded 2-core box

OLD = b"old content\n"


def cli_env() -> dict[str, str]:
    paths = [SRC, TESTS]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "htmlgraph", *args]


def run_cli(
    *args: str, input: bytes | None = None, cwd: Path | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cli_cmd(*args),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        env=cli_env(),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def default_sigint() -> None:
    """Give a child the default handling of the signals the tests send.

    A child inherits an ignored SIGINT or SIGHUP (the suite started by
    ``nohup`` or as a background job), and then keeps ignoring it - the CLI
    rightly leaves an ignored signal ignored. Tests that send them need them
    at their default (SIGINT: Python's KeyboardInterrupt). Runs in the child
    between fork and exec.
    """
    for name in ("SIGINT", "SIGHUP", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)


def start_cli(*args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    if POSIX:  # Windows has no preexec_fn (nor an inherited SIG_IGN to undo)
        kwargs.setdefault("preexec_fn", default_sigint)
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(cli_cmd(*args), env=cli_env(), **kwargs)  # type: ignore[call-overload, no-any-return]


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def temps(directory: Path) -> list[str]:
    return [name for name in listing(directory) if name.startswith(".tmp-")]


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    if not os.path.isdir("/proc/self"):  # macOS: no /proc; a zombie still counts as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].startswith(b"Z")


def lock_is_free(lock_dir: Path, timeout: float = 0.0) -> bool:
    locker = DirectoryLocker(lock_dir)
    if locker.acquire_exclusive_lock(timeout=timeout):
        locker.release_lock()
        return True
    return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs, reap it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=TIMEOUT)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target.txt"
    path.write_bytes(OLD)
    return path


# --------------------------------------------------------------------------
# General behaviour
# --------------------------------------------------------------------------


def test_version_and_top_level_help() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"htmlgraph {htmlgraph.__version__}"
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("write", "lock", "cleanup", "validate", "check", "sessions"):
        assert command in result.stdout.decode()


@pytest.mark.parametrize(
    "words",
    [
        ["write"],
        ["lock"],
        ["cleanup"],
        ["validate"],
        ["check"],
        ["sessions"],
        ["sessions", "list"],
        ["sessions", "show"],
        ["sessions", "archive"],
        ["sessions", "reap"],
    ],
)
def test_every_command_has_help(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: htmlgraph " + " ".join(words))


@pytest.mark.parametrize(
    "words",
    [
        [],
        ["frobnicate"],
        ["write"],
        ["write", "f", "--bogus"],
        ["write", "f", "--mode", "999"],
        ["write", "f", "--mode", "77777"],
        ["write", "f", "--"],
        ["lock", "d"],
        ["lock", "d", "extra", "--", "true"],
        ["lock", "d", "--timeout", "-1", "--", "true"],
        ["lock", "d", "--timeout", "soon", "--", "true"],
        ["cleanup", "d", "--age-hours", "-2"],
        ["check", "d", "--processes", "0"],
        ["check", "d", "--seconds", "nan"],
        ["sessions"],
        ["sessions", "show"],
        ["sessions", "reap", "--max-idle", "x"],
    ],
)
def test_usage_errors_exit_2(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(words) == 2
    err = capsys.readouterr().err
    assert "usage: htmlgraph" in err
    assert "Traceback" not in err


def test_usage_error_as_subprocess_has_no_traceback() -> None:
    result = run_cli("write", "f", "--mode", "abc")
    assert result.returncode == 2
    assert b"not an octal mode" in result.stderr
    assert b"Traceback" not in result.stderr


def test_verbose_logs_to_stderr(tmp_path: Path) -> None:
    result = run_cli("-v", "write", str(tmp_path / "f"), input=b"12345")
    assert result.returncode == 0
    assert b"INFO: wrote 5 bytes" in result.stderr
    result = run_cli("write", "-v", str(tmp_path / "f"), input=b"123")
    assert result.returncode == 0
    assert b"INFO: wrote 3 bytes" in result.stderr
    result = run_cli("write", str(tmp_path / "f"), input=b"1")
    assert result.stderr == b""


# --------------------------------------------------------------------------
# write
# --------------------------------------------------------------------------


def test_write_replaces_file(target: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # several stdin chunks
    result = run_cli("write", str(target), input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert target.read_bytes() == data
    assert listing(target.parent) == [target.name]


@linux_only
def test_write_streams_without_holding_the_input_in_memory(tmp_path: Path) -> None:
    size_mib = 256
    target = tmp_path / "big.bin"
    producer = (
        f"import sys\nchunk = bytes(range(256)) * 4096\n"
        f"for _ in range({size_mib}):\n    sys.stdout.buffer.write(chunk)\n"
    )
    # A wrapper process, so that RUSAGE_CHILDREN covers only `write` (and the
    # producer it runs), not every child this test session ever had.
    wrapper = textwrap.dedent(
        f"""
        import resource, subprocess, sys
        argv = {cli_cmd("write", "--no-fsync", str(target), "--", sys.executable, "-c", producer)!r}
        status = subprocess.run(argv, check=False).returncode
        print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        """
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", wrapper],
            capture_output=True,
            env=cli_env(),
            timeout=TIMEOUT * 2,
            check=True,
        )
        status, max_rss_kib = map(int, result.stdout.split())
        assert status == 0, result.stderr
        assert target.stat().st_size == size_mib << 20
        with open(target, "rb") as f:
            assert f.read(512) == bytes(range(256)) * 2
        # 256 MiB went through; the peak resident set stayed far below it.
        assert max_rss_kib < 96 * 1024, max_rss_kib
    finally:
        target.unlink(missing_ok=True)
    assert listing(tmp_path) == []


def test_write_creates_file_and_parents_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "new.txt"
    result = run_cli("write", "--mode", "0600", "--no-fsync", str(path), input=b"x")
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == b"x"
    if POSIX:
        assert (path.stat().st_mode & 0o7777) == 0o600


@posix_only
def test_write_keeps_existing_mode(target: Path) -> None:
    target.chmod(0o640)
    assert run_cli("write", str(target), input=b"new").returncode == 0
    assert (target.stat().st_mode & 0o7777) == 0o640
    assert target.read_bytes() == b"new"


def test_write_empty_stdin_makes_empty_file(target: Path) -> None:
    assert run_cli("write", str(target), input=b"").returncode == 0
    assert target.read_bytes() == b""


def test_write_no_overwrite(target: Path, tmp_path: Path) -> None:
    result = run_cli("write", "--no-overwrite", str(target), input=b"new")
    assert result.returncode == 1
    assert b"exists" in result.stderr
    assert target.read_bytes() == OLD
    fresh = tmp_path / "fresh"
    assert run_cli("write", "--no-overwrite", str(fresh), input=b"new").returncode == 0
    assert fresh.read_bytes() == b"new"
    assert listing(tmp_path) == ["fresh", target.name]


def test_write_json_valid_is_written_verbatim(target: Path) -> None:
    data = b'{"b": [1, 2.5, "\xc3\xa9"], "a": null}\n'
    result = run_cli("write", "--json", str(target), input=data)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"a": [1, 2', b"not valid JSON"),
        (b"", b"not valid JSON"),
        (b'{"a": NaN}', b"NaN is not JSON"),
        (b"[Infinity]", b"Infinity is not JSON"),
        (b'{"a": "\xff"}', b"not valid UTF-8"),
        (b"{} {}", b"not valid JSON"),
    ],
)
def test_write_json_invalid_leaves_target(target: Path, data: bytes, reason: bytes) -> None:
    result = run_cli("write", "--json", str(target), input=data)
    assert result.returncode == 1
    assert reason in result.stderr
    assert b"Traceback" not in result.stderr
    assert target.read_bytes() == OLD
    assert listing(target.parent) == [target.name]


def test_write_errors_are_reported_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    result = run_cli("write", str(tmp_path / "dir"), input=b"x")
    assert result.returncode == 1
    assert b"directory" in result.stderr
    assert b"Traceback" not in result.stderr
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    result = run_cli("write", str(blocker / "child"), input=b"x")
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert listing(tmp_path) == ["dir", "file"]
    assert listing(tmp_path / "dir") == []


@posix_only
def test_write_json_producer_killed_mid_stream(target: Path) -> None:
    # The producer sends half a document, then dies by SIGKILL: the pipe just
    # closes, and only validation can tell the input is cut short.
    producer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, sys; sys.stdout.buffer.write(b'{\"items\": [1, 2, 3');"
            "sys.stdout.flush(); os.kill(os.getpid(), signal.SIGKILL)",
        ],
        stdout=subprocess.PIPE,
    )
    assert producer.stdout is not None
    try:
        writer = start_cli("write", "--json", str(target), stdin=producer.stdout)
        producer.stdout.close()
        _, err = writer.communicate(timeout=TIMEOUT)
    finally:
        stop(producer)
    assert producer.returncode == -SIGKILL
    assert writer.returncode == 1
    assert b"not valid JSON" in err
    assert target.read_bytes() == OLD
    assert listing(target.parent) == [target.name]


@posix_only
@pytest.mark.parametrize("json_mode", [False, True])
def test_write_from_command_killed_mid_stream(target: Path, json_mode: bool) -> None:
    script = (
        "import os, signal, sys\n"
        "sys.stdout.buffer.write(b'[' + b'1,' * 300000)\n"
        "sys.stdout.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    flags = ["--json"] if json_mode else []
    result = run_cli("write", *flags, str(target), "--", sys.executable, "-c", script)
    assert result.returncode == 128 + SIGKILL
    assert b"killed by signal 9" in result.stderr
    assert b"left untouched" in result.stderr
    assert target.read_bytes() == OLD
    assert listing(target.parent) == [target.name]


def test_write_from_command_failure_and_success(target: Path) -> None:
    failing = "import sys; sys.stdout.write('partial'); sys.exit(3)"
    result = run_cli("write", str(target), "--", sys.executable, "-c", failing)
    assert result.returncode == 3
    assert b"exited with status 3" in result.stderr
    assert target.read_bytes() == OLD
    assert listing(target.parent) == [target.name]
    good = "import sys; sys.stdout.write('[1, 2]')"
    result = run_cli("write", "--json", str(target), "--", sys.executable, "-c", good)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == b"[1, 2]"
    bad_json = "import sys; sys.stdout.write('[1, 2')"
    result = run_cli("write", "--json", str(target), "--", sys.executable, "-c", bad_json)
    assert result.returncode == 1
    assert target.read_bytes() == b"[1, 2]"
    result = run_cli("write", str(target), "--", "htmlgraph-no-such-command-xyz")
    assert result.returncode == 127
    assert b"command not found" in result.stderr
    assert target.read_bytes() == b"[1, 2]"
    assert listing(target.parent) == [target.name]


@posix_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", 1)])
def test_write_interrupted_while_blocked_on_stdin(target: Path, signum: int) -> None:
    proc = start_cli("write", str(target), stdin=subprocess.PIPE)
    assert proc.stdin is not None

    def streamed() -> bool:
        return any((target.parent / name).stat().st_size > 0 for name in temps(target.parent))

    try:
        # One whole 1 MiB read of the CLI, and a little more: once the first
        # chunk is in the temp file the CLI is blocked reading the rest. (A
        # signal that lands while the temp file is being created is another
        # scenario, which this test does not aim at.)
        proc.stdin.write(b"x" * (1 << 20) + b"new partial content " * 1000)
        proc.stdin.flush()
        wait_for(streamed, "the first chunk in the temp file")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode == 128 + signum
    assert b"Traceback" not in err
    assert target.read_bytes() == OLD
    assert listing(target.parent) == [target.name]


@posix_only
def test_write_pipe_closed_mid_json_document(target: Path) -> None:
    proc = start_cli("write", "--json", str(target), stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b'{"complete": false, "items": [')
        proc.stdin.close()  # the writer end goes away mid-document
        proc.wait(timeout=TIMEOUT)
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        stop(proc)
    assert proc.returncode == 1
    assert b"not valid JSON" in err
    assert target.read_bytes() == OLD
    assert listing(target.parent) == [target.name]


@posix_only
def test_write_sigkill_leaves_orphan_that_cleanup_removes(target: Path) -> None:
    proc = start_cli("write", str(target), stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"x" * 100_000)
        proc.stdin.flush()
        wait_for(lambda: bool(temps(target.parent)), "the temp file")
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode == -SIGKILL
    assert target.read_bytes() == OLD
    orphans = temps(target.parent)
    assert len(orphans) == 1
    # Young orphans are spared by default; --age-hours 0 lists it...
    result = run_cli("cleanup", "--dry-run", str(target.parent))
    assert result.returncode == 0
    assert result.stdout == b""
    assert b"would remove 0" in result.stderr
    result = run_cli("cleanup", "--dry-run", "--age-hours", "0", str(target.parent))
    assert result.returncode == 0
    assert result.stdout.decode().splitlines() == [str(target.parent / orphans[0])]
    assert b"would remove 1" in result.stderr
    assert temps(target.parent) == orphans  # a dry run removes nothing
    # ... and a real run removes it.
    result = run_cli("cleanup", "--age-hours", "0", str(target.parent))
    assert result.returncode == 0
    assert b"removed 1 orphaned temp file" in result.stdout
    assert listing(target.parent) == [target.name]
    assert target.read_bytes() == OLD


class _FailingStream(io.RawIOBase):
    """A stdin whose read fails with EIO after some data, like a dying device."""

    def __init__(self, good: int) -> None:
        self.left = good
        self.failed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.left <= 0:
            self.failed = True
            raise OSError(5, "Input/output error")
        n = min(len(buffer), self.left, 4096)
        buffer[:n] = b"y" * n
        self.left -= n
        return n


def test_write_stdin_read_error_midway_in_process(
    target: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _FailingStream(good=3 * (1 << 20))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(raw)))
    assert cli.main(["write", str(target)]) == 1
    assert raw.failed  # the fault was hit, after data had been streamed
    assert "Input/output error" in capsys.readouterr().err
    assert target.read_bytes() == OLD
    assert listing(target.parent) == [target.name]


def test_write_in_process_success_and_closed_stdin(
    target: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"k": 1}')))
    assert cli.main(["write", "--json", "--no-fsync", str(target)]) == 0
    assert target.read_bytes() == b'{"k": 1}'
    monkeypatch.setattr(sys, "stdin", None)
    assert cli.main(["write", str(target)]) == 1
    assert "stdin is closed" in capsys.readouterr().err
    assert target.read_bytes() == b'{"k": 1}'
    assert listing(target.parent) == [target.name]


# --------------------------------------------------------------------------
# lock
# --------------------------------------------------------------------------


def test_lock_runs_command_under_the_lock(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    script = "import os, sys; print(sorted(os.listdir(sys.argv[1]))); sys.exit(3)"
    result = run_cli("lock", str(lock_dir), "--", sys.executable, "-c", script, str(lock_dir))
    assert result.returncode == 3
    seen = json.loads(result.stdout.decode().replace("'", '"'))
    assert len(seen) == 1
    assert seen[0].startswith(".lock-exclusive-")
    assert listing(lock_dir) == []  # released
    result = run_cli("lock", "--shared", str(lock_dir), "--", sys.executable, "-c", script)
    assert result.returncode == 1  # the script's IndexError: CMD's own status
    result = run_cli("lock", "--timeout", "5", str(lock_dir), "--", sys.executable, "-c", "")
    assert result.returncode == 0
    assert listing(lock_dir) == []


def test_lock_timeout_exits_75(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    holder = DirectoryLocker(lock_dir)
    assert holder.acquire_exclusive_lock(timeout=5)
    try:
        for flags in (["--timeout", "0.2"], ["--shared", "--timeout", "0"]):
            result = run_cli("lock", *flags, str(lock_dir), "--", sys.executable, "-c", "")
            assert result.returncode == 75
            assert b"timed out after" in result.stderr
            assert b"Traceback" not in result.stderr
        assert len(listing(lock_dir)) == 1  # only the holder's marker
    finally:
        holder.release_lock()
    assert listing(lock_dir) == []


def test_lock_shared_with_shared_holder(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    holder = DirectoryLocker(lock_dir)
    assert holder.acquire_shared_lock(timeout=5)
    try:
        noop = [sys.executable, "-c", ""]
        shared = run_cli("lock", "--shared", "--timeout", "0", str(lock_dir), "--", *noop)
        assert shared.returncode == 0, shared.stderr
        exclusive = run_cli("lock", "--timeout", "0", str(lock_dir), "--", *noop)
        assert exclusive.returncode == 75
    finally:
        holder.release_lock()
    assert listing(lock_dir) == []


def test_lock_command_not_found_or_not_executable(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    result = run_cli("lock", str(lock_dir), "--", "htmlgraph-no-such-command-xyz")
    assert result.returncode == 127
    assert b"command not found" in result.stderr
    if POSIX:
        script = tmp_path / "not-executable"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o644)
        result = run_cli("lock", str(lock_dir), "--", str(script))
        assert result.returncode == 126
        assert b"cannot execute" in result.stderr
    assert listing(lock_dir) == []
    assert lock_is_free(lock_dir)


def test_lock_dir_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("lock", "--timeout", "1", str(blocker), "--", sys.executable, "-c", "")
    assert result.returncode == 1
    assert str(blocker).encode() in result.stderr
    assert b"Traceback" not in result.stderr
    assert listing(tmp_path) == ["file"]


@posix_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, SIGKILL])
def test_lock_child_killed_releases_lock(tmp_path: Path, signum: int) -> None:
    lock_dir = tmp_path / "locks"
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import os, time
        with open({str(pid_file)!r} + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
        time.sleep(120)
        """
    )
    proc = start_cli("lock", str(lock_dir), "--", sys.executable, "-c", script)
    try:
        wait_for(pid_file.exists, "the child to start")
        assert not lock_is_free(lock_dir)  # held while the child runs
        os.kill(int(pid_file.read_text()), signum)
        proc.wait(timeout=TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode == 128 + signum
    assert listing(lock_dir) == []
    assert lock_is_free(lock_dir, timeout=0)


@posix_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", 1)])
def test_lock_forwards_signals_and_releases(tmp_path: Path, signum: int) -> None:
    lock_dir = tmp_path / "locks"
    pid_file = tmp_path / "child.pid"
    # The child reports the signal it got and exits with a status naming it,
    # proving the signal reached it (rather than the child being killed).
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        def handler(signum, frame):
            sys.exit(100 + signum)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, handler)
        with open({str(pid_file)!r} + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
        time.sleep(120)
        """
    )
    proc = start_cli("lock", str(lock_dir), "--", sys.executable, "-c", script)
    try:
        wait_for(pid_file.exists, "the child to start")
        proc.send_signal(signum)
        proc.wait(timeout=TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode == 100 + signum
    assert process_gone(int(pid_file.read_text()))
    assert listing(lock_dir) == []
    assert lock_is_free(lock_dir)


if sys.platform != "win32":  # pty, fork and WNOHANG are POSIX only (also for mypy)

    @posix_only
    def test_lock_ctrl_c_at_a_terminal_reaches_the_command_once(tmp_path: Path) -> None:
        import pty
        import select

        lock_dir = tmp_path / "locks"
        # The child counts the SIGINTs it gets and exits 100 + that count.
        script = textwrap.dedent(
            """
            import signal, sys, time
            count = 0
            def handler(signum, frame):
                global count
                count += 1
                time.sleep(0.5)  # a second, forwarded SIGINT would arrive meanwhile
                sys.exit(100 + count)
            signal.signal(signal.SIGINT, handler)
            print("ready", flush=True)
            time.sleep(120)
            """
        )
        argv = cli_cmd("lock", str(lock_dir), "--", sys.executable, "-c", script)
        env = cli_env()
        pid, fd = pty.fork()
        if pid == 0:  # the child: a session leader with the pty as its terminal
            default_sigint()
            os.execve(argv[0], argv, env)  # noqa: S606 - argv is ours
        output = b""
        try:
            deadline = time.monotonic() + TIMEOUT
            while b"ready" not in output:
                assert time.monotonic() < deadline, output
                if select.select([fd], [], [], 0.2)[0]:
                    output += os.read(fd, 1024)
            os.write(fd, b"\x03")  # Ctrl-C: the tty sends SIGINT to the foreground group
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                waited, status = os.waitpid(pid, os.WNOHANG)
                if waited:
                    break
                if select.select([fd], [], [], 0.2)[0]:
                    with contextlib.suppress(OSError):  # EIO once the child side closes
                        output += os.read(fd, 1024)
            else:
                pytest.fail("htmlgraph lock did not exit after Ctrl-C")
        finally:
            os.close(fd)
            with contextlib.suppress(ChildProcessError):
                if not os.waitpid(pid, os.WNOHANG)[0]:
                    os.kill(pid, SIGKILL)
                    os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 101, output  # one SIGINT, not two
        assert listing(lock_dir) == []
        assert lock_is_free(lock_dir)


@posix_only
def test_lock_signal_while_waiting_withdraws_claim(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    holder = DirectoryLocker(lock_dir)
    assert holder.acquire_shared_lock(timeout=5)
    try:
        proc = start_cli("lock", str(lock_dir), "--", "true")
        try:
            # The waiting writer keeps its marker while readers drain.
            wait_for(lambda: len(listing(lock_dir)) == 2, "the waiting claim")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            stop(proc)
        assert proc.returncode == 128 + signal.SIGTERM
        assert b"terminated by signal" in err
        assert len(listing(lock_dir)) == 1  # only the holder's marker is left
    finally:
        holder.release_lock()
    assert listing(lock_dir) == []


def ignore_sigint_sighup() -> None:
    """As ``nohup`` and a shell's background job leave a child: SIGHUP and SIGINT ignored."""
    default_sigint()
    for name in ("SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


@posix_only
@pytest.mark.parametrize("command", ["lock", "update"])
def test_ignored_signals_stay_ignored_while_waiting(tmp_path: Path, command: str) -> None:
    target = tmp_path / "state.txt"
    target.write_text("old\n")
    if command == "lock":
        lock_dir = tmp_path / "locks"
        args = ["lock", str(lock_dir), "--", sys.executable, "-c", "print('ran')"]
    else:
        lock_dir = tmp_path / ".state.txt.htmlgraph-lock"
        args = ["update", str(target), "--", sys.executable, "-c", "print('new')"]
    holder = DirectoryLocker(lock_dir)
    assert holder.acquire_shared_lock(timeout=5)  # a waiting writer keeps its claim
    try:
        proc = start_cli(*args, preexec_fn=ignore_sigint_sighup)
        try:
            wait_for(lambda: len(listing(lock_dir)) == 2, "the waiting claim")
            proc.send_signal(getattr(signal, "SIGHUP", 1))
            proc.send_signal(signal.SIGINT)
            # Still waiting, its claim in place, after both signals were handled.
            time.sleep(0.3)
            assert proc.poll() is None
            assert len(listing(lock_dir)) == 2
        except BaseException:
            stop(proc)
            raise
    finally:
        holder.release_lock()
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode == 0, err
    if command == "lock":
        assert out == b"ran\n"
    else:
        assert target.read_text() == "new\n"
    assert listing(lock_dir) == []


@linux_only
def test_lock_sigkilled_takes_its_command_along(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    pid_file = tmp_path / "child.pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    proc = start_cli("lock", str(lock_dir), "--", sys.executable, "-c", script)
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text() != "", "the child")
        child = int(pid_file.read_text())
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    finally:
        stop(proc)
    # Its marker stays behind, but the command died with it (no unprotected
    # run), so the next acquirer may break the stale marker.
    wait_for(lambda: process_gone(child), "the orphaned command to die")
    assert lock_is_free(lock_dir, timeout=10)
    assert listing(lock_dir) == []


# --------------------------------------------------------------------------
# cleanup
# --------------------------------------------------------------------------


def test_cleanup_rules(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        check=True,
        timeout=TIMEOUT,
    )
    dead_pid = int(dead.stdout)
    orphan = tmp_path / temp_name_for(dead_pid, "data.json")
    live = tmp_path / temp_name_for(os.getpid(), "data.json")  # our pid: alive
    seed_style = tmp_path / ".tmp-not-ours"  # no pid: judged by age alone
    keep = tmp_path / "data.json"
    for path in (orphan, live, seed_style, keep):
        path.write_text("x")
    old = time.time() - 7200
    for path in (orphan, live, seed_style):
        os.utime(path, (old, old))
    result = run_cli("cleanup", "--dry-run", "--age-hours", "1", str(tmp_path))
    assert result.returncode == 0
    assert result.stdout.decode().splitlines() == sorted([str(orphan), str(seed_style)])
    assert len(listing(tmp_path)) == 4
    result = run_cli("cleanup", "--age-hours", "3", str(tmp_path))  # too young at 3 h
    assert result.returncode == 0
    assert b"removed 0" in result.stdout
    result = run_cli("cleanup", "--age-hours", "1", str(tmp_path))
    assert result.returncode == 0
    assert b"removed 2" in result.stdout
    assert b"WARNING: removed 2 orphaned temp file(s) from" in result.stderr
    assert listing(tmp_path) == sorted(p.name for p in (live, keep))


def test_cleanup_missing_directory(tmp_path: Path) -> None:
    for flags in ([], ["--dry-run"]):
        result = run_cli("cleanup", *flags, str(tmp_path / "missing"))
        assert result.returncode == 1
        assert b"not a directory" in result.stderr


# --------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------


def test_validate(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_bytes(b'{"a": "\xc3\xa9"}\n')
    result = run_cli("validate", str(good))
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"{good}: valid"
    assert run_cli("validate", "--json", str(good)).returncode == 0
    text = tmp_path / "text.txt"
    text.write_text("not json")
    assert run_cli("validate", str(text)).returncode == 0
    result = run_cli("validate", "--json", str(text))
    assert result.returncode == 1
    assert b"not valid JSON" in result.stderr
    binary = tmp_path / "bin"
    binary.write_bytes(b"abc\xff")
    result = run_cli("validate", str(binary))
    assert result.returncode == 1
    assert b"not valid UTF-8 at byte 3" in result.stderr
    cut = tmp_path / "cut"
    cut.write_bytes(b"ab\xc3")
    result = run_cli("validate", str(cut))
    assert result.returncode == 1
    assert b"truncated character" in result.stderr
    result = run_cli("validate", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert b"does not exist" in result.stderr
    result = run_cli("validate", str(tmp_path))
    assert result.returncode == 1
    assert b"is a directory" in result.stderr


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"plain \xc3\xa9 text\n", None),
        (b"", None),
        (b"abc\xff", "not valid UTF-8 at byte 3"),
        (b"ab\xc3", "not valid UTF-8: truncated character at the end (byte 3)"),
        # A character split by the 1 MiB read boundary, then broken: the
        # offset counts from its first byte, in the previous chunk.
        (b"a" * ((1 << 20) - 1) + b"\xe2\x82x", f"not valid UTF-8 at byte {(1 << 20) - 1}"),
        (b"a" * ((1 << 20) - 1) + b"\xe2\x82\xac\xff", f"not valid UTF-8 at byte {(1 << 20) + 2}"),
    ],
)
def test_validate_reason_agrees_with_the_library(
    tmp_path: Path, content: bytes, reason: str | None
) -> None:
    from htmlgraph import validate_atomic_write
    from htmlgraph._validation import invalid_reason

    path = tmp_path / "f"
    path.write_bytes(content)
    assert invalid_reason(str(path)) == reason
    assert validate_atomic_write(path) is (reason is None)
    assert cli.main(["validate", str(path)]) == (0 if reason is None else 1)


@posix_only
def test_validate_reasons_for_what_is_not_a_file(tmp_path: Path) -> None:
    from htmlgraph import validate_atomic_write
    from htmlgraph._validation import invalid_reason

    if sys.platform == "win32":  # unreachable (posix_only); tells mypy mkfifo exists
        pytest.skip("POSIX only")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    under_a_file = tmp_path / "fifo" / "x"
    for path, reason in (
        (fifo, "is not a regular file"),
        (tmp_path, "is a directory"),
        (dangling, "does not exist"),
        (under_a_file, "cannot open: Not a directory"),
    ):
        assert invalid_reason(str(path)) == reason
        assert validate_atomic_write(path) is False


# --------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------


def assert_clean_check(
    result: subprocess.CompletedProcess[bytes], directory: Path
) -> dict[str, object]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["violations"] == []
    assert report["writes"] > 0
    assert report["reads"] > 0
    assert report["torn_reads"] == 0
    assert report["kills"] > 0
    assert report["torn_after_kill"] == 0
    assert report["lock_updates"] > 0
    assert report["lost_updates"] == 0
    assert report["lock_overlaps"] == 0
    assert report["leftovers"] == []
    assert report["dir_fsync"] == ("yes" if POSIX else "n/a (Windows)")
    assert listing(directory) == []  # the scratch directory is gone
    return report  # type: ignore[no-any-return]


@pytest.mark.slow  # a full clean check; the fast suite keeps test_check_table_output
def test_check_on_disk(tmp_path: Path) -> None:
    result = run_cli("check", "--seconds", "2.5", "--processes", "3", "--json", str(tmp_path))
    report = assert_clean_check(result, tmp_path)
    print(f"check on {report['filesystem']}: {json.dumps(report)}")


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "htmlgraph-test", str(mount_point)],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], timeout=TIMEOUT, check=True)


@pytest.mark.slow
@pytest.mark.root
def test_check_on_tmpfs(tmpfs_dir: Path) -> None:
    assert _selfcheck.filesystem_type(str(tmpfs_dir)) == "tmpfs"
    result = run_cli("check", "--seconds", "2.5", "--processes", "3", "--json", str(tmpfs_dir))
    report = assert_clean_check(result, tmpfs_dir)
    assert report["filesystem"] == "tmpfs"


@pytest.mark.slow  # a full self-check run: the slow suite
def test_check_table_output(tmp_path: Path) -> None:
    result = run_cli("check", "--seconds", "1.5", "--processes", "2", "--no-fsync", str(tmp_path))
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = result.stdout.decode()
    for label in (
        "torn reads seen",
        "writers killed (SIGKILL)",
        "torn/empty/missing after kill",
        "lost lock-protected updates",
        "orphaned temp files cleaned",
        "directory fsync supported",
    ):
        assert label in out
    assert "PASS: every promise held" in out
    assert "fast_atomic_writer" in out
    # stderr is not a terminal here: one plain line per phase, no bar.
    err = result.stderr.decode()
    assert "htmlgraph check: concurrent writers and readers ..." in err
    assert "\r" not in err
    assert listing(tmp_path) == []


def test_check_with_zero_budget_still_tests_everything(tmp_path: Path) -> None:
    report = _selfcheck.run_check(tmp_path, seconds=0, processes=1)
    assert report.ok, report.violations()
    assert report.writes > 0
    assert report.reads > 0
    assert report.kills > 0
    assert report.lock_updates >= 2  # every lock process makes at least one update
    assert listing(tmp_path) == []


@pytest.mark.slow  # a full self-check run: the slow suite
def test_check_catches_a_broken_writer_subprocess(tmp_path: Path) -> None:
    result = run_cli(
        "check",
        "--seconds",
        "1",
        "--processes",
        "2",
        "--writer",
        "_clihelpers:inplace_writer",
        str(tmp_path),
    )
    assert result.returncode == 1
    out = result.stdout.decode()
    assert "FAIL:" in out
    assert "_clihelpers.inplace_writer" in out
    assert listing(tmp_path) == []


@pytest.mark.slow  # a full self-check run: the slow suite
def test_check_catches_a_broken_writer_in_process(tmp_path: Path) -> None:
    # The writer's pause makes a torn file likely at once; 1 s is plenty.
    report = _selfcheck.run_check(
        tmp_path, seconds=1, processes=2, writer=_clihelpers.inplace_writer
    )
    assert not report.ok
    assert report.kills > 0
    assert report.torn_reads + report.torn_after_kill > 0
    assert any("torn" in line for line in report.violations())
    assert report.lost_updates == 0  # the lock was not what broke
    assert listing(tmp_path) == []


@pytest.mark.slow  # a full self-check run: the slow suite
def test_check_catches_a_broken_lock(tmp_path: Path) -> None:
    # The lock helper's negative control: check-then-create, not exclusive.
    report = _selfcheck.run_check(tmp_path, seconds=2, processes=4, locker=NaiveLock)
    assert not report.ok
    assert report.lost_updates + report.lock_overlaps > 0
    assert any("lost" in p or "overlapped" in p for p in report.violations())
    assert report.torn_reads == 0  # the writer was not what broke
    assert report.torn_after_kill == 0
    assert listing(tmp_path) == []


def test_check_reports_a_failing_writer(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="simulated"):
        _selfcheck.run_check(tmp_path, seconds=1, processes=1, writer=_clihelpers.raising_writer)
    assert listing(tmp_path) == []
    result = run_cli(
        "check", "--seconds", "1", "--writer", "_clihelpers:raising_writer", str(tmp_path)
    )
    assert result.returncode == 1
    assert b"simulated" in result.stderr
    assert b"Traceback" not in result.stderr
    assert listing(tmp_path) == []


def test_check_writer_spec_errors(tmp_path: Path) -> None:
    for spec, message in (
        ("nocolon", b"module:function"),
        ("no_such_module_xyz:f", b"cannot import"),
        ("_clihelpers:missing", b"not a callable"),
    ):
        result = run_cli("check", "--writer", spec, str(tmp_path))
        assert result.returncode == 2
        assert message in result.stderr
    result = run_cli("check", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert b"not a directory" in result.stderr


@pytest.mark.slow  # a full self-check run: the slow suite
def test_check_with_spawned_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The start method Windows and macOS use: the writer must travel by name.
    import multiprocessing

    monkeypatch.setattr(_selfcheck, "_context", lambda: multiprocessing.get_context("spawn"))
    report = _selfcheck.run_check(tmp_path, seconds=1, processes=1)
    assert report.ok, report.violations()
    assert report.kills > 0
    assert listing(tmp_path) == []


def test_check_report_rendering(capsys: pytest.CaptureFixture[str]) -> None:
    report = _selfcheck.CheckReport(
        directory="/d", filesystem="ext4", writer="w", locker="l", seconds=1, processes=2
    )
    report.torn_reads, report.lost_updates, report.lock_overlaps = 3, 2, 1
    report.leftovers = [f"f{i}" for i in range(7)]
    report.dir_fsync = "failed (Invalid argument)"
    report.errors.append("a child exited with 1")
    text = cli._format_report(report)
    assert "FAIL" in text
    problems = report.violations()
    assert any("3 reads saw" in p for p in problems)
    assert any("2 lock-protected updates were lost" in p for p in problems)
    assert any("and 2 more" in p for p in problems)
    assert any("directory fsync failed" in p for p in problems)
    assert any("nothing was tested" in p for p in problems)
    assert "a child exited with 1" in problems
    assert report.as_dict()["ok"] is False


def test_check_report_rules_live_once() -> None:
    report = _selfcheck.CheckReport(
        directory="/d", filesystem="ext4", writer="w", locker="l", seconds=1, processes=2
    )
    # Nothing measured: every promise that needs a measurement is unmet.
    failing = {label for label, _, verdict in report.rows() if verdict == "FAIL"}
    assert failing == {
        "writes (concurrent + kill loop)",
        "writers killed (SIGKILL)",
        "lock-protected updates",
    }
    report.writes, report.kills, report.lock_updates = 5, 3, 4
    report.temps_after_kill, report.orphans_cleaned = 3, 2
    assert report.violations() == ["cleanup removed 2 of the 3 temp files the kills left"]
    report.orphans_cleaned = 3
    assert report.ok
    assert all(verdict in ("ok", "") for _, _, verdict in report.rows())
    # Each FAIL row is exactly one listed violation, and the other way round.
    report.torn_reads, report.dir_fsync = 1, "failed (Input/output error)"
    fails = [finding for finding in report.findings() if finding.verdict == "FAIL"]
    assert [finding.problem for finding in fails] == report.violations()
    assert len(fails) == 2


def test_run_check_error_numbers(tmp_path: Path) -> None:
    import errno

    with pytest.raises(FileNotFoundError) as missing:
        _selfcheck.run_check(tmp_path / "missing", seconds=0)
    assert missing.value.errno == errno.ENOENT
    assert missing.value.filename == str(tmp_path / "missing")
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    with pytest.raises(NotADirectoryError) as not_dir:
        _selfcheck.run_check(a_file, seconds=0)
    assert not_dir.value.errno == errno.ENOTDIR
    assert not_dir.value.filename == str(a_file)
    assert listing(tmp_path) == ["file"]


def test_check_hides_cleanup_warnings_without_touching_logger_levels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    names = ("htmlgraph", "htmlgraph.atomic_ops", "htmlgraph.session_registry")
    before = [logging.getLogger(name).level for name in names]
    seen: list[list[int]] = []

    def fake_run_check(directory: str, **kwargs: object) -> _selfcheck.CheckReport:
        # What the real kill phase does: the cleanup warns about each orphan.
        seen.append([logging.getLogger(name).level for name in names[1:]])
        logging.getLogger("htmlgraph.atomic_ops").warning("removed orphan X")
        logging.getLogger("htmlgraph.atomic_ops").error("an error is always shown")
        logging.getLogger("htmlgraph.session_registry").warning("another module's warning")
        return _selfcheck.CheckReport(directory, "ext4", "w", "l", 0, 1)

    monkeypatch.setattr(_selfcheck, "run_check", fake_run_check)
    assert cli.main(["check", str(tmp_path)]) == 1  # the fake measured nothing
    err = capsys.readouterr().err
    assert "removed orphan X" not in err
    assert "ERROR: an error is always shown" in err
    assert "WARNING: another module's warning" in err
    assert cli.main(["check", "-v", str(tmp_path)]) == 1
    assert "WARNING: removed orphan X" in capsys.readouterr().err
    # No handler changed a module logger's level, and main() put back the package's.
    assert seen == [before[1:], before[1:]]
    assert [logging.getLogger(name).level for name in names] == before
    assert logging.getLogger("htmlgraph").handlers == []


def test_content_format() -> None:
    data = _selfcheck.make_content(7, 1000)
    assert _selfcheck.content_is_complete(data)
    assert not _selfcheck.content_is_complete(data[:-1])
    assert not _selfcheck.content_is_complete(b"")
    assert not _selfcheck.content_is_complete(data[:40])
    mixed = data[:500] + _selfcheck.make_content(8, 1000)[500:]
    assert not _selfcheck.content_is_complete(mixed)
    assert not _selfcheck.content_is_complete(b"other 1 2 3\nabc")
    assert not _selfcheck.content_is_complete(b"htmlgraph-check 1 x 3\nabc")


def test_progress_bar_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    bar = cli._ProgressBar(stream)
    bar("phase one", 0.0)
    bar("phase one", 0.01)  # throttled: same phase, too soon
    bar("phase two", 0.5)
    bar("phase two", 1.0)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r[") == 3
    assert "  0% phase one" in text
    assert "[###############---------------]  50% phase two" in text
    assert "100% phase two" in text
    assert text.endswith("\r")


# --------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------


def test_sessions_commands(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    reg = ["--registry", str(registry_dir)]
    result = run_cli("sessions", "list", *reg)
    assert result.returncode == 0
    assert b"no active sessions" in result.stderr
    assert json.loads(run_cli("sessions", "list", "--json", *reg).stdout) == []

    registry = SessionRegistry(registry_dir)
    mine = registry.register_session("session-a", {"path": "/repo"}).stem
    # A second instance whose process then dies by SIGKILL.
    script = textwrap.dedent(
        f"""
        import os, signal
        from htmlgraph.session_registry import SessionRegistry
        print(SessionRegistry({str(registry_dir)!r}).register_session("session-b").stem, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    dead = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        env=cli_env(),
        timeout=TIMEOUT,
        check=False,
    )
    assert dead.returncode == -SIGKILL
    gone = dead.stdout.decode().strip()

    listed = json.loads(run_cli("sessions", "list", "--json", *reg).stdout)
    assert sorted(entry["instance_id"] for entry in listed) == sorted([mine, gone])
    table = run_cli("sessions", "list", *reg).stdout.decode().splitlines()
    assert table[0].split() == [
        "INSTANCE",
        "SESSION",
        "STATUS",
        "PID",
        "HOST",
        "PROCESS",
        "CREATED",
        "LAST_ACTIVITY",
    ]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    record = registry.read_session(mine)
    assert record is not None
    assert rows[mine][1:] == [
        "session-a",
        "active",
        str(os.getpid()),
        record["hostname"],
        "alive",
        record["created"],
        record["last_activity"],
    ]
    assert rows[gone][1] == "session-b"
    assert rows[gone][5] == "gone"

    shown = run_cli("sessions", "show", mine, "--json", *reg)
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["repo"] == {"path": "/repo"}
    text = run_cli("sessions", "show", mine, *reg).stdout.decode()
    assert "session_id     session-a" in text
    assert '{"path": "/repo"}' in text
    missing = run_cli("sessions", "show", "no-such-instance", *reg)
    assert missing.returncode == 1
    assert b"no such session instance" in missing.stderr
    unsafe = run_cli("sessions", "show", "../etc", *reg)
    assert unsafe.returncode == 2
    assert b"invalid instance id" in unsafe.stderr

    reaped = run_cli("sessions", "reap", "--json", *reg)
    assert reaped.returncode == 0
    assert json.loads(reaped.stdout) == [gone]  # exactly the dead one
    assert [r["instance_id"] for r in registry.get_current_sessions()] == [mine]

    archived = run_cli("sessions", "archive", mine, *reg)
    assert archived.returncode == 0
    assert archived.stdout.decode().strip() == f"archived {mine}"
    again = run_cli("sessions", "archive", mine, "--json", *reg)
    assert again.returncode == 1
    assert json.loads(again.stdout) == {"instance_id": mine, "archived": False}
    assert registry.get_current_sessions() == []
    assert sorted(os.listdir(registry_dir / "archive")) == sorted([f"{gone}.json", f"{mine}.json"])


def test_sessions_reap_max_idle(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    mine = SessionRegistry(registry_dir).register_session("s").stem
    kept = run_cli("sessions", "reap", "--registry", str(registry_dir))
    assert kept.returncode == 0
    assert kept.stdout == b""  # alive and fresh
    time.sleep(0.05)
    idle = run_cli("sessions", "reap", "--max-idle", "0", "--registry", str(registry_dir))
    assert idle.returncode == 0
    assert idle.stdout.decode().split() == [mine]
    assert b"reaped 1" in idle.stderr


def test_sessions_default_registry_is_under_cwd(tmp_path: Path) -> None:
    result = run_cli("sessions", "list", "--json", cwd=tmp_path)
    assert result.returncode == 0
    assert json.loads(result.stdout) == []
    assert listing(tmp_path) == []  # reading creates nothing


def test_sessions_list_shows_htmlgraph_records_and_odd_pids(tmp_path: Path) -> None:
    # A record in htmlgraph's own format (pid and host inside "instance"),
    # and ours with pids that are not pids: listed, never a crash (issue 11).
    registry = SessionRegistry(tmp_path / "registry")
    theirs = {
        "instance_id": "inst-4242-h-1767875696",
        "session_id": "sess-theirs",
        "created": SessionRegistry._get_utc_timestamp(),
        "repo": {},
        "instance": {"pid": 4242, "hostname": "h", "start_time": "2026-01-08T12:34:56Z"},
        "status": "active",
        "last_activity": SessionRegistry._get_utc_timestamp(),
    }
    (registry.active_dir / "inst-4242-h-1767875696.json").write_text(json.dumps(theirs))
    for n, pid in enumerate([1099511627776, True, "\u0661\u0662"]):
        path = registry.register_session(f"odd-{n}")
        record = json.loads(path.read_text())
        record["pid"] = pid
        target = registry.active_dir / f"odd-{n}.json"
        target.write_text(json.dumps({**record, "instance_id": f"odd-{n}"}))
        path.unlink()
    reg = ["--registry", str(registry.registry_dir)]
    table = run_cli("sessions", "list", *reg)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.decode().splitlines()[1:]}
    assert rows["inst-4242-h-1767875696"][1:6] == ["sess-theirs", "active", "4242", "h", "unknown"]
    for n in range(3):
        assert rows[f"odd-{n}"][5] == "unknown"
    reaped = run_cli("sessions", "reap", "--json", *reg)
    assert reaped.returncode == 0, reaped.stderr
    assert json.loads(reaped.stdout) == []  # not proof of death
    shown = run_cli("sessions", "show", "odd-0", *reg)
    assert shown.returncode == 0
    assert "process" in shown.stdout.decode()


def test_broken_stdout_pipe_is_not_a_traceback(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    registry = SessionRegistry(registry_dir)
    registry.register_session("s")
    proc = start_cli("sessions", "list", "--json", "--registry", str(registry_dir))
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before anything is printed
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode in (0, 1)
    assert b"Traceback" not in err


def test_split_command() -> None:
    assert cli._split_command(["lock", "d", "--", "ls", "--", "x"]) == (
        ["lock", "d"],
        ["ls", "--", "x"],
    )
    assert cli._split_command(["-v", "write", "f", "--", "cat"]) == (["-v", "write", "f"], ["cat"])
    assert cli._split_command(["sessions", "show", "--", "x"]) == (
        ["sessions", "show", "--", "x"],
        None,
    )
    assert cli._split_command(["validate", "f"]) == (["validate", "f"], None)


def test_terminated_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(cli.Terminated(15)))
    assert isinstance(err, cli.Terminated)
    assert err.signum == 15
    assert isinstance(err, BaseException)
    assert not isinstance(err, Exception)


# --------------------------------------------------------------------------
# In-process runs of main(): the same behaviour, measured by coverage
# --------------------------------------------------------------------------


def test_main_in_process_tour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    assert cli.main(["validate", "--json", str(good)]) == 0
    assert cli.main(["validate", str(tmp_path / "missing")]) == 1
    text = tmp_path / "text"
    text.write_text("{")
    assert cli.main(["validate", "--json", str(text)]) == 1

    orphan = tmp_path / temp_name_for(999999999, "x")
    orphan.write_text("x")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    assert cli.main(["cleanup", "--dry-run", "--age-hours", "0.5", str(tmp_path)]) == 0
    assert str(orphan) in capsys.readouterr().out
    assert cli.main(["cleanup", "--age-hours", "0.5", str(tmp_path)]) == 0
    assert not orphan.exists()
    assert cli.main(["cleanup", str(tmp_path / "missing")]) == 1

    lock_dir = tmp_path / "locks"
    noop = [sys.executable, "-c", "import sys; sys.exit(5)"]
    assert cli.main(["lock", "--timeout", "5", str(lock_dir), "--", *noop]) == 5
    assert cli.main(["lock", str(lock_dir), "--", "htmlgraph-no-such-command-xyz"]) == 127
    holder = DirectoryLocker(lock_dir)
    assert holder.acquire_shared_lock(timeout=5)
    try:
        assert cli.main(["lock", "--timeout", "0", str(lock_dir), "--", *noop]) == 75
        assert cli.main(["lock", "--shared", "--timeout", "0", str(lock_dir), "--", *noop]) == 5
    finally:
        holder.release_lock()
    assert listing(lock_dir) == []

    target = tmp_path / "out"
    ok = [sys.executable, "-c", "print('[1]')"]
    assert cli.main(["write", "--json", str(target), "--", *ok]) == 0
    assert json.loads(target.read_text()) == [1]
    failing = [sys.executable, "-c", "import sys; print('x'); sys.exit(4)"]
    assert cli.main(["write", str(target), "--", *failing]) == 4
    assert json.loads(target.read_text()) == [1]

    registry_dir = tmp_path / "registry"
    reg = ["--registry", str(registry_dir)]
    assert cli.main(["sessions", "list", *reg]) == 0
    mine = SessionRegistry(registry_dir).register_session("s").stem
    capsys.readouterr()
    assert cli.main(["sessions", "list", *reg]) == 0
    assert mine in capsys.readouterr().out
    assert cli.main(["sessions", "show", mine, *reg]) == 0
    capsys.readouterr()
    assert cli.main(["sessions", "show", mine, "--json", *reg]) == 0
    assert json.loads(capsys.readouterr().out)["instance_id"] == mine
    assert cli.main(["sessions", "show", "a/b", *reg]) == 2
    assert cli.main(["sessions", "reap", "--json", *reg]) == 0
    assert cli.main(["sessions", "archive", mine, "--json", *reg]) == 0
    assert cli.main(["sessions", "archive", mine, *reg]) == 1
    assert cli.main(["sessions", "archive", "../x", *reg]) == 2

    capsys.readouterr()
    assert cli.main(["check", "--seconds", "0", "--processes", "1", str(tmp_path)]) == 0
    assert "PASS: every promise held" in capsys.readouterr().out
    monkeypatch.syspath_prepend(TESTS)
    status = cli.main(
        [
            "check",
            "--seconds",
            "0",
            "--json",
            "--writer",
            "_clihelpers:inplace_writer",
            str(tmp_path),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["writer"] == "_clihelpers.inplace_writer"
    assert status == (0 if report["ok"] else 1)
    assert sorted(os.listdir(tmp_path)) == ["good.json", "locks", "out", "registry", "text"]
