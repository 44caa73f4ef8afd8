"""Power-cut lab: a committed durable write survives a cut at any crash point.

Method (details in ``docs/crash-safety.md`` and ``tests/crashlab/``): each
filesystem lives on a loop device; a worker child performs the write and says
``committed``; the parent then snapshots the backing image without any sync
(the disk as a power cut would leave it), mounts the snapshot (journal replay),
reads the target, and runs the filesystem's read-only checker. Crash points:
right after the call returned, after an fsync of an unrelated file, after a
periodic journal commit (all: the new content must be there, nothing else), and
at a random instant during the call (old or new, never torn or empty; an
orphaned temp file is allowed).

The same harness runs two negative controls - the library with
``durable=False`` and a bare temp+rename writer - and two mutants of the
correct protocol (no directory fsync; no file fsync). Each must lose committed
writes on xfs and on ext4 with ``noauto_da_alloc``; otherwise the harness could
not see the failure it claims to rule out, and the test fails.

Set ``CRASHLAB_TRIALS`` to change the trials per cell for ``durable=True``
(default 3; 2 at the periodic-commit crash point), ``CRASHLAB_REPORT`` to a
path to also write the Markdown outcome table there, and
``CRASHLAB_UPDATE_DOCS=1`` to rewrite the result sections of
``docs/crash-safety.md`` (between its ``crashlab:`` markers) from this run.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import traceback
from pathlib import Path

import pytest

from crashlab.loopfs import (
    FILESYSTEMS,
    FsKind,
    Stage,
    leftover_lab_state,
    lowered_sysctl,
    skip_reason,
)
from crashlab.powercut import CRASH_POINTS, WRITERS, PowerCutLab, Tally, all_scenarios

pytestmark = [pytest.mark.slow, pytest.mark.root]

TRIALS = int(os.environ.get("CRASHLAB_TRIALS", "3"))
PERIODIC_TRIALS = max(1, TRIALS - 1)
CONTROL_TRIALS = 1
# Filesystems where both controls must show losses (xfs has no rename heuristic;
# noauto_da_alloc switches ext4's off). ext4 and btrfs flush a file renamed over
# another one at rename time, so their controls may come out clean for replaces.
MUST_LOSE = ("xfs", "ext4-noauto_da_alloc")
# Nearest analogue of ext4's commit=1 for xfs: the log worker interval (seconds x 100).
XFS_SYNCD = "/proc/sys/fs/xfs/xfssyncd_centisecs"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "crash-safety.md"


def update_docs(path: Path, sections: dict[str, str]) -> None:
    """Replace each ``<!-- crashlab:NAME -->...<!-- /crashlab:NAME -->`` block's body."""
    text = path.read_text(encoding="utf-8")
    for name, body in sections.items():
        start, end = f"<!-- crashlab:{name} -->\n", f"<!-- /crashlab:{name} -->"
        assert text.count(start) == 1, f"marker crashlab:{name} not found once in {path}"
        assert text.count(end) == 1, f"marker /crashlab:{name} not found once in {path}"
        head, rest = text.split(start)
        _old, tail = rest.split(end)
        text = head + start + body.rstrip() + "\n" + end + tail
    path.write_text(text, encoding="utf-8")


def trials_for(writer: str, point: str) -> int:
    """Planned trials per cell."""
    if writer.startswith("no-"):
        # The mutants show *which* crash point catches which missing fsync; the
        # periodic point adds nothing there but seconds of waiting.
        return 0 if point in ("periodic", "during") else CONTROL_TRIALS
    if writer != "ours":
        return CONTROL_TRIALS
    return PERIODIC_TRIALS if point == "periodic" else TRIALS


@dataclasses.dataclass
class LabRun:
    """Everything the module's tests assert on."""

    tally: Tally
    skipped: dict[str, str]
    errors: dict[str, str]
    worker_rc: dict[str, int]
    leaks: list[str]
    snapshot_method: str
    points: tuple[str, ...]
    seconds: float
    xfs_syncd_lowered: bool


def _run_fs(stage: Stage, kind: FsKind, run: LabRun, lock: threading.Lock) -> None:
    tally = Tally()
    try:
        fs = stage.make_fs(kind)
        # Can a snapshot of this mounted filesystem be mounted at all here?
        # (Older kernels refuse a btrfs clone whose fsid is already mounted.)
        probe = stage.inspect(kind, fs.power_cut(), [], [])
        if probe.mount_error is not None:
            with lock:
                run.skipped[kind.name] = f"cannot mount a snapshot: {probe.mount_error}"
            return
        lab = PowerCutLab(fs)
        try:
            for point in run.points:
                for scenario in all_scenarios():
                    for writer in WRITERS:
                        for _ in range(trials_for(writer, point)):
                            outcome = lab.trial(writer, scenario, point)
                            tally.add((kind.name, point, scenario.name, writer), outcome)
        finally:
            rc = lab.close()
            with lock:
                run.worker_rc[kind.name] = rc
    except Exception:
        with lock:
            run.errors[kind.name] = traceback.format_exc()
    with lock:
        run.tally.counts.update(tally.counts)
        run.tally.bad.update(tally.bad)
        run.tally.failures += tally.failures


@pytest.fixture(scope="module")
def lab_run() -> LabRun:
    """Run every filesystem's trials once (in parallel threads) for the whole module."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    run = LabRun(Tally(), {}, {}, {}, [], "", CRASH_POINTS, 0.0, False)
    kinds = []
    for kind in FILESYSTEMS.values():
        why = skip_reason(kind)
        if why:
            run.skipped[kind.name] = why
        else:
            kinds.append(kind)
    started = time.monotonic()
    lock = threading.Lock()
    stage_root = ""
    with lowered_sysctl(XFS_SYNCD, 100) as lowered, Stage() as stage:
        run.xfs_syncd_lowered = lowered
        stage_root = str(stage.root)
        run.snapshot_method = stage.snapshot_method
        if stage.snapshot_method != "FICLONE":
            # A byte copy takes milliseconds; while the call is still running
            # it can catch a later journal block but an earlier data block -
            # a disk no power cut can produce (seen: NUL-filled targets). Only
            # an atomic snapshot may cut during the call.
            run.points = tuple(p for p in CRASH_POINTS if p != "during")
        # The filesystems are independent; running them side by side overlaps
        # the periodic-commit waits (sleeping, not computing).
        threads = [
            threading.Thread(target=_run_fs, args=(stage, kind, run, lock), daemon=True)
            for kind in kinds
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=900)
            assert not thread.is_alive(), "power-cut lab thread did not finish in 15 min"
    run.leaks = leftover_lab_state(stage_root)
    run.seconds = time.monotonic() - started
    return run


def _require(run: LabRun, fs: str) -> None:
    if fs in run.skipped:
        pytest.skip(run.skipped[fs])
    assert fs not in run.errors, run.errors[fs]
    assert run.worker_rc.get(fs) == 0, f"worker exit code {run.worker_rc.get(fs)}"


@pytest.mark.parametrize("fs", list(FILESYSTEMS))
def test_durable_write_survives_power_cut(lab_run: LabRun, fs: str) -> None:
    _require(lab_run, fs)
    planned = sum(
        trials_for("ours", p) for p in lab_run.points for _ in all_scenarios()
    )  # per filesystem
    assert lab_run.tally.trials("ours", fs) == planned
    failures = [f for f in lab_run.tally.failures if f.startswith(f"('{fs}',")]
    assert failures == [], "\n".join(failures)
    assert lab_run.tally.losses(["ours"], fs) == 0


def test_some_cuts_landed_inside_the_call(lab_run: LabRun) -> None:
    """The "during" crash point really cuts before the write is durable, at least sometimes."""
    before_commit = sum(
        n
        for (fs, point, _scenario, writer), counter in lab_run.tally.counts.items()
        if point == "during" and writer == "ours"
        for label, n in counter.items()
        if not label.startswith("new")
    )
    if not lab_run.tally.counts:
        pytest.skip("no filesystem could run")
    if "during" not in lab_run.points:
        pytest.skip(f"snapshots by {lab_run.snapshot_method} are not atomic: no cuts during a call")
    assert before_commit > 0, "every 'during' cut came after the commit: the point is not tested"


@pytest.mark.parametrize("fs", MUST_LOSE)
@pytest.mark.parametrize("writer", ["nondurable", "bare", "no-dir-fsync", "no-file-fsync"])
def test_negative_control_loses_committed_writes(lab_run: LabRun, fs: str, writer: str) -> None:
    """The harness can see a lost write: without (one of) the fsyncs, committed data goes."""
    _require(lab_run, fs)
    assert lab_run.tally.trials(writer, fs) > 0
    assert lab_run.tally.losses([writer], fs) > 0, (
        f"negative control {writer!r} lost nothing on {fs}: the harness cannot see power cuts"
    )


def test_lab_leaves_no_mounts_or_loop_devices(lab_run: LabRun) -> None:
    assert lab_run.leaks == []


def test_outcome_table(lab_run: LabRun, capsys: pytest.CaptureFixture[str]) -> None:
    ran = [fs for fs in FILESYSTEMS if fs not in lab_run.skipped]
    if not ran:
        pytest.skip("no filesystem could run")
    names = [s.name for s in all_scenarios()]
    for fs in ran:
        _require(lab_run, fs)
        for point in lab_run.points:
            for scenario in names:
                for writer in WRITERS:
                    counter = lab_run.tally.counts.get((fs, point, scenario, writer))
                    done = sum(counter.values()) if counter else 0
                    assert done == trials_for(writer, point), (fs, point, scenario, writer)
    table = lab_run.tally.markdown(ran, names)
    header = (
        f"Power-cut lab: {lab_run.seconds:.0f} s, snapshots by {lab_run.snapshot_method}, "
        f"skipped: {lab_run.skipped or 'none'}"
        + ("" if lab_run.xfs_syncd_lowered else f"; could not lower {XFS_SYNCD}")
        + "\n"
    )
    with capsys.disabled():
        print("\n" + header + table)
    out = os.environ.get("CRASHLAB_REPORT")
    if out:
        Path(out).write_text(header + "\n" + table, encoding="utf-8")
    if os.environ.get("CRASHLAB_UPDATE_DOCS") == "1":
        trials = lab_run.tally.trials
        update_docs(
            DOCS,
            {
                "summary": header
                + "\n"
                + ", ".join(f"{w}: {trials(w)} trials" for w in WRITERS)
                + ".\n\n"
                + lab_run.tally.summary(ran),
                "table": lab_run.tally.markdown(ran, names).split("\n\nTotals")[0],
            },
        )
