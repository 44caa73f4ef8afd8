"""Fault injection at every step of the batch protocol, each fault asserted hit.

Two kinds of crash at protocol step ``k`` (``batch._step``, called at each
step of commit and of recovery):

* ``exit``: a child process runs the batch and ``os._exit``\\ s at step ``k`` -
  no ``finally``, no cleanup, exactly what ``kill -9`` leaves on the disk;
* ``raise``: an exception at step ``k`` inside this process, which the
  commit's own error handling must turn into "nothing" (before the commit
  point) or "everything" (after it).

After each, :func:`recover` must leave the standard batch's old tree or its
new tree - nothing else, and no library leftovers. OS errors are injected
through the seams ``_fsync``, ``_fsync_dir`` and ``_replace`` the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from crashlab.batchchild import (
    COMMIT_STEPS,
    CRASH_EXIT,
    NEW_TREE,
    OLD_TREE,
    ONE_DELETE_STEPS,
    ONE_NEW_TREES,
    ONE_WRITE_STEPS,
    crash_one_batch,
    crash_recovery,
    crash_standard_batch,
    library_leftovers,
    make_old,
    run_one_batch,
    run_standard_batch,
    tree,
)
from crashlab.procs import start_process
from htmlgraph import AtomicBatch, _platform, recover
from htmlgraph import batch as batch_mod

# The last step at which the batch has not committed yet: the journal is
# renamed into place right after it.
_LAST_UNCOMMITTED = "staged-durable"


def _record_steps(scratch: Path, action: Callable[[], object]) -> list[str]:
    names: list[str] = []
    saved = batch_mod._step
    batch_mod._step = names.append
    try:
        action()
    finally:
        batch_mod._step = saved
    return names


@pytest.fixture(scope="module")
def commit_steps(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    scratch = tmp_path_factory.mktemp("probe")
    make_old(scratch)
    return _record_steps(scratch, lambda: run_standard_batch(str(scratch)))


def _root(tmp_path: Path, name: str = "site") -> Path:
    root = tmp_path / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    make_old(root)
    return root


def _expect_committed(steps: list[str], k: int, *, crash: bool = True) -> bool:
    """Whether a crash at step ``k`` (1-based) comes after the commit record.

    A crash right after the journal's rename leaves it in place, and recovery
    rolls forward. An exception there (before the journal's directory fsync,
    R2, returned) makes the commit discard the batch instead: without R2 the
    renames must not start, since a power cut could keep them and lose the
    journal.
    """
    last = _LAST_UNCOMMITTED if crash else "journal-renamed"
    return k > steps.index(last) + 1


def test_the_protocol_has_the_documented_steps(commit_steps: list[str]) -> None:
    # Four writes and a delete: one "apply-op" each.
    assert commit_steps == COMMIT_STEPS


@pytest.mark.parametrize("k", range(1, 14))
def test_exit_at_every_commit_step(tmp_path: Path, commit_steps: list[str], k: int) -> None:
    assert len(commit_steps) == 13
    root = _root(tmp_path)
    proc = start_process(crash_standard_batch, str(root), k)
    proc.join(60)
    assert proc.exitcode == CRASH_EXIT, f"step {k} ({commit_steps[k - 1]}) was not hit"
    report = recover(root)
    expected = NEW_TREE if _expect_committed(commit_steps, k) else OLD_TREE
    assert tree(root) == expected, f"crash at step {k} ({commit_steps[k - 1]})"
    if _expect_committed(commit_steps, k) and commit_steps[k - 1] != "retired":
        assert report.finished == 1
    assert library_leftovers(root) == []


class _Boom(BaseException):
    """A crash stand-in that even ``except Exception`` does not catch."""


def _raise_once_at(k: int) -> list[str]:
    hit: list[str] = []
    calls = [0]

    def step(name: str) -> None:
        calls[0] += 1
        if calls[0] == k:
            hit.append(name)
            raise _Boom(name)

    batch_mod._step = step
    return hit


@pytest.mark.parametrize("k", range(1, 14))
def test_raise_at_every_commit_step(
    tmp_path: Path,
    commit_steps: list[str],
    k: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=batch_mod.__name__)
    root = _root(tmp_path)
    monkeypatch.setattr(batch_mod, "_step", batch_mod._step)
    hit = _raise_once_at(k)
    committed = _expect_committed(commit_steps, k, crash=False)
    # The exception (and through its traceback, the batch) stays alive while
    # the disk is checked: no finalizer may do the commit's cleaning for it.
    with pytest.raises(_Boom) as info:
        run_standard_batch(str(root))
    assert hit == [commit_steps[k - 1]]
    # No recovery needed: the commit's own error handling undid or finished it.
    assert tree(root) == (NEW_TREE if committed else OLD_TREE)
    assert library_leftovers(root) == []
    assert info.value.args == (hit[0],)
    assert not recover(root)
    # Finishing a committed batch on the spot never fails here (at "retired"
    # there is nothing left to finish), so nothing claims it did.
    assert [r.getMessage() for r in caplog.records if "not finished" in r.getMessage()] == []


@pytest.fixture(scope="module")
def recovery_steps(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    scratch = tmp_path_factory.mktemp("probe-recovery") / "site"
    scratch.mkdir()
    make_old(scratch)
    proc = start_process(crash_standard_batch, str(scratch), 6)  # after the first rename
    proc.join(60)
    assert proc.exitcode == CRASH_EXIT
    return _record_steps(scratch, lambda: recover(scratch))


@pytest.mark.parametrize("j", range(1, 9))
def test_exit_at_every_recovery_step(tmp_path: Path, recovery_steps: list[str], j: int) -> None:
    assert recovery_steps == ["recover-op"] * 5 + [
        "recover-applied",
        "recover-synced",
        "recover-retired",
    ]
    root = _root(tmp_path)
    first = start_process(crash_standard_batch, str(root), 6)
    first.join(60)
    assert first.exitcode == CRASH_EXIT
    second = start_process(crash_recovery, str(root), j)
    second.join(60)
    assert second.exitcode == CRASH_EXIT, f"recovery step {j} was not hit"
    recover(root)
    assert tree(root) == NEW_TREE
    assert library_leftovers(root) == []


# --------------------------------------------------------------------------
# OS errors through the seams
# --------------------------------------------------------------------------


class Fault:
    """A seam replacement that raises ``exc`` on chosen calls and counts its calls."""

    def __init__(self, real: Callable[..., None], exc: BaseException, on_calls: set[int]) -> None:
        self.real = real
        self.exc = exc
        self.on_calls = on_calls
        self.calls = 0
        self.raised = 0

    def __call__(self, *args: object) -> None:
        self.calls += 1
        if self.calls in self.on_calls:
            self.raised += 1
            raise self.exc
        self.real(*args)


@pytest.fixture
def serial_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the fsync rounds in order, so "the n-th call" means one thing."""

    def serial(calls: list[Callable[[], None]]) -> None:
        for call in calls:
            call()

    monkeypatch.setattr(batch_mod, "_run_parallel", serial)


def _eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


# (seam, call number, committed?) - the fsync_dir calls are R1: txn, hidden;
# R2: txn; R3: the touched directories. _replace: the journal rename, then
# the staged files.
FAULTS = {
    "fsync-staged": ("_fsync", 1, False),
    "fsync-journal": ("_fsync", 5, False),
    "fsync-dir-R1": ("_fsync_dir", 1, False),
    "fsync-dir-R2": ("_fsync_dir", 3, False),
    "fsync-dir-R3": ("_fsync_dir", 4, True),
    "rename-journal": ("_replace", 1, False),
    "rename-staged": ("_replace", 3, True),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_os_errors_at_each_syscall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serial_fsync: None, case: str
) -> None:
    seam, call, committed = FAULTS[case]
    root = _root(tmp_path)
    recover(root)  # creates the hidden directory now, so its fsync is not counted below
    fault = Fault(getattr(batch_mod, seam), _eio(), {call})
    monkeypatch.setattr(batch_mod, seam, fault)
    with pytest.raises(OSError, match="Input/output error") as info:
        run_standard_batch(str(root))
    assert info.value.errno == errno.EIO
    assert fault.raised == 1
    # Before the commit point: nothing changed. After it: finished on the spot
    # (the fault struck once), so the tree is new before any recover().
    assert tree(root) == (NEW_TREE if committed else OLD_TREE)
    assert library_leftovers(root) == []
    assert not recover(root)


def test_a_failing_recovery_keeps_the_journal_for_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _root(tmp_path)
    proc = start_process(crash_standard_batch, str(root), 6)
    proc.join(60)
    assert proc.exitcode == CRASH_EXIT
    fault = Fault(batch_mod._replace, _eio(), {2})
    monkeypatch.setattr(batch_mod, "_replace", fault)
    with pytest.raises(OSError, match="Input/output error"):
        recover(root)
    assert fault.raised == 1
    monkeypatch.setattr(batch_mod, "_replace", fault.real)
    assert recover(root).finished == 1
    assert tree(root) == NEW_TREE
    assert library_leftovers(root) == []


@pytest.mark.skipif(not _platform.HAS_SYNCFS, reason="syncfs(2) is Linux-only")
@pytest.mark.parametrize(("call", "committed"), [(1, False), (2, True)])
def test_syncfs_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: int, committed: bool
) -> None:
    root = _root(tmp_path)
    fault = Fault(_platform.syncfs, _eio(), {call})
    monkeypatch.setattr(_platform, "syncfs", fault)
    batch = AtomicBatch(root, sync="syncfs")
    batch.write("nodes/a.html", NEW_TREE["nodes/a.html"])
    batch.write("nodes/b.html", NEW_TREE["nodes/b.html"])
    with pytest.raises(OSError, match="Input/output error"):
        batch.commit()
    assert fault.raised == 1
    expected = dict(OLD_TREE)
    if committed:
        expected.update({k: NEW_TREE[k] for k in ("nodes/a.html", "nodes/b.html")})
    assert tree(root) == expected
    assert library_leftovers(root) == []


@pytest.mark.skipif(not _platform.HAS_SYNCFS, reason="syncfs(2) is Linux-only")
def test_syncfs_mode_commits_with_two_syncfs_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _root(tmp_path)
    spy = Fault(_platform.syncfs, _eio(), set())
    file_fsync = Fault(batch_mod._fsync, _eio(), set())
    monkeypatch.setattr(_platform, "syncfs", spy)
    monkeypatch.setattr(batch_mod, "_fsync", file_fsync)
    with AtomicBatch(root, sync="syncfs") as b:
        for rel in NEW_TREE:
            b.write(rel, NEW_TREE[rel])
        b.delete("nodes/gone.html")
    assert tree(root) == NEW_TREE
    assert spy.calls == 2  # R1 and R3; R2 is one directory fsync
    assert file_fsync.calls == 0
    assert library_leftovers(root) == []
    with pytest.raises(ValueError, match="sync must be"):
        AtomicBatch(root, sync="never")  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# A batch of one operation: no journal, one rename or unlink
# --------------------------------------------------------------------------

_ONE_KINDS = sorted(ONE_NEW_TREES)


def _one_steps(kind: str) -> list[str]:
    return ONE_DELETE_STEPS if kind == "one-delete" else ONE_WRITE_STEPS


_ONE_CASES = [(kind, k) for kind in _ONE_KINDS for k in range(1, len(_one_steps(kind)) + 1)]


def _one_committed(kind: str, k: int) -> bool:
    """Whether step ``k`` (1-based) of ``kind`` comes after its rename (or unlink)."""
    return k > _one_steps(kind).index("one-applied")


@pytest.mark.parametrize("kind", _ONE_KINDS)
def test_one_operation_has_the_documented_steps(tmp_path: Path, kind: str) -> None:
    root = _root(tmp_path)
    assert _record_steps(root, lambda: run_one_batch(str(root), kind)) == _one_steps(kind)
    assert tree(root) == ONE_NEW_TREES[kind]
    assert library_leftovers(root) == []


@pytest.mark.parametrize(("kind", "k"), _ONE_CASES)
def test_one_operation_exit_at_every_step(tmp_path: Path, kind: str, k: int) -> None:
    steps = _one_steps(kind)
    root = _root(tmp_path)
    proc = start_process(crash_one_batch, str(root), kind, k)
    proc.join(60)
    assert proc.exitcode == CRASH_EXIT, f"step {k} ({steps[k - 1]}) was not hit"
    committed = _one_committed(kind, k)
    # The crash itself leaves the old or the new tree, never anything between:
    # there is no journal to finish.
    assert tree(root) == (ONE_NEW_TREES[kind] if committed else OLD_TREE)
    report = recover(root)
    assert report.finished == 0  # nothing to roll forward, ever
    # A write's staged file (stage-* in the hidden directory) is left until
    # its rename; the dead owner's file is discarded, which changes no file.
    assert report.discarded == (kind != "one-delete" and not committed)
    assert tree(root) == (ONE_NEW_TREES[kind] if committed else OLD_TREE)
    assert library_leftovers(root) == []


@pytest.mark.parametrize(("kind", "k"), _ONE_CASES)
def test_one_operation_raise_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, k: int
) -> None:
    steps = _one_steps(kind)
    root = _root(tmp_path)
    monkeypatch.setattr(batch_mod, "_step", batch_mod._step)
    hit = _raise_once_at(k)
    with pytest.raises(_Boom) as info:  # kept alive: see test_raise_at_every_commit_step
        run_one_batch(str(root), kind)
    assert hit == [steps[k - 1]]
    assert tree(root) == (ONE_NEW_TREES[kind] if _one_committed(kind, k) else OLD_TREE)
    assert library_leftovers(root) == []
    assert info.value.args == (hit[0],)
    assert not recover(root)


# (kind, seam, call number, committed?): the one write's fsync is the staged
# file's; its _fsync_dir calls are the target's directory (and, for a new
# directory, the parents of the directories it created).
ONE_FAULTS = {
    "fsync-staged": ("one-write", "_fsync", 1, False),
    "rename": ("one-new-dir", "_replace", 1, False),
    "fsync-dir": ("one-write", "_fsync_dir", 1, True),
    "fsync-created-dir": ("one-new-dir", "_fsync_dir", 2, True),
    "fsync-dir-after-delete": ("one-delete", "_fsync_dir", 1, True),
}


@pytest.mark.parametrize("case", sorted(ONE_FAULTS))
def test_one_operation_os_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serial_fsync: None, case: str
) -> None:
    kind, seam, call, committed = ONE_FAULTS[case]
    root = _root(tmp_path)
    recover(root)  # creates the hidden directory now, so its fsync is not counted below
    fault = Fault(getattr(batch_mod, seam), _eio(), {call})
    monkeypatch.setattr(batch_mod, seam, fault)
    with pytest.raises(OSError, match="Input/output error") as info:
        run_one_batch(str(root), kind)
    assert info.value.errno == errno.EIO
    assert fault.raised == 1
    # Before the rename: nothing changed (and a directory made for it is gone
    # again). After it: the change is in place and the error still reported.
    assert tree(root) == (ONE_NEW_TREES[kind] if committed else OLD_TREE)
    assert (root / "deep").exists() == (committed and kind == "one-new-dir")
    assert library_leftovers(root) == []
    assert not recover(root)


@pytest.mark.parametrize(("kind", "durable"), [(k, d) for k in _ONE_KINDS for d in (True, False)])
def test_one_operation_syncs_exactly_what_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, durable: bool
) -> None:
    root = _root(tmp_path)
    recover(root)
    files = Fault(batch_mod._fsync, _eio(), set())
    dirs: list[str] = []
    real_dir = batch_mod._fsync_dir

    def sync_dir(path: str) -> None:
        dirs.append(path)
        real_dir(path)

    monkeypatch.setattr(batch_mod, "_fsync", files)
    monkeypatch.setattr(batch_mod, "_fsync_dir", sync_dir)
    journals = Fault(batch_mod._encode_journal, _eio(), set())  # type: ignore[arg-type]
    monkeypatch.setattr(batch_mod, "_encode_journal", journals)
    run_one_batch(str(root), kind, durable=durable)
    assert tree(root) == ONE_NEW_TREES[kind]
    assert journals.calls == 0
    real = str(root.resolve())
    expected = {
        "one-write": [f"{real}/nodes"],
        "one-delete": [f"{real}/nodes"],
        "one-new-dir": [real, f"{real}/deep", f"{real}/deep/er"],
    }[kind]
    assert files.calls == (durable and kind != "one-delete")
    assert sorted(dirs) == (expected if durable else [])
    assert library_leftovers(root) == []


def test_one_delete_of_a_file_gone_before_commit(tmp_path: Path) -> None:
    root = _root(tmp_path)
    batch = AtomicBatch(root)
    batch.delete("nodes/gone.html")
    os.unlink(root / "nodes/gone.html")
    with pytest.raises(FileNotFoundError, match="missing file"):
        batch.commit()
    expected = {k: v for k, v in OLD_TREE.items() if k != "nodes/gone.html"}
    assert tree(root) == expected
    with AtomicBatch(root) as ok:
        (root / "nodes/gone.html").write_bytes(b"back")
        ok.delete("nodes/gone.html", missing_ok=True)
        os.unlink(root / "nodes/gone.html")
    assert tree(root) == expected
    assert library_leftovers(root) == []


def test_one_write_onto_a_target_that_became_a_directory(tmp_path: Path) -> None:
    root = _root(tmp_path)
    batch = AtomicBatch(root)
    batch.write("nodes/new.html", b"new")
    (root / "nodes/new.html").mkdir()
    with pytest.raises(IsADirectoryError, match="names a directory"):
        batch.commit()
    assert tree(root) == OLD_TREE
    assert library_leftovers(root) == []
