"""Token shards on disk: raw little-endian uint16/uint32 files described by `meta.json`.

A prepared data dir (`data.dir`) holds
    meta.json            JSON (never pickle), written last: its presence marks a complete dir
    train-00000.bin ...  the train split's tokens, `shard_tokens` per file (the last shorter)
    val-00000.bin ...    the val split's tokens
    tokenizer/           the tokenizer that made them (Tokenizer.save); the trainer copies it
                         into every checkpoint
Every document is followed by one EOS token, so a shard is `doc EOS doc EOS ...`.

meta.json keys: format ("stoker-shards"), version, vocab_size (1 + the largest token id),
dtype ("uint16" | "uint32"), eos_id, bos_id, tokenizer_dir ("tokenizer"), tokenizer_file
(e.g. "tokenizer/tokenizer.json"), tokenizer_sha256, fingerprint (of sources + tokenizer +
settings; see prepare.py), sources, seed, val_fraction, and
splits.{train,val}.{tokens, documents, shards: [{file, tokens}]}.
`load_meta` checks all of it against the files (sizes = tokens × itemsize).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stoker.errors import StokerError

FORMAT = "stoker-shards"
VERSION = 1
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
LIMITS = {"uint16": 2**16, "uint32": 2**32}


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
    """Appends token arrays to `{split}-00000.bin`, `{split}-00001.bin`, ... in a directory."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int):
        self.dir, self.split, self.dtype = Path(directory), split, DTYPES[dtype]
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.documents = 0
        self._fh = None

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.dir / name, "wb")  # noqa: SIM115 (open across write() calls)
        self.shards.append({"file": name, "tokens": 0})

    def write(self, ids: np.ndarray, documents: int = 0) -> None:
        """Append tokens (already in this writer's dtype); `documents` ended inside them."""
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        self.documents += documents
        while ids.size:
            if self._fh is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            head, ids = ids[:room], ids[room:]
            head.astype(head.dtype.newbyteorder("<"), copy=False).tofile(self._fh)
            self.shards[-1]["tokens"] += int(head.size)
            self.tokens += int(head.size)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def summary(self) -> dict[str, Any]:
        self.close()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def _fail(data_dir: Path, what: str) -> StokerError:
    return StokerError(
        f"{data_dir}: {what}; delete the directory and run `stoker prepare RECIPE` again"
    )


def read_meta_file(data_dir: str | Path) -> dict[str, Any] | None:
    """meta.json as a dict, None when there is none; StokerError when it is not JSON."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _fail(Path(data_dir), f"unreadable {META_FILE} ({e})") from None
    if not isinstance(meta, dict):
        raise _fail(Path(data_dir), f"{META_FILE} is not a JSON object")
    return meta


def _check_split(d: Path, meta: dict[str, Any], split: str, itemsize: int) -> None:
    info = meta["splits"].get(split)
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        raise _fail(d, f"{META_FILE} has no shard list for split {split!r}")
    total = 0
    for shard in info["shards"]:
        path = d / str(shard.get("file"))
        if not path.is_file():
            raise _fail(d, f"shard {path.name} listed in {META_FILE} is missing")
        want, have = int(shard.get("tokens", -1)) * itemsize, path.stat().st_size
        if have != want:
            kind = "truncated" if have < want else "longer than meta.json says"
            raise _fail(
                d,
                f"shard {path.name} is {kind}: {have} bytes, {META_FILE} says "
                f"{want} ({shard.get('tokens')} tokens × {itemsize} bytes)",
            )
        total += int(shard["tokens"])
    if total != info.get("tokens"):
        raise _fail(
            d,
            f"{META_FILE} says split {split!r} has {info.get('tokens')} tokens but "
            f"its shards hold {total}",
        )


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """The validated meta.json of a prepared data dir; StokerError naming any mismatch."""
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
    if meta["dtype"] not in DTYPES:
        raise _fail(d, f"{META_FILE} has unknown dtype {meta['dtype']!r}")
    if int(meta["vocab_size"]) > LIMITS[meta["dtype"]]:
        raise _fail(d, f"vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']}")
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for split in SPLITS:
        _check_split(d, meta, split, itemsize)
    if not (d / meta["tokenizer_dir"]).is_dir():
        raise _fail(d, f"tokenizer dir {meta['tokenizer_dir']!r} is missing")
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
