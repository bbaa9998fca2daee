"""Supervised fine-tuning data: samples -> token ids + target masks on disk -> batches.

`prepare_sft(sources, tokenizer, data_dir)` reads the samples (sft_sources.py), renders each
with the tokenizer's chat template (chat_template.py) or, for prompt/response and Alpaca data
without one, the plain Alpaca format (`prompt + response + EOS`), tokenizes the text once with
offset mappings and marks as *targets* the tokens whose characters overlap an assistant span
(its content and end-of-turn token, e.g. SmolLM2's `<|im_end|>`; EOS in the plain format), the
rule transformers' `return_assistant_tokens_mask` uses. Every sample must have a target.
The data dir then holds (JSON metadata, never pickle; `.npy` read with allow_pickle=False):
    meta.json                    format "stoker-sft", fingerprint, vocab_size, eos/pad ids,
                                 sources, per-split counts and every array's SHA-256 (last)
    {split}-tokens.npy           all samples' token ids, concatenated (uint16 | uint32)
    {split}-targets.npy          1 where the token is a target (predicted, trained on)
    {split}-offsets.npy          (samples + 1,) int64: sample i is tokens[off[i]:off[i+1]]
    {split}-origin.npy           (samples, 2) int64: (source index, record number) for errors
    tokenizer/                   every tokenizer-side file of the source (tokenizer.json,
                                 tokenizer_config.json with chat_template and pad/unk tokens,
                                 special_tokens_map.json, chat_template.jinja, ...)
Written into a temp dir and moved into place, meta.json last; a re-run whose fingerprint
(sources' paths/sizes/mtimes, tokenizer files' SHA-256, template, settings) matches is a no-op.

`SFTBatches` makes the batches. Sample i has n_i tokens and gives min(n_i, T+1) - 1 (input,
target) pairs, truncated on the right to T = seq_len; each must keep ≥ 1 target. Modes:
  pad     one sample per row, padded to T (the baseline);
  bucket  one sample per row, rows of similar length batched together (sft_sources.bucket_rows)
          padded to the micro-batch's longest row rounded up to `pad_multiple`;
  pack    several whole samples per row of T positions (best-fit decreasing,
          sft_sources.pack_rows). `doc_ids` numbers the samples of a row (0, 1, ...; -1
          on padding) and `position_ids` restart at 0 in each, so a model can attend only
          within a sample (`document_causal_mask`) and reset its positions; the last token of
          a sample never targets the next sample's first.
Our decoders (models/gpt.py) need, for pack: `Decoder.embed(input_ids, position_ids)` (both
GPT-2's learned positions and RoPE tables already take (B, T) positions) and an attention mask
instead of `is_causal=True`: SDPA with `attn_mask=document_causal_mask(doc_ids)` (B, 1, T, T),
or flex_attention with a document block mask (keeps the fused kernels on GPU), or varlen
flash attention from the doc boundaries. pad and bucket need nothing: padding is on the right,
so causal attention never lets a real token see it, and its labels are ignored.

Order: epoch e's rows are a pure function of (seed, split, e) (counter-based hashing, rng.py);
the epochs' rows form one stream and step s's global batch is rows [s·B, (s+1)·B). Rank k of W
with micro-step m of M takes rows [(k·M + m)·b, (k·M + m + 1)·b), b = B/(W·M), as in
`TokenWindows.batch`, so the global batch, resume and any world size give the same batches.
The loss of step s is Σ cross-entropy over labels != -100 / `global_targets` (the whole step's
count, the same on every rank): per micro-batch `sum_CE / global_targets`, times W under DDP's
gradient averaging.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from stoker.data.chat_template import (
    load_chat_template,
    resolve_template,
    save_tokenizer_dir,
    special_token_variables,
    tokenizer_dir,
    tokenizer_files,
)
from stoker.data.prepare import (
    check_writable_dir,
    publish_data_dir,
    remove_stale_staging,
    split_mask,
)
from stoker.data.rng import hash_keys, micro_slice, name_key
from stoker.data.sft_sources import (
    SFTSource,
    bucket_rows,
    iter_samples,
    pack_rows,
    permutation,
    resolve_sft_sources,
    tokenize_samples,
)
from stoker.data.shards import (
    DTYPES,
    META_FILE,
    TOKENIZER_DIR,
    WRITE_FIX,
    choose_dtype,
    read_meta_file,
)
from stoker.data.tokenizer import load_tokenizer_from
from stoker.errors import StokerError, file_error, file_errors

FORMAT, VERSION = "stoker-sft", 1
ARRAYS = ("tokens", "targets", "offsets", "origin")
SPLITS = ("train", "val")
MODES = ("pack", "bucket", "pad")
IGNORE = -100  # label of a position that is not trained on
REPREPARE = "delete the directory and run prepare_sft again"


# ------------------------------------------------------------------------------ prepare
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with file_errors(path, "cannot read", "check the file's permissions"), open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sft_fingerprint(
    srcs: list[SFTSource], tokenizer: str | Path, template: str | None, settings: dict[str, Any]
) -> str:
    """SHA-256 over the sources' paths/sizes/mtimes, the tokenizer files' SHA-256, the
    template text and the settings."""
    inputs = {"format": FORMAT, "version": VERSION, "sources": [s.describe() for s in srcs]}
    inputs["tokenizer"] = [[f.name, _sha256(f)] for f in tokenizer_files(tokenizer)]
    inputs |= {"template": template, **settings}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _write_arrays(tmp: Path, split: str, pieces: list, origin: list, dtype: str) -> dict:
    """One split's (ids, target mask) pieces and (source, record) origins as .npy arrays."""
    lens = np.array([len(ids) for ids, _ in pieces], dtype=np.int64)
    arrays = {
        "tokens": np.concatenate([np.zeros(0), *(i for i, _ in pieces)]),
        "targets": np.concatenate([np.zeros(0), *(m for _, m in pieces)]),
        "offsets": np.concatenate([[0], np.cumsum(lens)]),
        "origin": np.asarray(origin).reshape(-1, 2),
    }
    types = {"tokens": DTYPES[dtype], "targets": np.uint8}
    files = {}
    for name, arr in arrays.items():
        path, arr = tmp / f"{split}-{name}.npy", arr.astype(types.get(name, np.int64))
        with file_errors(path, "cannot write", WRITE_FIX):
            np.save(path, arr, allow_pickle=False)
        files[name] = {"file": path.name, "shape": list(arr.shape), "sha256": _sha256(path)}
    targets = int(arrays["targets"].sum())
    return {"samples": len(pieces), "tokens": int(lens.sum()), "targets": targets, "files": files}


def _write_data_dir(
    data_dir: Path,
    meta: dict[str, Any],
    kept: dict,
    origin: dict,
    save_tokenizer: Callable[[Path], None],
) -> None:
    """Tokenizer, arrays and meta.json into a temp dir inside `data_dir`, then moved into
    place (meta.json last): an interrupted run leaves the previous data or nothing."""
    tmp = data_dir / f".prepare-{os.getpid()}"
    with file_errors(tmp, "cannot create the temporary directory", WRITE_FIX):
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        with file_errors(tmp / TOKENIZER_DIR, "cannot save the tokenizer", WRITE_FIX):
            save_tokenizer(tmp / TOKENIZER_DIR)
        splits = {s: _write_arrays(tmp, s, kept[s], origin[s], meta["dtype"]) for s in SPLITS}
        meta = {**meta, "splits": splits, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with file_errors(tmp / META_FILE, "cannot write", WRITE_FIX):
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        with file_errors(data_dir, "cannot move the new SFT data into place", WRITE_FIX):
            publish_data_dir(tmp, data_dir, lambda name: False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_sft(
    sources: list[str],
    tokenizer: str | Path,
    data_dir: str | Path,
    *,
    template: str = "auto",
    eos_token: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_samples: int | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Tokenize an SFT dataset into `data_dir` (module docstring), or find it up to date;
    the meta.json dict. `sources`: files, dirs, globs or built-in sets (sft_sources.py);
    `tokenizer`: any path `load_tokenizer_from` takes; `template`: "auto" (the tokenizer's
    chat template, else the plain format), "plain", or a Jinja file. Run on rank 0 only."""
    data_dir, tok_dir = Path(data_dir), tokenizer_dir(tokenizer)
    tok = load_tokenizer_from(tokenizer, eos_token)
    if tok.tok is None or tok.eos_id is None:
        raise StokerError(
            f"SFT needs a tokenizer.json tokenizer with an EOS token ({tokenizer})"
            "; convert it, or set eos_token to one of its special tokens"
        )
    srcs = resolve_sft_sources(list(sources))
    found = resolve_template(template, tok_dir)
    settings = {"eos_token": eos_token, "val_fraction": val_fraction, "seed": seed}
    settings |= {"max_samples": max_samples, "dtype": dtype, "template_option": template}
    fp = sft_fingerprint(srcs, tokenizer, found and found[0], settings)
    remove_stale_staging(data_dir)
    old = read_meta_file(data_dir)
    if old is not None and old.get("fingerprint") == fp:
        return load_sft_meta(data_dir)
    check_writable_dir(data_dir)
    chat = load_chat_template(tok_dir, found) if found else None
    n = sum(1 for _ in iter_samples(srcs, max_samples))  # validates every record first
    if n == 0:
        raise StokerError(f"SFT sources {list(sources)} hold no samples")
    is_val = split_mask(n, val_fraction, seed)
    kept, origin = tokenize_samples(srcs, max_samples, is_val, tok, chat, tok_dir)
    id_dtype = choose_dtype(tok.vocab_size, dtype)
    pad = special_token_variables(tok_dir).get("pad_token")
    pad_id = tok.token_to_id(pad) if pad else None
    meta = {**settings, "format": FORMAT, "version": VERSION, "fingerprint": fp}
    meta |= {"dtype": id_dtype, "sources": [[s.name, s.kind] for s in srcs]}
    meta |= {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "eos_token": tok.eos_token}
    meta |= {"bos_id": tok.bos_id, "pad_id": tok.eos_id if pad_id is None else pad_id}
    meta |= {"tokenizer_dir": TOKENIZER_DIR, "template": chat.origin if chat else "plain"}
    given = found[0] if found and template not in ("auto", "plain") else None
    _write_data_dir(
        data_dir, meta, kept, origin, lambda d: save_tokenizer_dir(tok, tok_dir, d, given)
    )
    return load_sft_meta(data_dir)


def load_sft_meta(data_dir: str | Path) -> dict[str, Any]:
    """The validated meta.json of a prepared SFT dir: every array present with its recorded
    SHA-256 and shape, ids below vocab_size, offsets consistent; else a one-line StokerError."""
    d = Path(data_dir)
    meta = read_meta_file(d)
    if meta is None:
        raise StokerError(
            f"{d} holds no prepared SFT data ({META_FILE} missing); run prepare_sft first"
        )
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        got = f"format={meta.get('format')!r}, version={meta.get('version')!r}"
        raise file_error(d, f"{META_FILE} is not stoker SFT metadata v{VERSION}", REPREPARE, got)
    for split in SPLITS:
        a = open_sft_split(d, meta, split)
        off, n = a["offsets"], len(a["tokens"])
        if (
            off[-1] != n
            or len(a["targets"]) != n
            or len(a["origin"]) != len(off) - 1
            or (np.any(np.diff(off) < 0))
        ):
            raise file_error(d, f"the {split} arrays disagree on sample bounds", REPREPARE)
        if n and int(a["tokens"].max()) >= int(meta["vocab_size"]):
            raise file_error(d, f"{split} holds a token id ≥ vocab_size", REPREPARE)
    return meta


def open_sft_split(
    data_dir: Path, meta: dict[str, Any], split: str, verify: bool = True
) -> dict[str, np.ndarray]:
    """Memory maps of one split's arrays (checked against meta.json when `verify`)."""
    out = {}
    for name in ARRAYS:
        entry = meta["splits"][split]["files"][name]
        path = Path(data_dir) / entry["file"]
        if verify and (not path.is_file() or _sha256(path) != entry["sha256"]):
            raise file_error(path, "is missing or changed since prepare_sft wrote it", REPREPARE)
        with file_errors(path, "is not a readable .npy array", REPREPARE):
            out[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        if list(out[name].shape) != entry["shape"]:
            raise file_error(
                path, f"has shape {list(out[name].shape)}, not {entry['shape']}", REPREPARE
            )
    return out


# ------------------------------------------------------------------------------ batches
class SFTBatch(NamedTuple):
    """One micro-batch. Tensors are (b, T) int64; `labels[t]` is the target of `input_ids[t]`
    (already shifted; IGNORE where not trained)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor  # restarts at 0 in every sample
    doc_ids: torch.Tensor  # sample number inside the row, -1 on padding
    n_targets: int  # labels != IGNORE in this micro-batch
    global_targets: int  # ... in the whole global batch of the step (every rank, micro-step)
    n_tokens: int  # non-padding positions in this micro-batch


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend key j: same document and j ≤ i (an
    SDPA `attn_mask`). Padding (-1) attends to itself, so no query row is empty."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)


class SFTBatches:
    """Batches of one split of a prepared SFT dir: modes, order and rank split in the module
    docstring. `batch(step, ...)` is a pure function of (seed, split, step)."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        batch_size: int,
        seed: int,
        mode: str = "pack",
        pad_multiple: int = 8,
        skip_too_long: bool = False,
    ):
        """`skip_too_long`: leave out the samples that keep no target after truncation to
        `seq_len` (`skipped` counts them) instead of refusing the data."""
        if mode not in MODES:
            raise StokerError(f"SFT batching mode {mode!r} is unknown; use {' | '.join(MODES)}")
        if min(seq_len, batch_size, pad_multiple) <= 0:
            raise StokerError("SFT seq_len, batch_size and pad_multiple must be positive")
        self.data_dir, self.split, self.mode = Path(data_dir), split, mode
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.pad_multiple, self.skip_too_long = pad_multiple, skip_too_long
        self.meta = load_sft_meta(self.data_dir)
        self.pad_id = int(self.meta["pad_id"])
        self._open()
        self._layouts: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}
        self._starts = [0]  # global row index where each epoch begins
        self.next_step = 0

    def _open(self) -> None:
        arrays = open_sft_split(self.data_dir, self.meta, self.split, verify=False)
        self.tokens, self.targets = arrays["tokens"], arrays["targets"]
        self.offsets = np.asarray(arrays["offsets"])
        n = len(self.offsets) - 1
        if n == 0:
            raise StokerError(
                f"the {self.split} split of {self.data_dir} has no samples; "
                "prepare more data or a larger val_fraction"
            )
        kept = np.minimum(np.diff(self.offsets), self.seq_len + 1)  # tokens after truncation
        self.lengths = kept - 1  # (input, target) positions of each sample
        cum = np.concatenate([[0], np.cumsum(self.targets, dtype=np.int64)])
        self.sample_targets = cum[self.offsets[:-1] + kept] - cum[self.offsets[:-1] + 1]
        empty = np.flatnonzero(self.sample_targets == 0)
        self.samples = np.flatnonzero(self.sample_targets > 0)  # the ones batches use
        self.skipped = int(empty.size)
        if empty.size and (not self.skip_too_long or not self.samples.size):
            self._fail_truncated(int(empty[0]), np.asarray(arrays["origin"][empty[0]]))

    def _fail_truncated(self, i: int, origin: np.ndarray) -> None:
        name, kind = self.meta["sources"][int(origin[0])]
        where = SFTSource(name, kind, None if kind == "builtin" else Path(name)).where(
            int(origin[1])
        )
        first = int(np.flatnonzero(self.targets[self.offsets[i] + 1 : self.offsets[i + 1]])[0])
        raise file_error(
            where,
            f"keeps no target token after truncation to seq_len="
            f"{self.seq_len} (its first is at position {first + 1})",
            f"use seq_len ≥ {first + 1}, or shorten the prompt",
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for DataLoader workers without the memory maps (reopened on arrival)."""
        state = self.__dict__.copy()
        state["tokens"] = state["targets"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        arrays = open_sft_split(self.data_dir, self.meta, self.split, verify=False)
        self.tokens, self.targets = arrays["tokens"], arrays["targets"]

    def epoch_rows(self, epoch: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, row pointers) of `epoch`'s rows; None: the unshuffled eval layout."""
        if epoch not in self._layouts:
            n = len(self.samples)
            base = None if epoch is None else hash_keys(self.seed, name_key(self.split), epoch)
            order = self.samples if base is None else self.samples[permutation(base, n)]
            ptr = np.arange(n + 1, dtype=np.int64)
            if self.mode == "bucket":
                order = bucket_rows(order, self.lengths, self.batch_size, base)
            elif self.mode == "pack":
                order, ptr = pack_rows(order, self.lengths, self.seq_len, base)
            if len(self._layouts) >= 3:
                self._layouts.pop(next(k for k in self._layouts if k is not None), None)
            self._layouts[epoch] = (order, ptr)
        return self._layouts[epoch]

    def _rows_in(self, epoch: int) -> int:
        return len(self.samples) if self.mode != "pack" else len(self.epoch_rows(epoch)[1]) - 1

    def global_rows(self, step: int) -> list[np.ndarray]:
        """The sample ids of every row of the global batch of `step`."""
        rows = []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            while self._starts[-1] <= g:
                self._starts.append(self._starts[-1] + self._rows_in(len(self._starts) - 1))
            epoch = bisect.bisect_right(self._starts, g) - 1
            flat, ptr = self.epoch_rows(epoch)
            r = g - self._starts[epoch]
            rows.append(flat[ptr[r] : ptr[r + 1]])
        return rows

    def batch(
        self, step: int, rank: int = 0, world: int = 1, micro: int = 0, n_micro: int = 1
    ) -> SFTBatch:
        """This rank's micro-slice of the global batch of `step` (b = B / (world·n_micro) rows)."""
        part = micro_slice(self.batch_size, rank, world, micro, n_micro)
        rows = self.global_rows(step)
        self.next_step = step + 1
        total = int(sum(self.sample_targets[r].sum() for r in rows))
        return self._assemble(rows[part], total)

    def eval_batches(
        self, n: int | None = None, rank: int = 0, world: int = 1
    ) -> Iterator[SFTBatch]:
        """The split's rows in a fixed, unshuffled layout, `batch_size` rows a batch (the last
        filled with empty rows), at most `n` batches; this rank's share when world > 1."""
        if self.batch_size % world:
            raise StokerError(
                f"eval batch size {self.batch_size} is not divisible by {world} processes"
            )
        flat, ptr = self.epoch_rows(None)
        rows = [flat[ptr[r] : ptr[r + 1]] for r in range(len(ptr) - 1)]
        B, per = self.batch_size, self.batch_size // world
        total = -(-len(rows) // B) if n is None else min(n, -(-len(rows) // B))
        for i in range(total):
            batch = rows[i * B : (i + 1) * B]
            batch += [np.zeros(0, dtype=np.int64)] * (B - len(batch))
            count = int(sum(self.sample_targets[r].sum() for r in batch))
            yield self._assemble(batch[rank * per : (rank + 1) * per], count)

    def _assemble(self, rows: list[np.ndarray], global_targets: int) -> SFTBatch:
        T = self.seq_len
        if self.mode == "bucket":
            longest = max((int(self.lengths[r].sum()) for r in rows), default=1)
            T = min(T, -(-max(longest, 1) // self.pad_multiple) * self.pad_multiple)
        shape = (len(rows), T)
        inputs = np.full(shape, self.pad_id, dtype=np.int64)
        labels = np.full(shape, IGNORE, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        docs = np.full(shape, -1, dtype=np.int64)
        for i, row in enumerate(rows):
            t = 0
            for d, s in enumerate(row.tolist()):
                off, L = int(self.offsets[s]), int(self.lengths[s])
                seg = np.asarray(self.tokens[off : off + L + 1], dtype=np.int64)
                trained = np.asarray(self.targets[off + 1 : off + L + 1], dtype=bool)
                inputs[i, t : t + L] = seg[:-1]
                labels[i, t : t + L] = np.where(trained, seg[1:], IGNORE)
                positions[i, t : t + L] = np.arange(L)
                docs[i, t : t + L] = d
                t += L
        return SFTBatch(
            torch.from_numpy(inputs),
            torch.from_numpy(labels),
            torch.from_numpy(positions),
            torch.from_numpy(docs),
            int((labels != IGNORE).sum()),
            global_targets,
            int((docs >= 0).sum()),
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: with (seed, split, mode) the next step fixes every later batch."""
        keys = ("seed", "split", "next_step", "seq_len", "batch_size", "mode")
        return {**{k: getattr(self, k) for k in keys}, "data_fingerprint": self.meta["fingerprint"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved stream (warns when the data or the batch shape changed since)."""
        self.seed, self.next_step = int(state["seed"]), int(state["next_step"])
        self._layouts, self._starts = {}, [0]
        changed = [
            k
            for k in ("split", "seq_len", "batch_size", "mode")
            if state.get(k) not in (None, getattr(self, k))
        ]
        if state.get("data_fingerprint") != self.meta["fingerprint"]:
            changed.append("data (re-prepared)")
        if changed:
            warnings.warn(
                f"SFT loader {', '.join(changed)} changed since the state was saved; "
                "batches will differ from the original run's",
                stacklevel=2,
            )
