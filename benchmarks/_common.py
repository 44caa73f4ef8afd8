"""Shared plumbing: locating htmlgraph, round-robin timing, statistics, tables.

Also the types that more than one benchmark module passes around (a case's
result rows, an strace verdict), so that every other module imports from here
and none from another benchmark module's internals: ``_common`` imports no
other benchmark module.
"""

from __future__ import annotations

import functools
import gc
import importlib
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SRC_DIR = REPO_ROOT / "src"


def import_htmlgraph() -> ModuleType | None:
    """Import ``htmlgraph.atomic_ops`` from this checkout's ``src/``.

    The checkout wins over any installed copy, so the numbers are those of
    the code next to the benchmarks (and the same code the strace children
    run). Returns None while the module does not exist yet, so the harness
    still measures the floors and the peers.
    """
    if str(SRC_DIR) not in sys.path:
        sys.path.insert(0, str(SRC_DIR))
    try:
        return importlib.import_module("htmlgraph.atomic_ops")
    except ImportError:
        return None


@functools.cache
def ours(name: str) -> Any:  # noqa: ANN401 - whatever the library exports, or None
    """Return ``htmlgraph.atomic_ops.<name>``, or None when it does not exist.

    Cached: the write contenders call this inside the timed region, and an
    uncached import lookup would bill us a microsecond or two per call.
    """
    mod = import_htmlgraph()
    return getattr(mod, name, None) if mod is not None else None


def htmlgraph_revision() -> str:
    """Describe the library code being measured (git commit + dirty flag)."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %cI", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = rev or "uncommitted"
    return f"{rev}{' + uncommitted changes in src/' if dirty else ''}"


@dataclass
class Series:
    """Timings (seconds) of one contender in one case."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median of the samples."""
        return statistics.median(self.samples)

    @property
    def iqr(self) -> tuple[float, float]:
        """25th and 75th percentiles."""
        if len(self.samples) < 4:
            return (min(self.samples), max(self.samples))
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return (q[0], q[2])


def median_ratio_ci(
    a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Bootstrap confidence interval of ``median(a) / median(b)``.

    Resamples both series independently (percentile method, fixed seed, so a
    report is reproducible from its samples). An interval that contains 1.0
    means the run cannot tell the two apart.
    """
    rng = random.Random(2024)
    med = statistics.median
    ratios = sorted(
        med(rng.choices(a, k=len(a))) / med(rng.choices(b, k=len(b))) for _ in range(resamples)
    )
    tail = (1 - level) / 2
    return ratios[int(tail * resamples)], ratios[min(int((1 - tail) * resamples), resamples - 1)]


@dataclass
class Row:
    """One contender's result in one case."""

    name: str
    durability: str
    series: Series


@dataclass
class CaseResult:
    """All contenders of one case, measured side by side."""

    title: str
    rows: list[Row] = field(default_factory=list)
    note: str = ""

    def median(self, name: str) -> float | None:
        """Median of contender ``name``, or None if it did not run."""
        for r in self.rows:
            if r.name == name:
                return r.series.median
        return None

    def samples(self, name: str) -> list[float] | None:
        """The timings of contender ``name``, or None if it did not run."""
        for r in self.rows:
            if r.name == name:
                return r.series.samples
        return None

    def ratio_ci(self, name: str, other: str) -> tuple[float, float] | None:
        """95 % bootstrap interval of ``median(name) / median(other)``."""
        a, b = self.samples(name), self.samples(other)
        if not a or not b:
            return None
        return median_ratio_ci(a, b)

    def ratio(self, name: str, floor: str) -> float | None:
        """``median(name) / median(floor)``."""
        a, b = self.median(name), self.median(floor)
        if a is None or b is None or b == 0:
            return None
        return a / b

    def table(self, floors: Sequence[str] = ("floor-durable", "floor-fast")) -> str:
        """Markdown table: median, IQR and the ratio to each floor."""
        rows = []
        for r in self.rows:
            lo, hi = r.series.iqr
            rows.append(
                [
                    r.name,
                    r.durability,
                    str(len(r.series.samples)),
                    fmt_time(r.series.median),
                    f"{fmt_time(lo)} - {fmt_time(hi)}",
                    fmt_time(min(r.series.samples)),
                    *(fmt_ratio(self.ratio(r.name, f)) for f in floors),
                ]
            )
        headers = [
            "contender",
            "durability",
            "n",
            "median",
            "IQR",
            "min",
            *("x " + f for f in floors),
        ]
        return (
            f"### {self.title}\n\n"
            + md_table(headers, rows)
            + (f"\n\n{self.note}" if self.note else "")
        )


@dataclass
class Trace:
    """Syscalls of one traced write and what they prove."""

    name: str
    calls: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def _first_rename(self) -> int | None:
        for i, e in enumerate(self.events):
            if e.startswith(("rename", "link")):
                return i
        return None

    def _fsyncs(self, kind: str, after: bool) -> bool:
        first = self._first_rename
        for i, e in enumerate(self.events):
            if e == f"fsync {kind}":
                is_after = first is not None and i > first
                if is_after == after:
                    return True
        return False

    @property
    def file_fsync(self) -> str:
        """``before rename`` / ``AFTER rename`` / ``no``."""
        if self._fsyncs("file", after=False):
            return "before rename"
        if self._fsyncs("file", after=True):
            return "AFTER rename"
        return "no"

    @property
    def dir_fsync(self) -> str:
        """``after rename`` / ``no``."""
        return "after rename" if self._fsyncs("dir", after=True) else "no"

    @property
    def commit(self) -> str:
        """The syscall that publishes the new content."""
        for e in self.events:
            if e.startswith(("rename", "link")):
                return e.split()[0]
        return "none"

    @property
    def label(self) -> str:
        """Short durability label for the result tables."""
        if self.error:
            return "unverified"
        f, d = self.file_fsync, self.dir_fsync
        if f == "before rename" and d != "no":
            return "file+dir fsync"
        if f == "before rename":
            return "file fsync only"
        if f == "AFTER rename":
            return "fsync after rename" + (" +dir" if d != "no" else "")
        return "dir fsync only" if d != "no" else "no fsync"

    @property
    def durable(self) -> bool:
        """True when a power cut right after return keeps the new content."""
        return self.label == "file+dir fsync"


Op = Callable[[], object]
SlotOp = Callable[[str], object]


def round_robin(
    contenders: Sequence[tuple[str, Op]],
    reps: int,
    *,
    warmup: int = 1,
    before_each: Callable[[], None] | None = None,
    seed: int = 12345,
) -> dict[str, Series]:
    """Time each contender ``reps`` times, interleaved.

    Every repetition runs every contender once, in a fresh random order: each
    contender sits at every position and next to every neighbour equally
    often, so neither machine drift (other tenants, writeback storms) nor what
    the previous call left behind (dirty pages that the next fsync must
    write under ext4 data=ordered) favours anyone. ``before_each`` runs
    untimed before every call (the write cases pass ``os.sync`` so each call
    starts with a clean page cache). The garbage collector is paused during
    timed calls and run between repetitions, the same for everybody.
    """
    return _rounds(
        [(name, op, ()) for name, op in contenders], [()], reps, warmup, before_each, seed
    )


def round_robin_slots(
    contenders: Sequence[tuple[str, SlotOp]],
    slots: Sequence[str],
    reps: int,
    *,
    warmup: int = 1,
    before_each: Callable[[], None] | None = None,
    seed: int = 12345,
) -> dict[str, Series]:
    """:func:`round_robin` for ops that take a place to work in (a target path).

    Each repetition also deals the contenders a fresh random permutation of
    ``slots`` (at least one per contender), so that no contender keeps a
    place that happens to be cheaper or dearer than the others: on ext4 two
    sibling directories made the same way differed by up to 7 % in the cost
    of the same durable write, which showed as an A/A control 0.93x.
    """
    if len(slots) < len(contenders):
        raise ValueError(f"{len(slots)} slots for {len(contenders)} contenders")
    deals = [(slot,) for slot in slots]
    return _rounds(
        [(name, op, None) for name, op in contenders], deals, reps, warmup, before_each, seed
    )


def _rounds(
    contenders: Sequence[tuple[str, Callable[..., object], tuple[str, ...] | None]],
    deals: Sequence[tuple[str, ...]],
    reps: int,
    warmup: int,
    before_each: Callable[[], None] | None,
    seed: int,
) -> dict[str, Series]:
    """The timing loop of both round robins; ``None`` args = take the dealt slot."""
    results = {name: Series(name) for name, _, _ in contenders}
    rng = random.Random(seed)
    order = list(contenders)
    for _ in range(warmup):
        for i, (_, op, args) in enumerate(contenders):
            op(*(args if args is not None else deals[i]))
    gc.collect()
    perf = time.perf_counter
    for rep in range(reps):
        rng.shuffle(order)
        dealt = rng.sample(deals, len(order)) if len(deals) > 1 else [deals[0]] * len(order)
        gc.disable()
        try:
            for (name, op, args), deal in zip(order, dealt, strict=True):
                call_args = args if args is not None else deal
                if before_each is not None:
                    before_each()
                t0 = perf()
                op(*call_args)
                results[name].samples.append(perf() - t0)
        finally:
            gc.enable()
        if rep % 16 == 15:
            gc.collect()
    return results


def fmt_time(seconds: float) -> str:
    """Format a duration with a unit that keeps 3 significant figures."""
    us = seconds * 1e6
    if us < 1000:
        return f"{us:.1f} µs" if us < 100 else f"{us:.0f} µs"
    ms = us / 1000
    if ms < 1000:
        return f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s"


def fmt_ratio(value: float | None) -> str:
    """Format a ratio like ``1.07x``; ``-`` when not applicable."""
    if value is None:
        return "-"
    return f"{value:.2f}x"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a GitHub-flavoured Markdown table with aligned columns."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, header {len(headers)}: {row}")
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right = [i > 0 and _numeric_column([r[i] for r in rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if right[i] else c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if right[i] else (":" + "-" * (w + 1)) for i, w in enumerate(widths)
    )
    return "\n".join([line(headers), sep + "|", *(line(r) for r in rows)])


def _numeric_column(cells: Sequence[str]) -> bool:
    """Right-align a column whose cells are all numbers (``-`` placeholders aside)."""
    real = [c for c in cells if c not in ("-", "n/a", "")]
    return bool(real) and all(c[0].isdigit() for c in real)


def fs_type(path: Path) -> str:
    """Return the filesystem type and device holding ``path`` (Linux mountinfo)."""
    try:
        real = os.path.realpath(path)
        best = ("", "unknown", "?")
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for raw in f:
                left, _, right = raw.partition(" - ")
                mount_point = left.split()[4]
                fstype, source = right.split()[:2]
                prefix = mount_point.rstrip("/") + "/"
                if (real == mount_point or real.startswith(prefix)) and len(mount_point) >= len(
                    best[0]
                ):
                    best = (mount_point, fstype, source)
        return f"{best[1]} on {best[2]} (mounted at {best[0]})"
    except OSError:
        return "unknown"


def machine_info(bench_dir: Path) -> dict[str, str]:
    """Describe where the numbers come from."""
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version() + " (" + platform.python_implementation() + ")",
        "bench dir": str(bench_dir),
        "filesystem": fs_type(bench_dir),
        "load average at start": load,
        "htmlgraph src": htmlgraph_revision(),
        "htmlgraph imported from": _module_file(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _module_file() -> str:
    mod = import_htmlgraph()
    return str(getattr(mod, "__file__", "not importable")) if mod is not None else "not importable"


def importable(module: str) -> bool:
    """Return whether ``module`` (a peer library) can be imported here."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def peer_versions() -> dict[str, str]:
    """Return the installed version of each peer (or ``missing``)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in (
        "atomicwrites",
        "boltons",
        "safer",
        "atomicwriter",
        "filelock",
        "fasteners",
        "portalocker",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out
