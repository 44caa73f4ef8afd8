"""Power-cut trials: set up old content durably, write in a child, cut, inspect.

One trial:

1. In a fresh directory on the filesystem under test, create the directories
   the scenario needs and (for "replace" scenarios) the old content; fsync it
   and ``sync -f`` the filesystem, so the starting state is on the disk.
2. Ask the worker child to perform the write; it prints ``committed`` as soon
   as the call returns.
3. Crash point: ``immediate`` (nothing), ``fsync-other`` (fsync a new unrelated
   file on the same filesystem: forces a journal commit that may carry the
   rename without the data), or ``periodic`` (wait for the filesystem's
   periodic commit). ``during`` cuts at a random instant *while* the call runs
   (before ``committed``): then old-or-new (missing-or-new for a create) is
   required, and an orphaned temp file is allowed.
4. Snapshot the backing image (the power cut), mount the snapshot (journal
   replay), read the target and list its directories, unmount, run the
   read-only checker.

A committed write whose new content is not on the snapshot is *lost*.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from crashlab.loopfs import LoopFs
from crashlab.payloads import SCENARIOS, Scenario, content, encoded, matches
from crashlab.worker import fsync_dir

CRASH_POINTS = ("immediate", "fsync-other", "periodic", "during")
WRITERS = ("ours", "nondurable", "bare", "no-dir-fsync", "no-file-fsync")
WRITER_TITLES = {
    "ours": "ours (durable=True)",
    "nondurable": "control: durable=False",
    "bare": "control: bare temp+rename",
    "no-dir-fsync": "mutant: no dir fsync",
    "no-file-fsync": "mutant: no file fsync",
}
_TESTS_DIR = Path(__file__).resolve().parent.parent
_SRC_DIR = _TESTS_DIR.parent / "src"
_WORKER_TIMEOUT = 60.0
TARGET_NAME = "target.dat"


class Worker:
    """A long-lived child process that performs writes on request."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_TESTS_DIR), str(_SRC_DIR), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crashlab.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )

    def send(self, request: dict[str, object]) -> None:
        """Send one request without waiting for the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> str:
        """The child's next reply line (bounded wait)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], _WORKER_TIMEOUT)
        if not ready:
            raise TimeoutError(f"worker did not answer in {_WORKER_TIMEOUT} s")
        return self.proc.stdout.readline().strip()

    def write(self, request: dict[str, object]) -> str:
        """Send one request; return the child's reply line (bounded wait)."""
        self.send(request)
        return self.reply()

    def close(self) -> int:
        """Stop the child (bounded) and return its exit code."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one trial found on the snapshot.

    Attributes:
        state: "new" (complete new content), "old" (old content after commit),
            "missing", "empty", "zeros" (NUL-filled), "torn" (anything else),
            "unmountable" or "error" (the write itself failed).
        stray: unexpected directory entries (temp files, extra names).
        fsck_ok: the read-only checker reported a clean filesystem.
        detail: text for failure messages.
    """

    state: str
    stray: tuple[str, ...]
    fsck_ok: bool
    detail: str = ""
    mid_call: bool = False

    @property
    def label(self) -> str:
        """Short table label, e.g. ``new`` or ``empty+stray``."""
        label = self.state
        if self.stray:
            label += "+stray"
        if not self.fsck_ok:
            label += "+fsck"
        return label

    @property
    def good(self) -> bool:
        """What a correct durable writer must leave.

        After the call returned: the new content and nothing else. Cut during
        the call: the old content or the new (for a create, none or the new);
        the temp file may be left as an orphan for the cleanup to remove.
        """
        if not self.fsck_ok:
            return False
        if self.mid_call:
            orphans_only = all(os.path.basename(s).startswith(".tmp-") for s in self.stray)
            return self.state in ("old", "new", "missing") and orphans_only
        return self.state == "new" and not self.stray


def _durable_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _classify(scenario: Scenario, trial: int, data: bytes | None) -> str:
    if data is None:
        return "missing"
    if matches(scenario, data, content(scenario, "new", trial)):
        return "new"
    if scenario.existing and matches(scenario, data, content(scenario, "old", trial)):
        return "old"
    if not data:
        return "empty"
    if data.count(0) == len(data):
        return "zeros"
    return "torn"


class PowerCutLab:
    """Runs trials on one mounted filesystem with one worker child."""

    def __init__(self, fs: LoopFs, seed: str = "crashlab") -> None:
        self.fs = fs
        # Not started inside the mount: a stray worker must not keep it busy.
        self.worker = Worker()
        self._trial = 0
        self._rng = random.Random(f"{seed}/{fs.kind.name}")
        # Running estimate of one call per writer, to aim "during" cuts inside it.
        self._call_seconds: dict[str, float] = {}
        self.other = Path(fs.mnt) / "other"
        self.other.mkdir(exist_ok=True)

    def close(self) -> int:
        """Stop the worker; returns its exit code."""
        return self.worker.close()

    def _learn(self, writer: str, seconds: float) -> None:
        old = self._call_seconds.get(writer, seconds)
        self._call_seconds[writer] = 0.7 * old + 0.3 * seconds

    def trial(self, writer: str, scenario: Scenario, point: str) -> Outcome:
        """Run one power-cut trial and classify what survived."""
        self._trial += 1
        trial = self._trial
        mnt = Path(self.fs.mnt)
        base_rel = f"t{trial}"
        base = mnt / base_rel
        base.mkdir()
        if scenario.new_dirs:
            dir_rel = f"{base_rel}/a/b"
        else:
            dir_rel = f"{base_rel}/d"
            (mnt / dir_rel).mkdir()
            fsync_dir(mnt / dir_rel)
        target_rel = f"{dir_rel}/{TARGET_NAME}"
        if scenario.existing:
            _durable_file(mnt / target_rel, encoded(scenario, content(scenario, "old", trial)))
            fsync_dir(mnt / dir_rel)
        call_rel = target_rel
        link_dir_rel = f"{base_rel}/link"
        if scenario.via_symlink:
            (mnt / link_dir_rel).mkdir()
            call_rel = f"{link_dir_rel}/{TARGET_NAME}"
            (mnt / call_rel).symlink_to(f"../d/{TARGET_NAME}")
            fsync_dir(mnt / link_dir_rel)
        fsync_dir(base)
        fsync_dir(mnt)
        self.fs.syncfs()

        request: dict[str, object] = {
            "writer": writer,
            "scenario": scenario.name,
            "trial": trial,
            "path": str(mnt / call_rel),
        }
        snap = ""
        if point == "during":
            sent = time.monotonic()
            self.worker.send(request)
            time.sleep(self._rng.uniform(0.0, self._call_seconds.get(writer, 0.02)))
            snap = self.fs.power_cut()
            reply = self.worker.reply()
            # Keep the cut inside the call: track how long calls take here.
            self._learn(writer, time.monotonic() - sent)
        else:
            started = time.monotonic()
            reply = self.worker.write(request)
            self._learn(writer, time.monotonic() - started)
        if reply != "committed":
            if snap:
                os.unlink(snap)
            return Outcome("error", (), True, reply)
        if point == "fsync-other":
            fd = os.open(self.other / f"u{trial}", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, b"unrelated\n" * 400)
                os.fsync(fd)
            finally:
                os.close(fd)
        elif point == "periodic":
            time.sleep(self.fs.kind.periodic_wait)
        if not snap:
            snap = self.fs.power_cut()

        dirs = [dir_rel]
        if scenario.new_dirs:
            dirs += [base_rel, f"{base_rel}/a"]
        links = [call_rel] if scenario.via_symlink else []
        if scenario.via_symlink:
            dirs.append(link_dir_rel)
        report = self.fs.stage.inspect(self.fs.kind, snap, [target_rel], dirs, links)
        mid_call = point == "during"
        if report.mount_error is not None:
            return Outcome("unmountable", (), report.fsck_rc == 0, report.mount_error, mid_call)
        state = _classify(scenario, trial, report.files[target_rel])
        expected = {
            dir_rel: [TARGET_NAME],
            base_rel: ["a"],
            f"{base_rel}/a": ["b"],
            link_dir_rel: [TARGET_NAME],
        }
        stray: list[str] = []
        for rel in dirs:
            listing = report.listings[rel]
            if listing is not None and listing != expected[rel]:
                stray += [f"{rel}/{name}" for name in listing if name not in expected[rel]]
        # Writing through a link must keep the link (DESIGN 2.6).
        stray += [f"{rel} (no longer a symlink)" for rel in links if report.links[rel] is None]
        detail = ""
        if report.fsck_rc != 0:
            detail = report.fsck_output[-2000:]
        return Outcome(state, tuple(stray), report.fsck_rc == 0, detail, mid_call)


Cell = tuple[str, str, str, str]  # (fs, point, scenario, writer)


class Tally:
    """Outcome counts per filesystem x crash point x scenario x writer."""

    def __init__(self) -> None:
        self.counts: dict[Cell, collections.Counter[str]] = {}
        self.failures: list[str] = []
        self.bad: collections.Counter[Cell] = collections.Counter()

    def add(self, cell: Cell, outcome: Outcome) -> None:
        """Record one trial."""
        self.counts.setdefault(cell, collections.Counter())[outcome.label] += 1
        if cell[3] == "ours" and not outcome.good:
            self.bad[cell] += 1
            self.failures.append(f"{cell}: {outcome.label} {outcome.stray} {outcome.detail}")

    def trials(self, writer: str, fs: str | None = None) -> int:
        """Number of trials for a writer (optionally on one filesystem)."""
        return sum(
            sum(c.values())
            for cell, c in self.counts.items()
            if cell[3] == writer and (fs is None or cell[0] == fs)
        )

    def losses(self, writers: Iterable[str], fs: str) -> int:
        """Trials on ``fs`` by ``writers`` whose committed content was not fully on disk.

        Cuts during the call do not count: the write had not committed yet.
        """
        wanted = set(writers)
        return sum(
            n
            for cell, c in self.counts.items()
            if cell[0] == fs and cell[3] in wanted and cell[1] != "during"
            for label, n in c.items()
            if label != "new"
        )

    def markdown(self, filesystems: Sequence[str], scenarios: Sequence[str]) -> str:
        """The outcome table, one row per filesystem x crash point x scenario."""

        def fmt(counter: collections.Counter[str] | None) -> str:
            if not counter:
                return "-"
            return ", ".join(f"{label} {n}" for label, n in sorted(counter.items()))

        lines = [
            "| filesystem | crash point | scenario | "
            + " | ".join(WRITER_TITLES[w] for w in WRITERS)
            + " |",
            "|---|---|---|" + "---|" * len(WRITERS),
        ]
        for fs in filesystems:
            for point in CRASH_POINTS:
                for scenario in scenarios:
                    row = [fs, point, scenario]
                    row += [fmt(self.counts.get((fs, point, scenario, w))) for w in WRITERS]
                    lines.append("| " + " | ".join(row) + " |")
        totals = ", ".join(f"{w}: {self.trials(w)} trials" for w in WRITERS)
        lines.append("")
        lines.append(f"Totals - {totals}.")
        lines.append("")
        lines.append(self.summary(filesystems))
        return "\n".join(lines) + "\n"

    def summary(self, filesystems: Sequence[str]) -> str:
        """Per filesystem: committed writes lost / trials after the call returned, per writer.

        The last column counts ``durable=True`` cuts *during* the call that left
        anything but old-or-new (must be 0).
        """
        lines = [
            "| filesystem | "
            + " | ".join(f"{WRITER_TITLES[w]}: lost / trials" for w in WRITERS)
            + " | ours, cut during the call: bad / trials |",
            "|---|" + "---|" * (len(WRITERS) + 1),
        ]
        for fs in filesystems:
            row = [fs]
            for writer in WRITERS:
                trials = sum(
                    sum(c.values())
                    for cell, c in self.counts.items()
                    if cell[0] == fs and cell[3] == writer and cell[1] != "during"
                )
                row.append(f"{self.losses([writer], fs)} / {trials}")
            during = [
                cell for cell in self.counts if cell[:2] == (fs, "during") and cell[3] == "ours"
            ]
            bad = sum(self.bad[cell] for cell in during)
            row.append(f"{bad} / {sum(sum(self.counts[cell].values()) for cell in during)}")
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


def all_scenarios() -> list[Scenario]:
    """Every power-cut scenario, in table order."""
    return list(SCENARIOS.values())
