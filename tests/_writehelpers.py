"""Shared helpers for the atomic-write test suites.

Only the standard library and ``htmlgraph`` are imported here, because the
functions below also run as ``multiprocessing`` targets in spawned child
processes, which import this module by name (a cheap import keeps 20-process
tests fast on a small machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path

from htmlgraph import AtomicFileWriter, _identity, _platform, atomic_json_write, atomic_write

# ".tmp-{pid}-{owner tag}-{mkstemp random}-{target name, truncated}" (our temp names).
TEMP_NAME_RE = re.compile(
    r"^\.tmp-(?P<pid>[0-9]+)-(?P<tag>[0-9a-f]{16})-(?P<random>[0-9a-f]{8}[a-z0-9_]{8})-(?P<stem>.*)\Z",
    re.S,
)


def temp_name_for(pid: int, target: str = "data.json", *, tag: str | None = None) -> str:
    """Return a temp name in this library's format for a writer ``pid`` of this host.

    The owner tag is the one the process ``pid`` of this host and pid
    namespace would write (for a dead pid, with an empty start token).
    """
    if tag is None:
        start = _platform.process_start_token(pid) or ""
        tag = _identity._place_tag() + _identity._digest8(start)
    return f".tmp-{pid}-{tag}-{os.urandom(4).hex()}k3j_x9a2-{target}"


# Exit codes used by child processes to report what happened.
EXIT_OK = 0
EXIT_BAD_READ = 5

JOIN_TIMEOUT = 120.0
"""Upper bound for any child process join: generous for a loaded 2-core box."""


def listing(directory: str | os.PathLike[str]) -> list[str]:
    """Return the sorted names in ``directory`` (the whole listing, dotfiles included)."""
    return sorted(os.listdir(directory))


def temp_names(directory: str | os.PathLike[str]) -> list[str]:
    """Return the names in ``directory`` that look like this library's temp files."""
    return [name for name in listing(directory) if name.startswith(".tmp-")]


def is_root() -> bool:
    """Return whether this process runs as root (POSIX only)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


# A second, real user for the hostile-ground tests (root only).
STRANGER = 2000


def become(uid: int, gid: int, *, umask: int | None = None) -> None:
    """In a forked child: run from now on as ``uid``, with ``gid`` as its only group."""
    if sys.platform == "win32":
        raise RuntimeError("no POSIX users on Windows")
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    if umask is not None:
        os.umask(umask)


def as_user(uid: int, gid: int, action: Callable[[], None], *, umask: int | None = None) -> None:
    """Run ``action`` in a forked child as ``uid`` (group ``gid``); fail on its error."""
    if sys.platform == "win32":
        raise RuntimeError("no fork and no POSIX users on Windows")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            become(uid, gid, umask=umask)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"uid {uid}'s action failed"


def as_stranger(action: Callable[[], None]) -> None:
    """Run ``action`` in a forked child with the stranger's uid and gid; fail on its error."""
    as_user(STRANGER, STRANGER, action)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str = "4m") -> Iterator[Path]:
    """Mount a fresh tmpfs of ``size`` on ``mountpoint`` for the duration of the block.

    Skips the calling test when not root or when the mount is refused (a
    container without CAP_SYS_ADMIN). Always unmounts, lazily if still busy.
    """
    import pytest  # imported here: spawned children import this module and need no pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs mounts need Linux")
    if not is_root():
        pytest.skip("mounting a tmpfs needs root")
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        done = subprocess.run(
            ["umount", str(mountpoint)], capture_output=True, timeout=30, check=False
        )
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], timeout=30, check=False)


@contextlib.contextmanager
def world_traversable_dir() -> Iterator[Path]:
    """Yield a fresh 0o755 directory under the system temp dir, removed afterwards.

    pytest's ``tmp_path`` lives below a 0o700 directory, which an unprivileged
    child process cannot even traverse.
    """
    import shutil

    path = Path(tempfile.mkdtemp(prefix="htmlgraph-unpriv-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_python(code: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (same venv), bounded by ``timeout``."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- self-validating payloads ----------------------------------------------------------


def make_record(writer: int, seq: int, size: int) -> str:
    """Return a JSON document that carries a checksum of its own body."""
    body = json.dumps({"writer": writer, "seq": seq, "pad": "x" * size}, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps({"body": body, "sha256": digest})


def check_record(text: str) -> tuple[int, int]:
    """Parse a record made by :func:`make_record`; raise ValueError unless it is whole.

    Returns:
        The ``(writer, seq)`` pair the record names.
    """
    outer = json.loads(text)
    body = outer["body"]
    if hashlib.sha256(body.encode()).hexdigest() != outer["sha256"]:
        raise ValueError("checksum mismatch")
    inner = json.loads(body)
    return int(inner["writer"]), int(inner["seq"])


def record_size(writer: int, seq: int) -> int:
    """Return a padding size that varies widely by writer and sequence (0 B - ~200 KiB)."""
    return [0, 17, 900, 4096, 65_537, 200_000][(writer * 7 + seq) % 6] + writer


# --- multiprocessing targets (module level so spawn can import them) -------------------


def writer_loop(
    target: str,
    writer: int,
    versions: int,
    start: Barrier,
    conn: Connection,
) -> None:
    """Write ``versions`` self-validating records to ``target`` using the three APIs."""
    try:
        start.wait(JOIN_TIMEOUT)
        for seq in range(versions):
            text = make_record(writer, seq, record_size(writer, seq))
            durable = seq % 2 == 0
            api = (writer + seq) % 3
            if api == 0:
                with AtomicFileWriter(target, durable=durable) as f:
                    # Several writes, so a reader could catch a partial temp if it ever saw one.
                    half = len(text) // 2
                    f.write(text[:half])
                    f.flush()
                    f.write(text[half:])
            elif api == 1:
                atomic_write(target, text.encode(), durable=durable)
            else:
                atomic_json_write(target, json.loads(text), indent=None, durable=durable)
        conn.send("ok")
    except BaseException as exc:
        conn.send(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        conn.close()


def reader_loop(
    target: str,
    writers: int,
    versions: int,
    ready: Barrier,
    stop: Event,
    conn: Connection,
) -> None:
    """Read ``target`` until ``stop`` is set; every read must be one whole record.

    Sends ``(reads, bad_reads, first_bad)`` through ``conn``; exits non-zero on a bad read.
    """
    reads = 0
    bad: list[str] = []
    ready.wait(JOIN_TIMEOUT)
    while not stop.is_set() or reads == 0:
        with open(target, encoding="utf-8") as f:
            text = f.read()
        reads += 1
        try:
            writer, seq = check_record(text)
            if not (-1 <= writer < writers and 0 <= seq < versions):
                raise ValueError(f"unknown version {writer}/{seq}")
        except (ValueError, KeyError, TypeError) as exc:
            bad.append(f"{exc!r}: {text[:80]!r}... ({len(text)} chars)")
    conn.send((reads, len(bad), bad[:3]))
    conn.close()
    if bad:
        sys.exit(EXIT_BAD_READ)


def create_only_racer(targets: list[str], payload: str, armed: Barrier, conn: Connection) -> None:
    """For each target: open a create-only writer, wait until every racer holds one, commit.

    Sends one outcome per target through ``conn``: ``"won"``, ``"exists"`` (a
    FileExistsError naming the path) or a description of anything else.
    """
    outcomes: list[str] = []
    for target in targets:
        try:
            with AtomicFileWriter(target, overwrite=False) as f:
                f.write(payload)
                # Every racer now holds a written temp: the commits really overlap.
                armed.wait(JOIN_TIMEOUT)
        except FileExistsError as exc:
            outcomes.append("exists" if target in str(exc) else f"unnamed: {exc}")
        except BaseException as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        else:
            outcomes.append("won")
    conn.send(outcomes)
    conn.close()


def create_only_oneshot(targets: list[str], payload: str, start: Barrier, conn: Connection) -> None:
    """For each target: ``atomic_write(overwrite=False)`` right after a barrier (as above)."""
    outcomes: list[str] = []
    for target in targets:
        start.wait(JOIN_TIMEOUT)
        try:
            atomic_write(target, payload, overwrite=False)
        except FileExistsError as exc:
            outcomes.append("exists" if target in str(exc) else f"unnamed: {exc}")
        except BaseException as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        else:
            outcomes.append("won")
    conn.send(outcomes)
    conn.close()


def own_file_writer(target: str, writer: int, versions: int, start: Barrier) -> None:
    """Write ``versions`` records to this process's own file."""
    start.wait(JOIN_TIMEOUT)
    for seq in range(versions):
        atomic_write(target, make_record(writer, seq, record_size(writer, seq)), durable=False)


def big_file_reader(target: str, size: int, ready: Event, stop: Event, conn: Connection) -> None:
    """Read a big file made of one repeated byte until ``stop``; every read must be whole.

    Sends ``(reads, distinct_versions_seen, first_bad)``; exits non-zero on a bad read.
    """
    reads = 0
    seen: set[int] = set()
    first_bad = ""
    ready.set()
    while not stop.is_set() or reads == 0:
        with open(target, "rb") as f:
            data = f.read()
        reads += 1
        # A whole version is `size` copies of one byte: a partial file is short,
        # a torn one mixes two bytes.
        if len(data) != size or data.count(data[:1]) != size:
            first_bad = f"len={len(data)} head={data[:1]!r} tail={data[-1:]!r}"
            break
        seen.add(data[0])
    conn.send((reads, len(seen), first_bad))
    conn.close()
    if first_bad:
        sys.exit(EXIT_BAD_READ)


def big_file_writer(target: str, size: int, values: list[int], chunk: int = 1 << 20) -> None:
    """Stream ``size`` copies of each byte value in ``values`` into ``target``, in turn."""
    for value in values:
        block = bytes([value]) * chunk
        with AtomicFileWriter(target, mode="wb") as f:
            remaining = size
            while remaining:
                n = min(chunk, remaining)
                f.write(block[:n])
                remaining -= n


def cleaner_loop(directory: str, stop: Event, conn: Connection) -> None:
    """Run ``cleanup_orphaned_temp_files(age_hours=0)`` until ``stop``; send the total removed."""
    from htmlgraph import cleanup_orphaned_temp_files

    removed = rounds = 0
    while not stop.is_set() or rounds == 0:
        removed += cleanup_orphaned_temp_files(directory, age_hours=0)
        rounds += 1
    conn.send((removed, rounds))
    conn.close()
