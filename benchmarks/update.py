"""Read-modify-write benchmarks: ``atomic_json_update`` against the loops built by hand.

Two cases, each measured side by side in one run (issue 17's targets):

1. **One update, uncontended.** ``atomic_json_update`` (durable) against an
   uncontended ``DirectoryLocker`` acquire + one durable ``atomic_write`` +
   release (the target: within +10 %), against the whole read-modify-write
   built by hand from the same pieces (lock, read, ``atomic_json_write``), and
   against the peers' composition (filelock ``FileLock`` + read +
   atomicwrites ``atomic_write``). Contenders interleaved round-robin; each
   repetition deals them fresh directories (``round_robin_slots``).
2. **8 processes updating one file.** Every process increments a counter in
   one JSON file, durably, for a fixed time: ``atomic_json_update`` against the
   same loop from filelock's ``FileLock`` + atomicwrites (the target: at least
   equal throughput). Rounds alternate the order; the final counter must equal
   the number of updates (no lost update) for a result to count.

Usage::

    python -m benchmarks.update            # ~2 minutes on 2 cores
    python -m benchmarks.update --quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    fmt_ratio,
    fmt_time,
    import_htmlgraph,
    machine_info,
    md_table,
    median_ratio_ci,
    peer_versions,
    round_robin_slots,
)

OURS = "htmlgraph atomic_json_update"
LOCK_PLUS_WRITE = "DirectoryLocker + atomic_write (no read)"
BY_HAND = "DirectoryLocker + read + atomic_json_write"
PEERS = "filelock.FileLock + read + atomicwrites"
PLUS_READ = "DirectoryLocker + read + atomic_write (no parse)"
PLUS_PARSE = "DirectoryLocker + read + parse + atomic_write (no serialise)"
NAME = "state.json"


def _update_module() -> ModuleType:
    import_htmlgraph()  # puts this checkout's src/ first on sys.path
    return importlib.import_module("htmlgraph.update")


def _bump(doc: dict[str, int]) -> dict[str, int]:
    doc["runs"] = doc.get("runs", 0) + 1
    return doc


# --- the contenders: one read-modify-write each --------------------------------


def _make_ours() -> Callable[[str], object]:
    update = _update_module()

    def op(directory: str) -> None:
        update.atomic_json_update(os.path.join(directory, NAME), _bump)

    return op


def _make_lock_plus_write(slots: list[str]) -> Callable[[str], object]:
    """The literal baseline: an uncontended lock around one durable atomic_write.

    The lock instances are made once per directory, outside the timing, as a
    long-running caller would; the content is fixed (nothing is read).
    """
    update = _update_module()
    from htmlgraph.atomic_ops import DirectoryLocker, atomic_write

    lockers = {d: DirectoryLocker(update.update_lock_dir(os.path.join(d, NAME))) for d in slots}
    payload = json.dumps({"runs": 1}, indent=2) + "\n"

    def op(directory: str) -> None:
        with lockers[directory].exclusive(timeout=60):
            atomic_write(os.path.join(directory, NAME), payload)

    return op


def _make_by_hand(slots: list[str]) -> Callable[[str], object]:
    """The whole read-modify-write from the library's pieces, as a user would write it."""
    update = _update_module()
    from htmlgraph.atomic_ops import DirectoryLocker, atomic_json_write

    lockers = {d: DirectoryLocker(update.update_lock_dir(os.path.join(d, NAME))) for d in slots}

    def op(directory: str) -> None:
        path = os.path.join(directory, NAME)
        with lockers[directory].exclusive(timeout=60):
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            atomic_json_write(path, _bump(doc))

    return op


def _peer_update(lock: object, path: str) -> None:
    import atomicwrites  # type: ignore[import-untyped]

    with lock:  # type: ignore[attr-defined]
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        text = json.dumps(_bump(doc), indent=2) + "\n"
        # atomicwrites fsyncs the file and, on Linux, the directory: durable too.
        with atomicwrites.atomic_write(path, overwrite=True, encoding="utf-8") as out:
            out.write(text)


def _make_peers(slots: list[str]) -> Callable[[str], object]:
    import filelock

    locks = {d: filelock.FileLock(os.path.join(d, NAME + ".lock"), timeout=60) for d in slots}

    def op(directory: str) -> None:
        _peer_update(locks[directory], os.path.join(directory, NAME))

    return op


def _make_steps(slots: list[str]) -> list[tuple[str, Callable[[str], object]]]:
    """The loop by hand cut short, step by step (``--steps``): where the extra time goes.

    Lock + write of the fixed document, then with the read added, then with
    the parse added; the whole loop by hand adds the serialisation
    (``indent=2``), and ``atomic_json_update`` its own path checks.
    """
    update = _update_module()
    from htmlgraph.atomic_ops import DirectoryLocker, atomic_write

    lockers = {d: DirectoryLocker(update.update_lock_dir(os.path.join(d, NAME))) for d in slots}
    payload = json.dumps({"runs": 1}, indent=2) + "\n"

    def plus_read(directory: str) -> None:
        path = os.path.join(directory, NAME)
        with lockers[directory].exclusive(timeout=60):
            with open(path, "rb") as f:
                f.read()
            atomic_write(path, payload)

    def plus_parse(directory: str) -> None:
        path = os.path.join(directory, NAME)
        with lockers[directory].exclusive(timeout=60):
            with open(path, "rb") as f:
                _bump(json.loads(f.read()))
            atomic_write(path, payload)

    return [(PLUS_READ, plus_read), (PLUS_PARSE, plus_parse)]


# --- case 1: one update ----------------------------------------------------------


@dataclass
class SingleResult:
    """Medians and samples of the uncontended case."""

    samples: dict[str, list[float]]

    def ratio(self, a: str, b: str) -> tuple[float, float, float]:
        """Median ratio a/b with its 95 % bootstrap interval."""
        sa, sb = self.samples[a], self.samples[b]
        lo, hi = median_ratio_ci(sa, sb)
        return _median(sa) / _median(sb), lo, hi


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def bench_single(
    base: Path, reps: int, log: Callable[[str], None], *, steps: bool = False
) -> SingleResult:
    """One durable update per call, every contender interleaved, directories dealt afresh."""
    names = [OURS, LOCK_PLUS_WRITE, BY_HAND, PEERS] + ([PLUS_READ, PLUS_PARSE] if steps else [])
    slots = []
    for i in range(len(names) * 2):
        d = base / "single" / f"s{i}"
        d.mkdir(parents=True)
        (d / NAME).write_text('{"runs": 0}\n', encoding="utf-8")
        slots.append(str(d))
    contenders = [
        (OURS, _make_ours()),
        (LOCK_PLUS_WRITE, _make_lock_plus_write(slots)),
        (BY_HAND, _make_by_hand(slots)),
        (PEERS, _make_peers(slots)),
    ]
    if steps:
        contenders[2:2] = _make_steps(slots)
    log(f"update single: {len(contenders)} contenders x {reps} reps")
    series = round_robin_slots(contenders, slots, reps, warmup=3)
    # (No counter check here: the no-read baseline writes a fixed document into
    # whichever directory it is dealt. The throughput case checks for lost updates.)
    shutil.rmtree(base / "single")
    return SingleResult({name: s.samples for name, s in series.items()})


# --- case 2: 8 processes ----------------------------------------------------------


def _worker(
    kind: str,
    path: str,
    duration: float,
    barrier: Barrier,
    results: Queue[int],
) -> None:
    if kind == OURS:
        update = _update_module()

        def once() -> None:
            update.atomic_json_update(path, _bump)
    else:
        import filelock

        lock = filelock.FileLock(path + ".lock", timeout=120)

        def once() -> None:
            _peer_update(lock, path)

    barrier.wait(timeout=120)
    deadline = time.monotonic() + duration
    done = 0
    while time.monotonic() < deadline:
        once()
        done += 1
    results.put(done)


@dataclass
class Throughput:
    """One contender over all rounds."""

    updates: int
    seconds: float
    per_process: list[int]

    @property
    def per_s(self) -> float:
        """Updates per second, all processes together."""
        return self.updates / self.seconds

    @property
    def fairness(self) -> float:
        """Fewest updates of one process / most of one (1.00 = even)."""
        return min(self.per_process) / max(max(self.per_process), 1)


def _one_round(
    kind: str, base: Path, procs: int, duration: float, tag: int
) -> tuple[int, list[int]]:
    ctx = mp.get_context("fork")
    run_dir = base / f"tp-{tag}"
    run_dir.mkdir(parents=True)
    path = run_dir / NAME
    path.write_text('{"runs": 0}\n', encoding="utf-8")
    barrier = ctx.Barrier(procs)
    results: Queue[int] = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(kind, str(path), duration, barrier, results))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    got = [results.get(timeout=duration + 180) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        if w.exitcode != 0:
            raise RuntimeError(f"{kind}: worker exit code {w.exitcode}")
    final = json.loads(path.read_text(encoding="utf-8"))["runs"]
    if final != sum(got):
        raise RuntimeError(f"{kind}: {sum(got)} updates but the counter says {final} (lost)")
    shutil.rmtree(run_dir)
    return sum(got), sorted(got)


def bench_processes(
    base: Path, procs: int, duration: float, rounds: int, log: Callable[[str], None]
) -> dict[str, Throughput]:
    """``procs`` processes, each updating one file for ``duration`` s; ``rounds`` per contender."""
    kinds = [OURS, PEERS]
    acc = {k: Throughput(0, 0.0, [0] * procs) for k in kinds}
    log(
        f"update throughput: {len(kinds)} contenders x {rounds} rounds x {duration}s, {procs} procs"
    )
    tag = 0
    for rnd in range(rounds):
        for kind in kinds if rnd % 2 == 0 else reversed(kinds):
            tag += 1
            updates, per = _one_round(kind, base, procs, duration, tag)
            t = acc[kind]
            acc[kind] = Throughput(
                t.updates + updates,
                t.seconds + duration,
                [a + b for a, b in zip(t.per_process, per, strict=True)],
            )
            log(f"  round {rnd + 1}: {kind}: {updates / duration:,.0f} updates/s")
    return acc


# --- report ------------------------------------------------------------------------


def report(single: SingleResult, throughput: dict[str, Throughput], procs: int) -> str:
    """The Markdown report: both tables and the two targets."""
    rows = []
    for name, samples in single.samples.items():
        rows.append(
            [
                name,
                str(len(samples)),
                fmt_time(_median(samples)),
                fmt_ratio(_median(samples) / _median(single.samples[LOCK_PLUS_WRITE])),
            ]
        )
    out = [
        "### One durable update, uncontended (interleaved)\n",
        md_table(["contender", "n", "median", f"x {LOCK_PLUS_WRITE}"], rows),
        "",
        f"### {procs} processes updating one file (durable)\n",
    ]
    peer = throughput[PEERS]
    rows = [
        [
            name,
            f"{t.updates:,}",
            f"{t.per_s:,.0f}",
            fmt_ratio(t.per_s / peer.per_s),
            f"{t.fairness:.2f}",
        ]
        for name, t in throughput.items()
    ]
    out.append(md_table(["contender", "updates", "updates/s", f"x {PEERS}", "fairness"], rows))
    out.append(
        "\nEvery round checked: the final counter equals the updates counted (no lost "
        "update). fairness = updates of the least served process / of the best served one."
    )
    r, lo, hi = single.ratio(OURS, LOCK_PLUS_WRITE)
    r2, lo2, hi2 = single.ratio(OURS, BY_HAND)
    tp = throughput[OURS].per_s / peer.per_s
    met1 = "MET" if hi <= 1.10 else ("NOT MET" if lo > 1.10 else "UNDECIDED (CI crosses 1.10)")
    met2 = "MET" if tp >= 1.0 else f"NOT MET (short by {(1 - tp) * 100:.0f} %)"
    out += [
        "",
        "### Targets (issue 17)\n",
        md_table(
            ["target", "measured", "verdict"],
            [
                [
                    "one update <= 1.10x uncontended lock + durable atomic_write",
                    f"{r:.3f}x (95% CI {lo:.3f}-{hi:.3f}); vs the whole loop by hand "
                    f"{r2:.3f}x (CI {lo2:.3f}-{hi2:.3f})",
                    met1,
                ],
                [
                    f"{procs} processes: throughput >= FileLock + atomicwrites",
                    f"{tp:.2f}x",
                    met2,
                ],
            ],
        ),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="read-modify-write benchmarks (issue 17)")
    parser.add_argument("--quick", action="store_true", help="short run (~1 minute)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: $TMPDIR)")
    parser.add_argument("--procs", type=int, default=8, help="processes in the throughput case")
    parser.add_argument(
        "--steps",
        action="store_true",
        help="also time the loop by hand cut short after the read and after the parse",
    )
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="htmlgraph-bench-update-", dir=args.dir))
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        info = machine_info(base)
        single = bench_single(base, 300 if args.quick else 1500, log, steps=args.steps)
        throughput = bench_processes(
            base, args.procs, 2.0 if args.quick else 4.0, 2 if args.quick else 6, log
        )
        print("## Read-modify-write (benchmarks/update.py)\n")
        print(md_table(["", ""], [[k, v] for k, v in info.items()]))
        print()
        versions = peer_versions()
        print(f"filelock {versions['filelock']}, atomicwrites {versions['atomicwrites']}\n")
        print(report(single, throughput, args.procs))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
