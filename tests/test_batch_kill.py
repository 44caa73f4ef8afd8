"""kill -9 torture: a process committing batches is killed at random instants.

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
from collections.abc import Iterator
from pathlib import Path

import pytest

from crashlab.batchchild import (
    FILES,
    batch_files,
    batch_number,
    batch_payload,
    commit_forever,
    library_leftovers,
    snapshot_forever,
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
        parent, child = multiprocessing.Pipe(duplex=False)
        proc = start_process(commit_forever, str(root), current + 1, child)
        child.close()
        assert parent.poll(30), "batch child did not start"
        assert parent.recv() == ("ready", current + 1)
        time.sleep(rng.uniform(0.0, 0.03) if rng.random() < 0.8 else rng.uniform(0.03, 0.2))
        proc.kill()
        proc.join(30)
        assert proc.exitcode == -9, f"kill {kill}: exit code {proc.exitcode}"
        proc.close()
        # Readers race us to recover a committed batch; look first.
        hidden = root / HIDDEN_DIR
        journals_seen += any((hidden / name / "journal").exists() for name in os.listdir(hidden))
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
