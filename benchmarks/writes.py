"""Write benchmarks: payload sizes x text/bytes, the JSON document, and reads."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from benchmarks._common import (
    CaseResult,
    Op,
    Row,
    SlotOp,
    Trace,
    ours,
    round_robin,
    round_robin_slots,
)
from benchmarks._writers import JSON_WRITERS, WRITERS, Payload

SIZES: list[tuple[str, int]] = [
    ("100 B", 100),
    ("4 KiB", 4 << 10),
    ("1 MiB", 1 << 20),
    ("64 MiB", 64 << 20),
]

# Repetitions per size: (full run, --quick). A small write takes about a
# millisecond, so many samples are cheap, and they are what narrows the
# confidence interval of a ratio to a percent or so; 64 MiB writes take
# ~0.2 s each and vary less in relative terms.
REPS: dict[int, tuple[int, int]] = {
    100: (2000, 40),
    4 << 10: (2000, 40),
    1 << 20: (600, 8),
    64 << 20: (40, 2),
}


def _payload(size: int, text: bool) -> Payload:
    rng = random.Random(size)
    if not text:
        return rng.randbytes(size)
    # ASCII lines so that every library's text mode writes the same bytes.
    line = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(79)) + "\n"
    return (line * (size // len(line) + 1))[:size]


def _label(traces: dict[str, Trace], name: str) -> str:
    if name.startswith("A/A: "):
        name = name.removeprefix("A/A: ").removesuffix(" again")
    t = traces.get(name)
    return t.label if t is not None else "unverified"


def bench_sizes(
    base: Path, traces: dict[str, Trace], quick: bool, log: Callable[[str], None]
) -> list[CaseResult]:
    """Every writer x every payload size x text/bytes, interleaved per case."""
    writers = [w for w in WRITERS if w.available()]
    results = []
    for size_label, size in SIZES:
        for text in (False, True):
            kind = "text" if text else "bytes"
            reps = REPS[size][1 if quick else 0]
            payload = _payload(size, text)
            case_dir = base / f"w-{size}-{kind}"
            # One directory per contender, dealt out afresh every repetition
            # (round_robin_slots); each holds a target to overwrite.
            slots = _slots(case_dir, len(writers), "target.dat", b"old\n")
            contenders = [(w.name, _bind(w.fn, payload)) for w in writers]
            log(f"writes: {size_label} {kind}, {len(contenders)} contenders x {reps} reps")
            warmup = 1 if size < (64 << 20) else 0
            series = round_robin_slots(contenders, slots, reps, warmup=warmup, before_each=os.sync)
            case = CaseResult(f"Write {size_label}, {kind}")
            for w in writers:
                case.rows.append(Row(w.name, _label(traces, w.name), series[w.name]))
            results.append(case)
            shutil.rmtree(case_dir)
    return results


def _slots(case_dir: Path, n: int, name: str, old: bytes) -> list[str]:
    """Make ``n`` directories under ``case_dir``, each with a file ``name``; return the files."""
    targets = []
    for i in range(n):
        d = case_dir / f"s{i}"
        d.mkdir(parents=True)
        target = d / name
        target.write_bytes(old)
        targets.append(str(target))
    return targets


def _bind(fn: Callable[[str, Payload], None], payload: Payload) -> SlotOp:
    return lambda target: fn(target, payload)


def _bind_json(fn: Callable[[str, object], None], doc: object) -> SlotOp:
    return lambda target: fn(target, doc)


def json_document(approx_bytes: int = 1 << 20) -> object:
    """A deterministic ~1 MB document of typical records (nested, some non-ASCII)."""
    rng = random.Random(42)
    records = []
    size = 0
    i = 0
    while size < approx_bytes:
        rec = {
            "id": f"session-{i:06d}",
            "pid": rng.randrange(1, 1 << 22),
            "host": rng.choice(["build-01", "laptop-ñandú", "ci-runner-7"]),
            "started": 1_700_000_000 + rng.random() * 1e6,
            "active": rng.random() < 0.5,
            "tags": [rng.choice(["graph", "html", "agent", "täg", "node"]) for _ in range(3)],
            "stats": {"reads": rng.randrange(1000), "writes": rng.randrange(1000), "ratio": 0.5},
            "note": None,
        }
        records.append(rec)
        size += len(json.dumps(rec, indent=2, ensure_ascii=False)) + 4
        i += 1
    return {"version": 1, "sessions": records}


def bench_json(
    base: Path, traces: dict[str, Trace], quick: bool, log: Callable[[str], None]
) -> CaseResult:
    """atomic_json_write of a ~1 MB document vs json.dump with each peer."""
    doc = json_document()
    nbytes = len((json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode())
    writers = [w for w in JSON_WRITERS if w.available()]
    slots = _slots(base / "json", len(writers), "doc.json", b"{}\n")
    contenders = [(w.name, _bind_json(w.fn, doc)) for w in writers]
    reps = 6 if quick else 60
    log(f"json: {nbytes} bytes, {len(contenders)} contenders x {reps} reps")
    series = round_robin_slots(contenders, slots, reps, before_each=os.sync)
    case = CaseResult(
        f"JSON document ({nbytes / 1e6:.2f} MB, indent=2)",
        note="Every contender writes identical bytes (indent=2, ensure_ascii=False, trailing "
        "newline). Peers stream with json.dump into their file object (atomicwriter is not "
        "file-like, so it gets json.dumps); floors serialise with json.dumps then write.",
    )
    for w in writers:
        label = "no fsync (not atomic)" if w.durability_of == "plain" else None
        case.rows.append(Row(w.name, label or _label(traces, w.durability_of), series[w.name]))
    for slot in slots:
        with open(slot, encoding="utf-8") as f:
            json.load(f)  # sanity: what we timed wrote valid JSON
    shutil.rmtree(base / "json")
    return case


def _read_plain(path: str) -> Callable[[], str]:
    def op() -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    return op


def _read_pathlib(path: Path) -> Callable[[], str]:
    return lambda: path.read_text(encoding="utf-8")


def _read_ours(path: str) -> Callable[[], str] | None:
    fn = ours("safe_read_with_retry")
    if fn is None:
        writer = ours("AtomicFileWriter")
        fn = getattr(writer, "safe_read_with_retry", None) if writer is not None else None
    if fn is None:
        return None
    reader = fn
    return lambda: str(reader(path))


def bench_reads(base: Path, quick: bool, log: Callable[[str], None]) -> list[CaseResult]:
    """safe_read_with_retry vs open().read() on a file that exists (the common case)."""
    out = []
    for size_label, size, reps in (("4 KiB", 4 << 10, 3000), ("1 MiB", 1 << 20, 200)):
        if quick:
            reps //= 5
        d = base / f"read-{size}"
        d.mkdir(parents=True)
        path = str(d / "f.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(str(_payload(size, text=True)))
        contenders: list[tuple[str, Op]] = [("open().read()", _read_plain(path))]
        contenders.append(("pathlib read_text()", _read_pathlib(Path(path))))
        op = _read_ours(path)
        if op is not None:
            contenders.append(("htmlgraph safe_read_with_retry", op))
        log(f"reads: {size_label}, {len(contenders)} contenders x {reps} reps")
        series = round_robin(contenders, reps)
        case = CaseResult(f"Read {size_label} (text, file present)")
        for name, _ in contenders:
            case.rows.append(Row(name, "-", series[name]))
        out.append(case)
        shutil.rmtree(d)
    return out
