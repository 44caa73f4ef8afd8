"""A hypothesis state machine: batches, single writes, crashes and recovery vs a dict.

The model is ``relative path -> bytes``. Rules commit batches (writes and
deletes over a small set of paths, some in directories that come and go),
make plain ``atomic_write`` calls and deletes, discard batches, crash a batch
at a chosen protocol step (an exception there: before the commit record the
model is unchanged, after it the batch is in), leave a committed batch
unfinished and build the next batch on top of it, and run ``recover``. After
every step the tree on disk, ``read_snapshot`` and the model agree, and the
library's hidden directory holds nothing but its lock directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from crashlab.batchchild import WriterGone, library_leftovers, tree, writer_gone_after_commit
from htmlgraph import AtomicBatch, atomic_write, read_snapshot, recover
from htmlgraph import batch as batch_mod

PATHS = ["a.txt", "b.html", "d/c.json", "d/e/f.bin", "g/h.txt"]
# Commit steps before which an exception leaves nothing (see test_batch_faults);
# "one-*" are the steps of a batch of one operation, which has no journal.
_UNCOMMITTED = {
    "locked",
    "journal-written",
    "staged-durable",
    "journal-renamed",
    "one-durable",
    "one-checked",
}

contents = st.binary(max_size=300)
ops = st.dictionaries(st.sampled_from(PATHS), st.one_of(st.none(), contents), max_size=len(PATHS))


class _Crash(BaseException):
    pass


class BatchMachine(RuleBasedStateMachine):
    """Drive one root through random batches, writes, crashes and recoveries."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="batch-stateful-")
        self.root = Path(self.tmp) / "site"
        self.root.mkdir()
        self.model: dict[str, bytes] = {}

    def teardown(self) -> None:
        batch_mod._step = batch_mod._no_step
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _fill(self, batch: AtomicBatch, changes: dict[str, bytes | None]) -> None:
        for rel, data in changes.items():
            if data is None:
                # A file the model holds is deleted plainly: it exists, even
                # when only a committed, unfinished batch has made it so far.
                batch.delete(rel, missing_ok=rel not in self.model)
            elif len(data) % 2:
                with batch.open(rel) as f:
                    f.write(data)
            else:
                batch.write(rel, data)

    def _apply(self, changes: dict[str, bytes | None]) -> None:
        for rel, data in changes.items():
            if data is None:
                self.model.pop(rel, None)
            else:
                self.model[rel] = data

    @rule(changes=ops, durable=st.booleans())
    def commit_batch(self, changes: dict[str, bytes | None], durable: bool) -> None:
        with AtomicBatch(self.root, durable=durable) as batch:
            self._fill(batch, changes)
        self._apply(changes)

    @rule(changes=ops)
    def discard_batch(self, changes: dict[str, bytes | None]) -> None:
        batch = AtomicBatch(self.root)
        self._fill(batch, changes)
        batch.discard()

    @rule(changes=ops, k=st.integers(min_value=1, max_value=12))
    def crash_batch(self, changes: dict[str, bytes | None], k: int) -> None:
        calls = [0]
        hit: list[str] = []

        def step(name: str) -> None:
            calls[0] += 1
            if calls[0] == k:
                hit.append(name)
                raise _Crash(name)

        batch_mod._step = step
        try:
            with AtomicBatch(self.root) as batch:
                self._fill(batch, changes)
        except _Crash:
            pass
        finally:
            batch_mod._step = batch_mod._no_step
        if not hit or hit[0] not in _UNCOMMITTED:
            self._apply(changes)  # committed (or the crash fell after the batch ended)

    @rule(first=ops, then=ops)
    def unfinished_then_batch(
        self, first: dict[str, bytes | None], then: dict[str, bytes | None]
    ) -> None:
        """``first`` stops right after its commit point, unfinished; ``then`` is built meanwhile.

        ``then`` is staged against a tree that lacks ``first``'s changes (they
        are only in its journal), and must still land on top of them.
        """
        with (
            writer_gone_after_commit() as hit,
            contextlib.suppress(WriterGone),
            AtomicBatch(self.root) as batch,
        ):
            self._fill(batch, first)
        self._apply(first)  # committed, finished or not
        if hit:  # a journal waits (a batch of one operation has none)
            assert (self.root / batch_mod.HIDDEN_DIR).exists()
        with AtomicBatch(self.root) as batch:
            self._fill(batch, then)
        self._apply(then)
        if not then:  # an empty batch does nothing, recovery included
            assert recover(self.root).finished == len(hit)

    @rule(rel=st.sampled_from(PATHS), data=contents)
    def plain_write(self, rel: str, data: bytes) -> None:
        atomic_write(self.root / rel, data)
        self.model[rel] = data

    @rule(rel=st.sampled_from(PATHS))
    def plain_delete(self, rel: str) -> None:
        if rel in self.model:
            os.unlink(self.root / rel)
            del self.model[rel]

    @rule()
    def run_recover(self) -> None:
        report = recover(self.root)
        assert not report, report

    @invariant()
    def disk_matches_model(self) -> None:
        assert tree(self.root) == self.model
        assert read_snapshot(self.root) == self.model
        assert read_snapshot(self.root, PATHS) == self.model
        assert library_leftovers(self.root) == []


BatchMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBatchMachine = BatchMachine.TestCase
