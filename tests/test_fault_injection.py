"""Fault injection through atomic_ops' own seams: every fault is asserted hit.

Each test replaces one seam (``_fsync``, ``_replace``, ``_fsync_dir``,
``tempfile.mkstemp``) through the module, runs a write, and checks the documented
outcome on the real disk: the target holds the old content or the new one,
and the directory holds nothing else.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from htmlgraph import _platform, atomic_ops
from htmlgraph.atomic_ops import AtomicFileWriter, atomic_json_write, atomic_rename, atomic_write


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


class Fault:
    """A seam replacement that raises ``exc`` on chosen calls and counts its calls."""

    def __init__(self, real: Callable[..., object], exc: BaseException, on_calls: set[int]) -> None:
        self.real = real
        self.exc = exc
        self.on_calls = on_calls
        self.calls = 0
        self.raised = 0

    def __call__(self, *args: object) -> object:
        self.calls += 1
        if self.calls in self.on_calls:
            self.raised += 1
            raise self.exc
        return self.real(*args)


WRITERS: dict[str, Callable[[Path, str], None]] = {
    "atomic_write": lambda p, text: atomic_write(p, text),
    "atomic_json_write": lambda p, text: atomic_json_write(p, text),
    "context_manager": lambda p, text: _cm_write(p, text),
}


def _cm_write(path: Path, text: str) -> None:
    with AtomicFileWriter(path) as f:
        f.write(text)


def _content(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_file_fsync_eio_leaves_old_content_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old", encoding="utf-8")
    fault = Fault(atomic_ops._fsync, OSError(errno.EIO, "Input/output error"), {1})
    monkeypatch.setattr(atomic_ops, "_fsync", fault)
    with pytest.raises(OSError, match="Input/output") as info:
        WRITERS[writer](target, "new")
    assert info.value.errno == errno.EIO
    assert info.value.filename == str(target), "the error names the file being written"
    assert fault.raised == 1
    assert fault.calls == 1, "a failed fsync must never be retried"
    assert _content(target) == "old"
    assert listing(tmp_path) == ["t.txt"]


def test_failed_fsync_never_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "t.txt"
    fault = Fault(atomic_ops._fsync, OSError(errno.EIO, "Input/output error"), {1})
    renames: list[tuple[str, str]] = []
    monkeypatch.setattr(atomic_ops, "_fsync", fault)
    monkeypatch.setattr(atomic_ops, "_replace", lambda a, b: renames.append((a, b)))
    with pytest.raises(OSError, match="Input/output"):
        atomic_write(target, "new")
    assert fault.raised == 1
    assert renames == []
    assert listing(tmp_path) == []


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_replace_permission_error_leaves_old_content_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old", encoding="utf-8")
    fault = Fault(atomic_ops._replace, PermissionError(errno.EACCES, "denied"), {1})
    monkeypatch.setattr(atomic_ops, "_replace", fault)
    with pytest.raises(PermissionError):
        WRITERS[writer](target, "new")
    assert fault.raised == 1
    assert _content(target) == "old"
    assert listing(tmp_path) == ["t.txt"]


def test_dir_fsync_einval_is_treated_as_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old", encoding="utf-8")
    # The tolerance lives in the one directory-fsync function, under the seam:
    # fsync_dir syncs through _platform.fsync_file (the data fsync of the write
    # was bound at import and is not affected).
    fault = Fault(_platform.fsync_file, OSError(errno.EINVAL, "Invalid argument"), {1})
    monkeypatch.setattr(_platform, "fsync_file", fault)
    atomic_write(target, "new")
    assert fault.raised == 1
    assert _content(target) == "new"
    assert listing(tmp_path) == ["t.txt"]


def test_dir_fsync_eio_raises_after_the_new_content_is_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old", encoding="utf-8")
    fault = Fault(atomic_ops._fsync_dir, OSError(errno.EIO, "Input/output error"), {1})
    unlinked: list[str] = []
    real_unlink = os.unlink

    def spy_unlink(path: str) -> None:
        unlinked.append(path)
        real_unlink(path)

    monkeypatch.setattr(atomic_ops, "_fsync_dir", fault)
    monkeypatch.setattr(os, "unlink", spy_unlink)
    with pytest.raises(OSError, match="Input/output") as info:
        atomic_write(target, "new")
    assert info.value.errno == errno.EIO
    assert fault.raised == 1
    # The rename happened: the new content is visible, durability unknown.
    assert _content(target) == "new"
    assert listing(tmp_path) == ["t.txt"]
    assert unlinked == [], "nothing may be unlinked after a successful replace"


def test_keyboard_interrupt_at_fsync_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old", encoding="utf-8")
    fault = Fault(atomic_ops._fsync, KeyboardInterrupt(), {1})
    monkeypatch.setattr(atomic_ops, "_fsync", fault)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, "new")
    assert fault.raised == 1
    assert _content(target) == "old"
    assert listing(tmp_path) == ["t.txt"]


def test_durable_false_never_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(atomic_ops, "_fsync", calls.append)
    monkeypatch.setattr(atomic_ops, "_fsync_dir", calls.append)
    atomic_write(tmp_path / "a", "x", durable=False)
    with AtomicFileWriter(tmp_path / "b", durable=False) as f:
        f.write("y")
    atomic_rename(tmp_path / "b", tmp_path / "c", durable=False)
    assert calls == []
    assert listing(tmp_path) == ["a", "c"]


def test_durable_write_syncs_file_then_each_created_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_dir, real_replace = (
        atomic_ops._fsync,
        atomic_ops._fsync_dir,
        atomic_ops._replace,
    )

    def fsync(fd: int) -> None:
        events.append("fsync-file")
        real_fsync(fd)

    def fsync_dir(path: str) -> None:
        events.append(f"fsync-dir:{os.path.relpath(path, tmp_path)}")
        real_dir(path)

    def replace(src: str, dst: str) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_ops, "_fsync", fsync)
    monkeypatch.setattr(atomic_ops, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(atomic_ops, "_replace", replace)
    atomic_write(tmp_path / "a" / "b" / "t.txt", "x")
    assert events == [
        "fsync-file",
        "replace",
        "fsync-dir:a/b",  # the new file's entry
        "fsync-dir:a",  # b's entry
        "fsync-dir:.",  # a's entry
    ]
    assert _content(tmp_path / "a" / "b" / "t.txt") == "x"


def test_create_only_race_link_fails_when_target_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "t.txt"
    real_link = os.link
    links: list[str] = []

    def racing_link(src: str, dst: str) -> None:
        links.append(dst)
        Path(dst).write_text("the other process", encoding="utf-8")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    with pytest.raises(FileExistsError):
        atomic_write(target, "mine", overwrite=False)
    assert links == [str(target)]
    assert _content(target) == "the other process"
    assert listing(tmp_path) == ["t.txt"]


def test_write_error_mid_stream_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    real_write = os.write
    calls = 0

    def failing_write(fd: int, data: object) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, memoryview(data)[:3])  # type: ignore[arg-type]  # short writes

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError, match="No space") as info:
        atomic_write(target, b"abcdefgh")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)
    assert calls == 2
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["t.bin"]


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = 0

    def short_write(fd: int, data: object) -> int:
        nonlocal calls
        calls += 1
        return real_write(fd, memoryview(data)[:5])  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", short_write)
    payload = bytes(range(256)) * 4
    atomic_write(tmp_path / "t.bin", payload)
    assert calls == -(-len(payload) // 5)
    assert (tmp_path / "t.bin").read_bytes() == payload
