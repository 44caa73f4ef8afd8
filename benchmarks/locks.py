"""Lock benchmarks: uncontended acquire+release, and 8-process throughput.

Each library is used the way its docs show, with its default polling policy
(filelock polls every 50 ms, fasteners backs off 10-100 ms, portalocker's
``Lock`` checks every 250 ms). The low-level ``portalocker.lock(fh, flags)``
blocks in the kernel instead, which is the fastest way to use flock at all.
The contenders themselves are built in ``_lockers``.
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import importlib
import math
import multiprocessing as mp
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from benchmarks._common import CaseResult, Op, Row, fmt_ratio, md_table, round_robin
from benchmarks._lockers import MECHANISM, Acquire, available_libs, make_lock


def _floor_marker(d: str) -> Op:
    marker = os.path.join(d, ".lock-floor")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

    def op() -> None:
        os.close(os.open(marker, flags, 0o644))
        os.unlink(marker)

    return op


def _floor_flock(d: str) -> Op:
    fd = os.open(os.path.join(d, "flock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def op() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)

    return op


def _cycle(acquire: Acquire, release: Acquire) -> Op:
    def op() -> None:
        acquire()
        release()

    return op


def bench_uncontended(base: Path, quick: bool, log: Callable[[str], None]) -> CaseResult:
    """Acquire+release with nobody else around, every library interleaved."""
    contenders: list[tuple[str, Op]] = []
    labels: dict[str, str] = {}

    def new_dir(i: int) -> str:
        d = base / "uncontended" / f"c{i}"
        d.mkdir(parents=True)
        return str(d)

    contenders.append(("floor-marker", _floor_marker(new_dir(0))))
    contenders.append(("floor-flock", _floor_flock(new_dir(1))))
    labels["floor-marker"] = MECHANISM["floor-marker"]
    labels["floor-flock"] = MECHANISM["floor-flock"]
    for i, lib in enumerate(available_libs(), start=2):
        pair = make_lock(lib, new_dir(i))
        if pair.has_shared:
            contenders.append((f"{lib} shared", _cycle(pair.acquire_shared, pair.release_shared)))
            labels[f"{lib} shared"] = MECHANISM[lib]
            pair_x = make_lock(lib, new_dir(100 + i))
            name = f"{lib} exclusive"
            contenders.append((name, _cycle(pair_x.acquire_exclusive, pair_x.release_exclusive)))
            labels[name] = MECHANISM[lib]
        else:
            contenders.append((lib, _cycle(pair.acquire_exclusive, pair.release_exclusive)))
            labels[lib] = MECHANISM[lib]
    reps = 300 if quick else 2000
    log(f"locks uncontended: {len(contenders)} contenders x {reps} reps")
    series = round_robin(contenders, reps, warmup=3)
    case = CaseResult("Lock acquire+release, uncontended")
    for name, _ in contenders:
        case.rows.append(Row(name, labels[name], series[name]))
    shutil.rmtree(base / "uncontended")
    return case


# --- throughput -----------------------------------------------------------------------


def _throughput_worker(
    lib: str,
    lock_dir: str,
    counter: str,
    read_pct: int,
    duration: float,
    barrier: Barrier,
    results: Queue[tuple[int, int, int, list[float]]],
    seed: int,
) -> None:
    pair = make_lock(lib, lock_dir)
    rng = random.Random(seed)
    reads = writes = torn = 0
    waits: list[float] = []  # each acquisition's wait, seconds
    barrier.wait(timeout=120)
    deadline = time.monotonic() + duration
    while (asked := time.monotonic()) < deadline:
        if rng.random() * 100 < read_pct:
            pair.acquire_shared()
            waits.append(time.monotonic() - asked)
            try:
                with open(counter, encoding="ascii") as f:
                    if not f.read().strip():
                        torn += 1  # a writer was mid-update: the lock let us overlap
            finally:
                pair.release_shared()
            reads += 1
        else:
            pair.acquire_exclusive()
            waits.append(time.monotonic() - asked)
            try:
                # Read-modify-write in place (truncate, then write): a lost update
                # or a torn read shows any failure of mutual exclusion.
                with open(counter, "r+", encoding="ascii") as f:
                    value = int(f.read())
                    f.seek(0)
                    f.truncate()
                    f.write(str(value + 1))
            finally:
                pair.release_exclusive()
            writes += 1
    results.put((reads, writes, torn, waits))


@dataclass
class Throughput:
    """One library at one read share."""

    lib: str
    read_pct: int
    ops: int
    seconds: float
    lost_updates: int
    torn_reads: int
    per_process: list[int]
    waits: list[float] = field(default_factory=list)

    def wait_quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the acquisitions' waits, seconds (nearest rank)."""
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan

    @property
    def ops_per_s(self) -> float:
        """Operations per second, all processes together."""
        return self.ops / self.seconds

    @property
    def fairness(self) -> float:
        """Fewest ops of any process / most ops of any process (1.0 = perfectly even)."""
        return min(self.per_process) / max(max(self.per_process), 1)


def _run_throughput(
    lib: str, base: Path, read_pct: int, procs: int, duration: float, seed: int
) -> Throughput:
    ctx = mp.get_context("fork")
    run_dir = base / f"tp-{seed}"
    lock_dir = run_dir / "locks"
    lock_dir.mkdir(parents=True)
    counter = run_dir / "counter"
    counter.write_text("0", encoding="ascii")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_throughput_worker,
            args=(lib, str(lock_dir), str(counter), read_pct, duration, barrier, results, seed + i),
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    got = [results.get(timeout=duration + 180) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        if w.exitcode != 0:
            raise RuntimeError(f"{lib}: worker exit code {w.exitcode}")
    reads = sum(g[0] for g in got)
    writes = sum(g[1] for g in got)
    torn = sum(g[2] for g in got)
    final = int(counter.read_text(encoding="ascii") or "0")
    shutil.rmtree(run_dir)
    per_process = sorted(g[0] + g[1] for g in got)
    waits = [w for g in got for w in g[3]]
    return Throughput(
        lib, read_pct, reads + writes, duration, writes - final, torn, per_process, waits
    )


def _merge(a: Throughput | None, b: Throughput) -> Throughput:
    """One cell (contender, read mix) summed over its rounds: ``b`` added to ``a``."""
    if a is None:
        return b
    return Throughput(
        b.lib,
        b.read_pct,
        a.ops + b.ops,
        a.seconds + b.seconds,
        a.lost_updates + b.lost_updates,
        a.torn_reads + b.torn_reads,
        # Processes are matched by rank (least served with least served): the
        # fairness of the sum is then the fairness over the whole cell.
        [x + y for x, y in zip(a.per_process, b.per_process, strict=True)],
        a.waits + b.waits,
    )


def bench_throughput(
    base: Path, quick: bool, log: Callable[[str], None], procs: int = 8
) -> tuple[str, list[Throughput]]:
    """``procs`` processes hammering one lock at 0/50/95 % reads, every library."""
    libs = available_libs()
    duration = 0.5 if quick else 1.5
    rounds = 1 if quick else 2
    mixes = (0, 50, 95)
    log(
        f"locks throughput: {len(libs)} libs x {len(mixes)} mixes x {rounds} rounds "
        f"x {duration}s, {procs} processes"
    )
    acc: dict[tuple[str, int], Throughput] = {}
    seed = 1000
    for rnd in range(rounds):
        for mix in mixes:
            # Rotate the library order per round so no library always runs first.
            order = libs[rnd % len(libs) :] + libs[: rnd % len(libs)]
            for lib in order:
                seed += 100
                t = _run_throughput(lib, base, mix, procs, duration, seed)
                acc[(lib, mix)] = _merge(acc.get((lib, mix)), t)
    rows = []
    for lib in libs:
        row = [lib]
        bad = 0
        for mix in mixes:
            t = acc[(lib, mix)]
            row.append(f"{t.ops_per_s:,.0f}")
            bad += t.lost_updates + t.torn_reads
        ours_row = acc.get(("htmlgraph DirectoryLocker", 0))
        row.append(fmt_ratio(acc[(lib, 0)].ops_per_s / ours_row.ops_per_s) if ours_row else "-")
        row.append(f"{acc[(lib, 0)].fairness:.2f}")
        row.append(str(bad))
        rows.append(row)
    headers = [
        "library",
        *(f"ops/s @ {m}% reads" for m in mixes),
        "vs ours @ 0%",
        "fairness @ 0%",
        "violations",
    ]
    table = (
        f"### Lock throughput, {procs} processes, {duration * rounds:.1f} s per cell\n\n"
        + md_table(headers, rows)
        + "\n\nOne op = acquire, read (shared) or read-modify-write of a counter file "
        "(exclusive), release. Exclusive-only locks take the exclusive lock for reads too. "
        "violations = lost counter updates + reads that saw a half-written counter "
        "(must be 0 for a correct lock). fairness = ops of the least served process / ops of "
        "the best served one at 0 % reads (1.00 = even; near 0 = some processes starve)."
    )
    return table, list(acc.values())


# --- bounded barging: the politeness threshold swept (issue 13, third attempt) ---------


def sweep_polite(
    base: Path,
    thresholds_ms: list[float | str],
    peers: list[str],
    mixes: tuple[int, ...] = (0, 50, 95),
    duration: float = 1.5,
    rounds: int = 2,
    procs: int = 8,
    log: Callable[[str], None] = print,
) -> str:
    """Our lock at each politeness threshold X beside ``peers``, interleaved round by round.

    X is set on ``atomic_ops._POLITE_WAIT`` in this process before the
    workers fork, so they inherit it (X = 0 is the lock without barging).
    Returns a Markdown table: ops/s, fairness (least / best served process
    over the whole cell) and the p50/p99/max wait of one acquisition.
    """
    lockmod = importlib.import_module("htmlgraph.atomic_ops")
    saved = lockmod._POLITE_WAIT
    saved_extra: dict[str, object] = {}
    contenders = [f"X={x}" if isinstance(x, str) else f"X={x:g} ms" for x in thresholds_ms]
    contenders += peers
    acc: dict[tuple[str, int], Throughput] = {}
    seed = 5000
    try:
        for rnd in range(rounds):
            for mix in mixes:
                k = rnd % len(contenders)
                for name in contenders[k:] + contenders[:k]:
                    seed += 100
                    lib = name
                    if name.startswith("X="):
                        # "X=20 ms" or "X=20 ms, NAME=VALUE, ...": other module constants.
                        head, *patches = name.split(", ")
                        for k, v in saved_extra.items():
                            setattr(lockmod, k, v)
                        lockmod._POLITE_WAIT = float(head[2:].split()[0]) / 1000
                        for patch in patches:
                            k, v = patch.split("=")
                            saved_extra.setdefault(k, getattr(lockmod, k))
                            setattr(lockmod, k, type(getattr(lockmod, k))(ast.literal_eval(v)))
                        lib = "htmlgraph DirectoryLocker"
                    t = _run_throughput(lib, base, mix, procs, duration, seed)
                    acc[(name, mix)] = _merge(acc.get((name, mix)), t)
                    log(f"  round {rnd} {mix:2d}% {name}: {t.ops_per_s:,.0f} ops/s")
    finally:
        lockmod._POLITE_WAIT = saved
        for k, v in saved_extra.items():
            setattr(lockmod, k, v)
    headers = ["contender"]
    for mix in mixes:
        headers += [f"ops/s {mix}%", f"fair {mix}%", f"wait p50/p99/max {mix}% (ms)"]
    headers.append("violations")
    rows = []
    for name in contenders:
        row = [name]
        bad = 0
        for mix in mixes:
            t = acc[(name, mix)]
            bad += t.lost_updates + t.torn_reads
            row += [
                f"{t.ops_per_s:,.0f}",
                f"{t.fairness:.2f}",
                "/".join(f"{t.wait_quantile(q) * 1000:.1f}" for q in (0.5, 0.99))
                + f"/{max(t.waits, default=math.nan) * 1000:.0f}",
            ]
        row.append(str(bad))
        rows.append(row)
    return (
        f"{procs} processes, {duration * rounds:g} s per cell ({rounds} rounds x {duration:g} s, "
        "contenders interleaved)\n\n" + md_table(headers, rows)
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.locks --polite 0,2,5,10,20``: the politeness sweep."""
    parser = argparse.ArgumentParser(description="lock throughput against the barging threshold")
    parser.add_argument(
        "--polite", default="0,2,5,10,20", help="thresholds X in ms, ';' (e.g. '20 ms, _K=1')"
    )
    parser.add_argument("--mixes", default="0,50,95", help="read shares in percent, commas")
    parser.add_argument("--seconds", type=float, default=1.5, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per cell")
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--peers", default="", help="peer libraries, commas ('all': every one)")
    parser.add_argument("--dir", type=Path, default=None, help="where to run (default: $TMPDIR)")
    args = parser.parse_args(argv)
    peers = [p for p in available_libs() if p != "htmlgraph DirectoryLocker"]
    if args.peers != "all":
        peers = [p for p in peers if p in args.peers.split(",")]
    with tempfile.TemporaryDirectory(prefix="htmlgraph-polite-", dir=args.dir) as d:
        print(
            sweep_polite(
                Path(d),
                [x.strip() if "ms" in x else float(x) for x in args.polite.split(";")],
                peers,
                tuple(int(m) for m in args.mixes.split(",")),
                args.seconds,
                args.rounds,
                args.procs,
            )
        )


if __name__ == "__main__":
    main()
