"""Is a file a complete, readable UTF-8 regular file? The check, with its reason.

One implementation for two callers: ``atomic_ops.validate_atomic_write``
answers yes/no (``invalid_reason(path) is None``) and ``htmlgraph validate``
prints the reason. It imports only ``_platform`` (which imports nothing from
the package), so ``atomic_ops`` can use it without a cycle.
"""

from __future__ import annotations

import codecs
import os
import stat

from htmlgraph import _platform

__all__ = ["invalid_reason"]

_CHUNK = 1 << 20  # decoded in 1 MiB chunks: any file size, bounded memory


def invalid_reason(path: str) -> str | None:
    """Return why ``path`` is not a complete, readable UTF-8 regular file, or None if it is.

    Follows symlinks; reads the file in chunks, so any size works; never
    raises for a file that is missing, unreadable or not UTF-8 (the reason
    says which, with the byte offset of the first bad UTF-8 sequence).
    Read-only; safe across threads and processes.

    Args:
        path: The file to check.

    Returns:
        None when the file is valid, else a short reason such as
        ``"does not exist"`` or ``"not valid UTF-8 at byte 3"``.
    """
    try:
        fd = os.open(path, _platform.O_READ)  # a planted FIFO never blocks: fstat below
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:  # Windows cannot open a directory at all
        return "is a directory" if os.path.isdir(path) else f"cannot open: {exc.strerror}"
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return "is a directory" if stat.S_ISDIR(mode) else "is not a regular file"
        return _decode(fd)
    finally:
        os.close(fd)


def _decode(fd: int) -> str | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        while chunk := os.read(fd, _CHUNK):
            # The decoder holds back the start of a character split by the
            # chunk boundary; an error's position counts from those bytes.
            held = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return f"not valid UTF-8 at byte {offset - held + exc.start}"
            offset += len(chunk)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"not valid UTF-8: truncated character at the end (byte {offset})"
    return None
