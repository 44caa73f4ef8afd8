"""Crash-lab helpers: loop-device filesystems, power-cut image copies, workers.

The power-cut model (see ``docs/crash-safety.md``): a filesystem lives on a loop
device whose backing file sits in the host page cache. Whatever the guest
filesystem has *sent to its disk* is in that backing file; whatever is still in
the guest's own page cache is not. Copying the backing file without any sync
therefore yields the disk exactly as a power cut at that instant would leave it.
"""
