"""The write contenders: the two syscall floors, htmlgraph, and the peers.

Each writer replaces the file at ``path`` with ``data`` (``bytes`` -> binary
mode, ``str`` -> UTF-8 text mode) the way a user of that library would write
it. The same functions are used by the timing runs and by ``strace_peers``,
so the durability label we print is the one of the code we timed.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks._common import importable, ours

Payload = bytes | str
WriteFn = Callable[[str, Payload], None]
JsonFn = Callable[[str, object], None]

_counter = itertools.count()
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _floor(path: str, data: Payload, durable: bool) -> None:
    """The least a correct atomic replace can do, with bare ``os`` calls."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.floor{next(_counter)}"
    fd = os.open(tmp, _TMP_FLAGS, 0o666)
    try:
        _write_all(fd, raw)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if durable:
        dfd = os.open(directory, _DIR_FLAGS)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def floor_durable(path: str, data: Payload) -> None:
    """open(O_EXCL) + write + fsync + close + rename + open(dir) + fsync(dir) + close."""
    _floor(path, data, durable=True)


def floor_fast(path: str, data: Payload) -> None:
    """The durable floor without the two fsyncs."""
    _floor(path, data, durable=False)


def plain_write(path: str, data: Payload) -> None:
    """Not atomic: truncate and write in place (what the seed wants to avoid)."""
    if isinstance(data, str):
        with open(path, "w", encoding="utf-8") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def ours_durable(path: str, data: Payload) -> None:
    """htmlgraph.atomic_write(durable=True)."""
    ours("atomic_write")(path, data)


def ours_fast(path: str, data: Payload) -> None:
    """htmlgraph.atomic_write(durable=False)."""
    ours("atomic_write")(path, data, durable=False)


def ours_writer(path: str, data: Payload) -> None:
    """``with AtomicFileWriter(path, mode=...) as f: f.write(data)`` (durable)."""
    mode = "w" if isinstance(data, str) else "wb"
    with ours("AtomicFileWriter")(path, mode=mode) as f:
        f.write(data)


def _atomicwrites(path: str, data: Payload) -> None:
    from atomicwrites import atomic_write  # type: ignore[import-untyped]

    if isinstance(data, str):
        with atomic_write(path, mode="w", overwrite=True, encoding="utf-8") as f:
            f.write(data)
    else:
        with atomic_write(path, mode="wb", overwrite=True) as f:
            f.write(data)


def _boltons(path: str, data: Payload) -> None:
    from boltons.fileutils import atomic_save  # type: ignore[import-untyped]

    # boltons has no encoding parameter: text mode uses the locale encoding
    # (UTF-8 here; the payloads are ASCII anyway).
    with atomic_save(path, text_mode=isinstance(data, str)) as f:
        f.write(data)


def _safer(path: str, data: Payload) -> None:
    import safer

    # Default mode: buffers everything in memory, writes a temp at close.
    if isinstance(data, str):
        with safer.open(path, "w", encoding="utf-8") as f:
            f.write(data)
    else:
        with safer.open(path, "wb") as fb:
            fb.write(data)


def _safer_temp(path: str, data: Payload) -> None:
    import safer

    # temp_file=True streams to a temp file on disk instead of memory.
    if isinstance(data, str):
        with safer.open(path, "w", encoding="utf-8", temp_file=True) as f:
            f.write(data)
    else:
        with safer.open(path, "wb", temp_file=True) as fb:
            fb.write(data)


def _atomicwriter(path: str, data: Payload) -> None:
    from atomicwriter import AtomicWriter

    with AtomicWriter(path, overwrite=True) as w:
        if isinstance(data, str):
            w.write_text(data)
        else:
            w.write_bytes(data)


@dataclass(frozen=True)
class Writer:
    """One write contender."""

    name: str
    fn: WriteFn
    kind: str  # "floor", "ours", "peer", "baseline"
    available: Callable[[], bool]


def _importable(module: str) -> Callable[[], bool]:
    return lambda: importable(module)


def _have_ours(name: str) -> Callable[[], bool]:
    return lambda: ours(name) is not None


WRITERS: list[Writer] = [
    Writer("floor-durable", floor_durable, "floor", lambda: True),
    Writer("floor-fast", floor_fast, "floor", lambda: True),
    # A/A controls: the same floors timed again as separate contenders. Their
    # ratio to the floors is the run's measurement noise for ratios.
    Writer("A/A: floor-durable again", floor_durable, "control", lambda: True),
    Writer("A/A: floor-fast again", floor_fast, "control", lambda: True),
    Writer("open(w).write (not atomic)", plain_write, "baseline", lambda: True),
    Writer("htmlgraph atomic_write", ours_durable, "ours", _have_ours("atomic_write")),
    Writer("htmlgraph atomic_write(durable=False)", ours_fast, "ours", _have_ours("atomic_write")),
    Writer("htmlgraph AtomicFileWriter", ours_writer, "ours", _have_ours("AtomicFileWriter")),
    Writer("atomicwrites", _atomicwrites, "peer", _importable("atomicwrites")),
    Writer("boltons atomic_save", _boltons, "peer", _importable("boltons.fileutils")),
    Writer("safer.open", _safer, "peer", _importable("safer")),
    Writer("safer.open(temp_file=True)", _safer_temp, "peer", _importable("safer")),
    Writer("atomicwriter", _atomicwriter, "peer", _importable("atomicwriter")),
]

WRITERS_BY_NAME = {w.name: w for w in WRITERS}


# --- JSON ---------------------------------------------------------------------------
# Every contender produces the same bytes as atomic_json_write: indent=2,
# ensure_ascii=False, allow_nan=False, UTF-8, trailing newline.
_JSON_KW: dict[str, Any] = {"indent": 2, "ensure_ascii": False, "allow_nan": False}


def _json_text(obj: object) -> str:
    return json.dumps(obj, **_JSON_KW) + "\n"


def json_plain(path: str, obj: object) -> None:
    """``json.dump`` into ``open(path, "w")``: not atomic, no fsync."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, **_JSON_KW)
        f.write("\n")


def json_floor_durable(path: str, obj: object) -> None:
    """``json.dumps`` + encode + the durable floor."""
    _floor(path, _json_text(obj), durable=True)


def json_floor_fast(path: str, obj: object) -> None:
    """``json.dumps`` + encode + the fast floor."""
    _floor(path, _json_text(obj), durable=False)


def json_ours(path: str, obj: object) -> None:
    """htmlgraph.atomic_json_write (durable)."""
    ours("atomic_json_write")(path, obj)


def json_ours_fast(path: str, obj: object) -> None:
    """htmlgraph.atomic_json_write(durable=False)."""
    ours("atomic_json_write")(path, obj, durable=False)


def json_ours_stream(path: str, obj: object) -> None:
    """``json.dump`` streamed into ``AtomicFileWriter`` (durable)."""
    with ours("AtomicFileWriter")(path, mode="w") as f:
        json.dump(obj, f, **_JSON_KW)
        f.write("\n")


def _json_atomicwrites(path: str, obj: object) -> None:
    from atomicwrites import atomic_write

    with atomic_write(path, mode="w", overwrite=True, encoding="utf-8") as f:
        json.dump(obj, f, **_JSON_KW)
        f.write("\n")


def _json_boltons(path: str, obj: object) -> None:
    from boltons.fileutils import atomic_save

    with atomic_save(path, text_mode=True) as f:
        json.dump(obj, f, **_JSON_KW)
        f.write("\n")


def _json_safer(path: str, obj: object) -> None:
    import safer

    with safer.open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, **_JSON_KW)
        f.write("\n")


def _json_atomicwriter(path: str, obj: object) -> None:
    from atomicwriter import AtomicWriter

    # Not file-like: no json.dump(obj, w); serialise first.
    with AtomicWriter(path, overwrite=True) as w:
        w.write_text(_json_text(obj))


@dataclass(frozen=True)
class JsonWriter:
    """One JSON write contender; ``durability_of`` names the writer whose strace label applies."""

    name: str
    fn: JsonFn
    durability_of: str
    available: Callable[[], bool]


JSON_WRITERS: list[JsonWriter] = [
    JsonWriter("json.dump to open() (not atomic)", json_plain, "plain", lambda: True),
    JsonWriter("json.dumps + floor-durable", json_floor_durable, "floor-durable", lambda: True),
    JsonWriter("json.dumps + floor-fast", json_floor_fast, "floor-fast", lambda: True),
    JsonWriter(
        "htmlgraph atomic_json_write",
        json_ours,
        "htmlgraph atomic_write",
        _have_ours("atomic_json_write"),
    ),
    JsonWriter(
        "htmlgraph atomic_json_write(durable=False)",
        json_ours_fast,
        "htmlgraph atomic_write(durable=False)",
        _have_ours("atomic_json_write"),
    ),
    JsonWriter(
        "json.dump + htmlgraph AtomicFileWriter",
        json_ours_stream,
        "htmlgraph AtomicFileWriter",
        _have_ours("AtomicFileWriter"),
    ),
    JsonWriter(
        "json.dump + atomicwrites", _json_atomicwrites, "atomicwrites", _importable("atomicwrites")
    ),
    JsonWriter(
        "json.dump + boltons atomic_save",
        _json_boltons,
        "boltons atomic_save",
        _importable("boltons.fileutils"),
    ),
    JsonWriter("json.dump + safer.open", _json_safer, "safer.open", _importable("safer")),
    JsonWriter(
        "json.dumps + atomicwriter",
        _json_atomicwriter,
        "atomicwriter",
        _importable("atomicwriter"),
    ),
]
