"""Bidirectional transformer encoders: the BERT family (BERT, RoBERTa).

Features, by `EncoderConfig.arch`:
- `bert` (Devlin et al. 2019, §3): post-LN blocks, x = LN(x + attn(x)), then x = LN(x + mlp(x));
  learned absolute positions 0..T-1; token type (segment) embeddings; embedding LayerNorm and
  dropout; biases on every linear and norm; exact erf GELU in the MLP (BERT's `gelu`, not the
  tanh approximation GPT-2 uses); an optional pooler, tanh(dense(h[CLS])), which next-sentence
  prediction trained and sequence-classification checkpoints use.
- `roberta` (Liu et al. 2019): the same network; position ids are fairseq's: they start at
  `pad_token_id + 1` and skip pad tokens (found by id, as `transformers` does), so the
  position table holds `max_seq_len` rows of which `pad_token_id + 1` are never used as
  positions; one token type (`type_vocab_size=1`).
- Padding: `attention_mask` (B, T), 1 = real token, becomes a boolean key-padding mask for
  `F.scaled_dot_product_attention` (flash/efficient kernels on GPU). Pad positions still get
  hidden states (they attend to the real tokens), exactly as in `transformers`.
- Weight init lives in one place, `init_weights`.

Names: `embeddings.*` and `pooler.dense` are Hugging Face BERT's, so those convert by prefix;
inside a layer the names are the project's LLaMA ones (`self_attn.{q,k,v,o}_proj`,
`mlp.{up,down}_proj`), so LoRA targets the same module names in encoders and decoders.
Post-LN norms are `post_attention_layernorm` and `post_mlp_layernorm` (applied after each
residual add). `models/hf_encoder.py` maps them to and from HF's `attention.self.query`, ...
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.config import EncoderConfig


class BertEmbeddings(nn.Module):
    """word + position + token type embeddings, then LayerNorm and dropout; positions 0..T-1."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        C = cfg.d_model
        self.word_embeddings = nn.Embedding(cfg.vocab_size, C, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, C, padding_idx=self.position_pad)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, C)
        self.LayerNorm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def position_pad(self) -> int | None:
        """The position row that pads use and that gets no gradient (none for BERT)."""
        return None

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(1, T) for BERT: every sequence uses positions 0..T-1."""
        T = input_ids.shape[1]
        return torch.arange(T, device=input_ids.device)[None]  # (1, T)

    def position_of(self, index: torch.Tensor) -> torch.Tensor:
        """The position id of the real token at `index` (0-based) of an unpadded row."""
        return index

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`position_ids` (B, T): given when `input_ids` continue cached tokens (decoding)."""
        B, T = input_ids.shape
        limit = self.config.max_tokens
        if position_ids is None and limit < T:
            raise ValueError(
                f"{T} tokens exceed the {limit} positions of this encoder "
                f"(max_seq_len={self.config.max_seq_len}); truncate the input"
            )
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        elif int(position_ids.max()) >= self.config.max_seq_len:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond the {limit} positions of this "
                f"encoder (max_seq_len={self.config.max_seq_len}); generate fewer tokens"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, T)
        x = self.word_embeddings(input_ids)  # (B, T, C)
        x = x + self.token_type_embeddings(token_type_ids)  # (B, T, C)
        x = x + self.position_embeddings(position_ids)  # (B, T, C)
        return self.dropout(self.LayerNorm(x))


class RobertaEmbeddings(BertEmbeddings):
    """BERT's embeddings with fairseq positions: pad + 1, pad + 2, ... over the non-pad tokens,
    and `pad_token_id` itself for pads (that row gets no gradient)."""

    @property
    def position_pad(self) -> int | None:
        return self.config.pad_token_id

    def position_of(self, index: torch.Tensor) -> torch.Tensor:
        return index + self.config.pad_token_id + 1

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T), HF's `create_position_ids_from_input_ids`."""
        pad = self.config.pad_token_id
        real = input_ids.ne(pad).long()  # (B, T)
        return torch.cumsum(real, dim=1) * real + pad  # (B, T)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with a key-padding mask."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        C = cfg.d_model
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.dim_head, cfg.dropout
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.o_proj = nn.Linear(C, C)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: list | None = None
    ) -> torch.Tensor:
        """`mask` (B, 1, 1, L) or (B, 1, T, L), True = a key that may be attended to; L = T,
        or with `cache` (this layer's [k, v], empty at first) the cached keys + T: the new
        keys and values are appended to it (incremental decoding)."""
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)  # (B, H, L, D)
            cache[:] = [k, v]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, H·D)
        return self.o_proj(y)


class MLP(nn.Module):
    """up, exact (erf) GELU, down."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class EncoderLayer(nn.Module):
    """Post-LN block (Vaswani et al. 2017; BERT): x = LN(x + drop(attn(x))), then
    x = LN(x + drop(mlp(x)))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.post_mlp_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: list | None = None
    ) -> torch.Tensor:
        x = self.post_attention_layernorm(x + self.dropout(self.self_attn(x, mask, cache)))
        return self.post_mlp_layernorm(x + self.dropout(self.mlp(x)))


class Pooler(nn.Module):
    """tanh(dense(h[:, 0])): the [CLS] / <s> summary BERT's NSP head trained."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, C)


class Encoder(nn.Module):
    """Embeddings, `n_layer` post-LN layers, optional pooler.

    `forward(input_ids, attention_mask, token_type_ids)` returns the last hidden states
    (B, T, C); `pool(hidden)` the pooled [CLS] vector (B, C) when `use_pooler` is set.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        embeddings = RobertaEmbeddings if cfg.arch == "roberta" else BertEmbeddings
        self.embeddings = embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.pooler = Pooler(cfg) if cfg.use_pooler else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: list[list] | None = None,
    ) -> torch.Tensor:
        """`attention_mask` (B, T): 1 = a real token every position may attend to. Or
        `attn_mask` (B, T, L) bool, True where query i may attend to key j (e.g. a
        sequence-to-sequence mask); give one of the two, or neither (full attention).
        Incremental decoding: `cache` from `new_cache()` keeps every layer's keys and values
        (L = the cached tokens + T), `position_ids` (B, T) place the new tokens; exact where
        no earlier position may attend to a later one (a causal or UniLM mask)."""
        B, T = input_ids.shape
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, C)
        mask = None  # no host sync on the mask's contents: it goes to SDPA as given
        if attn_mask is not None:
            if attention_mask is not None:
                raise ValueError("give attention_mask (B, T) or attn_mask (B, T, T), not both")
            mask = attn_mask.bool().view(B, 1, T, -1)  # (B, 1, T, L): queries × keys per row
        elif attention_mask is not None:
            mask = attention_mask.bool().view(B, 1, 1, T)  # (B, 1, 1, T): keys per batch row
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if cache is None else cache[i])  # (B, T, C)
        return x

    def new_cache(self) -> list[list]:
        """An empty key/value cache for `forward(..., cache=)`: one [k, v] per layer."""
        return [[] for _ in self.layers]

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pooler output (B, C) of last hidden states (B, T, C)."""
        if self.pooler is None:
            raise ValueError("this encoder has no pooler (EncoderConfig.use_pooler=false)")
        return self.pooler(hidden)


def init_weights(model: nn.Module, std: float) -> None:
    """Every weight's initial value, in one place, as BERT initializes: normal(0, std) for
    linear and embedding weights, zeros for biases and for embedding padding rows, ones for
    LayerNorm weights."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_encoder(cfg: EncoderConfig, device: str | torch.device | None = None) -> Encoder:
    """A freshly initialized encoder; `device="meta"` builds shapes only (for counting)."""
    with torch.device(device or "cpu"):
        model = Encoder(cfg)
    if str(device) != "meta":
        init_weights(model, cfg.init_std)
    return model


def count_encoder_params(cfg: EncoderConfig) -> int:
    """Exact parameter count, in closed form (equals `sum(p.numel())` of `build_encoder`)."""
    C, Fd, L = cfg.d_model, cfg.ffn_dim, cfg.n_layer
    embeddings = (cfg.vocab_size + cfg.max_seq_len + cfg.type_vocab_size) * C + 2 * C
    layer = 4 * (C * C + C) + (C * Fd + Fd) + (Fd * C + C) + 2 * 2 * C
    pooler = C * C + C if cfg.use_pooler else 0
    return embeddings + L * layer + pooler
