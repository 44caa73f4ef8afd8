"""Who owns a lock marker, a temp file or a session record, and is that owner gone?

One decision, one home: the lock's stale-marker test, the registry's
``process_state`` and the temp-file cleanup all ask :func:`owner_state`.

The rule (docs/locking.md, "Stale markers"): an owner is ``"gone"`` only on
proof - it ran on this host, in this pid namespace, and its pid no longer
exists, or every task of its thread group is a zombie, or the pid now belongs
to a process with another start time. An owner on another host or in another
pid namespace, or with a namespace we cannot compare, is ``"unknown"``: its pid
means nothing here, and callers must treat it as alive.

Names and records this library did not write are foreign data: :func:`parse_pid`
accepts only ASCII digits within the platform's pid range, so an odd name
(``2147483648``, ``²``) is "not a pid", never a crash and never proof of death.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Literal

from htmlgraph import _platform

__all__ = ["OwnerState", "owner_state", "owner_tag", "parse_pid", "tagged_owner_state"]

OwnerState = Literal["alive", "gone", "unknown"]

# The longest pid we accept in a name: pid_t is a signed 32-bit int on Linux and
# macOS (Linux's pid_max is at most 2**22); Windows process ids are DWORDs.
_PID_DIGITS = 10


def parse_pid(value: object) -> int | None:
    """Return ``value`` as a pid, or None if it is not one we could have written.

    Accepts an ``int`` (not a bool) or a string of ASCII digits (no sign, no
    spaces, at most 10 digits), in ``1 .. _platform.PID_MAX``. Anything else -
    other Unicode digits, a huge number, a float - is None.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if not (0 < len(value) <= _PID_DIGITS and value.isascii() and value.isdigit()):
            return None
        value = int(value)
    if not isinstance(value, int) or not 0 < value <= _platform.PID_MAX:
        return None
    return value


def owner_state(pid: int, host: str, pidns: str | None, start: str | None) -> OwnerState:
    """Say whether the process ``pid`` on ``host`` (in ``pidns``, started at ``start``) runs.

    Args:
        pid: The owner's process id (already checked by :func:`parse_pid`).
        host: The owner's host name as it recorded it.
        pidns: The owner's pid-namespace identity (``_platform.pid_namespace``);
            None when it did not record one.
        start: The owner's start token (``_platform.process_start_token``);
            None when unknown, and then only existence is checked.

    Returns:
        ``"gone"`` on proof of death, ``"unknown"`` when the pid cannot be
        judged here (another host or pid namespace, or a record without a
        namespace on a platform that has them), else ``"alive"``.
    """
    if host != _platform.hostname() or pidns != _platform.pid_namespace():
        return "unknown"
    if not _platform.pid_exists(pid) or _platform.pid_is_zombie(pid):
        return "gone"
    if start is not None:
        current = _platform.process_start_token(pid)
        if current is not None and current != start:
            return "gone"  # the pid was reused
    return "alive"


@lru_cache(maxsize=1)
def owner_tag(pid: int) -> str:
    """Return 16 hex digits naming where and when process ``pid`` of this host runs.

    The first 8 digest this host and pid namespace, the last 8 the process's
    start token. A temp file name carries its writer's tag, so cleanup can
    tell a temp of its own namespace (judge the pid) from one written in
    another container or host (never judge), and a reused pid from the writer.
    Asked for this process's own pid, so cached (a forked child has another).
    """
    return _place_tag() + _digest8(_platform.process_start_token(pid) or "")


def tagged_owner_state(pid: int, tag: str) -> OwnerState:
    """Say whether the process named by ``pid`` and :func:`owner_tag` ``tag`` runs.

    ``"unknown"`` when the tag was made on another host or in another pid
    namespace; ``"gone"`` when the pid no longer exists, is a zombie, or now
    belongs to a process with another start token; else ``"alive"``.
    """
    if tag[:8] != _place_tag():
        return "unknown"
    if not _platform.pid_exists(pid) or _platform.pid_is_zombie(pid):
        return "gone"
    token = _platform.process_start_token(pid)
    if token is not None and _digest8(token) != tag[8:]:
        return "gone"
    return "alive"


def _digest8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


@lru_cache(maxsize=1)
def _place_tag() -> str:
    return _digest8(f"{_platform.hostname()}\0{_platform.pid_namespace()}")
