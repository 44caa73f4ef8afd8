"""kill -9 at random instants of a write loop: the target is always one complete payload.

A child process rewrites one target forever (random sizes 1 B .. 8 MiB, three
APIs, durable and not) and is SIGKILLed at a random instant, hundreds of times
with a seeded RNG (``CRASHLAB_SEED`` to replay, ``CRASHLAB_KILLS`` to change the
count). After every kill the target must validate as one complete payload and
the directory may hold only the target plus temp files of the killed pid; those
exist until ``cleanup_orphaned_temp_files(dir, age_hours=0)`` runs (at random
intervals, so orphans of several dead pids pile up), which must remove exactly
them and leave the target alone.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

import htmlgraph
from crashlab.killloop import frame, rewrite_forever, validate
from crashlab.procs import start_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL semantics are POSIX"),
]

SEED = int(os.environ.get("CRASHLAB_SEED", "20261125"))
KILLS = int(os.environ.get("CRASHLAB_KILLS", "320"))
TARGET = "target.bin"
_TEMP = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{16}-")


def _start_writer(target: Path, seed: str) -> BaseProcess:
    """Start a rewriting child and return once its write loop is about to begin."""
    parent, child = multiprocessing.Pipe(duplex=False)
    proc = start_process(rewrite_forever, str(target), seed, child)
    child.close()
    # The random kill delay counts from the loop's start, not from process
    # start-up (whose length varies with the machine's load).
    assert parent.poll(30), "writer child did not start"
    assert parent.recv_bytes() == b"ready"
    parent.close()
    return proc


@pytest.fixture
def kill_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs directory when there is one, else tmp_path.

    kill -9 is about the process, not the disk: the page cache is shared, so a
    killed writer's completed syscalls are visible either way. On a busy disk a
    child killed inside fsync stays in uninterruptible sleep until the flush
    ends, which made each kill cost up to a second; tmpfs keeps the run short.
    """
    if not Path("/dev/shm").is_dir():
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="crashlab-kill-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_kill9_never_tears_the_target(kill_dir: Path) -> None:
    tmp_path = kill_dir
    rng = random.Random(SEED)
    target = tmp_path / TARGET
    target.write_bytes(frame(b"initial"))
    seen: set[str] = {validate(target.read_bytes())}
    dead_pids: set[int] = set()
    orphans_seen = 0
    cleanups = 0
    started = time.monotonic()
    next_cleanup = rng.randint(1, 6)
    for kill in range(KILLS):
        proc = _start_writer(target, f"{SEED}/{kill}")
        # Mostly short lifetimes (kills land in the first writes, where small
        # and large payloads alternate); sometimes long ones (many writes).
        time.sleep(rng.uniform(0.0, 0.05) if rng.random() < 0.8 else rng.uniform(0.05, 0.25))
        assert proc.pid is not None
        proc.kill()
        proc.join(timeout=30)
        assert proc.exitcode == -9, f"kill {kill}: exit code {proc.exitcode}"
        dead_pids.add(proc.pid)
        proc.close()

        data = target.read_bytes()
        try:
            seen.add(validate(data))
        except ValueError as exc:
            pytest.fail(f"kill {kill} (seed {SEED}): target is not one payload: {exc}")
        temps = []
        for name in os.listdir(tmp_path):
            if name == TARGET:
                continue
            match = _TEMP.match(name)
            assert match, f"kill {kill}: unexpected entry {name!r}"
            assert int(match.group(1)) in dead_pids, f"kill {kill}: temp of unknown pid: {name}"
            temps.append(name)
        orphans_seen += len(temps)

        next_cleanup -= 1
        if next_cleanup == 0 or kill == KILLS - 1:
            next_cleanup = rng.randint(1, 6)
            removed = htmlgraph.cleanup_orphaned_temp_files(tmp_path, age_hours=0)
            cleanups += 1
            assert removed == len(temps), f"kill {kill}: removed {removed}, had {temps}"
            assert os.listdir(tmp_path) == [TARGET]
            assert validate(target.read_bytes()) in seen
            dead_pids.clear()

    elapsed = time.monotonic() - started
    print(
        f"\nkill -9: {KILLS} kills in {elapsed:.1f} s (seed {SEED}), {len(seen)} distinct "
        f"payloads seen, {orphans_seen} orphan temps observed, {cleanups} cleanups"
    )
    # The fault was hit: kills landed mid-write (orphans) and writes committed.
    assert orphans_seen > 0, "no kill ever landed during a write"
    assert len(seen) > KILLS // 4, "the children hardly ever committed a write"
    assert os.listdir(tmp_path) == [TARGET]
