"""The multimodal recipe's data in memory: labelled images and clips (the encoders'
pretraining), alignment pairs (phase 1), and their batches.

Files are JSONL with paths relative to the file (sources.py writes the digits task). Every
image must have one size and every clip the configured sample rate (checked, naming the
file); clips are cropped around their loudest second or zero-padded (`fit_length`).

Batches are a pure function of (seed, step): epoch e of a set is a permutation drawn from
(seed, e), and step s's global batch is rows [s·B, (s+1)·B) of the concatenated epochs, split
over ranks and micro-steps by `micro_slice` — so exact resume and world-size independence hold
as for every recipe. A contrastive micro-batch is its own contrast set (its pairs are each
other's negatives).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stoker.data.rng import hash_keys, micro_slice, name_key
from stoker.data.sft_sources import permutation
from stoker.errors import StokerError
from stoker.tasks.multimodal.sources import fit_length, read_image, read_wav

_CACHE: dict[tuple, Any] = {}


def data_path(cfg, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else Path(cfg.data.dir) / p


def read_rows(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """The JSONL rows of `path`, each checked to have `keys`; one-line errors."""
    if not path.is_file():
        raise StokerError(f"multimodal data file not found: {path}; build the digits task with "
                          f"`python scripts/multimodal_data.py {path.parent}`")  # fmt: skip
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StokerError(f"{path} is not readable UTF-8 JSONL ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:80]}); re-create it") from None  # fmt: skip
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise StokerError(f"{path} line {n}: not JSON ({e})") from None
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise StokerError(f"{path} line {n}: no {', '.join(missing)} (each row needs "
                              f"{', '.join(keys)})")  # fmt: skip
        rows.append(row)
    if not rows:
        raise StokerError(f"{path} holds no rows")
    return rows


def load_image(cfg, root: Path, rel: str) -> np.ndarray:
    key = ("image", str(root / rel))
    if key not in _CACHE:
        _CACHE[key] = read_image(root / rel)
    return _CACHE[key]


def load_clip(cfg, root: Path, rel: str) -> np.ndarray:
    """A clip at `data.sample_rate`, cropped/padded to `data.audio_seconds`."""
    key = ("audio", str(root / rel), cfg.data.audio_seconds)
    if key not in _CACHE:
        x, rate = read_wav(root / rel)
        if rate != cfg.data.sample_rate:
            raise StokerError(f"{root / rel}: sampled at {rate} Hz, data.sample_rate is "
                              f"{cfg.data.sample_rate}; resample it or set data.sample_rate")  # fmt: skip
        _CACHE[key] = fit_length(x, round(cfg.data.audio_seconds * rate)).astype(np.float32)
    return _CACHE[key]


def stack(arrays: list[np.ndarray], what: str, paths: list[str]) -> torch.Tensor:
    first = arrays[0].shape
    for a, p in zip(arrays, paths, strict=True):
        if a.shape != first:
            raise StokerError(f"{what} {p} is {a.shape[::-1]} (w×h), {paths[0]} is "
                              f"{first[::-1]}; every {what} must have one size")  # fmt: skip
    return torch.from_numpy(np.stack(arrays))


@dataclass
class Labelled:
    """One modality's labelled items of one split: x (N, ...) and y (N,)."""

    x: torch.Tensor
    y: torch.Tensor


def labelled(cfg, modality: str, split: str) -> Labelled:
    """The `split` items of `data.images` / `data.audio`, as tensors (images (N, 1, H, W))."""
    path = data_path(cfg, cfg.data.images if modality == "image" else cfg.data.audio)
    rows = [r for r in read_rows(path, ("path", "label", "split")) if r["split"] == split]
    if not rows:
        raise StokerError(f"{path}: no {split} rows (the split column says train or test)")
    bad = [r["label"] for r in rows if not (isinstance(r["label"], int)
                                            and 0 <= r["label"] < cfg.data.n_classes)]  # fmt: skip
    if bad:
        raise StokerError(f"{path}: label {bad[0]!r} is not in 0..{cfg.data.n_classes - 1} "
                          "(data.n_classes)")  # fmt: skip
    load = load_image if modality == "image" else load_clip
    items = [load(cfg, path.parent, r["path"]) for r in rows]
    x = stack(items, f"{modality} file", [r["path"] for r in rows])
    x = x[:, None] if modality == "image" else x
    return Labelled(x.float(), torch.tensor([r["label"] for r in rows]))


@dataclass
class Pairs:
    """Aligned items: image (N, 1, H, W), audio (N, S), label (N,) (equal labels = positives)."""

    image: torch.Tensor
    audio: torch.Tensor
    label: torch.Tensor


def pairs(cfg, split: str) -> Pairs:
    path = data_path(cfg, cfg.data.align_train if split == "train" else cfg.data.align_test)
    rows = read_rows(path, ("image", "audio", "label"))
    images = [load_image(cfg, path.parent, r["image"]) for r in rows]
    clips = [load_clip(cfg, path.parent, r["audio"]) for r in rows]
    return Pairs(stack(images, "image file", [r["image"] for r in rows])[:, None].float(),
                 stack(clips, "audio file", [r["audio"] for r in rows]).float(),
                 torch.tensor([int(r["label"]) for r in rows]))  # fmt: skip


class Batches:
    """Training batches over N items (module docstring): `batch` gives the rows' tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int):
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.n = len(next(iter(tensors.values())))
        self.next_step = 0

    def rows(self, step: int) -> np.ndarray:
        g = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        out = np.empty_like(g)
        for epoch in np.unique(g // self.n):
            perm = permutation(hash_keys(self.seed, name_key("epoch"), int(epoch)), self.n)
            sel = g // self.n == epoch
            out[sel] = perm[g[sel] % self.n]
        return out

    def batch(self, step: int, rank: int = 0, world: int = 1, micro: int = 0,
              n_micro: int = 1) -> dict[str, torch.Tensor]:  # fmt: skip
        idx = torch.from_numpy(self.rows(step)[micro_slice(self.batch_size, rank, world, micro,
                                                           n_micro)])  # fmt: skip
        self.next_step = step + 1
        return {k: t[idx] for k, t in self.tensors.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "next_step": self.next_step, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.next_step = int(state["seed"]), int(state["next_step"])
