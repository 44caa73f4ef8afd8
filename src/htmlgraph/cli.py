"""The ``htmlgraph`` command line (also ``python -m htmlgraph``).

Commands:

* ``write FILE`` - replace FILE with stdin all-or-nothing (like ``sponge``,
  but an interrupted or failed input leaves FILE untouched);
* ``lock DIR -- CMD ...`` - run CMD while holding DIR's lock (like ``flock``);
* ``update FILE -- CMD ...`` - replace FILE with CMD's output, CMD reading FILE,
  under FILE's own lock (read-modify-write that loses no update);
* ``cleanup DIR`` - remove temp files that crashed writers left behind;
* ``validate FILE`` - is FILE complete, readable UTF-8 (and JSON)?
* ``check DIR`` - a self-test: does DIR's filesystem keep htmlgraph's promises?
* ``sessions ...`` - list, show, archive and reap session-registry entries.
* ``batch ROOT SRC_DIR`` - make ROOT's files equal to SRC_DIR's, all or nothing;
* ``recover ROOT`` - finish or undo a batch that a crash interrupted.

Exit codes shared by every command: 0 success, 1 failure (an I/O error,
invalid input, a broken promise found by ``check``), 2 usage error, 75 lock
timeout (``EX_TEMPFAIL`` from sysexits.h), 126/127 command not executable /
not found, 128+N killed or interrupted by signal N (130 for Ctrl-C).

This is the only module of the package that configures logging.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar, cast

from htmlgraph import __version__

if TYPE_CHECKING:
    from htmlgraph._selfcheck import CheckReport, Writer
    from htmlgraph.atomic_ops import AtomicFileWriter

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_TEMPFAIL", "EXIT_USAGE", "Terminated", "main"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL, as flock(1) -E default conventions suggest
EXIT_CANNOT_EXECUTE = 126  # POSIX shells: found but not executable
EXIT_NOT_FOUND = 127  # POSIX shells: command not found
EXIT_SIGNAL_BASE = 128  # shells report "killed by signal N" as 128 + N

_CHUNK = 1 << 20  # stdin is streamed in 1 MiB chunks: a 10 GB input needs no 10 GB
_PROG = "htmlgraph"
_CHILD_EXIT_TIMEOUT = 10.0  # after we asked a producer to stop, before SIGKILL

# Signals that end a command the way Ctrl-C does. SIGHUP does not exist on
# Windows; SIGINT already raises KeyboardInterrupt by Python's default.
_TERMINATION_SIGNALS: tuple[int, ...] = tuple(
    int(getattr(signal, name)) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


_SigHandler = Callable[[int, "FrameType | None"], Any] | int | None


class Terminated(BaseException):
    """A termination signal arrived; unwinds the stack like ``KeyboardInterrupt``.

    A ``BaseException`` so that ``except Exception`` blocks do not swallow it
    and :class:`~htmlgraph.AtomicFileWriter` discards its temp file.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __reduce__(self) -> tuple[type[Terminated], tuple[int]]:
        return (type(self), (self.signum,))


class _ParserExit(Exception):
    """argparse wanted to exit (``--help``, ``--version`` or a usage error)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _CommandError(Exception):
    """An expected failure: print ``message`` (no traceback) and exit with ``status``."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that returns from :func:`main` instead of calling sys.exit."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        """Print ``message`` to stderr and unwind to :func:`main` with ``status``."""
        if message:
            self._print_message(message, sys.stderr)
        raise _ParserExit(status)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _err(command: str, message: str) -> None:
    """Print one error line to stderr, prefixed like ``htmlgraph write: ...``."""
    prefix = f"{_PROG} {command}" if command else _PROG
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)


def _describe_os_error(exc: OSError) -> str:
    """Return ``strerror: filename`` for an OSError (its str() is noisier)."""
    text = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        text = f"{text}: {os.fsdecode(exc.filename)}"
    if exc.filename2 is not None:
        text = f"{text} -> {os.fsdecode(exc.filename2)}"
    return text


def _status_of(returncode: int) -> int:
    """Translate a Popen return code to a shell-style exit status (128+N for signals)."""
    return EXIT_SIGNAL_BASE - returncode if returncode < 0 else returncode


def _how_it_ended(returncode: int) -> str:
    """Describe a failed Popen return code: killed by a signal, or its exit status."""
    if returncode < 0:
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


_N = TypeVar("_N", int, float)


def _convert(text: str, convert: Callable[[str], _N], what: str) -> _N:
    """Convert an argparse argument, or fail with ``not <what>: 'text'``."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def _octal_mode(text: str) -> int:
    """Parse an octal permission string such as ``0644`` or ``600`` (argparse type)."""
    from htmlgraph.atomic_ops import _check_permissions

    value = _convert(text, lambda t: int(t, 8), "an octal mode")
    try:
        _check_permissions(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"mode out of range 0..7777: {text!r}") from None
    return value


def _non_negative(text: str) -> float:
    """Parse a finite number >= 0 (argparse type)."""
    value = _convert(text, float, "a number")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    """Parse an integer >= 1 (argparse type)."""
    value = _convert(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _raise_on_termination() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` while the block runs.

    Python's default for SIGTERM is to die on the spot, which would skip the
    ``finally`` that removes a half-written temp file. A handler that raises
    lets the writer roll back. A signal the caller ignores (``nohup``) stays
    ignored.
    """
    if not _in_main_thread():  # signal.signal only works in the main thread
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous: dict[int, _SigHandler] = {}
    for signum in _TERMINATION_SIGNALS:
        old = signal.getsignal(signum)
        if old is signal.SIG_IGN:
            continue
        previous[signum] = old
        signal.signal(signum, handler)
    try:
        yield
    finally:
        _restore_signals(previous)


def _restore_signals(previous: dict[int, _SigHandler]) -> None:
    for signum, old in previous.items():
        # getsignal() gives None for a handler installed from C; SIG_DFL is
        # the closest we can restore.
        signal.signal(signum, old if old is not None else signal.SIG_DFL)


def _strict_json(data: bytes, source: str) -> None:
    """Raise :class:`_CommandError` unless ``data`` is one strict JSON document.

    Strict: UTF-8 (RFC 8259 section 8.1), no NaN/Infinity (Python's json
    module accepts them, other parsers do not).
    """

    def reject(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _CommandError(f"{source} is not valid UTF-8 at byte {exc.start}") from None
    try:
        json.loads(text, parse_constant=reject)
    except json.JSONDecodeError as exc:
        raise _CommandError(f"{source} is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise _CommandError(f"{source} is not valid JSON: {exc}") from None


def _binary_stdin() -> IO[bytes]:
    stream: TextIO | None = sys.stdin
    if stream is None:  # started with fd 0 closed
        raise _CommandError("stdin is closed")
    buffer: IO[bytes] | None = getattr(stream, "buffer", None)
    if buffer is None:
        raise _CommandError("stdin is not a byte stream")
    return buffer


def _copy_stream(src: IO[bytes], dst: IO[bytes]) -> int:
    """Copy ``src`` to ``dst`` in chunks; return the number of bytes copied."""
    total = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return total
        dst.write(chunk)
        total += len(chunk)


# --------------------------------------------------------------------------
# write
# --------------------------------------------------------------------------


class _ProducerFailed(Exception):
    def __init__(self, returncode: int) -> None:
        super().__init__(returncode)
        self.returncode = returncode


def _target_writer(args: argparse.Namespace) -> AtomicFileWriter[bytes]:
    """The writer that replaces ``write``'s FILE, with the options the user gave."""
    from htmlgraph.atomic_ops import AtomicFileWriter

    return AtomicFileWriter(
        args.file,
        mode="wb",
        durable=not args.no_fsync,
        overwrite=not args.no_overwrite,
        permissions=args.mode,
    )


def _cmd_write(args: argparse.Namespace) -> int:
    target: str = args.file
    command: list[str] = args.command
    if args.no_overwrite and os.path.lexists(target):
        # Fail before reading a possibly huge stdin; the writer checks again,
        # atomically, when it commits.
        raise FileExistsError(errno.EEXIST, "target exists (--no-overwrite)", target)
    with _raise_on_termination():
        if command:
            return _write_from_command(args, command)
        stdin = _binary_stdin()
        if args.json:
            data = stdin.read()
            _strict_json(data, "stdin")  # before the writer: a bad document makes no temp
            with _target_writer(args) as out:
                out.write(data)
            logger.info("wrote %d bytes of JSON to %s", len(data), target)
            return EXIT_OK
        with _target_writer(args) as out:
            size = _copy_stream(stdin, out)
        logger.info("wrote %d bytes to %s", size, target)
        return EXIT_OK


def _write_from_command(args: argparse.Namespace, command: list[str]) -> int:
    """``write FILE -- CMD``: replace FILE with CMD's stdout only if CMD succeeds.

    A shell pipe cannot tell ``write`` that its producer died: a killed
    producer just closes the pipe, which looks like a normal end of input.
    Running the producer ourselves lets us see its exit status.
    """
    target: str = args.file
    proc = _spawn(command, stdout=subprocess.PIPE)
    stdout = proc.stdout
    if stdout is None:  # pragma: no cover - Popen(stdout=PIPE) always sets it
        raise RuntimeError("no pipe to the command")
    try:
        with _target_writer(args) as out:
            if args.json:
                data = stdout.read()
            else:
                _copy_stream(stdout, out)
            returncode = proc.wait()
            if returncode != 0:
                raise _ProducerFailed(returncode)
            if args.json:
                _strict_json(data, "the command's output")
                out.write(data)
    except _ProducerFailed as exc:
        _err("write", f"{command[0]} {_how_it_ended(exc.returncode)}; {target} left untouched")
        return _status_of(exc.returncode)
    finally:
        stdout.close()
        _stop_child(proc)
    return EXIT_OK


def _spawn(command: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``command``; raise :class:`_CommandError` with the shell's 126/127 codes."""
    try:
        return subprocess.Popen(command, **kwargs)  # type: ignore[call-overload, no-any-return]  # noqa: S603 - running the user's command is the point
    except FileNotFoundError:
        raise _CommandError(f"{command[0]}: command not found", EXIT_NOT_FOUND) from None
    except PermissionError as exc:
        raise _CommandError(
            f"{command[0]}: cannot execute: {exc.strerror}", EXIT_CANNOT_EXECUTE
        ) from None
    except OSError as exc:  # ENOEXEC, E2BIG, ...
        raise _CommandError(
            f"{command[0]}: cannot execute: {_describe_os_error(exc)}", EXIT_CANNOT_EXECUTE
        ) from None


def _stop_child(proc: subprocess.Popen[bytes]) -> None:
    """Make sure ``proc`` is gone: ask politely, then SIGKILL; bounded."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.terminate()
    try:
        proc.wait(timeout=_CHILD_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait(timeout=_CHILD_EXIT_TIMEOUT)


# --------------------------------------------------------------------------
# lock
# --------------------------------------------------------------------------


def _terminal_delivers_sigint_to_child() -> bool:
    """Whether Ctrl-C already reached the child through the terminal.

    The child runs in our process group. If that group is the terminal's
    foreground group, the tty driver sent SIGINT to every member, child
    included; forwarding it again would deliver it twice.
    """
    if sys.platform == "win32":
        return True  # a console Ctrl-C reaches every attached process
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except (AttributeError, OSError, ValueError):
            continue
    return False


class _Forwarder:
    """Signal handler for ``lock``: abort while waiting, forward once CMD runs.

    Before the command starts a signal unwinds (the lock attempt is given
    up); while it runs the signal is passed on and ``lock`` keeps waiting, so
    the lock is released only after the command has exited. A signal that
    arrives while ``Popen`` itself runs is remembered and sent right after.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.starting = False
        self.pending: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        proc = self.proc
        if proc is not None:
            if signum == signal.SIGINT and _terminal_delivers_sigint_to_child():
                return
            self.forward(proc, signum)
            return
        if self.starting:
            self.pending = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    @staticmethod
    def forward(proc: subprocess.Popen[bytes], signum: int) -> None:
        logger.debug("forwarding signal %d to pid %d", signum, proc.pid)
        with contextlib.suppress(OSError, ValueError):
            if sys.platform == "win32":
                proc.terminate()  # Windows has no signals to forward but these
            else:
                proc.send_signal(signum)


def _die_with_parent() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child die with us (Linux), else None.

    If ``htmlgraph lock`` is killed with SIGKILL it cannot release its marker;
    DirectoryLocker then treats the marker as stale as soon as our pid is
    gone. A command still running at that point would run unprotected, so on
    Linux the child asks the kernel for SIGKILL when its parent dies
    (prctl(2) PR_SET_PDEATHSIG). flock(1) gets the same effect for free: its
    lock lives in a file descriptor the command inherits.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1  # <linux/prctl.h>

    def preexec() -> None:
        # Runs in the child between fork and exec: no imports, no locks.
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(EXIT_SIGNAL_BASE + int(signal.SIGKILL))

    return preexec


@contextlib.contextmanager
def _forwarding_signals(forwarder: _Forwarder) -> Iterator[None]:
    """Let ``forwarder`` handle SIGINT, SIGTERM and SIGHUP while the block runs.

    A signal the caller ignores (``nohup``, a background job's SIGINT) stays
    ignored: it neither gives up the wait for the lock nor reaches CMD, which
    inherits the same ignored disposition.
    """
    previous: dict[int, _SigHandler] = {}
    if _in_main_thread():
        for signum in (signal.SIGINT, *_TERMINATION_SIGNALS):
            old = signal.getsignal(signum)
            if old is signal.SIG_IGN:
                continue
            previous[signum] = old
            signal.signal(signum, forwarder)
    try:
        yield
    finally:
        _restore_signals(previous)


def _start_forwarded(
    command: list[str], forwarder: _Forwarder, **kwargs: object
) -> subprocess.Popen[bytes]:
    """Start ``command`` (dying with us on Linux) and make ``forwarder`` pass signals to it."""
    forwarder.starting = True
    try:
        proc = _spawn(command, preexec_fn=_die_with_parent(), **kwargs)
    except BaseException:
        forwarder.starting = False
        if forwarder.pending is not None:
            raise Terminated(forwarder.pending) from None
        raise
    forwarder.proc = proc
    forwarder.starting = False
    if forwarder.pending is not None:
        forwarder.forward(proc, forwarder.pending)
    return proc


def _run_forwarding(command: list[str], forwarder: _Forwarder) -> int:
    proc = _start_forwarded(command, forwarder)
    # wait() is retried after each handled signal (PEP 475): we leave only
    # once the command is gone, whatever it was sent.
    returncode = proc.wait()
    forwarder.proc = None
    logger.debug("command %s exited with %d", command[0], returncode)
    return _status_of(returncode)


def _cmd_lock(args: argparse.Namespace) -> int:
    from htmlgraph.atomic_ops import DirectoryLocker, LockTimeout

    lock_dir: str = args.dir
    command: list[str] = args.command
    timeout: float | None = args.timeout
    mode = "shared" if args.shared else "exclusive"
    locker = DirectoryLocker(lock_dir)
    forwarder = _Forwarder()
    with _forwarding_signals(forwarder):
        # The locker waits without limit for an infinite (or negative) timeout.
        wait = math.inf if timeout is None else timeout
        hold = locker.shared(timeout=wait) if args.shared else locker.exclusive(timeout=wait)
        try:
            with hold:
                logger.debug("holding the %s lock on %s", mode, lock_dir)
                return _run_forwarding(command, forwarder)
        except LockTimeout:
            _err("lock", f"timed out after {timeout:g} s waiting for the {mode} lock on {lock_dir}")
            return EXIT_TEMPFAIL


# --------------------------------------------------------------------------
# update
# --------------------------------------------------------------------------


def _cmd_update(args: argparse.Namespace) -> int:
    """``update FILE -- CMD``: FILE's content into CMD, CMD's output into FILE, locked.

    Signals as for ``lock``: before CMD starts and after it exits they unwind
    (the lock is released, a half-written temp removed); while CMD runs they
    are forwarded to it.
    """
    from htmlgraph.atomic_ops import LockTimeout, atomic_write
    from htmlgraph.update import _locked, _read

    target: str = args.file
    command: list[str] = args.command
    timeout: float | None = args.timeout
    default = None if args.default is None else os.fsencode(args.default)
    if args.json and default is not None:
        _strict_json(default, "--default")
    forwarder = _Forwarder()
    with _forwarding_signals(forwarder):
        try:
            with _locked(target, timeout, create=default is not None) as real:
                current = _read(real)
                if current is None:
                    if default is None:
                        raise _CommandError(
                            f"{target} does not exist (--default TEXT starts it from TEXT)"
                        )
                    current = default
                returncode, output = _run_filter(command, current, forwarder)
                if returncode != 0:
                    how = _how_it_ended(returncode)
                    _err("update", f"{command[0]} {how}; {target} left untouched")
                    return _status_of(returncode)
                if args.json:
                    try:
                        _strict_json(output, "the command's output")
                    except _CommandError as exc:
                        raise _CommandError(f"{exc.message}; {target} left untouched") from None
                atomic_write(real, output, durable=not args.no_fsync)
                logger.info("updated %s (%d bytes)", real, len(output))
        except LockTimeout:
            _err("update", f"timed out after {timeout:g} s waiting for the lock on {target}")
            return EXIT_TEMPFAIL
    return EXIT_OK


def _run_filter(command: list[str], data: bytes, forwarder: _Forwarder) -> tuple[int, bytes]:
    """Run ``command`` with ``data`` on its stdin; return its return code and its stdout."""
    proc = _start_forwarded(command, forwarder, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        # communicate() feeds stdin and drains stdout together (no pipe
        # deadlock) and, like wait(), resumes after each forwarded signal.
        output, _ = proc.communicate(data)
    finally:
        forwarder.proc = None
        _stop_child(proc)
    logger.debug("command %s exited with %d", command[0], proc.returncode)
    return proc.returncode, output


# --------------------------------------------------------------------------
# cleanup and validate
# --------------------------------------------------------------------------


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from htmlgraph import atomic_ops

    directory: str = args.dir
    if not os.path.isdir(directory):
        raise _CommandError(f"not a directory: {directory}")
    if args.dry_run:
        # The very rules cleanup_orphaned_temp_files applies.
        candidates = sorted(atomic_ops.find_orphaned_temp_files(directory, args.age_hours))
        for path in candidates:
            print(path)
        print(
            f"would remove {len(candidates)} orphaned temp file(s) from {directory}",
            file=sys.stderr,
        )
        return EXIT_OK
    removed, skipped = atomic_ops._cleanup(directory, args.age_hours)
    skipped_note = f" (skipped {skipped} it may not remove)" if skipped else ""
    print(f"removed {removed} orphaned temp file(s) from {directory}{skipped_note}")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    # The check behind validate_atomic_write, with the reason it says no.
    from htmlgraph._validation import invalid_reason

    path: str = args.file
    reason = invalid_reason(path)
    if reason is not None:
        _err("validate", f"{path}: {reason}")
        return EXIT_FAILURE
    if args.json:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            _err("validate", f"{path}: cannot read: {exc.strerror}")
            return EXIT_FAILURE
        try:
            _strict_json(data, path)
        except _CommandError as exc:
            _err("validate", exc.message)
            return EXIT_FAILURE
    print(f"{path}: valid{' JSON' if args.json else ''}")
    return EXIT_OK


# --------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------


class _ProgressBar:
    """Progress on stderr: a redrawn bar on a terminal, one line per phase otherwise."""

    _WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.phase = ""
        self.last_draw = 0.0

    def __call__(self, phase: str, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        if not self.tty:
            if phase != self.phase and fraction < 1.0:
                print(f"{_PROG} check: {phase} ...", file=self.stream, flush=True)
                self.phase = phase
            return
        now = time.monotonic()
        if phase == self.phase and now - self.last_draw < 0.1 and fraction < 1.0:
            return
        self.phase, self.last_draw = phase, now
        filled = round(fraction * self._WIDTH)
        bar = "#" * filled + "-" * (self._WIDTH - filled)
        line = f"\r[{bar}] {fraction * 100:3.0f}% {phase}"
        self.stream.write(f"{line:<78}")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.phase:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()


def _load_writer(spec: str) -> Writer:
    """Import ``module:function`` for ``check --writer``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _CommandError(f"--writer must look like module:function, not {spec!r}", EXIT_USAGE)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _CommandError(f"--writer: cannot import {module_name}: {exc}", EXIT_USAGE) from None
    writer = getattr(module, attr, None)
    if not callable(writer):
        raise _CommandError(f"--writer: {spec} is not a callable", EXIT_USAGE)
    return writer  # type: ignore[no-any-return]


def _cmd_check(args: argparse.Namespace) -> int:
    from htmlgraph import _selfcheck

    directory: str = args.dir
    if not os.path.isdir(directory):
        raise _CommandError(f"not a directory: {directory}")
    if args.writer:
        writer = _load_writer(args.writer)
    else:
        writer = _selfcheck.fast_atomic_writer if args.no_fsync else _selfcheck.atomic_writer
    progress = _ProgressBar(sys.stderr)
    try:
        # SIGTERM unwinds like Ctrl-C, so the children are stopped and the
        # scratch directory removed.
        with _raise_on_termination():
            report = _selfcheck.run_check(
                directory,
                seconds=args.seconds,
                processes=args.processes,
                writer=writer,
                progress=progress,
            )
    finally:
        progress.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(_format_report(report))
    return EXIT_OK if report.ok else EXIT_FAILURE


def _format_report(report: CheckReport) -> str:
    lines = [
        f"{_PROG} check {report.directory}",
        f"filesystem: {report.filesystem}; {report.seconds:g} s budget, "
        f"{report.elapsed:.1f} s taken; {report.processes} processes",
        f"writer: {report.writer}; lock: {report.locker}",
        "",
    ]
    rows = report.rows()
    width = max(len(label) for label, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    for label, value, verdict in rows:
        lines.append(f"  {label:<{width}}  {value:>{value_width}}  {verdict}".rstrip())
    lines.append("")
    problems = report.violations()
    if problems:
        lines.append(f"FAIL: {len(problems)} promise(s) broken")
        lines.extend(f"  - {problem}" for problem in problems)
    else:
        lines.append("PASS: every promise held")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _session_owner(entry: Mapping[str, object]) -> tuple[object, object]:
    """The pid and host of a record: ours at the top, htmlgraph's inside "instance"."""
    if "format" in entry:
        return entry.get("pid", "-"), entry.get("hostname", "-")
    instance = entry.get("instance")
    if isinstance(instance, Mapping):
        return instance.get("pid", "-"), instance.get("hostname", "-")
    return "-", "-"


def _session_row(entry: Mapping[str, object], state: str) -> list[str]:
    pid, host = _session_owner(entry)
    return [
        str(entry.get("instance_id", "?")),
        str(entry.get("session_id", "-")),
        str(entry.get("status", "-")),
        str(pid),
        str(host),
        state,
        str(entry.get("created", "-")),
        str(entry.get("last_activity", "-")),
    ]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _cmd_sessions_list(args: argparse.Namespace) -> int:
    from htmlgraph.session_registry import SessionRegistry

    registry = SessionRegistry(args.registry, create=False)
    sessions = registry.get_current_sessions()
    if args.json:
        _print_json(sessions)
        return EXIT_OK
    if not sessions:
        print("no active sessions", file=sys.stderr)
        return EXIT_OK
    rows = [["INSTANCE", "SESSION", "STATUS", "PID", "HOST", "PROCESS", "CREATED", "LAST_ACTIVITY"]]
    rows.extend(_session_row(entry, registry.process_state(entry)) for entry in sessions)
    _print_table(rows)
    return EXIT_OK


_T = TypeVar("_T")


def _on_instance(args: argparse.Namespace, action: Callable[[str], _T]) -> _T:
    """Run ``action(args.instance_id)``; an unsafe id is a usage error (exit 2)."""
    try:
        return action(args.instance_id)
    except ValueError as exc:
        raise _CommandError(f"invalid instance id: {exc}", EXIT_USAGE) from None


def _cmd_sessions_show(args: argparse.Namespace) -> int:
    from htmlgraph.session_registry import SessionRegistry

    registry = SessionRegistry(args.registry, create=False)
    instance_id: str = args.instance_id
    entry = _on_instance(args, registry.read_session)
    if entry is None:
        raise _CommandError(f"no such session instance: {instance_id}")
    if args.json:
        _print_json(entry)
    else:
        width = max((len(str(key)) for key in entry), default=0)
        for key, value in entry.items():
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            print(f"{key:<{width}}  {text}")
        print(f"{'process':<{width}}  {registry.process_state(entry)}")
    return EXIT_OK


def _cmd_sessions_archive(args: argparse.Namespace) -> int:
    from htmlgraph.session_registry import SessionRegistry

    registry = SessionRegistry(args.registry, create=False)
    instance_id: str = args.instance_id
    archived = _on_instance(args, registry.archive_session)
    if args.json:
        _print_json({"instance_id": instance_id, "archived": archived})
    elif archived:
        print(f"archived {instance_id}")
    if not archived:
        _err("sessions archive", f"no such active session instance: {instance_id}")
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_sessions_reap(args: argparse.Namespace) -> int:
    from htmlgraph.session_registry import SessionRegistry

    registry = SessionRegistry(args.registry, create=False)
    if args.max_idle is None:
        reaped = registry.reap_stale()
    else:
        reaped = registry.reap_stale(max_idle=args.max_idle)
    if args.json:
        _print_json(reaped)
    else:
        for instance_id in reaped:
            print(instance_id)
        print(f"reaped {len(reaped)} stale session instance(s)", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------
# batch and recover
# --------------------------------------------------------------------------


def _tree_files(top: str, *, skip_own: bool) -> list[str]:
    """Relative "/"-paths of every non-directory under ``top`` (links not followed).

    ``skip_own``: leave out the library's own files, which are not the site's:
    the batch's hidden directory, the per-file update locks
    (``.NAME.htmlgraph-lock/``, whose markers belong to running updaters) and
    the temp files of writes in flight (``.tmp-*``).
    """
    from htmlgraph.atomic_ops import TEMP_PREFIX
    from htmlgraph.batch import HIDDEN_DIR
    from htmlgraph.update import LOCK_SUFFIX

    found: list[str] = []
    for directory, dirnames, filenames in os.walk(top):
        if skip_own:
            dirnames[:] = [
                d
                for d in dirnames
                if not (directory == top and d == HIDDEN_DIR) and not d.endswith(LOCK_SUFFIX)
            ]
        # os.walk lists a symlink to a directory among dirnames: a file here.
        names = filenames + [d for d in dirnames if os.path.islink(os.path.join(directory, d))]
        for name in names:
            if skip_own and name.startswith(TEMP_PREFIX):
                continue
            rel = os.path.relpath(os.path.join(directory, name), top)
            found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _cmd_batch(args: argparse.Namespace) -> int:
    from htmlgraph.batch import HIDDEN_DIR, AtomicBatch, recover

    root: str = args.root
    src: str = args.src
    if not os.path.isdir(src):
        raise _CommandError(f"not a directory: {src}")
    wanted = _tree_files(src, skip_own=False)
    writes = deletes = 0
    with AtomicBatch(root, durable=not args.no_fsync, timeout=args.timeout) as batch:
        for rel in wanted:
            source = os.path.join(src, *rel.split("/"))
            if os.path.isdir(source):
                continue  # a symlink to a directory: its files are not copied
            with open(source, "rb") as fin, batch.open(rel) as fout:
                _copy_stream(fin, fout)
            writes += 1
        if args.delete:
            keep = set(wanted)
            if os.path.isdir(os.path.join(root, HIDDEN_DIR)):
                # ROOT's files are listed to find what to delete: first finish
                # an interrupted batch, whose files are ROOT's though not yet
                # in place.
                recover(root, timeout=args.timeout)
            for rel in _tree_files(root, skip_own=True):
                if rel not in keep:
                    batch.delete(rel, missing_ok=True)
                    deletes += 1
    print(f"committed {writes} write(s) and {deletes} delete(s) to {root}")
    return EXIT_OK


def _cmd_recover(args: argparse.Namespace) -> int:
    from htmlgraph.batch import recover

    report = recover(args.root, timeout=args.timeout)
    if not report:
        print(f"nothing to recover in {args.root}")
        return EXIT_OK
    for rel in report.applied:
        print(f"applied {rel}")
    for rel in report.kept:
        print(f"kept {rel} (changed after the batch began)")
    print(
        f"finished {report.finished} interrupted batch(es), "
        f"discarded {report.discarded} uncommitted one(s) in {args.root}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------

_EPILOG = """\
exit codes: 0 success, 1 failure, 2 usage error, 75 lock timeout,
126/127 command not executable/not found, 128+N killed by signal N.
Run 'htmlgraph COMMAND --help' for a command's options; docs/cli.md has examples."""

_Handler = Callable[[argparse.Namespace], int]


_WAIT_HELP = "give up after S seconds with exit 75 (0: one attempt; default: wait forever)"
_ROOT_WAIT_HELP = "seconds to wait for ROOT's lock (default 60)"


def _add_no_fsync(sub: argparse.ArgumentParser, what: str = "atomic") -> None:
    sub.add_argument(
        "--no-fsync",
        action="store_true",
        help=f"skip fsync ({what} against crashes, but not durable across power loss)",
    )


def _add_timeout(sub: argparse.ArgumentParser, default: float | None, help_text: str) -> None:
    sub.add_argument("--timeout", type=_non_negative, default=default, metavar="S", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``htmlgraph`` argument parser (used by :func:`main` and the docs)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more to stderr (-v: info, -vv: debug)",
    )
    parser = _Parser(
        prog=_PROG,
        description=(
            "Share a directory between processes without corrupting or losing a file:\n"
            "atomic writes, a directory lock, orphan cleanup and a filesystem self-test."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more to stderr (-v, -vv)"
    )
    commands = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(
        name: str, handler: _Handler, help_text: str, description: str, usage: str | None = None
    ) -> _Parser:
        sub = commands.add_parser(
            name,
            usage=usage,
            parents=[common],
            help=help_text,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler, sub_parser=sub, command_name=name)
        return sub

    write = add(
        "write",
        _cmd_write,
        "replace FILE with stdin, all-or-nothing",
        "Read stdin and replace FILE atomically: readers see the old or the new\n"
        "content, never a part. If stdin fails, or the command is interrupted\n"
        "(Ctrl-C, SIGTERM, SIGHUP), FILE is untouched and no temp file is left.\n"
        "With '-- CMD ARGS...', CMD's stdout is the input and FILE is replaced\n"
        "only if CMD exits with status 0 (a shell pipe cannot report a producer\n"
        "that died; this form can).\n\n"
        "exit: 0 written, 1 error (FILE untouched), 2 usage, 130/143 interrupted,\n"
        "CMD's status if CMD failed.",
        usage="%(prog)s [-h] [-v] [--no-fsync] [--mode OCTAL] [--no-overwrite] [--json]\n"
        "                       FILE [-- CMD ARGS...]",
    )
    write.add_argument("file", metavar="FILE", help="the file to replace or create")
    _add_no_fsync(write)
    write.add_argument(
        "--mode",
        type=_octal_mode,
        default=None,
        metavar="OCTAL",
        help="permission bits, e.g. 0644 (default: keep FILE's, or 0666 & ~umask)",
    )
    write.add_argument(
        "--no-overwrite",
        action="store_true",
        help="fail (exit 1) if FILE exists; never clobber a file created meanwhile",
    )
    write.add_argument(
        "--json",
        action="store_true",
        help="require the input to be one strict JSON document before replacing FILE",
    )
    write.set_defaults(command=[])

    lock = add(
        "lock",
        _cmd_lock,
        "run a command while holding DIR's lock",
        "Run CMD while holding the DirectoryLocker lock of DIR (exclusive by\n"
        "default), like flock(1). The lock is released when CMD exits, however it\n"
        "exits; SIGTERM/SIGHUP/SIGINT sent to 'htmlgraph lock' are forwarded to CMD\n"
        "(a Ctrl-C at the terminal already reaches CMD directly). On Linux CMD is\n"
        "killed if 'htmlgraph lock' itself is killed, so it never runs unlocked.\n\n"
        "exit: CMD's status (128+N if CMD was killed by signal N), 75 timeout,\n"
        "126 CMD not executable, 127 CMD not found, 1 error, 2 usage.",
        usage="%(prog)s [-h] [-v] [--shared] [--timeout S] DIR -- CMD ARGS...",
    )
    lock.add_argument("dir", metavar="DIR", help="the lock directory (created if missing)")
    lock.add_argument("--shared", action="store_true", help="take the shared (reader) lock")
    _add_timeout(lock, None, _WAIT_HELP)
    lock.add_argument(
        "command", nargs="*", metavar="-- CMD ARGS", help="the command to run, after '--'"
    )

    update = add(
        "update",
        _cmd_update,
        "run FILE's content through a command, under FILE's lock",
        "Read-modify-write that loses no update: while holding FILE's own lock\n"
        "(the directory .FILE.htmlgraph-lock beside it; every updater of FILE\n"
        "must use it), run CMD with FILE's content on stdin, and replace FILE\n"
        "with CMD's stdout, all-or-nothing, only if CMD exits with status 0.\n"
        "Readers of FILE never wait. Signals are handled as by 'lock'.\n\n"
        "  htmlgraph update state.json --json --default '{}' -- jq '.runs += 1'\n\n"
        "exit: 0 updated, CMD's status if CMD failed (FILE untouched), 75 timeout,\n"
        "126/127 CMD not executable/not found, 1 error (FILE missing without\n"
        "--default, output not JSON with --json), 2 usage.",
        usage="%(prog)s [-h] [-v] [--json] [--default TEXT] [--timeout S] [--no-fsync]\n"
        "                        FILE -- CMD ARGS...",
    )
    update.add_argument("file", metavar="FILE", help="the file to update")
    update.add_argument(
        "--json",
        action="store_true",
        help="require CMD's output to be one strict JSON document (else FILE is untouched)",
    )
    update.add_argument(
        "--default",
        metavar="TEXT",
        default=None,
        help="the content to start from when FILE does not exist (default: exit 1)",
    )
    _add_timeout(update, None, _WAIT_HELP)
    _add_no_fsync(update)
    update.add_argument(
        "command", nargs="*", metavar="-- CMD ARGS", help="the command to run, after '--'"
    )

    cleanup = add(
        "cleanup",
        _cmd_cleanup,
        "remove orphaned temp files in DIR",
        "Remove the temp files ('.tmp-*') that writers killed mid-write left in\n"
        "DIR: regular files older than --age-hours, except a temp of this library\n"
        "whose writer may still run (here, or in another pid namespace or host).\n"
        "Files it may not remove are skipped and counted. Not recursive.\n\n"
        "exit: 0 done, 1 error (DIR missing or unreadable), 2 usage.",
    )
    cleanup.add_argument("dir", metavar="DIR", help="the directory to clean")
    cleanup.add_argument(
        "--age-hours",
        type=_non_negative,
        default=24.0,
        metavar="H",
        help="only files older than H hours (default 24; 0: any age)",
    )
    cleanup.add_argument(
        "--dry-run", action="store_true", help="list what would be removed; remove nothing"
    )

    for measured in (write, lock, update, cleanup):
        measured.add_argument(
            "--stats",
            action="store_true",
            help="print to stderr what the command did and what it cost (htmlgraph.metrics)",
        )
    validate = add(
        "validate",
        _cmd_validate,
        "check that FILE is complete, readable UTF-8 (or JSON)",
        "Check that FILE exists, is a regular file, is readable and is valid\n"
        "UTF-8; with --json also that it is one strict JSON document.\n\n"
        "exit: 0 valid, 1 invalid (the reason goes to stderr), 2 usage.",
    )
    validate.add_argument("file", metavar="FILE", help="the file to check")
    validate.add_argument("--json", action="store_true", help="also require valid JSON")

    check = add(
        "check",
        _cmd_check,
        "self-test: does DIR's filesystem keep the promises?",
        "Run a bounded self-test in a scratch directory inside DIR: concurrent\n"
        "writers and readers on one file (torn reads), writers killed with SIGKILL\n"
        "mid-write (torn, empty or missing files), processes incrementing a\n"
        "counter under the exclusive lock (lost updates, overlapping holders),\n"
        "cleanup of the orphans the kills left, and directory fsync. Prints a\n"
        "table; progress goes to stderr.\n\n"
        "exit: 0 every promise held, 1 a promise broke (or the test could not\n"
        "run), 2 usage.",
    )
    check.add_argument("dir", metavar="DIR", help="an existing directory on the filesystem to test")
    check.add_argument(
        "--seconds",
        type=_non_negative,
        default=10.0,
        metavar="N",
        help="time budget for the whole test (default 10)",
    )
    check.add_argument(
        "--processes",
        type=_positive_int,
        default=4,
        metavar="P",
        help="processes per concurrent phase (default 4)",
    )
    check.add_argument(
        "--no-fsync", action="store_true", help="test non-durable writes (durable=False)"
    )
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.add_argument(
        "--writer",
        metavar="MODULE:FUNC",
        default=None,
        help="test FUNC(path: str, data: bytes) instead of htmlgraph's writer "
        "(to see the checker catch a broken one)",
    )
    # The kill phase leaves orphans on purpose; the library's WARNING for each
    # one the cleanup then removes is noise here (the table counts them). -v
    # shows them.
    check.set_defaults(quiet_loggers=("htmlgraph.atomic_ops",))

    batch = add(
        "batch",
        _cmd_batch,
        "make ROOT's files equal to SRC_DIR's, all or nothing",
        "Copy every file of SRC_DIR to the same path under ROOT in one AtomicBatch:\n"
        "after a crash at any instant (and 'htmlgraph recover ROOT', which the next\n"
        "batch also runs by itself) ROOT holds all the new files or none. With\n"
        "--delete, files under ROOT that SRC_DIR lacks are deleted in the same\n"
        "batch (never the library's own .htmlgraph-batch directory or the temp\n"
        "files of writes in flight). Empty directories are left in place.\n\n"
        "exit: 0 committed, 1 error (nothing changed), 2 usage, 75 lock timeout.",
    )
    batch.add_argument("root", metavar="ROOT", help="the directory to update (must exist)")
    batch.add_argument("src", metavar="SRC_DIR", help="the directory holding the new files")
    batch.add_argument(
        "--delete", action="store_true", help="also delete files under ROOT that SRC_DIR lacks"
    )
    _add_no_fsync(batch, "all-or-nothing")
    _add_timeout(batch, 60.0, _ROOT_WAIT_HELP)

    recover_cmd = add(
        "recover",
        _cmd_recover,
        "finish or undo a batch a crash interrupted",
        "Finish a batch that committed before a crash (roll it forward) and remove\n"
        "the staged files of batches that never committed and whose process is\n"
        "gone. Files changed after the batch began are kept. Idempotent.\n\n"
        "exit: 0 done, 1 error, 2 usage, 75 lock timeout.",
    )
    recover_cmd.add_argument("root", metavar="ROOT", help="the batch root")
    _add_timeout(recover_cmd, 60.0, _ROOT_WAIT_HELP)

    sessions = add(
        "sessions",
        _cmd_sessions_list,
        "list, show, archive or reap session-registry entries",
        "Inspect and maintain a SessionRegistry (default registry directory:\n"
        ".htmlgraph/sessions/registry under the current directory).\n\n"
        "exit: 0 done, 1 no such instance or error, 2 usage (also an unsafe id),\n"
        "75 the registry's lock was not acquired in time.",
    )
    session_commands = sessions.add_subparsers(dest="sessions_cmd", metavar="ACTION", required=True)
    registry_opts = _Parser(add_help=False)
    registry_opts.add_argument(
        "--registry",
        metavar="DIR",
        default=None,
        help="the registry directory (default .htmlgraph/sessions/registry)",
    )
    registry_opts.add_argument("--json", action="store_true", help="print JSON")

    def add_session(name: str, handler: _Handler, help_text: str) -> _Parser:
        sub = session_commands.add_parser(
            name, parents=[common, registry_opts], help=help_text, description=help_text
        )
        sub.set_defaults(handler=handler, sub_parser=sub, command_name=f"sessions {name}")
        return sub

    add_session("list", _cmd_sessions_list, "list the active session instances")
    show = add_session("show", _cmd_sessions_show, "show one instance's record")
    show.add_argument("instance_id", metavar="ID", help="the instance id")
    archive = add_session("archive", _cmd_sessions_archive, "archive one instance")
    archive.add_argument("instance_id", metavar="ID", help="the instance id")
    reap = add_session(
        "reap",
        _cmd_sessions_reap,
        "archive instances whose process is gone or that have been idle too long",
    )
    reap.add_argument(
        "--max-idle",
        type=_non_negative,
        default=None,
        metavar="S",
        help="also reap instances idle for more than S seconds (default 86400: one day)",
    )
    return parser


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Split ``lock|write|update ... -- CMD`` at the first ``--``.

    argparse cannot take "options, then everything after -- verbatim" for a
    subcommand (REMAINDER swallows the options too), so the command is cut
    off before parsing.
    """
    subcommand = next((word for word in argv if not word.startswith("-")), None)
    if subcommand not in ("lock", "write", "update") or "--" not in argv:
        return argv, None
    cut = argv.index("--")
    if cut < argv.index(subcommand):
        return argv, None
    return argv[:cut], argv[cut + 1 :]


class _QuietBelowError(logging.Filter):
    """Pass only ERROR and above from the named loggers (and their children)."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return not any(record.name == n or record.name.startswith(n + ".") for n in self.names)


@contextlib.contextmanager
def _logging_to_stderr(verbosity: int, quiet: Sequence[str] = ()) -> Iterator[None]:
    """Send the package's log records to stderr while the block runs; undo it after.

    The one place the CLI configures logging: a handler on the ``htmlgraph``
    logger at the level ``-v`` asks for. Below ``-v``, records under
    ``quiet`` loggers (a command's expected noise) are dropped by the handler,
    not by changing those loggers' levels.
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(f"{_PROG}: %(levelname)s: %(message)s"))
    if verbosity <= 0 and quiet:
        handler.addFilter(_QuietBelowError(quiet))
    package_logger = logging.getLogger("htmlgraph")
    saved_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(level)  # else the root's WARNING hides -v's records
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(saved_level)


@contextlib.contextmanager
def _stats(command: str, wanted: bool) -> Iterator[None]:
    """With ``--stats``: count from zero, and print what the command did on the way out."""
    if not wanted:
        yield
        return
    from htmlgraph import metrics

    metrics.reset()
    try:
        yield
    finally:
        for line in stats_lines(metrics.snapshot()):
            _err(command, f"stats: {line}")


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.0f} us"


def stats_lines(snapshot: Mapping[str, object]) -> list[str]:
    """Say in a few lines what a metrics snapshot holds (only what is not zero)."""
    counters = cast("dict[str, list[dict[str, Any]]]", snapshot.get("counters", {}))
    hists = cast("dict[str, list[dict[str, Any]]]", snapshot.get("histograms", {}))

    def total(name: str, **match: str) -> float:
        return float(
            sum(
                row["value"]
                for row in counters.get(name, [])
                if all(row["labels"].get(k) == v for k, v in match.items())
            )
        )

    def timing(name: str, **match: str) -> str | None:
        rows = [
            row
            for row in hists.get(name, [])
            if row["count"] and all(row["labels"].get(k) == v for k, v in match.items())
        ]
        count = sum(row["count"] for row in rows)
        if not count:
            return None
        spent = sum(row["sum"] for row in rows)
        top = max(row["max"] for row in rows)
        if count == 1:
            return _seconds(spent)
        return f"{count} x, {_seconds(spent)} in all, max {_seconds(top)}"

    lines: list[str] = []
    writes = total("htmlgraph_writes_total")
    if writes:
        durable = total("htmlgraph_writes_total", durable="true")
        lines.append(
            f"{writes:g} write(s) ({durable:g} durable), "
            f"{total('htmlgraph_write_bytes_total'):g} bytes"
        )
    parts = [
        f"{label} {text}"
        for label, text in (
            ("fsync file", timing("htmlgraph_fsync_seconds", target="file")),
            ("fsync directory", timing("htmlgraph_fsync_seconds", target="directory")),
            ("rename", timing("htmlgraph_rename_seconds")),
        )
        if text is not None
    ]
    if parts:
        lines.append("; ".join(parts))
    for row in counters.get("htmlgraph_write_failures_total", []):
        if row["value"]:
            lines.append(f"failed writes ({row['labels'].get('errno')}): {row['value']:g}")
    for mode in ("shared", "exclusive"):
        waited = timing("htmlgraph_lock_wait_seconds", mode=mode)
        held = timing("htmlgraph_lock_hold_seconds", mode=mode)
        timeouts = total("htmlgraph_lock_timeouts_total", mode=mode)
        if waited or held or timeouts:
            text = f"lock ({mode}): waited {waited or '-'}, held {held or '-'}"
            lines.append(text + (f", {timeouts:g} timeout(s)" if timeouts else ""))
    for row in counters.get("htmlgraph_lock_stale_broken_total", []):
        if row["value"]:
            lines.append(
                f"stale lock files removed ({row['labels'].get('reason')}): {row['value']:g}"
            )
    for name, what in (
        ("htmlgraph_updates_total", "updates"),
        ("htmlgraph_registry_operations_total", "registry operations"),
        ("htmlgraph_batch_commits_total", "batches committed"),
        ("htmlgraph_batch_recoveries_total", "batches recovered"),
    ):
        for row in counters.get(name, []):
            if row["value"]:
                label = ", ".join(str(v) for v in row["labels"].values())
                lines.append(f"{what}{f' ({label})' if label else ''}: {row['value']:g}")
    removed = total("htmlgraph_cleanup_removed_total")
    skipped = total("htmlgraph_cleanup_skipped_total")
    if removed or skipped or "htmlgraph_cleanup_removed_total" in counters:
        lines.append(f"cleanup removed {removed:g}, skipped {skipped:g}")
    return lines or ["nothing measured"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``htmlgraph`` command line and return its exit status.

    Args:
        argv: The arguments, without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status (see the module docstring); never raises for an
        expected error, which is reported on stderr instead.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    head, tail = _split_command(words)
    parser = build_parser()
    try:
        args = parser.parse_args(head)
        sub: argparse.ArgumentParser = args.sub_parser
        if tail is not None:
            if args.command:
                sub.error(f"unexpected arguments before '--': {' '.join(args.command)}")
            args.command = tail
        if args.cmd == "lock" and not args.command:
            sub.error("no command given: htmlgraph lock DIR -- CMD ARGS...")
        if args.cmd == "update" and not args.command:
            sub.error("no command given: htmlgraph update FILE -- CMD ARGS...")
        if args.cmd == "write" and tail is not None and not tail:
            sub.error("no command after '--'")
    except _ParserExit as exc:
        return exc.status
    name: str = args.command_name
    quiet: Sequence[str] = getattr(args, "quiet_loggers", ())
    try:
        with _logging_to_stderr(args.verbose, quiet), _stats(name, getattr(args, "stats", False)):
            status: int = args.handler(args)
            sys.stdout.flush()  # here, so that a closed pipe is handled below
    except _ParserExit as exc:
        return exc.status
    except _CommandError as exc:
        _err(name, exc.message)
        return exc.status
    except Terminated as exc:
        _err(name, f"terminated by signal {exc.signum}")
        return EXIT_SIGNAL_BASE + exc.signum
    except KeyboardInterrupt:
        _err(name, "interrupted")
        return EXIT_SIGNAL_BASE + int(signal.SIGINT)
    except TimeoutError as exc:  # LockTimeout (e.g. the registry's lock), ETIMEDOUT
        _err(name, str(exc))
        return EXIT_TEMPFAIL
    except BrokenPipeError:
        # Our stdout reader went away (`htmlgraph sessions list | head`).
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except OSError as exc:
        _err(name, _describe_os_error(exc))
        return EXIT_FAILURE
    except (ValueError, TypeError) as exc:
        _err(name, str(exc))
        return EXIT_FAILURE
    return status
