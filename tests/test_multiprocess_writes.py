"""Real-process tests: many writers and readers on one directory.

Every child is a real process (``multiprocessing`` with module-level targets
from ``_writehelpers``; forkserver where available, else spawn: children start
clean, without the parent's threads or state), every start is synchronised
by a barrier so the races really overlap, every join is bounded and every exit
code asserted. After each scenario the directory is listed whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from _helpers import cheap_context, new_process
from _writehelpers import (
    EXIT_OK,
    JOIN_TIMEOUT,
    check_record,
    cleaner_loop,
    create_only_oneshot,
    create_only_racer,
    listing,
    make_record,
    own_file_writer,
    reader_loop,
    record_size,
    writer_loop,
)

WRITERS = 16
READERS = 4
VERSIONS = 6


@pytest.fixture(scope="module")
def ctx() -> BaseContext:
    return cheap_context("_writehelpers")


def join_all(procs: list[BaseProcess]) -> list[int]:
    """Join every process within JOIN_TIMEOUT each; return the exit codes."""
    for proc in procs:
        proc.join(JOIN_TIMEOUT)
    alive = [p.pid for p in procs if p.is_alive()]
    assert alive == [], f"processes still running after {JOIN_TIMEOUT}s: {alive}"
    codes = [p.exitcode for p in procs]
    return [code if code is not None else -999 for code in codes]


@pytest.mark.slow
def test_16_writers_4_readers_every_read_is_one_whole_version(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess]
) -> None:
    target = tmp_path / "shared.json"
    # Readers never race the very first creation: an initial whole version exists.
    target.write_text(make_record(-1, 0, 10), encoding="utf-8")
    start = ctx.Barrier(WRITERS + READERS)
    stop = ctx.Event()
    writer_pipes = []
    reader_pipes = []
    writers: list[BaseProcess] = []
    readers: list[BaseProcess] = []
    for _ in range(READERS):
        recv, send = ctx.Pipe(duplex=False)
        readers.append(
            new_process(ctx, reader_loop, str(target), WRITERS, VERSIONS, start, stop, send)
        )
        reader_pipes.append(recv)
    for i in range(WRITERS):
        recv, send = ctx.Pipe(duplex=False)
        writers.append(new_process(ctx, writer_loop, str(target), i, VERSIONS, start, send))
        writer_pipes.append(recv)
    for proc in readers + writers:
        proc.start()
        reap.append(proc)

    writer_codes = join_all(writers)
    writer_reports = [r.recv() if r.poll(10) else "no report" for r in writer_pipes]
    stop.set()
    reader_codes = join_all(readers)
    reader_reports = [r.recv() if r.poll(10) else None for r in reader_pipes]

    assert writer_codes == [EXIT_OK] * WRITERS, writer_reports
    assert writer_reports == ["ok"] * WRITERS
    assert reader_codes == [EXIT_OK] * READERS, reader_reports
    total_reads = 0
    for report in reader_reports:
        assert report is not None
        reads, bad, examples = report
        assert bad == 0, examples
        assert reads > 0
        total_reads += reads
    assert total_reads >= READERS

    # The last commit of all is some writer's last version, whole.
    writer, seq = check_record(target.read_text(encoding="utf-8"))
    assert 0 <= writer < WRITERS
    assert seq == VERSIONS - 1
    assert listing(tmp_path) == ["shared.json"]


def race(
    ctx: BaseContext,
    reap: list[BaseProcess],
    target: Callable[..., None],
    racers: int,
    targets: list[str],
) -> list[list[str]]:
    """Run ``racers`` processes of ``target`` over ``targets``; return outcomes per round."""
    barrier = ctx.Barrier(racers)
    pipes = []
    procs = []
    for i in range(racers):
        recv, send = ctx.Pipe(duplex=False)
        procs.append(new_process(ctx, target, targets, f"racer {i}", barrier, send))
        pipes.append(recv)
    for proc in procs:
        proc.start()
        reap.append(proc)
    assert join_all(procs) == [EXIT_OK] * racers
    per_racer = [pipe.recv() if pipe.poll(10) else ["no report"] * len(targets) for pipe in pipes]
    return [[outcomes[r] for outcomes in per_racer] for r in range(len(targets))]


ROUNDS = 5


@pytest.mark.parametrize("racers", [2, 4])
def test_create_only_race_exactly_one_wins(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess], racers: int
) -> None:
    targets = [str(tmp_path / f"claim-{r}.txt") for r in range(ROUNDS)]
    rounds = race(ctx, reap, create_only_racer, racers, targets)
    for target, outcomes in zip(targets, rounds, strict=True):
        # Every racer had a written temp open before anyone committed (the barrier), so
        # all passed the early check: the losers lose at the atomic link() in commit.
        assert sorted(outcomes) == ["exists"] * (racers - 1) + ["won"], outcomes
        winner = outcomes.index("won")
        assert Path(target).read_text(encoding="utf-8") == f"racer {winner}"
        assert os.stat(target).st_nlink == 1
    assert listing(tmp_path) == sorted(Path(t).name for t in targets)


@pytest.mark.parametrize("racers", [3])
def test_create_only_oneshot_race(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess], racers: int
) -> None:
    targets = [str(tmp_path / f"claim-{r}.txt") for r in range(ROUNDS)]
    rounds = race(ctx, reap, create_only_oneshot, racers, targets)
    for target, outcomes in zip(targets, rounds, strict=True):
        # Losers fail at the early check or at commit; either way with a
        # FileExistsError naming the path, and only one content lands.
        assert sorted(outcomes) == ["exists"] * (racers - 1) + ["won"], outcomes
        winner = outcomes.index("won")
        assert Path(target).read_text(encoding="utf-8") == f"racer {winner}"
    assert listing(tmp_path) == sorted(Path(t).name for t in targets)


def test_the_readers_check_rejects_partial_and_mixed_records() -> None:
    # The harness's own negative control: what a torn or partial file looks like
    # must fail check_record, else the big test above could not fail.
    whole = make_record(3, 2, 5000)
    other = make_record(4, 1, 7000)
    assert check_record(whole) == (3, 2)
    for cut in (0, 1, len(whole) // 2, len(whole) - 1):
        with pytest.raises(ValueError, match=r"Expecting|Unterminated"):
            check_record(whole[:cut])
    mixed = whole[: len(whole) // 2] + other[len(other) // 2 :]
    with pytest.raises((ValueError, KeyError)):
        check_record(mixed)
    tampered = whole.replace("xxxx", "xxxy", 1)
    with pytest.raises(ValueError, match="checksum"):
        check_record(tampered)


def test_concurrent_writers_to_different_files(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess]
) -> None:
    count, versions = 8, 15
    start = ctx.Barrier(count)
    procs = [
        new_process(ctx, own_file_writer, str(tmp_path / f"own-{i}.json"), i, versions, start)
        for i in range(count)
    ]
    for proc in procs:
        proc.start()
        reap.append(proc)
    assert join_all(procs) == [EXIT_OK] * count
    assert listing(tmp_path) == sorted(f"own-{i}.json" for i in range(count))
    for i in range(count):
        text = (tmp_path / f"own-{i}.json").read_text(encoding="utf-8")
        assert check_record(text) == (i, versions - 1)
        assert text == make_record(i, versions - 1, record_size(i, versions - 1))


def test_cleanup_at_age_zero_never_touches_live_writers(
    tmp_path: Path, ctx: BaseContext, reap: list[BaseProcess]
) -> None:
    # age_hours=0 makes every temp "old enough": only the liveness check stands
    # between the cleaner and the writers' in-flight temps.
    count, versions = 4, 25
    start = ctx.Barrier(count)
    stop = ctx.Event()
    recv, send = ctx.Pipe(duplex=False)
    cleaner = new_process(ctx, cleaner_loop, str(tmp_path), stop, send)
    cleaner.start()
    reap.append(cleaner)
    writers = [
        new_process(ctx, own_file_writer, str(tmp_path / f"w{i}.json"), i, versions, start)
        for i in range(count)
    ]
    for proc in writers:
        proc.start()
        reap.append(proc)
    codes = join_all(writers)
    stop.set()
    assert join_all([cleaner]) == [EXIT_OK]
    assert recv.poll(10)
    removed, rounds = recv.recv()
    assert codes == [EXIT_OK] * count
    assert rounds > 0
    assert removed == 0
    for i in range(count):
        text = (tmp_path / f"w{i}.json").read_text(encoding="utf-8")
        assert check_record(text) == (i, versions - 1)
    assert listing(tmp_path) == [f"w{i}.json" for i in range(count)]
