"""Token shards on disk: raw little-endian uint16/uint32 files described by `meta.json`.

A prepared data dir (`data.dir`) holds
    meta.json            JSON (never pickle), written last: its presence marks a complete dir
    train-00000.bin ...  the train split's tokens, `shard_tokens` per file (the last shorter)
    val-00000.bin ...    the val split's tokens
    tokenizer/           the tokenizer that made them (Tokenizer.save); the trainer copies it
                         into every checkpoint
    verified.json        which shards `load_meta` last found intact, at which (size, mtime_ns):
                         a cache that spares re-reading them (checksums.py), never required
Every document is followed by one EOS token, so a shard is `doc EOS doc EOS ...`.

meta.json keys: format ("stoker-shards"), version, vocab_size (1 + the largest token id),
dtype ("uint16" | "uint32"), eos_id, bos_id, tokenizer_dir ("tokenizer"), tokenizer_file
(e.g. "tokenizer/tokenizer.json"), tokenizer_sha256, fingerprint (of sources + tokenizer +
settings; see prepare.py), sources, seed, val_fraction, and
splits.{train,val}.{tokens, documents, shards: [{file, tokens, sha256}]}.
`load_meta` checks all of it against the files: sizes = tokens × itemsize, each shard's SHA-256
(absent in meta.json written before stoker recorded it: then a warning, not an error) and its
largest id < vocab_size, so a corrupt shard is refused before it reaches the embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stoker.data.checksums import shard_facts
from stoker.errors import StokerError, file_error, file_errors

FORMAT = "stoker-shards"
VERSION = 1
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
LIMITS = {"uint16": 2**16, "uint32": 2**32}
REPREPARE = "delete the directory and run `stoker prepare RECIPE` again"
# where a write failed (ENOSPC, EROFS, EACCES, ...): the reason says which
WRITE_FIX = "free space or fix permissions there, or set data.dir to another disk"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UNCHECKED: set[str] = set()  # data dirs already warned about missing checksums


def choose_dtype(vocab_size: int, requested: str = "auto") -> str:
    """uint16 when every id fits (vocab ≤ 65,536), else uint32; a forced dtype is checked."""
    if requested == "auto":
        return "uint16" if vocab_size <= LIMITS["uint16"] else "uint32"
    if vocab_size > LIMITS[requested]:
        raise StokerError(
            f"a vocabulary of {vocab_size} tokens does not fit data.dtype="
            f"{requested} (at most {LIMITS[requested]}); set data.dtype=auto or "
            "uint32"
        )
    return requested


class ShardWriter:
    """Appends token arrays to `{split}-00000.bin`, `{split}-00001.bin`, ... in a directory,
    hashing them on the way (each shard entry gets its `sha256`)."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int):
        self.dir, self.split, self.dtype = Path(directory), split, DTYPES[dtype]
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.documents = 0
        self._fh = None
        self._sha = hashlib.sha256()

    def _path(self) -> Path:
        return self.dir / self.shards[-1]["file"]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._sha = hashlib.sha256()
        with file_errors(self._path(), "cannot create the shard", WRITE_FIX):
            self._fh = open(self._path(), "wb")  # noqa: SIM115 (open across write() calls)

    def write(self, ids: np.ndarray, documents: int = 0) -> None:
        """Append tokens (already in this writer's dtype); `documents` ended inside them."""
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        self.documents += documents
        while ids.size:
            if self._fh is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            head, ids = ids[:room], ids[room:]
            head = np.ascontiguousarray(head, dtype=head.dtype.newbyteorder("<"))
            # file.write, not ndarray.tofile: tofile can drop an ENOSPC on small writes
            with file_errors(self._path(), "cannot write the shard", WRITE_FIX):
                self._fh.write(head.data)
            self._sha.update(head)
            self.shards[-1]["tokens"] += int(head.size)
            self.tokens += int(head.size)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with file_errors(self._path(), "cannot write the shard", WRITE_FIX):
                fh.close()  # flushes: a full disk may only show here
            self.shards[-1]["sha256"] = self._sha.hexdigest()

    def summary(self) -> dict[str, Any]:
        self.close()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def _fail(data_dir: Path, what: str) -> StokerError:
    return file_error(data_dir, what, REPREPARE)


def read_meta_file(data_dir: str | Path) -> dict[str, Any] | None:
    """meta.json as a dict, None when there is none; StokerError when it is not JSON."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        return None
    with file_errors(data_dir, f"unreadable {META_FILE}", REPREPARE):
        meta = json.loads(path.read_bytes())
    if not isinstance(meta, dict):
        raise _fail(Path(data_dir), f"{META_FILE} is not a JSON object")
    return meta


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_split(d: Path, meta: dict[str, Any], split: str, itemsize: int) -> None:
    info = meta["splits"].get(split)
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        raise _fail(d, f"{META_FILE} has no shard list for split {split!r}")
    total = 0
    for shard in info["shards"]:
        name = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not name or os.path.basename(name) != name:
            raise _fail(d, f"{META_FILE} lists a malformed shard entry {shard!r} in {split!r}")
        if not _is_count(shard.get("tokens")):
            raise _fail(d, f"{META_FILE} gives shard {name} no token count")
        sha = shard.get("sha256")
        if sha is not None and not (isinstance(sha, str) and SHA256.match(sha)):
            raise _fail(d, f"{META_FILE} has a malformed sha256 for shard {name}")
        path = d / name
        if not path.is_file():
            raise _fail(d, f"shard {name} listed in {META_FILE} is missing")
        want, have = shard["tokens"] * itemsize, path.stat().st_size
        if have != want:
            kind = "truncated" if have < want else "longer than meta.json says"
            raise _fail(
                d,
                f"shard {name} is {kind}: {have} bytes, {META_FILE} says "
                f"{want} ({shard['tokens']} tokens × {itemsize} bytes)",
            )
        total += shard["tokens"]
    if total != info.get("tokens"):
        raise _fail(
            d,
            f"{META_FILE} says split {split!r} has {info.get('tokens')} tokens but "
            f"its shards hold {total}",
        )


def _check_contents(d: Path, meta: dict[str, Any]) -> None:
    """Every shard's SHA-256 equals meta.json's and its largest id is below vocab_size (one
    read per shard, remembered by checksums.py until the file changes)."""
    want = {s["file"]: s.get("sha256") for split in SPLITS for s in meta["splits"][split]["shards"]}
    if None in want.values() and str(d) not in _UNCHECKED:
        _UNCHECKED.add(str(d))
        warnings.warn(
            f"{d / META_FILE} records no shard checksums (written by an older stoker), so "
            "changed shard bytes go unnoticed; delete it and run `stoker prepare RECIPE` to "
            "add them",
            stacklevel=3,
        )
    main = os.environ.get("RANK", "0") == "0"
    facts = shard_facts(d, want, DTYPES[meta["dtype"]], show_progress=main)
    vocab = meta["vocab_size"]
    for name, sha in want.items():
        got = facts[name]
        if sha is not None and got.sha256 != sha:
            raise file_error(
                d / name,
                "contents changed since `stoker prepare` wrote it",
                f"delete {d} and run `stoker prepare RECIPE` again",
                f"sha256 {got.sha256[:16]}…, {META_FILE} records {sha[:16]}…",
            )
        if got.max_id >= vocab:
            raise file_error(
                d / name,
                f"holds token id {got.max_id} but {META_FILE} says vocab_size {vocab}",
                f"delete {d} and run `stoker prepare RECIPE` again",
                "ids must be below vocab_size: the shard or meta.json is corrupt",
            )


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """The validated meta.json of a prepared data dir; StokerError naming any mismatch of
    its fields, the shards' sizes, their SHA-256 or their largest id (module docstring)."""
    d = Path(data_dir)
    meta = read_meta_file(d)
    if meta is None:
        raise StokerError(
            f"{d} holds no prepared token shards ({META_FILE} missing); run "
            "`stoker prepare RECIPE` first"
        )
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise _fail(
            d,
            f"{META_FILE} is not stoker shard metadata version {VERSION} "
            f"(format={meta.get('format')!r}, version={meta.get('version')!r})",
        )
    missing = [k for k in ("vocab_size", "dtype", "splits", "tokenizer_dir") if k not in meta]
    if missing:
        raise _fail(d, f"{META_FILE} lacks {', '.join(missing)}")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in DTYPES:
        raise _fail(d, f"{META_FILE} has unknown dtype {meta['dtype']!r}")
    if not _is_count(meta["vocab_size"]) or not isinstance(meta["splits"], dict):
        raise _fail(d, f"{META_FILE} has a malformed vocab_size or splits")
    if meta["vocab_size"] > LIMITS[meta["dtype"]]:
        raise _fail(d, f"vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']}")
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for split in SPLITS:
        _check_split(d, meta, split, itemsize)
    if not isinstance(meta["tokenizer_dir"], str) or not (d / meta["tokenizer_dir"]).is_dir():
        raise _fail(d, f"tokenizer dir {meta['tokenizer_dir']!r} is missing")
    _check_contents(d, meta)
    return meta


def check_vocab(meta: dict[str, Any], model_vocab_size: int) -> None:
    """StokerError when token ids in the shards could reach past the model's embedding."""
    need = int(meta["vocab_size"])
    if model_vocab_size < need:
        padded = -(-need // 64) * 64
        raise StokerError(
            f"model.vocab_size={model_vocab_size} is smaller than the vocabulary "
            f"of the token shards ({need}); set model.vocab_size to at least "
            f"{need} (e.g. {padded})"
        )


def open_split(data_dir: str | Path, meta: dict[str, Any], split: str) -> list[np.memmap]:
    """Read-only memory maps of a split's non-empty shards, in order."""
    if split not in meta["splits"]:
        raise StokerError(f"no split {split!r} in {data_dir} (have: {', '.join(meta['splits'])})")
    dtype = DTYPES[meta["dtype"]]
    return [
        np.memmap(
            Path(data_dir) / s["file"],
            dtype=np.dtype(dtype).newbyteorder("<"),
            mode="r",
            shape=(int(s["tokens"]),),
        )
        for s in meta["splits"][split]["shards"]
        if int(s["tokens"]) > 0
    ]
