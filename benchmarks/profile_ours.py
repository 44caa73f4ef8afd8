"""Where does htmlgraph's time go, beyond the syscall floor?

Three views of our hot paths, printed as Markdown:

1. strace: the syscalls of one durable ``atomic_write`` (and of one lock
   acquire+release) next to the floor's, and which ones are extra.
2. Ablation on tmpfs (where syscalls are cheap and nothing waits for a disk):
   the floor, a bare-``os`` replica of exactly our syscall sequence, and our
   call. replica - floor = cost of the extra syscalls; ours - replica = cost
   of our Python code.
3. cProfile: Python function calls per write, and where the Python time goes.

Usage: ``python -m benchmarks.profile_ours [--reps N]``
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks._common import Op, fmt_time, md_table, ours, round_robin
from benchmarks._writers import floor_durable, floor_fast
from benchmarks.cleanup import OrphanDir, dead_pid
from benchmarks.strace_peers import trace_writer


def _syscall_name(line: str) -> str:
    return line.split("(", 1)[0]


def syscall_diff(work: Path) -> str:
    """Syscall lists of our write and lock paths against their floors."""
    out = []
    pairs = [
        ("floor-durable", "htmlgraph atomic_write"),
        ("floor-fast", "htmlgraph atomic_write(durable=False)"),
        ("floor-durable", "htmlgraph AtomicFileWriter"),
    ]
    if ours("DirectoryLocker") is not None:
        pairs.append(
            ("lock:filelock.SoftFileLock:exclusive", "lock:htmlgraph DirectoryLocker:exclusive")
        )
        pairs.append(
            ("lock:filelock.SoftFileLock:exclusive", "lock:htmlgraph DirectoryLocker:shared")
        )
    rows = []
    for floor, mine in pairs:
        if "lock:" not in mine and ours("atomic_write") is None:
            continue
        a, b = trace_writer(floor, work), trace_writer(mine, work)
        if a.error or b.error:
            rows.append([mine, "?", "?", a.error or b.error or ""])
            continue
        ca = collections.Counter(_syscall_name(c) for c in a.calls)
        cb = collections.Counter(_syscall_name(c) for c in b.calls)
        extra = cb - ca
        missing = ca - cb
        rows.append(
            [
                mine,
                f"{len(b.calls)} vs {len(a.calls)} ({floor})",
                ", ".join(f"{k} x{v}" for k, v in sorted(extra.items())) or "none",
                ", ".join(f"{k} x{v}" for k, v in sorted(missing.items())) or "none",
            ]
        )
        out.append(f"<details><summary>{mine}: {len(b.calls)} syscalls</summary>\n\n```")
        out += [_shorten(c) for c in b.calls]
        out.append("```\n</details>\n")
    table = md_table(["path", "syscalls (ours vs reference)", "extra", "fewer"], rows)
    return "### Syscalls per call (strace)\n\n" + table + "\n\n" + "\n".join(out)


def _shorten(call: str) -> str:
    # Drop the payload of write() and temp directory prefixes for readability.
    if call.startswith("write("):
        head, _, rest = call.partition(", ")
        return head + ', "..."' + rest[rest.rfind(", ") :] if ", " in rest else call
    return call


def _replica(path: str, data: bytes, durable: bool) -> None:
    """Our syscall sequence for an overwrite, with bare os calls and no checks.

    Mirrors the strace of ``atomic_write`` (lstat of the target, getrandom for
    the token, O_EXCL create, fstat of the new fd to compare its mode with the
    target's, write, fsync, close, rename, directory fsync); keep it in step
    with the "Syscalls per call" table when the library changes.
    """
    st = os.lstat(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.urandom(8).hex()}-{name}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, stat.S_IMODE(st.st_mode))
    try:
        os.fstat(fd)
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _bind(fn: Callable[[str], object], target: str) -> Op:
    return lambda: fn(target)


def ablation(reps: int, where: Path | None = None, size: int = 100) -> str:
    """Floor vs replica vs ours: separates the extra syscalls' cost from Python's.

    On tmpfs (``where=None``) nothing waits for a disk, so the differences are
    CPU. On the bench filesystem (``where`` given) each call starts after an
    untimed ``os.sync()``, as in the main run, and the differences include what
    ext4 charges for the extra syscalls (``fchmod`` dirties the inode).
    """
    on_disk = where is not None
    if ours("atomic_write") is None:
        return "### Ablation\n\nskipped (no htmlgraph)\n"
    if not on_disk and not Path("/dev/shm").is_dir():
        return "### Ablation on tmpfs\n\nskipped (no /dev/shm)\n"
    base = Path(tempfile.mkdtemp(prefix="htmlgraph-abl-", dir=where or "/dev/shm"))
    write = ours("atomic_write")
    data = b"x" * size
    variants: list[tuple[str, Op]] = []
    try:
        specs = [
            ("floor-fast", lambda p: floor_fast(p, data)),
            ("replica of our syscalls, fast", lambda p: _replica(p, data, False)),
            ("htmlgraph atomic_write(durable=False)", lambda p: write(p, data, durable=False)),
            ("floor-durable", lambda p: floor_durable(p, data)),
            ("replica of our syscalls, durable", lambda p: _replica(p, data, True)),
            ("htmlgraph atomic_write", lambda p: write(p, data)),
        ]
        for i, (name, fn) in enumerate(specs):
            d = base / f"c{i}"
            d.mkdir()
            target = str(d / "target.dat")
            Path(target).write_bytes(b"old")
            variants.append((name, _bind(fn, target)))
        res = round_robin(variants, reps, warmup=20, before_each=os.sync if on_disk else None)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    for name, _ in variants:
        floor = "floor-fast" if "False" in name or name.endswith("fast") else "floor-durable"
        rows.append(
            [name, fmt_time(res[name].median), f"{res[name].median / res[floor].median:.2f}x"]
        )
    fast = (
        res["floor-fast"].median,
        res["replica of our syscalls, fast"].median,
        res["htmlgraph atomic_write(durable=False)"].median,
    )
    dur = (
        res["floor-durable"].median,
        res["replica of our syscalls, durable"].median,
        res["htmlgraph atomic_write"].median,
    )
    summary = (
        f"durable=False: extra syscalls cost {_signed(fast[1] - fast[0])}, our Python code "
        f"{_signed(fast[2] - fast[1])} per write; durable: {_signed(dur[1] - dur[0])} and "
        f"{_signed(dur[2] - dur[1])}."
    )
    title = (
        f"### Ablation on the bench filesystem ({where}), {size} B overwrite"
        if on_disk
        else f"### Ablation on tmpfs (fsync is a no-op there), {size} B overwrite"
    )
    return (
        f"{title}, {reps} interleaved reps, median\n\n"
        + md_table(["variant", "median", "x its floor"], rows)
        + "\n\n"
        + summary
        + "\n"
    )


def _lock_step(d: str, *, record: bool, chmod: bool, rename: bool, scan: bool) -> Op:
    """One acquire+release built from bare os calls, adding our protocol's steps."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    payload = b'{"pid":1,"host":"h","pidns":"pid:[1]","start":"x:1","created":1.0,"mode":"x"}' * 2

    def op() -> None:
        name = f".lock-exclusive-{os.getpid()}-{os.urandom(8).hex()}"
        final = os.path.join(d, name)
        path = os.path.join(d, ".lock-pending-" + name[16:]) if rename else final
        fd = os.open(path, flags, 0o644)
        try:
            if chmod:
                os.fchmod(fd, 0o644)
            if record:
                os.write(fd, payload)
        finally:
            os.close(fd)
        if rename:
            os.path.lexists(final)
            os.rename(path, final)
        if scan:
            os.listdir(d)
        os.unlink(final)

    return op


def lock_ablation(base_dir: Path | None, reps: int) -> str:
    """Attribute our uncontended lock cost to the steps of the protocol (on the bench fs)."""
    locker_cls = ours("DirectoryLocker")
    if locker_cls is None:
        return ""
    base = Path(tempfile.mkdtemp(prefix="htmlgraph-lockabl-", dir=base_dir))
    steps = [
        ("create + close + unlink (floor-marker)", False, False, False, False),
        ("+ write the record", True, False, False, False),
        ("+ fchmod", True, True, False, False),
        ("+ pending name, lexists, rename", True, True, True, False),
        ("+ one directory scan (= our syscalls)", True, True, True, True),
    ]
    variants: list[tuple[str, Op]] = []
    try:
        for i, (name, rec, chm, ren, scn) in enumerate(steps):
            d = base / f"c{i}"
            d.mkdir()
            variants.append((name, _lock_step(str(d), record=rec, chmod=chm, rename=ren, scan=scn)))
        for mode in ("exclusive", "shared"):
            d = base / mode
            d.mkdir()
            locker = locker_cls(str(d))
            acquire = getattr(locker, f"acquire_{mode}_lock")
            variants.append((f"htmlgraph DirectoryLocker {mode}", _lock_cycle(acquire, locker)))
        res = round_robin(variants, reps, warmup=20)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    prev: float | None = None
    for name, _ in variants:
        med = res[name].median
        delta = _signed(med - prev) if prev is not None and name.startswith("+") else ""
        rows.append([name, fmt_time(med), delta])
        prev = med
    return (
        f"### Lock ablation on the bench filesystem ({reps} interleaved reps, median)\n\n"
        + md_table(["variant", "median", "step cost"], rows)
        + "\n"
    )


def _signed(seconds: float) -> str:
    return ("+" if seconds >= 0 else "-") + fmt_time(abs(seconds))


def _lock_cycle(acquire: Callable[..., object], locker: object) -> Op:
    release = getattr(locker, "release_lock")  # noqa: B009 - typed as object on purpose

    def op() -> None:
        if acquire(timeout=5) is not True:
            raise RuntimeError("uncontended acquire failed")
        release()

    return op


def python_profile(n: int) -> str:
    """cProfile of n fast writes on tmpfs: calls per write and top Python functions."""
    write = ours("atomic_write")
    if write is None:
        return ""
    base = Path(tempfile.mkdtemp(prefix="htmlgraph-prof-", dir="/dev/shm"))
    try:
        target = str(base / "target.dat")
        Path(target).write_bytes(b"old")
        data = b"x" * 100
        for _ in range(50):
            write(target, data, durable=False)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            write(target, data, durable=False)
        prof.disable()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    stats = pstats.Stats(prof)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    total_calls = sum(v[1] for v in raw.values())
    rows = []
    for (file, line, func), (_cc, nc, tt, _ct, _callers) in sorted(
        raw.items(), key=lambda kv: -kv[1][2]
    )[:15]:
        where = func if file == "~" else f"{Path(file).name}:{line} {func}"
        rows.append([where, f"{nc / n:g}", fmt_time(tt / n)])
    return (
        f"### cProfile, {n} x atomic_write(100 B, durable=False) on tmpfs\n\n"
        f"{total_calls / n:.0f} Python-level function calls per write "
        "(the bare-os floor makes 8 calls). Top by own time (profiler overhead inflates "
        "small functions):\n\n" + md_table(["function", "calls/write", "own time/write"], rows)
    )


def lock_profile(n: int) -> str:
    """cProfile of n uncontended exclusive acquire+release cycles on tmpfs."""
    locker_cls = ours("DirectoryLocker")
    if locker_cls is None:
        return ""
    base = Path(tempfile.mkdtemp(prefix="htmlgraph-lprof-", dir="/dev/shm"))
    try:
        locker = locker_cls(str(base / "locks"))
        for _ in range(50):
            locker.acquire_exclusive_lock(timeout=5)
            locker.release_lock()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            locker.acquire_exclusive_lock(timeout=5)
            locker.release_lock()
        prof.disable()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    stats = pstats.Stats(prof)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    total_calls = sum(v[1] for v in raw.values())
    total = sum(v[2] for v in raw.values())
    sys_time = sum(v[2] for k, v in raw.items() if k[0] == "~" and "posix" in k[2])
    rows = []
    for (file, line, func), (_cc, nc, tt, _ct, _callers) in sorted(
        raw.items(), key=lambda kv: -kv[1][2]
    )[:15]:
        where = func if file == "~" else f"{Path(file).name}:{line} {func}"
        rows.append([where, f"{nc / n:g}", fmt_time(tt / n)])
    return (
        f"### cProfile, {n} x DirectoryLocker exclusive acquire+release on tmpfs\n\n"
        f"{total_calls / n:.0f} Python-level function calls per cycle; "
        f"{fmt_time(total / n)} per cycle under the profiler, of which "
        f"{fmt_time(sys_time / n)} inside os calls.\n\n"
        + md_table(["function", "calls/cycle", "own time/cycle"], rows)
        + "\n"
    )


def cleanup_profile(entries: int) -> str:
    """cProfile of cleanup_orphaned_temp_files over ``entries`` entries on tmpfs."""
    import logging

    cleanup = ours("cleanup_orphaned_temp_files")
    if cleanup is None:
        return ""
    null = logging.NullHandler()
    logging.getLogger("htmlgraph").addHandler(null)
    base = Path(tempfile.mkdtemp(prefix="htmlgraph-cprof-", dir="/dev/shm"))
    try:
        d = OrphanDir(base / "d", dead_pid())
        d.grow_to(entries)
        prof = cProfile.Profile()
        prof.enable()
        removed = cleanup(d.path, age_hours=24.0)
        prof.disable()
    finally:
        logging.getLogger("htmlgraph").removeHandler(null)
        shutil.rmtree(base, ignore_errors=True)
    stats = pstats.Stats(prof)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    logging_time = sum(v[2] for k, v in raw.items() if "logging" in k[0])
    rows = []
    for (file, line, func), (_cc, nc, tt, _ct, _callers) in sorted(
        raw.items(), key=lambda kv: -kv[1][2]
    )[:12]:
        where = func if file == "~" else f"{Path(file).name}:{line} {func}"
        rows.append([where, f"{nc:,}", fmt_time(tt), f"{tt / total:.0%}"])
    return (
        f"### cProfile of cleanup_orphaned_temp_files, {entries:,} entries on tmpfs "
        f"({removed:,} removed)\n\n"
        f"Total {fmt_time(total)}; the logging module's own time: {fmt_time(logging_time)} "
        f"({logging_time / total:.0%}).\n\n"
        + md_table(["function", "calls", "own time", "share"], rows)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="profile htmlgraph's hot paths")
    parser.add_argument("--reps", type=int, default=3000, help="ablation repetitions")
    parser.add_argument("--disk-reps", type=int, default=400, help="on-disk ablation reps")
    parser.add_argument("--cleanup-entries", type=int, default=20_000, help="cleanup profile size")
    parser.add_argument("--lock-reps", type=int, default=1500, help="lock ablation repetitions")
    parser.add_argument("--dir", type=Path, default=None, help="bench filesystem (default $TMPDIR)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="htmlgraph-profile-"))
    try:
        print("## Profile of our paths\n")
        print(syscall_diff(work))
        print(ablation(args.reps))
        print(ablation(args.disk_reps, args.dir or Path(tempfile.gettempdir()), 4096))
        print(python_profile(3000))
        print(cleanup_profile(args.cleanup_entries))
        print(lock_profile(2000))
        print(lock_ablation(args.dir, args.lock_reps))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
