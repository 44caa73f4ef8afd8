"""kill -9 torture: a process committing batches is killed at random instants.

(A second test does the same with batches of one operation, which commit
without a journal: ``test_kill9_during_one_operation_batches``.)

A child commits numbered batches in a loop (:func:`crashlab.batchchild.commit_forever`:
batch ``n`` writes a varying subset of eight files, each naming ``n``, and
deletes the others) and is SIGKILLed at a random instant, hundreds of times
(``CRASHLAB_SEED`` replays, ``CRASHLAB_BATCH_KILLS`` changes the count).
Meanwhile two reader processes take :func:`read_snapshot` snapshots without
pause. After every kill the tree - after an explicit ``recover()``, a
snapshot or the next batch, whichever comes first - must be exactly one
batch's state, and that batch must be the last one whose ``commit()``
returned or the one after it (nothing committed is lost). No snapshot may
ever mix two batches.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import pytest

from crashlab.batchchild import (
    FILES,
    SOLO,
    batch_files,
    batch_number,
    batch_payload,
    commit_forever,
    commit_solo_forever,
    library_leftovers,
    snapshot_forever,
    solo_deletes,
    tree,
)
from crashlab.procs import start_process
from htmlgraph import AtomicBatch, read_snapshot, recover
from htmlgraph.batch import HIDDEN_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL semantics are POSIX"),
]

SEED = int(os.environ.get("CRASHLAB_SEED", "20261130"))
KILLS = int(os.environ.get("CRASHLAB_BATCH_KILLS", "250"))
SOLO_KILLS = int(os.environ.get("CRASHLAB_SOLO_KILLS", "150"))
READERS = 2


@pytest.fixture
def root() -> Iterator[Path]:
    """A tmpfs directory when there is one (a kill inside fsync is then instant)."""
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    path = Path(tempfile.mkdtemp(prefix="batch-kill-", dir=base)) / "site"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path.parent)


def _state(root: Path) -> int:
    """The batch the tree holds; fails the test if it is not exactly one batch."""
    files = tree(root)
    numbers = {batch_number(data) for data in files.values()}
    assert len(numbers) == 1, f"tree mixes batches {sorted(numbers)}: {sorted(files)}"
    n = numbers.pop()
    assert sorted(files) == batch_files(n), f"batch {n} has the wrong files: {sorted(files)}"
    return n


class _Reports(Protocol):
    """The read end of the pipe a batch child reports on (Connection; PipeConnection on Windows)."""

    def poll(self, timeout: float = ...) -> bool: ...
    def recv(self) -> Any: ...  # whatever the child sent
    def close(self) -> None: ...


def _start_and_kill(
    target: Callable[[str, int, Connection], None], root: Path, first: int, delay: float, kill: int
) -> _Reports:
    """Start ``target`` committing batches from number ``first`` on; SIGKILL it after ``delay`` s.

    Returns the read end of the pipe on which it reported its commits.
    """
    parent, child = multiprocessing.Pipe(duplex=False)
    proc = start_process(target, str(root), first, child)
    child.close()
    assert parent.poll(30), "batch child did not start"
    assert parent.recv() == ("ready", first)
    time.sleep(delay)
    proc.kill()
    proc.join(30)
    assert proc.exitcode == -9, f"kill {kill}: exit code {proc.exitcode}"
    proc.close()
    return parent


def _last_committed(parent: _Reports, current: int) -> int:
    """Read the killed child's reports: the last batch it saw committed (``current`` if none)."""
    acked = current
    while True:
        try:
            if not parent.poll(0):
                break
            what, n = parent.recv()
        except (EOFError, OSError):
            break
        assert what == "committed"
        acked = n
    parent.close()
    return acked


def test_kill9_during_batches_is_all_or_nothing(root: Path) -> None:
    rng = random.Random(SEED)
    with AtomicBatch(root) as batch:
        for rel in batch_files(0):
            batch.write(rel, batch_payload(0, rel))
    stop = root.parent / "stop-readers"
    readers = []
    reader_conns = []
    for _ in range(READERS):
        parent, child = multiprocessing.Pipe(duplex=False)
        readers.append(start_process(snapshot_forever, str(root), str(stop), child))
        child.close()
        reader_conns.append(parent)

    current = 0  # the batch the tree holds
    recovered = {"finished": 0, "discarded": 0}
    journals_seen = 0  # kills that left a committed journal (seen before any recovery)
    ahead = 0  # kills that landed after commit() returned but before it was reported
    started = time.monotonic()
    for kill in range(KILLS):
        delay = rng.uniform(0.0, 0.03) if rng.random() < 0.8 else rng.uniform(0.03, 0.2)
        reports = _start_and_kill(commit_forever, root, current + 1, delay, kill)
        # Readers race us to recover a committed batch; look first.
        hidden = root / HIDDEN_DIR
        journals_seen += any((hidden / name / "journal").exists() for name in os.listdir(hidden))
        acked = _last_committed(reports, current)

        how = rng.choice(["recover", "snapshot", "batch"])
        if how == "recover":
            report = recover(root)
            recovered["finished"] += report.finished
            recovered["discarded"] += report.discarded
        elif how == "snapshot":
            snap = read_snapshot(root, FILES)
            assert {batch_number(d) for d in snap.values()} <= {acked, acked + 1}
        else:
            n = acked + 2  # beyond anything the child may have started
            with AtomicBatch(root) as batch:
                for rel in batch_files(n):
                    batch.write(rel, batch_payload(n, rel))
                for rel in FILES:
                    if rel not in batch_files(n):
                        batch.delete(rel, missing_ok=True)
            acked = n - 1  # the tree must now be n
        state = _state(root)
        if how == "batch":
            assert state == acked + 1
        else:
            assert state in (acked, acked + 1), f"kill {kill}: lost batch {acked} (tree {state})"
            ahead += state == acked + 1
        current = state
        if how != "snapshot":  # a snapshot recovers committed batches only
            assert [x for x in library_leftovers(root) if not x.startswith("lock/")] == [], (
                kill,
                library_leftovers(root),
            )

    stop.touch()
    verdicts = []
    for conn, proc in zip(reader_conns, readers, strict=True):
        assert conn.poll(120), "a reader did not stop"
        verdicts.append(conn.recv())
        conn.close()
        proc.join(30)
        assert proc.exitcode == 0, "a reader read a torn file"
    recover(root)
    elapsed = time.monotonic() - started
    print(
        f"\nbatch kill -9: {KILLS} kills in {elapsed:.1f} s (seed {SEED}), reached batch "
        f"{current}; recover() finished {recovered['finished']} and discarded "
        f"{recovered['discarded']} interrupted batches; {journals_seen} kills left a committed "
        f"journal; {ahead} kills between return and report"
    )
    print(f"snapshots taken by the readers: {[taken for taken, _ in verdicts]}")
    assert all(bad == 0 for _, bad in verdicts), verdicts
    assert all(taken > 0 for taken, _ in verdicts), verdicts
    # The fault was hit: kills landed inside commits, both before and after the commit point.
    assert journals_seen > 0, "no kill landed after a commit record"
    assert recovered["discarded"] > 0, "no kill landed before a commit record"
    assert current > KILLS // 2, "the child hardly ever committed"
    assert library_leftovers(root) == []


def _solo_state(root: Path, acked: int) -> int:
    """The one-operation batch the tree holds: ``acked`` or the one after it."""
    files = tree(root)
    assert set(files) <= {SOLO}, sorted(files)
    if SOLO in files:
        n = batch_number(files[SOLO])  # raises on a torn file
        assert n in (acked, acked + 1), (n, acked)
        assert not solo_deletes(n), n
        return n
    # Gone: the last batch applied was a delete, which only n % 4 == 0 does.
    gone = [n for n in (acked, acked + 1) if solo_deletes(n)]
    assert gone, f"{SOLO} missing, but neither batch {acked} nor {acked + 1} deletes it"
    return gone[0]


def test_kill9_during_one_operation_batches(root: Path) -> None:
    """The journal-less path for one write or delete, killed at random instants."""
    rng = random.Random(SEED + 1)
    with AtomicBatch(root) as batch:
        batch.write(SOLO, batch_payload(1, SOLO))
    stop = root.parent / "stop-readers"
    parent_r, child_r = multiprocessing.Pipe(duplex=False)
    reader = start_process(snapshot_forever, str(root), str(stop), child_r, [SOLO])
    child_r.close()
    current = 1
    discarded = 0
    started = time.monotonic()
    for kill in range(SOLO_KILLS):
        parent = _start_and_kill(
            commit_solo_forever, root, current + 1, rng.uniform(0.0, 0.02), kill
        )
        acked = _last_committed(parent, current)
        # Before any recovery: the tree is already one batch or the next -
        # there is no journal, nothing for recovery to finish.
        current = _solo_state(root, acked)
        report = recover(root)
        assert report.finished == 0, report
        discarded += report.discarded
        assert _solo_state(root, acked) == current
        assert [x for x in library_leftovers(root) if not x.startswith("lock/")] == [], kill
    stop.touch()
    assert parent_r.poll(120), "the reader did not stop"
    taken, bad = parent_r.recv()
    parent_r.close()
    reader.join(30)
    assert reader.exitcode == 0, "the reader read a torn file"
    print(
        f"\none-operation kill -9: {SOLO_KILLS} kills in {time.monotonic() - started:.1f} s, "
        f"reached batch {current}; recover() discarded {discarded} staging directories; "
        f"{taken} snapshots"
    )
    assert bad == 0
    assert taken > 0
    # The kills landed both while staging (a directory to discard) and
    # between commits; and the child committed most of the time.
    assert discarded > 0, "no kill landed inside a batch"
    assert current > SOLO_KILLS // 2, "the child hardly ever committed"
    assert library_leftovers(root) == []
