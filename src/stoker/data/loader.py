"""Pretraining batches: random windows of T+1 tokens from memory-mapped shards.

The global batch of step s is a pure function of (seed, split, s): row r starts at
`uniform_ints(hash(seed, split, s), r, n_starts)` (rng.py), an index over every position
where a window of T+1 tokens fits inside one shard. No state advances between steps, so
- every rank and micro-step computes the same global batch and takes its own rows: rank k of
  W with micro-step m of M gets rows [(k·M + m)·b, (k·M + m + 1)·b), b = B / (W·M);
- gradient accumulation, DDP and resume reproduce an uninterrupted single-process run
  exactly, and a run may resume on a different number of processes;
- the loader's state is just (seed, split, next step), saved as JSON in checkpoints.
Windows are drawn with replacement and may cross document boundaries (EOS separates them),
as in nanoGPT. `eval_batches` instead spreads windows evenly over the whole split.

`BatchStream` feeds the training loop: the micro-batches of steps [start, end) in order, built
in the loop's process (`num_workers=0`) or by DataLoader worker processes that prefetch
`prefetch_factor` batches each into pinned memory (`pin_memory`) for asynchronous copies to the
GPU. Because each batch is a pure function of its step, workers change only *when* a batch is
built, never *which* batch: losses are identical for every setting. `loader_settings` picks the
settings from the device and the CPU cores (see docs/data.md, "Data loading").
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stoker.data.rng import hash_keys, micro_slice, name_key, uniform_ints
from stoker.data.shards import load_meta, open_split
from stoker.errors import StokerError
from stoker.monitor.system import cpu_cores


class TokenWindows:
    """Windows of `seq_len + 1` tokens from one split of a prepared data dir."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, batch_size: int, seed: int):
        if seq_len <= 0 or batch_size <= 0:
            raise StokerError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
        self.data_dir, self.split = Path(data_dir), split
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.meta = load_meta(self.data_dir)
        self.vocab_size = int(self.meta["vocab_size"])
        self.shards = open_split(self.data_dir, self.meta, split)
        self.tokens = sum(len(s) for s in self.shards)
        # window starts per shard: positions p with p + seq_len + 1 <= len(shard)
        counts = np.array([max(0, len(s) - seq_len) for s in self.shards], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._begins = self._ends - counts
        self.n_starts = int(self._ends[-1]) if counts.size else 0
        if self.n_starts == 0:
            raise StokerError(
                f"the {split} split of {self.data_dir} has {self.tokens} tokens, too few for "
                f"one window of seq_len+1={seq_len + 1} (in one shard); use a shorter "
                "train.seq_len, more data, or a larger data.val_fraction"
            )
        self.next_step = 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for DataLoader workers without the memory maps (reopened on arrival):
        pickling an np.memmap would copy the whole split."""
        state = self.__dict__.copy()
        state["shards"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.shards = open_split(self.data_dir, self.meta, self.split)

    def _rows(self, starts: np.ndarray) -> torch.Tensor:
        """(len(starts), T+1) int64 token windows for global start indices."""
        shard = np.searchsorted(self._ends, starts, side="right")
        offset = starts - self._begins[shard]
        out = np.empty((starts.size, self.seq_len + 1), dtype=np.int64)
        span = np.arange(self.seq_len + 1)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self.shards[k][offset[sel, None] + span]
        return torch.from_numpy(out)

    def global_starts(self, step: int) -> np.ndarray:
        """Window start index of every row of the global batch of `step`."""
        base = hash_keys(self.seed, name_key(self.split), step)
        return uniform_ints(base, np.arange(self.batch_size), self.n_starts)

    def batch(
        self, step: int, rank: int = 0, world: int = 1, micro: int = 0, n_micro: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-slice of the global batch of `step`: (inputs, targets), each
        (batch_size // (world·n_micro), seq_len) int64; targets are inputs shifted by one."""
        part = micro_slice(self.batch_size, rank, world, micro, n_micro)
        rows = self._rows(self.global_starts(step)[part])
        self.next_step = step + 1
        return rows[:, :-1], rows[:, 1:]

    def eval_batches(
        self, n: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`n` fixed global batches (this rank's rows when world > 1) whose windows are spread
        evenly over the split, the same on every call and for every seed."""
        total = n * self.batch_size
        starts = (np.arange(total, dtype=np.float64) * (self.n_starts / total)).astype(np.int64)
        per = self.batch_size // world
        if self.batch_size % world:
            raise StokerError(
                f"eval batch size {self.batch_size} is not divisible by {world} processes"
            )
        for i in range(n):
            batch = starts[i * self.batch_size : (i + 1) * self.batch_size]
            rows = self._rows(batch[rank * per : (rank + 1) * per])
            yield rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: with (seed, split) the next step fixes every later batch."""
        return {
            "seed": self.seed,
            "split": self.split,
            "next_step": self.next_step,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "data_fingerprint": self.meta.get("fingerprint"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved stream: restores seed and next step (warns if the data or the
        batch shape changed since, as the batches then differ from the saved run's)."""
        self.seed, self.next_step = int(state["seed"]), int(state["next_step"])
        if state.get("data_fingerprint") != self.meta.get("fingerprint"):
            warnings.warn(
                f"{self.data_dir} was re-prepared since this loader state was saved; "
                "batches will differ from the original run's",
                stacklevel=2,
            )
        changed = [
            k
            for k in ("split", "seq_len", "batch_size")
            if k in state and state[k] != getattr(self, k)
        ]
        if changed:
            warnings.warn(
                f"loader {', '.join(changed)} changed since the state was saved", stacklevel=2
            )


# ------------------------------------------------------------------------------ streaming
class _MicroBatches(torch.utils.data.Dataset):
    """Item i = micro-batch (i mod n_micro) of step start + i // n_micro, this rank's rows."""

    def __init__(
        self, windows: TokenWindows, start: int, end: int, rank: int, world: int, n_micro: int
    ):
        self.windows, self.start, self.rank, self.world, self.n_micro = (
            windows,
            start,
            rank,
            world,
            n_micro,
        )
        self.n = max(0, end - start) * n_micro

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro = self.start + i // self.n_micro, i % self.n_micro
        return self.windows.batch(step, self.rank, self.world, micro, self.n_micro)


def loader_settings(
    device_type: str,
    num_workers: int | str = "auto",
    pin_memory: bool | str = "auto",
    prefetch_factor: int = 2,
    local_world: int = 1,
) -> dict[str, Any]:
    """Resolved DataLoader settings for `data.num_workers / pin_memory / prefetch_factor`.

    auto: on a GPU, min(4, cores per local process − 1) workers (one core stays with the
    process that launches kernels) and pinned memory, so batch assembly and the host-to-device
    copy overlap the step; on a CPU (or MPS) no workers and no pinning — a batch of random
    windows from memory-mapped shards takes ~1 ms, and a worker would take a core from the
    matmuls that do the training.
    """
    accelerated = device_type == "cuda"
    if num_workers == "auto":
        num_workers = min(4, cpu_cores() // max(1, local_world) - 1) if accelerated else 0
    if pin_memory == "auto":
        pin_memory = accelerated
    num_workers = max(0, int(num_workers))
    return {
        "num_workers": num_workers,
        "pin_memory": bool(pin_memory) and accelerated,
        "prefetch_factor": prefetch_factor if num_workers else None,
    }


class BatchStream:
    """This rank's micro-batches (x, y) of steps [start, end) in order; see the module doc."""

    def __init__(
        self,
        windows: TokenWindows,
        start: int,
        end: int,
        rank: int = 0,
        world: int = 1,
        n_micro: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        self._data = _MicroBatches(windows, start, end, rank, world, n_micro)
        if num_workers == 0 and not pin_memory:
            self._it: Iterator = (self._data[i] for i in range(len(self._data)))
        else:
            self._it = iter(
                torch.utils.data.DataLoader(
                    self._data,
                    batch_size=None,
                    shuffle=False,
                    num_workers=num_workers,
                    pin_memory=pin_memory,
                    prefetch_factor=prefetch_factor if num_workers else None,
                    persistent_workers=False,
                )
            )

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._it)

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers now (they also stop when the stream is garbage collected)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
