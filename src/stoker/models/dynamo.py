"""DYNAMO's network: one frozen encoder whose linear layers carry a mixture of K LoRA adapters,
one head per task, and a router that chooses the mixture per input.

- Backbone: `models/encoder.py` (BERT/RoBERTa), frozen; `apply_lora_mixture` puts K adapters
  (one per task) into the linears `lora.targets` names, mixed per example by gates (B, K)
  (`models/lora_mixture.py`): zero gates = the frozen backbone, one-hot gates = one adapter.
  The gates act inside the backbone, on every adapted layer; they never touch head logits.
- Heads, one per task, by kind:
  - `classify`: pooled encoding (masked mean, or [CLS]) -> dense + tanh -> labels (the shape of
    RoBERTa's classification head);
  - `qa`: start/end logits over tokens (BERT's SQuAD head, Devlin et al. 2019 §4.2);
  - `seq2seq`: BERT's MLM head shape (dense, GELU, LayerNorm) with the output projection tied to
    the frozen word embeddings plus a bias: next-token logits at every target position of a
    UniLM sequence-to-sequence input (Dong et al. 2019, arXiv 1905.03197).
- Router: an MLP on the masked mean-pool of the source positions of a zero-gate pass (the frozen
  backbone's own encoding, so it never depends on the adapters) -> K logits. With
  `router_pool="segments"` the pool is taken apart over the input's first segment and its
  second (a QA row's context; zeros for single-text rows), concatenated (B, 2C): one mean over
  a question and its context is dominated by the context, which looks like any other
  passage, so a summarization source and a QA pair become hard to tell apart.

A batch is a dict (tasks/dynamo/batches.py builds it): input_ids, token_type_ids (B, T),
mask (B, T, T) bool (query may attend key), source_mask (B, T) bool (the input a router and a
pooled head read), second_mask (B, T) bool (the second segment: a QA row's context), task (B,), label (B,) for classify rows, start/end (B,) for qa rows, labels
(B, T) next-token targets for seq2seq rows; -100 where a field does not apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.config import EncoderConfig, LoRAConfig
from stoker.models.encoder import Encoder
from stoker.models.lora_mixture import apply_lora_mixture, use_gates

IGNORE = -100


class ClassifierHead(nn.Module):
    """pooled (N, C) -> dense, tanh -> (N, n_labels)."""

    def __init__(self, C: int, n_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(C, C)
        self.out_proj = nn.Linear(C, n_labels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(pooled)))  # (N, C)
        return self.out_proj(self.dropout(x))  # (N, n_labels)


class SpanHead(nn.Module):
    """hidden (N, T, C) -> start and end logits (N, T) each."""

    def __init__(self, C: int):
        super().__init__()
        self.qa_outputs = nn.Linear(C, 2)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.qa_outputs(hidden).unbind(-1)  # (N, T) each
        return start, end


class LMHead(nn.Module):
    """hidden (M, C) -> dense, GELU, LayerNorm -> tied word embeddings + bias -> (M, V). The
    embedding is held by reference, not registered: it belongs to the frozen encoder."""

    def __init__(self, C: int, embedding: nn.Embedding, eps: float):
        super().__init__()
        self.dense = nn.Linear(C, C)
        self.layer_norm = nn.LayerNorm(C, eps=eps)
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))
        self._embedding = (embedding,)  # a tuple: not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(F.gelu(self.dense(hidden)))  # (M, C)
        return F.linear(x, self._embedding[0].weight, self.bias)  # (M, V)


class Router(nn.Module):
    """pooled frozen encoding (B, C) -> (B, K) adapter logits."""

    def __init__(self, C: int, hidden: int, K: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(C, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, K)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)  # (B, K)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, C) over the positions where mask (B, T) is true -> (B, C)."""
    w = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, C)


class DynamoModel(nn.Module):
    """Encoder + K-adapter LoRA mixture + one head per task + router (module docstring)."""

    def __init__(
        self,
        encoder: Encoder,
        tasks: Sequence[tuple[str, str, int]],
        lora: LoRAConfig,
        router_hidden: int = 256,
        router_dropout: float = 0.1,
        pooling: str = "mean",
        head_dropout: float = 0.1,
        router_pool: str = "mean",
    ):
        """`tasks`: (name, kind, n_labels) per adapter, in adapter order."""
        super().__init__()
        cfg: EncoderConfig = encoder.config
        C, K = cfg.d_model, len(tasks)
        self.encoder = encoder
        self.adapted = apply_lora_mixture(encoder, [lora.r] * K, lora)  # freezes the encoder
        self.task_names = [t[0] for t in tasks]
        self.kinds = [t[1] for t in tasks]
        self.pooling = pooling
        heads = {}
        for name, kind, n_labels in tasks:
            if kind == "classify":
                heads[name] = ClassifierHead(C, n_labels, head_dropout)
            elif kind == "qa":
                heads[name] = SpanHead(C)
            else:
                heads[name] = LMHead(C, encoder.embeddings.word_embeddings, cfg.norm_eps)
        self.heads = nn.ModuleDict(heads)
        self.router_pool = router_pool
        self.router = Router(C * (2 if router_pool == "segments" else 1), router_hidden, K,
                             router_dropout)  # fmt: skip

    @property
    def n_adapters(self) -> int:
        return len(self.task_names)

    def forward(
        self,
        batch: dict,
        gates: torch.Tensor | None = None,
        *,
        tau: float = 1.0,
        straight_through: bool = False,
        oracle: torch.Tensor | None = None,
    ) -> dict:
        """Heads' outputs and each example's loss with `gates` (B, K), or routed: the router's
        gates softmax(logits / tau) (straight-through top-1 if asked), one-hot on the task for
        the rows where `oracle` (B,) is true. Returns outputs, losses (B,), router_logits,
        soft_gates and the gates used (the last three None/given when not routed)."""
        logits = soft = None
        if gates is None:
            logits = self.route(batch)  # (B, K)
            soft = torch.softmax(logits.float() / tau, -1)
            gates = gates_from_logits(logits, tau, straight_through)
            if oracle is not None:
                onehot = F.one_hot(batch["task"], self.n_adapters).to(gates.dtype)
                gates = torch.where(oracle[:, None], onehot, gates)
        hidden = self.encode(batch, gates)  # (B, T, C)
        outputs = self.head_outputs(hidden, batch)
        losses = self.example_losses(outputs, batch)
        return {"outputs": outputs, "losses": losses, "router_logits": logits,
                "soft_gates": soft, "gates": gates}  # fmt: skip

    # --------------------------------------------------------------------------- encoding
    def encode(self, batch: dict, gates: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, T, C) with adapters mixed by `gates` (B, K)."""
        with use_gates(self.encoder, gates):
            return self.encoder(
                batch["input_ids"], token_type_ids=batch["token_type_ids"], attn_mask=batch["mask"]
            )

    def route_features(self, batch: dict) -> torch.Tensor:
        """The router's input (B, C): the frozen backbone's encoding (zero gates), mean over
        the source positions; a seq2seq row's source never sees its target (the mask), so this
        equals a pass over the source alone."""
        B = batch["input_ids"].shape[0]
        with torch.no_grad():
            zero = torch.zeros(B, self.n_adapters, device=batch["input_ids"].device)
            hidden = self.encode(batch, zero)  # (B, T, C)
            if self.router_pool != "segments":
                return masked_mean(hidden, batch["source_mask"]).float()  # (B, C)
            second = batch["second_mask"]
            first = masked_mean(hidden, batch["source_mask"] & ~second)
            return torch.cat([first, masked_mean(hidden, second)], -1).float()  # (B, 2C)

    def route(self, batch: dict) -> torch.Tensor:
        """Router logits (B, K)."""
        return self.router(self.route_features(batch))

    # ------------------------------------------------------------------------------ heads
    def pooled(self, hidden: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, source_mask)

    def head_outputs(self, hidden: torch.Tensor, batch: dict) -> dict[int, dict]:
        """Per task present in the batch: its rows and its head's logits on them
        ({"rows", "logits"} for classify; + "start"/"end" for qa; "positions" (M, 2) of the
        target tokens for seq2seq, logits (M, V))."""
        out: dict[int, dict] = {}
        for k in batch["task"].unique().tolist():
            rows = (batch["task"] == k).nonzero().squeeze(1)  # (n,)
            h, head, kind = hidden[rows], self.heads[self.task_names[k]], self.kinds[k]
            if kind == "classify":
                logits = head(self.pooled(h, batch["source_mask"][rows]))  # (n, n_labels)
                out[k] = {"rows": rows, "logits": logits}
            elif kind == "qa":
                start, end = head(h)  # (n, T) each
                keep = batch["source_mask"][rows]  # (n, T): no answer in padding
                start = start.float().masked_fill(~keep, -1e4)
                end = end.float().masked_fill(~keep, -1e4)
                out[k] = {"rows": rows, "start": start, "end": end}
            else:
                pos = (batch["labels"][rows] != IGNORE).nonzero()  # (M, 2): (row in rows, t)
                logits = head(h[pos[:, 0], pos[:, 1]])  # (M, V)
                out[k] = {"rows": rows, "positions": pos, "logits": logits}
        return out

    def example_losses(self, outputs: dict[int, dict], batch: dict) -> torch.Tensor:
        """Each example's loss (B,): cross-entropy of its label, the mean of start and end
        cross-entropies, or the mean over its target tokens."""
        B = batch["input_ids"].shape[0]
        losses = torch.zeros(B, device=batch["input_ids"].device)
        for k, o in outputs.items():
            rows, kind = o["rows"], self.kinds[k]
            if kind == "classify":
                loss = F.cross_entropy(o["logits"].float(), batch["label"][rows], reduction="none")
            elif kind == "qa":
                s = F.cross_entropy(o["start"], batch["start"][rows], reduction="none")
                e = F.cross_entropy(o["end"], batch["end"][rows], reduction="none")
                loss = (s + e) / 2
            else:
                pos = o["positions"]
                target = batch["labels"][rows][pos[:, 0], pos[:, 1]]  # (M,)
                tok = F.cross_entropy(o["logits"].float(), target, reduction="none")  # (M,)
                loss = per_row_mean(tok, pos[:, 0], len(rows))
            losses = losses.index_put((rows,), loss)
        return losses

    def example_kl(
        self, student: dict[int, dict], teacher: dict[int, dict], B: int
    ) -> torch.Tensor:
        """KL(teacher ‖ student) per example (B,) over every output distribution of its head
        (distillation to the phase-1 outputs); for qa the mean of start and end, for seq2seq the
        mean over target tokens."""
        device = next(iter(student.values()))["rows"].device
        kl = torch.zeros(B, device=device)
        for k, s in student.items():
            t, rows = teacher[k], s["rows"]
            keys = ("start", "end") if self.kinds[k] == "qa" else ("logits",)
            parts = [_kl(s[key], t[key]) for key in keys]  # each (n,) or (M,)
            v = sum(parts) / len(parts)
            if self.kinds[k] == "seq2seq":
                v = per_row_mean(v, s["positions"][:, 0], len(rows))
            kl = kl.index_put((rows,), v)
        return kl


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) per row."""
    t = F.log_softmax(teacher.float(), -1)
    return (t.exp() * (t - F.log_softmax(student.float(), -1))).sum(-1)


def per_row_mean(values: torch.Tensor, row: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of `values` (M,) grouped by `row` (M,) in 0..n-1 -> (n,); 0 for empty rows."""
    total = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, row, values)
    count = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(
        0, row, torch.ones_like(values)
    )
    return total / count.clamp_min(1.0)


def gates_from_logits(
    logits: torch.Tensor, tau: float, straight_through: bool = False
) -> torch.Tensor:
    """softmax(logits / tau) (B, K); straight-through: the forward is one-hot on the argmax,
    the gradient the soft gates'."""
    soft = torch.softmax(logits.float() / tau, -1)
    if not straight_through:
        return soft
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


def balance_loss(logits: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing term K · Σ_k f_k · P_k (Fedus et al. 2021, eq. 4):
    f_k the share of examples whose top gate is k, P_k the mean gate of k; 1 when balanced."""
    K = logits.shape[-1]
    f = F.one_hot(logits.argmax(-1), K).float().mean(0)  # (K,)
    return K * (f * gates.float().mean(0)).sum()
