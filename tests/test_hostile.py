"""A shared directory is hostile ground: the writer and the cleanup under attack.

Other users and processes plant symlinks, FIFOs, devices, odd names and old
files in shared directories (a sticky ``/tmp``, a volume shared with a
container). The library must never be a way around the kernel's protections,
never block on something a stranger made, never replace what is not a regular
file, and never take a name it did not write as proof of anything. Each test
here failed before the hardening it checks (issue 11); the lock's share of the
same rules is in ``test_locker.py``.

Where the kernel is the reference (fs.protected_symlinks, fs.protected_regular)
the tests set the sysctl for real and compare our verdict with what a plain
``open()`` gets: those need root, and skip with a reason otherwise.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _helpers import age, dead_pid
from _writehelpers import is_root, listing, run_python, temp_name_for, tmpfs, world_traversable_dir
from htmlgraph import (
    AtomicFileWriter,
    atomic_json_write,
    atomic_ops,
    atomic_rename,
    atomic_write,
    cleanup_orphaned_temp_files,
    find_orphaned_temp_files,
)

if sys.platform == "win32":
    pytest.skip("POSIX file types, owners and sticky directories", allow_module_level=True)

needs_root = pytest.mark.skipif(not is_root(), reason="needs root (other users, sysctls, mounts)")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sysctls")

VICTIM = 1000
ATTACKER = 2000


@pytest.fixture
def sysctl() -> Iterator[object]:
    """Set fs.protected_* sysctls for one test and put the old values back."""
    saved: dict[str, str] = {}

    def set_value(name: str, value: int) -> None:
        path = Path("/proc/sys/fs") / name
        if not path.exists():
            pytest.skip(f"no {path} on this kernel")
        saved.setdefault(name, path.read_text())
        try:
            path.write_text(str(value))
        except OSError as exc:
            pytest.skip(f"cannot set {path}: {exc}")

    yield set_value
    for name, value in saved.items():
        (Path("/proc/sys/fs") / name).write_text(value)


# --------------------------------------------------------------------------
# 1. Symlinks in sticky world-writable directories (fs.protected_symlinks)
# --------------------------------------------------------------------------

_AS_VICTIM = textwrap.dedent(
    """
    import io, json, os, sys
    from htmlgraph import atomic_write, cli
    link, uid = sys.argv[1], int(sys.argv[2])
    sys.stdin = io.TextIOWrapper(io.BytesIO(b"from the command line"))
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
    out = {}
    try:
        with open(link, "a"):
            pass
        out["open"] = "ok"
    except OSError as exc:
        out["open"] = exc.errno
    for name, call in [
        ("atomic_write", lambda: atomic_write(link, "victim's new content")),
        ("create_only", lambda: atomic_write(link, "x", overwrite=False)),
    ]:
        try:
            call()
            out[name] = "ok"
        except FileExistsError:
            out[name] = "exists"
        except PermissionError as exc:
            out[name] = exc.errno
    out["cli"] = cli.main(["write", "--no-fsync", link]) if out["atomic_write"] != "ok" else None
    print(json.dumps(out))
    """
)


@needs_root
@linux_only
@pytest.mark.parametrize("dangling", [False, True], ids=["existing", "dangling"])
def test_planted_symlink_is_refused_where_the_kernel_refuses_it(
    sysctl: object, dangling: bool
) -> None:
    with world_traversable_dir() as root:
        sticky = root / "sticky"
        sticky.mkdir()
        sticky.chmod(0o1777)
        home = root / "home"
        home.mkdir()
        os.chown(home, VICTIM, VICTIM)
        home.chmod(0o700)
        secret = home / "secret.txt"
        if not dangling:
            secret.write_text("victim's data", encoding="utf-8")
            os.chown(secret, VICTIM, VICTIM)
        link = sticky / "report.txt"
        link.symlink_to(secret)
        os.lchown(link, ATTACKER, ATTACKER)  # the attacker's link in a shared directory

        set_sysctl = sysctl
        assert callable(set_sysctl)
        set_sysctl("protected_symlinks", 1)
        proc = run_python(_AS_VICTIM, str(link), str(VICTIM))
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["open"] == errno.EACCES  # the kernel's verdict for a plain open()
        assert out["atomic_write"] == errno.EACCES
        assert out["create_only"] == errno.EACCES
        assert out["cli"] != 0
        assert "protected_symlinks" in proc.stderr
        assert listing(home) == ([] if dangling else ["secret.txt"])
        if not dangling:
            assert secret.read_text(encoding="utf-8") == "victim's data"
        assert listing(sticky) == ["report.txt"]
        assert os.readlink(link) == str(secret)

        # With the protection off, the kernel follows the link and so do we.
        set_sysctl("protected_symlinks", 0)
        proc = run_python(_AS_VICTIM, str(link), str(VICTIM))
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["open"] == "ok"
        assert out["atomic_write"] == "ok"
        assert secret.read_text(encoding="utf-8") == "victim's new content"
        assert listing(sticky) == ["report.txt"]


@needs_root
@linux_only
def test_own_symlink_in_a_sticky_directory_is_followed(sysctl: object) -> None:
    with world_traversable_dir() as root:
        sticky = root / "sticky"
        sticky.mkdir()
        sticky.chmod(0o1777)
        home = root / "home"
        home.mkdir()
        os.chown(home, VICTIM, VICTIM)
        real = home / "real.txt"
        real.write_text("old", encoding="utf-8")
        os.chown(real, VICTIM, VICTIM)
        link = sticky / "mine.txt"
        link.symlink_to(real)
        os.lchown(link, VICTIM, VICTIM)
        assert callable(sysctl)
        sysctl("protected_symlinks", 1)
        proc = run_python(_AS_VICTIM, str(link), str(VICTIM))
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["open"] == "ok"
        assert out["atomic_write"] == "ok"
        assert out["create_only"] == "exists"
        assert real.read_text(encoding="utf-8") == "victim's new content"
        assert listing(sticky) == ["mine.txt"]
        assert listing(home) == ["real.txt"]


# --------------------------------------------------------------------------
# 2. Files planted in sticky directories (fs.protected_regular)
# --------------------------------------------------------------------------


def _kernel_allows(path: Path) -> bool:
    """Whether a plain open(path, "w") - O_CREAT of an existing file - is allowed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except PermissionError:
        return False
    os.close(fd)
    return True


@needs_root
@linux_only
@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("dir_mode", [0o1777, 0o1770, 0o777])
@pytest.mark.parametrize("owner", ["stranger", "directory owner", "caller"])
def test_planted_file_is_refused_exactly_where_the_kernel_refuses_it(
    sysctl: object, level: int, dir_mode: int, owner: str
) -> None:
    assert callable(sysctl)
    sysctl("protected_regular", level)
    with world_traversable_dir() as root:
        shared = root / "shared"
        shared.mkdir()
        os.chown(shared, 0, ATTACKER)  # root's directory, writable by the attacker's group
        shared.chmod(dir_mode)
        planted = shared / "out.txt"
        planted.write_text("planted", encoding="utf-8")
        planted.chmod(0o666)
        uid = {"stranger": ATTACKER, "directory owner": 0, "caller": 0}[owner]
        os.chown(planted, uid, ATTACKER)
        kernel = _kernel_allows(planted)
        if kernel:
            atomic_write(planted, "root's secret")
        else:
            with pytest.raises(PermissionError, match="protected_regular") as info:
                atomic_write(planted, "root's secret")
            assert info.value.errno == errno.EACCES
            assert info.value.filename == str(planted)
        st = planted.stat()
        assert st.st_uid == uid  # never given to anyone but its owner
        expected = "root's secret" if kernel else "planted"
        assert planted.read_text(encoding="utf-8") == expected
        assert listing(shared) == ["out.txt"]
    if owner == "stranger" and dir_mode == 0o1777 and level > 0:
        assert not kernel, "the case of the issue: root writing a stranger's file in /tmp"


# --------------------------------------------------------------------------
# 3. Targets that are not regular files
# --------------------------------------------------------------------------


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _make_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def _make_chardev(path: Path) -> None:
    if not is_root():
        pytest.skip("mknod of a device needs root")
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # like /dev/null


@pytest.mark.parametrize(
    ("make", "kind", "is_kind"),
    [
        (_make_fifo, "a FIFO", stat.S_ISFIFO),
        (_make_socket, "a socket", stat.S_ISSOCK),
        (_make_chardev, "a character device", stat.S_ISCHR),
    ],
    ids=["fifo", "socket", "chardev"],
)
@pytest.mark.parametrize("via_link", [False, True], ids=["direct", "via-symlink"])
def test_special_files_are_refused_and_stay(
    tmp_path: Path, make: object, kind: str, is_kind: object, via_link: bool
) -> None:
    assert callable(make)
    assert callable(is_kind)
    node = tmp_path / "node"
    make(node)
    target = node
    if via_link:
        target = tmp_path / "link"
        target.symlink_to(node)
    calls: list[Callable[[], object]] = [
        lambda: atomic_write(target, "x"),
        lambda: atomic_json_write(target, {"x": 1}),
        lambda: atomic_write(target, "x", overwrite=True, durable=False),
        lambda: AtomicFileWriter(target).open(),
    ]
    for call in calls:
        with pytest.raises(OSError, match=f"is {kind}, not a regular file") as info:
            call()
        assert info.value.errno == errno.EINVAL
        assert info.value.filename == (str(node) if via_link else str(target))
    assert is_kind(os.lstat(node).st_mode)
    assert sorted(listing(tmp_path)) == (["link", "node"] if via_link else ["node"])


def test_cli_write_refuses_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "htmlgraph", "write", str(fifo)],
        input=b"data",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert b"not a regular file" in proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert listing(tmp_path) == ["fifo"]


def test_readers_never_block_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = textwrap.dedent(
        """
        import sys
        from htmlgraph import AtomicFileWriter, validate_atomic_write
        print(validate_atomic_write(sys.argv[1]))
        try:
            AtomicFileWriter.safe_read_with_retry(sys.argv[1], max_retries=1)
        except OSError as exc:
            print("refused", exc.errno)
        """
    )
    proc = run_python(code, str(fifo), timeout=30)  # blocking would hit the timeout
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "refused", str(errno.EINVAL)]


# --------------------------------------------------------------------------
# 5, 9, 10. Cleanup: odd names, other pid namespaces, files it may not remove
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pid", ["99999999999", "2147483648", "4294967296", "0", "²", "١٢"])
def test_cleanup_survives_odd_pids_in_names(tmp_path: Path, pid: str) -> None:
    odd = tmp_path / f".tmp-{pid}-{'0' * 16}-abcdefgh-x"
    odd.write_text("foreign", encoding="utf-8")
    age(odd, 48)
    assert [p.name for p in find_orphaned_temp_files(tmp_path)] == [odd.name]
    assert cleanup_orphaned_temp_files(tmp_path) == 1  # foreign, old: goes, no crash
    assert listing(tmp_path) == []


@pytest.mark.parametrize("age", [math.nan, -1.0, -math.inf])
def test_cleanup_rejects_an_age_that_disables_the_filter(tmp_path: Path, age: float) -> None:
    young = tmp_path / ".tmp-young"
    young.write_text("just written", encoding="utf-8")
    with pytest.raises(ValueError, match="age_hours"):
        cleanup_orphaned_temp_files(tmp_path, age)
    with pytest.raises(ValueError, match="age_hours"):
        list(find_orphaned_temp_files(tmp_path, age))
    assert listing(tmp_path) == [".tmp-young"]


def test_temp_of_another_pid_namespace_is_never_judged(tmp_path: Path) -> None:
    dead = dead_pid()
    # The same pid, the same host, another pid namespace: its pid means nothing here.
    foreign = tmp_path / temp_name_for(dead, "x", tag="f" * 16)
    foreign.write_text("a writer elsewhere", encoding="utf-8")
    ours = tmp_path / temp_name_for(dead, "x")
    ours.write_text("a dead writer here", encoding="utf-8")
    for path in (foreign, ours):
        age(path, 1000)
    assert cleanup_orphaned_temp_files(tmp_path, 0) == 1
    assert listing(tmp_path) == [foreign.name]


_NS_WRITER = textwrap.dedent(
    """
    import os, sys
    from htmlgraph import AtomicFileWriter
    target, free = sys.argv[1], {int(p) for p in sys.argv[2].split(",")}
    # Fork until a child has a pid that is free on the host, so the host could
    # wrongly find it "dead" there.
    while True:
        pid = os.fork()
        if pid == 0:
            if os.getpid() not in free:
                os._exit(0)
            writer = AtomicFileWriter(target)
            f = writer.open()
            f.write("first half, ")
            f.flush()
            print("ready", os.getpid(), writer.temp_path, flush=True)
            sys.stdin.readline()
            f.write("second half")
            try:
                writer.commit()
            except OSError as exc:
                print("commit failed", exc, flush=True)
                os._exit(3)
            print("committed", flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or pid in free:
            sys.exit(os.waitstatus_to_exitcode(status))
    """
)


@needs_root
@linux_only
def test_cleanup_in_the_host_spares_a_live_writer_in_a_container(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    free = [p for p in range(300, 5000) if not os.path.exists(f"/proc/{p}")][:50]
    target = tmp_path / "shared.txt"
    target.write_text("old", encoding="utf-8")
    with subprocess.Popen(
        [
            *("unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _NS_WRITER),
            *(str(target), ",".join(map(str, free))),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdin is not None
        try:
            line = proc.stdout.readline().split()
            if not line:
                pytest.skip(f"unshare refused: {proc.stderr.read() if proc.stderr else ''}")
            assert line[0] == "ready", line
            ns_pid, temp = int(line[1]), Path(line[2])
            assert not os.path.exists(f"/proc/{ns_pid}"), "the writer's pid is free on the host"
            age(temp, 1000)  # a slow write: old by mtime
            assert temp.name not in [p.name for p in find_orphaned_temp_files(tmp_path, 1)]
            assert cleanup_orphaned_temp_files(tmp_path, 0) == 0
            assert temp.exists()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "committed"
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    assert target.read_text(encoding="utf-8") == "first half, second half"
    assert listing(tmp_path) == ["shared.txt"]


_CLEANUP_AS = textwrap.dedent(
    """
    import json, os, sys
    from htmlgraph import atomic_ops
    directory, uid = sys.argv[1], int(sys.argv[2])
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
    result = atomic_ops._cleanup(directory, 1)
    print(json.dumps({"removed": result.removed, "skipped": result.skipped,
                      "public": atomic_ops.cleanup_orphaned_temp_files(directory, 1)}))
    """
)


@needs_root
def test_a_strangers_old_file_does_not_stop_cleanup() -> None:
    with world_traversable_dir() as root:
        sticky = root / "sticky"
        sticky.mkdir()
        sticky.chmod(0o1777)
        names = [".tmp-000-stranger", ".tmp-111-mine", ".tmp-222-mine", ".tmp-333-mine"]
        for name in names:
            path = sticky / name
            path.write_text("orphan", encoding="utf-8")
            owner = ATTACKER if "stranger" in name else VICTIM
            os.chown(path, owner, owner)
            age(path, 48)
        proc = run_python(_CLEANUP_AS, str(sticky), str(VICTIM))
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out == {"removed": 3, "skipped": 1, "public": 0}
        assert listing(sticky) == [".tmp-000-stranger"]
        assert "could not remove 1 orphaned temp file(s)" in proc.stderr


# --------------------------------------------------------------------------
# 12. The smaller ones
# --------------------------------------------------------------------------


def test_dot_dot_through_a_symlinked_directory_goes_where_open_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real" / "sub"
    real.mkdir(parents=True)
    (tmp_path / "l").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    with open("l/../by-open.txt", "w", encoding="utf-8") as f:
        f.write("open")
    atomic_write("l/../by-us.txt", "us")
    with AtomicFileWriter("l/../by-writer.txt") as f:
        f.write("writer")
    assert listing(tmp_path / "real") == ["by-open.txt", "by-us.txt", "by-writer.txt", "sub"]
    assert listing(tmp_path) == ["l", "real"]
    assert (tmp_path / "real" / "by-us.txt").read_text(encoding="utf-8") == "us"


@needs_root
@linux_only
def test_rename_across_filesystems_leaves_no_directories(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt") as mnt:
        src = mnt / "src.txt"
        src.write_text("payload", encoding="utf-8")
        dst = tmp_path / "new" / "deeper" / "dst.txt"
        with pytest.raises(OSError, match="cross-device") as info:
            atomic_rename(src, dst)
        assert info.value.errno == errno.EXDEV
        assert src.read_text(encoding="utf-8") == "payload"
    assert listing(tmp_path) == ["mnt"]


@needs_root
@linux_only
def test_enospc_inside_the_with_block_names_the_target(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", size="1m") as mnt:
        target = mnt / "big.bin"
        target.write_bytes(b"old")
        chunk = b"\0" * (256 * 1024)
        with (  # noqa: PT012 - the error comes from inside the with block
            pytest.raises(OSError, match="No space") as info,
            AtomicFileWriter(target, mode="wb") as f,
        ):
            for _ in range(64):
                f.write(chunk)
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == str(target)
        assert target.read_bytes() == b"old"
        assert listing(mnt) == ["big.bin"]


def test_seed_contract_invalid_target_is_a_value_error(tmp_path: Path) -> None:
    for bad in (None, "", 42):
        with pytest.raises(ValueError, match="target path"):
            AtomicFileWriter(bad)  # type: ignore[arg-type,unused-ignore]
        with pytest.raises(ValueError, match="target path"):
            AtomicFileWriter.atomic_write(bad, "x")  # type: ignore[arg-type,unused-ignore]
        with pytest.raises(ValueError, match="target path"):
            AtomicFileWriter.atomic_json_write(bad, {})  # type: ignore[arg-type,unused-ignore]
    with pytest.raises(TypeError):  # the other reading of a wrong type
        AtomicFileWriter(None)  # type: ignore[call-overload,unused-ignore]
    assert listing(tmp_path) == []


def test_seed_contract_safe_temp_file_is_hidden_and_known_to_cleanup(tmp_path: Path) -> None:
    safe_temp_path = atomic_ops.safe_temp_file(tmp_path)
    assert safe_temp_path.name.startswith(".tmp-")
    custom = atomic_ops.safe_temp_file(tmp_path, prefix="custom")
    assert custom.name.startswith(".custom-")
    safe_temp_path.write_text("in use by this live process", encoding="utf-8")
    age(safe_temp_path, 1000)
    assert cleanup_orphaned_temp_files(tmp_path, 0) == 0  # its writer (us) is alive
    assert listing(tmp_path) == [safe_temp_path.name]


def test_seed_contract_safe_read_retries_any_os_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    target = tmp_path / "t.txt"
    target.write_text("content", encoding="utf-8")
    real_open = builtins.open
    calls: list[object] = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(args[0])
        if len(calls) < 3:
            raise OSError(errno.EIO, "transient network error")
        return real_open(*args, **kwargs)  # type: ignore[call-overload,unused-ignore]

    monkeypatch.setattr(builtins, "open", flaky)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert AtomicFileWriter.safe_read_with_retry(target, max_retries=3, retry_delay=0.01) == (
        "content"
    )
    assert calls == [str(target)] * 3
