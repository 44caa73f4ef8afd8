"""htmlgraph: share a directory between processes without corrupting or losing a file.

Everything public lives in :mod:`htmlgraph.atomic_ops`,
:mod:`htmlgraph.update` (read-modify-write), :mod:`htmlgraph.batch` (many files
all or nothing) and :mod:`htmlgraph.session_registry`; :mod:`htmlgraph.metrics`
counts what they did. This module only re-exports them.
"""

from htmlgraph.atomic_ops import (
    AtomicFileWriter,
    DirectoryLocker,
    LockTimeout,
    atomic_json_write,
    atomic_rename,
    atomic_write,
    cleanup_orphaned_temp_files,
    find_orphaned_temp_files,
    safe_temp_file,
    validate_atomic_write,
)
from htmlgraph.batch import AtomicBatch, read_snapshot, recover
from htmlgraph.update import atomic_json_update, atomic_update

__version__ = "0.1.0"

__all__ = [
    "AtomicBatch",
    "AtomicFileWriter",
    "DirectoryLocker",
    "LockTimeout",
    "__version__",
    "atomic_json_update",
    "atomic_json_write",
    "atomic_rename",
    "atomic_update",
    "atomic_write",
    "cleanup_orphaned_temp_files",
    "find_orphaned_temp_files",
    "read_snapshot",
    "recover",
    "safe_temp_file",
    "validate_atomic_write",
]
