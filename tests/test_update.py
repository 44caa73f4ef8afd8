"""Tests of read-modify-write: atomic_update, atomic_json_update and ``htmlgraph update``.

Each promise has its test: a missing file with and without a default, None
leaves the file untouched, an exception changes nothing, invalid JSON is named
and left alone, binary content, kept permissions, the lock's timeout (a
LockTimeout; exit 75 from the command line), the lock's place (resolved,
bounded names, refused when planted). Real processes show that no update is
lost - through the API and through the command line - and a negative control
(the same loop with a read and an atomic write but no lock) shows that the
test can fail. After every scenario the directory is listed whole: the file
and its lock directory (empty once released), nothing else.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _updatehelpers
import htmlgraph
from _helpers import cheap_context, new_process, wait_for
from htmlgraph import DirectoryLocker, LockTimeout, atomic_json_update, atomic_update, update
from htmlgraph.update import LOCK_SUFFIX, update_lock_dir

POSIX = sys.platform != "win32"
posix_only = pytest.mark.skipif(not POSIX, reason="POSIX only")
SIGKILL = int(getattr(signal, "SIGKILL", 9))  # absent on Windows
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
TIMEOUT = 60.0  # any single wait or CLI run
JOIN_TIMEOUT = 120.0

SRC = str(Path(htmlgraph.__file__).resolve().parent.parent)
TESTS = str(Path(__file__).resolve().parent)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def lock_of(path: Path) -> str:
    return f".{path.name}{LOCK_SUFFIX}"


def assert_clean(path: Path, *others: str) -> None:
    """The directory holds ``path`` (if it exists), its lock directory, ``others``; no marker."""
    expected = {lock_of(path), *others}
    if path.exists():
        expected.add(path.name)
    assert set(listing(path.parent)) == expected
    assert listing(path.parent / lock_of(path)) == []  # released


def lock_is_free(path: Path) -> bool:
    locker = DirectoryLocker(update_lock_dir(path))
    if locker.acquire_exclusive_lock(timeout=0):
        locker.release_lock()
        return True
    return False


# --------------------------------------------------------------------------
# atomic_update: the promises
# --------------------------------------------------------------------------


@pytest.mark.parametrize("as_path", [False, True])
def test_update_replaces_and_returns_the_new_content(tmp_path: Path, as_path: bool) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("one\n")
    seen: list[str] = []

    def add(text: str) -> str:
        seen.append(text)
        return text + "two\n"

    result = atomic_update(target if as_path else str(target), add)
    assert result == "one\ntwo\n"
    assert seen == ["one\n"]
    assert target.read_text() == "one\ntwo\n"
    assert_clean(target)


def test_missing_file_without_default_raises_and_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "missing.txt"
    called: list[str] = []

    def record(text: str) -> str:
        called.append(text)
        return "x"

    with pytest.raises(FileNotFoundError) as info:
        atomic_update(target, record)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(target)
    assert called == []
    assert listing(tmp_path) == []  # no file, and no lock directory either


def test_missing_directory_without_default_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "f.json"
    with pytest.raises(FileNotFoundError) as info:
        atomic_json_update(target, lambda d: d)
    assert str(target) in str(info.value)
    assert listing(tmp_path) == []


def test_missing_file_with_default_value(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    assert atomic_update(target, lambda text: text + "first\n", default="") == "first\n"
    assert target.read_text() == "first\n"
    # The default is only for a missing file.
    assert atomic_update(target, lambda text: text + "second\n", default="IGNORED") == (
        "first\nsecond\n"
    )
    assert target.read_text() == "first\nsecond\n"
    assert_clean(target)


def test_missing_file_and_directories_with_default(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "state.json"
    assert atomic_json_update(target, lambda d: {**d, "runs": 1}, default=dict) == {"runs": 1}
    assert json.loads(target.read_text()) == {"runs": 1}
    assert_clean(target)


def test_callable_default_is_called_only_for_a_missing_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    made: list[int] = []

    def fresh() -> dict[str, int]:
        made.append(1)
        return {}

    def bump(d: dict[str, int]) -> dict[str, int]:
        d["runs"] = d.get("runs", 0) + 1  # in place: a shared default would leak
        return d

    assert atomic_json_update(target, bump, default=fresh) == {"runs": 1}
    assert atomic_json_update(target, bump, default=fresh) == {"runs": 2}
    assert made == [1]
    target.unlink()
    assert atomic_json_update(target, bump, default=dict) == {"runs": 1}
    assert json.loads(target.read_text()) == {"runs": 1}


def test_json_null_is_a_valid_default(tmp_path: Path) -> None:
    target = tmp_path / "v.json"
    assert atomic_json_update(target, lambda v: [v], default=None) == [None]
    assert json.loads(target.read_text()) == [None]


def test_returning_none_leaves_the_file_untouched(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep\n")
    before = os.stat(target)
    assert atomic_update(target, lambda text: None) is None
    after = os.stat(target)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert target.read_text() == "keep\n"
    assert_clean(target)
    # A missing file stays missing.
    absent = tmp_path / "absent.txt"
    assert atomic_update(absent, lambda text: None, default="") is None
    assert not absent.exists()
    assert atomic_json_update(tmp_path / "absent.json", lambda d: None, default=dict) is None
    assert not (tmp_path / "absent.json").exists()


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_an_exception_in_fn_changes_nothing(tmp_path: Path, error: type[BaseException]) -> None:
    target = tmp_path / "state.json"
    target.write_text('{"n": 1}\n')
    before = os.stat(target)

    def fail(doc: dict[str, int]) -> dict[str, int]:
        doc["n"] = 99
        raise error

    with pytest.raises(error):
        atomic_json_update(target, fail)
    after = os.stat(target)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert target.read_text() == '{"n": 1}\n'
    assert_clean(target)
    assert lock_is_free(target)
    # A missing file stays missing too.
    with pytest.raises(error):
        atomic_update(tmp_path / "new.txt", lambda text: (_ for _ in ()).throw(error()), default="")
    assert not (tmp_path / "new.txt").exists()


@pytest.mark.parametrize(
    ("binary", "bad"), [(False, b"bytes"), (False, 42), (True, "text"), (True, [1])]
)
def test_a_result_of_the_wrong_type_is_a_type_error(
    tmp_path: Path, binary: bool, bad: object
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old\n")

    def give_bad(content: object) -> object:
        return bad

    def update_badly() -> object:
        if binary:
            return atomic_update(target, cast("Callable[[bytes], bytes]", give_bad), binary=True)
        return atomic_update(target, cast("Callable[[str], str]", give_bad))

    with pytest.raises(TypeError, match="fn must return") as info:
        update_badly()
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"old\n"
    assert_clean(target)


def test_binary_update(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    raw = bytes(range(256)) + b"\r\n\xff\xfe"  # not UTF-8, CRLF: passed on exactly
    target.write_bytes(raw)
    seen: list[bytes] = []

    def flip(data: bytes) -> bytes:
        seen.append(data)
        return data[::-1]

    assert atomic_update(target, flip, binary=True) == raw[::-1]
    assert seen == [raw]
    assert target.read_bytes() == raw[::-1]
    fresh = tmp_path / "new.bin"
    assert atomic_update(fresh, lambda data: data + b"\x00", binary=True, default=b"\x01") == (
        b"\x01\x00"
    )
    assert fresh.read_bytes() == b"\x01\x00"
    assert_clean(target, fresh.name, lock_of(fresh))


@posix_only
def test_text_is_passed_on_exactly_as_stored(tmp_path: Path) -> None:
    target = tmp_path / "crlf.txt"
    target.write_bytes("a\r\nb\rc\né\n".encode())
    assert atomic_update(target, lambda text: text + "d\n") == "a\r\nb\rc\né\nd\n"
    assert target.read_bytes() == "a\r\nb\rc\né\nd\n".encode()


def test_encoding_and_undecodable_text(tmp_path: Path) -> None:
    target = tmp_path / "latin.txt"
    target.write_bytes("café".encode("latin-1"))
    with pytest.raises(UnicodeDecodeError):
        atomic_update(target, lambda text: text)
    assert target.read_bytes() == "café".encode("latin-1")
    atomic_update(target, lambda text: text.upper(), encoding="latin-1")
    assert target.read_bytes() == "CAFÉ".encode("latin-1")


@posix_only
@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_permissions_are_kept(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "state.json"
    target.write_text("{}\n")
    target.chmod(mode)
    atomic_json_update(target, lambda d: {**d, "n": 1})
    assert stat.S_IMODE(target.stat().st_mode) == mode
    atomic_update(target, lambda text: text, permissions=0o604)
    assert stat.S_IMODE(target.stat().st_mode) == 0o604
    fresh = tmp_path / "fresh.txt"
    atomic_update(fresh, lambda text: "x", default="")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # 0o666 & ~umask, like open()


def test_durable_false_still_replaces(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("a")
    assert atomic_update(target, lambda t: t + "b", durable=False) == "ab"
    assert target.read_text() == "ab"


def test_directory_target_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        atomic_update(target, lambda t: t)
    assert str(target) in str(info.value)
    with pytest.raises(IsADirectoryError):
        atomic_update(str(tmp_path) + os.sep, lambda t: t, default="")
    assert listing(target) == []


if sys.platform != "win32":  # mkfifo (also for mypy --platform win32)

    @posix_only
    def test_a_fifo_target_is_refused_without_blocking(tmp_path: Path) -> None:
        # O_NONBLOCK: opening a FIFO nobody writes must not hang. In a child
        # process, so that a regression fails within TIMEOUT instead of hanging.
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        code = textwrap.dedent(
            f"""
            import errno
            from htmlgraph import atomic_update
            try:
                atomic_update({str(fifo)!r}, lambda t: t + "x")
            except OSError as exc:
                assert exc.errno == errno.EINVAL and exc.filename == {str(fifo)!r}, exc
                print("refused")
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=_env(),
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "refused"
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# --------------------------------------------------------------------------
# atomic_json_update
# --------------------------------------------------------------------------


def test_json_update_writes_like_atomic_json_write(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    reference = tmp_path / "reference.json"
    value = {"runs": 3, "name": "é", "list": [1, 2, {"a": None}]}
    htmlgraph.atomic_json_write(reference, value)
    atomic_json_update(target, lambda d: value, default=dict)
    assert target.read_bytes() == reference.read_bytes()  # indent=2, UTF-8, newline
    atomic_json_update(target, lambda d: d, indent=None, sort_keys=True)
    assert target.read_text() == json.dumps(value, sort_keys=True, ensure_ascii=False) + "\n"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "Expecting value"),
        (b'{"n": 1', "Expecting"),
        (b'{"n": 1}{"n": 2}', "Extra data"),
        (b'{"n": NaN}', "NaN is not JSON"),
        (b'{"n": "\xff"}', "not UTF-8 at byte 7"),
    ],
)
def test_invalid_json_is_named_and_left_untouched(tmp_path: Path, content: bytes, why: str) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(content)
    called: list[object] = []
    with pytest.raises(ValueError, match=why) as info:
        atomic_json_update(target, lambda d: called.append(d), default=dict)
    assert str(target) in str(info.value)
    assert "is not valid JSON" in str(info.value)
    assert info.value.__cause__ is not None  # the parser's own error, for its position
    assert called == []
    assert target.read_bytes() == content
    assert_clean(target)


@pytest.mark.parametrize(("bad", "error"), [({1, 2}, TypeError), (float("nan"), ValueError)])
def test_a_result_json_cannot_hold_changes_nothing(
    tmp_path: Path, bad: object, error: type[Exception]
) -> None:
    target = tmp_path / "state.json"
    target.write_text('{"n": 1}\n')
    with pytest.raises(error) as info:
        atomic_json_update(target, lambda d: {"bad": bad})
    assert str(target) in str(info.value)
    assert target.read_text() == '{"n": 1}\n'
    assert_clean(target)


# --------------------------------------------------------------------------
# The lock: timeout, place, hostile directories
# --------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0.0, 0.2])
def test_timeout_raises_lock_timeout_and_changes_nothing(tmp_path: Path, timeout: float) -> None:
    target = tmp_path / "state.json"
    target.write_text('{"n": 1}\n')
    called: list[object] = []
    with DirectoryLocker(update_lock_dir(target)).exclusive(timeout=5):
        started = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            atomic_json_update(target, lambda d: called.append(d), timeout=timeout)
        assert time.monotonic() - started < timeout + 5.0
        with pytest.raises(TimeoutError):
            atomic_update(target, lambda t: t + "x", timeout=timeout)
    assert info.value.lock_dir == update_lock_dir(target)
    assert info.value.mode == "exclusive"
    assert called == []
    assert target.read_text() == '{"n": 1}\n'
    assert_clean(target)


def test_the_lock_is_held_while_fn_runs_and_released_after(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("x")
    during: list[bool] = []

    def probe(text: str) -> str:
        during.append(lock_is_free(target))
        during.append(len(listing(tmp_path / lock_of(target))) == 1)  # our marker
        return text

    atomic_update(target, probe)
    assert during == [False, True]
    assert lock_is_free(target)
    assert_clean(target)


def test_lock_dir_is_beside_the_resolved_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "state.json"
    expected = real_dir / f".state.json{LOCK_SUFFIX}"
    monkeypatch.chdir(tmp_path)
    spellings: list[str | Path] = [
        target,
        str(target),
        "real/state.json",
        "real/../real/./state.json",
    ]
    if POSIX:
        (tmp_path / "link.json").symlink_to(target)
        (tmp_path / "linkdir").symlink_to(real_dir, target_is_directory=True)
        spellings += ["link.json", tmp_path / "linkdir" / "state.json"]
    for spelling in spellings:
        assert update_lock_dir(spelling) == expected, spelling
    assert not expected.exists()  # pure computation


@posix_only
def test_a_symlinked_parent_directory_meets_the_same_lock(tmp_path: Path) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    (tmp_path / "linkdir").symlink_to(real_dir, target_is_directory=True)
    target = real_dir / "state.json"
    target.write_text('{"n": 0}\n')
    via_link = tmp_path / "linkdir" / "state.json"
    with DirectoryLocker(update_lock_dir(target)).exclusive(timeout=5), pytest.raises(LockTimeout):
        atomic_json_update(via_link, lambda d: {"n": 1}, timeout=0)
    atomic_json_update(via_link, lambda d: {"n": d["n"] + 1})
    assert json.loads(target.read_text()) == {"n": 1}
    assert_clean(target)


@posix_only
def test_update_through_a_symlink_keeps_the_link_and_shares_the_lock(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text('{"n": 0}\n')
    link = tmp_path / "link.json"
    link.symlink_to(real)
    atomic_json_update(link, lambda d: {"n": d["n"] + 1})
    atomic_json_update(real, lambda d: {"n": d["n"] + 1})
    assert link.is_symlink()
    assert json.loads(real.read_text()) == {"n": 2}
    assert_clean(real, "link.json")
    # Held through one spelling, the other waits.
    with DirectoryLocker(update_lock_dir(link)).exclusive(timeout=5), pytest.raises(LockTimeout):
        atomic_json_update(real, lambda d: d, timeout=0)
    # A dangling link creates the file it names, locked as that file.
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "created.json")
    atomic_json_update(dangling, lambda d: {"made": True}, default=dict)
    assert dangling.is_symlink()
    assert json.loads((tmp_path / "created.json").read_text()) == {"made": True}
    assert (tmp_path / f".created.json{LOCK_SUFFIX}").is_dir()


@pytest.mark.parametrize(
    "char",
    ["a", "é", "😀", pytest.param("\udcff", marks=linux_only, id="not-utf8")],
)
def test_long_names_get_a_bounded_distinct_lock_name(tmp_path: Path, char: str) -> None:
    per_char = len(char.encode("utf-8", "surrogateescape"))
    name = char * (250 // per_char)  # within 255 bytes, too long with the suffix
    other = name[:-1] + "b"  # shares a long head with name
    one, two = update_lock_dir(tmp_path / name).name, update_lock_dir(tmp_path / other).name
    for lock in (one, two):
        assert len(lock.encode()) <= 255
        assert lock.startswith(".")
        assert lock.endswith(LOCK_SUFFIX)
        lock.encode("utf-8")  # no half character
    assert one != two
    assert update_lock_dir(tmp_path / name).name == one  # deterministic
    # A name that fits is not hashed.
    assert update_lock_dir(tmp_path / "short").name == f".short{LOCK_SUFFIX}"
    # And the whole update works with such a name.
    target = tmp_path / name
    assert atomic_update(target, lambda t: t + "x", default="") == "x"
    assert target.read_text() == "x"
    assert set(listing(tmp_path)) == {name, one}


@posix_only
def test_a_planted_symlink_lock_dir_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    share = tmp_path / "share"
    share.mkdir()
    target = share / "state.json"
    target.write_text("{}\n")
    (share / lock_of(target)).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OSError, match="symlink") as info:
        atomic_json_update(target, lambda d: {"n": 1})
    assert info.value.errno == errno.ELOOP
    assert info.value.filename == str(share / lock_of(target))
    assert target.read_text() == "{}\n"
    assert listing(elsewhere) == []  # no marker went through the link


def test_a_planted_file_at_the_lock_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("{}\n")
    (tmp_path / lock_of(target)).write_text("not a directory")
    with pytest.raises(NotADirectoryError) as info:
        atomic_json_update(target, lambda d: {"n": 1})
    assert info.value.filename == str(tmp_path / lock_of(target))
    assert target.read_text() == "{}\n"


if sys.platform != "win32":  # chown, geteuid (also for mypy --platform win32)

    @posix_only
    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
    @pytest.mark.parametrize("sticky", [True, False])
    def test_a_strangers_lock_dir_in_a_sticky_directory_is_refused(
        tmp_path: Path, sticky: bool
    ) -> None:
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o1777 if sticky else 0o777)
        target = shared / "state.json"
        target.write_text("{}\n")
        lock_dir = shared / lock_of(target)
        lock_dir.mkdir()
        stranger = 65534  # nobody
        os.chown(lock_dir, stranger, stranger)
        if sticky:
            with pytest.raises(PermissionError, match="stranger") as info:
                atomic_json_update(target, lambda d: {"n": 1})
            assert info.value.filename == str(lock_dir)
            assert target.read_text() == "{}\n"
            # The file's owner is no stranger: its lock directory is accepted.
            os.chown(target, stranger, stranger)
        atomic_json_update(target, lambda d: {"n": 1})
        assert json.loads(target.read_text()) == {"n": 1}

    @posix_only
    def test_an_unwritable_lock_dir_raises_at_once(tmp_path: Path) -> None:
        # Another user's lock directory we may not write: the PermissionError
        # comes at the first attempt, naming it, not after the 30 s timeout.
        # Root writes anywhere, so as root a forked child becomes "nobody"
        # (a fork, not an exec: the interpreter may be out of nobody's reach),
        # in a directory of /tmp it can reach (pytest's tmp_path is private).
        as_nobody = os.geteuid() == 0
        base = Path(tempfile.mkdtemp(dir="/tmp")) if as_nobody else tmp_path
        try:
            base.chmod(0o777)
            target = base / "state.json"
            target.write_text("{}\n")
            target.chmod(0o666)
            lock_dir = base / lock_of(target)
            lock_dir.mkdir()
            lock_dir.chmod(0o555)
            ctx = multiprocessing.get_context("fork")
            parent_end, child_end = ctx.Pipe()
            child = ctx.Process(
                target=_updatehelpers.update_as,
                args=(str(target), 65534 if as_nobody else None, child_end),
            )
            child.start()
            try:
                child.join(TIMEOUT)
                assert child.exitcode == 0
                assert parent_end.poll(0), "the child never reported"
                outcome, filename, seconds = parent_end.recv()
            finally:
                if child.is_alive():
                    child.kill()
                    child.join(TIMEOUT)
                lock_dir.chmod(0o755)
            assert outcome == "refused"
            assert filename.startswith(str(lock_dir))
            assert seconds < 10  # failed at once, did not poll until the timeout
            assert target.read_text() == "{}\n"
            assert listing(lock_dir) == []
        finally:
            if as_nobody:
                shutil.rmtree(base)


def test_an_update_from_inside_its_own_fn_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text('{"n": 0}\n')

    def nested(doc: dict[str, int]) -> dict[str, int]:
        atomic_json_update(target, lambda d: {"n": 99}, timeout=1)
        return doc

    with pytest.raises(RuntimeError, match="already being updated by this thread"):
        atomic_json_update(target, nested)
    assert target.read_text() == '{"n": 0}\n'
    assert_clean(target)
    # Another file inside fn is fine.
    other = tmp_path / "other.txt"
    atomic_json_update(target, lambda d: atomic_update(other, lambda t: "x", default="") and d)
    assert other.read_text() == "x"


def test_many_files_and_a_deleted_lock_dir(tmp_path: Path) -> None:
    # More files than the per-thread cache of lockers keeps, twice over; then
    # a lock directory deleted between two updates is made again.
    files = [tmp_path / f"f{i}.txt" for i in range(40)]
    for _ in range(2):
        for f in files:
            atomic_update(f, lambda t: t + "x", default="", durable=False)
    assert all(f.read_text() == "xx" for f in files)
    (tmp_path / lock_of(files[0])).rmdir()
    assert atomic_update(files[0], lambda t: t + "y") == "xxy"
    assert listing(tmp_path / lock_of(files[0])) == []


@pytest.mark.parametrize(
    ("path", "error"),
    [(b"state.json", TypeError), (42, TypeError), ("", ValueError), ("a\0b", ValueError)],
)
def test_bad_paths_are_refused_before_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: object, error: type[Exception]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error):
        atomic_update(path, lambda t: t, default="")  # type: ignore[call-overload]
    with pytest.raises(error):
        update_lock_dir(path)  # type: ignore[arg-type]
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("permissions", "error"), [(0o10000, ValueError), (-1, ValueError), ("644", TypeError)]
)
def test_bad_permissions_are_refused_before_fn_and_the_disk(
    tmp_path: Path, permissions: object, error: type[Exception]
) -> None:
    target = tmp_path / "state.json"
    target.write_text("{}\n")
    calls: list[object] = []
    with pytest.raises(error, match="permissions"):
        atomic_json_update(target, calls.append, permissions=permissions)  # type: ignore[arg-type]
    with pytest.raises(error, match="permissions"):
        atomic_update(target, calls.append, permissions=permissions)  # type: ignore[call-overload]
    assert calls == []  # refused before fn ran
    assert listing(tmp_path) == ["state.json"]  # no lock directory, no temp
    assert target.read_text() == "{}\n"


def test_callable_text_default(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    assert atomic_update(target, lambda t: t + "b\n", default=lambda: "a\n") == "a\nb\n"
    assert atomic_update(target, lambda t: t + "c\n", default=lambda: "IGNORED") == "a\nb\nc\n"


@pytest.mark.parametrize("json_mode", [False, True])
def test_a_file_removed_while_waiting_for_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, json_mode: bool
) -> None:
    # The file exists when the call starts and is gone once it holds the lock.
    target = tmp_path / "state.json"
    target.write_text("{}\n")
    waiting = threading.Event()
    original = update._check_lock_dir

    def check_then_signal(lock_dir: str, target_path: str) -> None:
        original(lock_dir, target_path)
        waiting.set()

    monkeypatch.setattr(update, "_check_lock_dir", check_then_signal)
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            if json_mode:
                outcome.append(atomic_json_update(target, lambda d: d, timeout=TIMEOUT))
            else:
                outcome.append(atomic_update(target, lambda t: t, timeout=TIMEOUT))
        except BaseException as exc:  # inspected below
            outcome.append(exc)

    holder = DirectoryLocker(update_lock_dir(target))
    assert holder.acquire_exclusive_lock(timeout=5)
    thread = threading.Thread(target=run)
    try:
        thread.start()
        assert waiting.wait(TIMEOUT), "the update never reached the lock"
        target.unlink()
    finally:
        holder.release_lock()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], FileNotFoundError)
    assert outcome[0].filename == str(target)
    assert not target.exists()
    assert_clean(target)


if sys.platform != "win32":  # os.fork, os.waitpid

    @posix_only
    def test_a_child_forked_inside_fn_waits_for_the_parents_lock(tmp_path: Path) -> None:
        target = tmp_path / "state.json"
        target.write_text('{"n": 0}\n')
        statuses: list[int] = []

        def fork_inside(doc: dict[str, int]) -> dict[str, int]:
            pid = os.fork()
            if pid == 0:  # the child: the lock is its parent's, not its own
                code = 3
                try:
                    atomic_json_update(target, lambda d: d, timeout=0)
                except LockTimeout:
                    code = 0
                except RuntimeError:
                    code = 1  # took itself for the holder
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            statuses.append(os.waitstatus_to_exitcode(status))
            return {"n": doc["n"] + 1}

        atomic_json_update(target, fork_inside)
        assert statuses == [0]
        assert json.loads(target.read_text()) == {"n": 1}
        assert_clean(target)


def test_cleanup_leaves_the_lock_directory_alone(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_json_update(target, lambda d: {"n": 1}, default=dict)
    assert htmlgraph.cleanup_orphaned_temp_files(tmp_path, age_hours=0) == 0
    assert list(htmlgraph.find_orphaned_temp_files(tmp_path, age_hours=0)) == []
    assert_clean(target)
    assert atomic_json_update(target, lambda d: {"n": d["n"] + 1}) == {"n": 2}


def test_threads_lose_no_update(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(15):
                atomic_json_update(
                    target, lambda d: {**d, "n": d.get("n", 0) + 1}, default=dict, durable=False
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert json.loads(target.read_text()) == {"n": 90}
    assert_clean(target)


# --------------------------------------------------------------------------
# Property: raising, returning None and a missing file, in any order
# --------------------------------------------------------------------------

_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.text(max_size=5)),
        st.tuples(st.just("none"), st.just("")),
        st.tuples(st.just("raise"), st.just("")),
        st.tuples(st.just("delete"), st.just("")),
        st.tuples(st.just("no-default"), st.text(max_size=5)),
    ),
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=_STEPS)
def test_property_matches_a_model(tmp_path: Path, steps: list[tuple[str, str]]) -> None:
    target = tmp_path / "model.txt"
    if target.exists():
        target.unlink()
    model: str | None = None  # None: the file does not exist
    for action, text in steps:
        add = _appender(text)
        if action == "delete":
            if target.exists():
                target.unlink()
            model = None
            continue
        if action == "no-default":
            if model is None:
                with pytest.raises(FileNotFoundError):
                    atomic_update(target, add, durable=False)
            else:
                atomic_update(target, add, durable=False)
                model += text
        elif action == "append":
            assert atomic_update(target, add, default="", durable=False) == ((model or "") + text)
            model = (model or "") + text
        elif action == "none":
            assert atomic_update(target, lambda t: None, default="", durable=False) is None
        else:
            with pytest.raises(Boom):
                atomic_update(target, _raise_boom, default="", durable=False)
        if model is None:
            assert not target.exists()
        else:
            assert target.read_bytes() == model.encode()
        assert set(listing(tmp_path)) <= {target.name, lock_of(target)}
        assert (
            listing(tmp_path / lock_of(target)) == []
            if (tmp_path / lock_of(target)).exists()
            else True
        )


def _appender(suffix: str) -> Callable[[str], str]:
    return lambda text: text + suffix


def _raise_boom(text: str) -> str:
    raise Boom(text)


# --------------------------------------------------------------------------
# Real processes: no lost update (and the negative control)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx() -> BaseContext:
    return cheap_context("_updatehelpers")


def _run_incrementers(
    ctx: BaseContext,
    reap: list[BaseProcess],
    target: Callable[..., None],
    path: Path,
    procs: int,
    count: int,
    pause: float,
    durable: bool,
) -> int:
    """Run ``procs`` processes of ``target`` together; return the final counter."""
    path.write_text('{"n": 0}\n')
    barrier = ctx.Barrier(procs)
    workers = [
        new_process(ctx, target, str(path), count, barrier, pause, durable) for _ in range(procs)
    ]
    reap.extend(workers)
    for w in workers:
        w.start()
    for w in workers:
        w.join(JOIN_TIMEOUT)
    assert [w.exitcode for w in workers] == [0] * procs
    value: int = json.loads(path.read_text())["n"]
    return value


def test_processes_lose_no_update(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess]
) -> None:
    target = tmp_path / "state.json"
    total = _run_incrementers(
        ctx, reap, _updatehelpers.increment, target, procs=6, count=20, pause=0.001, durable=False
    )
    assert total == 6 * 20
    assert_clean(target)


def test_negative_control_read_and_atomic_write_alone_lose_updates(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess]
) -> None:
    # The same loop, the same pause between read and write, every write
    # atomic - but no lock. If this did not lose updates, the test above
    # would prove nothing.
    target = tmp_path / "state.json"
    total = _run_incrementers(
        ctx,
        reap,
        _updatehelpers.increment_unlocked,
        target,
        procs=6,
        count=20,
        pause=0.001,
        durable=False,
    )
    assert total < 6 * 20
    assert listing(tmp_path) == ["state.json"]


@pytest.mark.slow
def test_16_processes_50_durable_increments_each_end_at_800(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess]
) -> None:
    target = tmp_path / "state.json"
    total = _run_incrementers(
        ctx, reap, _updatehelpers.increment, target, procs=16, count=50, pause=0.0, durable=True
    )
    assert total == 800
    assert_clean(target)


@posix_only
def test_a_holder_killed_mid_update_never_blocks_the_next(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess]
) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("old\n")
    parent_end, child_end = ctx.Pipe()
    holder = new_process(ctx, _updatehelpers.hold_update, str(target), child_end)
    reap.append(holder)
    holder.start()
    assert parent_end.poll(TIMEOUT), "the holder never entered fn"
    assert parent_end.recv() == "in"
    assert not lock_is_free(target)
    os.kill(holder.pid, SIGKILL)  # type: ignore[arg-type]
    holder.join(TIMEOUT)
    assert holder.exitcode == -SIGKILL
    assert atomic_update(target, lambda t: t + "new\n", timeout=30) == "old\nnew\n"
    assert target.read_text() == "old\nnew\n"
    assert_clean(target)


@pytest.mark.slow
@posix_only
def test_updaters_killed_at_random_instants_leave_valid_json_and_every_commit(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess]
) -> None:
    import random

    target = tmp_path / "state.json"
    log = tmp_path / "commits.log"
    rng = random.Random(17)
    kills = 0
    for _ in range(40):
        workers = [
            new_process(ctx, _updatehelpers.increment_forever, str(target), str(log), True)
            for _ in range(3)
        ]
        reap.extend(workers)
        for w in workers:
            w.start()
        time.sleep(rng.uniform(0.05, 0.4))
        for w in workers:
            os.kill(w.pid, SIGKILL)  # type: ignore[arg-type]
            kills += 1
        for w in workers:
            w.join(TIMEOUT)
            assert w.exitcode == -SIGKILL
        committed = log.read_text().count("+") if log.exists() else 0
        value = json.loads(target.read_text())["n"] if target.exists() else 0
        # Every logged commit is in the file; at most one per kill is in the
        # file but not yet logged (killed between the commit and the log line).
        assert committed <= value <= committed + kills
    assert value > 0
    htmlgraph.cleanup_orphaned_temp_files(tmp_path, age_hours=0)
    assert set(listing(tmp_path)) == {"state.json", "commits.log", lock_of(target)}
    assert atomic_json_update(target, lambda d: d, timeout=30) is not None  # the lock is free


# --------------------------------------------------------------------------
# The command line: htmlgraph update
# --------------------------------------------------------------------------


def _env() -> dict[str, str]:
    paths = [SRC, TESTS]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "htmlgraph", *args]


def run_update(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        _cli("update", *args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=_env(),
        timeout=timeout,
        check=False,
    )


PY = sys.executable


def test_cli_update_runs_the_filter_on_the_content(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    inc = _updatehelpers.INCREMENT_FILTER
    result = run_update(str(target), "--json", "--default", "{}", "--", PY, "-c", inc)
    assert result.returncode == 0, result.stderr
    result = run_update(str(target), "--json", "--", PY, "-c", inc)
    assert result.returncode == 0, result.stderr
    assert json.loads(target.read_text()) == {"runs": 2}
    assert result.stdout == b""
    # Plain text: CMD's stdout replaces the file byte for byte.
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"a\n")
    script = "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read() + b'b\\xff\\n')"
    result = run_update(str(notes), "--", PY, "-c", script)
    assert result.returncode == 0, result.stderr
    assert notes.read_bytes() == b"a\nb\xff\n"
    assert_clean(target, notes.name, lock_of(notes))


def test_cli_update_missing_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    result = run_update(str(target), "--", PY, "-c", "print('x')")
    assert result.returncode == 1
    assert b"does not exist" in result.stderr
    assert str(target).encode() in result.stderr
    assert not target.exists()
    result = run_update(str(tmp_path / "no" / "dir" / "f"), "--", PY, "-c", "print('x')")
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert set(listing(tmp_path)) <= {lock_of(target)}


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ("import sys; print('partial'); sys.exit(3)", 3),
        (
            "import os, signal; print('partial', flush=True); os.kill(os.getpid(), signal.SIGTERM)",
            143,
        ),
    ],
)
def test_cli_update_failing_command_leaves_the_file(
    tmp_path: Path, script: str, status: int
) -> None:
    if status == 143 and not POSIX:
        pytest.skip("POSIX signals")
    target = tmp_path / "state.json"
    target.write_text('{"runs": 1}\n')
    result = run_update(str(target), "--json", "--", PY, "-c", script)
    assert result.returncode == status
    assert b"left untouched" in result.stderr
    assert target.read_text() == '{"runs": 1}\n'
    assert_clean(target)


def test_cli_update_json_output_must_be_json(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text('{"runs": 1}\n')
    result = run_update(str(target), "--json", "--", PY, "-c", "print('{\"runs\": 2')")
    assert result.returncode == 1
    assert b"not valid JSON" in result.stderr
    assert b"left untouched" in result.stderr
    assert target.read_text() == '{"runs": 1}\n'
    result = run_update(str(target), "--json", "--default", "{", "--", PY, "-c", "")
    assert result.returncode == 1
    assert b"--default is not valid JSON" in result.stderr
    assert_clean(target)


def test_cli_update_command_not_found_or_usage(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("x")
    result = run_update(str(target), "--", "htmlgraph-no-such-command-xyz")
    assert result.returncode == 127
    assert target.read_text() == "x"
    result = run_update(str(target))
    assert result.returncode == 2
    assert b"no command given" in result.stderr
    assert_clean(target)


def test_cli_update_timeout_exits_75(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("{}\n")
    with DirectoryLocker(update_lock_dir(target)).exclusive(timeout=5):
        for wait in ("0", "0.2"):
            result = run_update(str(target), "--timeout", wait, "--", PY, "-c", "print(1)")
            assert result.returncode == 75
            assert b"timed out" in result.stderr
            assert b"Traceback" not in result.stderr
    assert target.read_text() == "{}\n"
    assert_clean(target)


@posix_only
def test_cli_update_forwards_sigterm_and_leaves_the_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("{}\n")
    ready = tmp_path / "ready"
    # The filter reads its input, reports in, then waits to be signalled.
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        def handler(signum, frame):
            sys.exit(100 + signum)
        signal.signal(signal.SIGTERM, handler)
        sys.stdin.read()
        open({str(ready)!r}, "w").close()
        print("{{}}")
        time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        _cli("update", str(target), "--", PY, "-c", script),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, "the filter", TIMEOUT)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert not lock_is_free(target)
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 100 + signal.SIGTERM  # the filter got it: its status
    assert target.read_text() == "{}\n"
    assert_clean(target, "ready")


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux: SigCgt in /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


@linux_only
def test_cli_update_terminated_while_waiting_for_the_lock(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("{}\n")
    ran = tmp_path / "ran"
    holder = DirectoryLocker(update_lock_dir(target))
    assert holder.acquire_exclusive_lock(timeout=5)
    try:
        proc = subprocess.Popen(
            _cli("update", str(target), "--", PY, "-c", f"open({str(ran)!r}, 'w')"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        try:
            # Its handler is installed just before it starts waiting for the
            # lock, which it cannot get while the holder has it.
            wait_for(
                lambda: proc.poll() is not None or _catches(proc.pid, signal.SIGTERM),
                "update to get ready",
                TIMEOUT,
            )
            assert proc.poll() is None
            time.sleep(0.2)  # most likely in the lock's wait loop by now (either way: 143)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert b"Traceback" not in err
        assert len(listing(tmp_path / lock_of(target))) == 1  # the holder's marker only
    finally:
        holder.release_lock()
    assert not ran.exists()  # CMD never ran
    assert target.read_text() == "{}\n"
    assert_clean(target)


@linux_only
def test_cli_update_killed_takes_its_command_along(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("{}\n")
    pid_file = tmp_path / "filter.pid"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.stdin.read()
        with open({str(pid_file)!r} + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
        time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        _cli("update", str(target), "--", PY, "-c", script),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        wait_for(pid_file.exists, "the filter to start", TIMEOUT)
        proc.kill()
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
    child = int(pid_file.read_text())
    wait_for(
        lambda: not os.path.exists(f"/proc/{child}") or _zombie(child),
        "the filter to die with its killed parent",
        TIMEOUT,
    )
    # The dead updater's marker is stale: the next update goes through.
    assert atomic_json_update(target, lambda d: {"n": 1}, timeout=30) == {"n": 1}
    assert_clean(target, "filter.pid")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return True
    return data[data.rfind(b")") + 2 :].startswith(b"Z")


def _concurrent_cli_appends(tmp_path: Path, count: int) -> None:
    target = tmp_path / "items.json"
    procs = [
        subprocess.Popen(
            _cli(
                "update",
                str(target),
                "--json",
                "--default",
                '{"items": []}',
                "--no-fsync",
                "--",
                PY,
                "-c",
                _updatehelpers.APPEND_FILTER,
                f"item-{i}",
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        for i in range(count)
    ]
    failures = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=JOIN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)
        if proc.returncode != 0:
            failures.append((proc.returncode, err))
    assert failures == []
    items = json.loads(target.read_text())["items"]
    assert sorted(items) == sorted(f"item-{i}" for i in range(count))  # none lost, none twice
    assert_clean(target)


def test_cli_concurrent_updates_lose_nothing(tmp_path: Path) -> None:
    _concurrent_cli_appends(tmp_path, 10)


@pytest.mark.slow
def test_cli_60_concurrent_updates_lose_nothing(tmp_path: Path) -> None:
    _concurrent_cli_appends(tmp_path, 60)


def test_module_exports() -> None:
    assert htmlgraph.atomic_update is update.atomic_update
    assert htmlgraph.atomic_json_update is update.atomic_json_update
    for name in update.__all__:
        assert getattr(update, name) is not None


def test_dot_dot_after_a_symlinked_directory_locks_the_file_the_write_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "l/../state.json" is real/state.json to the kernel: the lock must be
    # beside that file, where every other spelling of it locks too.
    real = tmp_path / "real" / "sub"
    real.mkdir(parents=True)
    (tmp_path / "l").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    atomic_json_update("l/../state.json", lambda d: {"n": d.get("n", 0) + 1}, default=dict)
    atomic_json_update(tmp_path / "real" / "state.json", lambda d: {"n": d["n"] + 1})
    assert json.loads((tmp_path / "real" / "state.json").read_text()) == {"n": 2}
    assert sorted(os.listdir(tmp_path)) == ["l", "real"]
    assert sorted(os.listdir(tmp_path / "real")) == [
        ".state.json.htmlgraph-lock",
        "state.json",
        "sub",
    ]


@pytest.mark.parametrize("told", [0, 3, 9_999])
def test_a_file_that_grew_after_its_fstat_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, told: int
) -> None:
    # _read trusts a short read as the end (regular files), and reads on when
    # the first read filled the size fstat gave plus one byte: the file grew.
    content = b"0123456789" * 1000
    target = tmp_path / "f.txt"
    target.write_bytes(content)
    real_fstat = os.fstat

    def stale(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        fields = list(st[:10])
        fields[stat.ST_SIZE] = told  # the size before the file grew
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", stale)
    assert update._read(str(target)) == content
