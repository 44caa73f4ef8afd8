"""AtomicBatch, recover and read_snapshot: every promise and every bad input.

After each scenario the whole tree is checked (old or new content, nothing
else), and so is the library's hidden directory (nothing but the empty lock
directory once a batch is over).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import htmlgraph
from crashlab import batchchild
from crashlab.batchchild import (
    CRASH_EXIT,
    NEW_TREE,
    OLD_TREE,
    WriterGone,
    crash_standard_batch,
    library_leftovers,
    make_old,
    run_standard_batch,
    tree,
    writer_gone_after_commit,
)
from crashlab.procs import start_process
from htmlgraph import (
    AtomicBatch,
    DirectoryLocker,
    _platform,
    atomic_json_write,
    atomic_write,
    cli,
    read_snapshot,
    recover,
)
from htmlgraph import batch as batch_mod
from htmlgraph.batch import HIDDEN_DIR, RecoveryReport
from htmlgraph.update import update_lock_dir

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and symlinks")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    return site


def test_exports() -> None:
    assert htmlgraph.AtomicBatch is batch_mod.AtomicBatch
    assert htmlgraph.recover is batch_mod.recover
    assert htmlgraph.read_snapshot is batch_mod.read_snapshot


@pytest.mark.parametrize("as_path", [False, True])
def test_commit_applies_everything(root: Path, as_path: bool) -> None:
    make_old(root)
    run_standard_batch(str(root) if not as_path else root)  # type: ignore[arg-type]
    assert tree(root) == NEW_TREE
    assert library_leftovers(root) == []


def test_write_json_matches_atomic_json_write(root: Path, tmp_path: Path) -> None:
    data = {"b": [1, 2.5, None, "é"], "a": {"x": True}}
    with AtomicBatch(root) as batch:
        batch.write_json("one.json", data)
        batch.write_json("two.json", data, indent=None, sort_keys=True)
    atomic_json_write(tmp_path / "ref1.json", data)
    atomic_json_write(tmp_path / "ref2.json", data, indent=None, sort_keys=True)
    assert (root / "one.json").read_bytes() == (tmp_path / "ref1.json").read_bytes()
    assert (root / "two.json").read_bytes() == (tmp_path / "ref2.json").read_bytes()


def test_text_and_streams(root: Path) -> None:
    with AtomicBatch(root) as batch:
        batch.write("latin.txt", "café", encoding="latin-1")
        with batch.open("text.txt", "w", encoding="utf-16") as f:
            f.write("ĥello\n")
        with batch.open("big.bin") as g:
            for i in range(64):
                g.write(bytes([i]) * 65536)
    assert (root / "latin.txt").read_bytes() == "café".encode("latin-1")
    assert (root / "text.txt").read_bytes() == "ĥello\n".encode("utf-16")
    assert (root / "big.bin").read_bytes() == b"".join(bytes([i]) * 65536 for i in range(64))


def test_exception_in_block_changes_nothing(root: Path) -> None:
    make_old(root)

    def fail_in_block() -> None:
        with AtomicBatch(root) as batch:
            batch.write("nodes/a.html", "new")
            batch.delete("nodes/gone.html")
            with batch.open("new/x.bin") as f:
                f.write(b"x")
            raise KeyError("boom")

    with pytest.raises(KeyError):
        fail_in_block()
    assert tree(root) == OLD_TREE
    assert library_leftovers(root) == []
    assert not (root / "new").exists()


def test_discard_and_state_errors(root: Path) -> None:
    make_old(root)
    batch = AtomicBatch(root)
    batch.write("nodes/a.html", "never")
    batch.discard()
    batch.discard()  # idempotent
    assert tree(root) == OLD_TREE
    assert library_leftovers(root) == []
    with pytest.raises(RuntimeError, match="discarded"):
        batch.commit()
    with pytest.raises(RuntimeError, match="discarded"):
        batch.write("x", "y")
    done = AtomicBatch(root)
    done.write("x.txt", "y")
    done.commit()
    done.discard()  # a no-op after commit
    assert (root / "x.txt").read_bytes() == b"y"
    with pytest.raises(RuntimeError, match="committed"):
        done.commit()
    assert "committed" in repr(done)


def test_empty_batch_is_a_no_op(root: Path) -> None:
    with AtomicBatch(root) as batch:
        batch.delete("nothing.txt", missing_ok=True)
    assert tree(root) == {}
    assert library_leftovers(root) == []


def test_stream_left_open_refuses_commit(root: Path) -> None:
    batch = AtomicBatch(root)
    stream = batch.open("a.bin")
    stream.write(b"half")
    with pytest.raises(RuntimeError, match="close the stream"):
        batch.commit()
    stream.close()
    batch.commit()
    assert tree(root) == {"a.bin": b"half"}


def test_garbage_collected_batch_leaves_no_staging(root: Path) -> None:
    batch = AtomicBatch(root)
    batch.write("a.txt", "x")
    del batch
    import gc

    gc.collect()
    assert library_leftovers(root) == []
    assert tree(root) == {}


@posix_only
def test_modes(root: Path, umask: object) -> None:
    (root / "keep.sh").write_text("old")
    (root / "keep.sh").chmod(0o751)
    with AtomicBatch(root) as batch:
        batch.write("keep.sh", "new")
        batch.write("fresh.txt", "new")
        batch.write("forced.txt", "new", permissions=0o600)
    assert stat.S_IMODE((root / "keep.sh").stat().st_mode) == 0o751
    assert stat.S_IMODE((root / "fresh.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "forced.txt").stat().st_mode) == 0o600


@posix_only
def test_symlinks_inside_root(root: Path) -> None:
    (root / "real").mkdir()
    (root / "real" / "f.txt").write_text("old")
    (root / "alias").symlink_to("real")
    (root / "link.txt").symlink_to("real/f.txt")
    (root / "dead.txt").symlink_to("real/g.txt")
    with AtomicBatch(root) as batch:
        batch.write("link.txt", "through the link")
    assert (root / "link.txt").is_symlink()
    assert (root / "real" / "f.txt").read_text() == "through the link"
    with AtomicBatch(root) as batch:
        batch.delete("dead.txt")  # a symlink is deleted itself, never followed
        batch.write("alias/h.txt", "via a directory link")
    assert not os.path.lexists(root / "dead.txt")
    assert (root / "real" / "h.txt").read_text() == "via a directory link"
    assert (root / "real" / "f.txt").read_text() == "through the link"


# --------------------------------------------------------------------------
# Bad input: a clear error before anything is written.
# --------------------------------------------------------------------------


def _bad_inputs(root: Path, outside: Path) -> dict[str, tuple[type[BaseException], str, object]]:
    cases: dict[str, tuple[type[BaseException], str, object]] = {
        "absolute": (ValueError, "absolute", lambda b: b.write(str(outside / "x"), "x")),
        "dotdot": (ValueError, r"'\.\.'", lambda b: b.write("nodes/../../x", "x")),
        "dotdot-delete": (ValueError, r"'\.\.'", lambda b: b.delete("../x")),
        "empty": (ValueError, "empty", lambda b: b.write("", "x")),
        "root-itself": (ValueError, "root itself", lambda b: b.write("./.", "x")),
        "nul": (ValueError, "NUL", lambda b: b.write("a\0b", "x")),
        "bytes-path": (TypeError, "bytes", lambda b: b.write(b"a", "x")),
        "int-path": (TypeError, "str or os.PathLike", lambda b: b.write(3, "x")),
        "names-directory": (IsADirectoryError, "directory", lambda b: b.write("nodes", "x")),
        "delete-directory": (IsADirectoryError, "directory", lambda b: b.delete("nodes")),
        "trailing-slash": (IsADirectoryError, "separator", lambda b: b.write("new/", "x")),
        "parent-is-file": (
            NotADirectoryError,
            "is a file",
            lambda b: b.write("nodes/a.html/x", "x"),
        ),
        "twice": (ValueError, "twice", lambda b: (b.write("t.txt", "1"), b.write("t.txt", "2"))),
        "twice-normalised": (
            ValueError,
            "twice",
            lambda b: (b.write("nodes/t.txt", "1"), b.delete("./nodes//t.txt", missing_ok=True)),
        ),
        "file-then-under-it": (
            ValueError,
            "under",
            lambda b: (b.write("p", "1"), b.write("p/q", "2")),
        ),
        "under-then-file": (
            ValueError,
            "directory of another",
            lambda b: (b.write("p/q", "1"), b.write("p", "2")),
        ),
        "hidden-dir": (ValueError, HIDDEN_DIR, lambda b: b.write(f"{HIDDEN_DIR}/x", "x")),
        "delete-missing": (FileNotFoundError, "missing", lambda b: b.delete("nope.txt")),
        "content-type": (TypeError, "str or bytes", lambda b: b.write("c.txt", 3)),
        "json-nan": (ValueError, "JSON", lambda b: b.write_json("c.json", float("nan"))),
        "json-type": (TypeError, "JSON", lambda b: b.write_json("c.json", {1, 2})),
        "permissions": (
            ValueError,
            "permissions",
            lambda b: b.write("c", "x", permissions=0o17777),
        ),
        "permissions-type": (
            TypeError,
            "permissions",
            lambda b: b.write("c", "x", permissions="644"),
        ),
        "open-mode": (ValueError, "mode", lambda b: b.open("c", "a")),
        "open-binary-encoding": (ValueError, "binary", lambda b: b.open("c", "wb", encoding="x")),
    }
    if sys.platform != "win32":
        (root / "out-dir").symlink_to(outside, target_is_directory=True)
        (root / "out-file").symlink_to(outside / "victim.txt")
        (root / "to-hidden").symlink_to(HIDDEN_DIR, target_is_directory=True)
        cases["escape-dir-link"] = (
            ValueError,
            "leaves the root",
            lambda b: b.write("out-dir/x", "x"),
        )
        cases["escape-file-link"] = (
            ValueError,
            "leaves the root",
            lambda b: b.write("out-file", "x"),
        )
        cases["escape-delete"] = (
            ValueError,
            "leaves the root",
            lambda b: b.delete("out-dir/victim.txt"),
        )
        cases["into-hidden-link"] = (
            ValueError,
            "library's own",
            lambda b: b.write("to-hidden/x", "x"),
        )
        cases["alias-twice"] = (
            ValueError,
            "twice",
            lambda b: (b.write("nodes/a.html", "1"), b.write("alias/a.html", "2")),
        )
        (root / "alias").symlink_to("nodes", target_is_directory=True)
    return cases


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        site = Path(scratch) / "site"
        site.mkdir()
        (site / "nodes").mkdir()
        (site / HIDDEN_DIR).mkdir()
        return sorted(_bad_inputs(site, Path(scratch) / "outside"))


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_is_refused_before_anything_is_written(
    root: Path, tmp_path: Path, case: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("outside")
    make_old(root)
    (root / HIDDEN_DIR).mkdir()
    exc_type, pattern, action = _bad_inputs(root, outside)[case]
    before = tree(root)
    batch = AtomicBatch(root)
    with pytest.raises(exc_type, match=pattern):
        action(batch)  # type: ignore[operator]
    batch.discard()
    assert tree(root) == before
    assert library_leftovers(root) == []
    assert (outside / "victim.txt").read_text() == "outside"
    assert sorted(os.listdir(outside)) == ["victim.txt"]


def test_a_refused_operation_leaves_the_batch_usable(root: Path) -> None:
    with AtomicBatch(root) as batch:
        batch.write("a.txt", "a")
        with pytest.raises(ValueError, match="twice"):
            batch.write("a.txt", "again")
        with pytest.raises(TypeError):
            batch.write("b.txt", 3)  # type: ignore[arg-type]
        batch.write("b.txt", "b")
    assert tree(root) == {"a.txt": b"a", "b.txt": b"b"}


def test_bad_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        AtomicBatch(tmp_path / "missing")
    assert info.value.filename == str(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        AtomicBatch(tmp_path / "file")
    with pytest.raises(FileNotFoundError):
        recover(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        read_snapshot(tmp_path / "missing", ["a"])
    with pytest.raises(TypeError):
        AtomicBatch(b"bytes")  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_target_turned_directory_before_commit_changes_nothing(root: Path) -> None:
    make_old(root)
    batch = AtomicBatch(root)
    batch.write("nodes/b.html", "new")
    batch.write("index.json", "new")
    (root / "nodes" / "b.html").mkdir()
    with pytest.raises(IsADirectoryError):
        batch.commit()
    assert tree(root) == OLD_TREE
    assert library_leftovers(root) == []


@pytest.mark.parametrize("others", [0, 1], ids=["one-write", "journaled"])
def test_parent_turned_file_before_commit_changes_nothing(root: Path, others: int) -> None:
    """A write whose directory became a file meanwhile fails the whole batch, before any change.

    (Found in review: the journaled batch committed, then could not make the
    directory and left the batch half-applied.)
    """
    make_old(root)
    batch = AtomicBatch(root)
    batch.write("fresh/x.txt", "new")
    for _ in range(others):
        batch.write("index.json", "new")
    atomic_write(root / "fresh", b"a plain file")  # someone else's write, after the add
    with pytest.raises(NotADirectoryError, match=r"fresh/x\.txt"):
        batch.commit()
    assert tree(root) == {**OLD_TREE, "fresh": b"a plain file"}
    assert library_leftovers(root) == []


# --------------------------------------------------------------------------
# Recovery
# --------------------------------------------------------------------------


def _crash_at(root: Path, step: str) -> None:
    """Run the standard batch in a child that dies at the first ``step``."""
    names = _recorded_steps(root.parent / "probe")
    k = names.index(step) + 1
    proc = start_process(crash_standard_batch, str(root), k)
    proc.join(60)
    assert proc.exitcode == CRASH_EXIT, f"the crash at {step} was not hit ({proc.exitcode})"


def _recorded_steps(scratch: Path) -> list[str]:
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    names: list[str] = []
    saved = batch_mod._step
    batch_mod._step = names.append
    try:
        make_old(scratch)
        run_standard_batch(str(scratch))
    finally:
        batch_mod._step = saved
    return names


def test_recover_rolls_a_committed_batch_forward(root: Path) -> None:
    make_old(root)
    _crash_at(root, "apply-op")  # one rename done, the rest not
    mixed = tree(root)
    assert mixed != OLD_TREE
    assert mixed != NEW_TREE
    report = recover(root)
    assert report.finished == 1
    assert report.discarded == 0
    # The first operation (index.json) was renamed before the crash.
    assert report.applied == ("nodes/a.html", "nodes/b.html", "deep/er/c.bin", "nodes/gone.html")
    assert tree(root) == NEW_TREE
    assert library_leftovers(root) == []
    assert recover(root) == RecoveryReport()  # idempotent
    assert not recover(root)


def test_recover_discards_an_uncommitted_batch_of_a_dead_process(root: Path) -> None:
    make_old(root)
    _crash_at(root, "staged-durable")
    assert tree(root) == OLD_TREE
    assert len(library_leftovers(root)) == 2  # its staging dir and its stale lock marker
    report = recover(root)
    assert report == RecoveryReport(discarded=1)
    assert tree(root) == OLD_TREE
    assert library_leftovers(root) == []


def test_recover_keeps_a_live_process_staging(root: Path) -> None:
    live = AtomicBatch(root)
    live.write("a.txt", "staged")
    assert recover(root) == RecoveryReport()
    live.commit()
    assert tree(root) == {"a.txt": b"staged"}


def test_next_batch_and_snapshot_recover_first(root: Path) -> None:
    make_old(root)
    _crash_at(root, "committed")
    assert tree(root) == OLD_TREE  # committed, nothing applied yet
    assert read_snapshot(root, ["index.json", "nodes/gone.html"]) == {
        "index.json": NEW_TREE["index.json"]
    }
    assert tree(root) == NEW_TREE
    shutil.rmtree(root)
    root.mkdir()
    make_old(root)
    _crash_at(root, "committed")
    with AtomicBatch(root) as batch:
        batch.write("later.txt", "after")
    assert tree(root) == {**NEW_TREE, "later.txt": b"after"}
    assert library_leftovers(root) == []


def test_later_writes_are_never_undone_by_a_late_recovery(root: Path) -> None:
    """A batch killed mid-apply; plain writes follow; recovery must keep them."""
    make_old(root)
    _crash_at(root, "committed")
    # Plain writes made after the batch: one to a file the batch writes, one
    # recreating the file it deletes.
    atomic_write(root / "nodes" / "b.html", "plain write, later")
    (root / "nodes" / "gone.html").unlink()
    atomic_write(root / "nodes" / "gone.html", "recreated later")
    report = recover(root)
    assert set(report.kept) == {"nodes/b.html", "nodes/gone.html"}
    expected = {
        **NEW_TREE,
        "nodes/b.html": b"plain write, later",
        "nodes/gone.html": b"recreated later",
    }
    assert tree(root) == expected
    assert library_leftovers(root) == []


def test_a_stale_journal_never_undoes_later_writes(root: Path) -> None:
    """A journal that came back after the batch returned (its unlink was not durable)."""
    make_old(root)
    kept: dict[str, bytes] = {}
    saved = batch_mod._step

    def copy_journal(name: str) -> None:
        if name == "synced":
            hidden = root / HIDDEN_DIR
            txn = next(p for p in hidden.iterdir() if p.name.startswith("txn-"))
            kept[txn.name] = (txn / "journal").read_bytes()

    batch_mod._step = copy_journal
    try:
        run_standard_batch(str(root))
    finally:
        batch_mod._step = saved
    assert tree(root) == NEW_TREE
    assert len(kept) == 1
    atomic_write(root / "nodes" / "a.html", "later a")
    atomic_write(root / "nodes" / "gone.html", "later gone")
    (root / "nodes" / "b.html").unlink()  # a later delete
    for name, data in kept.items():  # the power cut brings the journal back
        (root / HIDDEN_DIR / name).mkdir()
        (root / HIDDEN_DIR / name / "journal").write_bytes(data)
    report = recover(root)
    assert report.finished == 1
    expected = {**NEW_TREE, "nodes/a.html": b"later a", "nodes/gone.html": b"later gone"}
    del expected["nodes/b.html"]
    assert tree(root) == expected
    assert library_leftovers(root) == []


def test_torn_journal_is_an_uncommitted_batch(root: Path) -> None:
    make_old(root)
    _crash_at(root, "journal-renamed")
    hidden = root / HIDDEN_DIR
    txn = next(p for p in hidden.iterdir() if p.name.startswith("txn-"))
    data = (txn / "journal").read_bytes()
    (txn / "journal").write_bytes(data[: len(data) // 2])  # as if renamed before its fsync
    assert recover(root) == RecoveryReport(discarded=1)
    assert tree(root) == OLD_TREE
    assert library_leftovers(root) == []


@pytest.mark.parametrize(
    "journal",
    [b"", b"\n", b"{}\n00000000\n", b"not json\n1234abcd\n"],
)
def test_foreign_journal_is_not_replayed(root: Path, journal: bytes) -> None:
    make_old(root)
    txn = root / HIDDEN_DIR / "txn-1-0000000000000000-00"
    txn.mkdir(parents=True)
    (txn / "journal").write_bytes(journal)
    (txn / "0").write_bytes(b"staged")
    assert recover(root).discarded == 1
    assert tree(root) == OLD_TREE
    assert library_leftovers(root) == []


def test_foreign_entries_in_the_hidden_directory_are_left_alone(root: Path) -> None:
    hidden = root / HIDDEN_DIR
    hidden.mkdir()
    (hidden / "notes.txt").write_text("mine")
    (hidden / "txn-garbage").mkdir()
    assert recover(root) == RecoveryReport()
    assert sorted(os.listdir(hidden)) == ["lock", "notes.txt", "txn-garbage"]


def test_read_snapshot(root: Path) -> None:
    make_old(root)
    assert read_snapshot(root) == OLD_TREE
    assert read_snapshot(root, ["index.json", "missing.txt"]) == {
        "index.json": OLD_TREE["index.json"]
    }
    with pytest.raises(ValueError, match="absolute"):
        read_snapshot(root, [str(root / "index.json")])
    with pytest.raises(IsADirectoryError):
        read_snapshot(root, ["nodes"])
    assert library_leftovers(root) == []


def test_recovery_report_is_truthy_only_when_something_happened() -> None:
    assert not RecoveryReport()
    assert RecoveryReport(finished=1)
    assert RecoveryReport(discarded=2)


def test_cli_batch_and_recover(root: Path, tmp_path: Path) -> None:
    make_old(root)
    src = tmp_path / "src"
    for rel, data in NEW_TREE.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    stray_temp = root / ".tmp-1-0123456789abcdef-x"
    stray_temp.write_bytes(b"someone's write in flight")
    # A running atomic_update holds its per-file lock beside the file.
    updater = DirectoryLocker(update_lock_dir(root / "index.json"))
    assert updater.acquire_exclusive_lock(timeout=0)
    held_marker = updater.exclusive_lock_path
    run = [sys.executable, "-m", "htmlgraph"]
    proc = subprocess.run(
        [*run, "batch", str(root), str(src), "--delete"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert held_marker.exists(), "--delete removed a live updater's lock marker"
    updater.release_lock()
    assert tree(root) == {**NEW_TREE, stray_temp.name: b"someone's write in flight"}
    assert library_leftovers(root) == []
    proc = subprocess.run(
        [*run, "recover", str(root)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "nothing to recover" in proc.stdout
    proc = subprocess.run(
        [*run, "batch", str(tmp_path / "missing"), str(src)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "missing" in proc.stderr


def test_cli_batch_delete_lists_root_after_recovery(root: Path, tmp_path: Path) -> None:
    """--delete also deletes the files an interrupted, committed batch was making."""
    make_old(root)
    _crash_at(root, "committed")  # nodes/b.html and deep/er/c.bin are only in its journal
    src = tmp_path / "src"
    src.mkdir()
    (src / "index.json").write_text(json.dumps({"v": 2}))
    assert cli.main(["batch", str(root), str(src), "--delete"]) == 0
    assert tree(root) == {"index.json": b'{"v": 2}'}
    assert library_leftovers(root) == []


def test_cli_batch_without_delete_keeps_other_files(root: Path, tmp_path: Path) -> None:
    make_old(root)
    src = tmp_path / "src"
    src.mkdir()
    (src / "index.json").write_text(json.dumps({"v": 2}))
    assert cli.main(["batch", str(root), str(src)]) == 0
    assert tree(root) == {**OLD_TREE, "index.json": b'{"v": 2}'}


@pytest.mark.parametrize(
    "rel", ["../outside.txt", "/etc/passwd", "a/../../x", f"{HIDDEN_DIR}/lock/x", "a//b", ""]
)
def test_a_planted_journal_cannot_reach_outside_root(root: Path, tmp_path: Path, rel: str) -> None:
    (tmp_path / "outside.txt").write_text("outside")
    make_old(root)
    txn = root / HIDDEN_DIR / "txn-1-0000000000000000-00"
    txn.mkdir(parents=True)
    body = json.dumps(
        {"format": "htmlgraph-batch 1", "start_ns": 0, "ops": [["delete", rel, None, None]]},
        separators=(",", ":"),
    ).encode()
    (txn / "journal").write_bytes(body + b"\n" + f"{zlib.crc32(body):08x}\n".encode())
    assert recover(root).discarded == 1
    assert (tmp_path / "outside.txt").read_text() == "outside"
    assert tree(root) == OLD_TREE
    assert library_leftovers(root) == []


@posix_only
def test_odd_but_legal_names_survive_recovery(root: Path) -> None:
    names = ["back\\slash.txt", "sp ace/ü.html", "new\nline", "\udcff-undecodable"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
    saved = batch_mod._step

    def stop_after_commit(name: str) -> None:
        if name == "committed":
            raise SystemExit("crash")

    batch = AtomicBatch(root)
    for name in names:
        batch.write(name, name.encode("utf-8", "surrogateescape"))
    batch_mod._step = stop_after_commit
    try:
        with pytest.raises(SystemExit):
            batch.commit()  # the journal is read back from disk to finish
    finally:
        batch_mod._step = saved
    assert recover(root) == RecoveryReport()  # the commit finished it on the spot
    assert tree(root) == {name: name.encode("utf-8", "surrogateescape") for name in names}


@pytest.mark.parametrize("name", [n for n in batch_mod.__all__ if n != "HIDDEN_DIR"])
def test_every_public_name_is_documented(name: str) -> None:
    doc = getattr(batch_mod, name).__doc__
    assert doc
    assert doc.strip().splitlines()[0].endswith(".")
    assert name in htmlgraph.__all__ or name == "RecoveryReport"


# --------------------------------------------------------------------------
# A batch of one write: staged outside a txn-*, committed without the lock
# unless a journal waits for recovery (docs/batch.md, "A batch of one operation")
# --------------------------------------------------------------------------


def _hold_root_lock(root: Path) -> DirectoryLocker:
    """Another owner holds the root's batch lock (a batch committing elsewhere)."""
    holder = DirectoryLocker(root / HIDDEN_DIR / "lock")
    assert holder.acquire_exclusive_lock(timeout=0)
    return holder


def test_a_lone_write_commits_while_another_holds_the_lock(root: Path) -> None:
    make_old(root)
    holder = _hold_root_lock(root)
    try:
        with AtomicBatch(root, timeout=0) as batch:
            batch.write("index.json", b"lone\n")
        assert (root / "index.json").read_bytes() == b"lone\n"
        # Anything bigger, and a lone delete, still waits for the lock.
        two = AtomicBatch(root, timeout=0)
        two.write("index.json", b"one\n")
        two.write("nodes/a.html", b"two\n")
        with pytest.raises(htmlgraph.LockTimeout):
            two.commit()
        delete = AtomicBatch(root, timeout=0)
        delete.delete("nodes/a.html")
        with pytest.raises(htmlgraph.LockTimeout):
            delete.commit()
        assert (root / "index.json").read_bytes() == b"lone\n"
        assert (root / "nodes" / "a.html").read_bytes() == OLD_TREE["nodes/a.html"]
    finally:
        holder.release_lock()
    assert library_leftovers(root) == []


def test_a_lone_write_finishes_a_committed_batch_first(root: Path) -> None:
    make_old(root)
    late = AtomicBatch(root, timeout=0)
    late.write("extra.txt", b"x")  # added before the journal below exists
    _crash_at(root, "committed")  # a batch that committed and died before applying
    assert tree(root) == OLD_TREE
    holder = _hold_root_lock(root)
    try:
        # A journal waits: a new batch finishes it, under the lock, before it
        # resolves its first path, so it must wait.
        waits = AtomicBatch(root, timeout=0)
        with pytest.raises(htmlgraph.LockTimeout):
            waits.write("extra.txt", b"x")
        # The batch begun before the journal: its lone write takes the lock
        # at commit, so it must wait too.
        with pytest.raises(htmlgraph.LockTimeout):
            late.commit()
    finally:
        holder.release_lock()
    assert not (root / "extra.txt").exists()
    with AtomicBatch(root) as batch:
        batch.write("extra.txt", b"x")
    assert tree(root) == {**NEW_TREE, "extra.txt": b"x"}  # recovered, then written
    assert library_leftovers(root) == []


def test_the_first_write_is_staged_beside_the_staging_directories(root: Path) -> None:
    hidden = root / HIDDEN_DIR
    batch = AtomicBatch(root)
    batch.write("a.txt", b"a")
    (lone,) = os.listdir(hidden)
    assert lone.startswith("stage-")
    assert (hidden / lone).read_bytes() == b"a"
    batch.write("b.txt", b"b")
    assert sorted(name.split("-")[0] for name in os.listdir(hidden)) == ["stage", "txn"]
    batch.commit()  # grown: the first write moves into txn-* and is journaled
    assert (root / "a.txt").read_bytes() == b"a"
    assert (root / "b.txt").read_bytes() == b"b"
    assert library_leftovers(root) == []


@pytest.mark.parametrize("writes", [1, 2])
def test_a_discarded_batch_leaves_no_staged_file(root: Path, writes: int) -> None:
    def fail() -> None:
        with AtomicBatch(root) as batch:
            for i in range(writes):
                batch.write(f"f{i}.txt", b"x")
            raise KeyError("the caller failed")

    with pytest.raises(KeyError):
        fail()
    assert library_leftovers(root) == []
    assert sorted(os.listdir(root)) == [HIDDEN_DIR]


def test_a_dead_owners_lone_stage_is_discarded_and_a_live_ones_kept(root: Path) -> None:
    batch = AtomicBatch(root)
    batch.write("mine.txt", b"live")
    (mine,) = os.listdir(root / HIDDEN_DIR)
    dead = root / HIDDEN_DIR / "stage-1-0000000000000000-00"  # no such owner on this host
    dead.write_bytes(b"left by a crash")
    # A tag from this host and pid namespace whose process is gone.
    tag = mine.split("-")[2]
    gone = root / HIDDEN_DIR / f"stage-{2**22 + 12345}-{tag[:8]}00000000-00"
    gone.write_bytes(b"left by a crash")
    report = recover(root)
    assert report.discarded == 1
    assert sorted(os.listdir(root / HIDDEN_DIR)) == sorted([mine, dead.name, "lock"])
    batch.commit()
    assert (root / "mine.txt").read_bytes() == b"live"


@posix_only
def test_lone_writes_and_journaled_batches_from_many_processes(root: Path) -> None:
    """Lone writes (no lock) beside batches of three (locked) and snapshots: nothing lost."""
    procs = [
        start_process(batchchild.lone_writes, str(root), "solo-1.txt", 60),
        start_process(batchchild.lone_writes, str(root), "solo-2.txt", 60),
        start_process(batchchild.trio_batches, str(root), 40),
        start_process(batchchild.trio_batches, str(root), 40),
    ]
    while any(p.is_alive() for p in procs):
        snap = read_snapshot(root, ["trio/a", "trio/b", "trio/c"])
        assert len(set(snap.values())) <= 1, f"a snapshot mixes two batches: {snap}"
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert (root / "solo-1.txt").read_bytes() == b"60\n"
    assert (root / "solo-2.txt").read_bytes() == b"60\n"
    assert {(root / "trio" / n).read_bytes() for n in "abc"} == {b"40\n"}
    assert library_leftovers(root) == []
    assert recover(root) == RecoveryReport()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.skipif(not _platform.HAS_SYNCFS, reason="syncfs(2) is Linux-only")
def test_a_lone_syncfs_write_leaks_no_descriptor(root: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with AtomicBatch(root, sync="syncfs") as batch:  # warm-up: imports, the pool
        batch.write("a.txt", b"0")
    before = open_fds()
    for i in range(5):
        with AtomicBatch(root, sync="syncfs") as batch:
            batch.write("a.txt", str(i).encode())
    assert open_fds() == before
    assert (root / "a.txt").read_bytes() == b"4"
    assert library_leftovers(root) == []


def test_a_lone_write_clears_a_dead_writers_staging_first(root: Path) -> None:
    """A killed writer's journal-less staging is cleared before a lone write, as by any batch."""
    make_old(root)
    _crash_at(root, "locked")  # staged, no journal yet: never committed
    assert library_leftovers(root) != []
    holder = _hold_root_lock(root)
    try:
        # Something to clear: the lone write takes the lock, so it must wait.
        waits = AtomicBatch(root, timeout=0)
        waits.write("extra.txt", b"x")
        with pytest.raises(htmlgraph.LockTimeout):
            waits.commit()
    finally:
        holder.release_lock()
    with AtomicBatch(root) as batch:
        batch.write("extra.txt", b"x")
    assert tree(root) == {**OLD_TREE, "extra.txt": b"x"}
    assert library_leftovers(root) == []


@pytest.mark.parametrize("missing_ok", [True, False])
@pytest.mark.parametrize(
    "deletes", [["nodes/b.html"], ["nodes/b.html", "deep/er/c.bin"]], ids=["one", "two"]
)
@pytest.mark.parametrize("write", [False, True], ids=["deletes", "write-and-deletes"])
def test_deletes_see_what_a_committed_batch_made(
    root: Path, write: bool, deletes: list[str], missing_ok: bool
) -> None:
    """A delete of a file only a committed, unfinished batch has made still deletes it.

    The kill torture found this: the files were missing when the deletes were
    added, so the commit dropped them, then finished the waiting batch, which
    made them - leaving a tree that mixed two batches.
    """
    make_old(root)
    _crash_at(root, "committed")  # nodes/b.html and deep/er/c.bin exist only in its journal
    assert tree(root) == OLD_TREE
    with AtomicBatch(root) as batch:
        if write:
            batch.write("extra.txt", b"x")
        for rel in deletes:
            batch.delete(rel, missing_ok=missing_ok)
    expected = {rel: data for rel, data in NEW_TREE.items() if rel not in deletes}
    if write:
        expected["extra.txt"] = b"x"
    assert tree(root) == expected
    assert library_leftovers(root) == []


def test_deletes_of_files_gone_change_nothing(root: Path) -> None:
    """Deletes that find nothing to delete commit as a no-op: no journal, nothing left."""
    make_old(root)
    journals: list[str] = []
    saved = batch_mod._step
    batch_mod._step = journals.append
    try:
        with AtomicBatch(root) as batch:
            batch.delete("nodes/none.html", missing_ok=True)
            batch.delete("deep/none.bin", missing_ok=True)
    finally:
        batch_mod._step = saved
    assert journals == ["locked"]  # judged under the lock, then nothing written
    assert tree(root) == OLD_TREE
    assert library_leftovers(root) == []


def test_plain_deletes_of_files_that_vanished_fail_the_commit(root: Path) -> None:
    """Deletes without missing_ok still fail when every file vanished before the commit."""
    (root / "a.txt").write_text("a")
    (root / "b.txt").write_text("b")
    batch = AtomicBatch(root)
    batch.delete("a.txt")
    batch.delete("b.txt")
    os.unlink(root / "a.txt")
    os.unlink(root / "b.txt")
    with pytest.raises(FileNotFoundError, match=r"a\.txt"):
        batch.commit()
    assert tree(root) == {}
    assert library_leftovers(root) == []


def test_a_no_op_batch_counts_no_commit(root: Path) -> None:
    htmlgraph.metrics.reset()
    for deletes in (["none.txt"], ["none.txt", "d/none.txt"]):
        with AtomicBatch(root) as batch:
            for rel in deletes:
                batch.delete(rel, missing_ok=True)
    assert _commits() == 0
    with AtomicBatch(root) as batch:
        batch.write("a.txt", "a")
    assert _commits() == 1


def _commits() -> float:
    counters = htmlgraph.metrics.snapshot()["counters"]
    assert isinstance(counters, dict)
    return float(sum(row["value"] for row in counters.get("htmlgraph_batch_commits_total", [])))


def _leave_unfinished(root: Path, fill: Callable[[AtomicBatch], None]) -> None:
    """Commit a batch whose writer stops right after the commit point: nothing applied."""
    with (
        writer_gone_after_commit() as hit,
        pytest.raises(WriterGone),
        AtomicBatch(root) as batch,
    ):
        fill(batch)
    assert hit == ["committed"]


@posix_only
def test_paths_resolve_against_the_finished_tree(root: Path) -> None:
    """A batch resolves its paths after a waiting committed batch is finished.

    The waiting batch deletes a symlink and writes a file with mode 0o600;
    the next batch writes both paths. Before, it resolved them against the
    unfinished tree: it wrote through the deleted link and gave the file the
    mode the waiting batch had replaced.
    """
    (root / "real.txt").write_text("old")
    (root / "link.txt").symlink_to("real.txt")
    (root / "secret.txt").write_text("old")
    (root / "secret.txt").chmod(0o644)

    def first(batch: AtomicBatch) -> None:
        batch.delete("link.txt")
        batch.write("secret.txt", "first", permissions=0o600)

    _leave_unfinished(root, first)
    assert (root / "link.txt").is_symlink()  # nothing applied yet
    with AtomicBatch(root) as batch:
        batch.write("link.txt", "second")
        batch.write("secret.txt", "second")
    assert not (root / "link.txt").is_symlink()
    assert tree(root) == {"real.txt": b"old", "link.txt": b"second", "secret.txt": b"second"}
    assert stat.S_IMODE(os.stat(root / "secret.txt").st_mode) == 0o600
    assert library_leftovers(root) == []


def _unlink_and_write_o(batch: AtomicBatch) -> None:
    batch.delete("link.txt")
    batch.write("o.txt", "o")


@posix_only
def test_a_first_path_that_timed_out_still_waits_for_the_finished_tree(root: Path) -> None:
    (root / "real.txt").write_text("old")
    (root / "link.txt").symlink_to("real.txt")
    _leave_unfinished(root, _unlink_and_write_o)
    batch = AtomicBatch(root, timeout=0)
    holder = _hold_root_lock(root)
    try:
        with pytest.raises(htmlgraph.LockTimeout):
            batch.write("link.txt", "second")  # must finish the waiting batch first
    finally:
        holder.release_lock()
    batch.write("link.txt", "second")  # tries again, and finishes it
    batch.commit()
    assert tree(root) == {"real.txt": b"old", "o.txt": b"o", "link.txt": b"second"}
    assert library_leftovers(root) == []


@posix_only
def test_parent_turned_dangling_symlink_before_commit_changes_nothing(root: Path) -> None:
    batch = AtomicBatch(root)
    batch.write("fresh/x.txt", "new")
    batch.write("y.txt", "new")
    (root / "fresh").symlink_to("nowhere")
    with pytest.raises(NotADirectoryError, match=r"fresh/x\.txt"):
        batch.commit()
    assert not (root / "y.txt").exists()
    assert (root / "fresh").is_symlink()
    assert sorted(os.listdir(root)) == sorted([HIDDEN_DIR, "fresh"])
    assert library_leftovers(root) == []
