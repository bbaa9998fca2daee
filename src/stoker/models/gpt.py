"""Decoder-only transformer language models: the GPT-2 and LLaMA families.

Features, by `ModelConfig.arch`:
- `gpt2`: learned absolute positions, LayerNorm (weight-only when `bias` is off), GELU(tanh)
  MLP, optional biases everywhere, tied embeddings (Radford et al. 2019).
- `llama`: rotary position embeddings with `rope_theta` (Su et al. 2021), RMSNorm, SwiGLU MLP
  (Shazeer 2020), grouped-query attention (Ainslie et al. 2023), tied or untied LM head.
  Qwen2 is `llama` with biases on q/k/v (`qkv_bias`).
- Training path: `F.scaled_dot_product_attention(is_causal=True)` (flash/efficient kernels on GPU).
- Decoding path: a preallocated KV cache (`KVCache`); a cached forward equals a full forward.
- Weight init lives in one place, `init_weights`.

Submodule names follow Hugging Face LLaMA, so `models/hf.py` converts mostly by renaming.
`Block` is reused by `models/mor.py`; it takes RoPE tables for arbitrary (gathered) positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.config import ModelConfig
from stoker.models.loss import linear_cross_entropy, lm_loss_sum
from stoker.models.loss import lm_loss as lm_loss  # re-exported: callers import it from here

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (T, D) or (B, T, D), float32


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), statistics in float32 as LLaMA does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> Rope:
    """cos/sin for `positions` (T,) or (B, T): each (..., D) in the rotate-half layout HF uses."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (D/2,)
    freqs = positions.float()[..., None] * inv_freq  # (..., D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k (B, H, T, D) by the tables (T, D) or (B, T, D), in float32 (the tables'
    dtype), the result in x's dtype. Differentiable through `_RopeFunction`: the gradient of
    a rotation is the rotation by the opposite angle, so backward keeps no activations (two
    q/k-sized tensors per call fewer than autograd through the chunk/cat/mul ops; the step
    time is the same, docs/log.md)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _RopeFunction.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class _RopeFunction(torch.autograd.Function):
    """y = x·cos + rotate_half(x)·sin. With tables whose two halves are equal (rope_tables
    repeats the frequencies), dL/dx = g·cos − rotate_half(g·sin) = rotate(g, cos, −sin):
    the same values autograd computes through the ops, bit for bit (tests/models)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class KVCache:
    """Preallocated keys/values for every layer, (B, K, S_max, D) each, and how many positions
    are filled. `Decoder.forward` appends the new positions and advances `length`."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.kv_heads, max_len, cfg.dim_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.length = 0

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)


class LayerCache:
    """One layer's view of a `KVCache`."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, T = self.cache.length, k.shape[2]
        if start + T > self.cache.max_len:
            raise ValueError(f"KV cache full: {start}+{T} > {self.cache.max_len}")
        ck, cv = self.cache.k[self.index], self.cache.v[self.index]
        ck[:, :, start : start + T] = k
        cv[:, :, start : start + T] = v
        return ck[:, :, : start + T], cv[:, :, : start + T]  # (B, K, S, D)


class Attention(nn.Module):
    """Causal multi-head / grouped-query self-attention, optional RoPE, optional KV cache."""

    qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # decoding.fuse_projections

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H, K, D = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.dim_head
        self.n_head, self.n_kv_head, self.head_dim = H, K, D
        self.dropout = cfg.dropout
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(C, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(C, K * D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, K * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        cache: LayerCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`attn_mask` (B, 1, T, T) bool, True = may attend, replaces the causal mask (packed
        rows: causal within each document)."""
        B, T, C = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        if self.qkv is not None and not torch.is_grad_enabled():  # one GEMM (fuse_projections)
            q, k, v = F.linear(x, *self.qkv).split([H * D, K * D, K * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S, D), S = past + T
        S = k.shape[2]
        gqa = K != H and x.device.type == "cpu"  # CPU kernels share kv heads without copies
        if K != H and not gqa:  # share each kv head across H/K query heads
            k = k[:, :, None].expand(B, K, H // K, S, D).reshape(B, H, S, D)
            v = v[:, :, None].expand(B, K, H // K, S, D).reshape(B, H, S, D)
        mask, causal = attn_mask, T > 1 and attn_mask is None
        if T > 1 and S > T:  # a chunk after a cached prefix: query i sees keys <= S - T + i
            i = torch.arange(T, device=x.device)[:, None]
            mask = torch.arange(S, device=x.device)[None, :] <= (S - T) + i  # (T, S)
            causal = False
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, enable_gqa=gqa
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H·D)
        return self.o_proj(y)


class GeluMLP(nn.Module):
    """GPT-2 MLP: up, GELU (tanh approximation, GPT-2's `gelu_new`), down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.bias
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=bias)

    gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and not torch.is_grad_enabled():
            gate, up = F.linear(x, *self.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.arch == "llama" else GeluMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        cache: LayerCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding (+ learned positions for GPT-2), `n_layer` blocks, final norm, LM head.

    `forward(input_ids)` returns logits (B, T, V). With a `KVCache` the ids are the next
    positions after those already cached. Packed rows (several documents per row) pass
    `position_ids` (B, T), restarting at 0 in each document, and `attn_mask` (B, 1, T, T).
    """

    takes_targets = True  # forward(ids, targets=...) returns the loss sum (subclasses: False)
    fused_loss = False  # with targets under autocast: head + loss fused (train.fused_loss)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope_cache: Rope | None = None  # tables for positions 0.., see `_rope_range`

    def embed(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, Rope | None]:
        """Embedded tokens (B, T, C) and the RoPE tables for `positions` (None for GPT-2)."""
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if self.embed_positions is not None:
            return self.drop(x + self.embed_positions(positions)), None
        return self.drop(x), rope_tables(positions, self.config.dim_head, self.config.rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ):
        """Logits (B, T, V); with `targets` (B, T, shifted already, -100 = ignored) instead
        (Σ next-token cross-entropy in float32, number of targets), as `lm_loss_sum` of the
        logits — with `fused_loss` under autocast through `loss.linear_cross_entropy`,
        which never holds the (B·T, V) logits."""
        if inputs_embeds is not None:  # token embeddings given (e.g. with spliced-in features)
            return self._forward_embeds(inputs_embeds, cache)
        B, T = input_ids.shape
        if position_ids is not None:  # packed rows: their own positions and mask, no cache
            x, rope = self.embed(input_ids, position_ids)  # (B, T, C)
            for layer in self.layers:
                x = layer(x, rope, None, attn_mask)  # (B, T, C)
            return self._output(x, targets)
        start = cache.length if cache is not None else 0
        if self.embed_positions is not None and start + T > self.config.max_seq_len:
            raise ValueError(
                f"{start + T} positions exceed max_seq_len="
                f"{self.config.max_seq_len} of this learned-position model"
            )
        if self.embed_positions is not None:
            x, rope = self.embed(input_ids, torch.arange(start, start + T, device=input_ids.device))
        else:  # slices of cached tables: a decoding step costs no table recomputation
            x = self.drop(self.embed_tokens(input_ids))  # (B, T, C)
            rope = self._rope_range(start, start + T, input_ids.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache.layer(i) if cache is not None else None)  # (B, T, C)
        if cache is not None:
            cache.length += T
        return self._output(x, targets)

    def _output(self, x: torch.Tensor, targets: torch.Tensor | None):
        """Logits (B, T, V) of the final hidden states, or with `targets` their loss sum and
        count (fused with the head under autocast when `fused_loss` is set, outside
        torch.compile's graphs: inductor fuses the plain form itself)."""
        h = self.norm(x)
        if targets is None:
            return self.lm_head(h)  # (B, T, V)
        autocast = torch.is_autocast_enabled(h.device.type)
        if self.fused_loss and autocast and not torch.compiler.is_compiling():
            return linear_cross_entropy(h, self.lm_head.weight, targets)
        return lm_loss_sum(self.lm_head(h), targets)

    def _forward_embeds(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """`forward` from token embeddings (B, T, C) instead of ids: positions as for ids."""
        T, start = x.shape[1], cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=x.device)
        if self.embed_positions is not None:
            if start + T > self.config.max_seq_len:
                raise ValueError(
                    f"{start + T} positions exceed max_seq_len="
                    f"{self.config.max_seq_len} of this learned-position model"
                )
            x, rope = self.drop(x + self.embed_positions(positions)), None
        else:
            x, rope = self.drop(x), self._rope_range(start, start + T, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.length += T
        return self._output(x, None)

    def _rope_range(self, start: int, end: int, device: torch.device) -> Rope:
        """RoPE tables for positions start..end-1, equal to `rope_tables(arange(start, end))`:
        slices of tables computed once per device for max(end, max_seq_len) positions.
        Under torch.compile the graph computes them itself (fused, and no guard on the Python
        cache that would recompile the forward on its second call)."""
        if torch.compiler.is_compiling():
            return rope_tables(
                torch.arange(start, end, device=device),
                self.config.dim_head,
                self.config.rope_theta,
            )
        if (
            self._rope_cache is None
            or self._rope_cache[0].device != device
            or self._rope_cache[0].shape[0] < end
        ):
            n = max(end, self.config.max_seq_len)
            with torch.inference_mode(False):  # normal tensors, so autograd may save them later
                self._rope_cache = rope_tables(
                    torch.arange(n, device=device), self.config.dim_head, self.config.rope_theta
                )
        cos, sin = self._rope_cache
        return cos[start:end], sin[start:end]  # (T, D) each

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(
            self.config, batch, max_len or self.config.max_seq_len, p.device, dtype or p.dtype
        )


def init_weights(model: nn.Module, std: float, n_layer: int) -> None:
    """Every weight's initial value, in one place: normal(0, std) for linear and embedding
    weights, std/sqrt(2·n_layer) for projections that write into the residual stream (GPT-2
    §2.3), zeros for biases, ones for norm weights."""
    residual_std = std / math.sqrt(2 * n_layer)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out_proj = name.endswith(("o_proj", "down_proj"))
            nn.init.normal_(module.weight, 0.0, residual_std if out_proj else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig, device: str | torch.device | None = None) -> Decoder:
    """A freshly initialized decoder; `device="meta"` builds shapes only (for counting)."""
    with torch.device(device or "cpu"):
        model = Decoder(cfg)
    if str(device) != "meta":
        init_weights(model, cfg.init_std, cfg.n_layer)
    return model
