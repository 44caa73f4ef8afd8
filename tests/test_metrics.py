"""htmlgraph.metrics: what the library did and what it cost, per process."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _helpers import dead_pid, mp_context
from htmlgraph import (
    AtomicFileWriter,
    DirectoryLocker,
    _platform,
    atomic_json_update,
    atomic_ops,
    atomic_write,
    cleanup_orphaned_temp_files,
    metrics,
)
from htmlgraph.session_registry import SessionRegistry


@pytest.fixture(autouse=True)
def from_zero() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


def counter_value(name: str, **labels: str) -> float:
    rows: list[dict[str, Any]] = metrics.snapshot()["counters"].get(name, [])  # type: ignore[attr-defined]
    return float(
        sum(r["value"] for r in rows if all(r["labels"].get(k) == v for k, v in labels.items()))
    )


def hist(name: str, **labels: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = metrics.snapshot()["histograms"].get(name, [])  # type: ignore[attr-defined]
    matching = [r for r in rows if r["labels"] == labels]
    assert len(matching) == 1, rows
    return matching[0]


# --------------------------------------------------------------------------
# The primitives
# --------------------------------------------------------------------------


def test_histogram_summary_is_bounded_and_estimates_within_the_bucket() -> None:
    h = metrics.histogram("htmlgraph_rename_seconds", test="quantiles")
    samples = [0.001 * (1 + i % 10) for i in range(1000)]  # 1..10 ms, uniform
    for value in samples:
        h.observe(value)
    assert len(h.buckets) == len(metrics.SECONDS_BOUNDS) + 1  # constant memory
    assert h.count == 1000
    assert h.max == pytest.approx(0.010)
    assert h.sum == pytest.approx(sum(samples))
    # Buckets double, so an estimate is within a factor 2 of the true quantile.
    for q, true in ((0.5, 0.005), (0.9, 0.009), (0.99, 0.010)):
        assert true / 2 <= h.quantile(q) <= min(true * 2, h.max)
    assert metrics.histogram("htmlgraph_rename_seconds", test="empty").quantile(0.5) == 0.0


def test_unknown_or_mistyped_metric_names_are_refused() -> None:
    with pytest.raises(ValueError, match="not a known counter"):
        metrics.counter("htmlgraph_nothing_total")
    with pytest.raises(ValueError, match="not a known histogram"):
        metrics.histogram("htmlgraph_writes_total")


def test_counts_from_many_threads_are_exact() -> None:
    c = metrics.counter("htmlgraph_registry_operations_total", operation="threads")
    h = metrics.histogram("htmlgraph_rename_seconds", test="threads")

    def work() -> None:
        for _ in range(5000):
            c.inc()
            h.observe(1e-5)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert c.value == 40000
    assert h.count == 40000
    assert sum(h.buckets) == 40000


def _child_snapshot(conn: Any) -> None:
    conn.send(
        (
            counter_value("htmlgraph_writes_total"),
            metrics.snapshot()["pid"],
        )
    )
    conn.close()


def test_a_forked_child_starts_from_zero(tmp_path: Path) -> None:
    for _ in range(3):
        atomic_write(tmp_path / "f", "x", durable=False)
    assert counter_value("htmlgraph_writes_total") == 3
    ctx = mp_context()
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=_child_snapshot, args=(child_end,))
    child.start()
    assert parent_end.poll(60)
    writes, pid = parent_end.recv()
    child.join(60)
    assert child.exitcode == 0
    assert pid == child.pid
    assert writes == 0
    assert counter_value("htmlgraph_writes_total") == 3  # the parent keeps its own


# --------------------------------------------------------------------------
# What the library records
# --------------------------------------------------------------------------


def test_writes_bytes_and_step_latencies(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a", b"12345")
    atomic_write(tmp_path / "b", "x" * 10, durable=False)
    with AtomicFileWriter(tmp_path / "c", mode="wb") as f:
        f.write(b"y" * 300_000)  # through the file object, past its buffer
    assert counter_value("htmlgraph_writes_total", durable="true") == 2
    assert counter_value("htmlgraph_writes_total", durable="false") == 1
    assert counter_value("htmlgraph_write_bytes_total") == 5 + 10 + 300_000
    assert hist("htmlgraph_fsync_seconds", target="file")["count"] == 2
    assert hist("htmlgraph_fsync_seconds", target="directory")["count"] == 2
    rename = hist("htmlgraph_rename_seconds")
    assert rename["count"] == 3
    assert 0 < rename["p50"] <= rename["max"]


def test_failures_are_counted_by_errno_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def broken_fsync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic_ops, "_fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write(tmp_path / "t", "x")
    with pytest.raises(OSError, match="Input/output"), AtomicFileWriter(tmp_path / "t") as f:
        f.write("x")
    monkeypatch.undo()
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, "x")
    assert len(calls) == 2
    assert counter_value("htmlgraph_write_failures_total", errno="EIO") == 2
    assert counter_value("htmlgraph_write_failures_total", errno="EISDIR") == 1
    assert counter_value("htmlgraph_writes_total") == 0


def test_lock_acquisitions_waits_holds_timeouts_and_stale_markers(tmp_path: Path) -> None:
    a, b = DirectoryLocker(tmp_path), DirectoryLocker(tmp_path)
    with a.exclusive():
        assert not b.acquire_shared_lock(timeout=0.05)
    with a.shared(), b.shared():
        pass
    assert counter_value("htmlgraph_lock_acquisitions_total", mode="exclusive") == 1
    assert counter_value("htmlgraph_lock_acquisitions_total", mode="shared") == 2
    assert counter_value("htmlgraph_lock_timeouts_total", mode="shared") == 1
    assert hist("htmlgraph_lock_wait_seconds", mode="shared")["count"] == 2
    assert hist("htmlgraph_lock_hold_seconds", mode="exclusive")["count"] == 1
    # A dead holder's marker is broken: counted with its reason.
    pid = dead_pid()
    record = {"pid": pid, "host": _platform.hostname(), "pidns": _platform.pid_namespace()}
    (tmp_path / f".lock-exclusive-{pid}-0-dead").write_text(json.dumps(record))
    assert a.acquire_exclusive_lock(timeout=5)
    a.release_lock()
    assert counter_value("htmlgraph_lock_stale_broken_total", reason="gone") == 1


def test_cleanup_registry_and_update_are_counted(tmp_path: Path) -> None:
    old = tmp_path / ".tmp-seed-style"
    old.write_text("x")
    os.utime(old, (1, 1))
    assert cleanup_orphaned_temp_files(tmp_path, 1) == 1
    assert counter_value("htmlgraph_cleanup_removed_total") == 1
    assert counter_value("htmlgraph_cleanup_skipped_total") == 0

    reg = SessionRegistry(tmp_path / "registry")
    path = reg.register_session("s1", {}, {})
    instance = path.stem
    reg.update_activity(instance)
    reg.get_current_sessions()
    reg.archive_session(instance)
    for operation in ("register", "update_activity", "list", "archive"):
        assert counter_value("htmlgraph_registry_operations_total", operation=operation) == 1

    atomic_json_update(tmp_path / "state.json", lambda d: {**d, "n": 1}, default=dict)
    atomic_json_update(tmp_path / "state.json", lambda d: None)
    assert counter_value("htmlgraph_updates_total", result="written") == 1
    assert counter_value("htmlgraph_updates_total", result="unchanged") == 1


# --------------------------------------------------------------------------
# The exports
# --------------------------------------------------------------------------


def test_snapshot_is_json_with_a_schema_version(tmp_path: Path) -> None:
    atomic_write(tmp_path / "f", "x")
    snap = metrics.snapshot()
    text = json.dumps(snap)  # serialisable as is
    back = json.loads(text)
    assert back["schema_version"] == metrics.SCHEMA_VERSION == 1
    assert back["pid"] == os.getpid()
    fsync = [r for r in back["histograms"]["htmlgraph_fsync_seconds"] if r["count"]]
    assert fsync
    for row in fsync:
        assert set(row) == {"labels", "count", "sum", "max", "p50", "p90", "p99", "buckets"}
        assert row["buckets"][-1] == ["+Inf", row["count"]]
        counts = [n for _, n in row["buckets"]]
        assert counts == sorted(counts)  # cumulative
    metrics.reset()
    assert counter_value("htmlgraph_writes_total") == 0


_SAMPLE = re.compile(
    r'^(?P<name>[a-z_]+)(?:\{(?P<labels>(?:[a-z_]+="[^"]*",?)*)\})? (?P<value>\S+)$'
)


def test_prometheus_text_exposition(tmp_path: Path) -> None:
    atomic_write(tmp_path / "f", "x")
    locker = DirectoryLocker(tmp_path / "lock")
    with locker.exclusive():
        pass
    text = metrics.to_prometheus()
    assert text.endswith("\n")
    helps = re.findall(r"^# HELP (\S+) ", text, re.M)
    types = dict(re.findall(r"^# TYPE (\S+) (counter|histogram)$", text, re.M))
    assert helps == list(metrics.FAMILIES) == list(types)
    buckets: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, line
        name, value = match["name"], match["value"]
        float(value)  # +Inf parses too
        assert name.startswith("htmlgraph_")
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        if types.get(name) == "counter":
            assert name.endswith("_total")
        else:
            assert types[family] == "histogram", line
            if name.endswith("_bucket"):
                assert 'le="' in (match["labels"] or "")
                key = re.sub(r',?le="[^"]*"', "", match["labels"] or "")
                buckets.setdefault(family + key, []).append(float(value))
    assert buckets
    for series in buckets.values():
        assert series == sorted(series)  # cumulative counts never decrease
    assert 'htmlgraph_writes_total{durable="true"} 1' in text
    assert 'htmlgraph_lock_acquisitions_total{mode="exclusive"} 1' in text
    assert re.search(r'^htmlgraph_fsync_seconds_count\{target="file"\} 1$', text, re.M)
    assert re.search(r'^htmlgraph_fsync_seconds_bucket\{target="file",le="\+Inf"\} 1$', text, re.M)


def test_label_values_are_escaped() -> None:
    metrics.counter("htmlgraph_registry_operations_total", operation='a"b\\c\nd').inc()
    text = metrics.to_prometheus()
    assert 'operation="a\\"b\\\\c\\nd"} 1' in text


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def _cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "htmlgraph", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_cli_stats_say_what_each_command_did_and_cost(tmp_path: Path) -> None:
    result = _cli("write", "--stats", str(tmp_path / "f"), stdin=b"hello")
    assert result.returncode == 0, result.stderr
    err = result.stderr.decode()
    assert "htmlgraph write: stats: 1 write(s) (1 durable), 5 bytes" in err
    assert re.search(r"fsync file \d", err)
    assert re.search(r"rename \d", err)
    result = _cli("lock", "--stats", str(tmp_path / "lock"), "--", sys.executable, "-c", "pass")
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"lock \(exclusive\): waited [\d.]+ .s, held [\d.]+ .?s", result.stderr.decode()
    )
    old = tmp_path / ".tmp-x"
    old.write_text("x")
    os.utime(old, (1, 1))
    result = _cli("cleanup", "--stats", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "stats: cleanup removed 1, skipped 0" in result.stderr.decode()
    assert (tmp_path / "f").read_bytes() == b"hello"


def test_check_reports_latency_percentiles(tmp_path: Path) -> None:
    result = _cli("check", "--seconds", "0", "--json", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["latency"]) >= {"fsync", "rename"}
    for step in report["latency"].values():
        assert set(step) == {"p50", "p90", "p99", "max"}
        assert 0 < step["p50"] <= step["p90"] <= step["p99"] <= step["max"] < 60
        assert not math.isnan(step["p50"])
    result = _cli("check", "--seconds", "0", str(tmp_path))
    assert re.search(
        r"fsync p50/p90/p99/max +[\d.]+/[\d.]+/[\d.]+/[\d.]+ ms", result.stdout.decode()
    )
