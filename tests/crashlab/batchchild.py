"""Batch child processes and the tree checks shared by the batch test suites.

Module-level functions only: they run as ``forkserver`` children
(:func:`crashlab.procs.start_process`) and must import cheaply.

A *tree* is the dict ``relative path -> bytes`` of every file under a root,
the library's hidden directory excluded. Every batch the suites commit is
self-describing: each file it writes carries the batch's number, so a state
that mixes two batches is visible without knowing which batch ran last.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

from htmlgraph import batch as batch_mod
from htmlgraph.batch import HIDDEN_DIR, AtomicBatch

CRASH_EXIT = 77
# The protocol steps (_step hooks) of the standard batch: four writes and a delete
# make five "apply-op" steps (docs/batch.md).
COMMIT_STEPS = [
    "locked",
    "journal-written",
    "staged-durable",
    "journal-renamed",
    "committed",
    *["apply-op"] * 5,
    "applied",
    "synced",
    "retired",
]


def tree(root: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under ``root`` except the library's own, read plainly."""
    found: dict[str, bytes] = {}
    base = os.fspath(root)
    for directory, dirnames, filenames in os.walk(base):
        if directory == base and HIDDEN_DIR in dirnames:
            dirnames.remove(HIDDEN_DIR)
        for name in filenames:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, base).replace(os.sep, "/")] = Path(path).read_bytes()
    return found


def library_leftovers(root: str | os.PathLike[str]) -> list[str]:
    """What the hidden directory holds besides the (empty) lock directory."""
    hidden = Path(root) / HIDDEN_DIR
    if not hidden.exists():
        return []
    left = [name for name in sorted(os.listdir(hidden)) if name != "lock"]
    lock = hidden / "lock"
    if lock.exists():
        left += [f"lock/{name}" for name in sorted(os.listdir(lock))]
    return left


# -- a standard batch: writes an existing file, creates two (one in a new
#    directory), deletes one; every step of the protocol is crossed.

OLD_TREE = {
    "index.json": b'{"v": "old"}\n',
    "nodes/a.html": b"<p>old a</p>",
    "nodes/gone.html": b"<p>to delete</p>",
}
NEW_TREE = {
    "index.json": b'{\n  "v": "new"\n}\n',
    "nodes/a.html": b"<p>new a</p>" * 500,
    "nodes/b.html": b"<p>new b</p>",
    "deep/er/c.bin": bytes(range(256)) * 64,
}


# -- batches of one operation (no journal: one rename or one unlink).

ONE_WRITE_STEPS = ["one-durable", "one-checked", "one-applied", "one-synced", "one-retired"]
ONE_DELETE_STEPS = ONE_WRITE_STEPS[1:]
# What each one-operation batch makes of OLD_TREE.
ONE_NEW_TREES = {
    "one-write": {**OLD_TREE, "nodes/a.html": NEW_TREE["nodes/a.html"]},
    "one-delete": {k: v for k, v in OLD_TREE.items() if k != "nodes/gone.html"},
    "one-new-dir": {**OLD_TREE, "deep/er/c.bin": NEW_TREE["deep/er/c.bin"]},
}


def run_one_batch(root: str, kind: str, *, durable: bool = True) -> None:
    """Commit the one-operation batch ``kind`` (a key of :data:`ONE_NEW_TREES`)."""
    with AtomicBatch(root, durable=durable) as batch:
        if kind == "one-write":
            batch.write("nodes/a.html", NEW_TREE["nodes/a.html"])
        elif kind == "one-delete":
            batch.delete("nodes/gone.html")
        elif kind == "one-new-dir":
            batch.write("deep/er/c.bin", NEW_TREE["deep/er/c.bin"])
        else:
            raise ValueError(kind)


def crash_one_batch(root: str, kind: str, k: int) -> None:
    """Child: run the one-operation batch ``kind`` and die at protocol step ``k``."""
    exit_at_step(k)
    run_one_batch(root, kind)


def make_old(root: str | os.PathLike[str]) -> None:
    """Create :data:`OLD_TREE` under ``root``."""
    for rel, data in OLD_TREE.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def run_standard_batch(root: str, *, durable: bool = True) -> None:
    """Turn :data:`OLD_TREE` into :data:`NEW_TREE` in one batch."""
    with AtomicBatch(root, durable=durable) as batch:
        batch.write_json("index.json", {"v": "new"})
        batch.write("nodes/a.html", NEW_TREE["nodes/a.html"].decode("ascii"))
        batch.write("nodes/b.html", NEW_TREE["nodes/b.html"])
        with batch.open("deep/er/c.bin") as f:
            f.write(NEW_TREE["deep/er/c.bin"])
        batch.delete("nodes/gone.html")


def exit_at_step(k: int) -> None:
    """Make the ``k``-th protocol step (1-based) kill this process like a crash."""
    calls = [0]

    def step(name: str) -> None:
        calls[0] += 1
        if calls[0] == k:
            os._exit(CRASH_EXIT)  # no cleanup, no finally: a crash

    batch_mod._step = step


def crash_standard_batch(root: str, k: int) -> None:
    """Child: run the standard batch and die at protocol step ``k``."""
    exit_at_step(k)
    run_standard_batch(root)


def crash_recovery(root: str, k: int) -> None:
    """Child: run :func:`htmlgraph.recover` and die at its step ``k``."""
    exit_at_step(k)
    batch_mod.recover(root)


class WriterGone(BaseException):
    """Raised at a batch's commit point by :func:`writer_gone_after_commit`."""


@contextlib.contextmanager
def writer_gone_after_commit() -> Iterator[list[str]]:
    """In the block, a batch's writer "dies" right after its commit point, in process.

    The commit raises :class:`WriterGone` there and nothing is applied (its
    own attempt to finish fails too): a committed, unfinished batch waits
    for recovery. Yields the list of steps hit (empty: no journaled commit).
    """
    hit: list[str] = []

    def step(name: str) -> None:
        if name == "committed":
            hit.append(name)
            raise WriterGone(name)

    def cannot_finish(*args: object) -> None:
        raise OSError("the writer is gone")

    saved = batch_mod._step, batch_mod._roll_forward
    batch_mod._step = step
    batch_mod._roll_forward = cannot_finish  # type: ignore[assignment]
    try:
        yield hit
    finally:
        batch_mod._step, batch_mod._roll_forward = saved


# -- the kill -9 loop: numbered batches over a fixed set of files.

FILES = [f"d{i % 3}/f{i}.txt" for i in range(8)]


def batch_payload(n: int, rel: str) -> bytes:
    """The content batch ``n`` gives ``rel``: names the batch, sized to vary."""
    return f"batch {n} {rel}\n".encode() * (1 + (n * 7 + len(rel)) % 300)


def batch_number(data: bytes) -> int:
    """Which batch wrote ``data`` (raises if it is not one complete payload)."""
    first = data.split(b"\n", 1)[0].decode("ascii")
    word, number, rel = first.split(" ")
    n = int(number)
    if word != "batch" or data != batch_payload(n, rel):
        raise ValueError(f"torn or foreign content: {data[:60]!r}")
    return n


def batch_files(n: int) -> list[str]:
    """The files batch ``n`` writes (the others it deletes): a varying subset."""
    rng = random.Random(n)
    return sorted(rng.sample(FILES, rng.randint(1, len(FILES))))


def commit_forever(root: str, first: int, conn: Connection) -> None:
    """Child: commit batches ``first``, ``first + 1``, ... until killed.

    Batch ``n`` writes :func:`batch_files` ``(n)`` and deletes every other
    file of :data:`FILES`. Reports each number on ``conn`` once ``commit``
    returned (so the parent knows what must survive).
    """
    conn.send(("ready", first))
    n = first
    while True:
        keep = batch_files(n)
        with AtomicBatch(root) as batch:
            for rel in keep:
                batch.write(rel, batch_payload(n, rel))
            for rel in FILES:
                if rel not in keep:
                    batch.delete(rel, missing_ok=True)
        conn.send(("committed", n))
        n += 1


SOLO = "solo.txt"


def solo_deletes(n: int) -> bool:
    """Whether one-operation batch ``n`` deletes :data:`SOLO` (else it writes it)."""
    return n % 4 == 0


def commit_solo_forever(root: str, first: int, conn: Connection) -> None:
    """Child: commit one-operation batches ``first``, ``first + 1``, ... until killed.

    Batch ``n`` deletes :data:`SOLO` when :func:`solo_deletes` ``(n)``, else
    writes :func:`batch_payload` ``(n, SOLO)`` to it; each number is reported
    on ``conn`` once ``commit`` returned.
    """
    conn.send(("ready", first))
    n = first
    while True:
        with AtomicBatch(root) as batch:
            if solo_deletes(n):
                batch.delete(SOLO)
            else:
                batch.write(SOLO, batch_payload(n, SOLO))
        conn.send(("committed", n))
        n += 1


def lone_writes(root: str, file: str, count: int) -> None:
    """Commit ``count`` one-write batches of ``file``, the i-th holding ``i`` (no lock)."""
    for i in range(1, count + 1):
        with AtomicBatch(root) as batch:
            batch.write(file, f"{i}\n")


def trio_batches(root: str, count: int) -> None:
    """Commit ``count`` batches writing ``trio/a``, ``trio/b``, ``trio/c``, all ``i``."""
    for i in range(1, count + 1):
        with AtomicBatch(root) as batch:
            for name in "abc":
                batch.write(f"trio/{name}", f"{i}\n")


def snapshot_forever(
    root: str, stop: str, conn: Connection, files: list[str] | None = None
) -> None:
    """Child: take snapshots until the file ``stop`` exists; report (taken, bad).

    A bad snapshot mixes two batches or has a file set no batch has; a torn
    file makes :func:`batch_number` raise (the child then exits non-zero).
    ``files``: read these instead of :data:`FILES` and check only for torn files.
    """
    bad = 0
    taken = 0
    while not os.path.exists(stop):
        try:
            snap = batch_mod.read_snapshot(root, FILES if files is None else files, timeout=30)
        except TimeoutError:
            continue
        taken += 1
        numbers = {batch_number(data) for data in snap.values()}
        if files is not None:
            continue  # one-operation batches: a torn file is all there is to see
        if len(numbers) != 1 or sorted(snap) != batch_files(numbers.pop()):
            bad += 1
            print(f"mixed snapshot: {sorted(snap)}", file=sys.stderr)
    conn.send((taken, bad))


# -- the power-cut child: pause at one protocol step, optionally as a mutant.

MUTANTS = ("no-staged-fsync", "no-journal-fsync", "no-dir-fsync", "rename-before-commit")


def _mutate(mutant: str) -> None:
    """Break the protocol in one way (each must fail at least one power-cut case)."""
    if mutant == "no-staged-fsync":  # the journal commits before the data is durable
        batch_mod._sync_file_by_name = lambda path: None
    elif mutant == "no-journal-fsync":  # the journal is renamed before its own data is durable
        batch_mod._fsync = lambda fd: None  # the journal's fd
        batch_mod._sync_file_by_name = _fsync_by_name  # staged files are still synced
    elif mutant == "no-dir-fsync":
        batch_mod._fsync_dir = lambda path: None
    elif mutant not in ("none", "rename-before-commit"):
        raise ValueError(mutant)


def _fsync_by_name(path: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pause_main(argv: list[str]) -> None:
    """``python -m crashlab.batchchild ROOT MODE K MUTANT``: run, pause at step K.

    MODE ``commit`` runs the standard batch, ``recover`` runs recover(),
    ``one-write`` / ``one-delete`` a batch of one operation. At
    the K-th protocol step (K = 0: after the call returned) the child prints
    ``at NAME`` and waits for a line on stdin before it goes on. MODE
    ``crash`` runs the standard batch and exits at step K (no pause).
    """
    root, mode, k_text, mutant = argv
    k = int(k_text)
    _mutate(mutant)
    calls = [0]

    def pause(name: str) -> None:
        print(f"at {name}", flush=True)
        sys.stdin.readline()

    def step(name: str) -> None:
        calls[0] += 1
        if mutant == "rename-before-commit" and name == "journal-written":
            # Apply the first write before the commit record exists.
            txn = next(p for p in (Path(root) / HIDDEN_DIR).iterdir() if p.name.startswith("txn-"))
            os.replace(txn / "0", Path(root) / "index.json")
            batch_mod._replace = _replace_unless_gone
            batch_mod._sync_file_by_name = _fsync_unless_gone
        if calls[0] == k:
            if mode == "crash":
                os._exit(CRASH_EXIT)
            pause(name)

    batch_mod._step = step
    if mode == "recover":
        batch_mod.recover(root)
    elif mode in ONE_NEW_TREES:
        run_one_batch(root, mode)
    else:
        run_standard_batch(root)
    if k == 0:
        pause("returned")


def _fsync_unless_gone(path: str) -> None:
    if os.path.exists(path):
        _fsync_by_name(path)


def _replace_unless_gone(src: str, dst: str) -> None:
    if os.path.exists(src):
        os.replace(src, dst)


if __name__ == "__main__":
    pause_main(sys.argv[1:])
