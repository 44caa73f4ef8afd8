"""What the always-on metrics cost a write (issue 15's target: under 1 % of a 100 B durable write).

Side by side in one process: blocks of ``atomic_write`` of 100 bytes with the
metrics as shipped, and with their recording methods replaced by no-ops
(``Counter.inc``, ``Histogram.observe``; the few ``perf_counter`` calls around
the steps stay, so the overhead is slightly under-counted - they are also
reported on their own). Blocks alternate, each block writes ``--writes``
times to a fresh file, and the ratio of the medians comes with a bootstrap
95 % confidence interval.

Usage::

    python -m benchmarks.metrics_overhead                   # durable, /var/tmp
    python -m benchmarks.metrics_overhead --dir /dev/shm --fast
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import median_ratio_ci
from htmlgraph import atomic_write, metrics

PAYLOAD = b"x" * 100


def _block(path: str, writes: int, durable: bool) -> float:
    """Seconds per write over one block."""
    started = time.perf_counter()
    for _ in range(writes):
        atomic_write(path, PAYLOAD, durable=durable)
    return (time.perf_counter() - started) / writes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/var/tmp", help="where to write (default /var/tmp)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--writes", type=int, default=100, help="writes per block")
    parser.add_argument("--fast", action="store_true", help="durable=False")
    args = parser.parse_args(argv)
    durable = not args.fast
    real_inc, real_observe = metrics.Counter.inc, metrics.Histogram.observe
    on: list[float] = []
    off: list[float] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        target = os.path.join(d, "t.json")
        atomic_write(target, PAYLOAD)
        _block(target, args.writes, durable)  # warm up
        for r in range(args.rounds):
            for enabled in (True, False) if r % 2 == 0 else (False, True):
                if enabled:
                    metrics.Counter.inc, metrics.Histogram.observe = real_inc, real_observe
                else:
                    metrics.Counter.inc = lambda self, amount=1.0: None  # type: ignore[method-assign]
                    metrics.Histogram.observe = lambda self, value: None  # type: ignore[method-assign]
                (on if enabled else off).append(_block(target, args.writes, durable))
        metrics.Counter.inc, metrics.Histogram.observe = real_inc, real_observe
    # The recording alone, without a disk: what one write's metrics cost.
    c = metrics.counter("htmlgraph_write_bytes_total")
    h = metrics.histogram("htmlgraph_rename_seconds")
    n = 200_000
    started = time.perf_counter()
    for _ in range(n):
        c.inc(100)
        c.inc()
        h.observe(1e-4)
        h.observe(1e-4)
        h.observe(1e-4)
        time.perf_counter()
        time.perf_counter()
        time.perf_counter()
    per_write = (time.perf_counter() - started) / n
    metrics.reset()
    low, high = median_ratio_ci(on, off)
    kind = "durable" if durable else "durable=False"
    print(f"100 B {kind} atomic_write in {args.dir}, {args.rounds} rounds x {args.writes} writes")
    print(f"  metrics on : median {statistics.median(on) * 1e6:8.1f} us")
    print(f"  metrics off: median {statistics.median(off) * 1e6:8.1f} us")
    ratio = statistics.median(on) / statistics.median(off)
    print(f"  on/off     : {ratio:.4f} (95% CI {low:.4f}-{high:.4f})")
    print(
        f"  recording alone (2 inc + 3 observe + 3 perf_counter): {per_write * 1e6:.2f} us "
        f"= {per_write / statistics.median(off) * 100:.2f} % of a write"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
