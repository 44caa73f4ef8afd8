"""Loop-device filesystems for the crash lab: create, mount, snapshot, inspect.

Every mount and loop device made here is recorded on a :class:`Stage` and torn
down in its ``__exit__`` (innermost first), whether or not the test failed, so
a run leaves nothing behind in ``losetup -a`` or ``mount``.

Snapshots ("power cuts") are taken of a *mounted* filesystem's backing file.
With the loop driver in buffered mode (``direct-io`` off, the default) the
backing file's page cache holds exactly the blocks the guest filesystem has
submitted to its disk; the guest's own dirty pages are not there. When the
backing file lives on a reflink-capable filesystem the snapshot is a
``FICLONE``, which holds the source inode lock for the whole remap and so is a
single instant; otherwise it is a sparse byte copy (a few milliseconds on an
idle filesystem, during which the guest could in principle write a block).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from htmlgraph._platform import pid_exists

# ioctl number of FICLONE (linux/fs.h: _IOW(0x94, 9, int)).
_FICLONE = 0x40049409
_CMD_TIMEOUT = 120.0
_STAGE_SIZE = 8 * 1024**3  # sparse; only written blocks use memory


def is_root() -> bool:
    """Return True when running as root on a POSIX system."""
    if sys.platform == "win32":
        return False
    return os.geteuid() == 0


def run(argv: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT) -> str:
    """Run a command, return its combined output; raise with the output on failure."""
    proc = subprocess.run(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> rc={proc.returncode}\n{proc.stdout}")
    return proc.stdout


@dataclasses.dataclass(frozen=True)
class FsKind:
    """One filesystem configuration under test.

    Attributes:
        name: label used in tables and test ids.
        fstype: kernel filesystem type.
        mkfs: mkfs command (the device is appended).
        mount_opts: options for the filesystem under test.
        copy_mount_opts: options for mounting a snapshot (journal replay).
        fsck: read-only checker command for an unmounted image (file appended).
        tools: executables the configuration needs.
        periodic_wait: seconds to wait for the nearest analogue of a periodic
            journal commit (see :data:`FILESYSTEMS` comments).
    """

    name: str
    fstype: str
    mkfs: tuple[str, ...]
    mount_opts: str
    copy_mount_opts: str
    fsck: tuple[str, ...]
    tools: tuple[str, ...]
    periodic_wait: float


# ext4: commit=1 makes jbd2 commit the running transaction one second after it
# started, so waiting 1.5 s after a write crosses a periodic commit.
# xfs has no commit= option; its log worker forces the log every
# fs.xfs.xfssyncd_centisecs (default 30 s). The lab lowers that sysctl to 1 s
# for the duration of the xfs module (restored afterwards): the nearest analogue.
# btrfs: commit=1 sets the transaction kthread interval; it commits a transaction
# older than the interval, so up to ~2 intervals pass; wait 2.5 s.
# The snapshot of an xfs image carries the original's UUID: mount with nouuid.
# Snapshots of btrfs share the fsid of the mounted original; recent kernels give
# a single-device clone a temporary fsid (temp-fsid), older ones may refuse it
# (the trial then reports "unmountable" and fails loudly).
FILESYSTEMS: dict[str, FsKind] = {
    "ext4": FsKind(
        name="ext4",
        fstype="ext4",
        mkfs=("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"),
        mount_opts="commit=1",
        copy_mount_opts="",
        fsck=("e2fsck", "-fn"),
        tools=("mkfs.ext4", "e2fsck"),
        periodic_wait=1.5,
    ),
    "ext4-noauto_da_alloc": FsKind(
        name="ext4-noauto_da_alloc",
        fstype="ext4",
        mkfs=("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"),
        mount_opts="commit=1,noauto_da_alloc",
        copy_mount_opts="",
        fsck=("e2fsck", "-fn"),
        tools=("mkfs.ext4", "e2fsck"),
        periodic_wait=1.5,
    ),
    "xfs": FsKind(
        name="xfs",
        fstype="xfs",
        mkfs=("mkfs.xfs", "-q", "-f"),
        mount_opts="",
        copy_mount_opts="nouuid",
        fsck=("xfs_repair", "-n", "-f"),
        tools=("mkfs.xfs", "xfs_repair"),
        periodic_wait=1.5,
    ),
    "btrfs": FsKind(
        name="btrfs",
        fstype="btrfs",
        mkfs=("mkfs.btrfs", "-q", "-f"),
        mount_opts="commit=1",
        copy_mount_opts="",
        fsck=("btrfs", "check", "--readonly"),
        tools=("mkfs.btrfs", "btrfs"),
        periodic_wait=2.5,
    ),
}


def skip_reason(kind: FsKind | None = None) -> str | None:
    """Why the loop-device lab cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "loop devices and mounts are Linux-only"
    if not is_root():
        return "needs root (losetup, mkfs, mount)"
    tools = ["losetup", "mount", "umount"] + (list(kind.tools) if kind else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install xfsprogs btrfs-progs)"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control in this environment"
    if kind is not None:
        known = Path("/proc/filesystems").read_text(encoding="ascii").split()
        if kind.fstype not in known:
            with contextlib.suppress(RuntimeError, FileNotFoundError):
                run(["modprobe", kind.fstype])
            known = Path("/proc/filesystems").read_text(encoding="ascii").split()
            if kind.fstype not in known:
                return f"kernel has no {kind.fstype} support"
    return None


def ficlone(src: str, dst: str) -> None:
    """Make ``dst`` a reflink clone of ``src`` (one atomic instant); OSError if unsupported."""
    if sys.platform == "win32":
        raise OSError("FICLONE is Linux-only")
    import fcntl

    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.ioctl(dfd, _FICLONE, sfd)
        except OSError:
            os.close(dfd)
            os.unlink(dst)
            raise
        os.close(dfd)
    finally:
        os.close(sfd)


def sparse_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` through the page cache, skipping holes, without any sync."""
    if sys.platform == "win32":
        raise OSError("SEEK_DATA/SEEK_HOLE are POSIX-only")
    sfd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(dfd, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                end = os.lseek(sfd, start, os.SEEK_HOLE)
                while start < end:
                    chunk = os.pread(sfd, min(8 << 20, end - start), start)
                    if not chunk:
                        break
                    os.pwrite(dfd, chunk, start)
                    start += len(chunk)
                pos = end
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


@dataclasses.dataclass
class CopyReport:
    """What a snapshot's filesystem looked like after journal replay.

    Attributes:
        files: relative path -> bytes, or None when the path does not exist.
        listings: relative directory -> sorted entry names (None if missing).
        mount_error: mount failure output, if the snapshot would not mount.
        fsck_rc: exit status of the read-only checker.
        fsck_output: its output (kept for failure messages).
        links: relative path -> symlink target, or None when it is not a link.
    """

    files: dict[str, bytes | None]
    listings: dict[str, list[str] | None]
    mount_error: str | None
    fsck_rc: int
    fsck_output: str
    links: dict[str, str | None] = dataclasses.field(default_factory=dict)


class Stage:
    """A scratch area that owns every loop device and mount created under it.

    Images live on a tmpfs (``/dev/shm``) when there is one. If possible the
    stage first makes a reflink-capable xfs there (itself on a loop device) and
    keeps the images on it, so snapshots are atomic ``FICLONE`` clones.
    """

    def __init__(self, *, reflink: bool = True) -> None:
        # CRASHLAB_SNAPSHOT=copy forces the byte-copy fallback (to test it).
        self._want_reflink = reflink and os.environ.get("CRASHLAB_SNAPSHOT") != "copy"
        self.root = Path()
        self.images = Path()
        self.snapshot_method = "sparse-copy"
        # ("mount", path) / ("loop", device), unwound in reverse order: a loop
        # device whose image lives on the reflink stage must go before the stage.
        self._stack: list[tuple[str, str]] = []
        self._counter = 0
        # Filesystems may be exercised from several threads at once.
        self._lock = threading.Lock()

    def __enter__(self) -> Stage:
        base = "/dev/shm" if Path("/dev/shm").is_dir() else None
        reap_stale_stages(base or tempfile.gettempdir())
        # The pid in the name lets a later run recognise a stage whose run died.
        self.root = Path(tempfile.mkdtemp(prefix=f"crashlab-{os.getpid()}-", dir=base))
        self.images = self.root
        try:
            if self._want_reflink and shutil.which("mkfs.xfs"):
                self._try_reflink_stage()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _try_reflink_stage(self) -> None:
        img = self.root / "stage.img"
        with open(img, "wb") as f:
            f.truncate(_STAGE_SIZE)
        try:
            dev = self.attach(str(img))
            run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev])
            mnt = self.root / "stage"
            mnt.mkdir()
            self.mount(dev, str(mnt), "xfs", "")
            probe_src = mnt / "probe-src"
            probe_src.write_bytes(b"x" * 4096)
            ficlone(str(probe_src), str(mnt / "probe-dst"))
        except (OSError, RuntimeError):
            return  # fall back to plain copies on the tmpfs
        self.images = mnt
        self.snapshot_method = "FICLONE"

    # -- primitives, each recorded for teardown --------------------------------

    def attach(self, image: str) -> str:
        """Attach an image to a free loop device (buffered I/O) and return the device."""
        dev = run(["losetup", "-f", "--show", "--direct-io=off", image]).strip()
        with self._lock:
            self._stack.append(("loop", dev))
        return dev

    def detach(self, dev: str) -> None:
        """Detach a loop device made by :meth:`attach` (retrying while busy)."""
        for attempt in range(50):
            proc = subprocess.run(
                ["losetup", "-d", dev], capture_output=True, text=True, timeout=60, check=False
            )
            if proc.returncode == 0 or "No such device" in proc.stderr:
                break
            if attempt == 49:
                raise RuntimeError(f"losetup -d {dev}: {proc.stderr}")
            time.sleep(0.1)
        with self._lock:
            if ("loop", dev) in self._stack:
                self._stack.remove(("loop", dev))

    def mount(self, dev: str, mnt: str, fstype: str, opts: str) -> None:
        """Mount ``dev`` on ``mnt``; recorded for teardown."""
        argv = ["mount", "-t", fstype]
        if opts:
            argv += ["-o", opts]
        run([*argv, dev, mnt])
        with self._lock:
            self._stack.append(("mount", mnt))

    def bind_readonly(self, src: str, dst: str) -> None:
        """Bind-mount ``src`` on ``dst`` and make the bind read-only (EROFS there)."""
        run(["mount", "--bind", src, dst])
        with self._lock:
            self._stack.append(("mount", dst))
        run(["mount", "-o", "remount,bind,ro", dst])

    def umount(self, mnt: str) -> None:
        """Unmount a mount made by :meth:`mount` (retrying while busy)."""
        for attempt in range(50):
            proc = subprocess.run(
                ["umount", mnt], capture_output=True, text=True, timeout=120, check=False
            )
            if proc.returncode == 0 or "not mounted" in proc.stderr:
                break
            if attempt == 49:
                raise RuntimeError(f"umount {mnt}: {proc.stderr}")
            time.sleep(0.1)
        with self._lock:
            if ("mount", mnt) in self._stack:
                self._stack.remove(("mount", mnt))

    def close(self) -> None:
        """Unmount everything, detach every loop device, remove the scratch area."""
        errors: list[str] = []
        for what, name in reversed(list(self._stack)):
            try:
                if what == "mount":
                    self.umount(name)
                else:
                    self.detach(name)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
                if what == "mount":
                    # Last resort, so the devices below can still be released.
                    subprocess.run(["umount", "-l", name], capture_output=True, check=False)
                with self._lock:
                    if (what, name) in self._stack:
                        self._stack.remove((what, name))
        if self.root != Path():
            shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise RuntimeError("crash-lab teardown problems:\n" + "\n".join(errors))

    def new_path(self, stem: str) -> Path:
        """A fresh, unused path on the image area."""
        with self._lock:
            self._counter += 1
            return self.images / f"{stem}-{self._counter}"

    # -- filesystems -------------------------------------------------------------

    def make_fs(self, kind: FsKind, size: int = 300 * 1024**2) -> LoopFs:
        """Create, format and mount a filesystem of ``kind`` on a sparse image."""
        image = self.new_path(f"{kind.name}.img")
        with open(image, "wb") as f:
            f.truncate(size)
        dev = self.attach(str(image))
        run([*kind.mkfs, dev])
        mnt = self.root / f"mnt-{image.name}"
        mnt.mkdir()
        self.mount(dev, str(mnt), kind.fstype, kind.mount_opts)
        return LoopFs(self, kind, str(image), dev, str(mnt))

    def snapshot(self, image: str) -> str:
        """Copy a mounted filesystem's backing file as it is now; no sync anywhere."""
        dst = str(self.new_path("snap"))
        if self.snapshot_method == "FICLONE":
            ficlone(image, dst)
        else:
            sparse_copy(image, dst)
        return dst

    def inspect(
        self,
        kind: FsKind,
        snap: str,
        files: Sequence[str],
        dirs: Sequence[str],
        links: Sequence[str] = (),
    ) -> CopyReport:
        """Mount a snapshot (journal replay), read paths, unmount, fsck read-only, delete it."""
        got: dict[str, bytes | None] = {}
        listings: dict[str, list[str] | None] = {}
        link_targets: dict[str, str | None] = {}
        mount_error: str | None = None
        mnt = self.root / f"inspect-{Path(snap).name}"
        mnt.mkdir()
        dev = self.attach(snap)
        try:
            try:
                self.mount(dev, str(mnt), kind.fstype, kind.copy_mount_opts)
            except RuntimeError as exc:
                mount_error = str(exc)
            else:
                try:
                    for rel in files:
                        try:
                            got[rel] = (mnt / rel).read_bytes()
                        except FileNotFoundError:
                            got[rel] = None
                    for rel in dirs:
                        try:
                            listings[rel] = sorted(os.listdir(mnt / rel))
                        except FileNotFoundError:
                            listings[rel] = None
                    for rel in links:
                        try:
                            link_targets[rel] = os.readlink(mnt / rel)
                        except OSError:  # gone, or no longer a link
                            link_targets[rel] = None
                finally:
                    self.umount(str(mnt))
        finally:
            self.detach(dev)
            mnt.rmdir()
        proc = subprocess.run(
            [*kind.fsck, snap],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=_CMD_TIMEOUT,
            check=False,
        )
        os.unlink(snap)
        return CopyReport(got, listings, mount_error, proc.returncode, proc.stdout, link_targets)


@dataclasses.dataclass
class LoopFs:
    """A mounted filesystem under test."""

    stage: Stage
    kind: FsKind
    image: str
    dev: str
    mnt: str

    def syncfs(self) -> None:
        """Make everything on this filesystem durable (syncfs via ``sync -f``)."""
        run(["sync", "-f", self.mnt])

    def power_cut(self) -> str:
        """Snapshot the disk as a power cut now would leave it; returns the image path."""
        return self.stage.snapshot(self.image)


@contextlib.contextmanager
def lowered_sysctl(path: str, value: int, state_dir: str | None = None) -> Iterator[bool]:
    """Temporarily lower a numeric /proc/sys knob to ``value``; yields whether it is lowered.

    The original value is also written to a state file named after our pid, so
    a later run can restore it if this process dies before its ``finally``.
    If the knob is already at or below ``value`` because another *live* run
    lowered it, it is left alone (that run restores it).
    """
    if state_dir is None:
        state_dir = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
    knob = Path(path)
    prefix = f"crashlab-sysctl-{knob.name}-"
    try:
        current = int(knob.read_text(encoding="ascii").strip())
        # Restore what a dead run left lowered.
        for name in os.listdir(state_dir):
            if not name.startswith(prefix) or pid_exists(int(name[len(prefix) :])):
                continue
            state = Path(state_dir, name)
            original = int(state.read_text(encoding="ascii"))
            if current == value:
                knob.write_text(str(original), encoding="ascii")
                current = original
            state.unlink()
    except (OSError, ValueError):
        yield False
        return
    if current <= value:
        yield True
        return
    state = Path(state_dir, f"{prefix}{os.getpid()}")
    try:
        state.write_text(str(current), encoding="ascii")
        knob.write_text(str(value), encoding="ascii")
    except OSError:
        state.unlink(missing_ok=True)
        yield False
        return
    try:
        yield True
    finally:
        knob.write_text(str(current), encoding="ascii")
        state.unlink(missing_ok=True)


_STAGE_NAME = re.compile(r"/crashlab-(\d+)-[^/\s)]*")


def _mount_points() -> list[str]:
    points = []
    for line in run(["mount"], check=False).splitlines():
        parts = line.split(" on ", 1)
        if len(parts) == 2:
            points.append(parts[1].split(" type ", 1)[0])
    return points


def reap_stale_stages(base: str) -> list[str]:
    """Undo mounts and loop devices left by lab runs that died (SIGKILL, timeout).

    Only stages under ``base`` whose creating pid no longer exists are touched;
    a stage directory is removed only once nothing is mounted inside it.
    Returns the stage roots cleaned.
    """
    marker = os.path.join(base, "crashlab-")
    entries = [("mount", p) for p in _mount_points()]
    entries += [("loop", line) for line in run(["losetup", "-a"], check=False).splitlines()]
    stale: set[str] = set()
    targets: list[tuple[str, str]] = []  # ("mount", path) / ("loop", device)
    for what, text in entries:
        match = _STAGE_NAME.search(text)
        if match is None or marker not in text or pid_exists(int(match.group(1))):
            continue
        stale.add(base + match.group(0))
        targets.append((what, text if what == "mount" else text.split(":", 1)[0]))
    for name in os.listdir(base):
        match = _STAGE_NAME.match("/" + name)
        if match is not None and not pid_exists(int(match.group(1))):
            stale.add(os.path.join(base, name))
    # Inner mounts and loops hold the reflink stage busy: retry in rounds,
    # mounts before loop devices.
    for _ in range(5):
        remaining = []
        for what, name in sorted(targets, key=lambda t: t[0] == "loop"):
            argv = ["umount", name] if what == "mount" else ["losetup", "-d", name]
            if subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode:
                remaining.append((what, name))
        targets = remaining
        if not targets:
            break
    mounted = _mount_points()
    cleaned = []
    for root in sorted(stale):
        if not any(p == root or p.startswith(root + "/") for p in mounted):
            shutil.rmtree(root, ignore_errors=True)
            cleaned.append(root)
    return cleaned


def leftover_lab_state(prefix: str) -> list[str]:
    """Mounts and loop devices whose paths contain ``prefix`` (for leak checks)."""
    found = [line for line in run(["losetup", "-a"]).splitlines() if prefix in line]
    found += [line for line in run(["mount"]).splitlines() if prefix in line]
    return found
