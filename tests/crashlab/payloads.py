"""Deterministic payloads and the power-cut scenarios (shared by parent and worker).

Parent and worker both derive a trial's old and new content from the same
``(scenario, role, trial)`` triple, so nothing large crosses the pipe and the
parent knows exactly which bytes each outcome must match.
"""

from __future__ import annotations

import dataclasses
import json
import random

# Several filesystem blocks, so a torn or partially allocated file is possible.
_TEXT_LINES = 1500
_BYTES_SIZE = 160 * 1024


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One way of calling the library in the power-cut lab.

    Attributes:
        name: label used in tables and test ids.
        kind: "text", "bytes" or "json".
        existing: the target exists (with old content) before the write.
        create_only: call with ``overwrite=False``.
        new_dirs: the target's directory (two levels) does not exist yet.
        streaming: write through ``AtomicFileWriter`` in chunks, not ``atomic_write``.
        via_symlink: the call is given a symlink (in another directory) to the
            target; the real file's directory is the one that must be synced.
    """

    name: str
    kind: str
    existing: bool
    create_only: bool = False
    new_dirs: bool = False
    streaming: bool = False
    via_symlink: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("replace-text", "text", existing=True),
        Scenario("replace-bytes", "bytes", existing=True),
        Scenario("create-text", "text", existing=False),
        Scenario("json-replace", "json", existing=True),
        Scenario("create-only", "bytes", existing=False, create_only=True),
        Scenario("new-dirs", "bytes", existing=False, new_dirs=True, streaming=True),
        Scenario("via-symlink", "text", existing=True, via_symlink=True),
    )
}


def content(scenario: Scenario, role: str, trial: int) -> str | bytes | object:
    """The value written for ``role`` ("old" or "new") in ``trial``: str, bytes or JSON data."""
    rng = random.Random(f"{scenario.name}/{role}/{trial}")
    if scenario.kind == "text":
        words = ["alpha", "beta", "gamma", "delta", "\u00e9t\u00e9", "\u03bb", "\u2603"]
        lines = [
            f"{role} trial={trial} line={i} " + " ".join(rng.choices(words, k=8))
            for i in range(_TEXT_LINES)
        ]
        return "\n".join(lines) + "\n"
    if scenario.kind == "bytes":
        head = f"{role} trial={trial}\n".encode("ascii")
        return head + rng.randbytes(_BYTES_SIZE)
    return {
        "role": role,
        "trial": trial,
        "items": [{"i": i, "v": rng.random(), "s": "\u00e9" * (i % 7)} for i in range(2500)],
    }


def encoded(scenario: Scenario, value: str | bytes | object) -> bytes:
    """The bytes a correct write of ``value`` leaves on disk (UTF-8; JSON as the library does)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    text = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return text.encode("utf-8")


def matches(scenario: Scenario, data: bytes, value: str | bytes | object) -> bool:
    """Whether on-disk ``data`` is a complete, correct write of ``value``."""
    if scenario.kind == "json":
        try:
            return bool(json.loads(data.decode("utf-8")) == value)
        except (UnicodeDecodeError, ValueError):
            return False
    return data == encoded(scenario, value)
