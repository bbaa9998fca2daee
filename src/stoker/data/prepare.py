"""`stoker prepare RECIPE`: corpus -> tokenizer -> token shards in `data.dir`.

Steps (shards.py describes the output):
1. Resolve `data.sources` to files (corpora.py) and fingerprint the inputs: every file's path,
   size and mtime, the tokenizer files' SHA-256 (or the BPE training settings) and the data
   settings. When `data.dir/meta.json` carries the same fingerprint and its shards check out,
   nothing is done; any change re-prepares.
2. Count the documents and split them by document: the `round(val_fraction · n)` documents
   with the smallest hash of (seed, index) go to `val` (at least one when there are two or
   more documents and val_fraction > 0), the rest to `train`.
3. Load the tokenizer (`data.tokenizer.path`) or train a byte-level BPE on the train split.
4. Tokenize in batches on all cores (the `tokenizers` / sentencepiece thread pools), append
   one EOS after every document, write uint16 shards when the vocabulary fits, else uint32.
Everything is written into a temporary directory inside `data.dir` and moved into place with
`meta.json` last, so an interrupted run leaves the previous data (or nothing) but never a
half-written dir that looks complete. Call it on one process (rank 0) and let others wait.
Before any of the work, `check_writable_dir` makes sure `data.dir` is a directory this process
can write (an up-to-date one is only read, so it may be read-only); a write that still fails
(ENOSPC, EROFS, EACCES) is one StokerError naming the file, and the previous data stays.
Shards are hashed as they are written (meta.json records each SHA-256) and read back once at
the end, through `load_meta`, which checks them and leaves verified.json (checksums.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stoker.config import DataConfig, RecipeConfig, load_config
from stoker.data.chat_template import save_tokenizer_dir, tokenizer_dir
from stoker.data.checksums import STAMP_FILE
from stoker.data.corpora import SourceFile, describe_files, iter_documents, resolve_sources
from stoker.data.rng import splitmix64
from stoker.data.shards import (
    DTYPES,
    FORMAT,
    META_FILE,
    SPLITS,
    TOKENIZER_DIR,
    VERSION,
    WRITE_FIX,
    ShardWriter,
    choose_dtype,
    load_meta,
    read_meta_file,
)
from stoker.data.tokenizer import (
    HF_EXTRA_FILES,
    TOKENIZER_FILES,
    Tokenizer,
    load_tokenizer_from,
    train_bpe,
)
from stoker.errors import StokerError, file_error, file_errors

BATCH_DOCS = 1024  # documents per encode_batch call ...
BATCH_CHARS = 1_000_000  # ... or fewer when they are long
SHARD_NAME = re.compile(r"^(train|val)-\d{5}\.bin$")
# + original GPT-2 names; the chat template files travel too, so they count
TOKENIZER_NAMES = {*TOKENIZER_FILES, *HF_EXTRA_FILES, "encoder.json", "vocab.bpe"}


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def log(msg: str) -> None:
    if is_main_process():
        print(f"prepare: {msg}", flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with file_errors(path, "cannot read", "check the file's permissions"), open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable_dir(data_dir: Path) -> None:
    """StokerError unless `data_dir` is, or can be created as, a directory we may write."""
    if data_dir.exists() and not data_dir.is_dir():
        raise StokerError(
            f"data.dir {data_dir} is a file, not a directory; set data.dir to a directory "
            "(it is created when missing)"
        )
    probe = data_dir
    while not probe.exists() and probe != probe.parent:  # nearest existing ancestor
        probe = probe.parent
    if not probe.is_dir():
        raise StokerError(
            f"data.dir {data_dir} cannot be created: {probe} is a file, not a directory; "
            "set data.dir to a path under a directory"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        raise file_error(
            probe,
            "data.dir is not writable, and it is not prepared for these settings",
            "set data.dir to a writable directory (or prepare the data elsewhere and copy the "
            "whole directory here: an up-to-date data.dir is only read)",
            "read-only file system" if read_only else "permission denied",
        )


def _tokenizer_inputs(path: str) -> list[list[str]]:
    """[name, sha256] of the files a tokenizer path may be read from."""
    p = Path(path).expanduser()
    if p.is_file():
        return [[p.name, _sha256(p)]]
    if not p.is_dir():
        return [[str(p), "missing"]]
    dirs = [p, p / TOKENIZER_DIR] if (p / TOKENIZER_DIR).is_dir() else [p]
    return [
        [f"{d.name}/{f.name}", _sha256(f)]
        for d in dirs
        for f in sorted(d.iterdir())
        if f.is_file() and (f.name in TOKENIZER_NAMES or f.suffix in (".tiktoken", ".model"))
    ]


def fingerprint(data: DataConfig, files: list[SourceFile]) -> str:
    """SHA-256 over everything the shards depend on (module docstring, step 1)."""
    tok = data.tokenizer
    tok_inputs: dict[str, Any] = {"eos_token": tok.eos_token, "pattern": tok.pattern}
    if tok.path:
        tok_inputs["files"] = _tokenizer_inputs(tok.path)
    else:
        tok_inputs["train_bpe"] = [tok.vocab_size, tok.special_tokens]
    inputs = {
        "version": VERSION,
        "sources": data.sources,
        "files": describe_files(files),
        "text_field": data.text_field,
        "max_documents": data.max_documents,
        "val_fraction": data.val_fraction,
        "seed": data.seed,
        "dtype": data.dtype,
        "shard_tokens": data.shard_tokens,
        "tokenizer": tok_inputs,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def split_mask(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean per document, True = val (module docstring, step 2)."""
    n_val = round(n_docs * val_fraction)
    if val_fraction > 0 and n_docs >= 2:
        n_val = min(max(n_val, 1), n_docs - 1)
    keys = splitmix64(np.arange(n_docs, dtype=np.uint64) ^ splitmix64(np.uint64(seed)))
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.argsort(keys, kind="stable")[:n_val]] = True
    return mask


def _with_eos(seqs: list[list[int]], eos: int, dtype: type) -> np.ndarray:
    """Concatenate `doc EOS doc EOS ...` into one array."""
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    out = np.empty(int(lens.sum()) + len(seqs), dtype=dtype)
    ends = np.cumsum(lens + 1) - 1
    body = np.ones(out.size, dtype=bool)
    body[ends] = False
    out[body] = np.fromiter((i for s in seqs for i in s), dtype=dtype, count=int(lens.sum()))
    out[ends] = eos
    return out


def _batches(
    files: list[SourceFile], data: DataConfig, mask: np.ndarray
) -> Iterator[tuple[list[str], list[bool], int]]:
    """(texts, is_val per text, documents read so far) in batches for `encode_batch`."""
    batch: list[str] = []
    is_val: list[bool] = []
    chars = 0
    for i, text in enumerate(iter_documents(files, data.text_field, data.max_documents)):
        batch.append(text)
        is_val.append(bool(mask[i]))
        chars += len(text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch, is_val, i + 1
            batch, is_val, chars = [], [], 0
    if batch:
        yield batch, is_val, int(mask.size)


def tokenize_to_shards(
    files: list[SourceFile],
    data: DataConfig,
    tok: Tokenizer,
    mask: np.ndarray,
    out_dir: Path,
    dtype: str,
) -> dict[str, Any]:
    """Write both splits' shards into `out_dir`; the per-split summaries for meta.json.

    Batch k is encoded on a worker thread (the encoders release the GIL and use all cores)
    while this thread reads batch k+1 and writes batch k-1.
    """
    writers = {s: ShardWriter(out_dir, s, dtype, data.shard_tokens) for s in SPLITS}
    np_dtype = DTYPES[dtype]
    bar = tqdm(
        unit="tok", unit_scale=True, desc="tokenize", disable=not is_main_process(), mininterval=0.5
    )

    def write(pending: tuple[Future, list[bool], int]) -> None:
        future, is_val, done = pending
        ids = future.result()
        for split, want in (("train", False), ("val", True)):
            seqs = [x for x, v in zip(ids, is_val, strict=True) if v == want]
            if seqs:
                writers[split].write(_with_eos(seqs, tok.eos_id, np_dtype), len(seqs))
                bar.update(sum(map(len, seqs)) + len(seqs))
        bar.set_postfix_str(f"docs={done}/{mask.size}", refresh=False)

    pending = None
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            for texts, is_val, done in _batches(files, data, mask):
                submitted = (pool.submit(tok.encode_batch, texts), is_val, done)
                if pending is not None:
                    write(pending)
                pending = submitted
            if pending is not None:
                write(pending)
        return {s: w.summary() for s, w in writers.items()}
    finally:  # after a failed write too: no open files, the bar ends its line
        bar.close()
        for w in writers.values():
            with contextlib.suppress(StokerError):
                w.close()


def _get_tokenizer(data: DataConfig, files: list[SourceFile], mask: np.ndarray) -> Tokenizer:
    tc = data.tokenizer
    if tc.path:
        tok = load_tokenizer_from(tc.path, tc.eos_token, tc.pattern)
    else:
        log(
            f"training a byte-level BPE (vocab_size={tc.vocab_size}) on "
            f"{int((~mask).sum())} train documents"
        )
        docs = iter_documents(files, data.text_field, data.max_documents)
        train_docs = (t for i, t in enumerate(docs) if not mask[i])
        tok = train_bpe(
            train_docs,
            tc.vocab_size,
            tc.special_tokens,
            tc.eos_token,
            show_progress=sys.stderr.isatty() and is_main_process(),
        )
    if tok.eos_id is None:
        raise StokerError(
            f"cannot tell which token ends a document in {tc.path}; set "
            "data.tokenizer.eos_token to one of its special tokens"
        )
    return tok


def save_tokenizer(tok: Tokenizer, path: str | None, dst: Path) -> None:
    """`tok` into the data dir's tokenizer/. A tokenizer read from a directory (or from its
    main file) brings every tokenizer-side file of that directory (chat template, pad/unk
    tokens, special_tokens_map.json, ...), as an SFT data dir does, so checkpoints and
    export-hf carry them on; a trained BPE or a lone `.tiktoken`/`.model` file gets its own."""
    src = Path(path).expanduser() if path else None
    if src is None or (src.is_file() and src.name != tok.main_file):
        tok.save(dst)
    else:
        save_tokenizer_dir(tok, tokenizer_dir(src), dst, None)


def publish_data_dir(tmp: Path, data_dir: Path, stale: Callable[[str], bool]) -> None:
    """Replace a prepared dir's contents with those of `tmp`: meta.json goes first (so a crash
    midway leaves an incomplete dir, never a wrong one), then the files `stale(name)` names
    and the tokenizer, then `tmp`'s files move in, meta.json last."""
    (data_dir / META_FILE).unlink(missing_ok=True)
    for f in data_dir.iterdir():
        if f.is_file() and stale(f.name):
            f.unlink()
    shutil.rmtree(data_dir / TOKENIZER_DIR, ignore_errors=True)
    for f in tmp.iterdir():
        if f.name != META_FILE:
            os.replace(f, data_dir / f.name)
    os.replace(tmp / META_FILE, data_dir / META_FILE)


def _build_meta(
    data: DataConfig,
    tok: Tokenizer,
    dtype: str,
    fp: str,
    splits: dict[str, Any],
    files: list[SourceFile],
) -> dict[str, Any]:
    tok_file = f"{TOKENIZER_DIR}/{tok.main_file}"
    return {
        "format": FORMAT,
        "version": VERSION,
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "eos_token": tok.eos_token,
        "tokenizer_dir": TOKENIZER_DIR,
        "tokenizer_file": tok_file,
        "tokenizer_sha256": None,
        "fingerprint": fp,
        "sources": data.sources,
        "source_files": len(files),
        "text_field": data.text_field,
        "max_documents": data.max_documents,
        "seed": data.seed,
        "val_fraction": data.val_fraction,
        "splits": splits,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare(cfg: RecipeConfig, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prepare `cfg.data.dir` (or find it up to date); the meta.json dict. `stats`, if given,
    receives `tokens_per_second` when this call tokenized (for the training loop's advice)."""
    data, data_dir = cfg.data, Path(cfg.data.dir)
    files = resolve_sources(data.sources)
    fp = fingerprint(data, files)
    remove_stale_staging(data_dir)
    old = read_meta_file(data_dir)
    if old is not None and old.get("fingerprint") == fp:
        meta = load_meta(data_dir)
        log(f"{data_dir} is up to date ({_summary(meta)})")
        return meta
    check_writable_dir(data_dir)  # before any of the work
    if data.tokenizer.path is None:  # fail before reading anything
        choose_dtype(data.tokenizer.vocab_size, data.dtype)
    n_docs = sum(1 for _ in iter_documents(files, data.text_field, data.max_documents))
    if n_docs == 0:
        raise StokerError(
            f"data.sources {data.sources} hold no documents ({len(files)} files; "
            "empty and whitespace-only documents are skipped)"
        )
    mask = split_mask(n_docs, data.val_fraction, data.seed)
    tok = _get_tokenizer(data, files, mask)
    dtype = choose_dtype(tok.vocab_size, data.dtype)
    tmp = data_dir / f".prepare-{os.getpid()}"
    with file_errors(tmp, "cannot create the temporary directory", WRITE_FIX):
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        with file_errors(tmp / TOKENIZER_DIR, "cannot save the tokenizer", WRITE_FIX):
            save_tokenizer(tok, data.tokenizer.path, tmp / TOKENIZER_DIR)
        start = time.perf_counter()
        splits = tokenize_to_shards(files, data, tok, mask, tmp, dtype)
        seconds = time.perf_counter() - start
        meta = _build_meta(data, tok, dtype, fp, splits, files)
        meta["tokenizer_sha256"] = _sha256(tmp / meta["tokenizer_file"])
        meta["tokenize_seconds"] = round(seconds, 3)
        with file_errors(tmp / META_FILE, "cannot write", WRITE_FIX):
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        with file_errors(data_dir, "cannot move the new shards into place", WRITE_FIX):
            publish_data_dir(tmp, data_dir, lambda n: n == STAMP_FILE or bool(SHARD_NAME.match(n)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Read back once here (rank 0, while other ranks wait) so they find verified.json rather
    # than each reading every shard; it also proves the bytes reached the disk intact.
    meta = load_meta(data_dir)
    total = sum(s["tokens"] for s in splits.values())
    log(f"wrote {data_dir}: {_summary(meta)}; {total / max(seconds, 1e-9):,.0f} tokens/s")
    if stats is not None:
        stats["tokens_per_second"] = total / max(seconds, 1e-9)
    return meta


def remove_stale_staging(data_dir: Path) -> None:
    """Delete `.prepare-PID` dirs of prepares that died (their PID is gone from this host);
    a live one (another prepare running now) is left alone."""
    if not data_dir.is_dir():
        return
    for p in data_dir.glob(".prepare-*"):
        pid = p.name.removeprefix(".prepare-")
        if not pid.isdecimal() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass


def _summary(meta: dict[str, Any]) -> str:
    parts = [
        f"{s} {v['tokens']:,} tokens / {v['documents']:,} docs" for s, v in meta["splits"].items()
    ]
    return ", ".join(parts) + f", vocab {meta['vocab_size']:,} ({meta['dtype']})"


def prepare_command(args: Any) -> int:
    """CLI entry: `stoker prepare RECIPE [--data.key=value ...]`."""
    cfg = load_config(args.recipe, getattr(args, "overrides", None))
    prepare(cfg)
    return 0
