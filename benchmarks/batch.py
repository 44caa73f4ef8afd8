"""AtomicBatch against one durable atomic_write per file, side by side in one run.

Usage::

    python -m benchmarks.batch                       # the directory below /var/tmp
    python -m benchmarks.batch --dir /some/dir --rounds 15
    sudo python -m benchmarks.batch --loop ext4,xfs  # also loop-mounted images (root)

Cases (files of 4 KiB; the 100-file cases spread over 5 directories; every
file already exists, so each round replaces them):

* ``100 x atomic_write`` - 100 separate durable writes (2 sequential fsyncs each);
* ``batch of 100`` - one durable AtomicBatch commit of the same 100 files,
  *everything included*: the commit leaves no fsync for later (no checkpoint);
* ``1 x atomic_write`` / ``batch of 1`` - the same for a single file.

Contenders alternate round by round, so drift hits all alike; the report
gives medians and the ratios of medians, measured in the same run. Also
measured: how long plain readers may see the batch half-applied (from the
first rename to the last, via the ``_step`` hook), where the time of a
100-file commit goes (the ``_step`` timestamps, phase by phase; with
``--pools 16,64,128`` once per size of the R1 fsync thread pool, the sizes
alternating round by round), and the memory a batch holds per file
(``tracemalloc`` peak, 1,000 files) and while streaming a 64 MiB file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from htmlgraph import AtomicBatch, _platform, atomic_write
from htmlgraph import batch as batch_mod

SIZE = 4096
DIRS = 5


def _names(n: int) -> list[str]:
    return [f"d{i % DIRS}/n{i}.html" for i in range(n)]


def _prepare(root: Path, names: list[str]) -> None:
    for rel in names:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"o" * SIZE)
    os.sync()


def _singles(root: Path, names: list[str], data: bytes) -> Callable[[], None]:
    paths = [str(root / rel) for rel in names]

    def run() -> None:
        for path in paths:
            atomic_write(path, data)

    return run


def _batch(root: Path, names: list[str], data: bytes, sync: str = "fsync") -> Callable[[], None]:
    def run() -> None:
        with AtomicBatch(root, sync=sync) as batch:  # type: ignore[arg-type]
            for rel in names:
                batch.write(rel, data)

    return run


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# The phases of a 100-file commit, each ending at a ``_step`` of docs/batch.md.
PHASES = [
    ("stage", None),
    ("lock, recover, journal", "journal-written"),
    ("R1", "staged-durable"),
    ("rename journal, R2", "committed"),
    ("apply", "applied"),
    ("R3", "synced"),
    ("retire", "retired"),
]


def phases(base: Path, rounds: int, pools: list[int]) -> dict[int, dict[str, float]]:
    """Median seconds per phase of a durable 100-file batch, per R1 pool size."""
    work = Path(tempfile.mkdtemp(prefix="bench-batch-phases-", dir=base))
    marks: dict[str, float] = {}

    def step(name: str) -> None:
        marks[name] = time.perf_counter()  # "apply-op": the last one wins

    names = _names(100)
    data = b"p" * SIZE
    executors = {n: concurrent.futures.ThreadPoolExecutor(max_workers=n) for n in pools}
    saved = batch_mod._step, batch_mod._pool, batch_mod._pool_pid, batch_mod._POOL_THREADS
    results: dict[int, dict[str, list[float]]] = {n: {} for n in pools}
    try:
        _prepare(work, names)
        batch_mod._step = step
        batch_mod._pool_pid = os.getpid()
        for i in range(rounds + 1):  # the first round warms every pool up
            for n in pools:
                batch_mod._pool, batch_mod._POOL_THREADS = executors[n], n
                marks.clear()
                start = time.perf_counter()
                with AtomicBatch(work) as batch:
                    for rel in names:
                        batch.write(rel, data)
                    marks["staged"] = time.perf_counter()
                if i == 0:
                    continue
                previous = start
                for label, end in PHASES:
                    at = marks["staged" if end is None else end]
                    results[n].setdefault(label, []).append(at - previous)
                    previous = at
                results[n].setdefault("total", []).append(previous - start)
    finally:
        batch_mod._step, batch_mod._pool, batch_mod._pool_pid, batch_mod._POOL_THREADS = saved
        for executor in executors.values():
            executor.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return {
        n: {label: statistics.median(v) for label, v in found.items()}
        for n, found in results.items()
    }


def bench_dir(base: Path, rounds: int) -> dict[str, float]:
    """Run every case in a fresh directory under ``base``; return medians (seconds)."""
    results: dict[str, list[float]] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-batch-", dir=base))
    try:
        cases: dict[str, Callable[[], None]] = {}
        data = b"n" * SIZE
        for n in (100, 1):
            names = _names(n)
            roots = {}
            for kind in ("atomic_write", "batch", "syncfs"):
                roots[kind] = work / f"{kind}-{n}"
                roots[kind].mkdir()
                _prepare(roots[kind], names)
            cases[f"{n} x atomic_write"] = _singles(roots["atomic_write"], names, data)
            cases[f"batch of {n}"] = _batch(roots["batch"], names, data)
            if _platform.HAS_SYNCFS:
                cases[f"syncfs batch of {n}"] = _batch(roots["syncfs"], names, data, "syncfs")
        for fn in cases.values():  # warm up: directories, lock dir, pool threads
            fn()
        for _ in range(rounds):
            for name, fn in cases.items():
                results.setdefault(name, []).append(_timed(fn))
        results["window"] = _window(work / "batch-100", rounds)
        results["window syncfs"] = _window(work / "syncfs-100", rounds, "syncfs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {name: statistics.median(values) for name, values in results.items()}


def _window(root: Path, rounds: int, sync: str = "fsync") -> list[float]:
    """Seconds from the first rename of a 100-file batch to its last."""
    marks: dict[str, float] = {}

    def step(name: str) -> None:
        if name in ("committed", "applied"):
            marks[name] = time.perf_counter()

    windows = []
    saved = batch_mod._step
    batch_mod._step = step
    try:
        run = _batch(root, _names(100), b"w" * SIZE, sync)
        for _ in range(rounds):
            run()
            windows.append(marks["applied"] - marks["committed"])
    finally:
        batch_mod._step = saved
    return windows


def memory(base: Path) -> tuple[float, float]:
    """(bytes held per file in a 1,000-file batch, peak bytes while streaming 64 MiB)."""
    work = Path(tempfile.mkdtemp(prefix="bench-batch-mem-", dir=base))
    try:
        data = b"m" * SIZE
        tracemalloc.start()
        batch = AtomicBatch(work, durable=False)
        before = tracemalloc.get_traced_memory()[0]
        for rel in _names(1000):
            batch.write(rel, data)
        per_file = (tracemalloc.get_traced_memory()[0] - before) / 1000
        batch.commit()
        tracemalloc.stop()
        chunk = b"s" * (1 << 20)
        tracemalloc.start()
        with AtomicBatch(work, durable=False) as big, big.open("big.bin") as f:
            for _ in range(64):
                f.write(chunk)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return per_file, peak
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def loop_mount(fstype: str, backing_dir: Path) -> Iterator[Path]:
    """A fresh ``fstype`` filesystem on a loop device backed by a file in ``backing_dir``."""
    image = backing_dir / f"bench-{fstype}.img"
    mnt = Path(tempfile.mkdtemp(prefix=f"bench-{fstype}-"))
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        mkfs = ["mkfs.ext4", "-q", "-F"] if fstype == "ext4" else ["mkfs.xfs", "-q", "-f"]
        subprocess.run([*mkfs, dev], check=True, capture_output=True)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
        image.unlink()
        mnt.rmdir()


def _row(label: str, m: dict[str, float]) -> str:
    def ms(name: str) -> str:
        return f"{m[name] * 1e3:.1f} ms" if name in m else "-"

    def speedup(name: str) -> str:
        return f"**{m['100 x atomic_write'] / m[name]:.1f}x**" if name in m else "-"

    def slowdown(name: str) -> str:
        return f"{m[name] / m['1 x atomic_write']:.2f}x" if name in m else "-"

    return (
        f"| {label} | {ms('100 x atomic_write')} | {ms('batch of 100')} "
        f"| {speedup('batch of 100')} | {ms('syncfs batch of 100')} "
        f"| {speedup('syncfs batch of 100')} | {ms('1 x atomic_write')} | {ms('batch of 1')} "
        f"({slowdown('batch of 1')}) | {ms('syncfs batch of 1')} ({slowdown('syncfs batch of 1')}) "
        f"| {ms('window')} / {ms('window syncfs')} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the batch benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--loop", default="", help="comma-separated: ext4,xfs (needs root)")
    parser.add_argument(
        "--pools",
        default=str(batch_mod._POOL_THREADS),
        help="comma-separated R1 thread-pool sizes for the phase table (default: the library's)",
    )
    args = parser.parse_args(argv)
    pools = [int(n) for n in args.pools.split(",")]
    targets: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Path]]]] = [
        (f"{args.dir} (real disk)", lambda: contextlib.nullcontext(args.dir))
    ]
    for fstype in filter(None, args.loop.split(",")):
        targets.append(
            (f"{fstype} on loop (image in {args.dir})", lambda t=fstype: loop_mount(t, args.dir))
        )
    print(
        "| filesystem | 100 x atomic_write | batch of 100 | speed-up | syncfs batch of 100 "
        "| speed-up | 1 x atomic_write | batch of 1 (ratio) | syncfs batch of 1 (ratio) "
        "| half-applied window, 100 files (fsync / syncfs) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    phase_rows = []
    for label, make in targets:
        with make() as base:
            print(_row(label, bench_dir(base, args.rounds)), flush=True)
            for n, found in phases(base, args.rounds, pools).items():
                cells = " | ".join(f"{found[p] * 1e3:.1f}" for p, _ in PHASES)
                phase_rows.append(f"| {label} | {n} | {cells} | {found['total'] * 1e3:.1f} |")
    print("\nWhere a durable 100-file commit spends its time (ms, medians):\n")
    print("| filesystem | R1 threads | " + " | ".join(p for p, _ in PHASES) + " | total |")
    print("|---|---|" + "---|" * (len(PHASES) + 1))
    print("\n".join(phase_rows))
    per_file, peak = memory(args.dir)
    print(
        f"\nmemory: {per_file:.0f} bytes held per staged file (1,000 files); "
        f"peak {peak / 1024:.0f} KiB traced while streaming 64 MiB into one file"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
