"""Language-model losses: next-token cross-entropy from logits (`lm_loss`, `lm_loss_sum`),
and the LM head fused with it under autocast (`linear_cross_entropy`): the head and its
cross-entropy in one pass over row chunks.

`linear_cross_entropy(hidden, weight, targets)` = `lm_loss_sum(hidden @ weight.T, targets)`
without the (N, V) logits: each chunk of rows computes its logits in the autocast dtype (the
GEMM the LM head would run), the log-sum-exp and the target logit in float32, and — when a
gradient is wanted — the gradient right away (softmax − one-hot, cast to the autocast dtype
as autograd would cast it, then the two GEMMs of the head's backward), so nothing of size
N × V is kept for backward: only dL/dhidden (N, C) and dL/dweight (V, C, float32). The idea is
Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989); this is a
PyTorch-level version of it.

What it saves, per step, against autocast's head + `lm_loss_sum`: the (N, V) logits in bf16
and their (N, V) float32 log-softmax held for backward — 6 bytes × N × V (for GPT-2's vocab
at 16 × 1024 tokens per micro-batch, 4.9 GB), and the log-softmax backward pass. It is used
only under autocast and where `train.fused_loss` says (auto: on CUDA); fp32 runs keep the
plain head and loss, bit for bit.

Gradient numerics: as autocast's, except that dL/dweight is summed over chunks in float32
(autograd rounds the single GEMM's output to the autocast dtype), so it is at least as
precise; losses agree to summation order (tests/models/test_fused_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LOSS_CHUNK = 1 << 21  # logits per CPU cross-entropy piece: 8 MB in fp32


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 over the targets != `ignore_index`."""
    total, count = lm_loss_sum(logits, targets, ignore_index)
    return total / count


def lm_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ next-token cross-entropy in float32, number of targets != `ignore_index`);
    `targets` are already shifted (B, T). The training loop divides the sum by the count of
    the whole step (all micro-batches and ranks), so masked batches weigh every target alike.

    On CPU, large logits go through in row chunks: each chunk's float32 copy, log-softmax and
    gradients stay small enough for the heap and the cache, where one (B·T, V) float32 temporary
    would be a fresh mmap that page-faults on every step. Same value up to summation order."""
    logits, targets = logits.flatten(0, 1), targets.flatten()  # (B·T, V), (B·T,)
    count = (targets != ignore_index).sum()
    if logits.device.type != "cpu" or logits.numel() <= _LOSS_CHUNK:
        return F.cross_entropy(
            logits.float(), targets, ignore_index=ignore_index, reduction="sum"
        ), count
    rows = max(1, _LOSS_CHUNK // logits.shape[1])
    pieces = zip(logits.split(rows), targets.split(rows), strict=True)  # (rows, V), (rows,)
    total = torch.stack(
        [
            F.cross_entropy(chunk.float(), t, ignore_index=ignore_index, reduction="sum")
            for chunk, t in pieces
        ]
    ).sum()
    return total, count


# logits per chunk, 32 / 256 MB in float32: few chunks, so the head's GEMMs stay large and
# dL/dweight is summed a few times only; on CPU no larger than glibc's largest heap block
# (32 MB), above which every chunk would be a fresh, page-faulting mmap (docs/log.md)
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}


def use_fused_loss(model: torch.nn.Module, setting: str, device: torch.device) -> None:
    """`train.fused_loss` on a model whose forward takes targets (`Decoder.fused_loss`):
    on / off, or auto = on for CUDA (the memory), off on CPU, where it measured up to 20 %
    slower at a 50k vocabulary (equal at 8k) for 36 % less peak memory (docs/log.md)."""
    if hasattr(model, "fused_loss"):
        model.fused_loss = setting == "on" or (setting == "auto" and device.type == "cuda")


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ cross-entropy over the targets != ignore_index in float32, their count);
    `hidden` (..., C), `weight` (V, C) — the LM head's — and `targets` (...) shifted already."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    count = (targets != ignore_index).sum()
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    grad = torch.is_grad_enabled()  # (Function.forward itself runs without grad mode)
    wants = (grad and hidden.requires_grad, grad and weight.requires_grad)
    total = _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, dtype, wants)
    return total, count


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, dtype, wants):
        ctx.hidden_grad, ctx.weight_grad = wants
        ctx.weight_dtype = weight.dtype
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            total, grads = _chunks(hidden, weight, targets, ignore_index, dtype, ctx)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_total.to(grad_hidden.dtype) if ctx.hidden_grad else None
        gw = (grad_weight * grad_total).to(ctx.weight_dtype) if ctx.weight_grad else None
        return gh, gw, None, None, None, None


def _chunks(hidden, weight, targets, ignore_index, dtype, ctx):
    """The loss sum and (dL/dhidden, dL/dweight) over the row chunks; a gradient that
    `ctx` does not want is an empty tensor (none at all: the loss only)."""
    want = ctx.hidden_grad or ctx.weight_grad
    compute = dtype or hidden.dtype
    w = weight.to(compute)  # what autocast casts the head's weight to, once
    h_all = hidden.to(compute)
    V = weight.shape[0]
    rows = max(1, CHUNK_ELEMENTS.get(hidden.device.type, 1 << 26) // V)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_h = torch.empty_like(hidden) if ctx.hidden_grad else None
    grad_w = (
        torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        if ctx.weight_grad
        else weight.new_empty(0)
    )
    for start in range(0, hidden.shape[0], rows):
        h = h_all[start : start + rows]  # (r, C)
        t = targets[start : start + rows]  # (r,)
        logits = F.linear(h, w).float()  # (r, V): the head's GEMM, then float32 as the loss
        valid = t != ignore_index
        safe = torch.where(valid, t, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1)  # (r,)
        if not want:
            lse = torch.logsumexp(logits, dim=-1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            continue
        top = logits.amax(dim=-1, keepdim=True)  # (r, 1)
        probs = logits.sub_(top).exp_()  # one exp pass, in place of the logits
        norm = probs.sum(dim=-1, keepdim=True)  # (r, 1)
        lse = (norm.log() + top).squeeze(1)
        total += torch.where(valid, lse - picked, 0.0).sum()
        probs.div_(norm)  # softmax
        probs[torch.arange(len(t), device=t.device), safe] -= 1.0  # softmax − one-hot
        grad = probs.to(compute).mul_(valid[:, None])  # as autograd casts it; ignored rows: 0
        if grad_h is not None:
            grad_h[start : start + rows] = (grad @ w).to(hidden.dtype)  # (r, C)
        if ctx.weight_grad:
            grad_w += (grad.t() @ h).float()  # (V, C)
    return total, (grad_h if grad_h is not None else hidden.new_empty(0), grad_w)
