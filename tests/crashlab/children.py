"""Module-level child-process bodies for the kernel error-path tests.

Each child performs one library call under a changed process state (a file
size limit, another uid) and sends back what happened as plain data:
``(exception type name, errno, filename, message)``, or ``("ok", 0, None, "")``.
"""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection

Result = tuple[str, int, "str | None", str]


def _attempt(target: str, content: bytes) -> Result:
    import htmlgraph

    try:
        htmlgraph.atomic_write(target, content)
    except OSError as exc:
        filename = exc.filename if isinstance(exc.filename, str) else None
        return (type(exc).__name__, exc.errno or 0, filename, str(exc))
    return ("ok", 0, None, "")


def write_under_fsize_limit(target: str, limit: int, size: int, conn: Connection) -> None:
    """Write ``size`` bytes with RLIMIT_FSIZE = ``limit`` and SIGXFSZ ignored (-> EFBIG)."""
    if sys.platform == "win32":
        raise RuntimeError("POSIX only")
    import resource
    import signal

    # Ignored SIGXFSZ turns "file too large" from a kill into an EFBIG error.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    conn.send(_attempt(target, b"n" * size))
    conn.close()


def write_as_nobody(target: str, content: bytes, conn: Connection) -> None:
    """Drop to uid/gid 65534 (nobody) and try to write ``target``."""
    if sys.platform == "win32":
        raise RuntimeError("POSIX only")
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    conn.send(_attempt(target, content))
    conn.close()
