"""The public surface: what the package root exports, and the library's errors."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

import htmlgraph
from htmlgraph import atomic_ops

SEED_NAMES = [
    "AtomicFileWriter",
    "DirectoryLocker",
    "atomic_rename",
    "cleanup_orphaned_temp_files",
    "safe_temp_file",
    "validate_atomic_write",
]


def test_all_is_sorted_and_unique() -> None:
    assert htmlgraph.__all__ == sorted(set(htmlgraph.__all__))
    assert atomic_ops.__all__ == sorted(set(atomic_ops.__all__))


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(htmlgraph).items()
        if not name.startswith("_") and not isinstance(value, type(sys))
    }
    assert public | {"__version__"} == set(htmlgraph.__all__)


@pytest.mark.parametrize("name", atomic_ops.__all__)
def test_root_reexports_are_the_same_objects(name: str) -> None:
    assert getattr(htmlgraph, name) is getattr(atomic_ops, name)


@pytest.mark.parametrize("name", SEED_NAMES)
def test_seed_names_are_exported(name: str) -> None:
    assert name in htmlgraph.__all__
    assert name in atomic_ops.__all__


@pytest.mark.parametrize("name", atomic_ops.__all__)
def test_every_public_name_is_documented(name: str) -> None:
    doc = getattr(atomic_ops, name).__doc__
    assert doc
    assert doc.strip().splitlines()[0].endswith(".")


def test_version_matches_pyproject() -> None:
    pyproject = Path(__file__).parent.parent / "pyproject.toml"
    match = re.search(r'^version = "([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
    assert match is not None
    assert htmlgraph.__version__ == match.group(1)


def test_package_is_typed() -> None:
    assert (Path(htmlgraph.__file__).parent / "py.typed").is_file()


def test_lock_timeout_is_a_picklable_timeout_error(tmp_path: Path) -> None:
    err = htmlgraph.LockTimeout(tmp_path, "exclusive", 1.5)
    assert isinstance(err, TimeoutError)
    assert isinstance(err, OSError)
    assert str(tmp_path) in str(err)
    assert "exclusive" in str(err)
    assert "1.5" in str(err)
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is htmlgraph.LockTimeout
    assert str(clone) == str(err)
    assert (clone.lock_dir, clone.mode, clone.timeout) == (err.lock_dir, err.mode, err.timeout)


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    # Importing must not configure logging, create files or start threads.
    code = (
        "import logging, threading, os; before = set(os.listdir('.'));"
        "import htmlgraph, htmlgraph.atomic_ops;"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers;"
        "assert threading.active_count() == 1;"
        "assert set(os.listdir('.')) == before"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
