"""Supervised fine-tuning as a task: a decoder from `train.init_from`, chat/instruction samples,
loss on the assistant tokens (and the end token) only.

Without a `lora` section every weight trains (full fine-tuning; checkpoints hold the whole
model). With one, the base is frozen (and its modules kept in eval mode), LoRA adapters
(models/lora.py) train, and checkpoints hold the adapters only plus the base's path and
weights hash: resume, eval, generate and export rebuild base + adapters and refuse a base
whose weights changed. Data: data/sft.py (`prepare_sft`, `SFTBatches`); `data.batching` picks
length-bucketed padding (the default, fastest in docs/log.md), packing (several samples per
row, attention and positions kept inside each sample) or padding to seq_len.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from stoker.data.sft import IGNORE
from stoker.errors import StokerError
from stoker.tasks.base import Task, loss_metrics, sum_over_ranks
from stoker.tasks.source import Source, check_base, load_source_model, resolve_init


class FinetuneTask(Task):
    name = "finetune"

    def __init__(self, cfg, info, resolve: bool = True):
        self.source: Source | None = None
        if cfg.train.init_from is not None and resolve:
            cfg, self.source = resolve_init(cfg)
        elif cfg.data.tokenizer is None and cfg.train.init_from is None:
            raise StokerError(
                "a finetune recipe needs train.init_from (the model to start "
                "from) or, to train from scratch, data.tokenizer"
            )
        super().__init__(cfg, info, resolve)
        self.val_data: Any = None
        self._described: dict[str, Any] | None = None

    @property
    def tokenizer_source(self) -> str:
        d = self.cfg.data
        if d.tokenizer is not None:
            return d.tokenizer
        if self.source is None or self.source.tokenizer is None:
            raise StokerError(
                f"train.init_from {self.source and self.source.path} carries no "
                "tokenizer; set data.tokenizer to the one it was trained with"
            )
        return str(self.source.tokenizer)

    # ------------------------------------------------------------------------------ data
    def prepare(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        from stoker.data.sft import prepare_sft

        d = self.cfg.data
        meta = prepare_sft(
            d.sources,
            self.tokenizer_source,
            d.dir,
            template=d.template,
            eos_token=d.eos_token,
            val_fraction=d.val_fraction,
            seed=d.seed,
            max_samples=d.max_samples,
            dtype=d.dtype,
        )
        self._check_vocab(meta)
        return meta

    def _check_vocab(self, meta: dict[str, Any]) -> None:
        if int(meta["vocab_size"]) > self.cfg.model.vocab_size:
            raise StokerError(
                f"the tokenizer of {self.cfg.data.dir} has {meta['vocab_size']} "
                f"tokens, the model {self.cfg.model.vocab_size}; use the "
                "model's own tokenizer (data.tokenizer)"
            )

    def open_data(self) -> None:
        from stoker.data.sft import SFTBatches, load_sft_meta

        d, t = self.cfg.data, self.cfg.train
        meta = load_sft_meta(d.dir)
        self._check_vocab(meta)
        self.train_data = SFTBatches(
            d.dir,
            "train",
            self.seq_len,
            t.batch_size,
            t.seed,
            d.batching,
            d.pad_multiple,
            d.too_long == "skip",
        )
        if self.train_data.skipped and self.info.is_main:
            print(
                f"stoker: skipping {self.train_data.skipped} training sample(s) that keep "
                f"no target within seq_len={self.seq_len} (data.too_long=skip)",
                flush=True,
            )
        if meta["splits"]["val"]["samples"]:
            self.open_eval(d.dir, "val", t.micro_batch_size * self.info.world)
        elif t.eval_interval:
            raise StokerError(
                f"{d.dir} holds no validation samples (data.val_fraction="
                f"{d.val_fraction}); raise it or set train.eval_interval=0"
            )

    def open_eval(self, data_dir: str, split: str, batch_size: int) -> None:
        from stoker.data.sft import SFTBatches

        d = self.cfg.data
        self.val_data = SFTBatches(
            data_dir,
            split,
            self.seq_len,
            batch_size,
            self.cfg.train.seed,
            d.batching,
            d.pad_multiple,
            d.too_long == "skip",
        )

    # ----------------------------------------------------------------------------- model
    @property
    def frozen_base(self) -> bool:
        return self.cfg.lora is not None

    def build_model(self, device: torch.device, ckpt: Path | None) -> nn.Module:
        from stoker.api import build_model
        from stoker.train.sharded import materialize

        if self.frozen_base:  # the base's weights are never in our checkpoints: load them
            if ckpt is not None:
                from stoker.train.checkpoint import read_meta

                check_base(read_meta(ckpt).get("base"), f"checkpoint {ckpt}")
            return self._adapted(self._base(device))
        if ckpt is not None:
            return materialize(build_model(self.cfg.model, "meta"), device)
        return self._base(device).train()

    def _base(self, device: torch.device) -> nn.Module:
        from stoker.api import build_model

        if self.source is None:
            return build_model(self.cfg.model).to(device)
        return load_source_model(self.source, device, self.cfg.model)

    def _adapted(self, model: nn.Module) -> nn.Module:
        from stoker.models.lora import apply_lora
        from stoker.train.checkpoint import save_trainable_only

        apply_lora(model, self.cfg.lora)
        save_trainable_only(model)
        return model

    def use_precision(self, model: nn.Module, precision: str) -> None:
        """Under bf16/fp16 autocast a frozen base's linear weights are stored in that dtype:
        autocast would cast them on every forward (the same values), so this only removes
        the casts and halves the base's memory (models/lora.py `store_frozen_linears`). Not
        under FSDP, whose sharded parameters keep the dtype it was built with."""
        super().use_precision(model, precision)
        if not self.frozen_base or precision == "fp32" or self.cfg.dist.strategy == "fsdp":
            return
        from stoker.models.lora import store_frozen_linears

        store_frozen_linears(model, torch.bfloat16 if precision == "bf16" else torch.float16)

    def train_mode(self, model: nn.Module) -> None:
        """Training mode for what trains; modules without a trainable parameter (the frozen
        base's norms, dropout, ...) stay in eval mode."""
        model.train()
        if self.frozen_base:
            for m in model.modules():
                if not any(p.requires_grad for p in m.parameters()):
                    m.eval()

    def flops_per_token(self) -> float:
        """Full training's, or with a frozen base 4N + 6·N_adapter + attention: the frozen
        weights get no weight gradients (scaling/flops.py `frozen_flops_per_token`)."""
        from stoker.scaling.flops import flops_per_token, frozen_flops_per_token

        if not self.frozen_base:
            return flops_per_token(self.cfg.model, self.seq_len)
        return frozen_flops_per_token(self.cfg.model, self.seq_len, self.adapter_params())

    def adapter_params(self) -> int:
        return adapter_params(self.cfg.model, self.cfg.lora)

    # ------------------------------------------------------------------------------ step
    def to_device(self, batch, device: torch.device):
        return batch._replace(
            **{
                k: getattr(batch, k).to(device, non_blocking=True)
                for k in ("input_ids", "labels", "position_ids", "doc_ids")
            }
        )

    def count(self, batch) -> int:
        return batch.n_targets

    def tokens(self, batch) -> int:
        return batch.n_tokens

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        total, _ = self.loss_sum(model, batch)
        return total, None

    def inspect_batch(self, batch) -> str:
        from stoker.tasks.base import check_supervised_rows

        on = batch.labels != IGNORE
        samples = 0
        for row in range(len(batch.doc_ids)):  # packed rows hold several samples
            for doc in batch.doc_ids[row].unique().tolist():
                if doc < 0:
                    continue
                samples += 1
                if not bool(on[row][batch.doc_ids[row] == doc].any()):
                    raise StokerError(f"sample {doc} of row {row} has no supervised token (its "
                                      "response is masked or cut off)")  # fmt: skip
        check_supervised_rows(batch.input_ids, batch.labels, 1, batch.doc_ids < 0, IGNORE)
        return (f"{samples} samples, each with a supervised response; {batch.n_targets} "
                "targets, none on padding")  # fmt: skip

    def loss_sum(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ loss over the supervised tokens, their count), through the model's head + loss
        (tasks/lm.py `loss_sum`)."""
        from stoker.tasks.lm import loss_sum

        if self.cfg.data.batching != "pack":  # padding on the right: causal attention suffices
            return loss_sum(model, batch.input_ids, batch.labels)
        from stoker.data.sft import document_causal_mask

        mask = document_causal_mask(batch.doc_ids)
        return loss_sum(
            model, batch.input_ids, batch.labels, position_ids=batch.position_ids, attn_mask=mask
        )

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, n_batches: int | None, amp, n_micro: int = 1
    ) -> dict[str, float]:
        """Supervised loss (mean over the target tokens) of the held-out samples: the first
        `n_batches · n_micro` micro-batches of their fixed layout (None: all of them)."""
        info = self.info
        model.eval()
        total, count = 0.0, 0
        n = None if n_batches is None else n_batches * n_micro
        for batch in self.val_data.eval_batches(n, info.rank, info.world):
            batch = self.to_device(batch, info.device)
            with amp:
                s, c = self.loss_sum(model, batch)
            total, count = total + float(s), count + int(c)
        self.train_mode(model)
        return loss_metrics(*sum_over_ranks([total, float(count)], info))

    # ------------------------------------------------------------------------ checkpoint
    def checkpoint_meta(self) -> dict[str, Any]:
        if self.source is None:
            return {}
        if self._described is None:  # hashing the base's weights once per run
            self._described = self.source.describe()
        return {
            "init_from": self._described,
            **({"base": self._described} if self.frozen_base else {}),
        }

    @classmethod
    def load_trained(cls, cfg, ckpt: Path, device: torch.device) -> nn.Module:
        from stoker.api import build_model
        from stoker.models.lora import apply_lora
        from stoker.train.checkpoint import load_weights, read_meta, save_trainable_only
        from stoker.train.sharded import materialize

        if cfg.lora is None:
            model = materialize(build_model(cfg.model, "meta"), device)
        else:
            base = check_base(read_meta(ckpt).get("base"), f"checkpoint {ckpt}")
            model = load_source_model(base, device, cfg.model)
            apply_lora(model, cfg.lora)
            save_trainable_only(model)
        load_weights(model, ckpt)
        return model.eval()


def adapter_params(model_cfg, lora_cfg) -> int:
    """Parameters LoRA adds to (and trains in) the model `model_cfg` describes, counted on a
    model built on the meta device (no memory)."""
    from stoker.api import build_model
    from stoker.models.lora import apply_lora

    model = build_model(model_cfg, "meta")
    apply_lora(model, lora_cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
