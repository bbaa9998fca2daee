"""DYNAMO's phases as tasks on the one loop (tasks/base.py): each stage of a DYNAMO recipe is
one run of train/loop.py in its own directory under the recipe's `train.out_dir`.

- `phase1:<task>` trains adapter k (of the K-adapter mixture) and task k's head on task k's
  data with one-hot gates on k; the other adapters get exactly zero gradient (their gate is 0)
  and no weight decay, so they stay as initialized and only adapter k's slice is kept.
- `phase2` trains the router alone on an interleaved stream of all tasks' examples: the task
  loss through the mixture with the router's gates softmax(logits / τ), τ scheduled linearly
  (not learned), optionally straight-through top-1, plus a fading supervised task-id loss and a
  load-balancing term. Adapters and heads come from phase 1, frozen.
- `phase3` trains adapters and heads (at `adapter_lr_scale`) with the router (at
  `router_lr_scale`); a scheduled share of examples (0.8 -> 0.2) runs with oracle gates, the
  rest with the router's; each example's loss adds λ·KL(phase-1 outputs ‖ outputs) against
  forgetting.

Every checkpoint holds the trainable tensors only, with the encoder's source and hash; the
encoder (an HF BERT/RoBERTa dir from `train.init_from`, or a random one of `encoder` shape
drawn from `train.seed`) is rebuilt on load and must hash the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.errors import StokerError
from stoker.models.dynamo import DynamoModel, balance_loss
from stoker.tasks.base import Task, sum_over_ranks
from stoker.tasks.dynamo import data as dd
from stoker.tasks.dynamo.batches import MixedBatches, eval_batches, to_device

PHASE1 = "phase1:"


def parse_stage(stage: str | None) -> tuple[int, str | None]:
    """(phase, task name of a phase-1 stage); phase 0: the whole recipe (its stages)."""
    if stage is None:
        return 0, None
    if stage.startswith(PHASE1):
        return 1, stage[len(PHASE1) :]
    return int(stage[-1]), None


def encoder_hash(model: DynamoModel) -> str:
    """SHA-256 over the frozen encoder's base tensors (names, shapes and bytes)."""
    from stoker.train.checkpoint import tensors_sha256

    return tensors_sha256({n: t for n, t in model.encoder.state_dict().items()
                           if not n.endswith((".lora_A", ".lora_B"))})  # fmt: skip


class DynamoTask(Task):
    name = "dynamo"

    def __init__(self, cfg, info, resolve: bool = True):
        cfg = dd.resolve_encoder(cfg) if resolve else cfg
        super().__init__(cfg, info, resolve)
        self.phase, task_name = parse_stage(cfg.dynamo.stage)
        names = [t.name for t in cfg.dynamo.tasks]
        self.k = names.index(task_name) if task_name is not None else None
        self.tokenizer = dd.load_tokenizer(cfg)
        self.metrics = self._metrics()
        self.val: dict[int, dd.TaskData] = {}
        self.teacher: DynamoModel | None = None

    @classmethod
    def stages(cls, cfg) -> list | None:
        from stoker.tasks.dynamo.stages import plan

        return plan(cfg) if cfg.dynamo.stage is None else None

    def _metrics(self) -> dict[str, str]:
        if self.phase == 0:
            return {}
        if self.phase == 1:
            t = self.cfg.dynamo.tasks[self.k]
            return {t.main_metric: "max", "val_loss": "min"}
        if self.phase == 2:
            return {"routing_accuracy": "max", "val_loss": "min"}
        return {"macro": "max", "routing_accuracy": "max", "val_loss": "min"}

    @property
    def task_indices(self) -> list[int]:
        return [self.k] if self.phase == 1 else list(range(len(self.cfg.dynamo.tasks)))

    @property
    def tokenizer_dir(self) -> Path | None:
        return None

    # ------------------------------------------------------------------------------ data
    def prepare(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """The records are read and tokenized in memory by every rank (small sets): check
        here that each task's file exists and holds usable examples."""
        return {t.name: dd.check_task_file(self.cfg, t) for t in self.cfg.dynamo.tasks}

    def open_data(self) -> None:
        cfg, d = self.cfg, self.cfg.dynamo
        train = {}
        for k in self.task_indices:
            data = dd.load_task(cfg, k, self.tokenizer)
            train[k], self.val[k] = data.train_features, data
        j = d.phase3
        oracle = (j.oracle_start, j.oracle_end, cfg.train.max_steps) if self.phase == 3 else None
        self.train_data = MixedBatches(train, cfg.train.batch_size, cfg.data.seed,
                                       self.tokenizer.pad_id, d.router.sampling_temperature,
                                       oracle)  # fmt: skip

    # ----------------------------------------------------------------------------- model
    def build_model(self, device: torch.device, ckpt: Path | None) -> nn.Module:
        from stoker.train.checkpoint import save_trainable_only

        model = dd.build_dynamo(self.cfg).to(device)
        self.encoder_sha256 = encoder_hash(model)
        if self.phase >= 2:
            dd.load_stages(model, self.cfg, self.phase)
        if self.phase == 3:
            import copy

            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        trainable = self._trainable(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        save_trainable_only(model)
        return model

    def _trainable(self, model: DynamoModel) -> set[str]:
        names = {n for n, _ in model.named_parameters()}
        lora = {n for n in names if n.endswith((".lora_A", ".lora_B"))}
        if self.phase == 1:
            head = f"heads.{model.task_names[self.k]}."
            return lora | {n for n in names if n.startswith(head)}
        router = {n for n in names if n.startswith("router.")}
        if self.phase == 2:
            return router
        return lora | router | {n for n in names if n.startswith("heads.")}

    def train_mode(self, model: nn.Module) -> None:
        """The frozen encoder stays in eval mode (no dropout); heads and router train."""
        from stoker.train.distributed import unwrap

        m = unwrap(model)
        m.train()
        m.encoder.eval()

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """LoRA factors without weight decay (so phase 1 leaves the other adapters exactly as
        they were), heads' matrices decayed; phase 3 scales adapters+heads and router."""
        wd, j = self.cfg.optim.weight_decay, self.cfg.dynamo.phase3
        groups: dict[tuple[float, float], list] = {}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            router = n.startswith("router.")
            scale = (
                1.0 if self.phase != 3 else (j.router_lr_scale if router else j.adapter_lr_scale)
            )
            decay = wd if p.dim() >= 2 and not n.endswith((".lora_A", ".lora_B")) else 0.0
            groups.setdefault((scale, decay), []).append(p)
        return [{"params": ps, "weight_decay": d, "lr_scale": s} for (s, d), ps in groups.items()]

    def flops_per_token(self) -> float:
        """2·N forward FLOPs of the encoder per token, ×3 with backward (6N, the usual
        convention), with N the encoder's matrix parameters."""
        c = self.cfg.encoder
        n = c.n_layer * (4 * c.d_model**2 + 2 * c.d_model * c.ffn_dim)
        return 6.0 * n

    # ------------------------------------------------------------------------------ step
    def to_device(self, batch, device: torch.device):
        return to_device(batch, device)

    def count(self, batch) -> int:
        return int(batch["task"].numel())  # the loss is a mean over examples

    def tokens(self, batch) -> int:
        return int(batch["length"].sum())

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        d, B = self.cfg.dynamo, batch["task"].numel()
        onehot = F.one_hot(batch["task"], len(d.tasks)).float()  # (B, K)
        if self.phase == 1:
            out = model(batch, gates=onehot)
            return out["losses"].sum(), None
        step, steps = int(batch["step"]), max(1, self.cfg.train.max_steps - 1)
        frac = min(1.0, step / steps)
        tau = d.router.tau_start + (d.router.tau_end - d.router.tau_start) * frac
        tau = tau if self.phase == 2 else d.router.tau_end
        oracle = batch["oracle"] if self.phase == 3 else None
        out = model(batch, tau=tau, straight_through=d.router.straight_through, oracle=oracle)
        logits, losses = out["router_logits"], out["losses"]
        aux = d.router.balance_weight * balance_loss(logits, out["soft_gates"])
        if self.phase == 2:
            weight = d.router.task_id_weight * (1.0 - frac)
            aux = aux + weight * F.cross_entropy(logits.float(), batch["task"])
        else:
            with torch.no_grad():
                teacher = self.teacher(batch, gates=onehot)["outputs"]
            kl = self.teacher.example_kl(out["outputs"], teacher, B)
            losses = losses + d.phase3.distill_weight * kl
        return losses.sum(), aux

    def fit_loss(self, model: nn.Module, batch) -> torch.Tensor | None:
        """Phase 2 trains the router only: its task-id cross-entropy (the mixed adapters'
        losses are bounded by the frozen adapters)."""
        if self.phase != 2:
            return None
        out = model(batch, tau=self.cfg.dynamo.router.tau_end)
        return F.cross_entropy(out["router_logits"].float(), batch["task"])

    # ------------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, n_batches: int, amp, n_micro: int) -> dict[str, float]:
        from stoker.tasks.dynamo.evaluate import task_scores
        from stoker.train.distributed import unwrap

        m: DynamoModel = unwrap(model)
        m.eval()
        try:
            with torch.no_grad(), amp:
                result = self._evaluate(m, task_scores)
        finally:
            self.train_mode(model)
        return result

    def _evaluate(self, m: DynamoModel, task_scores) -> dict[str, float]:
        device = next(m.parameters()).device
        total, count, correct, seen = 0.0, 0, 0, 0
        mode = "oracle" if self.phase == 1 else "soft"
        for k in self.task_indices:
            for b in eval_batches(self.val[k].val_features, self.cfg.train.micro_batch_size,
                                  self.tokenizer.pad_id):  # fmt: skip
                b = to_device(b, device)
                if self.phase == 1:
                    out = m(b, gates=F.one_hot(b["task"], m.n_adapters).float())
                else:
                    out = m(b, tau=self.cfg.dynamo.router.tau_end)
                    correct += int((out["router_logits"].argmax(-1) == b["task"]).sum())
                    seen += b["task"].numel()
                total += float(out["losses"].sum())
                count += b["task"].numel()
        total, count, correct, seen = sum_over_ranks([total, count, correct, seen], self.info)
        result = {"val_loss": total / max(count, 1)}
        if self.phase >= 2:
            result["routing_accuracy"] = 100.0 * correct / max(seen, 1)
        if self.phase != 2:
            scores = {k: task_scores(m, self, k, mode) for k in self.task_indices}
            if self.phase == 1:
                result |= scores[self.k]
            else:
                from stoker.tasks.dynamo.metrics import normalized

                tasks = self.cfg.dynamo.tasks
                for k, s in scores.items():
                    result |= {f"{tasks[k].name}_{n}": v for n, v in s.items()}
                main = [normalized(tasks[k].main_metric, s[tasks[k].main_metric])
                        for k, s in scores.items()]  # fmt: skip
                result["macro"] = 100.0 * sum(main) / len(main)
        return result

    # ------------------------------------------------------------------------ checkpoint
    def checkpoint_meta(self) -> dict[str, Any]:
        return {"encoder": {"source": self.cfg.train.init_from, "sha256": self.encoder_sha256}}

    @classmethod
    def load_trained(cls, cfg, ckpt: Path, device: torch.device) -> nn.Module:
        """The model of a stage's checkpoint: encoder rebuilt (its hash checked), the earlier
        stages' tensors, then this checkpoint's."""
        from stoker.train.checkpoint import read_meta

        model = dd.build_dynamo(cfg)
        phase, _ = parse_stage(cfg.dynamo.stage)
        saved = read_meta(ckpt).get("encoder", {}).get("sha256")
        if saved is not None and saved != encoder_hash(model):
            raise StokerError(
                f"the encoder {cfg.train.init_from or '(random, train.seed)'} is not the one "
                f"{ckpt} was trained on (its weights hash differs); use the original encoder"
            )
        if phase >= 2:
            dd.load_stages(model, cfg, phase)
        dd.load_checkpoint_tensors(model, ckpt, cfg, phase)
        return model.to(device).eval()
