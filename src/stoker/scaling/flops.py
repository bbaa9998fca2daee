"""Exact parameter counts, training FLOPs per token and memory per GPU of stoker's decoders.

Pure arithmetic on a `ModelConfig` (no torch), dispatched on `cfg.arch`: GPT-2 (LayerNorm,
GELU MLP, learned positions) and LLaMA (RMSNorm, SwiGLU, GQA; Qwen2 = LLaMA + q/k/v biases).
Every count follows models/gpt.py layer by layer; tests check them against
`sum(p.numel())` of a meta-built model, `torch.utils.flop_counter.FlopCounterMode` and the
tensors autograd saves.

Sources:
- PaLM (Chowdhery et al. 2022, appendix B): training FLOPs/token = 6N + 12·L·H·Q·T, the form
  nanoGPT and torchtitan report MFU with; they differ in which N (see `CONVENTIONS`).
- Kaplan et al. 2020, table 1: C_forward = 2N + 2·L·T·d_attn, N without embeddings.
- Korthikanti et al. 2022, §4: activation memory per layer, redone here for stoker's blocks.
- Rajbhandari et al. 2020 (ZeRO), §3: mixed-precision AdamW holds 16 bytes/param (fp32
  weights 4, fp32 grads 4, Adam m and v 8); stage 1 shards the 8 bytes of optimizer state.
Extension points: `count_params_shared` (Mixture-of-Recursions layer sharing, docs/mor.md) and `count_lora_params` (adapters) count what those models will add.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from stoker.config import ModelConfig, MoRConfig
from stoker.errors import StokerError

CONVENTIONS: dict[str, str] = {
    "palm": "6N + 12·L·H·Q·T, N = all parameters (PaLM app. B; stoker's MFU)",
    "nanogpt": "6N + 12·L·H·Q·T, N = all but position embeddings (nanoGPT estimate_mfu)",
    "torchtitan": "6N + 12·L·H·Q·T, N = all but nn.Embedding tables (torchtitan)",
    "nonembed": "6N + 12·L·H·Q·T, N = non-embedding (no embedding, position, untied head)",
    "kaplan": "6N + 6·L·T·H·Q, N = non-embedding (Kaplan et al. 2020, table 1)",
    "detailed": "3 × forward matmuls: projections, causal attention (T+1)/2, LM head",
}
MOR_CONVENTIONS: dict[str, str] = {
    "palm": "6·N_applied + 12·H·Q·T·Σ c_l², N_applied = Σ capacity c_l × layer params (MoR)",
    "detailed": "3 × forward matmuls, linear ∝ capacity c, attention ∝ c² (MoR)",
}
STRATEGIES = ("ddp", "zero1", "fsdp2")
SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ParamCount:
    """Parameters by component; per-layer fields are for one block."""

    embedding: int  # token embedding table V·C
    position: int  # learned position table (GPT-2), else 0
    lm_head: int  # untied output projection, 0 when tied to the embedding
    attention: int  # one block: q/k/v/o weights and biases
    mlp: int  # one block
    norms: int  # one block: its two norms
    final_norm: int
    n_layer: int  # blocks with their own weights (unique blocks under sharing)

    @property
    def layer(self) -> int:
        return self.attention + self.mlp + self.norms

    @property
    def total(self) -> int:
        return (
            self.embedding
            + self.position
            + self.lm_head
            + self.n_layer * self.layer
            + self.final_norm
        )

    @property
    def non_embedding(self) -> int:
        """Kaplan's N: blocks and norms, without the vocabulary and position matrices."""
        return self.total - self.embedding - self.position - self.lm_head

    @property
    def without_embedding_tables(self) -> int:
        """torchtitan's N: every parameter except `nn.Embedding` tables (an untied head stays)."""
        return self.total - self.embedding - self.position


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer of one block, by Hugging Face name."""
    C, H, K, D, F = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.dim_head, cfg.ffn_dim
    shapes = {
        "q_proj": (C, H * D),
        "k_proj": (C, K * D),
        "v_proj": (C, K * D),
        "o_proj": (H * D, C),
    }
    if cfg.arch == "llama":
        shapes.update(gate_proj=(C, F), up_proj=(C, F), down_proj=(F, C))
    else:
        shapes.update(up_proj=(C, F), down_proj=(F, C))
    return shapes


def _norm_params(cfg: ModelConfig) -> int:
    with_bias = cfg.arch == "gpt2" and cfg.bias  # LayerNorm(bias=cfg.bias); RMSNorm has none
    return cfg.d_model * (2 if with_bias else 1)


def count_params(cfg: ModelConfig) -> ParamCount:
    """Exact parameter count of `build_model(cfg)` (tied weights counted once)."""
    shapes = linear_shapes(cfg)
    attn = [n for n in shapes if n in ATTENTION_LINEARS]
    mlp = [n for n in shapes if n not in ATTENTION_LINEARS]
    attention = sum(shapes[n][0] * shapes[n][1] for n in attn)
    if cfg.bias or cfg.qkv_bias:
        attention += sum(shapes[n][1] for n in ("q_proj", "k_proj", "v_proj"))
    if cfg.bias:
        attention += cfg.d_model  # o_proj
    mlp_params = sum(shapes[n][0] * shapes[n][1] + (shapes[n][1] if cfg.bias else 0) for n in mlp)
    table = cfg.vocab_size * cfg.d_model
    return ParamCount(
        embedding=table,
        position=cfg.max_seq_len * cfg.d_model if cfg.arch == "gpt2" else 0,
        lm_head=0 if cfg.tie_embeddings else table,
        attention=attention,
        mlp=mlp_params,
        norms=2 * _norm_params(cfg),
        final_norm=_norm_params(cfg),
        n_layer=cfg.n_layer,
    )


def unique_layers(n_layer: int, recursions: int, sharing: str) -> int:
    """Blocks with their own weights when `n_layer` applied layers share weights over
    `recursions` (Bae et al. 2025 §2.2; docs/mor.md): cycle/sequence keep n/R, the
    middle_* variants keep the first and last layers unique and share the n−2 between."""
    if sharing not in SHARING:
        raise StokerError(f"unknown sharing {sharing!r}; known: {', '.join(SHARING)}")
    if recursions < 1:
        raise StokerError(f"recursions must be >= 1, got {recursions}")
    shared = n_layer - 2 if sharing.startswith("middle") else n_layer
    if shared <= 0 or shared % recursions:
        raise StokerError(
            f"{sharing} sharing needs {'n_layer-2' if shared != n_layer else 'n_layer'}"
            f"={shared} divisible by recursions={recursions}"
        )
    return shared // recursions + (n_layer - shared)


def count_params_shared(cfg: ModelConfig, recursions: int, sharing: str) -> ParamCount:
    """Parameters of a Mixture-of-Recursions model built on `cfg`: only unique blocks count
    (routers, which the MoR model adds, are not included)."""
    return replace(count_params(cfg), n_layer=unique_layers(cfg.n_layer, recursions, sharing))


def count_lora_params(
    cfg: ModelConfig, rank: int, targets: tuple[str, ...] = ("q_proj", "v_proj"), adapters: int = 1
) -> int:
    """Trainable parameters of `adapters` LoRA adapters (Hu et al. 2021): rank·(in + out)
    per targeted linear layer of every block."""
    shapes = linear_shapes(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise StokerError(f"unknown LoRA target(s) {unknown}; known: {', '.join(shapes)}")
    per_layer = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    return adapters * cfg.n_layer * per_layer


# ----------------------------------------------------------------------------------- FLOPs
def forward_flops(cfg: ModelConfig, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Forward matmul FLOPs per token (2 per multiply-add), by component, all layers summed.

    Attention scores and values cost 2·H·Q·T_ctx each, T_ctx = (T+1)/2 averaged over causal
    positions or T when `causal` is False (what kernels without masking skip compute, and what
    FlopCounterMode counts). Norms, activations, softmax and biases are left out (< 1%).
    """
    L, H, Q = cfg.n_layer, cfg.n_head, cfg.dim_head
    shapes = linear_shapes(cfg)
    ctx = (seq_len + 1) / 2 if causal else seq_len
    return {
        "attention_proj": L
        * sum(2.0 * i * o for n, (i, o) in shapes.items() if n in ATTENTION_LINEARS),
        "attention_scores": L * 2 * (2.0 * H * Q * ctx),  # q·kᵀ and softmax·v
        "mlp": L * sum(2.0 * i * o for n, (i, o) in shapes.items() if n not in ATTENTION_LINEARS),
        "lm_head": 2.0 * cfg.d_model * cfg.vocab_size,
    }


def flops_per_token(
    cfg: ModelConfig, seq_len: int, convention: str = "palm", mor: MoRConfig | None = None
) -> float:
    """Training (forward + backward) FLOPs per token under a named convention (`CONVENTIONS`;
    `MOR_CONVENTIONS` with `mor`, see `mor_flops_per_token`).

    The default is PaLM's 6N + 12·L·H·Q·T with N = all parameters, the figure stoker's MFU uses.
    """
    if mor is not None:
        return mor_flops_per_token(cfg, mor, seq_len, convention)
    if convention not in CONVENTIONS:
        raise StokerError(
            f"unknown FLOPs convention {convention!r}; known: {', '.join(CONVENTIONS)}"
        )
    if convention == "detailed":
        return 3.0 * sum(forward_flops(cfg, seq_len, causal=True).values())
    p = count_params(cfg)
    n = {
        "palm": p.total,
        "nanogpt": p.total - p.position,
        "torchtitan": p.without_embedding_tables,
        "nonembed": p.non_embedding,
        "kaplan": p.non_embedding,
    }
    attention = 12.0 * cfg.n_layer * cfg.n_head * cfg.dim_head * seq_len
    if convention == "kaplan":
        attention /= 2  # Kaplan counts q·kᵀ only: 2·L·T·d_attn per forward
    return 6.0 * n[convention] + attention


def frozen_flops_per_token(cfg: ModelConfig, seq_len: int, trainable: int) -> float:
    """Training FLOPs per token with the base frozen and `trainable` adapter parameters (LoRA),
    in the PaLM convention: forward 2N and input gradients 2N for every weight, weight
    gradients 2N for the trainable ones only, so 4·N_base + 6·N_adapter + attention."""
    attention = 12.0 * cfg.n_layer * cfg.n_head * cfg.dim_head * seq_len
    return 4.0 * count_params(cfg).total + 6.0 * trainable + attention


# ------------------------------------------------------------------ Mixture-of-Recursions
def mor_router_params(cfg: ModelConfig, mor: MoRConfig) -> int:
    """Router weights of a MoR model: R × Linear(C, 1) (expert-choice) or Linear(C, R)
    (token-choice); with `router_hidden` h each is Linear(C, h) + Linear(h, out) instead;
    none for the recursive baseline or R = 1 (models/mor.py)."""
    R, C, h = mor.recursions, cfg.d_model, mor.router_hidden
    if mor.router == "none" or R == 1:
        return 0
    if h == 0:
        return C * R
    return R * (C * h + h) if mor.router == "expert" else C * h + h * R


def mor_token_counts(mor: MoRConfig, seq_len: int) -> list[int]:
    """Tokens of a T-token sequence that each recursion processes: expert-choice's
    hierarchical capacity max(1, ⌊(R−r)·T/R⌋) (docs/mor.md), which is also token-choice
    under perfect balance (1/R of the tokens per depth); all T for the recursive baseline."""
    R, T = mor.recursions, seq_len
    if mor.router == "none" or R == 1:
        return [T] * R
    return [max(1, (R - r) * T // R) for r in range(R)]


def mor_layer_capacities(cfg: ModelConfig, mor: MoRConfig, seq_len: int) -> list[float]:
    """Share of the tokens each applied layer processes, in order."""
    edge = 1 if mor.sharing.startswith("middle") else 0
    block = (cfg.n_layer - 2 * edge) // mor.recursions
    inner = [n / seq_len for n in mor_token_counts(mor, seq_len) for _ in range(block)]
    return [1.0] * edge + inner + [1.0] * edge


def mor_forward_flops(
    cfg: ModelConfig, mor: MoRConfig, seq_len: int, causal: bool = True
) -> dict[str, float]:
    """Forward matmul FLOPs per token of a MoR model, by component, capacity-aware: a
    recursion processing c·T tokens costs c × the linear FLOPs and, with recursion-wise KV
    caching, c² × the attention-score FLOPs (c·T queries over c·T keys). Under KV sharing,
    recursions ≥ 1 skip the k/v projections and their c·T queries read all T keys."""
    T, H, Q = seq_len, cfg.n_head, cfg.dim_head
    shapes = linear_shapes(cfg)
    proj = sum(2.0 * i * o for n, (i, o) in shapes.items() if n in ATTENTION_LINEARS)
    kv = sum(2.0 * i * o for n, (i, o) in shapes.items() if n in ("k_proj", "v_proj"))
    mlp = sum(2.0 * i * o for n, (i, o) in shapes.items() if n not in ATTENTION_LINEARS)

    def ctx(n: int) -> float:
        return (n + 1) / 2 if causal else n

    edge = 2 if mor.sharing.startswith("middle") else 0
    block = (cfg.n_layer - edge) // mor.recursions
    out = {
        "attention_proj": edge * proj,
        "attention_scores": edge * 4.0 * H * Q * ctx(T),
        "mlp": edge * mlp,
        "router": 2.0 * mor_router_params(cfg, mor),  # every router sees every token
        "lm_head": 2.0 * cfg.d_model * cfg.vocab_size,
    }
    for r, n in enumerate(mor_token_counts(mor, T)):
        c, shared = n / T, mor.kv_cache == "shared" and r > 0
        out["attention_proj"] += block * c * (proj - (kv if shared else 0.0))
        out["attention_scores"] += block * c * 4.0 * H * Q * ctx(T if shared else n)
        out["mlp"] += block * c * mlp
    return out


def mor_flops_per_token(
    cfg: ModelConfig, mor: MoRConfig, seq_len: int, convention: str = "palm"
) -> float:
    """Training FLOPs per token of a MoR model. `palm`: 6·N_applied + 12·H·Q·T·Σ_l a_l, where
    N_applied counts each applied layer's parameters × its capacity c_l (k/v left out under
    KV sharing) and a_l = c_l² (c_l with KV sharing): the vanilla formula when every c_l = 1.
    `detailed`: 3 × `mor_forward_flops`."""
    if convention == "detailed":
        return 3.0 * sum(mor_forward_flops(cfg, mor, seq_len, causal=True).values())
    if convention != "palm":
        raise StokerError(f"MoR FLOPs conventions: palm, detailed (got {convention!r})")
    p, shapes = count_params_shared(cfg, mor.recursions, mor.sharing), linear_shapes(cfg)
    kv = sum(i * o for n, (i, o) in shapes.items() if n in ("k_proj", "v_proj"))
    edge = 2 if mor.sharing.startswith("middle") else 0
    block = (cfg.n_layer - edge) // mor.recursions
    n_applied = p.total - p.n_layer * p.layer + mor_router_params(cfg, mor) + edge * p.layer
    attention = float(edge)
    for r, n in enumerate(mor_token_counts(mor, seq_len)):
        c, shared = n / seq_len, mor.kv_cache == "shared" and r > 0
        n_applied += block * c * (p.layer - (kv if shared else 0))
        attention += block * (c if shared else c * c)
    return 6.0 * n_applied + 12.0 * cfg.n_head * cfg.dim_head * seq_len * attention


def mor_summary(cfg: ModelConfig, mor: MoRConfig, seq_len: int) -> dict:
    """A MoR model's sharing, router, tokens per recursion and ratios to the vanilla decoder
    of `cfg` (what `stoker count` adds for a recipe with a `mor` section)."""
    return {
        **mor.model_dump(include={"recursions", "sharing", "router", "kv_cache"}),
        "unique_layers": unique_layers(cfg.n_layer, mor.recursions, mor.sharing),
        "router_params": mor_router_params(cfg, mor),
        "tokens_per_recursion": mor_token_counts(mor, seq_len),
        "vanilla_params_non_embedding": count_params(cfg).non_embedding,
        "flops_ratio_to_vanilla": {
            c: mor_flops_per_token(cfg, mor, seq_len, c) / flops_per_token(cfg, seq_len, c)
            for c in MOR_CONVENTIONS
        },
    }


# ---------------------------------------------------------------------------------- memory
def precision_mode(precision: str, strategy: str) -> str:
    """How weights and activations are held: `autocast` (fp32 weights, bf16/fp16 autocast:
    ddp, zero1), `low` (FSDP2 MixedPrecisionPolicy: bf16 params, fp32 reduce) or `fp32`."""
    if precision == "fp32":
        return "fp32"
    return "low" if strategy == "fsdp2" else "autocast"


def _norm_bytes(cfg: ModelConfig, mode: str) -> int:
    """Per token saved by one norm: LayerNorm its input (plus per-token mean/rstd); our RMSNorm
    its fp32 input and the normalized tensor (fp32, or bf16 when params are bf16)."""
    if cfg.arch == "llama":
        return 4 * cfg.d_model + (2 if mode == "low" else 4) * cfg.d_model
    return (2 if mode == "low" else 4) * cfg.d_model


def layer_activation_bytes(cfg: ModelConfig, mode: str) -> float:
    """Bytes per token that one block saves for backward, op by op as in models/gpt.py.

    Autocast keeps the residual stream in fp32 and casts each linear layer's input separately
    (q, k, v: 3 copies; gate, up: 2). Attention is flash-style (q, k, v, output and a
    log-sum-exp; no T×T matrix); k and v are expanded to H heads before SDPA, so GQA saves
    no activation memory here.
    """
    C, F, HQ = cfg.d_model, cfg.ffn_dim, cfg.n_head * cfg.dim_head
    act = 4 if mode == "fp32" else 2  # matmul outputs
    casts = mode == "autocast"
    if cfg.arch == "llama":
        mlp, mlp_inputs = 4 * act * F, 2  # gate out, silu out, up out, product
    else:
        mlp, mlp_inputs = 2 * act * F, 1  # up out (GELU input), GELU out
    qkv_in = (3 if casts else 1) * act * C
    mlp_in = (mlp_inputs if casts else 1) * act * C
    sdpa = 4 * act * HQ + 4 * cfg.n_head  # q, k, v, out; fp32 log-sum-exp per head
    return 2 * _norm_bytes(cfg, mode) + qkv_in + sdpa + mlp_in + mlp


def head_activation_bytes(cfg: ModelConfig, mode: str) -> dict[str, float]:
    """Bytes of the final norm + LM head + loss: `saved` per token for backward, the
    `transient` per token a step holds at the start of backward, and `fixed` bytes per
    micro-batch. fp32: the plain head — the LM-head input, the fp32 log-softmax (4V) saved,
    the logits and their gradient (8V) transient. Under autocast / bf16 params the head and
    loss are fused (models/loss.py): the gradient w.r.t. the final hidden state (in its
    dtype) is saved per token, nothing of size V per token, and the head's float32 weight
    gradient (4·V·C) per micro-batch."""
    V, C = cfg.vocab_size, cfg.d_model
    if mode == "fp32":
        return {"saved": _norm_bytes(cfg, mode) + 4 * C + 4 * V, "transient": 8 * V, "fixed": 0}
    hidden = 2 if mode == "low" else 4  # the final norm's output: fp32 under autocast
    return {"saved": _norm_bytes(cfg, mode) + hidden * C, "transient": 0, "fixed": 4 * V * C}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU for one training configuration."""

    strategy: str
    num_gpus: int
    tokens: int  # micro-batch × sequence length
    weights: float
    grads: float
    optimizer: float
    weight_copies: float  # autocast's low-precision weight cache, or FSDP2 gather buffers
    activations: float  # one micro-batch without activation checkpointing
    activations_checkpointed: float  # with per-block activation checkpointing

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer

    def total(self, checkpointing: bool = False) -> float:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.states + self.weight_copies + act


def estimate_memory(
    cfg: ModelConfig,
    strategy: str = "ddp",
    num_gpus: int = 1,
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    precision: str = "bf16",
    mor: MoRConfig | None = None,
) -> MemoryEstimate:
    """Memory per GPU for AdamW training: states, weight copies and activations.

    ddp: 4 B weights + 4 B grads + 8 B Adam (m, v) per param on every GPU (16 B, docs/scaling.md §3).
    zero1: the 8 B of optimizer state sharded over GPUs. fsdp2: all 16 B sharded, plus gather
    buffers (two units in bf16 and one unit's unsharded gradient in bf16 + fp32).
    Not counted: CUDA context, allocator fragmentation, NCCL and DDP buckets
    (assumes `gradient_as_bucket_view=True`), cuBLAS workspaces.
    With `mor`, weights are the unique blocks and activations scale with the applied layers'
    capacities (routers and router activations are left out: < 0.01%).
    """
    if strategy not in STRATEGIES:
        raise StokerError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    T = seq_len or cfg.max_seq_len
    tokens, g = micro_batch_size * T, num_gpus
    p = count_params(cfg) if mor is None else count_params_shared(cfg, mor.recursions, mor.sharing)
    applied = cfg.n_layer if mor is None else sum(mor_layer_capacities(cfg, mor, T))
    mode = precision_mode(precision, strategy)
    n = p.total
    weights, grads, optim = 4.0 * n, 4.0 * n, 8.0 * n
    if strategy in ("zero1", "fsdp2"):
        optim /= g
    matmul_weights = n - p.position - (0 if cfg.tie_embeddings else p.embedding)
    copies = 0.0 if mode == "fp32" else 2.0 * matmul_weights
    if strategy == "fsdp2":
        weights, grads = weights / g, grads / g
        unit = max(p.layer, p.embedding + p.position, p.lm_head + p.final_norm)
        # two units gathered (current + prefetched) and one unit's unsharded gradient
        copies = unit * (2 * 2 + 2 + 4) if mode == "low" else unit * (2 * 4 + 4)
    layer = layer_activation_bytes(cfg, mode)
    head = head_activation_bytes(cfg, mode)
    res = 2 if mode == "low" else 4
    per_token = applied * layer + head["saved"] + head["transient"]
    ckpt = applied * res * cfg.d_model + layer + head["saved"] + head["transient"]
    act, act_ckpt = tokens * per_token + head["fixed"], tokens * ckpt + head["fixed"]
    return MemoryEstimate(strategy, g, tokens, weights, grads, optim, copies, act, act_ckpt)
