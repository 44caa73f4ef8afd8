"""Run every benchmark and print one Markdown report.

Usage::

    python -m benchmarks.run            # full run (~10 minutes on 2 cores)
    python -m benchmarks.run --quick    # short run (~2 minutes)
    python benchmarks/run.py --only writes,locks --out report.md

Contenders are interleaved round-robin inside each case, so drift of the
machine hits all of them alike; each row reports the median and the ratio to
the syscall floor measured in the same case of the same run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import CaseResult, Trace, fmt_ratio, machine_info, md_table, peer_versions
from benchmarks.cleanup import CleanupPoint, bench_cleanup
from benchmarks.locks import bench_throughput, bench_uncontended
from benchmarks.strace_peers import durability_table, verify_all
from benchmarks.writes import bench_json, bench_reads, bench_sizes

SECTIONS = ("writes", "json", "reads", "locks", "throughput", "cleanup")
OURS_D = "htmlgraph atomic_write"
OURS_F = "htmlgraph atomic_write(durable=False)"
OURS_W = "htmlgraph AtomicFileWriter"


class Log:
    """Progress lines on stderr with the elapsed time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "NOT MET")


def evaluate_targets(
    writes: list[CaseResult],
    json_case: CaseResult | None,
    traces: dict[str, Trace],
    locks: CaseResult | None,
    cleanup: list[CleanupPoint] | None,
) -> str:
    """Check the done-when targets of issues 5 and 3 against this run's numbers."""
    rows: list[list[str]] = []
    cases = [c for c in writes if c.median(OURS_D) is not None]

    def worst(name: str, floor: str, subset: list[CaseResult]) -> tuple[float, str] | None:
        vals = [(c.ratio(name, floor), c.title) for c in subset]
        vals2 = [(v, t) for v, t in vals if v is not None]
        return max(vals2) if vals2 else None

    def bounds(name: str, other: str, title: str) -> tuple[float, float] | None:
        return next(c for c in cases if c.title == title).ratio_ci(name, other)

    def ci(name: str, other: str, title: str) -> str:
        b = bounds(name, other, title)
        return f", 95% CI {b[0]:.2f}-{b[1]:.2f}" if b else ""

    def worst_text(name: str, floor: str, w: tuple[float, str] | None) -> str:
        return f"worst {fmt_ratio(w[0])} ({w[1]}{ci(name, floor, w[1])})" if w else "-"

    def threshold(
        worsts: list[tuple[str, str, tuple[float, str] | None]], limit: float, strict: bool
    ) -> str:
        """Verdict for "ratio <= limit" (``< limit`` if strict) in every cell.

        "MET" needs the worst cell's median ratio within the limit; when the
        upper end of its 95 % interval is not, the verdict says so.
        """
        if any(w is None for _, _, w in worsts):
            return _verdict(None)

        def within(x: float) -> bool:
            return x < limit if strict else x <= limit

        if not all(w is not None and within(w[0]) for _, _, w in worsts):
            return _verdict(False)
        for name, floor, w in worsts:
            b = bounds(name, floor, w[1]) if w is not None else None
            if b is not None and not within(b[1]):
                return "MET at the median; the 95% CI crosses the limit"
        return _verdict(True)

    def versus(mine: str, peers: list[str], strict: bool) -> tuple[list[str], list[str]]:
        """Cells where ``mine`` is not faster than a peer: (clear losses, ties).

        A tie is a cell whose 95 % interval of the ratio contains 1.0: the run
        cannot tell which is faster. Either way the target is not met there.
        """
        losses, ties = [], []
        for c in cases:
            for p in peers:
                r = c.ratio(mine, p)
                if r is None or (r < 1 if strict else r <= 1):
                    continue
                ci95 = c.ratio_ci(mine, p)
                text = f"{p} in {c.title} ({fmt_ratio(r)}"
                if ci95 is not None and ci95[0] <= 1:
                    ties.append(f"{text}, 95% CI {ci95[0]:.2f}-{ci95[1]:.2f})")
                else:
                    losses.append(text + ")")
        return losses, ties

    def peer_row(target: str, mine: str, peers: list[str], strict: bool, ok_text: str) -> list[str]:
        losses, ties = versus(mine, peers, strict)
        if not cases or not peers:
            return [target, "no peer measured (needs strace labels)", _verdict(None)]
        if not losses and not ties:
            return [target, ok_text, _verdict(True)]
        parts = []
        if losses:
            parts.append("slower: " + "; ".join(losses))
        if ties:
            parts.append("not faster, within noise: " + "; ".join(ties))
        return [target, " / ".join(parts), "NOT MET" + ("" if losses else " (tie)")]

    aa = [
        abs(r - 1)
        for c in cases
        for r in (
            c.ratio("A/A: floor-durable again", "floor-durable"),
            c.ratio("A/A: floor-fast again", "floor-fast"),
        )
        if r is not None
    ]
    if aa:
        rows.append(
            [
                "(noise) A/A control: the floors timed twice, abs(ratio - 1)",
                f"median {statistics.median(aa):.1%}, worst {max(aa):.1%}",
                "info",
            ]
        )
    w = worst(OURS_D, "floor-durable", cases)
    rows.append(
        [
            "durable write <= 1.10x floor-durable (every size, text and bytes)",
            worst_text(OURS_D, "floor-durable", w),
            threshold([(OURS_D, "floor-durable", w)], 1.10, strict=False),
        ]
    )
    w = worst(OURS_W, "floor-durable", cases)
    if w:
        rows.append(
            [
                "(info) AtomicFileWriter (durable) vs floor-durable",
                worst_text(OURS_W, "floor-durable", w),
                "info",
            ]
        )
    durable_peers = [n for n, t in traces.items() if t.durable and _is_peer(n)]
    rows.append(
        peer_row(
            "durable write faster than every peer with file+dir fsync ("
            + (", ".join(durable_peers) or "none")
            + ")",
            OURS_D,
            durable_peers,
            True,
            "faster in every case",
        )
    )
    w = worst(OURS_F, "floor-fast", cases)
    rows.append(
        [
            "durable=False write <= 1.25x floor-fast",
            worst_text(OURS_F, "floor-fast", w),
            threshold([(OURS_F, "floor-fast", w)], 1.25, strict=False),
        ]
    )
    weak_peers = [n for n, t in traces.items() if not t.durable and _is_peer(n)]
    rows.append(
        peer_row(
            "durable=False write no slower than any non-durable peer ("
            + ", ".join(weak_peers)
            + ")",
            OURS_F,
            weak_peers,
            False,
            "no slower in any case",
        )
    )
    big = [c for c in cases if c.title.startswith(("Write 1 MiB", "Write 64 MiB"))]
    wd = worst(OURS_D, "floor-durable", big)
    wf = worst(OURS_F, "floor-fast", big)
    rows.append(
        [
            ">= 1 MiB: overhead over the floor < 5 % (durable and fast)",
            (
                f"worst durable {fmt_ratio(wd[0])} ({wd[1]}{ci(OURS_D, 'floor-durable', wd[1])}), "
                f"fast {fmt_ratio(wf[0])} ({wf[1]}{ci(OURS_F, 'floor-fast', wf[1])})"
                if wd and wf
                else "-"
            ),
            threshold(
                [(OURS_D, "floor-durable", wd), (OURS_F, "floor-fast", wf)], 1.05, strict=True
            ),
        ]
    )
    if json_case is not None:
        jr = json_case.ratio("htmlgraph atomic_json_write", "json.dumps + floor-durable")
        rows.append(
            [
                "(info) atomic_json_write vs json.dumps + floor-durable",
                fmt_ratio(jr),
                "info",
            ]
        )
    if locks is not None:
        soft = locks.median("filelock.SoftFileLock")
        for mode in ("shared", "exclusive"):
            mine = locks.median(f"htmlgraph DirectoryLocker {mode}")
            r = mine / soft if mine is not None and soft else None
            rows.append(
                [
                    f"uncontended {mode} acquire+release <= 1/3 of SoftFileLock (issue 3)",
                    f"{fmt_ratio(r)} of SoftFileLock" if r is not None else "-",
                    _verdict(r <= 1 / 3 if r is not None else None),
                ]
            )
    if cleanup:
        last, first = cleanup[-1], cleanup[0]
        lin = (last.seconds / first.seconds) / (last.entries / first.entries)
        floor_lin = (last.floor_seconds / first.floor_seconds) / (last.entries / first.entries)
        vs_floor = (last.seconds / last.floor_seconds) / (first.seconds / first.floor_seconds)
        mem = last.peak_bytes / max(first.peak_bytes, 1)
        rows.append(
            [
                f"cleanup linear in entries ({first.entries:,} -> {last.entries:,})",
                f"time/size growth {lin:.2f} (1.00 = linear; the bare floor: {floor_lin:.2f}); "
                f"ratio to the floor grew {vs_floor:.2f}x",
                _verdict(lin <= 1.3 or vs_floor <= 1.2),
            ]
        )
        rows.append(
            [
                "cleanup memory flat",
                f"peak {first.peak_bytes / 1024:,.0f} KiB -> {last.peak_bytes / 1024:,.0f} KiB "
                f"({mem:.2f}x for {last.entries // first.entries}x the entries)",
                _verdict(mem <= 1.5),
            ]
        )
    return "## Targets (issue 5, and issue 3's lock cost)\n\n" + md_table(
        ["target", "this run", "verdict"], rows
    )


def _is_peer(name: str) -> bool:
    return not name.startswith(("floor", "htmlgraph", "open(", "A/A"))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="htmlgraph benchmarks (see docs/benchmarks.md)")
    parser.add_argument("--quick", action="store_true", help="short run (~2 minutes)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: $TMPDIR)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--no-strace", action="store_true", help="skip the durability check")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    log = Log()
    base = Path(tempfile.mkdtemp(prefix="htmlgraph-bench-", dir=args.dir))
    out: list[str] = ["# htmlgraph benchmark report", ""]
    cmd = "python -m benchmarks.run" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    info = machine_info(base)
    out.append(md_table(["", ""], [["command", f"`{cmd}`"], *([k, v] for k, v in info.items())]))
    out.append("")
    out.append(
        "Peers: " + ", ".join(f"{k} {v}" for k, v in peer_versions().items()) + ".",
    )
    out.append("")
    try:
        traces: dict[str, Trace] = {}
        if not args.no_strace and only & {"writes", "json"}:
            log("strace: verifying what each writer really syncs")
            traces = verify_all(base)
            out += ["## Durability, as strace shows it", "", durability_table(traces), ""]
        writes: list[CaseResult] = []
        json_case = None
        locks = None
        cleanup_points = None

        def section(name: str, fn: Callable[[], list[str]]) -> None:
            # One failing section must not throw away the others' numbers.
            if name not in only:
                return
            try:
                out.extend(fn())
            except Exception:
                log(f"section {name} FAILED:\n{traceback.format_exc()}")
                out.extend([f"## {name}: FAILED", "", "```", traceback.format_exc(), "```", ""])

        def do_writes() -> list[str]:
            writes.extend(bench_sizes(base, traces, args.quick, log))
            lines = ["## Writes (overwrite of an existing file)", ""]
            for c in writes:
                lines += [c.table(), ""]
            return lines

        def do_json() -> list[str]:
            nonlocal json_case
            json_case = bench_json(base, traces, args.quick, log)
            return [json_case.table(("json.dumps + floor-durable", "json.dumps + floor-fast")), ""]

        def do_reads() -> list[str]:
            lines = ["## Reads", ""]
            for c in bench_reads(base, args.quick, log):
                lines += [c.table(("open().read()",)), ""]
            return lines

        def do_locks() -> list[str]:
            nonlocal locks
            locks = bench_uncontended(base, args.quick, log)
            return ["## Locks", "", locks.table(("floor-marker", "filelock.SoftFileLock")), ""]

        def do_throughput() -> list[str]:
            table, _ = bench_throughput(base, args.quick, log)
            return [table, ""]

        def do_cleanup() -> list[str]:
            nonlocal cleanup_points
            res = bench_cleanup(base, args.quick, log)
            if res is None:
                return ["## Cleanup", "", "skipped: cleanup_orphaned_temp_files not found", ""]
            table, cleanup_points = res
            return ["## Cleanup", "", table, ""]

        section("writes", do_writes)
        section("json", do_json)
        section("reads", do_reads)
        section("locks", do_locks)
        section("throughput", do_throughput)
        section("cleanup", do_cleanup)
        out.append(evaluate_targets(writes, json_case, traces, locks, cleanup_points))
        out.append("")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    log("done")
    report = "\n".join(out)
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
