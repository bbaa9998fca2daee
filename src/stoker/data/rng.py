"""Counter-based randomness: a pure function of integer keys, the same on every machine.

The train/val split and the loader's windows must not depend on numpy's generator streams
(whose algorithms may change between versions) nor on how many processes ask. SplitMix64
(Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014) hashes
a 64-bit counter to a 64-bit value; chaining it over the keys gives one independent stream per
(seed, purpose, step, row).
"""

from __future__ import annotations

import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer of x + golden, elementwise on uint64 (wraps modulo 2^64)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def name_key(name: str) -> int:
    """A stable integer for a string key (e.g. the split name)."""
    return zlib.crc32(name.encode())


def hash_keys(*keys: int) -> np.uint64:
    """One 64-bit value from a sequence of non-negative integers."""
    h = np.zeros(1, dtype=np.uint64)
    for k in keys:
        h = splitmix64(h ^ np.uint64(k % 2**64))
    return h[0]


def uniform_ints(base: np.uint64, counters: np.ndarray, high: int) -> np.ndarray:
    """Integers in [0, high), one per counter, from stream `base` (bias ≤ high / 2^64)."""
    with np.errstate(over="ignore"):
        z = splitmix64(splitmix64(np.asarray(counters, dtype=np.uint64) + base))
    return (z % np.uint64(high)).astype(np.int64)


def micro_slice(batch_size: int, rank: int, world: int, micro: int, n_micro: int) -> slice:
    """Rows of a global batch that rank `rank` takes in micro-step `micro`: b = B / (W·M) rows
    starting at (rank·M + micro)·b, the one split rule every loader uses (so accumulation,
    world size and resume never change which rows a step trains on)."""
    from stoker.errors import StokerError

    parts = world * n_micro
    if batch_size % parts:
        raise StokerError(
            f"global batch size {batch_size} is not divisible by {world} "
            f"processes × {n_micro} micro-steps"
        )
    if not (0 <= rank < world and 0 <= micro < n_micro):
        raise ValueError(f"rank {rank}/{world}, micro-step {micro}/{n_micro} out of range")
    per = batch_size // parts
    first = (rank * n_micro + micro) * per
    return slice(first, first + per)
