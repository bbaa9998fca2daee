"""The parts of Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524) that are not the model
class: token compaction, the recursive-KV-sharing block step, decoding caches, router losses.

- `compact` turns a per-token mask into position-sorted indices (docs/mor.md: selected
  indices are sorted by position, which keeps causal order), so a recursion's block runs on
  the compacted subsequence with RoPE tables gathered at the original positions.
- `shared_kv_block` is `gpt.Block.forward` for recursive KV sharing (§2.3 of the paper):
  queries of the tokens active in recursion r ≥ 1 attend to the keys/values the same layer
  produced in recursion 0, restricted to positions at or before each query's own.
- `RowCache` holds one batch row's decoding state under recursion-wise caching: for every
  applied layer, the keys/values of exactly the tokens that layer processed, in order; it
  quacks like `gpt.LayerCache`, so `gpt.Attention` runs unchanged on it.
- Router losses: the expert-choice BCE auxiliary loss (§2.2.1, "auxiliary loss"), the
  Switch-style balancing loss (Fedus et al. 2021, eq. 4) and the router z-loss (Zoph et al.
  2022, eq. 5) of token-choice routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stoker.models.gpt import Block, Rope, apply_rope


def capacity(recursions: int, r: int, seq_len: int) -> int:
    """Tokens recursion r (0-based) keeps under hierarchical expert-choice capacity
    (R−r)/R: max(1, ⌊(R−r)·T/R⌋), integer arithmetic so 2/3·12 is 8, not 7."""
    return max(1, (recursions - r) * seq_len // recursions)


def compact(mask: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, n) of the True tokens of `mask` (B, T), position-sorted and padded to the
    row with the most (n; pass it when known, e.g. top-k's k, to spare a device sync), and
    which of them are real (B, n). Padding indices are distinct unselected positions that
    sort after every real one, so under a causal mask no real token ever attends to them, and
    writing their own values back leaves them unchanged."""
    n = int(mask.sum(dim=1).max()) if n is None else n
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # True first, in order
    idx = order[:, :n]  # (B, n)
    return idx, mask.gather(1, idx)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (B, n) of `x` (B, T, C) -> (B, n, C)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def gather_rope(rope: Rope | None, idx: torch.Tensor) -> Rope | None:
    """RoPE tables (T, D) of this forward's positions, taken at `idx` (B, n) -> (B, n, D)."""
    if rope is None:
        return None
    cos, sin = rope
    return cos[idx], sin[idx]  # (B, n, D) each


def shared_kv_block(
    block: Block,
    x: torch.Tensor,
    rope: Rope | None,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
) -> torch.Tensor:
    """`block` applied to `x` (B, n, C) at positions `q_pos` (B, n), its attention reading the
    given keys/values (B, K, S, D) of positions 0..S−1 instead of projecting its own."""
    B, n, C = x.shape
    attn = block.self_attn
    H, K, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.q_proj(block.input_layernorm(x)).view(B, n, H, D).transpose(1, 2)  # (B, H, n, D)
    if rope is not None:
        q = apply_rope(q, *rope)
    S = k.shape[2]
    if K != H:  # kv head g serves query heads g·H/K … (g+1)·H/K − 1, as in gpt.Attention
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B,H,S,D)
    mask = torch.arange(S, device=x.device) <= q_pos[..., None]  # (B, n, S)
    p = attn.dropout if block.training else 0.0
    y = F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None], dropout_p=p
    )  # (B, H, n, D)
    x = x + attn.o_proj(y.transpose(1, 2).reshape(B, n, H * D))  # (B, n, C)
    return x + block.mlp(block.post_attention_layernorm(x))


class KVRecorder:
    """A `LayerCache` stand-in for recursion 0 under recursive KV sharing: keeps the keys and
    values its attention used (after any inner cache) for the later recursions."""

    def __init__(self, inner: RowLayerCache | None):
        self.inner = inner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            k, v = self.inner.update(k, v)
        self.k, self.v = k, v  # (B, K, S, D)
        return k, v


class RowCache:
    """One batch row's decoding cache: per applied layer, the keys/values (1, K, S, D) of the
    tokens that layer processed (recursion-wise caching), and `length`, the positions seen.
    Buffers are allocated on first use: under KV sharing, recursions ≥ 1 never store any."""

    def __init__(self, n_layer: int, kv_heads: int, head_dim: int, max_len: int, device, dtype):
        self.shape = (1, kv_heads, max_len, head_dim)
        self.device, self.dtype, self.max_len = device, dtype, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.count = [0] * n_layer
        self.length = 0

    def layer(self, j: int) -> RowLayerCache:
        return RowLayerCache(self, j)


class RowLayerCache:
    """Applied layer j's view of a `RowCache`: appends the tokens it is given."""

    def __init__(self, row: RowCache, j: int):
        self.row, self.j = row, j

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        row, j = self.row, self.j
        start, T = row.count[j], k.shape[2]
        if start + T > row.max_len:
            raise ValueError(f"KV cache full: {start}+{T} > {row.max_len}")
        if row.k[j] is None:
            row.k[j] = torch.zeros(row.shape, device=row.device, dtype=row.dtype)
            row.v[j] = torch.zeros(row.shape, device=row.device, dtype=row.dtype)
        row.k[j][:, :, start : start + T] = k
        row.v[j][:, :, start : start + T] = v
        row.count[j] = start + T
        return row.k[j][:, :, : start + T], row.v[j][:, :, : start + T]  # (1, K, S, D)


class MoRCache:
    """Decoding cache of a MoR model: one `RowCache` per batch row, because threshold routing
    gives every row its own set of active tokens per recursion."""

    def __init__(self, rows: list[RowCache]):
        self.rows = rows

    @property
    def length(self) -> int:
        return self.rows[0].length


# ----------------------------------------------------------------------------- router losses
def expert_bce(
    logit: torch.Tensor, candidates: torch.Tensor | None, selected: torch.Tensor | None
) -> torch.Tensor:
    """Mean BCE(logit, selected) over the candidate tokens (B, T) of one recursion (all tokens
    when `candidates` is None; all selected when `selected` is None): trains sigmoid(logit)
    > 0.5 to predict the top-k choice, which causal decoding then uses."""
    target = torch.ones_like(logit) if selected is None else selected.to(logit.dtype)
    loss = F.binary_cross_entropy_with_logits(logit, target, reduction="none")  # (B, T)
    if candidates is None:
        return loss.mean()
    return (loss * candidates).sum() / candidates.sum().clamp(min=1)


def balance_loss(probs: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Switch-style Σ_i P_i·f_i with P_i the mean router probability of depth i and f_i = R ×
    the share of tokens choosing it; 1.0 when perfectly balanced. probs (B, T, R), choice (B, T)."""
    R = probs.shape[-1]
    P = probs.flatten(0, 1).mean(dim=0)  # (R,)
    f = R * torch.bincount(choice.flatten(), minlength=R).to(probs.dtype) / choice.numel()
    return (P * f).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of the router logits (B, T, R) (Zoph et al. 2022)."""
    return torch.logsumexp(logits, dim=-1).square().mean()
