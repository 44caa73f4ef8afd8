"""Syscall audit: strace shows the durable commit order, and no reopen of the temp.

``strace -f -y`` of a child doing one durable write must show, for the write's
directory: openat(temp, O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC) -> write(s) on that
fd -> fsync(that fd) -> close -> rename(temp, target) -> openat(directory) ->
fsync(directory fd); the temp path opened exactly once and never unlinked after
the rename. Variants: ``atomic_json_write``, the streaming ``AtomicFileWriter``,
create-only (link + unlink, then the directory fsync) and a write whose
directories the call had to create (each created directory's parent synced).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,  # strace audits: part of the crash lab
    pytest.mark.skipif(sys.platform != "linux", reason="strace is Linux-only"),
]

TRACE = "openat,write,fsync,fdatasync,rename,renameat,renameat2,link,linkat,unlink,unlinkat,close"
_LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+)")
_FD_PATH = re.compile(r"^(\d+)<([^>]*)>")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')

SCRIPTS = {
    "atomic_write": "htmlgraph.atomic_write(target, 'x' * 300000)",
    "atomic_json_write": "htmlgraph.atomic_json_write(target, {'k': ['v'] * 50000})",
    "AtomicFileWriter": (
        "with htmlgraph.AtomicFileWriter(target, mode='wb') as f:\n"
        "    for _ in range(20): f.write(b'y' * 65536)"
    ),
    "create-only": "htmlgraph.atomic_write(target, 'new', overwrite=False)",
    "new-dirs": "htmlgraph.atomic_write(target, 'new')",
}


@dataclasses.dataclass(frozen=True)
class Call:
    """One traced syscall."""

    index: int
    name: str
    args: str
    ret: int

    def fd_path(self) -> tuple[int, str] | None:
        """``(fd, path)`` of the first argument when strace -y annotated it."""
        match = _FD_PATH.match(self.args)
        return (int(match.group(1)), match.group(2)) if match else None

    def strings(self) -> list[str]:
        """The quoted path arguments."""
        return _STRING.findall(self.args)


def _strace_works() -> str | None:
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace)"
    probe = subprocess.run(
        ["strace", "-o", "/dev/null", "true"], capture_output=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        return f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def trace(tmp_path: Path, target: Path, script: str) -> list[Call]:
    """Run ``script`` (with ``htmlgraph`` and ``target`` defined) under strace."""
    reason = _strace_works()
    if reason:
        pytest.skip(reason)
    log = tmp_path / "strace.log"
    code = f"import htmlgraph\ntarget = {str(target)!r}\n{script}\n"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-s",
            "256",
            "-o",
            str(log),
            "-e",
            f"trace={TRACE}",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    work = str(tmp_path)
    calls: list[Call] = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _LINE.match(line)
        if match and work in line:
            calls.append(Call(len(calls), match.group(1), match.group(2), int(match.group(3))))
    return calls


def audit(calls: list[Call], target: Path, synced_dirs: list[Path], *, link: bool) -> None:
    """Assert the durable commit order for one write of ``target``."""
    log = "\n".join(f"{c.name}({c.args}) = {c.ret}" for c in calls)
    temp_prefix = str(target.parent / ".tmp-")

    # A failed attempt (ENOENT before the call creates missing directories) is
    # fine; exactly one temp is created, and its path is never opened again.
    opens = [
        c
        for c in calls
        if c.name == "openat" and any(s.startswith(temp_prefix) for s in c.strings())
    ]
    created = [c for c in opens if c.ret >= 0]
    assert len(created) == 1, f"exactly one temp must be created:\n{log}"
    opened = created[0]
    for flag in ("O_WRONLY", "O_CREAT", "O_EXCL", "O_NOFOLLOW", "O_CLOEXEC"):
        assert flag in opened.args, f"{flag} missing: {opened.args}"
    temp = next(s for s in opened.strings() if s.startswith(temp_prefix))
    reopened = [c for c in opens if c is not opened and temp in c.strings()]
    assert reopened == [], f"the temp path was opened again by name:\n{log}"
    fd = opened.ret
    assert fd >= 0

    def on_temp(call: Call) -> bool:
        return call.fd_path() == (fd, temp) and call.index > opened.index

    writes = [c for c in calls if c.name == "write" and on_temp(c)]
    fsyncs = [c for c in calls if c.name == "fsync" and on_temp(c)]
    closes = [c for c in calls if c.name == "close" and on_temp(c)]
    assert writes, f"no write on the temp fd:\n{log}"
    assert len(fsyncs) == 1, f"exactly one fsync of the temp fd expected:\n{log}"
    assert closes, f"the temp fd was never closed:\n{log}"
    fsync, close = fsyncs[0], closes[0]
    assert max(w.index for w in writes) < fsync.index < close.index, log

    commit_names = ("link", "linkat") if link else ("rename", "renameat", "renameat2")
    commits = [
        c
        for c in calls
        if c.name in commit_names
        and c.strings()[:2]
        == [
            temp,
            str(target),
        ]
    ]
    assert len(commits) == 1, f"one {commit_names[0]}(temp, target) expected:\n{log}"
    commit = commits[0]
    assert commit.ret == 0
    assert close.index < commit.index, f"the commit must follow fsync + close:\n{log}"
    after = commit.index
    unlinks = [c for c in calls if c.name in ("unlink", "unlinkat") and temp in c.strings()]
    if link:
        assert len(unlinks) == 1, f"link then unlink(temp):\n{log}"
        assert unlinks[0].index > after, f"link then unlink(temp):\n{log}"
        after = unlinks[0].index
    else:
        assert unlinks == [], f"the temp path must not be unlinked after the rename:\n{log}"

    for directory in synced_dirs:
        dir_opens = [
            c
            for c in calls
            if c.name == "openat" and c.index > after and str(directory) in c.strings()
        ]
        assert dir_opens, f"directory {directory} not opened after the commit:\n{log}"
        dfd = dir_opens[0].ret
        dir_syncs = [
            c
            for c in calls
            if c.name == "fsync"
            and c.index > dir_opens[0].index
            and c.fd_path() == (dfd, str(directory))
        ]
        assert dir_syncs, f"directory {directory} not fsynced after the commit:\n{log}"
    assert not [c for c in calls if c.name == "fdatasync"], log


@pytest.mark.parametrize("how", ["atomic_write", "atomic_json_write", "AtomicFileWriter"])
def test_durable_replace_syscall_order(tmp_path: Path, how: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = work / "target.txt"
    target.write_text("old", encoding="utf-8")
    calls = trace(tmp_path, target, SCRIPTS[how])
    audit(calls, target, [work], link=False)
    assert sorted(p.name for p in work.iterdir()) == ["target.txt"]


def test_create_only_links_then_unlinks_then_syncs(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = work / "target.txt"
    calls = trace(tmp_path, target, SCRIPTS["create-only"])
    audit(calls, target, [work], link=True)
    assert sorted(p.name for p in work.iterdir()) == ["target.txt"]


def test_created_directories_are_synced_after_the_rename(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = work / "a" / "b" / "target.txt"
    calls = trace(tmp_path, target, SCRIPTS["new-dirs"])
    # b holds the new name, a holds b's entry, work holds a's entry.
    audit(calls, target, [work / "a" / "b", work / "a", work], link=False)
    assert target.read_text(encoding="utf-8") == "new"


# Writers that get one step wrong; the audit must reject each of them, or it
# could not catch the library doing the same.
MUTANTS = {
    "no-fsync": (
        "import os\n"
        "tmp = os.path.join(os.path.dirname(target), '.tmp-1-x-t')\n"
        "fd = os.open(tmp, os.O_WRONLY|os.O_CREAT|os.O_EXCL|os.O_NOFOLLOW|os.O_CLOEXEC, 0o666)\n"
        "os.write(fd, b'new'); os.close(fd); os.replace(tmp, target)\n"
        "d = os.open(os.path.dirname(target), os.O_RDONLY); os.fsync(d); os.close(d)\n"
    ),
    "fsync-after-rename": (
        "import os\n"
        "tmp = os.path.join(os.path.dirname(target), '.tmp-1-x-t')\n"
        "fd = os.open(tmp, os.O_WRONLY|os.O_CREAT|os.O_EXCL|os.O_NOFOLLOW|os.O_CLOEXEC, 0o666)\n"
        "os.write(fd, b'new'); os.replace(tmp, target); os.fsync(fd); os.close(fd)\n"
        "d = os.open(os.path.dirname(target), os.O_RDONLY); os.fsync(d); os.close(d)\n"
    ),
    "reopen-by-name": (
        "import os\n"
        "tmp = os.path.join(os.path.dirname(target), '.tmp-1-x-t')\n"
        "fd = os.open(tmp, os.O_WRONLY|os.O_CREAT|os.O_EXCL|os.O_NOFOLLOW|os.O_CLOEXEC, 0o666)\n"
        "os.close(fd)\n"
        "with open(tmp, 'wb') as f: f.write(b'new'); f.flush(); os.fsync(f.fileno())\n"
        "os.replace(tmp, target)\n"
        "d = os.open(os.path.dirname(target), os.O_RDONLY); os.fsync(d); os.close(d)\n"
    ),
    "no-dir-fsync": (
        "import os\n"
        "tmp = os.path.join(os.path.dirname(target), '.tmp-1-x-t')\n"
        "fd = os.open(tmp, os.O_WRONLY|os.O_CREAT|os.O_EXCL|os.O_NOFOLLOW|os.O_CLOEXEC, 0o666)\n"
        "os.write(fd, b'new'); os.fsync(fd); os.close(fd); os.replace(tmp, target)\n"
    ),
}


# The audit's message each mutant must trip. strace -y names an fd by its
# current path, so an fsync after the rename shows up on the target, not the temp.
MUTANT_FINDINGS = {
    "no-fsync": "exactly one fsync of the temp fd",
    "fsync-after-rename": "exactly one fsync of the temp fd",
    "reopen-by-name": "exactly one temp must be created",
    "no-dir-fsync": "not opened after the commit",
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_audit_rejects_a_wrong_commit_order(tmp_path: Path, mutant: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = work / "target.txt"
    target.write_text("old", encoding="utf-8")
    calls = trace(tmp_path, target, MUTANTS[mutant])
    assert calls, "nothing traced"
    with pytest.raises(AssertionError, match=MUTANT_FINDINGS[mutant]):
        audit(calls, target, [work], link=False)


def test_write_through_a_symlink_syncs_the_resolved_directory(tmp_path: Path) -> None:
    """The temp goes beside the real file, and *that* directory is fsynced (not the link's)."""
    real_dir = tmp_path / "real"
    link_dir = tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    real = real_dir / "target.txt"
    real.write_text("old", encoding="utf-8")
    link = link_dir / "target.txt"
    link.symlink_to(real)
    calls = trace(tmp_path, link, "htmlgraph.atomic_write(target, 'new')")
    audit(calls, real, [real_dir], link=False)
    assert link.is_symlink()
    assert real.read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in real_dir.iterdir()) == ["target.txt"]
