"""The write path's economies keep the promises.

Sliced text encoding, the mode of the temp, JSON without a copy.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from htmlgraph import atomic_ops
from htmlgraph.atomic_ops import atomic_json_write, atomic_write

if sys.platform == "win32":
    pytest.skip("POSIX modes and umask", allow_module_level=True)

BIG = atomic_ops._ENCODE_SLICE * 2 + 12345  # three slices, the last one partial


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "latin-1"])
def test_large_text_is_encoded_in_slices_and_round_trips(tmp_path: Path, encoding: str) -> None:
    euro = "€" if encoding != "latin-1" else ""
    text = "é\n" * (BIG // 2) + euro
    target = tmp_path / "big.txt"
    atomic_write(target, text, encoding=encoding, durable=False)
    assert target.read_bytes() == text.encode(encoding)  # one BOM at most, in front
    assert sorted(os.listdir(tmp_path)) == ["big.txt"]


def test_large_text_encoding_error_mid_way_leaves_old_content(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old")
    text = "a" * (BIG - 1) + "é"  # fails in the last slice, after two were written
    written: list[int] = []
    real_write_all = atomic_ops._write_all

    def spy(fd: int, data: bytes) -> None:
        written.append(len(data))
        real_write_all(fd, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atomic_ops, "_write_all", spy)
        with pytest.raises(UnicodeEncodeError):
            atomic_write(target, text, encoding="ascii")
    assert len(written) == 2, "the error came after slices were already written"
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["t.txt"]


def test_unknown_codec_for_large_text_touches_nothing(tmp_path: Path) -> None:
    with pytest.raises(LookupError):
        atomic_write(tmp_path / "new" / "t.txt", "x" * BIG, encoding="no-such-codec")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("existing", "expect_fchmod"),
    [
        (0o644, False),  # the umask keeps every bit: created right, no fchmod
        (0o600, False),
        (0o666, True),  # the umask removes group/other write: fixed by fchmod
        (0o664, True),
    ],
)
def test_existing_mode_is_kept_with_fchmod_only_when_needed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    umask: object,
    existing: int,
    expect_fchmod: bool,
) -> None:
    target = tmp_path / "t"
    target.write_text("old")
    os.chmod(target, existing)
    calls: list[int] = []
    real = os.fchmod

    def spy(fd: int, mode: int) -> None:
        calls.append(mode)
        real(fd, mode)

    monkeypatch.setattr(os, "fchmod", spy)
    atomic_write(target, "new")
    assert stat.S_IMODE(target.stat().st_mode) == existing
    assert calls == ([existing] if expect_fchmod else [])
    assert target.read_text() == "new"


def test_json_is_written_with_its_newline_in_one_write(tmp_path: Path) -> None:
    chunks: list[bytes] = []
    real_write_all = atomic_ops._write_all

    def spy(fd: int, data: bytes) -> None:
        chunks.append(bytes(data))
        real_write_all(fd, data)

    target = tmp_path / "d.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atomic_ops, "_write_all", spy)
        atomic_json_write(target, {"k": ["v", 1]}, indent=None)
    assert chunks == [b'{"k": ["v", 1]}\n']
    assert target.read_bytes() == b'{"k": ["v", 1]}\n'


def test_lone_surrogate_in_json_fails_before_the_disk(tmp_path: Path) -> None:
    with pytest.raises(UnicodeEncodeError):
        atomic_json_write(tmp_path / "sub" / "d.json", {"k": "\ud800"})
    assert os.listdir(tmp_path) == []
