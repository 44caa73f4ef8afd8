"""The ``htmlgraph`` command line (also ``python -m htmlgraph``).

Commands:

* ``write FILE`` - replace FILE with stdin all-or-nothing (like ``sponge``,
  but an interrupted or failed input leaves FILE untouched);
* ``lock DIR -- CMD ...`` - run CMD while holding DIR's lock (like ``flock``);
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
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

from htmlgraph import __version__

if TYPE_CHECKING:
    from htmlgraph._selfcheck import CheckReport, Writer

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


def _octal_mode(text: str) -> int:
    """Parse an octal permission string such as ``0644`` or ``600`` (argparse type)."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= value <= 0o7777:
        raise argparse.ArgumentTypeError(f"mode out of range 0..7777: {text!r}")
    return value


def _non_negative(text: str) -> float:
    """Parse a finite number >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    """Parse an integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
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


def _cmd_write(args: argparse.Namespace) -> int:
    from htmlgraph.atomic_ops import AtomicFileWriter, atomic_write

    target: str = args.file
    durable = not args.no_fsync
    overwrite = not args.no_overwrite
    permissions: int | None = args.mode
    command: list[str] = args.command
    if not overwrite and os.path.lexists(target):
        # Fail before reading a possibly huge stdin; the writer checks again,
        # atomically, when it commits.
        raise FileExistsError(errno.EEXIST, "target exists (--no-overwrite)", target)
    with _raise_on_termination():
        if command:
            return _write_from_command(args, command)
        stdin = _binary_stdin()
        if args.json:
            data = stdin.read()
            _strict_json(data, "stdin")
            atomic_write(
                target, data, durable=durable, overwrite=overwrite, permissions=permissions
            )
            logger.info("wrote %d bytes of JSON to %s", len(data), target)
            return EXIT_OK
        with AtomicFileWriter(
            target, mode="wb", durable=durable, overwrite=overwrite, permissions=permissions
        ) as out:
            size = _copy_stream(stdin, out)
        logger.info("wrote %d bytes to %s", size, target)
        return EXIT_OK


def _write_from_command(args: argparse.Namespace, command: list[str]) -> int:
    """``write FILE -- CMD``: replace FILE with CMD's stdout only if CMD succeeds.

    A shell pipe cannot tell ``write`` that its producer died: a killed
    producer just closes the pipe, which looks like a normal end of input.
    Running the producer ourselves lets us see its exit status.
    """
    from htmlgraph.atomic_ops import AtomicFileWriter

    target: str = args.file
    proc = _spawn(command, stdout=subprocess.PIPE)
    stdout = proc.stdout
    if stdout is None:  # pragma: no cover - Popen(stdout=PIPE) always sets it
        raise RuntimeError("no pipe to the command")
    try:
        with AtomicFileWriter(
            target,
            mode="wb",
            durable=not args.no_fsync,
            overwrite=not args.no_overwrite,
            permissions=args.mode,
        ) as out:
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
        status = _status_of(exc.returncode)
        how = (
            f"was killed by signal {-exc.returncode}"
            if exc.returncode < 0
            else f"exited with status {exc.returncode}"
        )
        _err("write", f"{command[0]} {how}; {target} left untouched")
        return status
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


def _run_forwarding(command: list[str], forwarder: _Forwarder) -> int:
    forwarder.starting = True
    try:
        proc = _spawn(command, preexec_fn=_die_with_parent())
    except BaseException:
        forwarder.starting = False
        if forwarder.pending is not None:
            raise Terminated(forwarder.pending) from None
        raise
    forwarder.proc = proc
    forwarder.starting = False
    if forwarder.pending is not None:
        forwarder.forward(proc, forwarder.pending)
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
    handled = [signal.SIGINT, *_TERMINATION_SIGNALS]
    previous: dict[int, _SigHandler] = {}
    if _in_main_thread():
        for signum in handled:
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, forwarder)
    try:
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
    finally:
        _restore_signals(previous)


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
    removed = atomic_ops.cleanup_orphaned_temp_files(directory, age_hours=args.age_hours)
    print(f"removed {removed} orphaned temp file(s) from {directory}")
    return EXIT_OK


def _why_invalid(path: str) -> str:
    """Explain why ``validate_atomic_write(path)`` said no."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        return f"is {kind}"
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    return f"not valid UTF-8 at byte {offset + exc.start}"
                offset += len(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"not valid UTF-8: truncated character at the end (byte {offset})"
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    return "not a complete, readable UTF-8 regular file"


def _cmd_validate(args: argparse.Namespace) -> int:
    from htmlgraph.atomic_ops import validate_atomic_write

    path: str = args.file
    if not validate_atomic_write(path):
        _err("validate", f"{path}: {_why_invalid(path)}")
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
    # The kill phase leaves orphans on purpose; the library's WARNING for each
    # one it then removes is noise here (the table counts them). -v shows them.
    cleanup_logger = logging.getLogger("htmlgraph.atomic_ops")
    saved_level = cleanup_logger.level
    if not args.verbose:
        cleanup_logger.setLevel(logging.ERROR)
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
        cleanup_logger.setLevel(saved_level)
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


def _session_row(entry: Mapping[str, object], state: str) -> list[str]:
    return [
        str(entry.get("instance_id", "?")),
        str(entry.get("session_id", "-")),
        str(entry.get("pid", "-")),
        str(entry.get("hostname", "-")),
        state,
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

    registry = SessionRegistry(args.registry)
    sessions = registry.get_current_sessions()
    if args.json:
        _print_json(sessions)
        return EXIT_OK
    if not sessions:
        print("no active sessions", file=sys.stderr)
        return EXIT_OK
    rows = [["INSTANCE", "SESSION", "PID", "HOST", "PROCESS", "LAST ACTIVITY"]]
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

    registry = SessionRegistry(args.registry)
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

    registry = SessionRegistry(args.registry)
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

    registry = SessionRegistry(args.registry)
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

    ``skip_own``: leave out the batch library's hidden directory and the temp
    files of writes in flight (``.tmp-*``), which are not the site's files.
    """
    from htmlgraph.atomic_ops import TEMP_PREFIX
    from htmlgraph.batch import HIDDEN_DIR

    found: list[str] = []
    for directory, dirnames, filenames in os.walk(top):
        if skip_own and directory == top and HIDDEN_DIR in dirnames:
            dirnames.remove(HIDDEN_DIR)
        # os.walk lists a symlink to a directory among dirnames: a file here.
        names = filenames + [d for d in dirnames if os.path.islink(os.path.join(directory, d))]
        for name in names:
            if skip_own and name.startswith(TEMP_PREFIX):
                continue
            rel = os.path.relpath(os.path.join(directory, name), top)
            found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _cmd_batch(args: argparse.Namespace) -> int:
    from htmlgraph.batch import AtomicBatch

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
    write.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync (atomic against crashes, but not durable across power loss)",
    )
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
    lock.add_argument(
        "--timeout",
        type=_non_negative,
        default=None,
        metavar="S",
        help="give up after S seconds with exit 75 (0: one attempt; default: wait forever)",
    )
    lock.add_argument(
        "command", nargs="*", metavar="-- CMD ARGS", help="the command to run, after '--'"
    )

    cleanup = add(
        "cleanup",
        _cmd_cleanup,
        "remove orphaned temp files in DIR",
        "Remove the temp files ('.tmp-PID-HEX...') that writers killed mid-write\n"
        "left in DIR: only regular files older than --age-hours whose writer\n"
        "process is gone. Not recursive.\n\n"
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
    batch.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync (all-or-nothing against crashes, not durable across power loss)",
    )
    batch.add_argument(
        "--timeout",
        type=_non_negative,
        default=60.0,
        metavar="S",
        help="seconds to wait for ROOT's lock (default 60)",
    )

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
    recover_cmd.add_argument(
        "--timeout",
        type=_non_negative,
        default=60.0,
        metavar="S",
        help="seconds to wait for ROOT's lock (default 60)",
    )

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
    """Split ``lock ... -- CMD`` / ``write ... -- CMD`` at the first ``--``.

    argparse cannot take "options, then everything after -- verbatim" for a
    subcommand (REMAINDER swallows the options too), so the command is cut
    off before parsing.
    """
    subcommand = next((word for word in argv if not word.startswith("-")), None)
    if subcommand not in ("lock", "write") or "--" not in argv:
        return argv, None
    cut = argv.index("--")
    if cut < argv.index(subcommand):
        return argv, None
    return argv[:cut], argv[cut + 1 :]


def _configure_logging(verbosity: int) -> logging.Handler:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{_PROG}: %(levelname)s: %(message)s"))
    package_logger = logging.getLogger("htmlgraph")
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
    return handler


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
        if args.cmd == "write" and tail is not None and not tail:
            sub.error("no command after '--'")
    except _ParserExit as exc:
        return exc.status
    name: str = args.command_name
    handler = _configure_logging(args.verbose)
    try:
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
    finally:
        logging.getLogger("htmlgraph").removeHandler(handler)
    return status
