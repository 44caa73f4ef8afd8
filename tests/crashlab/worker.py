"""Child process of the power-cut lab: performs one write per request.

Run as ``python -m crashlab.worker`` with ``tests/`` and ``src/`` on
``PYTHONPATH``. Each stdin line is a JSON request ``{"writer", "scenario",
"trial", "path"}``; the worker performs the write and prints ``committed`` the
moment the call has returned (or ``error ...``), then waits for the next line.

Writers:
    ours: the library with ``durable=True`` (the default).
    nondurable: the library with ``durable=False`` (negative control).
    bare: open a temp beside the target, write, close, ``os.replace``; no fsync
        anywhere (negative control that does not depend on the library).
    no-dir-fsync: like bare, but fsyncs the temp before the rename (mutant:
        the library without its directory fsync).
    no-file-fsync: like bare, but fsyncs the directories after the rename
        (mutant: the library without its file fsync).
"""

from __future__ import annotations

import json
import os
import sys

from crashlab.payloads import SCENARIOS, Scenario, content, encoded

_CHUNK = 16 * 1024


def _library_write(scenario: Scenario, path: str, value: object, durable: bool) -> None:
    import htmlgraph

    if scenario.kind == "json":
        htmlgraph.atomic_json_write(
            path, value, durable=durable, overwrite=not scenario.create_only
        )
        return
    if scenario.streaming:
        data = encoded(scenario, value)
        with htmlgraph.AtomicFileWriter(path, mode="wb", durable=durable) as f:
            for start in range(0, len(data), _CHUNK):
                f.write(data[start : start + _CHUNK])
        return
    assert isinstance(value, (str, bytes))
    htmlgraph.atomic_write(path, value, durable=durable, overwrite=not scenario.create_only)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory with bare ``os`` calls (the controls must not use the library)."""
    if sys.platform == "win32":
        raise OSError("directories cannot be fsynced on Windows")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bare_write(
    scenario: Scenario,
    path: str,
    value: object,
    trial: int,
    *,
    file_fsync: bool = False,
    dir_fsync: bool = False,
) -> None:
    path = os.path.realpath(path)  # write through a symlink, as the library does
    directory = os.path.dirname(path)
    created: list[str] = []
    probe = directory
    while not os.path.isdir(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".bare-{os.getpid()}-{trial}")
    with open(tmp, "wb") as f:
        f.write(encoded(scenario, value))
        if file_fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if dir_fsync:
        # The target's directory, then each created directory's parent.
        for d in [directory, *(os.path.dirname(c) for c in created)]:
            fsync_dir(d)


def handle(request: dict[str, object]) -> None:
    """Perform one requested write."""
    scenario = SCENARIOS[str(request["scenario"])]
    trial = int(str(request["trial"]))
    path = str(request["path"])
    value = content(scenario, "new", trial)
    writer = request["writer"]
    if writer == "bare":
        _bare_write(scenario, path, value, trial)
    elif writer == "no-dir-fsync":
        _bare_write(scenario, path, value, trial, file_fsync=True)
    elif writer == "no-file-fsync":
        _bare_write(scenario, path, value, trial, dir_fsync=True)
    elif writer in ("ours", "nondurable"):
        _library_write(scenario, path, value, durable=writer == "ours")
    else:
        raise ValueError(f"unknown writer {writer!r}")


def main() -> int:
    """Serve requests until stdin closes."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            handle(json.loads(line))
        except Exception as exc:  # reported to the parent, which fails the trial
            sys.stdout.write(f"error {type(exc).__name__}: {exc}\n")
        else:
            sys.stdout.write("committed\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
