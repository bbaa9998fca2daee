"""Shard contents: the SHA-256 and the largest token id of every shard, computed once.

`stoker prepare` records each shard's SHA-256 in meta.json (the shard writer hashes the bytes
as it writes them), and `load_meta` (shards.py) checks every shard file against
it, and its largest id against `vocab_size`, before any batch is built. Both come from one read
of the file (`scan_shard`). SHA-256 rather than BLAKE2b: OpenSSL's SHA-256 uses the SHA
extensions of current x86 and ARMv8 CPUs and is the faster of the two here (docs/data.md has
the measurements), the tokenizer is already identified by its SHA-256, and `sha256sum` checks a
shard by hand.

Re-reading hundreds of GB on every start would cost minutes, so results are remembered, keyed
by the file's (size, mtime_ns):
- in the process: `load_meta` again (the val split, a second loader, eval) costs one `stat`;
- across processes in `data.dir/verified.json` ({file: {size, mtime_ns, checked_ns, sha256,
  max_id}}), rewritten after a check when the directory is writable (else the process cache
  is all there is).
A result counts only when size and mtime_ns are unchanged, its sha256 is the one meta.json
records, and it was computed at least `RACY_NS` after the file's mtime: a write that lands in
the same coarse timestamp tick as the previous one leaves mtime unchanged, so a file hashed
right after it was modified is hashed again next time (git's "racily clean" rule). Anything
else that rewrites a shard changes its mtime and is caught; delete verified.json to force a
full check (e.g. after suspected bit rot below the file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stoker.errors import file_errors

STAMP_FILE = "verified.json"
STAMP_FORMAT = "stoker-shards-verified"
CHUNK = 8 << 20  # bytes per read; a multiple of every dtype's itemsize
PROGRESS_BYTES = 1 << 30  # show a progress bar when more than this must be read
RACY_NS = 2_000_000_000  # > any file system's mtime granularity (FAT: 2 s)


@dataclass(frozen=True)
class ShardFacts:
    """What one read of a shard tells: its SHA-256 (hex) and largest token id (-1 if empty)."""

    sha256: str
    max_id: int


_FACTS: dict[tuple[str, int, int], ShardFacts] = {}  # (resolved path, size, mtime_ns) -> facts


def scan_shard(path: Path, dtype: np.dtype) -> ShardFacts:
    """SHA-256 and largest id of a shard file of little-endian `dtype` ids, in one pass."""
    sha, top = hashlib.sha256(), -1
    dt = np.dtype(dtype).newbyteorder("<")
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    fix = "delete the data dir and run `stoker prepare RECIPE` again"
    with file_errors(path, "cannot read the shard", fix), open(path, "rb") as fh:
        while n := fh.readinto(view):
            sha.update(view[:n])  # releases the GIL: shards hash in parallel threads
            whole = n - n % dt.itemsize
            if whole:
                top = max(top, int(np.frombuffer(buf, dtype=dt, count=whole // dt.itemsize).max()))
    return ShardFacts(sha.hexdigest(), top)


def read_stamp(data_dir: Path) -> dict[str, Any]:
    """verified.json's entries; {} when it is missing or unreadable (it is only a cache)."""
    try:
        stamp = json.loads((data_dir / STAMP_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT:
        return {}
    shards = stamp.get("shards")
    return shards if isinstance(shards, dict) else {}


def write_stamp(data_dir: Path, entries: dict[str, Any]) -> None:
    """Write verified.json atomically; silently nothing when the dir is read-only or full."""
    tmp = data_dir / f".{STAMP_FILE}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"format": STAMP_FORMAT, "shards": entries}, indent=1))
        os.replace(tmp, data_dir / STAMP_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _trusted(entry: Any, size: int, mtime_ns: int, want: str | None) -> ShardFacts | None:
    """The facts of a verified.json entry that still describes the file, else None."""
    if not isinstance(entry, dict) or (entry.get("size"), entry.get("mtime_ns")) != (
        size,
        mtime_ns,
    ):
        return None
    sha, top, checked = entry.get("sha256"), entry.get("max_id"), entry.get("checked_ns")
    if not (isinstance(sha, str) and isinstance(top, int) and isinstance(checked, int)):
        return None
    if checked < mtime_ns + RACY_NS or (want is not None and sha != want):
        return None  # racily clean, stale or foreign: read the file again
    return ShardFacts(sha, top)


def shard_facts(
    data_dir: Path, shards: dict[str, str | None], dtype: np.dtype, show_progress: bool = False
) -> dict[str, ShardFacts]:
    """Facts of every shard file in `shards` ({file name: sha256 meta.json records, or None}),
    from the process cache, verified.json, or a parallel read of the files (module docstring)."""
    stamp = read_stamp(data_dir)
    out: dict[str, ShardFacts] = {}
    todo: dict[str, tuple[str, int, int]] = {}
    checked = time.time_ns()  # before any stat: a later write gets a later mtime
    for name, want in shards.items():
        path = data_dir / name
        with file_errors(path, "cannot stat the shard", "check the data dir's permissions"):
            st = path.stat()
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        facts = _FACTS.get(key) or _trusted(stamp.get(name), *key[1:], want)
        if facts is None:
            todo[name] = key
        else:
            out[name] = facts
    if not todo:
        return out
    scanned = _scan_all(data_dir, todo, dtype, show_progress)
    out.update(scanned)
    entries = {n: e for n, e in stamp.items() if n in shards and n not in todo}
    for name, facts in scanned.items():
        _, size, mtime_ns = todo[name]
        if checked >= mtime_ns + RACY_NS:
            _FACTS[todo[name]] = facts
            entries[name] = {
                "size": size,
                "mtime_ns": mtime_ns,
                "checked_ns": checked,
                "sha256": facts.sha256,
                "max_id": facts.max_id,
            }
    if entries != stamp:
        write_stamp(data_dir, entries)
    return out


def _scan_all(
    data_dir: Path, todo: dict[str, tuple[str, int, int]], dtype: np.dtype, show_progress: bool
) -> dict[str, ShardFacts]:
    """`scan_shard` of every file in `todo` on min(8, cores) threads, with a progress bar."""
    from tqdm import tqdm

    from stoker.monitor.system import cpu_cores

    total = sum(key[1] for key in todo.values())
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="verify shards",
        disable=not show_progress or total < PROGRESS_BYTES,
    )
    out: dict[str, ShardFacts] = {}

    def scan(name: str) -> None:
        out[name] = scan_shard(data_dir / name, dtype)
        bar.update(todo[name][1])

    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), cpu_cores(), 8))) as pool:
        list(pool.map(scan, todo))
    bar.close()
    return out
