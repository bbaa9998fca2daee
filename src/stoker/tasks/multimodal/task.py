"""The multimodal recipe's stages as tasks on the one loop (tasks/base.py); stages.py plans
them, each one run of train/loop.py in its own directory under the recipe's `train.out_dir`.

- `encoder:<modality>` pretrains that modality's encoder (models/multimodal.py) as a
  classifier on its labelled training files: cross-entropy, accuracy on the held-out split.
  Its checkpoint holds the whole encoder (BatchNorm statistics included).
- `phase1` loads both encoders from their stages, freezes them (eval mode for good: BatchNorm
  statistics never move) and trains the aligner alone with the symmetric InfoNCE of
  models/multimodal.py, pairs of one digit being positives of each other (`groups`). The
  loss of a step is the mean of its micro-batches' losses (each micro-batch is one contrast
  set). It reports image->audio and audio->image retrieval accuracy over the whole held-out
  pair set (a retrieval is right when the nearest item shows the same digit; chance 1 / the
  number of classes). Its checkpoint holds the aligner only, with the encoders' hashes.
- `lm` pretrains the small decoder on the described conversations, `phase2` trains the
  projectors, missing embeddings and LoRA (lm.py); loss on answer tokens only, summed over
  them (the loop divides by the step's count). Phase 2's checkpoint holds its trainable
  tensors only (no frozen encoder, aligner or LM weight), with hashes of the frozen parts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.errors import StokerError
from stoker.models.multimodal import Aligner, build_modality_encoder, contrastive_loss, freeze
from stoker.tasks.base import Task, sum_over_ranks
from stoker.tasks.multimodal import chat, lm
from stoker.tasks.multimodal import data as md
from stoker.tasks.multimodal.stages import ENCODER


def build_encoder(cfg, modality: str) -> nn.Module:
    e = cfg.multimodal.encoder(modality)
    if e.pretrained:  # frozen, its own weights (models/media_encoders.py)
        from stoker.models.media_encoders import MediaFeatures, load_media_encoder

        rate = cfg.data.sample_rate if modality == "audio" else None
        return freeze(MediaFeatures(load_media_encoder(e.path, e.kind), rate))
    options: dict[str, Any] = {"widths": tuple(e.widths), "n_classes": cfg.data.n_classes}
    if modality == "audio":
        options |= {"sample_rate": cfg.data.sample_rate, "n_mels": e.n_mels, "n_fft": e.n_fft,
                    "hop_length": e.hop_length}  # fmt: skip
    return build_modality_encoder(e.kind, **options)


def tensors_hash(module: nn.Module) -> str:
    from stoker.train.checkpoint import tensors_sha256

    return tensors_sha256(module.state_dict())


def stage_dir(cfg, stage: str) -> Path:
    out = Path(cfg.train.out_dir)
    root = out.parent if cfg.multimodal.stage is not None else out
    return root / stage.replace(":", "-")


def stage_checkpoint(cfg, stage: str, needed_by: str) -> Path:
    """The checkpoint of an earlier stage, which must have finished on what this config gives
    it; a one-line error naming what is missing."""
    from stoker.tasks.multimodal.stages import fingerprints
    from stoker.train.stages import finished_checkpoint

    where = stage_dir(cfg, stage)
    ckpt = finished_checkpoint(where, fingerprints(cfg)[stage])
    if ckpt is None:
        state = ("is out of date (its config or data changed)" if finished_checkpoint(where)
                 else "holds no finished run")  # fmt: skip
        raise StokerError(f"{needed_by} needs the result of {stage}, but {where} {state}; run "
                          "the recipe's earlier stages first (multimodal.phases=[1,2])")  # fmt: skip
    return ckpt


class AlignModel(nn.Module):
    """Frozen encoders (features pooled) and the trainable aligner."""

    def __init__(self, encoders: dict[str, nn.Module], dim: int):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.aligner = Aligner({m: e.dim for m, e in encoders.items()}, dim)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            feats = {m: self.encoders[m].features(x) for m, x in inputs.items()}
        return self.aligner(feats)


def build_align_model(cfg) -> AlignModel:
    from stoker.train.checkpoint import load_weights

    encoders = {}
    for m in cfg.multimodal.modalities:
        enc = build_encoder(cfg, m)
        if not cfg.multimodal.encoder(m).pretrained:
            load_weights(enc, stage_checkpoint(cfg, f"{ENCODER}{m}", "phase 1"))
        encoders[m] = freeze(enc)
    return AlignModel(encoders, cfg.multimodal.aligner.dim)


class MultimodalTask(Task):
    name = "multimodal"

    def __init__(self, cfg, info, resolve: bool = True):
        super().__init__(cfg, info, resolve)
        stage = cfg.multimodal.stage or "phase1"
        self.modality = stage[len(ENCODER) :] if stage.startswith(ENCODER) else None
        self.kind = "encoder" if self.modality else stage  # encoder | phase1 | lm | phase2
        self.metrics = {"encoder": {"accuracy": "max", "val_loss": "min"},
                        "phase1": {"retrieval": "max", "val_loss": "min"},
                        "lm": {"exact_match": "max", "val_loss": "min"},
                        "phase2": {"exact_match": "max", "val_loss": "min"}}[self.kind]  # fmt: skip
        self.val: Any = None
        self.hashes: dict[str, str] = {}

    @classmethod
    def stages(cls, cfg) -> list | None:
        from stoker.tasks.multimodal.stages import plan

        return plan(cfg) if cfg.multimodal.stage is None else None

    @property
    def tokenizer_dir(self) -> Path | None:
        return None

    # ------------------------------------------------------------------------------ data
    def prepare(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every rank reads the (small) files into memory; here: that they are readable."""
        if self.modality:
            return {"train": len(md.labelled(self.cfg, self.modality, "train").y)}
        if self.kind == "phase1":
            return {"pairs": len(md.pairs(self.cfg, "train").label)}
        return {"conversations": len(lm.records(self.cfg, "train"))}

    def open_data(self) -> None:
        cfg, n = self.cfg, self.cfg.data.eval_examples
        if self.modality:
            train = md.labelled(cfg, self.modality, "train")
            test = md.labelled(cfg, self.modality, "test")
            tensors = {"x": train.x, "y": train.y}
            self.val = md.Labelled(test.x[:n], test.y[:n])
        elif self.kind == "phase1":
            train, test = md.pairs(cfg, "train"), md.pairs(cfg, "test")
            tensors = {"image": train.image, "audio": train.audio, "label": train.label}
            self.val = md.Pairs(test.image[:n], test.audio[:n], test.label[:n])
        else:
            media = self.kind == "phase2"
            conv = lm.conversations(cfg, "train", media)
            self.val = lm.conversations(cfg, "test", media)
            length = cfg.multimodal.lm.model.max_seq_len if cfg.multimodal.phase2.pad == "max" \
                else None  # fmt: skip
            self.train_data = lm.ChatBatches(conv, cfg.train.batch_size, cfg.data.seed,
                                             lm.tokenizer(cfg).pad_id, length)  # fmt: skip
            return
        self.train_data = md.Batches(tensors, cfg.train.batch_size, cfg.data.seed)

    # ----------------------------------------------------------------------------- model
    def build_model(self, device: torch.device, ckpt: Path | None) -> nn.Module:
        from stoker.train.checkpoint import save_trainable_only, tensors_sha256

        if self.modality:
            return build_encoder(self.cfg, self.modality).to(device)
        if self.kind == "lm":
            return lm.build_lm(self.cfg).to(device)
        model = build_align_model(self.cfg) if self.kind == "phase1" else lm.build_mm(self.cfg)
        self.hashes = {f"encoder:{m}": tensors_hash(e) for m, e in model.encoders.items()}
        if self.kind == "phase2":
            frozen = {n: p for n, p in model.lm.named_parameters() if not p.requires_grad}
            self.hashes |= {"aligner": tensors_hash(model.aligner),
                            "lm": tensors_sha256(frozen)}  # fmt: skip
        save_trainable_only(model)
        return model.to(device)

    def train_mode(self, model: nn.Module) -> None:
        model.train()  # frozen encoders and aligner stay in eval (models/multimodal.freeze)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Phase 2: projectors and missing embeddings at the phase's LR, LoRA factors at
        `lora_lr_scale` of it (no weight decay on either); otherwise the default groups."""
        if self.kind != "phase2":
            return super().param_groups(model)
        lora, rest = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (lora if n.endswith((".lora_A", ".lora_B")) else rest).append(p)
        scale = self.cfg.multimodal.phase2.lora_lr_scale
        return [{"params": rest, "weight_decay": 0.0},
                {"params": lora, "weight_decay": 0.0, "lr_scale": scale}]  # fmt: skip

    def flops_per_token(self) -> float:
        return 0.0  # small CNNs and LM: MFU is not reported

    # ------------------------------------------------------------------------------ step
    def to_device(self, batch, device: torch.device):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def count(self, batch) -> int:
        if self.modality:
            return int(len(batch["y"]))
        if self.kind == "phase1":
            return 1  # one contrast set
        return int((batch["labels"][:, 1:] != chat.IGNORE).sum())

    def tokens(self, batch) -> int:
        if self.kind in ("lm", "phase2"):
            return int((batch["input_ids"] != self.train_data.pad_id).sum())
        return int(len(batch["y" if self.modality else "label"]))  # items

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        from stoker.models.gpt import lm_loss_sum

        if self.modality:
            return F.cross_entropy(model(batch["x"]).float(), batch["y"], reduction="sum"), None
        if self.kind == "phase1":
            from stoker.train.distributed import unwrap

            emb = model({m: batch[m] for m in self.cfg.multimodal.modalities})
            loss, _ = contrastive_loss(emb, None, unwrap(model).aligner.scale(), batch["label"])
            return loss, None
        logits = model(batch["input_ids"]) if self.kind == "lm" else model(batch)
        return lm_loss_sum(logits[:, :-1], batch["labels"][:, 1:])[0], None

    # ------------------------------------------------------------------------ validation
    def inspect_batch(self, batch) -> str:
        from stoker.tasks.base import check_supervised_rows

        if self.kind not in ("lm", "phase2"):
            y = batch["y" if self.modality else "label"]
            n = self.cfg.data.n_classes
            if bool(((y < 0) | (y >= n)).any()):
                raise StokerError(f"a label is outside 0..{n - 1} (data.n_classes={n})")
            return f"{len(y)} items, labels in 0..{n - 1}"
        ids, labels = batch["input_ids"], batch["labels"]
        check_supervised_rows(ids, labels, 0, ids == self.train_data.pad_id, chat.IGNORE)
        for m in self.cfg.multimodal.modalities if self.kind == "phase2" else ():
            has = batch[f"has_{m}"].bool()
            loaded = batch[m].flatten(1).abs().sum(1) > 0  # absent files are zeros
            if not torch.equal(has, loaded):
                row = int((has != loaded).nonzero()[0])
                raise StokerError(f"sample {row}'s has_{m}={bool(has[row])} disagrees with "
                                  f"its {m} tensor")  # fmt: skip
        tok = lm.tokenizer(self.cfg)
        first = tok.decode(labels[0][labels[0] != chat.IGNORE].tolist())
        present = "; ".join(f"{m} in {int(batch[f'has_{m}'].sum())}/{len(ids)}"
                            for m in self.cfg.multimodal.modalities if f"has_{m}" in batch)  # fmt: skip
        return f"{len(ids)} conversations supervised; first answer {first!r}" + (
            f"; {present}" if present else ""
        )

    def initial_loss(self) -> float | None:
        if self.kind == "lm":
            return math.log(lm.tokenizer(self.cfg).vocab_size)
        return math.log(self.cfg.data.n_classes) if self.kind == "encoder" else None

    # ------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, n_batches: int, amp, n_micro: int) -> dict[str, float]:
        from stoker.train.distributed import unwrap

        m = unwrap(model)
        m.eval()
        try:
            with amp:
                if self.kind in ("lm", "phase2"):
                    return self._answers(m)
                return self._classify(m) if self.modality else self._retrieval(m)
        finally:
            self.train_mode(model)

    def _chunks(self, n: int):
        step = self.cfg.train.micro_batch_size
        return [slice(i, i + step) for i in range(0, n, step)]

    def _classify(self, m: nn.Module) -> dict[str, float]:
        device = next(m.parameters()).device
        total, correct = 0.0, 0
        for s in self._chunks(len(self.val.y)):
            logits = m(self.val.x[s].to(device)).float()
            y = self.val.y[s].to(device)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        total, correct, n = sum_over_ranks([total, correct, len(self.val.y)], self.info)
        return {"val_loss": total / n, "accuracy": 100.0 * correct / n}

    def _retrieval(self, m: AlignModel) -> dict[str, float]:
        device = next(m.parameters()).device
        mods = self.cfg.multimodal.modalities
        emb: dict[str, list[torch.Tensor]] = {k: [] for k in mods}
        for s in self._chunks(len(self.val.label)):
            out = m({k: getattr(self.val, k)[s].to(device) for k in mods})
            for k in mods:
                emb[k].append(out[k].float())
        full = {k: torch.cat(v) for k, v in emb.items()}
        loss, acc = contrastive_loss(full, None, m.aligner.scale().float(),
                                     self.val.label.to(device))  # fmt: skip
        result = {"val_loss": float(loss)} | {k.replace("->", "_to_"): 100.0 * v
                                               for k, v in acc.items()}  # fmt: skip
        result["retrieval"] = 100.0 * min(acc.values())  # the weaker direction
        return result

    def _answers(self, m: nn.Module) -> dict[str, float]:
        """val_loss on the held-out conversations, greedy exact match per instruction type;
        phase 2 also with each modality replaced by its missing embedding."""
        from stoker.models.gpt import lm_loss_sum

        device, tok = next(m.parameters()).device, lm.tokenizer(self.cfg)
        n = min(self.cfg.data.eval_examples, len(self.val.samples))
        total, count = 0.0, 0
        for s in self._chunks(n):
            b = lm.select(self.val, list(range(n))[s], tok.pad_id, None)
            b = {k: v.to(device) for k, v in b.items()}
            logits = m(b["input_ids"]) if self.kind == "lm" else m(b)
            t, c = lm_loss_sum(logits[:, :-1], b["labels"][:, 1:])
            total, count = total + float(t), count + int(c)
        max_new = self.cfg.multimodal.phase2.max_new_tokens
        em = lm.exact_match(m, self.val, tok, max_new, n)
        result = {"val_loss": total / max(count, 1), "exact_match": em.pop("all")}
        result |= {f"em_{k}": v for k, v in em.items()}
        if self.kind == "phase2":
            for mod in self.cfg.multimodal.modalities:
                off = lm.exact_match(m, self.val, tok, max_new, n, frozenset({mod}))
                result |= {f"em_{k}_without_{mod}": v for k, v in off.items() if k != "all"}
        return result

    # ------------------------------------------------------------------------ checkpoint
    def checkpoint_meta(self) -> dict[str, Any]:
        return {"frozen": self.hashes} if self.hashes else {}

    @classmethod
    def load_trained(cls, cfg, ckpt: Path, device: torch.device) -> nn.Module:
        from stoker.train.checkpoint import load_weights, save_trainable_only

        stage = cfg.multimodal.stage or "phase1"
        if stage.startswith(ENCODER):
            model = build_encoder(cfg, stage[len(ENCODER) :])
        elif stage == "lm":
            model = lm.build_lm(cfg)
        else:
            model = build_align_model(cfg) if stage == "phase1" else lm.build_mm(cfg)
            save_trainable_only(model)
        load_weights(model, ckpt)
        return model.to(device).eval()
