"""The write path's economies keep the promises.

Sliced text encoding, mode fixing, batched temp-name tokens.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from htmlgraph import atomic_ops
from htmlgraph.atomic_ops import atomic_json_write, atomic_write

if sys.platform == "win32":
    pytest.skip("POSIX modes and umask", allow_module_level=True)

BIG = atomic_ops._ENCODE_SLICE * 2 + 12345  # three slices, the last one partial


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield None
    finally:
        os.umask(old)


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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: None, existing: int, expect_fchmod: bool
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


def test_json_is_written_with_its_newline_and_no_copy(tmp_path: Path) -> None:
    chunks: list[bytes] = []
    real_write_all = atomic_ops._write_all

    def spy(fd: int, data: bytes) -> None:
        chunks.append(bytes(data))
        real_write_all(fd, data)

    target = tmp_path / "d.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atomic_ops, "_write_all", spy)
        atomic_json_write(target, {"k": ["v", 1]}, indent=None)
    assert chunks == [b'{"k": ["v", 1]}', b"\n"]
    assert target.read_bytes() == b'{"k": ["v", 1]}\n'


def test_lone_surrogate_in_json_fails_before_the_disk(tmp_path: Path) -> None:
    with pytest.raises(UnicodeEncodeError):
        atomic_json_write(tmp_path / "sub" / "d.json", {"k": "\ud800"})
    assert os.listdir(tmp_path) == []


def test_temp_tokens_are_unique_hex_across_many_batches() -> None:
    tokens = [atomic_ops._random_token() for _ in range(atomic_ops._TOKEN_BATCH * 300)]
    assert len(set(tokens)) == len(tokens)
    assert all(re.fullmatch(r"[0-9a-f]{16}", t) for t in tokens)
    assert re.fullmatch(r"[0-9a-f]{32}", atomic_ops._random_token(16))


def test_threads_never_share_a_temp_token() -> None:
    drawn: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(len(drawn))

    def draw(out: list[str]) -> None:
        start.wait()
        out.extend(atomic_ops._random_token() for _ in range(5000))

    threads = [threading.Thread(target=draw, args=(out,)) for out in drawn]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [t for out in drawn for t in out]
    assert len(every) == 8 * 5000
    assert len(set(every)) == len(every)


def _draw_tokens(queue: multiprocessing.Queue[list[str]], n: int) -> None:
    queue.put([atomic_ops._random_token() for _ in range(n)])


def test_forked_child_does_not_inherit_unused_temp_tokens() -> None:
    atomic_ops._tokens.clear()
    atomic_ops._random_token()  # a fresh batch, one token used: the rest wait in the pool
    left = len(atomic_ops._tokens)
    assert left == atomic_ops._TOKEN_BATCH - 1
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = ctx.Queue()
    child = ctx.Process(target=_draw_tokens, args=(queue, left))
    child.start()
    in_child = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    in_parent = [atomic_ops._random_token() for _ in range(left)]
    assert not set(in_child) & set(in_parent), "the child reused the parent's pool"
