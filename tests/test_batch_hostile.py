"""Batches in a shared directory: what another user or process plants under the root.

A batch root can be a directory other users write too (a sticky ``/tmp``
sub-directory, a folder shared with a container). Each test here plants
something - a stranger's hidden directory, staging directory or journal, a
stranger's file or symlink where a batch writes, a FIFO - and checks that a
batch, ``recover`` and ``read_snapshot`` keep the rules ``atomic_write``
keeps (docs/guarantees.md, "Shared directories") and never act on a record
a stranger wrote. Every test failed before the fix it checks. Strangers are
real processes with another uid (root only; skipped with a reason otherwise).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _writehelpers import (
    STRANGER,
    as_stranger,
    as_user,
    become,
    is_root,
    world_traversable_dir,
)
from crashlab.batchchild import library_leftovers, tree
from htmlgraph import (
    AtomicBatch,
    DirectoryLocker,
    _identity,
    _platform,
    atomic_write,
    read_snapshot,
    recover,
)
from htmlgraph.batch import HIDDEN_DIR, RecoveryReport

if sys.platform == "win32":
    pytest.skip("POSIX owners, sticky directories and file types", allow_module_level=True)

needs_root = pytest.mark.skipif(not is_root(), reason="needs root (a second, real user)")


def plant_journal(txn: Path, ops: list[list[object]]) -> None:
    """Write a staging directory with a valid journal (the CRC is no signature)."""
    txn.mkdir(parents=True)
    (txn / "0").write_text("the stranger's content")
    body = json.dumps(
        {"format": "htmlgraph-batch 1", "start_ns": 2**62, "ops": ops}, separators=(",", ":")
    ).encode()
    (txn / "journal").write_bytes(body + b"\n" + f"{zlib.crc32(body):08x}\n".encode())


OPS: list[list[object]] = [
    ["write", "victim.txt", "0", None],
    ["delete", "precious.txt", None, None],
]
VICTIMS = {"victim.txt": b"root's data", "precious.txt": b"keep me"}


@pytest.fixture
def sticky_root() -> Iterator[Path]:
    """A root's sticky world-writable directory (like /tmp) holding two of root's files."""
    with world_traversable_dir() as base:
        shared = base / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        for name, data in VICTIMS.items():
            (shared / name).write_bytes(data)
        yield shared


CALLS: dict[str, Callable[[Path], object]] = {
    "recover": recover,
    "read_snapshot": lambda root: read_snapshot(root, ["victim.txt"], timeout=5),
    "batch": lambda root: AtomicBatch(root, timeout=5).__enter__().write("mine.txt", "x"),
    "batch-commit": lambda root: _commit_two(root),
}


def _commit_two(root: Path) -> None:
    with AtomicBatch(root, timeout=5) as batch:
        batch.write("mine.txt", "x")
        batch.write("mine2.txt", "y")


@needs_root
@pytest.mark.parametrize("call", list(CALLS))
def test_a_strangers_hidden_directory_in_a_sticky_root_is_refused(
    sticky_root: Path, call: str
) -> None:
    # The stranger makes the hidden directory first and plants a "committed"
    # batch that overwrites one of root's files and deletes another.
    as_stranger(lambda: plant_journal(sticky_root / HIDDEN_DIR / "txn-1-0000000000000000-00", OPS))
    with pytest.raises(PermissionError, match="stranger") as info:
        CALLS[call](sticky_root)
    assert info.value.filename == str(sticky_root / HIDDEN_DIR)
    assert tree(sticky_root) == VICTIMS
    assert os.stat(sticky_root / "victim.txt").st_uid == 0


@needs_root
@pytest.mark.parametrize("call", ["recover", "read_snapshot", "batch-commit"])
def test_a_strangers_staging_directory_in_a_sticky_root_is_never_replayed(
    sticky_root: Path, call: str, umask: Callable[[int], int]
) -> None:
    umask(0)  # root's hidden directory comes out world-writable, like the root
    assert recover(sticky_root) == RecoveryReport()  # makes the hidden directory (root's)
    hidden = sticky_root / HIDDEN_DIR
    assert os.stat(hidden).st_uid == 0
    txn = hidden / "txn-1-0000000000000000-00"
    as_stranger(lambda: plant_journal(txn, OPS))
    CALLS[call](sticky_root)  # returns: not refused, and never loops on the stranger's journal
    expected = dict(VICTIMS)
    if call == "batch-commit":
        expected.update({"mine.txt": b"x", "mine2.txt": b"y"})
    assert tree(sticky_root) == expected
    assert sorted(os.listdir(txn)) == ["0", "journal"]  # left alone: not ours to judge


@needs_root
def test_the_hidden_directory_is_no_more_open_than_the_root(
    tmp_path: Path, umask: Callable[[int], int]
) -> None:
    with world_traversable_dir() as root:
        (root / "victim.txt").write_bytes(VICTIMS["victim.txt"])
        (root / "precious.txt").write_bytes(VICTIMS["precious.txt"])
        umask(0)  # a container's default: every directory made world-writable
        recover(root)
        hidden = root / HIDDEN_DIR
        assert stat.S_IMODE(os.stat(hidden).st_mode) == stat.S_IMODE(os.stat(root).st_mode)

        def try_to_plant() -> None:
            try:
                plant_journal(hidden / "txn-1-0000000000000000-00", OPS)
            except PermissionError:
                return
            raise AssertionError("the stranger planted a journal the root's owner replays")

        as_stranger(try_to_plant)
        recover(root)
        assert tree(root) == VICTIMS


def test_a_symlinked_staging_directory_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "victim.txt").write_bytes(VICTIMS["victim.txt"])
    (root / "precious.txt").write_bytes(VICTIMS["precious.txt"])
    elsewhere = tmp_path / "elsewhere"
    plant_journal(elsewhere, OPS)
    (root / HIDDEN_DIR).mkdir()
    (root / HIDDEN_DIR / "txn-1-0000000000000000-00").symlink_to(elsewhere)
    assert recover(root) == RecoveryReport()
    assert read_snapshot(root, ["victim.txt"], timeout=5) == {"victim.txt": b"root's data"}
    assert tree(root) == VICTIMS
    assert sorted(os.listdir(elsewhere)) == ["0", "journal"]


# --------------------------------------------------------------------------
# A batch write keeps atomic_write's rules for what it replaces
# --------------------------------------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def _fifo_via_symlink(path: Path) -> None:
    _fifo(path.parent / "node")
    path.symlink_to("node")


def _strangers_file(path: Path) -> None:
    path.write_text("the stranger's file")
    path.chmod(0o644)
    os.chown(path, STRANGER, STRANGER)


def _strangers_link(path: Path) -> None:
    (path.parent / "roots.txt").write_text("root's file")
    path.symlink_to("roots.txt")
    os.lchown(path, STRANGER, STRANGER)


PLANTS: dict[str, tuple[Callable[[Path], None], bool]] = {
    # name: (how to plant it at the target, needs root)
    "fifo": (_fifo, False),
    "socket": (_socket, False),
    "fifo-via-symlink": (_fifo_via_symlink, False),
    "strangers-file": (_strangers_file, True),
    "strangers-symlink": (_strangers_link, True),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_batch_write_is_refused_where_atomic_write_is(
    sticky_root: Path, plant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, root_only = PLANTS[plant]
    if root_only and not is_root():
        pytest.skip("needs root (a file or symlink of another user)")
    # fs.protected_regular and fs.protected_symlinks as most distributions
    # set them, whatever this host says (read by the library, never changed).
    monkeypatch.setattr(_platform, "_sysctl", lambda name, default: 1)
    target = sticky_root / "target"
    make(target)
    before = {name: os.lstat(sticky_root / name) for name in os.listdir(sticky_root)}
    refused = "not a regular file|protected_"
    with pytest.raises(OSError, match=refused) as expected:
        atomic_write(target, "root's secret")
    batch = AtomicBatch(sticky_root)
    with pytest.raises(OSError, match=refused) as info:
        batch.write("target", "root's secret")
    assert type(info.value) is type(expected.value)
    assert info.value.errno == expected.value.errno in (errno.EACCES, errno.EINVAL)
    batch.write("other.txt", "still usable")  # the refusal left the batch usable
    batch.commit()
    assert (sticky_root / "other.txt").read_text() == "still usable"
    for name, st in before.items():
        now = os.lstat(sticky_root / name)
        assert (now.st_ino, now.st_mode, now.st_uid) == (st.st_ino, st.st_mode, st.st_uid), name


# --------------------------------------------------------------------------
# A whole-tree snapshot and what is not a regular file
# --------------------------------------------------------------------------


def test_a_whole_snapshot_skips_what_is_not_a_file_and_reads_links_inside_root(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.txt").write_text("b")
    (tmp_path / "outside.txt").write_text("outside")
    (root / "link.txt").symlink_to("sub/b.txt")
    (root / "out.txt").symlink_to(tmp_path / "outside.txt")
    (root / "dangling.txt").symlink_to("nowhere.txt")
    _fifo(root / "fifo")
    _socket(root / "sub" / "sock")
    recover(root)  # makes the hidden directory
    (root / HIDDEN_DIR / "notes").write_text("the library's")
    (root / "notes.txt").symlink_to(f"{HIDDEN_DIR}/notes")
    assert read_snapshot(root, timeout=5) == {
        "a.txt": b"a",
        "sub/b.txt": b"b",
        "link.txt": b"b",
    }
    assert read_snapshot(root, ["link.txt"], timeout=5) == {"link.txt": b"b"}
    with pytest.raises(OSError, match="not a regular file") as info:
        read_snapshot(root, ["fifo"], timeout=5)  # named, it is an error (never a hang)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "start",
    ["1e400", "-1e400", "NaN", "Infinity", '"soon"', "null", "true", "[" * 100_000 + "]" * 100_000],
    ids=["1e400", "-1e400", "NaN", "Infinity", "string", "null", "true", "deep"],
)
def test_a_journal_with_an_odd_start_is_not_ours_and_never_stops_recovery(
    tmp_path: Path, start: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "victim.txt").write_bytes(VICTIMS["victim.txt"])
    txn = root / HIDDEN_DIR / "txn-1-0000000000000000-00"
    txn.mkdir(parents=True)
    (txn / "0").write_text("staged")
    ops = '[["write","victim.txt","0",null]]'
    body = f'{{"format":"htmlgraph-batch 1","start_ns":{start},"ops":{ops}}}'.encode()
    (txn / "journal").write_bytes(body + b"\n" + f"{zlib.crc32(body):08x}\n".encode())
    assert recover(root) == RecoveryReport(discarded=1)  # never committed by us: discarded
    assert tree(root) == {"victim.txt": VICTIMS["victim.txt"]}
    assert sorted(os.listdir(root / HIDDEN_DIR)) == ["lock"]


@pytest.fixture
def strangers_root() -> Iterator[Path]:
    """A root the stranger owns, holding a file of theirs, a directory of root's they may
    only read (``ro/``) and a sticky one their group may write (``team/``, 0o1770); each
    directory holds a file of root's."""
    with world_traversable_dir() as base:
        site = base / "site"
        site.mkdir()
        (site / "mine.txt").write_text("old")
        os.chown(site / "mine.txt", STRANGER, STRANGER)
        os.chown(site, STRANGER, STRANGER)
        for name, mode in (("ro", 0o755), ("team", 0o1770)):
            (site / name).mkdir()
            (site / name / "roots.txt").write_text("root's")
            os.chown(site / name, 0, STRANGER)
            (site / name).chmod(mode)
        yield site


@needs_root
@pytest.mark.parametrize(
    ("kind", "rel"),
    [
        ("write", "ro/roots.txt"),
        ("write", "ro/new.txt"),
        ("write", "team/roots.txt"),
        ("delete", "ro/roots.txt"),
        ("delete", "team/roots.txt"),
    ],
)
def test_a_change_the_kernel_would_refuse_is_refused_before_the_commit(
    strangers_root: Path, kind: str, rel: str
) -> None:
    """A rename or unlink the kernel refuses is refused when added, never after the commit point.

    Before, the batch committed its journal, then the kernel refused the
    rename or unlink: the batch stayed half-applied, and every later batch,
    recover and read_snapshot on the root failed on the same refusal.
    """

    def try_it() -> None:
        batch = AtomicBatch(strangers_root, timeout=5)
        batch.write("mine.txt", "new")

        def change() -> None:
            if kind == "write":
                batch.write(rel, "the stranger's")
            else:
                batch.delete(rel)

        with pytest.raises(PermissionError) as info:
            change()
        assert info.value.filename == rel
        batch.commit()  # the refused change left the batch usable
        with AtomicBatch(strangers_root, timeout=5) as after:  # and the root too
            after.write("later.txt", "x")

    as_stranger(try_it)
    assert tree(strangers_root) == {
        "mine.txt": b"new",
        "later.txt": b"x",
        "ro/roots.txt": b"root's",
        "team/roots.txt": b"root's",
    }
    assert library_leftovers(strangers_root) == []


@needs_root
def test_root_may_change_what_a_stranger_may_not(strangers_root: Path) -> None:
    with AtomicBatch(strangers_root, timeout=5) as batch:
        batch.write("ro/roots.txt", "new")
        batch.delete("team/roots.txt")
    assert tree(strangers_root) == {"mine.txt": b"old", "ro/roots.txt": b"new"}


def _as_stranger_with_a_pause(before: Callable[[], object], meanwhile: Callable[[], None]) -> None:
    """Run ``before()`` as the stranger, then ``meanwhile()`` as root, then what it returned."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            become(STRANGER, STRANGER)
            after = before()
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            assert callable(after)
            after()
            code = 0
        finally:
            os._exit(code)
    try:
        assert os.read(ready_r, 1) == b"r", "the stranger failed before the pause"
        meanwhile()
    finally:
        os.write(go_w, b"g")
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the stranger's action failed"


@needs_root
@pytest.mark.parametrize("where", ["ro", "team", "chmod"])
def test_a_change_the_kernel_refuses_since_it_was_added_fails_before_the_commit_point(
    strangers_root: Path, where: str
) -> None:
    """What changed between add and commit is checked again under the lock.

    ``ro``/``team``: a missing_ok delete of a file that was missing when
    added, and that root then made (in a directory the stranger may not
    write; in a sticky one). ``chmod``: the stranger's own directory made
    read-only after a write into it was added. Before, each committed, then
    failed at the unlink or rename, half-applied, and stopped the stranger's
    every later batch.
    """
    if where == "chmod":
        (strangers_root / "own").mkdir()
        os.chown(strangers_root / "own", STRANGER, STRANGER)

    def before() -> Callable[[], None]:
        batch = AtomicBatch(strangers_root, timeout=5)
        batch.write("mine.txt", "new")
        if where == "chmod":
            batch.write("own/x.txt", "new")
            (strangers_root / "own").chmod(0o555)
        else:
            batch.delete(f"{where}/x.txt", missing_ok=True)

        def after() -> None:
            with pytest.raises(PermissionError) as info:
                batch.commit()
            assert info.value.filename in ("own/x.txt", f"{where}/x.txt")
            assert (strangers_root / "mine.txt").read_text() == "old"
            with AtomicBatch(strangers_root, timeout=5) as later:  # the root is not stopped
                later.write("later.txt", "x")

        return after

    def meanwhile() -> None:
        if where != "chmod":
            (strangers_root / where / "x.txt").write_text("root's too")

    _as_stranger_with_a_pause(before, meanwhile)
    expected = {
        "mine.txt": b"old",
        "later.txt": b"x",
        "ro/roots.txt": b"root's",
        "team/roots.txt": b"root's",
    }
    if where != "chmod":
        expected[f"{where}/x.txt"] = b"root's too"
    assert tree(strangers_root) == expected
    assert library_leftovers(strangers_root) == []


@needs_root
def test_another_users_journal_is_never_replayed_with_our_rights(strangers_root: Path) -> None:
    """A journal the stranger wrote in their own (not sticky) root stops root, loudly.

    Before, root's recovery replayed it: root's file in a directory the
    stranger may not write was replaced with the stranger's content. Only
    the stranger may finish it, with the stranger's rights.
    """
    hidden = strangers_root / HIDDEN_DIR
    txn = hidden / "txn-1-0000000000000000-00"
    ops: list[list[object]] = [["write", "ro/roots.txt", "0", None]]

    def plant() -> None:
        plant_journal(txn, ops)
        (hidden / "lock").mkdir()  # the stranger's, as the stranger's own batches make it

    as_stranger(plant)
    for call in ("recover", "read_snapshot", "batch-commit"):
        with pytest.raises(PermissionError, match="only that user") as info:
            CALLS[call](strangers_root)
        assert info.value.filename == str(txn)
    assert (strangers_root / "ro" / "roots.txt").read_text() == "root's"
    assert sorted(os.listdir(txn)) == ["0", "journal"]  # left for its user

    def the_strangers_recovery() -> None:
        with pytest.raises(PermissionError) as info:
            recover(strangers_root, timeout=5)  # with the stranger's rights
        assert info.value.filename2 == str(strangers_root / "ro" / "roots.txt")

    as_stranger(the_strangers_recovery)
    assert (strangers_root / "ro" / "roots.txt").read_text() == "root's"


@needs_root
def test_a_dead_stage_the_caller_cannot_remove_does_not_make_lone_writes_lock(
    sticky_root: Path, umask: Callable[[int], int]
) -> None:
    """Root's dead writer's ``stage-*`` in a sticky hidden directory: the stranger cannot
    remove it, so it must not make every lone write of theirs take the lock (and wait)."""
    umask(0)
    recover(sticky_root)  # root's hidden directory, as open as the sticky root
    hidden = sticky_root / HIDDEN_DIR
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    pid = child.pid  # gone now
    tag = _identity.owner_tag(os.getpid())[:8] + "0" * 8
    (hidden / f"stage-{pid}-{tag}-{'0' * 16}").write_text("a dead writer's")
    holder = DirectoryLocker(hidden / "lock")
    assert holder.acquire_shared_lock(timeout=0)  # a snapshot in progress
    try:

        def lone_write() -> None:
            with AtomicBatch(sticky_root, timeout=0) as batch:
                batch.write("mine.txt", "x")

        as_stranger(lone_write)  # LockTimeout before: it took the lock to remove the stage
    finally:
        holder.release_lock()
    assert (sticky_root / "mine.txt").read_text() == "x"


@needs_root
def test_a_dead_users_staging_stops_another_user_until_it_is_cleared() -> None:
    """Two users share a group root; one dies while staging (its txn-* is 0o700).

    The other cannot look inside, so it cannot know the batch never
    committed: its batches refuse loudly, naming the directory, rather than
    build on what may be a committed batch. Root can look inside: it removes
    the staging, and the other user goes on.
    """
    user_a, user_b, group = STRANGER, STRANGER + 1, STRANGER + 2
    with world_traversable_dir() as base:
        site = base / "site"
        site.mkdir()
        os.chown(site, user_a, group)
        site.chmod(0o2775)

        def stage_and_die() -> None:
            batch = AtomicBatch(site, timeout=5)
            batch.write("a.txt", "A")
            batch.write("b.txt", "A")  # two writes: a txn-* of its own
            os._exit(0)  # killed: nothing cleaned up

        as_user(user_a, group, stage_and_die, umask=0o002)
        (txn,) = [p for p in (site / HIDDEN_DIR).iterdir() if p.name.startswith("txn-")]
        assert stat.S_IMODE(os.stat(txn).st_mode) & 0o777 == 0o700

        def refused() -> None:
            with (
                pytest.raises(PermissionError, match="cannot be looked into") as info,
                AtomicBatch(site, timeout=5) as batch,
            ):
                batch.write("mine.txt", "B")
            assert info.value.filename == str(txn)
            with pytest.raises(PermissionError, match="cannot be looked into"):
                read_snapshot(site, timeout=5)

        as_user(user_b, group, refused, umask=0o002)
        # Root looks inside: never committed. It removes the txn-* and the
        # first write's stage-* (which B may not remove: it counted for nobody).
        assert recover(site) == RecoveryReport(discarded=2)

        def goes_on() -> None:
            with AtomicBatch(site, timeout=5) as batch:
                batch.write("mine.txt", "B")
                batch.write("more.txt", "B")

        as_user(user_b, group, goes_on, umask=0o002)
        assert tree(site) == {"mine.txt": b"B", "more.txt": b"B"}
        assert library_leftovers(site) == []
