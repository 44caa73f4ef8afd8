"""A KeyboardInterrupt right after the lock is taken leaves nothing held.

Python runs a signal handler (and so raises ``KeyboardInterrupt``) at a call
or a jump, so a Ctrl-C can land in any call between two steps. Each test here
raises it inside one such call - one that runs after the lock is taken and
before the code that releases it is in charge - and checks that the lock is
free at once (another owner gets it with ``timeout=0``), that no marker is
left, and that the next call in the same thread works. Each failed before
its fix: a live process kept the lock (every other process then waited
forever) or refused every later update of the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from htmlgraph import AtomicBatch, DirectoryLocker, atomic_json_update, atomic_ops
from htmlgraph import update as update_mod
from htmlgraph.batch import HIDDEN_DIR
from htmlgraph.update import update_lock_dir


class _InterruptOnce:
    """Stands in for a call made at one step; raises KeyboardInterrupt on its first use."""

    def __init__(self, real: Callable[..., object]) -> None:
        self.real = real
        self.hits = 0

    def __call__(self, *args: object) -> object:
        result = self.real(*args)
        self.hits += 1
        if self.hits == 1:
            raise KeyboardInterrupt
        return result


class _Counter:
    """A metrics counter whose ``inc`` is interrupted once."""

    def __init__(self, real: object) -> None:
        self.inc = _InterruptOnce(real.inc)  # type: ignore[attr-defined]


def _lock_is_free(lock_dir: Path) -> None:
    assert [name for name in os.listdir(lock_dir) if name.startswith(".lock-")] == []
    other = DirectoryLocker(lock_dir)
    assert other.acquire_exclusive_lock(timeout=0), f"{lock_dir} is still held"
    other.release_lock()


def _interrupt_lock_metrics(monkeypatch: pytest.MonkeyPatch) -> _Counter:
    """Interrupt the acquisition counter: the lock is already taken when it runs."""
    counter = _Counter(atomic_ops._LOCK_ACQUIRED["exclusive"])
    monkeypatch.setitem(atomic_ops._LOCK_ACQUIRED, "exclusive", counter)
    return counter


def test_an_interrupt_as_the_update_lock_is_taken_leaves_it_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_text('{"n": 0}')
    counter = _interrupt_lock_metrics(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        atomic_json_update(target, lambda d: {"n": d["n"] + 1})
    assert counter.inc.hits == 1
    assert target.read_text() == '{"n": 0}'
    _lock_is_free(update_lock_dir(target))
    atomic_json_update(target, lambda d: {"n": d["n"] + 1})
    _lock_is_free(update_lock_dir(target))
    assert '"n": 1' in target.read_text()


def test_an_interrupt_as_the_batch_lock_is_taken_leaves_it_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    counter = _interrupt_lock_metrics(monkeypatch)
    batch = AtomicBatch(root, timeout=1)
    batch.write("a.txt", "a")
    batch.write("b.txt", "b")
    with pytest.raises(KeyboardInterrupt):
        batch.commit()
    assert counter.inc.hits == 1
    assert sorted(os.listdir(root)) == [HIDDEN_DIR]
    assert sorted(os.listdir(root / HIDDEN_DIR)) == ["lock"]  # the staging went too
    _lock_is_free(root / HIDDEN_DIR / "lock")


class _InterruptingSet(set[str]):
    """The thread's set of files being updated; ``add`` is interrupted once, after adding."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def add(self, element: str) -> None:
        super().add(element)
        self.hits += 1
        if self.hits == 1:
            raise KeyboardInterrupt


def test_an_interrupt_before_the_update_lock_never_refuses_later_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_text('{"n": 0}')
    lockers, _ = update_mod._thread_state()
    held = _InterruptingSet()
    monkeypatch.setattr(update_mod._local, "held", held)
    with pytest.raises(KeyboardInterrupt):
        atomic_json_update(target, lambda d: {"n": d["n"] + 1})
    assert held.hits == 1
    # Before the fix: RuntimeError "already being updated by this thread", forever.
    atomic_json_update(target, lambda d: {"n": d["n"] + 1})
    assert '"n": 1' in target.read_text()
    _lock_is_free(update_lock_dir(target))
    assert lockers is update_mod._thread_state()[0]


@pytest.mark.parametrize("files", [0, 2], ids=["one-delete", "journaled"])
def test_an_interrupt_as_the_batch_lock_call_returns_leaves_it_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int
) -> None:
    # (A batch of one write takes no lock when nothing waits for recovery;
    # a lone delete and a journaled batch do.)
    root = tmp_path / "root"
    root.mkdir()
    (root / "old.txt").write_text("old")
    spy = _InterruptOnce(DirectoryLocker.acquire_exclusive_lock)

    def acquire(self: DirectoryLocker, timeout: float = 5.0) -> object:
        return spy(self, timeout)

    monkeypatch.setattr(DirectoryLocker, "acquire_exclusive_lock", acquire)
    batch = AtomicBatch(root, timeout=1)
    for i in range(files):
        batch.write(f"f{i}.txt", "new")
    if not files:
        batch.delete("old.txt")
    with pytest.raises(KeyboardInterrupt):
        batch.commit()  # the lock was taken; the interrupt lands as the call returns
    assert spy.hits == 1
    assert sorted(os.listdir(root)) == sorted([HIDDEN_DIR, "old.txt"])
    assert sorted(os.listdir(root / HIDDEN_DIR)) == ["lock"]
    _lock_is_free(root / HIDDEN_DIR / "lock")


def _interrupt_acquire(monkeypatch: pytest.MonkeyPatch) -> _InterruptOnce:
    """Interrupt as ``_acquire`` returns: the lock is taken, the ``with`` body not entered."""
    spy = _InterruptOnce(DirectoryLocker._acquire)

    def acquire(self: DirectoryLocker, mode: str, timeout: float) -> object:
        return spy(self, mode, timeout)

    monkeypatch.setattr(DirectoryLocker, "_acquire", acquire)
    return spy


@pytest.mark.parametrize("mode", ["shared", "exclusive"])
def test_an_interrupt_as_the_with_block_takes_the_lock_leaves_it_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    lock_dir = tmp_path / "lock"
    locker = DirectoryLocker(lock_dir)
    spy = _interrupt_acquire(monkeypatch)
    held = locker.shared if mode == "shared" else locker.exclusive
    with pytest.raises(KeyboardInterrupt), held(timeout=1):
        pytest.fail("the block must not run")  # pragma: no cover
    assert spy.hits == 1
    _lock_is_free(lock_dir)
    with held(timeout=1):  # the instance is usable again
        pass
    _lock_is_free(lock_dir)


def test_an_interrupted_inner_with_block_keeps_the_outer_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock_dir = tmp_path / "lock"
    locker = DirectoryLocker(lock_dir)
    other = DirectoryLocker(lock_dir)
    with locker.exclusive(timeout=1):
        spy = _interrupt_acquire(monkeypatch)
        with pytest.raises(KeyboardInterrupt), locker.exclusive(timeout=1):
            pytest.fail("the block must not run")  # pragma: no cover
        monkeypatch.undo()
        assert spy.hits == 1
        assert not other.acquire_exclusive_lock(timeout=0), "the outer hold was released"
    _lock_is_free(lock_dir)


def test_a_timeout_in_one_thread_never_releases_another_threads_hold(tmp_path: Path) -> None:
    import threading

    lock_dir = tmp_path / "lock"
    shared_instance = DirectoryLocker(lock_dir)
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with shared_instance.exclusive(timeout=1):
            holding.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    with pytest.raises(atomic_ops.LockTimeout), shared_instance.exclusive(timeout=0.05):
        pytest.fail("the block must not run")  # pragma: no cover
    assert not DirectoryLocker(lock_dir).acquire_exclusive_lock(timeout=0), "hold released"
    done.set()
    thread.join(10)
    _lock_is_free(lock_dir)
