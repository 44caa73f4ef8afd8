"""The update lock directory under attack: a stranger racing to plant it.

``atomic_update`` checks the lock directory beside the file before using it
(``test_update.py``: a planted symlink, file or stranger's directory is
refused). A stranger in a sticky world-writable directory can still plant one
in the instant between that check and our ``mkdir``; these tests plant it
exactly there, as a real second user (root only; skipped otherwise).
"""

from __future__ import annotations

import errno
import os
import sys

import pytest

from _writehelpers import as_stranger, is_root, world_traversable_dir
from htmlgraph import atomic_json_update
from htmlgraph import update as update_mod
from htmlgraph.update import update_lock_dir

if sys.platform == "win32":
    pytest.skip("POSIX owners and sticky directories", allow_module_level=True)


@pytest.mark.skipif(not is_root(), reason="needs root (a second, real user)")
@pytest.mark.parametrize("plant", ["symlink", "directory"])
def test_a_lock_dir_planted_between_the_check_and_our_mkdir_is_refused(
    monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    with world_traversable_dir() as base:
        shared = base / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        target = shared / "state.json"
        target.write_text('{"n": 0}')
        lock_dir = update_lock_dir(target)
        evil = shared / "evil"
        real_check = update_mod._check_lock_dir
        planted: list[str] = []

        def check_then_race(path: str, file: str) -> object:
            result = real_check(path, file)
            if not planted:  # the stranger wins the race once, right after our check
                planted.append(path)
                if plant == "symlink":

                    def plant_link() -> None:
                        evil.mkdir()
                        os.symlink(evil, path)

                    as_stranger(plant_link)
                else:
                    as_stranger(lambda: os.mkdir(path))
            return result

        monkeypatch.setattr(update_mod, "_check_lock_dir", check_then_race)
        with pytest.raises(OSError, match=r"symlink|stranger") as info:
            atomic_json_update(target, lambda d: {"n": d["n"] + 1}, timeout=5)
        assert planted == [str(lock_dir)]
        assert info.value.errno in (errno.ELOOP, errno.EPERM)
        assert info.value.filename == str(lock_dir)
        assert target.read_text() == '{"n": 0}'  # fn never ran on what it read
        where = evil if plant == "symlink" else lock_dir
        assert os.listdir(where) == []  # our marker went with the refusal
        # The stranger takes the plant away: the next update makes its own
        # lock directory and never publishes where the plant pointed.
        as_stranger(lambda: os.unlink(lock_dir) if plant == "symlink" else os.rmdir(lock_dir))
        seen: list[list[str]] = []

        def increment(d: dict[str, int]) -> dict[str, int]:
            seen.append(os.listdir(lock_dir))
            return {"n": d["n"] + 1}

        atomic_json_update(target, increment, timeout=5)
        assert target.read_text() == '{\n  "n": 1\n}\n'
        assert len(seen) == 1
        assert seen[0][0].startswith(".lock-exclusive-")
        assert os.stat(lock_dir, follow_symlinks=False).st_uid == 0
        if plant == "symlink":
            assert os.listdir(evil) == []
