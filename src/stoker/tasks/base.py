"""The seam between the one training loop (train/loop.py) and a recipe: a `Task`.

The loop knows steps, micro-batches, precision, clipping, schedules, logging, eval cadence,
checkpoints and distribution. A task knows the rest, and only that:

- its data: `prepare` (rank 0, once: tokenize into the data dir), `open_data` (every rank), and
  `train_data`, whose `batch(step, rank, world, micro, n_micro)` is a pure function of
  (seed, step), so exact resume and world-size independence hold for every recipe;
- its model: `build_model` (built or loaded; frozen parts frozen and in eval mode),
  `param_groups` (what trains, each group with its own weight decay and LR multiplier);
- its loss: `loss(model, batch)` gives (Σ loss over the batch's supervised targets, auxiliary
  loss or None) and `count(batch)` the number of those targets. The loop divides every sum by
  the count of the whole step — all micro-batches on all ranks — so a step's loss is the mean
  over its targets however they fall into micro-batches (torchtitan does the same); the mean
  of per-micro-batch means is that only when every micro-batch holds as many targets;
- its evaluation: `evaluate` returns named metrics; `metrics` says which way each improves,
  so early stopping can watch any of them;
- its checkpoint: `checkpoint_meta` (e.g. the frozen base's path and content hash) and whether
  the checkpoint holds every tensor or the trainable ones only (train/checkpoint.py
  `save_trainable_only`); `load_trained` rebuilds a trained model for eval, generate, export.

Phases of a multi-phase recipe are stages (`stages`): runs of the loop one after another, each
in its own directory, each resumable, skipped when done with the same inputs (train/stages.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from stoker.config import RecipeConfig
from stoker.train.distributed import DistInfo


class Task:
    """Defaults shared by every task; subclasses fill in data, model and loss."""

    name = "task"
    # metric -> "min" | "max": what `evaluate` reports and which way each improves
    metrics: dict[str, str] = {"val_loss": "min", "val_perplexity": "min"}

    def __init__(self, cfg: RecipeConfig, info: DistInfo, resolve: bool = True):
        """`resolve`: read `train.init_from` (a saved config of a run has it resolved)."""
        self.cfg, self.info = cfg, info
        self.train_data: Any = None
        self.seq_len = cfg.train.seq_len or cfg.model.max_seq_len

    @classmethod
    def stages(cls, cfg: RecipeConfig) -> list | None:
        """A multi-stage recipe's stages (train/stages.py `Stage`s, run in order by the loop),
        or None: `cfg` is one run."""
        return None

    # ------------------------------------------------------------------------------ data
    def prepare(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0 only, before the others open the data: tokenize into the data dir (a no-op
        when it is up to date); the data's metadata."""
        raise NotImplementedError

    def open_data(self) -> None:
        """Every rank: open the prepared data (sets `train_data`)."""
        raise NotImplementedError

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer files checkpoints carry."""
        return Path(self.cfg.data.dir) / "tokenizer"

    # ----------------------------------------------------------------------------- model
    def build_model(self, device: torch.device, ckpt: Path | None) -> nn.Module:
        """The model on `device`. `ckpt`: the checkpoint the run resumes from, whose tensors
        will overwrite the model's, so nothing it holds needs initializing."""
        raise NotImplementedError

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (frozen parts may stay in eval mode)."""
        model.train()

    def use_precision(self, model: nn.Module, precision: str) -> None:
        """Adapt the built model to the run's resolved precision (before any step): the
        decoder's fused head + loss (`train.fused_loss`); fine-tuning also keeps a frozen
        base in bf16."""
        from stoker.models.loss import use_fused_loss

        use_fused_loss(model, self.cfg.train.fused_loss, self.info.device)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW groups of the trainable parameters: 2-D ones decayed, the rest not (norms,
        biases), as nanoGPT/GPT-3. Each group may carry `lr_scale` (default 1)."""
        from stoker.train.optim import param_groups

        return param_groups(model, self.cfg.optim.weight_decay)

    def flops_per_token(self) -> float:
        """Training FLOPs per token, for MFU (scaling/flops.py's convention)."""
        from stoker.scaling.flops import flops_per_token

        return flops_per_token(self.cfg.model, self.seq_len)

    # ------------------------------------------------------------------------------ step
    def to_device(self, batch: Any, device: torch.device) -> Any:
        return tuple(t.to(device, non_blocking=True) for t in batch)

    def count(self, batch: Any) -> int:
        """Supervised targets in `batch` (the loss sum's denominator)."""
        raise NotImplementedError

    def tokens(self, batch: Any) -> int:
        """Tokens processed (throughput): the count of non-padding positions."""
        return self.count(batch)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Σ loss over the supervised targets, auxiliary loss of this forward or None)."""
        raise NotImplementedError

    def telemetry(self, model: nn.Module) -> dict[str, float]:
        """The model's own figures to log with every logged step (e.g. MoR routing)."""
        return {}

    # ------------------------------------------------------------------------ validation
    def inspect_batch(self, batch: Any) -> str:
        """`stoker validate`'s data check: raise `StokerError` when a sample of `batch` is
        trained on nothing or its labels are not its response; else a one-line description
        (e.g. the first response, decoded)."""
        n = self.count(batch)
        if n < 1:
            from stoker.errors import StokerError

            raise StokerError("the batch has no supervised target")
        return f"{n} supervised targets"

    def fit_loss(self, model: nn.Module, batch: Any) -> torch.Tensor | None:
        """What `stoker validate`'s short run watches while it trains on one batch, when not
        the training loss itself: a stage whose trainable part cannot move the whole loss
        (a router choosing among frozen adapters) watches what that part predicts."""
        return None

    def initial_loss(self) -> float | None:
        """The mean loss a freshly initialized head gives (ln V for a new LM head), or None
        when the model starts from trained weights."""
        return None

    # ------------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, n_batches: int, amp, n_micro: int) -> dict[str, float]:
        """Metrics over `n_batches` fixed validation batches (each rank its share)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ checkpoint
    def checkpoint_meta(self) -> dict[str, Any]:
        """Entries added to each checkpoint's stoker.json."""
        return {}

    @classmethod
    def load_trained(cls, cfg: RecipeConfig, ckpt: Path, device: torch.device) -> nn.Module:
        """The model a checkpoint of this task holds, ready for inference (eval mode)."""
        raise NotImplementedError


def loss_metrics(total: float, count: float) -> dict[str, float]:
    """val_loss (mean over targets), val_perplexity and the number of targets."""
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50)), "val_targets": count}


def check_supervised_rows(ids: torch.Tensor, labels: torch.Tensor, shift: int, pad: torch.Tensor,
                          ignore: int = -100) -> list[int]:  # fmt: skip
    """The checks of `inspect_batch` on (b, T) ids and labels: every row has a target, no
    padding position (`pad`, (b, T) bool) is one, and each target is the input token `shift`
    positions later (1: labels already shifted; 0: shifted by the loss). Returns the rows'
    target counts; raises `StokerError` naming the first bad row."""
    from stoker.errors import StokerError

    on = labels != ignore  # (b, T)
    counts = on.sum(1).tolist()
    for row, n in enumerate(counts):
        if n == 0:
            raise StokerError(f"sample {row} of the batch has no supervised token (every label "
                              "masked); it would train on nothing")  # fmt: skip
    if bool((on & pad).any()):
        row = int((on & pad).any(1).nonzero()[0])
        raise StokerError(f"sample {row} of the batch has labels on padding")
    target = ids.roll(-shift, dims=1) if shift else ids
    bad = on & (labels != target)
    if shift:
        bad[:, -shift:] &= False  # the last positions have no next token in the row
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise StokerError(f"sample {row}'s labels are not its own tokens (shifted by {shift}); "
                          "they would train on something else than the response")  # fmt: skip
    return counts


def sum_over_ranks(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sums over all ranks of host-side numbers (counts, loss sums): float64
    over the gloo control group, so no GPU synchronization; exact for counts below 2^53."""
    if not info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=info.control)
    return t.tolist()
