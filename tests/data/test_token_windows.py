"""TokenWindows: the global batch of a step is a pure function of (seed, split, step), the same
for every world size and micro-batch split; resume continues the same stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stoker.config import load_config
from stoker.data.loader import TokenWindows
from stoker.data.prepare import prepare
from stoker.errors import StokerError

T, B = 16, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Real stdlib source, several shards per split (windows must not cross them)."""
    d = tmp_path_factory.mktemp("windows")
    prepare(
        load_config(
            None,
            [
                "--data.sources=python-stdlib",
                "--data.max_documents=12",
                "--data.tokenizer.vocab_size=300",
                "--data.val_fraction=0.25",
                "--data.shard_tokens=5000",
                f"--data.dir={d}",
            ],
        )
    )
    return d


def global_batch(w: TokenWindows, step: int, world: int, n_micro: int) -> torch.Tensor:
    """Rows of every rank and micro-step, in rank-major order, as (B, T+1)."""
    parts = []
    for rank in range(world):
        for micro in range(n_micro):
            x, y = w.batch(step, rank, world, micro, n_micro)
            assert x.shape == y.shape == (B // (world * n_micro), T)
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets = inputs shifted by one
            parts.append(torch.cat([x, y[:, -1:]], dim=1))
    return torch.cat(parts)


def test_global_batch_is_independent_of_world_size_and_micro_batching(data_dir):
    w = TokenWindows(data_dir, "train", T, B, seed=5)
    for step in (0, 1, 17):
        ref = global_batch(w, step, 1, 1)
        for world, n_micro in ((2, 1), (4, 1), (1, 2), (2, 2), (1, 8), (4, 2)):
            assert torch.equal(global_batch(w, step, world, n_micro), ref)
    assert not torch.equal(global_batch(w, 0, 1, 1), global_batch(w, 1, 1, 1))
    other = TokenWindows(data_dir, "train", T, B, seed=6)
    assert not torch.equal(global_batch(other, 0, 1, 1), global_batch(w, 0, 1, 1))


def test_rows_are_real_windows_inside_one_shard(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    shards = [
        np.fromfile(data_dir / s["file"], dtype=meta["dtype"]).astype(np.int64)
        for s in meta["splits"]["train"]["shards"]
    ]
    assert len(shards) > 2
    w = TokenWindows(data_dir, "train", T, B, seed=0)
    seen = set()
    for step in range(30):
        x, y = w.batch(step)
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            hits = [
                i
                for i, s in enumerate(shards)
                if any(
                    np.array_equal(s[p : p + T + 1], row)
                    for p in np.flatnonzero(s[: len(s) - T] == row[0])
                )
            ]
            assert hits, "a row is not a contiguous window of one shard"
            seen.update(hits)
    assert len(seen) > 1  # windows come from more than one shard


def test_resume_from_state_continues_the_same_batches(data_dir):
    run = TokenWindows(data_dir, "train", T, B, seed=3)
    ref = [run.batch(s)[0] for s in range(10)]
    first = TokenWindows(data_dir, "train", T, B, seed=3)
    for s in range(4):
        first.batch(s)
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, as in checkpoints
    assert state["next_step"] == 4
    resumed = TokenWindows(data_dir, "train", T, B, seed=999)  # seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.next_step == 4
    for s in range(resumed.next_step, 10):
        # on 2 ranks × 2 micro-steps after resuming: the same global batches
        assert torch.equal(
            torch.cat([resumed.batch(s, r, 2, m, 2)[0] for r in range(2) for m in range(2)]), ref[s]
        )


def test_eval_batches_are_fixed_and_cover_the_split(data_dir):
    w = TokenWindows(data_dir, "val", T, B, seed=0)
    a = [x for x, _ in w.eval_batches(3)]
    b = [x for x, _ in TokenWindows(data_dir, "val", T, B, seed=42).eval_batches(3)]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert a[0].shape == (B, T)
    halves = [torch.cat([x for x, _ in w.eval_batches(3, rank=r, world=2)]) for r in range(2)]
    per_rank = torch.stack([x for x in a]).view(3, 2, B // 2, T)
    assert torch.equal(halves[0], per_rank[:, 0].reshape(-1, T))
    assert torch.equal(halves[1], per_rank[:, 1].reshape(-1, T))


def test_indivisible_batch_and_short_split_are_errors(data_dir):
    w = TokenWindows(data_dir, "train", T, 6, seed=0)
    with pytest.raises(StokerError, match="not divisible"):
        w.batch(0, rank=0, world=4)
    with pytest.raises(StokerError, match="too few for one window"):
        TokenWindows(data_dir, "val", 100_000, B, seed=0)


# ------------------------------------------------------------------------------ BatchStream
def test_stream_with_workers_yields_the_same_batches_in_order(data_dir):
    """Worker processes (and prefetching) change when a batch is built, never which one."""
    from stoker.data.loader import BatchStream

    windows = TokenWindows(data_dir, "train", T, B, seed=5)
    expected = [windows.batch(s, 1, 2, m, 2) for s in range(3, 7) for m in range(2)]
    for workers in (0, 2):
        with BatchStream(
            windows,
            3,
            7,
            rank=1,
            world=2,
            n_micro=2,
            num_workers=workers,
            prefetch_factor=2 if workers else None,
        ) as stream:
            got = list(stream)
        assert len(got) == len(expected)
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_pickled_windows_reopen_shards_instead_of_copying_them(data_dir):
    import pickle

    windows = TokenWindows(data_dir, "train", T, B, seed=5)
    blob = pickle.dumps(windows)
    assert len(blob) < windows.tokens  # memory maps are not copied into the pickle
    clone = pickle.loads(blob)
    assert torch.equal(clone.batch(4)[0], windows.batch(4)[0])


def test_loader_settings_auto_and_overrides(monkeypatch):
    from stoker.data import loader

    monkeypatch.setattr(loader, "cpu_cores", lambda: 16)
    assert loader.loader_settings("cpu") == {
        "num_workers": 0,
        "pin_memory": False,
        "prefetch_factor": None,
    }
    assert loader.loader_settings("cuda") == {
        "num_workers": 4,
        "pin_memory": True,
        "prefetch_factor": 2,
    }
    # 8 GPU processes on 16 cores: 2 cores each, one left to the training process
    assert loader.loader_settings("cuda", local_world=8)["num_workers"] == 1
    assert loader.loader_settings("cuda", local_world=16)["num_workers"] == 0
    assert loader.loader_settings("cpu", 3, True, 4) == {
        "num_workers": 3,
        "pin_memory": False,
        "prefetch_factor": 4,
    }
    assert loader.loader_settings("cuda", 0, "auto")["prefetch_factor"] is None
