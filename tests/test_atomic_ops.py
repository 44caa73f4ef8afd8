"""Tests for the write half of :mod:`htmlgraph.atomic_ops`.

The first nine classes mirror nine of the seed document's ten test classes
(39 of its 47 cases; ``TestDirectoryLocker``'s 8 live in ``test_locker.py``),
then the seed's usage examples run verbatim. The classes after them
cover what the seed lacks: the real axes (str/Path, new/existing, text/bytes,
encodings), leftovers after every outcome, permission tables, symlinks across
filesystems, long names, create-only races, JSON values, retries, cleanup
safety, bad input, property tests and a 100 MB old-or-new check.

After every scenario the disk is checked: the target holds the old or the new
content and the directory holds nothing else (the whole listing is asserted).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import age, dead_pid
from _writehelpers import (
    EXIT_OK,
    JOIN_TIMEOUT,
    TEMP_NAME_RE,
    big_file_reader,
    big_file_writer,
    is_root,
    listing,
    run_python,
    temp_name_for,
    temp_names,
    tmpfs,
    world_traversable_dir,
)
from htmlgraph import (
    AtomicFileWriter,
    _identity,
    _platform,
    atomic_json_write,
    atomic_ops,
    atomic_rename,
    atomic_write,
    cleanup_orphaned_temp_files,
    safe_temp_file,
    validate_atomic_write,
)

PathKind = Callable[[Path], "str | Path"]
APIS = ["context", "binary", "atomic_write", "static", "json", "static-json"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED_DIR = REPO_ROOT.parent / "shared" / "seed"

needs_root = pytest.mark.skipif(not is_root(), reason="needs root (mounts or uid changes)")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")


@pytest.fixture(params=[str, Path], ids=["str", "Path"])
def as_path(request: pytest.FixtureRequest) -> PathKind:
    """Pass paths to the API as ``str`` or as ``Path``."""
    kind: PathKind = request.param
    return kind


def orphan_name(pid: int, target: str = "data.json") -> str:
    """Return a temp name in this library's format for ``pid``."""
    return temp_name_for(pid, target)


def _octal(value: int | None) -> str:
    return "none" if value is None else oct(value)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_names(exc: BaseException, path: str | os.PathLike[str]) -> None:
    """Assert that the exception's message names ``path``."""
    assert os.fspath(path) in str(exc), f"{os.fspath(path)!r} not in {str(exc)!r}"


def write_via(
    api: str, target: str | Path, text: str, *, overwrite: bool = True, durable: bool = True
) -> None:
    """Write ``text`` to ``target`` through one of the public entry points."""
    if api == "context":
        with AtomicFileWriter(target, overwrite=overwrite, durable=durable) as f:
            f.write(text)
    elif api == "binary":
        with AtomicFileWriter(target, mode="wb", overwrite=overwrite, durable=durable) as fb:
            fb.write(text.encode())
    elif api == "atomic_write":
        atomic_write(target, text, overwrite=overwrite, durable=durable)
    elif api == "static":
        AtomicFileWriter.atomic_write(target, text.encode(), overwrite=overwrite, durable=durable)
    elif api == "json":
        atomic_json_write(target, [text], overwrite=overwrite, durable=durable)
    elif api == "static-json":
        AtomicFileWriter.atomic_json_write(target, text, overwrite=overwrite, durable=durable)
    else:
        raise AssertionError(api)


def fork() -> int:
    if sys.platform == "win32":
        pytest.skip("no fork on Windows")
    else:
        return os.fork()


def make_fifo(path: Path) -> None:
    if sys.platform == "win32":
        pytest.skip("no FIFOs on Windows")
    else:
        os.mkfifo(path)


def single_temp(directory: Path) -> str:
    """Return the one temp file in ``directory`` (asserting there is exactly one, ours)."""
    temps = temp_names(directory)
    assert len(temps) == 1, temps
    match = TEMP_NAME_RE.match(temps[0])
    assert match is not None, temps[0]
    assert int(match["pid"]) == os.getpid()
    return temps[0]


# ======================================================================================
# The seed's test classes
# ======================================================================================


class TestAtomicFileWriterContextManager:
    def test_basic_write(self, tmp_path: Path, as_path: PathKind) -> None:
        target = tmp_path / "target.txt"
        with AtomicFileWriter(as_path(target)) as f:
            f.write("content")
        assert target.read_text(encoding="utf-8") == "content"
        assert listing(tmp_path) == ["target.txt"]

    def test_creates_parent_directories(self, tmp_path: Path, as_path: PathKind) -> None:
        target = tmp_path / "a" / "b" / "c" / "target.txt"
        with AtomicFileWriter(as_path(target)) as f:
            f.write("deep")
        assert target.read_text(encoding="utf-8") == "deep"
        assert listing(tmp_path) == ["a"]
        assert listing(target.parent) == ["target.txt"]

    def test_overwrites_existing(self, tmp_path: Path) -> None:
        target = tmp_path / "target.txt"
        target.write_text("old content that is longer", encoding="utf-8")
        with AtomicFileWriter(target) as f:
            f.write("new")
        assert target.read_text(encoding="utf-8") == "new"
        assert listing(tmp_path) == ["target.txt"]

    def test_exception_keeps_original(self, tmp_path: Path) -> None:
        target = tmp_path / "target.txt"
        target.write_text("original", encoding="utf-8")
        with pytest.raises(RuntimeError, match="boom"), AtomicFileWriter(target) as f:  # noqa: PT012
            f.write("partial")
            f.flush()
            assert target.read_text(encoding="utf-8") == "original"
            raise RuntimeError("boom")
        assert target.read_text(encoding="utf-8") == "original"
        assert listing(tmp_path) == ["target.txt"]

    def test_exception_on_new_target_leaves_nothing(self, tmp_path: Path) -> None:
        target = tmp_path / "new.txt"
        with pytest.raises(ValueError, match="boom"), AtomicFileWriter(target) as f:  # noqa: PT012
            f.write("partial")
            raise ValueError("boom")
        assert listing(tmp_path) == []

    def test_invalid_path_parent_is_a_file(self, tmp_path: Path) -> None:
        blocker = tmp_path / "blocker"
        blocker.write_text("i am a file", encoding="utf-8")
        target = blocker / "sub" / "target.txt"
        with pytest.raises(OSError, match="blocker") as info, AtomicFileWriter(target) as f:
            f.write("never")
        assert info.value.errno in (errno.ENOTDIR, errno.EEXIST)
        assert blocker.read_text(encoding="utf-8") == "i am a file"
        assert listing(tmp_path) == ["blocker"]

    def test_multiple_sequential_writes(self, tmp_path: Path) -> None:
        target = tmp_path / "target.txt"
        for i in range(20):
            with AtomicFileWriter(target, durable=i % 2 == 0) as f:
                f.write(f"version {i}\n" * (i + 1))
            assert target.read_text(encoding="utf-8") == f"version {i}\n" * (i + 1)
            assert listing(tmp_path) == ["target.txt"]

    def test_custom_temp_dir(self, tmp_path: Path, as_path: PathKind) -> None:
        staging = tmp_path / "staging"
        staging.mkdir()
        out = tmp_path / "out"
        out.mkdir()
        target = out / "target.txt"
        with AtomicFileWriter(as_path(target), as_path(staging)) as f:
            f.write("via staging")
            # The temp lives in temp_dir, not beside the target.
            single_temp(staging)
            assert listing(out) == []
        assert target.read_text(encoding="utf-8") == "via staging"
        assert listing(staging) == []
        assert listing(out) == ["target.txt"]


class TestAtomicFileWriterStaticMethods:
    def test_atomic_write_text(self, tmp_path: Path, as_path: PathKind) -> None:
        target = tmp_path / "target.txt"
        AtomicFileWriter.atomic_write(as_path(target), "content")
        assert target.read_text(encoding="utf-8") == "content"
        assert listing(tmp_path) == ["target.txt"]

    def test_atomic_write_bytes(self, tmp_path: Path) -> None:
        target = tmp_path / "blob.bin"
        payload = bytes(range(256)) * 10
        AtomicFileWriter.atomic_write(target, payload)
        assert target.read_bytes() == payload
        assert listing(tmp_path) == ["blob.bin"]

    def test_atomic_json_write(self, tmp_path: Path, as_path: PathKind) -> None:
        target = tmp_path / "data.json"
        AtomicFileWriter.atomic_json_write(as_path(target), {"key": "value", "n": [1, 2]})
        assert json.loads(target.read_text(encoding="utf-8")) == {"key": "value", "n": [1, 2]}
        assert listing(tmp_path) == ["data.json"]

    def test_json_formatting(self, tmp_path: Path) -> None:
        target = tmp_path / "data.json"
        data = {"b": 1, "a": {"é": "ünïcode"}}
        AtomicFileWriter.atomic_json_write(target, data)
        text = target.read_bytes().decode("utf-8")
        assert text == json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        assert '"é": "ünïcode"' in text  # not \u-escaped
        AtomicFileWriter.atomic_json_write(target, data, indent=None, sort_keys=True)
        assert target.read_text(encoding="utf-8") == ('{"a": {"é": "ünïcode"}, "b": 1}\n')

    def test_safe_read_with_retry(self, tmp_path: Path, as_path: PathKind) -> None:
        target = tmp_path / "target.txt"
        target.write_text("hello\nworld", encoding="utf-8")
        assert AtomicFileWriter.safe_read_with_retry(as_path(target)) == "hello\nworld"

    def test_safe_read_with_retry_transient_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        target = tmp_path / "late.txt"
        sleeps: list[float] = []

        def fake_sleep(seconds: float) -> None:
            # The file appears while the reader backs off (another writer finishing).
            sleeps.append(seconds)
            if len(sleeps) == 2:
                atomic_write(target, "arrived")

        monkeypatch.setattr("htmlgraph.atomic_ops.time.sleep", fake_sleep)
        text = AtomicFileWriter.safe_read_with_retry(target, max_retries=5, retry_delay=0.05)
        assert text == "arrived"
        assert len(sleeps) == 2


class TestAtomicRename:
    def test_basic_rename(self, tmp_path: Path, as_path: PathKind) -> None:
        src, dst = tmp_path / "src.txt", tmp_path / "dst.txt"
        src.write_text("payload", encoding="utf-8")
        atomic_rename(as_path(src), as_path(dst))
        assert dst.read_text(encoding="utf-8") == "payload"
        assert listing(tmp_path) == ["dst.txt"]

    def test_overwrites_existing(self, tmp_path: Path) -> None:
        src, dst = tmp_path / "src.txt", tmp_path / "dst.txt"
        src.write_text("new", encoding="utf-8")
        dst.write_text("old", encoding="utf-8")
        atomic_rename(src, dst)
        assert dst.read_text(encoding="utf-8") == "new"
        assert listing(tmp_path) == ["dst.txt"]

    def test_creates_parent_directories(self, tmp_path: Path) -> None:
        src = tmp_path / "src.txt"
        dst = tmp_path / "x" / "y" / "dst.txt"
        src.write_text("moved", encoding="utf-8")
        atomic_rename(src, dst)
        assert dst.read_text(encoding="utf-8") == "moved"
        assert listing(tmp_path) == ["x"]
        assert listing(dst.parent) == ["dst.txt"]

    def test_nonexistent_source(self, tmp_path: Path) -> None:
        src = tmp_path / "missing.txt"
        dst = tmp_path / "dst.txt"
        dst.write_text("keep", encoding="utf-8")
        with pytest.raises(FileNotFoundError) as info:
            atomic_rename(src, dst)
        assert_names(info.value, src)
        assert dst.read_text(encoding="utf-8") == "keep"
        assert listing(tmp_path) == ["dst.txt"]

    def test_same_path(self, tmp_path: Path) -> None:
        src = tmp_path / "same.txt"
        src.write_text("stay", encoding="utf-8")
        with pytest.raises(ValueError, match="same"):
            atomic_rename(src, src)
        assert src.read_text(encoding="utf-8") == "stay"
        assert listing(tmp_path) == ["same.txt"]

    @pytest.mark.parametrize("durable", [True, False])
    def test_durable_flag(self, tmp_path: Path, durable: bool) -> None:
        src, dst = tmp_path / "s", tmp_path / "d"
        src.write_text("x", encoding="utf-8")
        atomic_rename(src, dst, durable=durable)
        assert listing(tmp_path) == ["d"]

    def test_same_file_spelled_differently(self, tmp_path: Path) -> None:
        (tmp_path / "sub").mkdir()
        src = tmp_path / "sub" / "f.txt"
        src.write_text("stay", encoding="utf-8")
        with pytest.raises(ValueError, match="same"):
            atomic_rename(src, tmp_path / "sub" / ".." / "sub" / "f.txt")
        assert src.read_text(encoding="utf-8") == "stay"
        assert listing(tmp_path / "sub") == ["f.txt"]

    @posix_only
    def test_hard_links_are_the_same_file(self, tmp_path: Path) -> None:
        src = tmp_path / "a"
        src.write_text("stay", encoding="utf-8")
        os.link(src, tmp_path / "b")
        with pytest.raises(ValueError, match="same"):
            atomic_rename(src, tmp_path / "b")
        assert listing(tmp_path) == ["a", "b"]

    def test_moves_across_directories(self, tmp_path: Path) -> None:
        (tmp_path / "x").mkdir()
        src = tmp_path / "x" / "f"
        src.write_text("moved", encoding="utf-8")
        atomic_rename(src, tmp_path / "y" / "f")
        assert listing(tmp_path / "x") == []
        assert (tmp_path / "y" / "f").read_text(encoding="utf-8") == "moved"

    @linux_only
    def test_cross_device_is_exdev_and_changes_nothing(self, tmp_path: Path) -> None:
        src = tmp_path / "s"
        src.write_text("x", encoding="utf-8")
        with tmpfs(tmp_path / "other", size="1m") as other:
            with pytest.raises(OSError, match="cross-device") as info:
                atomic_rename(src, other / "d")
            assert info.value.errno == errno.EXDEV
            assert listing(other) == []
        assert src.read_text(encoding="utf-8") == "x"


class TestSafeTempFile:
    def test_unique_paths(self, tmp_path: Path) -> None:
        paths = {safe_temp_file(tmp_path) for _ in range(500)}
        assert len(paths) == 500
        for path in paths:
            assert path.parent == tmp_path
            assert not path.exists()
            tag = _identity.owner_tag(os.getpid())
            assert re.fullmatch(rf"\.tmp-{os.getpid()}-{tag}-[0-9a-f]{{32}}", path.name), path.name
        assert listing(tmp_path) == []  # only names are handed out, no files

    def test_creates_parent_directory(self, tmp_path: Path, as_path: PathKind) -> None:
        base = tmp_path / "new" / "dir"
        path = safe_temp_file(as_path(base))
        assert isinstance(path, Path)
        assert base.is_dir()
        assert path.parent == base
        assert listing(base) == []

    def test_custom_prefix(self, tmp_path: Path) -> None:
        path = safe_temp_file(tmp_path, prefix="mine")
        tag = _identity.owner_tag(os.getpid())
        assert re.fullmatch(rf"\.mine-{os.getpid()}-{tag}-[0-9a-f]{{32}}", path.name), path.name
        with open(path, "x", encoding="utf-8") as f:  # usable with O_EXCL
            f.write("x")
        assert listing(tmp_path) == [path.name]


class TestCleanupOrphanedTempFiles:
    def test_removes_old_orphans(self, tmp_path: Path) -> None:
        pid = dead_pid()
        orphans = [tmp_path / orphan_name(pid, f"f{i}.json") for i in range(3)]
        for orphan in orphans:
            orphan.write_text("half a write", encoding="utf-8")
            age(orphan, 48)
        (tmp_path / "keep.json").write_text("{}", encoding="utf-8")
        assert cleanup_orphaned_temp_files(tmp_path) == 3
        assert listing(tmp_path) == ["keep.json"]

    def test_nonexistent_directory(self, tmp_path: Path, as_path: PathKind) -> None:
        assert cleanup_orphaned_temp_files(as_path(tmp_path / "nope")) == 0
        assert listing(tmp_path) == []

    def test_keeps_young_temp_files(self, tmp_path: Path) -> None:
        young = tmp_path / orphan_name(dead_pid())
        young.write_text("recent", encoding="utf-8")
        age(young, 1)
        assert cleanup_orphaned_temp_files(tmp_path, age_hours=2) == 0
        assert listing(tmp_path) == [young.name]
        assert cleanup_orphaned_temp_files(tmp_path, age_hours=0.5) == 1
        assert listing(tmp_path) == []

    def test_every_old_dot_tmp_name_goes_and_nothing_else(self, tmp_path: Path) -> None:
        # The seed's contract: the glob ".tmp-*", whoever wrote the file (the
        # seed's own writer used mkstemp: random names without a pid).
        pid = dead_pid()
        seed_style = [
            ".tmp-notes",
            ".tmp-",
            f".tmp-{pid}",
            ".tmp-k3j_x9a2.tmp",  # tempfile.mkstemp(prefix=".tmp-", suffix=".tmp")
            f".tmp-{pid}-nothex0123456789-x",
            f".tmp-{pid}-0123456789ABCDEF-x",
            f".tmp-abc-{'0' * 16}-x",
            f".tmp-99999999999-{'0' * 16}-x",  # a pid out of range: foreign, not proof of life
            orphan_name(pid),  # ours, its writer gone
        ]
        other = [
            "notes.txt",
            f"tmp-{pid}-{'0' * 16}-x",
            f"x.tmp-{pid}-{'0' * 16}-x",
            f".tmpx-{pid}-{'0' * 16}-x",
        ]
        for name in seed_style + other:
            (tmp_path / name).write_text("old", encoding="utf-8")
            age(tmp_path / name, 1000)
        assert cleanup_orphaned_temp_files(tmp_path) == len(seed_style)
        assert listing(tmp_path) == sorted(other)


class TestValidateAtomicWrite:
    def test_readable_file(self, tmp_path: Path, as_path: PathKind) -> None:
        target = tmp_path / "ok.txt"
        atomic_write(target, "héllo wörld\n")
        assert validate_atomic_write(as_path(target)) is True

    def test_nonexistent_file(self, tmp_path: Path) -> None:
        assert validate_atomic_write(tmp_path / "missing.txt") is False
        assert listing(tmp_path) == []

    def test_directory_is_not_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "dir").mkdir()
        assert validate_atomic_write(tmp_path / "dir") is False

    def test_corrupted_file(self, tmp_path: Path) -> None:
        target = tmp_path / "bad.txt"
        target.write_bytes(b"valid start \xff\xfe then garbage")
        assert validate_atomic_write(target) is False
        truncated = tmp_path / "cut.txt"
        truncated.write_bytes("ends mid-character: €".encode()[:-1])
        assert validate_atomic_write(truncated) is False

    def test_empty_file_is_valid(self, tmp_path: Path) -> None:
        (tmp_path / "e").write_bytes(b"")
        assert validate_atomic_write(tmp_path / "e") is True

    def test_large_valid_file_with_char_across_chunks(self, tmp_path: Path) -> None:
        target = tmp_path / "big.txt"
        # A 3-byte character straddles the 1 MiB mark.
        target.write_bytes(b"a" * ((1 << 20) - 1) + "€".encode() + b"tail")
        assert validate_atomic_write(target) is True

    @posix_only
    def test_symlinks(self, tmp_path: Path) -> None:
        (tmp_path / "real").write_text("ok", encoding="utf-8")
        (tmp_path / "good").symlink_to("real")
        (tmp_path / "dangling").symlink_to("nothing")
        assert validate_atomic_write(tmp_path / "good") is True
        assert validate_atomic_write(tmp_path / "dangling") is False

    @posix_only
    def test_fifo_is_false_and_does_not_block(self, tmp_path: Path) -> None:
        fifo = tmp_path / "pipe"
        make_fifo(fifo)
        code = "import sys\nfrom htmlgraph import validate_atomic_write\n"
        code += "print(validate_atomic_write(sys.argv[1]))\n"
        proc = run_python(code, str(fifo), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "False"

    @needs_root
    @posix_only
    def test_unreadable_file_is_false(self) -> None:
        with world_traversable_dir() as directory:
            secret = directory / "secret.txt"
            secret.write_text("root only", encoding="utf-8")
            secret.chmod(0o600)
            code = textwrap.dedent(
                """
                import os, sys
                from htmlgraph import validate_atomic_write
                os.setgroups([]); os.setgid(65534); os.setuid(65534)
                print(validate_atomic_write(sys.argv[1]), validate_atomic_write(sys.argv[2]))
                """
            )
            (directory / "public.txt").write_text("anyone", encoding="utf-8")
            proc = run_python(code, str(secret), str(directory / "public.txt"))
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.split() == ["False", "True"]


_CRASH_CHILD = textwrap.dedent(
    """
    import sys, time
    from htmlgraph import AtomicFileWriter
    writer = AtomicFileWriter(sys.argv[1])
    f = writer.open()
    f.write("half of the new content")
    f.flush()
    print("armed", flush=True)
    time.sleep(120)
    """
)


def _crash_mid_write(target: Path) -> int:
    """Start a writer process, SIGKILL it in the middle of its write; return its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, str(target)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "armed"
        proc.kill()  # SIGKILL: no handler, no finally, no cleanup runs in the child
        assert proc.wait(timeout=60) == -signal.Signals["SIGKILL"].value
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    return proc.pid


@posix_only
class TestCrashSafety:
    def test_original_intact_after_crash(self, tmp_path: Path) -> None:
        target = tmp_path / "target.txt"
        target.write_text("original", encoding="utf-8")
        pid = _crash_mid_write(target)
        assert target.read_text(encoding="utf-8") == "original"
        # A kill -9 cannot clean up: exactly the dead writer's temp remains.
        temps = temp_names(tmp_path)
        assert len(temps) == 1
        match = TEMP_NAME_RE.match(temps[0])
        assert match is not None
        assert int(match["pid"]) == pid
        assert (tmp_path / temps[0]).read_text(encoding="utf-8") == "half of the new content"
        assert validate_atomic_write(target)

    def test_orphaned_temp_file_cleanup(self, tmp_path: Path) -> None:
        target = tmp_path / "target.txt"
        target.write_text("original", encoding="utf-8")
        _crash_mid_write(target)
        (orphan,) = temp_names(tmp_path)
        # Young orphans are kept (age guard), old ones of dead writers removed.
        assert cleanup_orphaned_temp_files(tmp_path) == 0
        age(tmp_path / orphan, 25)
        assert cleanup_orphaned_temp_files(tmp_path) == 1
        assert listing(tmp_path) == ["target.txt"]
        atomic_write(target, "after recovery")
        assert target.read_text(encoding="utf-8") == "after recovery"
        assert listing(tmp_path) == ["target.txt"]

    def test_concurrent_writes_to_different_files(self, tmp_path: Path) -> None:
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def work(i: int) -> None:
            try:
                start.wait(30)
                for n in range(15):
                    with AtomicFileWriter(tmp_path / f"f{i}.txt", durable=False) as f:
                        f.write(f"{i}:{n}\n" * (n * 100 + 1))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_TIMEOUT)
            assert not t.is_alive()
        assert errors == []
        assert listing(tmp_path) == sorted(f"f{i}.txt" for i in range(8))
        for i in range(8):
            text = (tmp_path / f"f{i}.txt").read_text(encoding="utf-8")
            assert text == f"{i}:14\n" * 1401

    def test_large_file_atomic_write(self, tmp_path: Path) -> None:
        target = tmp_path / "big.bin"
        target.write_bytes(b"old")
        chunk = os.urandom(1 << 20)
        expected = hashlib.sha256()
        with AtomicFileWriter(target, mode="wb") as f:
            for i in range(10):
                block = bytes([i]) + chunk[1:]
                f.write(block)
                expected.update(block)
                assert target.read_bytes() == b"old"
        data = target.read_bytes()
        assert len(data) == 10 * (1 << 20)
        assert hashlib.sha256(data).hexdigest() == expected.hexdigest()
        assert listing(tmp_path) == ["big.bin"]


_UNPRIVILEGED_CHILD = textwrap.dedent(
    """
    import errno, json, os, sys, traceback
    import htmlgraph
    from htmlgraph import AtomicFileWriter, atomic_write
    target, how = sys.argv[1], sys.argv[2]
    # Drop root for good: the interpreter and htmlgraph are already loaded.
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    try:
        if how == "context":
            with AtomicFileWriter(target) as f:
                f.write("new")
        else:
            atomic_write(target, "new")
    except PermissionError as exc:
        print(json.dumps({"errno": exc.errno, "message": str(exc)}))
        sys.exit(0)
    except BaseException:
        traceback.print_exc()
        sys.exit(2)
    sys.exit(1)
    """
)


class TestErrorHandling:
    @needs_root
    @posix_only
    @pytest.mark.parametrize("how", ["context", "atomic_write"])
    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    def test_permission_error(self, how: str, existing: bool) -> None:
        with world_traversable_dir() as directory:
            target = directory / "target.txt"
            if existing:
                target.write_text("root's", encoding="utf-8")
                target.chmod(0o666)  # even a world-writable file needs a writable directory
            proc = run_python(_UNPRIVILEGED_CHILD, str(target), how)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            report = json.loads(proc.stdout)
            assert report["errno"] == errno.EACCES
            assert str(directory) in report["message"]
            assert listing(directory) == (["target.txt"] if existing else [])
            if existing:
                assert target.read_text(encoding="utf-8") == "root's"

    @linux_only
    @pytest.mark.parametrize("how", ["context", "binary", "atomic_write", "json"])
    def test_disk_full(self, tmp_path: Path, how: str) -> None:
        with tmpfs(tmp_path / "small", size="1m") as mnt:
            target = mnt / "target.txt"
            target.write_text("old", encoding="utf-8")
            big = "x" * (3 << 20)
            with pytest.raises(OSError, match="No space left") as info:
                write_via(how, target, big)
            assert info.value.errno == errno.ENOSPC
            assert target.read_text(encoding="utf-8") == "old"
            assert listing(mnt) == ["target.txt"]
            # The space came back: a small write succeeds.
            atomic_write(target, "after")
            assert target.read_text(encoding="utf-8") == "after"
            assert listing(mnt) == ["target.txt"]

    @posix_only
    def test_symlink_handling(self, tmp_path: Path) -> None:
        real_dir = tmp_path / "real"
        real_dir.mkdir()
        real = real_dir / "data.txt"
        real.write_text("old", encoding="utf-8")
        link = tmp_path / "link.txt"
        link.symlink_to(real)
        with AtomicFileWriter(link) as f:
            f.write("new")
            # The temp goes beside the real file, not beside the link.
            single_temp(real_dir)
        assert link.is_symlink()
        assert os.readlink(link) == str(real)
        assert real.read_text(encoding="utf-8") == "new"
        assert listing(tmp_path) == ["link.txt", "real"]
        assert listing(real_dir) == ["data.txt"]


class TestIntegration:
    def test_end_to_end_workflow(self, tmp_path: Path) -> None:
        registry = tmp_path / "sessions" / "registry"
        for i in range(5):
            AtomicFileWriter.atomic_json_write(registry / f"s{i}.json", {"id": i, "ok": True})
        assert listing(registry) == [f"s{i}.json" for i in range(5)]
        for i in range(5):
            path = registry / f"s{i}.json"
            assert validate_atomic_write(path)
            text = AtomicFileWriter.safe_read_with_retry(path)
            assert json.loads(text) == {"id": i, "ok": True}
        staged = safe_temp_file(registry)
        staged.write_text("renamed in", encoding="utf-8")
        atomic_rename(staged, registry / "s0.json")
        assert (registry / "s0.json").read_text(encoding="utf-8") == "renamed in"
        assert listing(registry) == [f"s{i}.json" for i in range(5)]

    def test_cleanup_then_write_sequence(self, tmp_path: Path) -> None:
        target = tmp_path / "index.json"
        atomic_json_write(target, {"v": 1})
        pid = dead_pid()
        orphan = tmp_path / orphan_name(pid, "index.json")
        orphan.write_text('{"v": "half', encoding="utf-8")
        age(orphan, 30)
        assert cleanup_orphaned_temp_files(tmp_path) == 1
        atomic_json_write(target, {"v": 2})
        assert cleanup_orphaned_temp_files(tmp_path) == 0
        assert json.loads(target.read_text(encoding="utf-8")) == {"v": 2}
        assert listing(tmp_path) == ["index.json"]


# ======================================================================================
# The seed's usage examples, verbatim
# ======================================================================================

SEED_WRITER_EXAMPLE = """\
from htmlgraph import AtomicFileWriter

# Context manager style
with AtomicFileWriter(Path("target.txt")) as f:
    f.write("content")

# Static methods
AtomicFileWriter.atomic_write(Path("target.txt"), "content")
AtomicFileWriter.atomic_json_write(Path("data.json"), {"key": "value"})
AtomicFileWriter.safe_read_with_retry(Path("target.txt"))
"""

SEED_LOCKER_EXAMPLE = """\
from htmlgraph import DirectoryLocker

locker = DirectoryLocker(Path("locks"))
if locker.acquire_exclusive_lock(timeout=5.0):
    try:
        # Critical section
        pass
    finally:
        locker.release_lock()
"""


def _seed_python_blocks() -> list[str]:
    blocks: list[str] = []
    for seed in sorted(SEED_DIR.glob("*.txt")):
        text = seed.read_text(encoding="utf-8")
        blocks += re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return blocks


class TestSeedUsageExamples:
    def test_examples_match_the_seed(self) -> None:
        blocks = _seed_python_blocks()
        if not blocks:
            pytest.skip(f"seed document not found in {SEED_DIR}")
        assert SEED_WRITER_EXAMPLE in blocks
        assert SEED_LOCKER_EXAMPLE in blocks

    def test_writer_example_runs_verbatim(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        # The seed's snippets assume `from pathlib import Path`; nothing else is added.
        exec(compile(SEED_WRITER_EXAMPLE, "seed-writer-example", "exec"), {"Path": Path})  # noqa: S102
        assert (tmp_path / "target.txt").read_text(encoding="utf-8") == "content"
        assert (tmp_path / "data.json").read_text(encoding="utf-8") == ('{\n  "key": "value"\n}\n')
        assert listing(tmp_path) == ["data.json", "target.txt"]

    def test_locker_example_runs_verbatim(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        from htmlgraph import DirectoryLocker

        namespace: dict[str, object] = {"Path": Path}
        exec(compile(SEED_LOCKER_EXAMPLE, "seed-locker-example", "exec"), namespace)  # noqa: S102
        assert listing(tmp_path) == ["locks"]
        # Released: nothing of ours is left and the lock can be taken again at once.
        assert [n for n in listing(tmp_path / "locks") if str(os.getpid()) in n] == []
        locker = namespace["locker"]
        assert isinstance(locker, DirectoryLocker)
        assert locker.acquire_exclusive_lock(timeout=0) is True
        locker.release_lock()
        assert [n for n in listing(tmp_path / "locks") if str(os.getpid()) in n] == []


# ======================================================================================
# Beyond the seed
# ======================================================================================


class TestRoundTripAxes:
    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    @pytest.mark.parametrize("durable", [True, False], ids=["durable", "fast"])
    @pytest.mark.parametrize("api", ["context", "open-commit", "atomic_write", "static"])
    def test_text(
        self, tmp_path: Path, as_path: PathKind, existing: bool, durable: bool, api: str
    ) -> None:
        target = tmp_path / "target.txt"
        if existing:
            target.write_text("previous version\n" * 100, encoding="utf-8")
        content = "línea uno\nline two ✓\n"
        if api == "context":
            with AtomicFileWriter(as_path(target), durable=durable) as f:
                f.write(content)
        elif api == "open-commit":
            writer = AtomicFileWriter(as_path(target), durable=durable)
            try:
                f = writer.open()
                f.write(content)
                writer.commit()
            finally:
                writer.rollback()  # a no-op after commit
        elif api == "atomic_write":
            atomic_write(as_path(target), content, durable=durable)
        else:
            AtomicFileWriter.atomic_write(as_path(target), content, durable=durable)
        assert target.read_bytes() == content.encode("utf-8")
        assert listing(tmp_path) == ["target.txt"]

    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    @pytest.mark.parametrize("api", ["context", "atomic_write"])
    @pytest.mark.parametrize(
        "payload",
        [b"", b"\x00", bytes(range(256)), b"\r\n\n\r" * 1000, os.urandom(70_000)],
        ids=["empty", "nul", "all-bytes", "newlines", "random-70k"],
    )
    def test_bytes(
        self, tmp_path: Path, as_path: PathKind, existing: bool, api: str, payload: bytes
    ) -> None:
        target = tmp_path / "blob.bin"
        if existing:
            target.write_bytes(b"old" * 5000)
        if api == "context":
            with AtomicFileWriter(as_path(target), mode="wb") as f:
                f.write(payload)
        else:
            atomic_write(as_path(target), payload)
        assert target.read_bytes() == payload
        assert listing(tmp_path) == ["blob.bin"]

    def test_bytearray_and_memoryview(self, tmp_path: Path) -> None:
        target = tmp_path / "blob.bin"
        atomic_write(target, bytearray(b"from a bytearray"))  # type: ignore[arg-type]
        assert target.read_bytes() == b"from a bytearray"
        atomic_write(target, memoryview(b"from a view"))  # type: ignore[arg-type]
        assert target.read_bytes() == b"from a view"
        assert listing(tmp_path) == ["blob.bin"]

    def test_empty_text_write_creates_empty_file(self, tmp_path: Path) -> None:
        target = tmp_path / "empty.txt"
        target.write_text("not empty", encoding="utf-8")
        with AtomicFileWriter(target):
            pass
        assert target.read_bytes() == b""
        assert listing(tmp_path) == ["empty.txt"]

    def test_relative_path_resolved_against_cwd_at_construction(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        monkeypatch.chdir(tmp_path / "a")
        atomic_write("rel.txt", "relative")
        assert (tmp_path / "a" / "rel.txt").read_text(encoding="utf-8") == "relative"
        assert listing(tmp_path / "a") == ["rel.txt"]
        assert listing(tmp_path / "b") == []

    def test_temp_name_format_during_write(self, tmp_path: Path) -> None:
        target = tmp_path / "report.json"
        writer = AtomicFileWriter(target)
        with writer as f:
            f.write("{}")
            name = single_temp(tmp_path)
            match = TEMP_NAME_RE.match(name)
            assert match is not None
            assert match["stem"] == "report.json"
            assert writer.temp_path == tmp_path / name
            # Not visible under the target's name until the commit.
            assert not target.exists()
        assert writer.temp_path is None
        assert listing(tmp_path) == ["report.json"]


class TestTextOptions:
    @pytest.mark.parametrize(
        "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32-le", "latin-1", "cp1252", "koi8-r"]
    )
    def test_encodings(self, tmp_path: Path, encoding: str) -> None:
        text = "abc\n" + ("é" if encoding != "koi8-r" else "ж") + " end\n"
        target = tmp_path / "enc.txt"
        with AtomicFileWriter(target, encoding=encoding) as f:
            f.write(text)
        assert target.read_bytes() == text.encode(encoding)
        atomic_write(target, text * 2, encoding=encoding)
        assert target.read_bytes() == (text * 2).encode(encoding)
        assert listing(tmp_path) == ["enc.txt"]

    @posix_only
    def test_default_encoding_is_utf8_not_locale(self, tmp_path: Path) -> None:
        # A child whose locale encoding is ASCII: the default must still be UTF-8.
        code = textwrap.dedent(
            """
            import locale, sys
            from htmlgraph import AtomicFileWriter, atomic_write
            assert locale.getpreferredencoding(False).lower() in ("ansi_x3.4-1968", "ascii")
            with AtomicFileWriter(sys.argv[1]) as f:
                f.write("\\u00fc\\u20ac\\U0001F600")
            atomic_write(sys.argv[2], "\\u00fc\\u20ac\\U0001F600!")
            """
        )
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
        env["PYTHONCOERCECLOCALE"] = "0"
        a, b = tmp_path / "a.txt", tmp_path / "b.txt"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(a), str(b)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert a.read_bytes() == "ü€😀".encode()
        assert b.read_bytes() == "ü€😀!".encode()
        assert listing(tmp_path) == ["a.txt", "b.txt"]

    @pytest.mark.parametrize(
        ("newline", "expected"),
        [
            (None, "a\nb\r\nc\r".replace("\n", os.linesep)),
            ("", "a\nb\r\nc\r"),
            ("\n", "a\nb\r\nc\r"),
            ("\r\n", "a\r\nb\r\r\nc\r"),
            ("\r", "a\rb\r\rc\r"),
        ],
        ids=["None", "empty", "lf", "crlf", "cr"],
    )
    def test_newline(self, tmp_path: Path, newline: str | None, expected: str) -> None:
        target = tmp_path / "nl.txt"
        with AtomicFileWriter(target, newline=newline) as f:
            f.write("a\nb\r\nc\r")
        assert target.read_bytes() == expected.encode()
        assert listing(tmp_path) == ["nl.txt"]

    @pytest.mark.parametrize(
        ("errors", "expected"),
        [
            ("replace", b"caf?"),
            ("ignore", b"caf"),
            ("xmlcharrefreplace", b"caf&#233;"),
            ("backslashreplace", b"caf\\xe9"),
        ],
    )
    def test_errors_handlers(self, tmp_path: Path, errors: str, expected: bytes) -> None:
        target = tmp_path / "e.txt"
        with AtomicFileWriter(target, encoding="ascii", errors=errors) as f:
            f.write("café")
        assert target.read_bytes() == expected

    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    def test_strict_errors_leave_nothing(self, tmp_path: Path, existing: bool) -> None:
        target = tmp_path / "e.txt"
        if existing:
            target.write_text("old", encoding="utf-8")
        with (  # noqa: PT012 - the failing write follows good ones
            pytest.raises(UnicodeEncodeError),
            AtomicFileWriter(target, encoding="ascii") as f,
        ):
            f.write("fine so far\n" * 1000)
            f.write("café")
        with pytest.raises(UnicodeEncodeError):
            atomic_write(target, "café", encoding="ascii")
        assert listing(tmp_path) == (["e.txt"] if existing else [])
        if existing:
            assert target.read_text(encoding="utf-8") == "old"

    def test_binary_mode_rejects_text_options(self, tmp_path: Path) -> None:
        target = tmp_path / "b.bin"
        with pytest.raises(ValueError, match=r"b\.bin"):
            AtomicFileWriter(target, mode="wb", encoding="utf-8")  # type: ignore[call-overload]
        with pytest.raises(ValueError, match=r"b\.bin"):
            AtomicFileWriter(target, mode="wb", newline="")  # type: ignore[call-overload]
        assert listing(tmp_path) == []


class Interrupted(BaseException):
    """A BaseException that is neither Exception nor KeyboardInterrupt."""


class TestNoLeftovers:
    @pytest.mark.parametrize(
        "exc_type",
        [RuntimeError, OSError, KeyboardInterrupt, SystemExit, GeneratorExit, Interrupted],
    )
    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    @pytest.mark.parametrize("mode", ["w", "wb"])
    def test_any_exception_in_block(
        self, tmp_path: Path, exc_type: type[BaseException], existing: bool, mode: str
    ) -> None:
        target = tmp_path / "t.dat"
        if existing:
            target.write_bytes(b"old")
        with pytest.raises(exc_type):  # noqa: PT012 - the exception comes from the block
            if mode == "w":
                with AtomicFileWriter(target) as f:
                    f.write("new" * 100_000)
                    raise exc_type()
            else:
                with AtomicFileWriter(target, mode="wb") as fb:
                    fb.write(b"new" * 100_000)
                    raise exc_type()
        assert listing(tmp_path) == (["t.dat"] if existing else [])
        if existing:
            assert target.read_bytes() == b"old"

    def test_keyboard_interrupt_in_deep_new_directory(self, tmp_path: Path) -> None:
        target = tmp_path / "new" / "t.txt"
        with pytest.raises(KeyboardInterrupt), AtomicFileWriter(target) as f:  # noqa: PT012
            f.write("x")
            raise KeyboardInterrupt
        assert not target.exists()
        assert temp_names(target.parent) == []

    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    def test_interrupt_as_mkstemp_returns_leaves_no_temp(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
    ) -> None:
        # The signal lands after mkstemp created the file, before its name
        # reached the writer: the file is found by the call's own prefix.
        target = tmp_path / "t.txt"
        if existing:
            target.write_text("old", encoding="utf-8")
        real = tempfile.mkstemp
        made: list[str] = []

        def created_then_interrupted(*args: Any, **kwargs: Any) -> tuple[int, str]:
            fd, path = real(*args, **kwargs)
            made.append(path)
            os.close(fd)
            raise KeyboardInterrupt

        monkeypatch.setattr(tempfile, "mkstemp", created_then_interrupted)
        with pytest.raises(KeyboardInterrupt):
            atomic_write(target, "new")
        with pytest.raises(KeyboardInterrupt), AtomicFileWriter(target) as f:
            f.write("new")
        assert len(made) == 2
        assert listing(tmp_path) == (["t.txt"] if existing else [])
        if existing:
            assert target.read_text(encoding="utf-8") == "old"

    @posix_only
    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    def test_real_sigint_mid_write(self, tmp_path: Path, existing: bool) -> None:
        target = tmp_path / "t.txt"
        if existing:
            target.write_text("old", encoding="utf-8")
        code = textwrap.dedent(
            """
            import signal, sys, time
            signal.signal(signal.SIGINT, signal.default_int_handler)  # even under nohup
            from htmlgraph import AtomicFileWriter
            try:
                with AtomicFileWriter(sys.argv[1]) as f:
                    f.write("partial")
                    print("armed", flush=True)
                    while True:
                        f.write("x" * 1000)
                        time.sleep(0.001)
            except KeyboardInterrupt:
                sys.exit(42)
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"armed"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 42
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
            if proc.stdout is not None:
                proc.stdout.close()
        assert listing(tmp_path) == (["t.txt"] if existing else [])
        if existing:
            assert target.read_text(encoding="utf-8") == "old"

    def test_rollback_without_with(self, tmp_path: Path) -> None:
        target = tmp_path / "t.txt"
        target.write_text("old", encoding="utf-8")
        writer = AtomicFileWriter(target)
        f = writer.open()
        f.write("discarded")
        single_temp(tmp_path)
        writer.rollback()
        writer.rollback()  # idempotent
        assert target.read_text(encoding="utf-8") == "old"
        assert listing(tmp_path) == ["t.txt"]

    def test_rollback_after_commit_is_a_noop(self, tmp_path: Path) -> None:
        target = tmp_path / "t.txt"
        writer = AtomicFileWriter(target)
        writer.open().write("kept")
        writer.commit()
        writer.rollback()
        assert target.read_text(encoding="utf-8") == "kept"
        assert listing(tmp_path) == ["t.txt"]

    @pytest.mark.parametrize("mode", ["w", "wb"])
    def test_file_closed_inside_the_block_still_commits(self, tmp_path: Path, mode: str) -> None:
        target = tmp_path / "t"
        if mode == "w":
            with AtomicFileWriter(target) as f:
                f.write("closed early")
                f.close()
        else:
            with AtomicFileWriter(target, mode="wb") as fb:
                fb.write(b"closed early")
                fb.close()
        assert target.read_bytes() == b"closed early"
        assert listing(tmp_path) == ["t"]

    def test_writer_is_single_use(self, tmp_path: Path) -> None:
        target = tmp_path / "t.txt"
        writer = AtomicFileWriter(target)
        with writer as f:
            f.write("once")
        with pytest.raises(RuntimeError, match=r"t\.txt"):
            writer.open()
        with pytest.raises(RuntimeError, match=r"t\.txt"):
            writer.commit()
        assert target.read_text(encoding="utf-8") == "once"
        assert listing(tmp_path) == ["t.txt"]

    def test_success_leaves_only_the_target_in_every_directory(self, tmp_path: Path) -> None:
        staging = tmp_path / "staging"
        target = tmp_path / "d1" / "d2" / "t.txt"
        with AtomicFileWriter(target, staging) as f:
            f.write("x")
        assert listing(tmp_path) == ["d1", "staging"]
        assert listing(tmp_path / "d1") == ["d2"]
        assert listing(target.parent) == ["t.txt"]
        assert listing(staging) == []

    def test_custom_temp_dir_creates_missing_target_dir(self, tmp_path: Path) -> None:
        staging = tmp_path / "staging"
        staging.mkdir()
        target = tmp_path / "new" / "sub" / "t.txt"
        with AtomicFileWriter(target, staging) as f:
            f.write("x")
        assert target.read_text(encoding="utf-8") == "x"
        assert listing(staging) == []
        assert listing(target.parent) == ["t.txt"]

    @linux_only
    def test_cross_device_temp_dir_is_exdev(self, tmp_path: Path) -> None:
        target = tmp_path / "t.txt"
        target.write_text("old", encoding="utf-8")
        with tmpfs(tmp_path / "other", size="1m") as staging:
            with (
                pytest.raises(OSError, match="cross-device") as info,
                AtomicFileWriter(target, staging) as f,
            ):
                f.write("new")
            assert info.value.errno == errno.EXDEV
            assert listing(staging) == []
        assert target.read_text(encoding="utf-8") == "old"
        assert listing(tmp_path) == ["other", "t.txt"]


@posix_only
class TestPermissions:
    @pytest.mark.parametrize("permissions", [None, 0o600, 0o664, 0o400], ids=_octal)
    @pytest.mark.parametrize("existing", [None, 0o640, 0o755, 0o444], ids=_octal)
    @pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o000], ids=_octal)
    def test_umask_table(
        self,
        tmp_path: Path,
        umask: Callable[[int], int],
        mask: int,
        existing: int | None,
        permissions: int | None,
    ) -> None:
        target = tmp_path / "t.txt"
        if existing is not None:
            target.write_text("old", encoding="utf-8")
            target.chmod(existing)
        umask(mask)
        atomic_write(target, "new", permissions=permissions, durable=False)
        if permissions is not None:
            expected = permissions  # explicit permissions win over umask and old mode
        elif existing is not None:
            expected = existing
        else:
            expected = 0o666 & ~mask  # like open(): no mkstemp 0o600
        assert file_mode(target) == expected
        assert target.read_text(encoding="utf-8") == "new"
        assert listing(tmp_path) == ["t.txt"]

    @pytest.mark.parametrize("api", ["context", "binary", "json"])
    @pytest.mark.parametrize("mask", [0o022, 0o077], ids=_octal)
    def test_every_api_respects_umask_and_mode(
        self, tmp_path: Path, umask: Callable[[int], int], api: str, mask: int
    ) -> None:
        umask(mask)
        new, old = tmp_path / "new", tmp_path / "old"
        old.write_text("x", encoding="utf-8")
        old.chmod(0o604)
        for target in (new, old):
            if api == "context":
                with AtomicFileWriter(target) as f:
                    f.write("{}")
            elif api == "binary":
                with AtomicFileWriter(target, mode="wb") as fb:
                    fb.write(b"{}")
            else:
                atomic_json_write(target, {})
        assert file_mode(new) == 0o666 & ~mask
        assert file_mode(old) == 0o604
        assert listing(tmp_path) == ["new", "old"]

    @pytest.mark.parametrize("case", ["existing-0o600", "permissions-0o600"])
    def test_secret_content_is_never_in_a_wider_temp(
        self, tmp_path: Path, umask: Callable[[int], int], case: str
    ) -> None:
        # The temp gets its final mode before the first byte lands in it.
        umask(0o022)
        target = tmp_path / "secret"
        if case == "existing-0o600":
            target.write_text("old secret", encoding="utf-8")
            target.chmod(0o600)
            writer = AtomicFileWriter(target)
        else:
            writer = AtomicFileWriter(target, permissions=0o600)
        f = writer.open()
        try:
            assert writer.temp_path is not None
            assert file_mode(writer.temp_path) == 0o600
            f.write("new secret")
            f.flush()
            assert file_mode(writer.temp_path) == 0o600
            writer.commit()
        finally:
            writer.rollback()
        assert file_mode(target) == 0o600
        assert listing(tmp_path) == ["secret"]

    def test_permissions_keyword_on_every_api(self, tmp_path: Path) -> None:
        with AtomicFileWriter(tmp_path / "a", permissions=0o640) as f:
            f.write("a")
        atomic_json_write(tmp_path / "b", [1], permissions=0o600)
        AtomicFileWriter.atomic_write(tmp_path / "c", b"c", permissions=0o751)
        assert [file_mode(tmp_path / n) for n in "abc"] == [0o640, 0o600, 0o751]

    @pytest.mark.parametrize("bad", [-1, 0o10000, 1.5, "644", True])
    def test_bad_permissions(self, tmp_path: Path, bad: object) -> None:
        with pytest.raises((TypeError, ValueError)):
            atomic_write(tmp_path / "t", "x", permissions=bad)  # type: ignore[arg-type]
        assert listing(tmp_path) == []

    @needs_root
    def test_owner_of_existing_target_kept_as_root(self, tmp_path: Path) -> None:
        target = tmp_path / "t.txt"
        target.write_text("old", encoding="utf-8")
        if sys.platform == "win32":
            pytest.skip("no uids on Windows")
        else:
            os.chown(target, 65534, 65534)
        atomic_write(target, "new")
        st = os.stat(target)
        assert (st.st_uid, st.st_gid) == (65534, 65534)

    @needs_root
    def test_setuid_mode_and_owner_both_kept_as_root(self, tmp_path: Path) -> None:
        # chown clears S_ISUID even for root: the owner must be set first.
        target = tmp_path / "tool"
        target.write_text("old", encoding="utf-8")
        if sys.platform == "win32":
            pytest.skip("no uids on Windows")
        else:
            os.chown(target, 65534, 65534)
        os.chmod(target, 0o4755)  # noqa: S103 - a setuid file is the case
        atomic_write(target, "new")
        st = os.stat(target)
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert stat.S_IMODE(st.st_mode) == 0o4755

    @needs_root
    def test_group_kept_in_a_setgid_directory_as_root(self, tmp_path: Path) -> None:
        # A new file in a setgid directory takes the directory's group, not
        # ours: the temp must be compared with the target, not with our ids.
        shared = tmp_path / "shared"
        shared.mkdir()
        if sys.platform == "win32":
            pytest.skip("no gids on Windows")
        else:
            os.chown(shared, 0, 65534)
            os.chmod(shared, 0o2775)  # noqa: S103 - a setgid directory is the case
            target = shared / "t.txt"
            target.write_text("old", encoding="utf-8")
            os.chown(target, os.geteuid(), os.getegid())
            before = os.stat(target)
            assert before.st_gid != 65534
            atomic_write(target, "new")
            st = os.stat(target)
            assert (st.st_uid, st.st_gid) == (before.st_uid, before.st_gid)

    def test_mode_of_symlinked_file_kept(self, tmp_path: Path) -> None:
        real = tmp_path / "real.txt"
        real.write_text("old", encoding="utf-8")
        real.chmod(0o600)
        link = tmp_path / "link.txt"
        link.symlink_to("real.txt")
        atomic_write(link, "new")
        assert file_mode(real) == 0o600
        assert link.is_symlink()
        assert real.read_text(encoding="utf-8") == "new"


@posix_only
class TestSymlinks:
    @pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
    @pytest.mark.parametrize("api", ["context", "atomic_write", "json"])
    def test_write_through_keeps_link(self, tmp_path: Path, relative: bool, api: str) -> None:
        real_dir = tmp_path / "store"
        real_dir.mkdir()
        real = real_dir / "value.json"
        real.write_text("[0]\n", encoding="utf-8")
        links = tmp_path / "links"
        links.mkdir()
        link = links / "value.json"
        pointer = "../store/value.json" if relative else str(real)
        link.symlink_to(pointer)
        if api == "context":
            with AtomicFileWriter(link) as f:
                f.write("[1]\n")
        elif api == "atomic_write":
            atomic_write(link, "[1]\n")
        else:
            atomic_json_write(link, [1], indent=None)
        assert os.readlink(link) == pointer
        assert real.read_text(encoding="utf-8") == "[1]\n"
        assert listing(links) == ["value.json"]
        assert listing(real_dir) == ["value.json"]

    def test_chain_of_links(self, tmp_path: Path) -> None:
        real = tmp_path / "real.txt"
        real.write_text("old", encoding="utf-8")
        (tmp_path / "l1").symlink_to("real.txt")
        (tmp_path / "l2").symlink_to("l1")
        atomic_write(tmp_path / "l2", "new")
        assert os.readlink(tmp_path / "l2") == "l1"
        assert os.readlink(tmp_path / "l1") == "real.txt"
        assert real.read_text(encoding="utf-8") == "new"
        assert listing(tmp_path) == ["l1", "l2", "real.txt"]

    def test_dangling_link_creates_the_file_it_names(self, tmp_path: Path) -> None:
        (tmp_path / "sub").mkdir()
        link = tmp_path / "link"
        link.symlink_to("sub/created.txt")
        atomic_write(link, "created")
        assert link.is_symlink()
        assert (tmp_path / "sub" / "created.txt").read_text(encoding="utf-8") == "created"
        assert listing(tmp_path) == ["link", "sub"]
        assert listing(tmp_path / "sub") == ["created.txt"]

    def test_link_to_directory_is_rejected(self, tmp_path: Path) -> None:
        (tmp_path / "dir").mkdir()
        link = tmp_path / "link"
        link.symlink_to("dir")
        with pytest.raises(IsADirectoryError):
            atomic_write(link, "x")
        assert listing(tmp_path) == ["dir", "link"]
        assert listing(tmp_path / "dir") == []

    def test_symlink_loop(self, tmp_path: Path) -> None:
        (tmp_path / "a").symlink_to("b")
        (tmp_path / "b").symlink_to("a")
        with pytest.raises(OSError, match="symbolic links") as info:
            atomic_write(tmp_path / "a", "x")
        assert info.value.errno == errno.ELOOP
        assert_names(info.value, tmp_path / "a")
        assert listing(tmp_path) == ["a", "b"]

    @linux_only
    @pytest.mark.parametrize("api", ["context", "atomic_write"])
    def test_link_and_file_on_different_filesystems(self, tmp_path: Path, api: str) -> None:
        with tmpfs(tmp_path / "fs-a", size="2m") as fs_a, tmpfs(tmp_path / "fs-b", "2m") as fs_b:
            assert os.stat(fs_a).st_dev != os.stat(fs_b).st_dev
            real = fs_b / "real.txt"
            real.write_text("old", encoding="utf-8")
            real.chmod(0o640)
            link = fs_a / "link.txt"
            link.symlink_to(real)
            if api == "context":
                with AtomicFileWriter(link) as f:
                    f.write("new across filesystems")
                    single_temp(fs_b)
                    assert listing(fs_a) == ["link.txt"]
            else:
                atomic_write(link, "new across filesystems")
            assert link.is_symlink()
            assert os.readlink(link) == str(real)
            assert real.read_text(encoding="utf-8") == "new across filesystems"
            assert file_mode(real) == 0o640
            assert listing(fs_a) == ["link.txt"]
            assert listing(fs_b) == ["real.txt"]


class TestLongNames:
    @pytest.mark.parametrize(
        "name",
        [
            "a" * 255,
            "é" * 127 + "z",  # 255 bytes of 2-byte characters
            "€" * 85,  # 255 bytes of 3-byte characters
            "😀" * 63 + "abc",  # 255 bytes, 4-byte characters
            "x" + "€" * 84 + "y",  # the truncation point falls inside a character
            ".hidden." + "ü" * 123 + "n",
        ],
        ids=["ascii-255", "2byte-255", "3byte-255", "4byte-255", "split", "dotfile"],
    )
    def test_255_byte_names(self, tmp_path: Path, name: str) -> None:
        assert len(name.encode()) <= 255
        target = tmp_path / name
        with AtomicFileWriter(target) as f:
            f.write("long")
            temp = single_temp(tmp_path)
            raw = temp.encode("utf-8")  # a broken character would be a lone surrogate here
            assert len(raw) <= 255
            match = TEMP_NAME_RE.match(temp)
            assert match is not None
            assert name.startswith(match["stem"])
        assert target.read_text(encoding="utf-8") == "long"
        atomic_json_write(target, {"again": True})
        atomic_write(target, "third")
        assert target.read_text(encoding="utf-8") == "third"
        assert listing(tmp_path) == [name]

    @linux_only
    @pytest.mark.parametrize(
        "raw", [b"caf\xe9.txt", b"\xff" * 255, b"a" + b"\xe9" * 254], ids=["short", "ff", "e9"]
    )
    def test_names_that_are_not_utf8(self, tmp_path: Path, raw: bytes) -> None:
        # Linux names are bytes; Python hands undecodable ones over as surrogates.
        name = os.fsdecode(raw)
        target = tmp_path / name
        with AtomicFileWriter(target) as f:
            f.write("bytes name")
            (temp,) = temp_names(tmp_path)
            assert len(os.fsencode(temp)) <= 255
        atomic_write(target, "again")
        assert target.read_text(encoding="utf-8") == "again"
        assert os.listdir(os.fsencode(tmp_path)) == [raw]

    def test_name_over_the_limit_is_the_kernels_error(self, tmp_path: Path) -> None:
        target = tmp_path / ("a" * 256)
        with pytest.raises(OSError, match="too long") as info:
            atomic_write(target, "x")
        assert info.value.errno == errno.ENAMETOOLONG
        assert listing(tmp_path) == []

    def test_short_names_keep_the_whole_stem(self, tmp_path: Path) -> None:
        with AtomicFileWriter(tmp_path / "n.txt") as f:
            f.write("x")
            match = TEMP_NAME_RE.match(single_temp(tmp_path))
            assert match is not None
            assert match["stem"] == "n.txt"


class TestCreateOnly:
    def test_check_comes_before_the_block_runs(self, tmp_path: Path) -> None:
        target = tmp_path / "t.txt"
        target.write_text("precious", encoding="utf-8")
        writer = AtomicFileWriter(target, overwrite=False)
        with pytest.raises(FileExistsError):
            writer.open()
        assert writer.temp_path is None
        assert listing(tmp_path) == ["t.txt"]

    @pytest.mark.parametrize("api", APIS)
    def test_existing_target_raises_before_writing(self, tmp_path: Path, api: str) -> None:
        target = tmp_path / "t.txt"
        target.write_text("precious", encoding="utf-8")
        with pytest.raises(FileExistsError) as info:
            write_via(api, target, "clobber", overwrite=False)
        assert info.value.errno == errno.EEXIST
        assert_names(info.value, target)
        assert target.read_text(encoding="utf-8") == "precious"
        assert listing(tmp_path) == ["t.txt"]

    def test_new_target_is_created(self, tmp_path: Path, as_path: PathKind) -> None:
        target = tmp_path / "sub" / "t.txt"
        with AtomicFileWriter(as_path(target), overwrite=False) as f:
            f.write("fresh")
        assert target.read_text(encoding="utf-8") == "fresh"
        assert listing(target.parent) == ["t.txt"]
        assert os.stat(target).st_nlink == 1  # the temp link is gone

    @pytest.mark.parametrize("durable", [True, False])
    def test_file_appearing_after_open_is_not_clobbered(
        self, tmp_path: Path, durable: bool
    ) -> None:
        target = tmp_path / "t.txt"
        with (  # noqa: PT012 - the race happens inside the block
            pytest.raises(FileExistsError) as info,
            AtomicFileWriter(target, overwrite=False, durable=durable) as f,
        ):
            f.write("mine")
            # Another process creates the target between our check and our commit.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"theirs")
            os.close(fd)
        assert_names(info.value, target)
        assert target.read_text(encoding="utf-8") == "theirs"
        assert listing(tmp_path) == ["t.txt"]

    def test_dangling_symlink_counts_as_absent(self, tmp_path: Path) -> None:
        link = tmp_path / "link"
        link.symlink_to("real")
        atomic_write(link, "made", overwrite=False)
        assert (tmp_path / "real").read_text(encoding="utf-8") == "made"
        assert link.is_symlink()
        with pytest.raises(FileExistsError):
            atomic_write(link, "again", overwrite=False)
        assert listing(tmp_path) == ["link", "real"]


class TestJsonValues:
    @pytest.mark.parametrize(
        "value",
        [
            {"k": "v"},
            [1, 2, 3],
            "just a string",
            42,
            -0.5,
            1e300,
            True,
            False,
            None,
            [],
            {},
            {"nested": [{"a": [None, True, {"b": "ü"}]}], "n": 2**70},
        ],
        ids=repr,
    )
    def test_any_json_value(self, tmp_path: Path, value: object) -> None:
        target = tmp_path / "v.json"
        atomic_json_write(target, value)
        raw = target.read_bytes()
        assert raw.endswith(b"\n")
        assert not raw.endswith(b"\n\n")
        assert json.loads(raw.decode("utf-8")) == value
        assert listing(tmp_path) == ["v.json"]

    def test_tuple_becomes_array(self, tmp_path: Path) -> None:
        target = tmp_path / "t.json"
        atomic_json_write(target, (1, "two"), indent=None)
        assert target.read_text(encoding="utf-8") == '[1, "two"]\n'

    @pytest.mark.parametrize(
        ("value", "error"),
        [
            ({"bad": object()}, TypeError),
            ({1, 2}, TypeError),
            (b"bytes", TypeError),
            ({"x": float("nan")}, ValueError),
            ([float("inf")], ValueError),
            (-math.inf, ValueError),
        ],
        ids=["object", "set", "bytes", "nan", "inf", "-inf"],
    )
    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    def test_unserialisable_touches_nothing(
        self, tmp_path: Path, value: object, error: type[Exception], existing: bool
    ) -> None:
        target = tmp_path / "newdir" / "v.json"
        if existing:
            target.parent.mkdir()
            target.write_text('{"old": 1}\n', encoding="utf-8")
        with pytest.raises(error) as info:
            atomic_json_write(target, value)
        assert_names(info.value, target)
        if existing:
            assert target.read_text(encoding="utf-8") == '{"old": 1}\n'
            assert listing(target.parent) == ["v.json"]
        else:
            # Serialisation comes first: not even the parent directory was made.
            assert listing(tmp_path) == []

    def test_circular_reference_touches_nothing(self, tmp_path: Path) -> None:
        loop: list[object] = []
        loop.append(loop)
        with pytest.raises(ValueError, match=r"v\.json"):
            atomic_json_write(tmp_path / "v.json", loop)
        assert listing(tmp_path) == []

    def test_serialises_before_opening(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        opened: list[str] = []
        real_open = os.open

        def spy_open(path: str, flags: int, mode: int = 0o777, **kwargs: object) -> int:
            opened.append(os.fspath(path))
            return real_open(path, flags, mode)

        monkeypatch.setattr("htmlgraph.atomic_ops.os.open", spy_open)
        with pytest.raises(TypeError):
            atomic_json_write(tmp_path / "v.json", {"x": object()})
        assert opened == []
        atomic_json_write(tmp_path / "v.json", {"x": 1})
        assert len(opened) >= 1  # the spy sees real opens, so the empty list above means something

    def test_utf8_regardless_of_content(self, tmp_path: Path) -> None:
        target = tmp_path / "u.json"
        atomic_json_write(target, {"emoji": "😀", "cjk": "漢字", "ctrl": "\u2028"})
        raw = target.read_bytes()
        assert "😀".encode() in raw
        assert "漢字".encode() in raw
        assert json.loads(raw) == {"emoji": "😀", "cjk": "漢字", "ctrl": "\u2028"}


class TestSafeReadWithRetry:
    def test_backoff_then_success(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        target = tmp_path / "t.txt"
        target.write_text("finally", encoding="utf-8")
        sleeps: list[float] = []
        failures = [
            FileNotFoundError(errno.ENOENT, "gone", str(target)),
            PermissionError(errno.EACCES, "sharing violation", str(target)),
        ]
        real_open = open

        def flaky_open(file: str, *args: object, **kwargs: object) -> object:
            if failures:
                raise failures.pop(0)
            return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(atomic_ops, "open", flaky_open, raising=False)
        monkeypatch.setattr("htmlgraph.atomic_ops.time.sleep", sleeps.append)
        assert AtomicFileWriter.safe_read_with_retry(target, retry_delay=0.25) == "finally"
        assert failures == []
        assert sleeps == [0.25, 0.5]  # exponential backoff from retry_delay

    def test_gives_up_and_raises_the_last_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sleeps: list[float] = []
        monkeypatch.setattr("htmlgraph.atomic_ops.time.sleep", sleeps.append)
        missing = tmp_path / "never.txt"
        with pytest.raises(FileNotFoundError) as info:
            AtomicFileWriter.safe_read_with_retry(missing, max_retries=4, retry_delay=0.01)
        assert info.value.filename == str(missing)
        assert sleeps == [0.01, 0.02, 0.04]  # 4 attempts in all, no sleep after the last
        assert listing(tmp_path) == []

    def test_every_os_error_is_retried_and_nothing_else(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The seed's contract: any OSError may be transient (network, FUSE).
        sleeps: list[float] = []
        monkeypatch.setattr("htmlgraph.atomic_ops.time.sleep", sleeps.append)
        (tmp_path / "dir").mkdir()
        with pytest.raises(IsADirectoryError):
            AtomicFileWriter.safe_read_with_retry(tmp_path / "dir")
        assert sleeps == [0.1, 0.2]
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"\xff\xfe\xfd")
        with pytest.raises(UnicodeDecodeError):
            AtomicFileWriter.safe_read_with_retry(bad)
        assert sleeps == [0.1, 0.2]  # a decoding error is not retried

    def test_encoding(self, tmp_path: Path) -> None:
        target = tmp_path / "l1.txt"
        target.write_bytes("café".encode("latin-1"))
        assert AtomicFileWriter.safe_read_with_retry(target, encoding="latin-1") == "café"

    @posix_only
    def test_real_concurrent_creation(self, tmp_path: Path) -> None:
        # A real writer process creates the file while the reader is retrying.
        target = tmp_path / "late.txt"
        code = "import sys, time\nfrom htmlgraph import atomic_write\n"
        code += "time.sleep(0.3)\natomic_write(sys.argv[1], 'late but whole')\n"
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
        try:
            text = AtomicFileWriter.safe_read_with_retry(target, max_retries=12, retry_delay=0.05)
        finally:
            assert proc.wait(timeout=60) == 0
        assert text == "late but whole"
        assert listing(tmp_path) == ["late.txt"]


_LIVE_WRITER = textwrap.dedent(
    """
    import sys
    from htmlgraph import AtomicFileWriter
    with AtomicFileWriter(sys.argv[1]) as f:
        f.write("slow but alive")
        f.flush()
        print("armed", flush=True)
        assert sys.stdin.readline().strip() == "commit"
    print("done", flush=True)
    """
)


class TestCleanupSafety:
    @posix_only
    def test_never_removes_a_live_writers_temp_even_if_old(self, tmp_path: Path) -> None:
        target = tmp_path / "t.txt"
        proc = subprocess.Popen(
            [sys.executable, "-c", _LIVE_WRITER, str(target)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdin is not None
            assert proc.stdout.readline().strip() == "armed"
            (temp,) = temp_names(tmp_path)
            match = TEMP_NAME_RE.match(temp)
            assert match is not None
            assert int(match["pid"]) == proc.pid
            age(tmp_path / temp, 24 * 30)
            assert cleanup_orphaned_temp_files(tmp_path, age_hours=1) == 0
            assert cleanup_orphaned_temp_files(tmp_path, age_hours=0) == 0
            assert temp_names(tmp_path) == [temp]
            proc.stdin.write("commit\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "done"
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        assert target.read_text(encoding="utf-8") == "slow but alive"
        assert listing(tmp_path) == ["t.txt"]

    def test_removes_abandoned_safe_temp_file_names(self, tmp_path: Path) -> None:
        # safe_temp_file's "{prefix}{pid}-{32 hex}" with the default prefix is ours too.
        name = safe_temp_file(tmp_path).name.replace(str(os.getpid()), str(dead_pid()), 1)
        (tmp_path / name).write_text("abandoned", encoding="utf-8")
        age(tmp_path / name, 48)
        assert cleanup_orphaned_temp_files(tmp_path) == 1
        assert listing(tmp_path) == []

    def test_keeps_temps_of_live_pids(self, tmp_path: Path) -> None:
        names = [orphan_name(os.getpid()), orphan_name(os.getppid())]
        for name in names:
            (tmp_path / name).write_text("in progress", encoding="utf-8")
            age(tmp_path / name, 100)
        assert cleanup_orphaned_temp_files(tmp_path, age_hours=1) == 0
        assert listing(tmp_path) == sorted(names)

    def test_never_directories(self, tmp_path: Path) -> None:
        pid = dead_pid()
        d = tmp_path / orphan_name(pid)
        d.mkdir()
        (d / "inside.txt").write_text("x", encoding="utf-8")
        nested = d / orphan_name(pid)
        nested.write_text("nested orphan", encoding="utf-8")
        age(nested, 100)
        age(d, 100)
        assert cleanup_orphaned_temp_files(tmp_path) == 0
        assert listing(tmp_path) == [d.name]
        assert listing(d) == sorted(["inside.txt", nested.name])  # not recursive

    @posix_only
    def test_never_through_symlinks(self, tmp_path: Path) -> None:
        pid = dead_pid()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        victim = elsewhere / orphan_name(pid)
        victim.write_text("must survive", encoding="utf-8")
        age(victim, 100)
        scan = tmp_path / "scan"
        scan.mkdir()
        link = scan / orphan_name(pid)
        link.symlink_to(victim)
        age(link, 100)
        dir_link = scan / orphan_name(pid, "dir")
        dir_link.symlink_to(elsewhere)
        age(dir_link, 100)
        assert cleanup_orphaned_temp_files(scan) == 0
        assert victim.read_text(encoding="utf-8") == "must survive"
        assert listing(scan) == sorted([link.name, dir_link.name])
        assert link.is_symlink()
        assert listing(elsewhere) == [victim.name]

    @posix_only
    def test_fifo_named_like_a_temp_is_not_touched(self, tmp_path: Path) -> None:
        fifo = tmp_path / orphan_name(dead_pid())
        make_fifo(fifo)
        age(fifo, 100)
        assert cleanup_orphaned_temp_files(tmp_path) == 0
        assert listing(tmp_path) == [fifo.name]

    def test_vanishing_before_unlink(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # One dead pid per orphan: cleanup asks about each pid once.
        names = [orphan_name(dead_pid(), f"f{i}") for i in range(4)]
        for name in names:
            (tmp_path / name).write_text("x", encoding="utf-8")
            age(tmp_path / name, 100)
        checked: list[int] = []
        real_pid_exists = _platform.pid_exists

        def racing_pid_exists(p: int) -> bool:
            # Another cleaner removes every other orphan between our scan and our unlink.
            checked.append(p)
            if len(checked) % 2:
                victim = next(n for n in listing(tmp_path) if n.startswith(".tmp-"))
                os.unlink(tmp_path / victim)
            return real_pid_exists(p)

        monkeypatch.setattr("htmlgraph.atomic_ops._platform.pid_exists", racing_pid_exists)
        removed = cleanup_orphaned_temp_files(tmp_path)
        assert len(checked) >= 2
        assert 0 < removed < 4
        assert listing(tmp_path) == []

    def test_vanishing_before_stat(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        pid = dead_pid()
        names = [orphan_name(pid, f"f{i}") for i in range(3)]
        for name in names:
            (tmp_path / name).write_text("x", encoding="utf-8")
            age(tmp_path / name, 100)
        real_scandir = os.scandir
        vanished: list[str] = []

        class RacingScandir:
            """Yields real entries, but the first one's file is gone when it is handed out."""

            def __init__(self, path: str) -> None:
                self._it = real_scandir(path)

            def __enter__(self) -> Iterator[os.DirEntry[str]]:
                return self._gen()

            def __exit__(self, *exc: object) -> None:
                self._it.close()

            def __iter__(self) -> Iterator[os.DirEntry[str]]:
                return self._gen()

            def _gen(self) -> Iterator[os.DirEntry[str]]:
                for entry in self._it:
                    if not vanished:
                        vanished.append(entry.name)
                        os.unlink(entry.path)
                    yield entry

        monkeypatch.setattr("htmlgraph.atomic_ops.os.scandir", RacingScandir)
        assert cleanup_orphaned_temp_files(tmp_path) == 2
        assert len(vanished) == 1
        assert listing(tmp_path) == []

    @posix_only
    @pytest.mark.slow
    def test_two_cleaners_at_once(self, tmp_path: Path) -> None:
        pid = dead_pid()
        count = 3000
        for i in range(count):
            path = tmp_path / orphan_name(pid, f"n{i}")
            path.write_bytes(b"")
            age(path, 48)
        code = (
            "import sys\nfrom htmlgraph import cleanup_orphaned_temp_files\n"
            "print(cleanup_orphaned_temp_files(sys.argv[1]))\n"
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
            for _ in range(3)
        ]
        totals = []
        for proc in procs:
            out, _ = proc.communicate(timeout=JOIN_TIMEOUT)
            assert proc.returncode == 0
            totals.append(int(out))
        assert sum(totals) == count  # every file removed exactly once, no crash on races
        assert listing(tmp_path) == []

    def test_negative_age_rejected(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="age"):
            cleanup_orphaned_temp_files(tmp_path, age_hours=-1)

    def test_base_dir_is_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "f").write_text("x", encoding="utf-8")
        assert cleanup_orphaned_temp_files(tmp_path / "f") == 0
        assert listing(tmp_path) == ["f"]

    @posix_only
    def test_own_writers_temp_removed_only_when_dead(self, tmp_path: Path) -> None:
        # A real temp, made by a real writer, is recognised by the cleanup's pattern.
        target = tmp_path / "t.txt"
        _crash_mid_write(target)
        (orphan,) = temp_names(tmp_path)
        age(tmp_path / orphan, 100)
        assert cleanup_orphaned_temp_files(tmp_path, age_hours=99) == 1
        assert listing(tmp_path) == []


class TestBadInput:
    @pytest.mark.parametrize("api", APIS)
    def test_directory_as_target(self, tmp_path: Path, as_path: PathKind, api: str) -> None:
        target = tmp_path / "adir"
        target.mkdir()
        (target / "inside").write_text("x", encoding="utf-8")
        with pytest.raises(IsADirectoryError) as info:
            write_via(api, as_path(target), "x")
        assert info.value.errno == errno.EISDIR
        assert_names(info.value, target)
        assert listing(tmp_path) == ["adir"]
        assert listing(target) == ["inside"]

    @pytest.mark.parametrize("mode", ["a", "r", "r+", "w+", "x", "ab", "", "rb", "W"])
    def test_bad_mode(self, tmp_path: Path, mode: str) -> None:
        target = tmp_path / "t.txt"
        target.write_text("old", encoding="utf-8")
        with pytest.raises(ValueError, match="mode") as info:
            AtomicFileWriter(target, mode=mode)  # type: ignore[call-overload]
        assert_names(info.value, target)
        assert target.read_text(encoding="utf-8") == "old"
        assert listing(tmp_path) == ["t.txt"]

    @pytest.mark.parametrize("content", [123, None, ["a"], {"a": 1}, 1.5], ids=repr)
    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    def test_wrong_content_type(self, tmp_path: Path, content: object, existing: bool) -> None:
        target = tmp_path / "t.txt"
        if existing:
            target.write_text("old", encoding="utf-8")
        with pytest.raises(TypeError) as info:
            atomic_write(target, content)  # type: ignore[arg-type]
        assert_names(info.value, target)
        with pytest.raises(TypeError):
            AtomicFileWriter.atomic_write(target, content)  # type: ignore[arg-type]
        assert listing(tmp_path) == (["t.txt"] if existing else [])

    def test_bytes_into_text_writer_and_str_into_binary_writer(self, tmp_path: Path) -> None:
        target = tmp_path / "t.txt"
        target.write_text("old", encoding="utf-8")
        with pytest.raises(TypeError), AtomicFileWriter(target) as f:
            f.write(b"bytes")  # type: ignore[arg-type]
        with pytest.raises(TypeError), AtomicFileWriter(target, mode="wb") as fb:
            fb.write("text")  # type: ignore[call-overload]
        assert target.read_text(encoding="utf-8") == "old"
        assert listing(tmp_path) == ["t.txt"]

    @pytest.mark.parametrize("bad_path", [123, b"/tmp/bytes-path", None, ["x"]], ids=repr)
    def test_bad_path_types(self, bad_path: object) -> None:
        with pytest.raises(TypeError):
            AtomicFileWriter(bad_path)  # type: ignore[call-overload]
        with pytest.raises(TypeError):
            atomic_write(bad_path, "x")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            atomic_json_write(bad_path, 1)  # type: ignore[arg-type]

    def test_empty_and_nul_paths(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ValueError, match="empty"):
            atomic_write("", "x")
        with pytest.raises(ValueError, match="NUL"):
            atomic_write("a\0b", "x")
        assert listing(tmp_path) == []

    def test_parent_is_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("x", encoding="utf-8")
        target = tmp_path / "file" / "t.txt"
        with pytest.raises(NotADirectoryError) as info:
            atomic_write(target, "x")
        assert_names(info.value, target)
        assert listing(tmp_path) == ["file"]

    def test_missing_temp_dir_parent_is_created(self, tmp_path: Path) -> None:
        target = tmp_path / "t.txt"
        atomic_write(target, "x", temp_dir=tmp_path / "stage" / "deeper")
        assert target.read_text(encoding="utf-8") == "x"
        assert listing(tmp_path / "stage" / "deeper") == []


_name_chars = st.characters(codec="utf-8", exclude_characters="/\x00")
_names = st.text(_name_chars, min_size=1, max_size=120).filter(
    lambda s: s not in (".", "..") and len(s.encode()) <= 255
)


class TestProperties:
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(payload=st.binary(max_size=200_000))
    def test_bytes_round_trip(self, tmp_path: Path, payload: bytes) -> None:
        target = tmp_path / "blob"
        with AtomicFileWriter(target, mode="wb", durable=False) as f:
            f.write(payload)
        assert target.read_bytes() == payload
        assert listing(tmp_path) == ["blob"]

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(text=st.text(max_size=5000), encoding=st.sampled_from(["utf-8", "utf-16", "utf-32"]))
    def test_text_round_trip(self, tmp_path: Path, text: str, encoding: str) -> None:
        target = tmp_path / "text"
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        with AtomicFileWriter(target, encoding=encoding, newline="", durable=False) as f:
            f.write(text)
        # Like open(): even write("") emits the BOM of utf-16/utf-32.
        assert target.read_bytes() == text.encode(encoding)
        atomic_write(target, text, encoding=encoding, durable=False)
        assert target.read_bytes() == text.encode(encoding)
        assert listing(tmp_path) == ["text"]

    @settings(
        max_examples=80,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(name=_names, content=st.text(max_size=50))
    def test_any_legal_name(self, tmp_path: Path, name: str, content: str) -> None:
        directory = tmp_path / "names"
        directory.mkdir(exist_ok=True)
        for leftover in listing(directory):
            (directory / leftover).unlink()
        content = content.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        atomic_write(directory / name, content, durable=False)
        assert listing(directory) == [name]
        assert (directory / name).read_bytes() == content.encode("utf-8")

    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        value=st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=5)
                | st.dictionaries(st.text(max_size=10), inner, max_size=5)
            ),
            max_leaves=30,
        )
    )
    def test_json_round_trip(self, tmp_path: Path, value: object) -> None:
        target = tmp_path / "v.json"
        value = json.loads(json.dumps(value))  # surrogates and -0.0 normalised as JSON does
        atomic_json_write(target, value, durable=False)
        raw = target.read_bytes()
        assert json.loads(raw.decode("utf-8")) == value
        assert raw.endswith(b"\n")
        assert listing(tmp_path) == ["v.json"]

    @settings(max_examples=50, deadline=None)
    @given(name=_names)
    def test_temp_names_stay_within_name_max(self, name: str) -> None:
        prefix, suffix = atomic_ops._temp_affixes(name)
        temp = prefix + "0" * atomic_ops._TEMP_RANDOM + suffix
        raw = temp.encode("utf-8")
        assert len(raw) <= 255
        match = TEMP_NAME_RE.match(temp)
        assert match is not None
        assert int(match["pid"]) == os.getpid()
        assert name.startswith(match["stem"])


@pytest.mark.slow
@posix_only
def test_100mb_payload_is_old_or_new_for_a_concurrent_reader(tmp_path: Path) -> None:
    size = 100 << 20
    target = tmp_path / "huge.bin"
    big_file_writer(str(target), size, [1])
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    reader = ctx.Process(
        target=big_file_reader, args=(str(target), size, ready, stop, child_conn), daemon=True
    )
    reader.start()
    child_conn.close()
    try:
        assert ready.wait(JOIN_TIMEOUT)
        big_file_writer(str(target), size, [2, 3])
    finally:
        stop.set()
        reader.join(JOIN_TIMEOUT)
        if reader.is_alive():
            reader.kill()
            reader.join(10)
    assert parent_conn.poll(10)
    reads, versions_seen, first_bad = parent_conn.recv()
    assert reader.exitcode == EXIT_OK, first_bad
    assert first_bad == ""
    assert reads > 0
    assert versions_seen >= 1
    data = target.read_bytes()
    assert len(data) == size
    assert data.count(b"\x03") == size
    assert listing(tmp_path) == ["huge.bin"]


class TestThreadsAndForks:
    def test_threads_writing_one_target_while_a_thread_reads(self, tmp_path: Path) -> None:
        target = tmp_path / "shared.txt"
        target.write_text("seed\n" * 10, encoding="utf-8")
        stop = threading.Event()
        bad: list[str] = []
        reads = 0

        def read_loop() -> None:
            nonlocal reads
            while not stop.is_set() or reads == 0:
                text = target.read_text(encoding="utf-8")
                reads += 1
                lines = text.splitlines()
                # A whole version is one line repeated; a torn one mixes two.
                if not lines or len(set(lines)) != 1:
                    bad.append(text[:60])

        def write_loop(i: int) -> None:
            for n in range(20):
                atomic_write(target, f"writer {i} version {n}\n" * (100 * (i + 1)), durable=False)

        reader = threading.Thread(target=read_loop)
        reader.start()
        writers = [threading.Thread(target=write_loop, args=(i,)) for i in range(6)]
        for t in writers:
            t.start()
        for t in writers:
            t.join(JOIN_TIMEOUT)
        stop.set()
        reader.join(JOIN_TIMEOUT)
        assert not reader.is_alive()
        assert not any(t.is_alive() for t in writers)
        assert bad == []
        assert reads > 0
        assert re.fullmatch(r"(writer \d version 19\n)+", target.read_text(encoding="utf-8"))
        assert listing(tmp_path) == ["shared.txt"]

    @posix_only
    def test_forked_child_names_temps_with_its_own_pid(self, tmp_path: Path) -> None:
        # A temp named after the parent would be spared while the parent lives and
        # removed, under a live child, once the parent is gone.
        with AtomicFileWriter(tmp_path / "parent.txt") as f:  # warm any pid cache
            f.write("p")
        read_fd, write_fd = os.pipe()
        pid = fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.close(read_fd)
                writer = AtomicFileWriter(tmp_path / "child.txt")
                writer.open().write("c")
                assert writer.temp_path is not None
                os.write(write_fd, writer.temp_path.name.encode())
                writer.commit()
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            name = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        match = TEMP_NAME_RE.match(name)
        assert match is not None, name
        assert int(match["pid"]) == pid
        assert listing(tmp_path) == ["child.txt", "parent.txt"]


_STREAM_CHILD = textwrap.dedent(
    """
    import sys
    from htmlgraph import AtomicFileWriter
    block = b"z" * (1 << 20)
    with AtomicFileWriter(sys.argv[1], mode="wb", durable=False) as f:
        for _ in range(int(sys.argv[2])):
            f.write(block)
    # VmHWM: this process's own peak RSS (getrusage's maxrss survives exec and
    # would report the forking parent's size).
    with open("/proc/self/status") as status:
        print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    """
)


@pytest.mark.slow
@linux_only
def test_streaming_write_memory_stays_flat(tmp_path: Path) -> None:
    target = tmp_path / "stream.bin"
    megabytes = 300
    proc = run_python(_STREAM_CHILD, str(target), str(megabytes), timeout=300)
    assert proc.returncode == 0, proc.stderr
    max_rss_kib = int(proc.stdout)
    assert max_rss_kib < 100 * 1024, f"peak RSS {max_rss_kib} KiB for a {megabytes} MiB write"
    assert os.stat(target).st_size == megabytes << 20
    assert listing(tmp_path) == ["stream.bin"]


class TestKernelErrors:
    @linux_only
    @pytest.mark.parametrize("api", ["context", "atomic_write", "json"])
    def test_read_only_mount_is_erofs(self, tmp_path: Path, api: str) -> None:
        with tmpfs(tmp_path / "ro", size="1m") as mnt:
            target = mnt / "t.txt"
            target.write_text("old", encoding="utf-8")
            remount = subprocess.run(
                ["mount", "-o", "remount,ro", str(mnt)], capture_output=True, timeout=30
            )
            if remount.returncode != 0:
                pytest.skip(f"cannot remount read-only: {remount.stderr!r}")
            with pytest.raises(OSError, match="Read-only") as info:
                write_via(api, target, "new")
            assert info.value.errno == errno.EROFS
            assert target.read_text(encoding="utf-8") == "old"
            assert listing(mnt) == ["t.txt"]

    @posix_only
    @pytest.mark.parametrize("api", ["context", "atomic_write"])
    def test_file_size_limit_is_efbig(self, tmp_path: Path, api: str) -> None:
        code = textwrap.dedent(
            """
            import errno, resource, signal, sys
            from htmlgraph import AtomicFileWriter, atomic_write
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not a signal death
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
            try:
                if sys.argv[2] == "context":
                    with AtomicFileWriter(sys.argv[1], mode="wb") as f:
                        for _ in range(3):
                            f.write(b"y" * (1 << 20))
                else:
                    atomic_write(sys.argv[1], b"y" * (3 << 20))
            except OSError as exc:
                sys.exit(0 if exc.errno == errno.EFBIG else 2)
            sys.exit(1)
            """
        )
        target = tmp_path / "t.bin"
        target.write_bytes(b"old")
        proc = run_python(code, str(target), api)
        assert proc.returncode == 0, proc.stderr
        assert target.read_bytes() == b"old"
        assert listing(tmp_path) == ["t.bin"]


class _BytesPathLike:
    """An os.PathLike whose __fspath__ returns bytes (we accept str paths only)."""

    def __fspath__(self) -> bytes:
        return b"/tmp/bytes"


class TestEdgeCases:
    def test_pathlike_returning_bytes_is_rejected(self) -> None:
        with pytest.raises(TypeError, match="bytes"):
            atomic_write(_BytesPathLike(), "x")  # type: ignore[arg-type]

    def test_trailing_separator_means_a_directory(self, tmp_path: Path) -> None:
        with pytest.raises(IsADirectoryError) as info:
            atomic_write(str(tmp_path / "name") + os.sep, "x")
        assert_names(info.value, tmp_path / "name")
        assert listing(tmp_path) == []

    @pytest.mark.parametrize(
        ("options", "error"),
        [
            ({"encoding": "no-such-codec"}, LookupError),
            ({"newline": "\t"}, ValueError),
        ],
        ids=["encoding", "newline"],
    )
    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    def test_bad_text_options_leave_nothing(
        self, tmp_path: Path, options: dict[str, str], error: type[Exception], existing: bool
    ) -> None:
        target = tmp_path / "t.txt"
        if existing:
            target.write_text("old", encoding="utf-8")
        with pytest.raises(error):
            AtomicFileWriter(target, **options).open()  # type: ignore[call-overload]
        assert listing(tmp_path) == (["t.txt"] if existing else [])
        if "encoding" in options:
            with pytest.raises(error):
                atomic_write(target, "x", encoding=options["encoding"])
            assert listing(tmp_path) == (["t.txt"] if existing else [])
        if existing:
            assert target.read_text(encoding="utf-8") == "old"

    @pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
    def test_a_replaced_mkstemp_makes_the_temp_with_the_right_mode(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: Any, existing: bool
    ) -> None:
        umask(0o027)
        target = tmp_path / "t.txt"
        if existing:
            target.write_text("old", encoding="utf-8")
            target.chmod(0o604)
        real = tempfile.mkstemp
        made: list[str] = []

        def wrapped(*args: Any, **kwargs: Any) -> tuple[int, str]:
            fd, path = real(*args, **kwargs)
            made.append(os.path.basename(path))
            return fd, path

        monkeypatch.setattr(tempfile, "mkstemp", wrapped)
        atomic_write(target, "new")
        with AtomicFileWriter(target) as f:
            f.write("newer")
        assert len(made) == 2
        assert all(TEMP_NAME_RE.match(name) for name in made), made
        assert target.read_text(encoding="utf-8") == "newer"
        # The target's own mode, or open()'s 0o666 & ~umask: never mkstemp's 0o600.
        assert stat.S_IMODE(target.stat().st_mode) == (0o604 if existing else 0o640)
        assert listing(tmp_path) == ["t.txt"]

    @pytest.mark.parametrize(
        "error",
        [
            OSError(errno.ENOSPC, "No space left on device"),
            OSError("No space left on device"),  # the seed's own simulation: no errno
            FileExistsError(errno.EEXIST, "No usable temporary file name found"),
        ],
    )
    def test_temp_creation_failure_surfaces_before_anything_is_written(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
    ) -> None:
        # Temps are made by tempfile.mkstemp, so patching it simulates a full
        # disk, as the seed's own tests do.
        target = tmp_path / "t.txt"
        target.write_text("old", encoding="utf-8")
        calls: list[object] = []

        def failing(*args: object, **kwargs: object) -> tuple[int, str]:
            calls.append(args)
            raise error

        monkeypatch.setattr(tempfile, "mkstemp", failing)
        with pytest.raises(type(error)), AtomicFileWriter(target) as f:
            f.write("never")
        with pytest.raises(type(error)):
            atomic_write(target, "never")
        with pytest.raises(type(error)):
            atomic_json_write(target, {"never": 1})
        assert len(calls) == 3
        assert target.read_text(encoding="utf-8") == "old"
        assert listing(tmp_path) == ["t.txt"]

    def test_memoryview_of_wide_items_is_written_whole(self, tmp_path: Path) -> None:
        from array import array

        numbers = array("i", range(10_000))
        target = tmp_path / "ints.bin"
        atomic_write(target, memoryview(numbers))  # type: ignore[arg-type]
        assert target.read_bytes() == numbers.tobytes()

    def test_repr_names_target_and_mode(self, tmp_path: Path) -> None:
        writer = AtomicFileWriter(tmp_path / "r.bin", mode="wb")
        assert str(tmp_path / "r.bin") in repr(writer)
        assert "wb" in repr(writer)

    def test_zero_retries_still_reads_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sleeps: list[float] = []
        monkeypatch.setattr("htmlgraph.atomic_ops.time.sleep", sleeps.append)
        (tmp_path / "f").write_text("once", encoding="utf-8")
        assert AtomicFileWriter.safe_read_with_retry(tmp_path / "f", max_retries=0) == "once"
        with pytest.raises(FileNotFoundError):
            AtomicFileWriter.safe_read_with_retry(tmp_path / "g", max_retries=0)
        assert sleeps == []

    @pytest.mark.parametrize("prefix", ["a/b", "x\0", "../up"])
    def test_safe_temp_file_rejects_path_like_prefixes(self, tmp_path: Path, prefix: str) -> None:
        with pytest.raises(ValueError, match="prefix"):
            safe_temp_file(tmp_path / "base", prefix=prefix)

    def test_threads_creating_the_same_new_directories(self, tmp_path: Path) -> None:
        # Every writer needs tmp/new/deep/er: the mkdir races must all succeed.
        errors: list[BaseException] = []
        start = threading.Barrier(8)
        deep = tmp_path / "new" / "deep" / "er"

        def work(i: int) -> None:
            try:
                start.wait(30)
                atomic_write(deep / f"f{i}", str(i))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert listing(deep) == sorted(f"f{i}" for i in range(8))
        assert listing(tmp_path) == ["new"]


class TestRarePaths:
    """Paths a run meets rarely: name collisions, refusals, odd errors - each forced."""

    def test_temp_name_collision_draws_another_name(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        tokens = iter(["0" * 16, "0" * 16, "1" * 16])
        monkeypatch.setattr(atomic_ops, "_random_token", lambda nbytes=8: next(tokens))
        head = atomic_ops._temp_head(os.getpid())
        squatter = tmp_path / f"{head}{'0' * 16}-t.txt"
        squatter.write_text("someone else's", encoding="utf-8")
        atomic_write(tmp_path / "t.txt", "mine")
        assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "mine"
        assert squatter.read_text(encoding="utf-8") == "someone else's"  # never touched
        assert listing(tmp_path) == sorted([squatter.name, "t.txt"])

    def test_every_temp_name_taken_is_an_error_not_a_clobber(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        drawn: list[int] = []

        def stuck(nbytes: int = 8) -> str:
            drawn.append(nbytes)
            return "a" * 16

        monkeypatch.setattr(atomic_ops, "_random_token", stuck)
        squatter = tmp_path / f"{atomic_ops._temp_head(os.getpid())}{'a' * 16}-t.txt"
        squatter.write_text("taken", encoding="utf-8")
        with pytest.raises(FileExistsError, match="no free temp name"):
            atomic_write(tmp_path / "t.txt", "x")
        assert len(drawn) == atomic_ops._TEMP_ATTEMPTS
        assert listing(tmp_path) == [squatter.name]

    def test_a_write_that_makes_no_progress_is_eio_not_a_spin(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        target = tmp_path / "t.txt"
        target.write_text("old", encoding="utf-8")
        calls: list[int] = []

        def stalled(fd: int, data: bytes) -> int:
            calls.append(fd)
            return 0

        monkeypatch.setattr(os, "write", stalled)
        with pytest.raises(OSError, match="wrote nothing") as info:
            atomic_write(target, "new")
        monkeypatch.undo()
        assert calls
        assert info.value.errno == errno.EIO
        assert info.value.filename == str(target)
        assert target.read_text(encoding="utf-8") == "old"
        assert listing(tmp_path) == ["t.txt"]

    def test_paths_given_are_reported_as_given(self, tmp_path: Path) -> None:
        writer = AtomicFileWriter(tmp_path / "t.txt", tmp_path / "staging")
        assert writer.target_path == tmp_path / "t.txt"
        assert writer.temp_dir == tmp_path / "staging"
        assert AtomicFileWriter(tmp_path / "u.txt").temp_dir is None
        assert listing(tmp_path) == []

    def test_create_only_whose_temp_link_cannot_be_removed_still_commits(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        real_unlink = os.unlink
        refused: list[str] = []

        def refuse_temp(path: str) -> None:
            if os.path.basename(path).startswith(".tmp-"):
                refused.append(path)
                raise PermissionError(errno.EPERM, "Operation not permitted", path)
            real_unlink(path)

        monkeypatch.setattr(os, "unlink", refuse_temp)
        atomic_write(tmp_path / "new.txt", "created", overwrite=False)
        monkeypatch.undo()
        assert len(refused) == 1
        assert (tmp_path / "new.txt").read_text(encoding="utf-8") == "created"
        assert "could not remove temp link" in caplog.text
        real_unlink(refused[0])  # the extra name of the same file: an orphan
        assert listing(tmp_path) == ["new.txt"]

    @posix_only
    def test_reading_a_fifo_in_process_is_refused_at_once(self, tmp_path: Path) -> None:
        if sys.platform == "win32":
            pytest.skip("no FIFOs")
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(OSError, match="a FIFO, not a regular file") as info:
            AtomicFileWriter.safe_read_with_retry(fifo, max_retries=1)
        assert info.value.errno == errno.EINVAL
        assert not validate_atomic_write(fifo)
        assert listing(tmp_path) == ["fifo"]

    @posix_only
    @pytest.mark.parametrize("rule", ["may_follow_link", "may_replace"])
    def test_a_kernel_rule_saying_no_refuses_before_anything_is_written(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule: str
    ) -> None:
        # The rules themselves are compared with the kernel in test_hostile.py
        # (as root); here the writer's answer to a "no" is checked in-process.
        real = tmp_path / "real.txt"
        real.write_text("old", encoding="utf-8")
        link = tmp_path / "link.txt"
        link.symlink_to(real)
        asked: list[str] = []

        def no(path: str, st: os.stat_result) -> bool:
            asked.append(path)
            return False

        monkeypatch.setattr(_platform, rule, no)
        with pytest.raises(PermissionError, match="protected_") as info:
            atomic_write(link, "new")
        assert asked
        assert info.value.errno == errno.EACCES
        assert real.read_text(encoding="utf-8") == "old"
        assert listing(tmp_path) == ["link.txt", "real.txt"]

    def test_cleanup_counts_what_it_may_not_remove_and_goes_on(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        names = [".tmp-a", ".tmp-b", ".tmp-c"]
        for name in names:
            (tmp_path / name).write_text("old", encoding="utf-8")
            age(tmp_path / name, 48)
        real_unlink = os.unlink

        def refuse_b(path: str) -> None:
            if path.endswith(".tmp-b"):
                raise PermissionError(errno.EPERM, "Operation not permitted", path)
            real_unlink(path)

        monkeypatch.setattr(os, "unlink", refuse_b)
        result = atomic_ops._cleanup(tmp_path, 24)
        monkeypatch.undo()
        assert result == (2, 1)
        assert listing(tmp_path) == [".tmp-b"]
        assert "could not remove 1 orphaned temp file(s)" in caplog.text

    def test_a_replaced_mkstemp_creates_missing_directories(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real = tempfile.mkstemp
        calls: list[object] = []

        def wrapped(*args: Any, **kwargs: Any) -> tuple[int, str]:
            calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", wrapped)
        target = tmp_path / "new" / "dir" / "t.txt"
        atomic_write(target, "deep")
        assert len(calls) == 2  # the first found the directory missing
        assert target.read_text(encoding="utf-8") == "deep"
        assert listing(target.parent) == ["t.txt"]
