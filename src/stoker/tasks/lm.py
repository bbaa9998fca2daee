"""Language-model pretraining as a task: token shards -> next-token loss on every position.

`pretrain` trains a decoder (models/gpt.py) from scratch, or continues from `train.init_from`;
`mor` trains a Mixture-of-Recursions model (models/mor.py; uptrained from `mor.init_from`),
whose routers add an auxiliary loss and log their routing. Batches are `TokenWindows`
(data/loader.py): random windows, a pure function of (seed, step); validation uses the val
split's windows for seed + 1, the same in training and in `stoker eval`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from stoker.errors import StokerError
from stoker.models.gpt import lm_loss_sum
from stoker.tasks.base import Task, loss_metrics, sum_over_ranks
from stoker.tasks.source import resolve_init


class LanguageModelTask(Task):
    name = "pretrain"

    def __init__(self, cfg, info, resolve: bool = True):
        self.source = None
        if cfg.train.init_from is not None and resolve:  # its architecture and tokenizer
            cfg, self.source = resolve_init(cfg)
        super().__init__(cfg, info, resolve)
        self.val_data: Any = None
        self.detailed = False  # `stoker eval`: also the model's own evaluation (MoR routing)

    def prepare(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        from stoker.data.prepare import prepare

        return prepare(self.cfg, stats)

    def open_data(self) -> None:
        from stoker.data.loader import TokenWindows
        from stoker.data.shards import check_vocab, load_meta

        d, t = self.cfg.data.dir, self.cfg.train
        check_vocab(load_meta(d), self.cfg.model.vocab_size)
        self.train_data = TokenWindows(d, "train", self.seq_len, t.batch_size, t.seed)
        self.val_data = TokenWindows(d, "val", self.seq_len, t.batch_size, t.seed + 1)

    def open_eval(self, data_dir: str, split: str, batch_size: int) -> None:
        """`stoker eval`: the windows of `split` that training's evaluation uses."""
        from stoker.data.loader import TokenWindows
        from stoker.data.shards import check_vocab, load_meta

        check_vocab(load_meta(data_dir), self.cfg.model.vocab_size)
        self.val_data = TokenWindows(
            data_dir, split, self.seq_len, batch_size, self.cfg.train.seed + 1
        )

    # ----------------------------------------------------------------------------- model
    def build_model(self, device: torch.device, ckpt: Path | None) -> nn.Module:
        from stoker.api import build_model
        from stoker.train.sharded import materialize

        if ckpt is not None:  # shapes on meta, then memory the checkpoint fills: no random init
            return materialize(build_model(self.cfg.model, "meta"), device)
        if self.source is not None:
            from stoker.tasks.source import load_source_model

            return load_source_model(self.source, device, self.cfg.model).train()
        return build_model(self.cfg.model).to(device)

    # ------------------------------------------------------------------------------ step
    def count(self, batch) -> int:
        return batch[1].numel()

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = batch
        total, _ = loss_sum(model, x, y)
        aux = getattr(_raw(model), "auxiliary_loss", None)
        return total, aux() if aux is not None else None

    def inspect_batch(self, batch) -> str:
        x, y = batch
        if not torch.equal(x[:, 1:], y[:, :-1]):
            raise StokerError("the targets are not the inputs shifted by one token")
        return f"{x.shape[0]} windows of {x.shape[1]} tokens, targets = inputs shifted by one"

    def initial_loss(self) -> float | None:
        mor = getattr(self.cfg, "mor", None)
        fresh = self.source is None and (mor is None or mor.init_from is None)
        return math.log(self.cfg.model.vocab_size) if fresh else None

    def telemetry(self, model: nn.Module) -> dict[str, float]:
        fn = getattr(_raw(model), "telemetry", None)
        return fn() if fn is not None else {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, n_batches: int, amp, n_micro: int) -> dict[str, float]:
        """Mean next-token loss over `n_batches` fixed global batches of the val windows."""
        info, dev = self.info, self.info.device
        was_training = model.training
        model.eval()
        total, count, routing = torch.zeros((), device=dev, dtype=torch.float64), 0, {}
        raw = _raw(model)
        for step in range(n_batches):
            for micro in range(n_micro):
                x, y = self.val_data.batch(step, info.rank, info.world, micro, n_micro)
                x, y = x.to(dev), y.to(dev)
                with amp:
                    s, c = loss_sum(model, x, y)
                total += s.double()
                count += int(c)
                if self.detailed and hasattr(raw, "evaluate_routing"):
                    for k, v in raw.evaluate_routing(x, y).items():
                        routing[k] = routing.get(k, 0.0) + v / (n_batches * n_micro)
        if was_training:
            self.train_mode(model)
        s, c = sum_over_ranks([float(total), float(count)], info)
        return {**loss_metrics(s, c), **({"routing": routing} if routing else {})}

    # ------------------------------------------------------------------------ checkpoint
    def checkpoint_meta(self) -> dict[str, Any]:
        return {"init_from": self.source.describe()} if self.source is not None else {}

    @classmethod
    def load_trained(cls, cfg, ckpt: Path, device: torch.device) -> nn.Module:
        from stoker.api import build_model
        from stoker.train.checkpoint import load_weights
        from stoker.train.sharded import materialize

        model = materialize(build_model(cfg.model, "meta"), device)
        load_weights(model, ckpt)
        return model.eval()


class MoRTask(LanguageModelTask):
    name = "mor"

    def build_model(self, device: torch.device, ckpt: Path | None) -> nn.Module:
        from stoker.api import build_model
        from stoker.train.sharded import materialize

        if ckpt is not None:
            return materialize(build_model(self.cfg.model, "meta", mor=self.cfg.mor), device)
        return build_model(self.cfg.model, mor=self.cfg.mor).to(device)

    def flops_per_token(self) -> float:
        from stoker.scaling.flops import flops_per_token

        return flops_per_token(self.cfg.model, self.seq_len, mor=self.cfg.mor)

    @classmethod
    def load_trained(cls, cfg, ckpt: Path, device: torch.device) -> nn.Module:
        from stoker.api import build_model
        from stoker.train.checkpoint import load_weights
        from stoker.train.sharded import materialize

        # a MoR run's weights replace any uptraining init
        mor = cfg.mor.model_copy(update={"init": "random", "init_from": None})
        model = materialize(build_model(cfg.model, "meta", mor=mor), device)
        load_weights(model, ckpt)
        return model.eval()


def loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs):
    """(Σ next-token loss, count) of `model` (DDP/compile wrapper or not) on ids x, targets
    y (`kwargs`: more forward arguments): through the model's own head + loss (fused under
    autocast, models/loss.py) when its forward takes targets, else from its logits."""
    if getattr(_raw(model), "takes_targets", False):
        return model(x, targets=y, **kwargs)
    return lm_loss_sum(model(x, **kwargs), y)


def _raw(model: nn.Module) -> nn.Module:
    """The model under DDP's or torch.compile's wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
