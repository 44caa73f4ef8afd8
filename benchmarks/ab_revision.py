"""This tree against an earlier revision of the library, side by side in one process.

The earlier ``src/htmlgraph`` is copied under another package name
(``htmlgraph_earlier``) so both import at once; blocks of the same operation
alternate between the two, and each pair of blocks gives one ratio (new over
earlier). Reported: the medians and the paired ratio with its quartiles.

Cases: a 100-byte ``atomic_write`` over an existing file (durable, and
``durable=False``), and an uncontended exclusive ``DirectoryLocker``
acquire + release.

Usage::

    git worktree add /tmp/earlier a67809d
    python -m benchmarks.ab_revision --earlier /tmp/earlier/src --dir /var/tmp
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import htmlgraph.atomic_ops as current

ALIAS = "htmlgraph_earlier"


def load_earlier(src: str, scratch: str, alias: str = ALIAS) -> ModuleType:
    """Import ``src/htmlgraph`` as ``{alias}.atomic_ops``."""
    package = Path(scratch) / alias
    shutil.copytree(Path(src) / "htmlgraph", package)
    for path in package.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(re.sub(r"\bhtmlgraph\b(?=[ .])", alias, text), encoding="utf-8")
    if scratch not in sys.path:
        sys.path.insert(0, scratch)
    return importlib.import_module(f"{alias}.atomic_ops")


def paired(
    name: str,
    make: Callable[[ModuleType, str], Callable[[], None]],
    rounds: int,
    n: int,
    modules: dict[str, ModuleType] | None = None,
) -> None:
    """Time ``make``'s call for each module, alternating, and print the paired ratio.

    Each module gets a call in each of two directories, and which directory
    a module writes in switches every other round (and the order every
    round): two identical directories can differ by several per cent on a
    real disk, and this keeps that out of the ratio.
    """
    if modules is None:
        modules = {"earlier": EARLIER, "now": current}
    keys = list(modules)
    results: dict[str, list[float]] = {key: [] for key in keys}
    with tempfile.TemporaryDirectory(dir=ARGS.dir) as d:
        calls = {
            (key, place): make(module, os.path.join(d, f"{i}-{place}"))
            for i, (key, module) in enumerate(modules.items())
            for place in (0, 1)
        }
        for call in calls.values():
            call()  # warm up, and create what the case needs
        for r in range(rounds):
            order = keys if r % 2 == 0 else keys[::-1]
            for key in order:
                call = calls[key, (r // 2 + keys.index(key)) % 2]
                started = time.perf_counter()
                for _ in range(n):
                    call()
                results[key].append((time.perf_counter() - started) / n)
    first, second = keys
    ratios = [a / b for a, b in zip(results[second], results[first], strict=True)]
    q = statistics.quantiles(ratios, n=4)
    print(
        f"{name:42s} {first} {statistics.median(results[first]) * 1e6:8.1f} us   "
        f"{second} {statistics.median(results[second]) * 1e6:8.1f} us   "
        f"{second}/{first} {statistics.median(ratios):.3f} (IQR {q[0]:.3f}-{q[2]:.3f})"
    )


def write_case(durable: bool) -> Callable[[ModuleType, str], Callable[[], None]]:
    def make(module: ModuleType, path: str) -> Callable[[], None]:
        os.makedirs(path, exist_ok=True)
        target = os.path.join(path, "t.json")
        return lambda: module.atomic_write(target, b"x" * 100, durable=durable)

    return make


def lock_case(module: ModuleType, path: str) -> Callable[[], None]:
    locker = module.DirectoryLocker(path)

    def cycle() -> None:
        locker.acquire_exclusive_lock()
        locker.release_lock()

    return cycle


def main() -> int:
    global ARGS, EARLIER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--earlier", required=True, help="the earlier revision's src directory")
    parser.add_argument("--dir", default="/var/tmp", help="where to write (default /var/tmp)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--control", action="store_true", help="first run the earlier revision against itself"
    )
    ARGS = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        EARLIER = load_earlier(ARGS.earlier, scratch)
        print(f"in {ARGS.dir}; {ARGS.rounds} alternating rounds per case")
        if ARGS.control:
            # A/A: the earlier revision against itself, a second copy, the same way.
            twin = load_earlier(ARGS.earlier, scratch, alias=ALIAS + "_twin")
            both = {"earlier": EARLIER, "twin": twin}
            paired("A/A control, durable", write_case(True), ARGS.rounds, 100, both)
        paired("atomic_write 100 B, durable", write_case(True), ARGS.rounds, 100)
        paired("atomic_write 100 B, durable=False", write_case(False), ARGS.rounds, 500)
        paired("DirectoryLocker exclusive acquire+release", lock_case, ARGS.rounds, 500)
    return 0


ARGS: argparse.Namespace
EARLIER: ModuleType

if __name__ == "__main__":
    raise SystemExit(main())
