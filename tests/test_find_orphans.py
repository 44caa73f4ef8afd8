"""find_orphaned_temp_files is cleanup_orphaned_temp_files' dry run: same rules, no removal."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from _helpers import dead_pid
from _writehelpers import temp_name_for
from htmlgraph import cleanup_orphaned_temp_files, find_orphaned_temp_files


def _old(path: Path, hours: float = 48.0) -> Path:
    past = time.time() - hours * 3600
    os.utime(path, (past, past), follow_symlinks=False)
    return path


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, set[str]]:
    dead = dead_pid()
    orphan = tmp_path / temp_name_for(dead, "data.json")
    orphan.write_text("partial")
    _old(orphan)
    young = tmp_path / temp_name_for(dead, "data.json")
    young.write_text("recent")
    live = tmp_path / temp_name_for(os.getpid(), "data.json")
    live.write_text("in progress")
    _old(live)
    other_namespace = tmp_path / temp_name_for(dead, "data.json", tag="f" * 16)
    other_namespace.write_text("a writer in another container; its pid means nothing here")
    _old(other_namespace)
    seed_style = tmp_path / ".tmp-k3j_x9a2.tmp"  # the seed's mkstemp temp: no pid
    seed_style.write_text("someone's")
    _old(seed_style)
    directory = tmp_path / temp_name_for(dead, "dir")
    directory.mkdir()
    _old(directory)
    link = tmp_path / temp_name_for(dead, "link")
    link.symlink_to(orphan)
    _old(link)
    return tmp_path, {orphan.name, seed_style.name}


def test_find_lists_exactly_the_orphans_and_removes_nothing(
    scene: tuple[Path, set[str]],
) -> None:
    directory, expected = scene
    before = sorted(os.listdir(directory))
    found = list(find_orphaned_temp_files(directory, age_hours=24))
    assert {p.name for p in found} == expected
    assert all(p.parent == directory for p in found)
    assert sorted(os.listdir(directory)) == before


def test_cleanup_removes_what_find_listed(scene: tuple[Path, set[str]]) -> None:
    directory, expected = scene
    before = set(os.listdir(directory))
    assert cleanup_orphaned_temp_files(directory, age_hours=24) == len(expected)
    assert set(os.listdir(directory)) == before - expected


def test_find_is_lazy_and_tolerates_missing_dirs(tmp_path: Path) -> None:
    assert list(find_orphaned_temp_files(tmp_path / "missing")) == []
    (tmp_path / "file").write_text("x")
    assert list(find_orphaned_temp_files(tmp_path / "file")) == []
    with pytest.raises(ValueError, match="age_hours"):
        list(find_orphaned_temp_files(tmp_path, age_hours=-1))


def test_each_pid_is_asked_about_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from htmlgraph import _platform

    dead = dead_pid()
    for i in range(5):
        orphan = tmp_path / temp_name_for(dead, f"f{i}")
        orphan.write_text("x")
        _old(orphan)
    asked: list[int] = []
    real = _platform.pid_exists

    def spy(pid: int) -> bool:
        asked.append(pid)
        return real(pid)

    monkeypatch.setattr(_platform, "pid_exists", spy)
    assert cleanup_orphaned_temp_files(tmp_path, age_hours=1) == 5
    assert asked == [dead]
    assert os.listdir(tmp_path) == []
