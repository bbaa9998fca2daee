"""DYNAMO's features and batches: every task's examples as token features, collated into mixed
batches that one encoder pass serves, in an order that is a pure function of (seed, step).

A feature (dict) has input_ids, token_type_ids, task (adapter index), source_len (tokens the
router and pooled heads read; all of them for classify/qa), length, and its labels: `label`
(classify), `start`/`end` (qa; 0 = the [CLS] position when the answer is outside the window),
`labels` (seq2seq: next-token targets, -100 off the target). `collate` pads to the longest and
builds the attention mask per row: bidirectional over the real tokens, or UniLM's
sequence-to-sequence mask (tasks/dynamo/seq2seq.py) for seq2seq rows.

`MixedBatches.batch(step, rank, world, micro, n_micro)`: the global batch of `step` draws each
row's task with probability ∝ n_t^(1/T) (temperature sampling over the tasks' training sizes,
as multilingual/multi-task training does; T = 1: proportional, T → ∞: uniform) and an example
of that task uniformly, both from the counter-based stream of (seed, step, row); one task alone
walks a fresh permutation per epoch. Phase 3's per-example choice between oracle and learned
gates is drawn from the same stream (`oracle`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stoker.data.rng import hash_keys, micro_slice, name_key, uniform_ints
from stoker.data.sft_sources import permutation
from stoker.errors import StokerError
from stoker.models.dynamo import IGNORE
from stoker.tasks.dynamo.seq2seq import padding_mask, seq2seq_mask


def classify_features(tokenizer, records: list[dict], task: int, max_length: int) -> list[dict]:
    """`[CLS] text [SEP]` truncated to `max_length`, label = record["label"]."""
    feats = []
    for r in records:
        ids = tokenizer.tok.encode(r["text"], add_special_tokens=False).ids[: max_length - 2]
        ids = [tokenizer.cls_id, *ids, tokenizer.sep_id]
        feats.append({"input_ids": ids, "token_type_ids": [0] * len(ids), "task": task,
                      "source_len": len(ids), "length": len(ids), "label": int(r["label"])})  # fmt: skip
    return feats


def collate(features: list[dict], pad_id: int) -> dict[str, Any]:
    """Padded tensors of a mixed batch (module docstring); `rows` keeps the features."""
    B, T = len(features), max(f["length"] for f in features)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    types = torch.zeros(B, T, dtype=torch.long)
    second = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    scalar = {k: torch.full((B,), IGNORE, dtype=torch.long) for k in ("label", "start", "end")}
    task = torch.tensor([f["task"] for f in features])
    source_len = torch.tensor([f["source_len"] for f in features])
    length = torch.tensor([f["length"] for f in features])
    seq2seq = torch.tensor(["labels" in f for f in features])
    for i, f in enumerate(features):
        n = f["length"]
        ids[i, :n] = torch.tensor(f["input_ids"])
        types[i, :n] = torch.tensor(f["token_type_ids"])
        if "offsets" in f:  # a QA window: its context tokens are the second segment
            second[i, :n] = torch.tensor([o is not None for o in f["offsets"]])
        if "labels" in f:
            labels[i, :n] = torch.tensor(f["labels"])
        for k in scalar:
            if k in f:
                scalar[k][i] = f[k]
    mask = torch.where(
        seq2seq[:, None, None], seq2seq_mask(source_len, length, T), padding_mask(length, T)
    )  # (B, T, T)
    source_mask = torch.arange(T)[None] < source_len[:, None]  # (B, T)
    return {"input_ids": ids, "token_type_ids": types, "mask": mask, "source_mask": source_mask,
            "second_mask": second, "task": task, "labels": labels, "length": length, **scalar}  # fmt: skip


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class MixedBatches:
    """Training batches over one or several tasks' features (module docstring)."""

    def __init__(
        self,
        features: dict[int, list[dict]],
        batch_size: int,
        seed: int,
        pad_id: int,
        temperature: float = 1.0,
        oracle: tuple[float, float, int] | None = None,
    ):
        """`features`: adapter index -> that task's training features. `oracle`: (share at
        step 0, share at the last step, steps) of rows run with oracle gates (phase 3)."""
        empty = [k for k, f in features.items() if not f]
        if empty:
            raise StokerError(f"task(s) {empty} have no training examples")
        self.features, self.batch_size, self.seed, self.pad_id = features, batch_size, seed, pad_id
        self.tasks = sorted(features)
        sizes = np.array([len(features[k]) for k in self.tasks], dtype=np.float64)
        p = sizes ** (1.0 / temperature)
        self.cum = np.cumsum(p / p.sum())
        self.oracle = oracle
        self.next_step = 0

    def probabilities(self) -> dict[int, float]:
        return dict(zip(self.tasks, np.diff(np.concatenate([[0.0], self.cum])), strict=True))

    def global_rows(self, step: int) -> list[tuple[int, int]]:
        """(task, example index) of every row of the global batch of `step`."""
        B = self.batch_size
        rows = np.arange(B, dtype=np.int64)
        if len(self.tasks) == 1:  # a fresh permutation per epoch
            k, n = self.tasks[0], len(self.features[self.tasks[0]])
            g = step * B + rows
            out = []
            for epoch in np.unique(g // n):
                perm = permutation(hash_keys(self.seed, name_key("epoch"), int(epoch)), n)
                out += [(k, int(perm[i % n])) for i in g[g // n == epoch]]
            return out
        base = hash_keys(self.seed, name_key("mixed"), step)
        u = uniform_ints(base, rows, 2**31) / 2**31
        which = np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.tasks) - 1)
        out = []
        for r, w in zip(rows, which, strict=True):
            k = self.tasks[int(w)]
            pick = uniform_ints(base, np.array([B + r]), len(self.features[k]))[0]
            out.append((k, int(pick)))
        return out

    def oracle_rows(self, step: int) -> torch.Tensor:
        """(B,) bool: rows of `step`'s global batch that run with oracle gates."""
        start, end, steps = self.oracle or (0.0, 0.0, 1)
        share = start + (end - start) * min(1.0, step / max(1, steps - 1))
        base = hash_keys(self.seed, name_key("oracle"), step)
        u = uniform_ints(base, np.arange(self.batch_size), 2**31) / 2**31
        return torch.from_numpy(u < share)

    def batch(
        self, step: int, rank: int = 0, world: int = 1, micro: int = 0, n_micro: int = 1
    ) -> dict[str, Any]:
        part = micro_slice(self.batch_size, rank, world, micro, n_micro)
        rows = self.global_rows(step)[part]
        self.next_step = step + 1
        b = collate([self.features[k][i] for k, i in rows], self.pad_id)
        b["oracle"] = self.oracle_rows(step)[part]
        b["step"] = torch.tensor(step)
        return b

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "next_step": self.next_step, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.next_step = int(state["seed"]), int(state["next_step"])


def eval_batches(features: list[dict], batch_size: int, pad_id: int):
    """Fixed-order batches of `features` (the last may be smaller)."""
    for i in range(0, len(features), batch_size):
        yield collate(features[i : i + batch_size], pad_id)
