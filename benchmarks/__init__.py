"""Side-by-side benchmarks of htmlgraph against the syscall floor and its peers.

Not part of the test suite. Run everything with ``python -m benchmarks.run``
(``--quick`` for a short run); see ``docs/benchmarks.md`` for how to read the
tables.
"""
