"""Power cuts at every step of the batch protocol, on ext4, xfs and btrfs (root only).

Method (the crash lab's, ``tests/crashlab/loopfs.py``): each filesystem lives
on a loop device; a child runs the standard batch (``crashlab.batchchild``)
and pauses at protocol step ``k`` (or after ``commit()`` returned); the parent
copies the backing image without any sync - the disk as a power cut at that
instant would leave it - then mounts the copy (journal replay), runs
``recover()`` on it, reads the tree, unmounts and runs the read-only checker.

Required of the real protocol: before the journal's rename the old tree;
right after the rename (before its directory fsync) old or new; from the
commit point on - and after every step of a recovery interrupted in turn -
the new tree; never a mix, never library leftovers after recovery, never a
checker complaint. Batches of one operation (``one-write``, ``one-delete``:
no journal) are cut at each of their steps too: old before the rename or
unlink, old or new right after it, new once its directory is synced. Four
mutants (:data:`crashlab.batchchild.MUTANTS`) must each fail at least one
case, and the two that apply to one operation must fail one of its cases,
or the lab could not see what it claims to rule out. The table is printed
(``-s``); ``CRASHLAB_REPORT=path`` also writes it to a file.
"""

from __future__ import annotations

import collections
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from crashlab.batchchild import (
    COMMIT_STEPS,
    CRASH_EXIT,
    MUTANTS,
    NEW_TREE,
    OLD_TREE,
    ONE_DELETE_STEPS,
    ONE_NEW_TREES,
    ONE_WRITE_STEPS,
    make_old,
    tree,
)
from crashlab.loopfs import FILESYSTEMS, FsKind, LoopFs, Stage, leftover_lab_state, skip_reason
from htmlgraph.batch import HIDDEN_DIR, recover

pytestmark = [pytest.mark.slow, pytest.mark.root]

_TESTS = Path(__file__).resolve().parent
_SRC = _TESTS.parent / "src"
LAB_FS = ("ext4", "xfs", "btrfs")
MUTANT_FS = ("ext4", "xfs")
RECOVERY_STEPS = 8  # five ops, applied, synced, retired
_BEFORE = {"locked", "journal-written", "staged-durable", "one-durable", "one-checked"}
_EITHER = {"journal-renamed", "one-applied"}
# Batches of one operation (no journal): their steps, and the mutants that
# apply to them (the fsync of the staged file; the directory fsync).
ONE_MODES = {"one-write": ONE_WRITE_STEPS, "one-delete": ONE_DELETE_STEPS}
ONE_MUTANTS = {"one-write": ("no-staged-fsync", "no-dir-fsync"), "one-delete": ("no-dir-fsync",)}
_TIMEOUT = 60.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_TESTS), str(_SRC)])
    return env


def _child(root: Path, mode: str, k: int, mutant: str) -> subprocess.Popen[str]:
    pipe = subprocess.DEVNULL if mode == "crash" else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "crashlab.batchchild", str(root), mode, str(k), mutant],
        stdin=pipe,
        stdout=pipe,
        env=_env(),
        cwd=str(_TESTS),
        text=True,
    )


def _classify(files: dict[str, bytes], mode: str) -> str:
    if files == OLD_TREE:
        return "old"
    if files == ONE_NEW_TREES.get(mode, NEW_TREE):
        return "new"
    return "mixed"


class BatchLab:
    """Power-cut trials of the batch protocol on one mounted filesystem."""

    def __init__(self, stage: Stage, fs: LoopFs) -> None:
        self.stage = stage
        self.fs = fs
        self.n = 0

    def _fresh_root(self) -> Path:
        self.n += 1
        root = Path(self.fs.mnt) / f"t{self.n}" / "site"
        root.mkdir(parents=True)
        make_old(root)
        self.fs.syncfs()
        return root

    def trial(self, mode: str, k: int, mutant: str) -> str:
        """Cut at step ``k`` of ``mode`` (commit/recover); return what recovery left."""
        root = self._fresh_root()
        if mode == "recover":  # first an interrupted batch: crash after its first rename
            crash = _child(root, "crash", 6, "none")
            assert crash.wait(_TIMEOUT) == CRASH_EXIT
        proc = _child(root, mode, k, mutant)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], _TIMEOUT)
            assert ready, "child did not reach its pause"
            line = proc.stdout.readline().strip()
            assert line.startswith("at "), f"child said {line!r}"
            snap = self.fs.power_cut()
        finally:
            proc.kill()
            proc.wait(_TIMEOUT)
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.stdin is not None:
                proc.stdin.close()
        return self._inspect(snap, root.relative_to(self.fs.mnt), mode)

    def _inspect(self, snap: str, rel: Path, mode: str) -> str:
        kind: FsKind = self.fs.kind
        mnt = self.stage.root / f"inspect-{Path(snap).name}"
        mnt.mkdir()
        dev = self.stage.attach(snap)
        state = ""
        try:
            try:
                self.stage.mount(dev, str(mnt), kind.fstype, kind.copy_mount_opts)
            except RuntimeError:
                state = "unmountable"
            else:
                try:
                    root = mnt / rel
                    try:
                        recover(root)
                    except OSError as exc:
                        state = f"recover failed: {exc}"
                    else:
                        state = _classify(tree(root), mode)
                        hidden = root / HIDDEN_DIR
                        left = [n for n in os.listdir(hidden) if n != "lock"]
                        if left or os.listdir(hidden / "lock"):
                            state += "+leftovers"
                finally:
                    self.stage.umount(str(mnt))
        finally:
            self.stage.detach(dev)
            mnt.rmdir()
        proc = subprocess.run(
            [*kind.fsck, snap], capture_output=True, text=True, timeout=120, check=False
        )
        os.unlink(snap)
        if proc.returncode != 0:
            state += "+fsck"
        return state


def _allowed(mode: str, step: str) -> set[str]:
    if mode == "recover":
        return {"new"}
    if step in _BEFORE:
        return {"old"}
    if step in _EITHER:
        return {"old", "new"}
    return {"new"}


Row = tuple[str, str, str, str]  # fs, mode, step, mutant


@pytest.fixture(scope="module")
def outcomes() -> dict[Row, collections.Counter[str]]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    found: dict[Row, collections.Counter[str]] = {}
    with Stage() as stage:
        for name in LAB_FS:
            kind = FILESYSTEMS[name]
            if skip_reason(kind):
                continue
            fs = stage.make_fs(kind)
            lab = BatchLab(stage, fs)
            plan = [("commit", k, COMMIT_STEPS[k - 1] if k else "returned") for k in range(14)]
            plan += [("recover", j, f"recovery step {j}") for j in range(1, RECOVERY_STEPS + 1)]
            for one, steps in ONE_MODES.items():
                plan += [(one, k, steps[k - 1] if k else "returned") for k in range(len(steps) + 1)]
            for mode, k, step in plan:
                mutants = ["none"]
                if mode == "commit" and name in MUTANT_FS:
                    mutants += list(MUTANTS)
                elif mode in ONE_MUTANTS and name in MUTANT_FS:
                    mutants += list(ONE_MUTANTS[mode])
                for mutant in mutants:
                    row = (name, mode, step, mutant)
                    found.setdefault(row, collections.Counter())[lab.trial(mode, k, mutant)] += 1
        prefix = str(stage.root)
    assert leftover_lab_state(prefix) == []
    return found


def _table(found: dict[Row, collections.Counter[str]]) -> str:
    lines = [
        "| filesystem | cut at | real protocol | " + " | ".join(MUTANTS) + " |",
        "|---|---|---|" + "---|" * len(MUTANTS),
    ]
    seen: set[tuple[str, str, str]] = set()
    for fs, mode, step, _ in found:
        if (fs, mode, step) in seen:
            continue
        seen.add((fs, mode, step))
        cells = []
        for mutant in ("none", *MUTANTS):
            counter = found.get((fs, mode, step, mutant))
            if not counter:
                cells.append("-")
                continue
            label = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(counter.items()))
            if set(counter) - _allowed(mode, step):
                label = f"**{label}**"
            cells.append(label)
        where = {"commit": step, "recover": f"recovery: {step}"}.get(mode, f"{mode}: {step}")
        lines.append(f"| {fs} | {where} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@pytest.mark.parametrize("fs", LAB_FS)
def test_batch_survives_power_cuts_at_every_step(
    outcomes: dict[Row, collections.Counter[str]], fs: str
) -> None:
    rows = {row: c for row, c in outcomes.items() if row[0] == fs and row[3] == "none"}
    if not rows:
        pytest.skip(f"{fs} not available here")
    bad = {row: dict(c) for row, c in rows.items() if set(c) - _allowed(row[1], row[2])}
    assert not bad, f"power cuts broke the batch on {fs}: {bad}"


@pytest.mark.parametrize("mutant", MUTANTS)
def test_every_mutant_fails_some_case(
    outcomes: dict[Row, collections.Counter[str]], mutant: str
) -> None:
    rows = {row: c for row, c in outcomes.items() if row[3] == mutant}
    if not rows:
        pytest.skip("no mutant filesystem available here")
    bad = [row for row, c in rows.items() if set(c) - _allowed(row[1], row[2])]
    assert bad, f"mutant {mutant} passed every case: the lab cannot see what it rules out"


@pytest.mark.parametrize("mutant", ["no-staged-fsync", "no-dir-fsync"])
def test_one_operation_mutants_fail_some_case(
    outcomes: dict[Row, collections.Counter[str]], mutant: str
) -> None:
    # The fast path for one operation has its own fsyncs: removing each must
    # be visible there too, not only in the journaled protocol.
    rows = {row: c for row, c in outcomes.items() if row[3] == mutant and row[1] in ONE_MODES}
    if not rows:
        pytest.skip("no mutant filesystem available here")
    bad = [row for row, c in rows.items() if set(c) - _allowed(row[1], row[2])]
    assert bad, f"mutant {mutant} passed every one-operation case"


def test_outcome_table(
    outcomes: dict[Row, collections.Counter[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    text = _table(outcomes)
    with capsys.disabled():
        print("\n" + text)
    report = os.environ.get("CRASHLAB_REPORT")
    if report:
        Path(report).write_text(text + "\n", encoding="utf-8")
