"""What the library did and what it cost, per process: counters and latency histograms.

Always on and cheap (a lock, an add and a bisect per event; the write path
stays within 1 % of its cost without them, ``docs/benchmarks.md``),
thread-safe, and fork-safe: a forked child starts from zero. Memory is
constant: a histogram is a fixed set of buckets, never a list of samples.

* :func:`snapshot` - everything as JSON-ready data, with ``schema_version``;
* :func:`reset` - back to zero;
* :func:`to_prometheus` - the Prometheus text exposition format (version
  0.0.4), for an application to serve on its own ``/metrics`` endpoint.

Every metric, its unit and meaning: ``docs/metrics.md``. The library records
through :func:`counter` and :func:`histogram`, which return handles bound to
one label set; applications only read.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from typing import Literal, NamedTuple

from htmlgraph import _platform

__all__ = [
    "SCHEMA_VERSION",
    "Counter",
    "Histogram",
    "counter",
    "histogram",
    "reset",
    "snapshot",
    "to_prometheus",
]

SCHEMA_VERSION = 1

Kind = Literal["counter", "histogram"]

# Latency buckets: upper bounds 1 us, 2 us, 4 us ... 2**26 us (about 67 s),
# then +Inf - fsyncs from a RAM disk's microseconds to a stalled network
# filesystem's seconds. Count buckets (files per batch): 1, 2, 4 ... 2**20.
SECONDS_BOUNDS = tuple(1e-6 * 2**k for k in range(27))
COUNT_BOUNDS = tuple(float(2**k) for k in range(21))


class _Family(NamedTuple):
    kind: Kind
    help: str
    bounds: tuple[float, ...] = SECONDS_BOUNDS


# The one list of metrics (docs/metrics.md describes each).
FAMILIES: dict[str, _Family] = {
    "htmlgraph_writes_total": _Family(
        "counter", "Atomic writes committed, by durability (durable: fsynced)."
    ),
    "htmlgraph_write_bytes_total": _Family("counter", "Bytes committed by atomic writes."),
    "htmlgraph_write_failures_total": _Family(
        "counter", "Atomic writes that raised an OSError, by errno name; the target is untouched."
    ),
    "htmlgraph_fsync_seconds": _Family(
        "histogram", "Time in fsync, of a temp file's data (file) or of a directory (directory)."
    ),
    "htmlgraph_rename_seconds": _Family(
        "histogram", "Time in the rename (or link) that commits a write."
    ),
    "htmlgraph_lock_acquisitions_total": _Family(
        "counter", "DirectoryLocker acquisitions (outermost), by mode."
    ),
    "htmlgraph_lock_wait_seconds": _Family(
        "histogram", "Time from an acquire call to holding the lock, by mode."
    ),
    "htmlgraph_lock_hold_seconds": _Family(
        "histogram", "Time from holding the lock to its final release, by mode."
    ),
    "htmlgraph_lock_timeouts_total": _Family(
        "counter", "Acquire calls whose timeout ran out, by mode."
    ),
    "htmlgraph_lock_stale_broken_total": _Family(
        "counter",
        "Lock files removed as stale, by reason (gone, unreadable, not_a_marker, pending).",
    ),
    "htmlgraph_cleanup_removed_total": _Family(
        "counter", "Orphaned temp files removed by cleanup."
    ),
    "htmlgraph_cleanup_skipped_total": _Family(
        "counter", "Orphaned temp files cleanup could not remove (another user's, read-only)."
    ),
    "htmlgraph_registry_operations_total": _Family(
        "counter", "SessionRegistry operations, by operation."
    ),
    "htmlgraph_updates_total": _Family(
        "counter", "atomic_update calls, by result (written, unchanged)."
    ),
    "htmlgraph_batch_commits_total": _Family("counter", "AtomicBatch commits completed."),
    "htmlgraph_batch_files": _Family(
        "histogram", "Files (writes and deletes) per committed batch.", COUNT_BOUNDS
    ),
    "htmlgraph_batch_commit_seconds": _Family(
        "histogram", "Time to commit a batch, from the first fsync to the journal's retirement."
    ),
    "htmlgraph_batch_recoveries_total": _Family(
        "counter", "Interrupted batches recovered, by action (rolled_forward, rolled_back)."
    ),
}

Labels = tuple[tuple[str, str], ...]

_lock = threading.Lock()


class Counter:
    """One counter with one label set (a handle from :func:`counter`)."""

    __slots__ = ("labels", "name", "value")

    def __init__(self, name: str, labels: Labels) -> None:
        self.name = name
        self.labels = labels
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (at least 0)."""
        with _lock:
            self.value += amount


class Histogram:
    """One fixed-bucket histogram with one label set (a handle from :func:`histogram`)."""

    __slots__ = ("bounds", "buckets", "count", "labels", "max", "name", "sum")

    def __init__(self, name: str, labels: Labels, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.labels = labels
        self.bounds = bounds
        self._clear()

    def _clear(self) -> None:
        self.buckets = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (seconds, or a count for count histograms)."""
        index = bisect.bisect_left(self.bounds, value)
        with _lock:
            self.buckets[index] += 1
            self.count += 1
            self.sum += value
            if value > self.max:
                self.max = value

    def quantile(self, q: float) -> float:
        """Estimate the ``q`` quantile (0..1), interpolating inside its bucket; 0 if empty."""
        with _lock:
            buckets, count, top = list(self.buckets), self.count, self.max
        if count == 0:
            return 0.0
        rank = q * count
        seen = 0
        for index, n in enumerate(buckets):
            if n and seen + n >= rank:
                lower = self.bounds[index - 1] if index > 0 else 0.0
                upper = self.bounds[index] if index < len(self.bounds) else top
                estimate = lower + (upper - lower) * (rank - seen) / n
                return min(estimate, top)
            seen += n
        return top


_counters: dict[tuple[str, Labels], Counter] = {}
_histograms: dict[tuple[str, Labels], Histogram] = {}


def _labels(name: str, kind: Kind, labels: dict[str, str]) -> Labels:
    family = FAMILIES.get(name)
    if family is None or family.kind != kind:
        raise ValueError(f"{name} is not a known {kind} (htmlgraph.metrics.FAMILIES)")
    return tuple(sorted(labels.items()))


def counter(name: str, **labels: str) -> Counter:
    """Return the counter ``name`` with these labels (created at zero on first use)."""
    key = (name, _labels(name, "counter", labels))
    with _lock:
        found = _counters.get(key)
        if found is None:
            found = _counters[key] = Counter(*key)
    return found


def histogram(name: str, **labels: str) -> Histogram:
    """Return the histogram ``name`` with these labels (created empty on first use)."""
    key = (name, _labels(name, "histogram", labels))
    with _lock:
        found = _histograms.get(key)
        if found is None:
            found = _histograms[key] = Histogram(*key, FAMILIES[name].bounds)
    return found


def reset() -> None:
    """Set every counter and histogram back to zero (handles stay valid)."""
    with _lock:
        for c in _counters.values():
            c.value = 0.0
        for h in _histograms.values():
            h._clear()


def _reset_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held the parent's at the fork
    reset()


_platform.after_fork(_reset_in_child)


def snapshot() -> dict[str, object]:
    """Return every metric as JSON-serialisable data.

    ``{"schema_version": 1, "pid": ..., "time": ..., "counters": {name: [{"labels":
    {...}, "value": v}]}, "histograms": {name: [{"labels": {...}, "count", "sum",
    "max", "p50", "p90", "p99", "buckets": [[upper bound or "+Inf", cumulative
    count], ...]}]}}`` - only label sets that were used appear.
    """
    with _lock:
        counters = [(c.name, c.labels, c.value) for c in _counters.values()]
        hists = [(h, list(h.buckets), h.count, h.sum, h.max) for h in _histograms.values()]
    out_counters: dict[str, list[dict[str, object]]] = {}
    for name, labels, value in sorted(counters):
        out_counters.setdefault(name, []).append({"labels": dict(labels), "value": value})
    out_hists: dict[str, list[dict[str, object]]] = {}
    for h, buckets, count, total, top in sorted(hists, key=lambda t: (t[0].name, t[0].labels)):
        cumulative: list[list[object]] = []
        running = 0
        for bound, n in zip((*h.bounds, math.inf), buckets, strict=True):
            running += n
            cumulative.append(["+Inf" if bound == math.inf else bound, running])
        out_hists.setdefault(h.name, []).append(
            {
                "labels": dict(h.labels),
                "count": count,
                "sum": total,
                "max": top,
                "p50": h.quantile(0.5),
                "p90": h.quantile(0.9),
                "p99": h.quantile(0.99),
                "buckets": cumulative,
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "pid": os.getpid(),
        "time": time.time(),
        "counters": out_counters,
        "histograms": out_hists,
    }


def _label_text(labels: Labels, extra: Labels = ()) -> str:
    pairs = (*labels, *extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if value != int(value) or abs(value) >= 1e15 else str(int(value))


def to_prometheus() -> str:
    """Return every metric in the Prometheus text exposition format (0.0.4).

    One ``# HELP`` and ``# TYPE`` per family; counters end in ``_total``,
    histograms expose cumulative ``_bucket{le=...}`` series with ``_sum`` and
    ``_count``; units are in the names (``_seconds``, ``_bytes``).
    """
    with _lock:
        counters = {k: c.value for k, c in _counters.items()}
        hists = {k: (h.bounds, list(h.buckets), h.count, h.sum) for k, h in _histograms.items()}
    lines: list[str] = []
    for name, family in FAMILIES.items():
        lines.append(f"# HELP {name} {family.help}")
        lines.append(f"# TYPE {name} {family.kind}")
        if family.kind == "counter":
            for (n, labels), value in sorted(counters.items()):
                if n == name:
                    lines.append(f"{name}{_label_text(labels)} {_number(value)}")
            continue
        base = name
        for (n, labels), (bounds, buckets, count, total) in sorted(hists.items()):
            if n != name:
                continue
            running = 0
            for bound, b in zip((*bounds, math.inf), buckets, strict=True):
                running += b
                le = "+Inf" if bound == math.inf else repr(bound)
                lines.append(f"{base}_bucket{_label_text(labels, (('le', le),))} {running}")
            lines.append(f"{base}_sum{_label_text(labels)} {_number(total)}")
            lines.append(f"{base}_count{_label_text(labels)} {count}")
    return "\n".join(lines) + "\n"
