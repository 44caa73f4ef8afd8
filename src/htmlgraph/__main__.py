"""``python -m htmlgraph``: the same command line as the ``htmlgraph`` script."""

from htmlgraph.cli import main

# The guard matters: the ``check`` command starts multiprocessing children,
# and a "spawn" child re-imports the parent's main module as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main())
