"""The kill -9 loop: a child rewrites one target forever with self-validating payloads.

Payloads carry their own length and SHA-256, so a reader can tell a complete
payload from a torn, truncated, mixed or empty one without knowing which write
it came from.

Binary frame: ``b"HGKP" + len (8 bytes, big-endian) + sha256(body) + body``.
JSON form (``atomic_json_write``): ``{"magic": "HGKP", "len": n, "sha256": hex,
"body": base64}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from multiprocessing.connection import Connection

MAGIC = b"HGKP"
MAX_SIZE = 8 * 1024 * 1024
_CHUNK = 64 * 1024


def payload_size(rng: random.Random) -> int:
    """Log-uniform size in 1 B .. 8 MiB, so tiny and huge writes are both common."""
    return min(MAX_SIZE, max(1, int(math.exp(rng.uniform(0.0, math.log(MAX_SIZE))))))


def frame(body: bytes) -> bytes:
    """Binary self-validating payload around ``body``."""
    return MAGIC + len(body).to_bytes(8, "big") + hashlib.sha256(body).digest() + body


def json_payload(body: bytes) -> dict[str, object]:
    """JSON self-validating payload around ``body``."""
    return {
        "magic": MAGIC.decode("ascii"),
        "len": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "body": base64.b64encode(body).decode("ascii"),
    }


def validate(data: bytes) -> str:
    """Return the payload's SHA-256 hex if ``data`` is one complete payload; raise otherwise."""
    if data.startswith(b"{"):
        obj = json.loads(data.decode("utf-8"))
        if obj.get("magic") != MAGIC.decode("ascii"):
            raise ValueError("bad JSON magic")
        body = base64.b64decode(obj["body"], validate=True)
        if len(body) != obj["len"] or hashlib.sha256(body).hexdigest() != obj["sha256"]:
            raise ValueError(f"JSON payload torn: len {len(body)} vs {obj['len']}")
        if not data.endswith(b"}\n"):
            raise ValueError("JSON payload lacks its trailing newline")
        return str(obj["sha256"])
    if len(data) < 44 or not data.startswith(MAGIC):
        raise ValueError(f"not a payload ({len(data)} bytes)")
    size = int.from_bytes(data[4:12], "big")
    body = data[44:]
    if len(body) != size or hashlib.sha256(body).digest() != data[12:44]:
        raise ValueError(f"binary payload torn: {len(body)} bytes of {size}")
    return data[12:44].hex()


def rewrite_forever(target: str, seed: str, ready: Connection) -> None:
    """Child body: say "ready" on ``ready``, then rewrite ``target`` until killed."""
    import htmlgraph

    rng = random.Random(seed)
    ready.send_bytes(b"ready")
    ready.close()
    while True:
        body = rng.randbytes(payload_size(rng))
        durable = rng.random() < 0.3
        how = rng.choice(("bytes", "stream", "json"))
        if how == "bytes":
            htmlgraph.atomic_write(target, frame(body), durable=durable)
        elif how == "stream":
            data = frame(body)
            with htmlgraph.AtomicFileWriter(target, mode="wb", durable=durable) as f:
                for start in range(0, len(data), _CHUNK):
                    f.write(data[start : start + _CHUNK])
        else:
            htmlgraph.atomic_json_write(target, json_payload(body), indent=None, durable=durable)
