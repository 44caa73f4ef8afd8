"""Find out, with strace, what durability each write contender really gives.

Docs and READMEs are not evidence: this runs one overwrite of an existing file
per contender in a child process under ``strace -f`` and reads the syscalls
between two marker ``stat`` calls: is the file fsynced, before or after the
rename, and is the directory fsynced after it?

Usage::

    python -m benchmarks.strace_peers                # table of all contenders
    python -m benchmarks.strace_peers --show NAME    # full syscall list of one write
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import REPO_ROOT, Trace, md_table
from benchmarks._lockers import make_lock
from benchmarks._writers import WRITERS, WRITERS_BY_NAME

# Built at run time so that the literal never appears in this file's source,
# which the traced child reads (and strace prints) while importing.
BEGIN_MARK = "@@" + "-".join(("htmlgraph", "bench", "begin")) + "@@"
END_MARK = "@@" + "-".join(("htmlgraph", "bench", "end")) + "@@"
_STAT_CALLS = ("stat", "lstat", "newfstatat", "statx", "fstatat64")

# With -f -o, strace prefixes each line with the pid ("1234  openat(...)").
_LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+|\?)(.*)$")
_PREFIX = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _parse(name: str, text: str) -> Trace:
    trace = Trace(name)
    inside = False
    fds: dict[int, tuple[str, bool]] = {}
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if m is None:
            continue
        call, args, result = m.group(1), m.group(2), m.group(3)
        if call in _STAT_CALLS and BEGIN_MARK in args:
            inside = True
            continue
        if call in _STAT_CALLS and END_MARK in args:
            break
        if not inside:
            continue
        trace.calls.append(_PREFIX.sub("", raw))
        paths = _QUOTED.findall(args)
        if call in ("open", "openat", "openat2") and result.lstrip("-").isdigit():
            fd = int(result)
            if fd >= 0 and paths:
                path = paths[0]
                is_dir = "O_DIRECTORY" in args or os.path.isdir(path)
                fds[fd] = (path, is_dir)
        elif call == "close":
            fds.pop(int(args.strip()), None)
        elif call in ("fsync", "fdatasync") and result == "0":
            fd = int(args.strip())
            _, is_dir = fds.get(fd, ("?", False))
            trace.events.append(f"fsync {'dir' if is_dir else 'file'}")
        elif call in ("rename", "renameat", "renameat2", "link", "linkat") and result == "0":
            trace.events.append(f"{call} {' -> '.join(os.path.basename(p) for p in paths)}")
    if not inside:
        trace.error = "markers not found in strace output"
    return trace


def trace_writer(name: str, work_dir: Path, payload_kind: str = "bytes") -> Trace:
    """Trace one overwrite of an existing file by writer ``name`` in a child process."""
    strace = shutil.which("strace")
    if strace is None:
        return Trace(name, error="strace not installed")
    sub = Path(tempfile.mkdtemp(prefix="strace-", dir=work_dir))
    out = sub / "strace.out"
    cmd = [
        strace,
        "-f",
        "-qq",
        "-s",
        "200",
        "-o",
        str(out),
        sys.executable,
        "-m",
        "benchmarks.strace_peers",
        "--child",
        name,
        str(sub),
        payload_kind,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT, check=False
        )
        if proc.returncode != 0:
            return Trace(name, error=f"child failed: {proc.stderr.strip()[-300:]}")
        return _parse(name, out.read_text(encoding="utf-8", errors="replace"))
    except (OSError, subprocess.SubprocessError) as exc:
        return Trace(name, error=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(sub, ignore_errors=True)


def _child(name: str, directory: str, payload_kind: str) -> None:
    if name.startswith("lock:"):
        _lock_child(name, directory)
        return
    writer = WRITERS_BY_NAME[name]
    target = os.path.join(directory, "target.dat")
    data: bytes | str = b"x" * 4096 if payload_kind == "bytes" else "x" * 4096
    with open(target, "wb") as f:
        f.write(b"old content\n")
    writer.fn(target, data)  # warm-up: imports, caches
    _mark(directory, BEGIN_MARK)
    writer.fn(target, data)
    _mark(directory, END_MARK)
    with open(target, "rb") as f:
        got = f.read()
    expected = data.encode() if isinstance(data, str) else data
    if got != expected:
        raise SystemExit(f"{name}: target has wrong content after the write")


def _mark(directory: str, mark: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.stat(os.path.join(directory, mark))


def _lock_child(name: str, directory: str) -> None:
    """``lock:<library>:<shared|exclusive>``: one acquire+release, traced."""
    _, lib, mode = name.split(":")
    lock_dir = os.path.join(directory, "locks")
    os.mkdir(lock_dir)
    pair = make_lock(lib, lock_dir)
    acquire, release = (
        (pair.acquire_shared, pair.release_shared)
        if mode == "shared"
        else (pair.acquire_exclusive, pair.release_exclusive)
    )
    acquire()
    release()  # warm-up
    _mark(directory, BEGIN_MARK)
    acquire()
    release()
    _mark(directory, END_MARK)


def verify_all(work_dir: Path) -> dict[str, Trace]:
    """Trace every available writer once; keyed by writer name."""
    return {
        w.name: trace_writer(w.name, work_dir)
        for w in WRITERS
        if w.available() and w.kind != "control"
    }


def durability_table(traces: dict[str, Trace]) -> str:
    """Markdown table of what strace showed for each writer."""
    rows = []
    for name, t in traces.items():
        if t.error:
            rows.append([name, "?", "?", "?", f"unverified ({t.error})"])
        else:
            rows.append([name, t.file_fsync, t.dir_fsync, t.commit, t.label])
    return md_table(["contender", "fsync(file)", "fsync(dir)", "commit", "durability"], rows)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("NAME", "DIR", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--show", metavar="NAME", action="append", help="print all syscalls")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    work = Path(tempfile.mkdtemp(prefix="htmlgraph-strace-", dir=args.dir))
    try:
        if args.show:
            for name in args.show:
                t = trace_writer(name, work)
                print(f"## {name}: {t.label}" + (f" ({t.error})" if t.error else ""))
                print(f"{len(t.calls)} syscalls (one 4 KiB overwrite, or one acquire+release):")
                for c in t.calls:
                    print("   ", c)
                print()
            return 0
        print(durability_table(verify_all(work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
