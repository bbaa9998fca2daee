"""Typed recipe schema, YAML loading and `--section.key=value` overrides.

A recipe is data: a YAML file validated by the pydantic models below. Unknown keys, wrong
types and out-of-range values are `StokerError`s whose one-line message names the key (and the
nearest valid one, or the range), so the CLI can exit 2 without a traceback. Every number has
a range: sizes, steps and intervals are positive (a few documented ones allow 0 = off),
probabilities lie in [0, 1), NaN and infinity are refused. Model presets (docs/scaling.md §1)
live here too, as plain dictionaries merged under whatever the recipe sets explicitly.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, floats must be finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Ranges shared by many fields; `_format_error` turns a violation into one line naming the key.
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]  # hashed as uint64 (data/rng.py), seed + 1 used
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Probability = Annotated[float, Field(ge=0, lt=1)]  # dropout, Adam betas
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def is_device_name(name: str) -> bool:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps` (whether it exists is `pick_device`'s check)."""
    # N as torch parses it: no leading zero, at most 127 (torch's device index is an int8)
    m = re.fullmatch(r"cuda:(0|[1-9][0-9]{0,2})", name)
    return name in ("auto", "cpu", "cuda", "mps") or (m is not None and int(m[1]) < 128)


# ----------------------------------------------------------------------------------- model
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, for tests and the demo.
    "tiny-llama": dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                       vocab_size=512, max_seq_len=128, tie_embeddings=True),
    "tiny-gpt2": dict(arch="gpt2", n_layer=2, n_head=4, d_model=64, vocab_size=512,
                      max_seq_len=128, bias=True, tie_embeddings=True),
    # The model `stoker bench` measures (README, "Results").
    "bench-llama": dict(arch="llama", n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024,
                        vocab_size=8192, max_seq_len=256, tie_embeddings=False),
    # docs/scaling.md §1.
    "gpt2-124m": dict(arch="gpt2", n_layer=12, n_head=12, d_model=768, vocab_size=50257,
                      max_seq_len=1024, bias=True, tie_embeddings=True),
    "gpt2-1.36b": dict(arch="gpt2", n_layer=18, n_head=19, d_model=2432, d_ff=9728,
                       vocab_size=50304, max_seq_len=2048, bias=False, tie_embeddings=True),
    "llama-1.36b": dict(arch="llama", n_layer=18, n_head=18, d_model=2304, vocab_size=32000,
                        max_seq_len=2048, tie_embeddings=False),
    "smollm-360m": dict(arch="llama", n_layer=32, n_head=15, n_kv_head=5, d_model=960,
                        d_ff=2560, vocab_size=49152, max_seq_len=2048, tie_embeddings=True,
                        rope_theta=10000.0, norm_eps=1e-5),
    "smollm2-135m": dict(arch="llama", n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                         d_ff=1536, vocab_size=49152, max_seq_len=2048, tie_embeddings=True,
                         rope_theta=100000.0, norm_eps=1e-5),
}
# fmt: on


class ModelConfig(Section):
    """Decoder shape. `arch` picks the block family: `gpt2` (LayerNorm, GELU MLP, learned
    positions) or `llama` (RMSNorm, SwiGLU, RoPE, GQA; Qwen2 is llama with `qkv_bias`)."""

    preset: str | None = None
    arch: Literal["llama", "gpt2"] = "llama"
    n_layer: PositiveInt = 2
    n_head: PositiveInt = 4
    n_kv_head: PositiveInt | None = None  # None: = n_head (multi-head attention)
    d_model: PositiveInt = 64
    head_dim: PositiveInt | None = None  # None: d_model // n_head
    d_ff: PositiveInt | None = None  # None: 4·d (gpt2) or the LLaMA rule (llama)
    vocab_size: PositiveInt = 512
    max_seq_len: PositiveInt = 128
    bias: bool = False  # biases on every linear layer and norm (GPT-2)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    tie_embeddings: bool = True
    norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = 10000.0
    multiple_of: PositiveInt = 256
    ffn_dim_multiplier: PositiveFloat | None = None
    dropout: Probability = 0.0
    init_std: PositiveFloat = 0.02

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if not isinstance(name, str) or name not in PRESETS:  # a list is unhashable
                raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
            data = {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.n_head != 0:
            ok = [
                h for h in range(max(1, self.n_head - 4), self.n_head + 5) if self.d_model % h == 0
            ]
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                f"use a head count that divides it (e.g. {ok}) or set model.head_dim"
            )
        if self.n_head % self.kv_heads != 0:
            raise ValueError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.kv_heads}"
            )
        if self.arch == "llama" and self.dim_head % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.dim_head}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the MLP (docs/scaling.md §1 LLaMA rule when `d_ff` is unset)."""
        if self.d_ff is not None:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        hidden = int(2 * 4 * self.d_model / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# ------------------------------------------------------------------------------------ data
class TokenizerConfig(Section):
    """Either `path` (a tokenizer.json dir or file, GPT-2 vocab.json+merges.txt dir, a
    .tiktoken file or a SentencePiece .model) or a byte-level BPE trained on the sources."""

    path: str | None = None
    vocab_size: PositiveInt = 512  # trained BPE only (special tokens included)
    special_tokens: list[str] = ["<|endoftext|>"]  # trained BPE only; they get the first ids
    # The token appended after every document. None: the tokenizer's own (tokenizer_config.json,
    # SentencePiece's </s>, GPT-2/tiktoken's <|endoftext|>); <|endoftext|> for a trained BPE.
    eos_token: str | None = None
    pattern: str | None = None  # pre-tokenization regex of a .tiktoken file of unknown size


class LoaderConfig(Section):
    """How training batches are built (stoker.data.loader.loader_settings): "auto" = 0 workers
    on CPU, min(4, cores per GPU process - 1) workers + pinned memory on CUDA; docs/data.md."""

    num_workers: NonNegativeInt | Literal["auto"] = "auto"
    pin_memory: bool | Literal["auto"] = "auto"
    prefetch_factor: PositiveInt = 2  # batches each worker builds ahead


class DataConfig(LoaderConfig):
    """Corpus -> tokenizer -> token shards in `dir` (see stoker.data.prepare)."""

    # Paths/globs/dirs of .txt/.md/.rst/.py (a document per file), .jsonl and .parquet
    # (`text_field`), or built-in corpora: python-stdlib, wiki-en (see stoker.data.corpora).
    sources: list[str] = ["python-stdlib"]
    text_field: str = "text"
    tokenizer: TokenizerConfig = TokenizerConfig()
    dir: str = "data/tiny"
    # share of documents held out, chosen with `seed` (1 would leave nothing to train on)
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    seed: Seed = 1234
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    max_documents: PositiveInt | None = None  # keep the first N documents of the sources
    shard_tokens: PositiveInt = 2**28  # tokens per shard file (a split's last one is shorter)

    @field_validator("sources", mode="before")
    @classmethod
    def _one_source_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_data(self) -> DataConfig:
        if not self.sources:
            raise ValueError(
                "data.sources is empty; name at least one path, glob or corpus (e.g. python-stdlib)"
            )
        return self


# ----------------------------------------------------------------------------------- train
class TrainConfig(Section):
    out_dir: str = "runs/tiny"
    max_steps: PositiveInt = 100
    seed: Seed = 1337
    batch_size: PositiveInt = 8  # global sequences per optimizer step
    micro_batch_size: PositiveInt = 8  # sequences per process per forward (<= batch_size)
    seq_len: PositiveInt | None = None  # None: model.max_seq_len (at most that)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False
    # LM head + cross-entropy fused in row chunks under autocast (models/loss.py): no (B·T, V)
    # logits kept; auto = on for CUDA (memory), off on CPU (up to 20 % slower there: docs/log.md)
    fused_loss: Literal["auto", "on", "off"] = "auto"
    # bit-identical runs (stoker/reproducibility.py): auto = on for CPU runs (MKL CNR mode,
    # cost in docs/log.md), off on GPUs (deterministic CUDA kernels are slower)
    deterministic: bool | Literal["auto"] = "auto"
    activation_checkpointing: bool = False
    grad_clip: NonNegativeFloat = 1.0  # max global gradient norm; 0 = off
    log_interval: PositiveInt = 10
    eval_interval: NonNegativeInt = 50  # 0 = off
    eval_steps: PositiveInt = 10  # validation batches per evaluation
    save_interval: PositiveInt = 100
    keep_last: PositiveInt = 2  # checkpoints kept in out_dir
    resume: str = "auto"  # auto | never | PATH
    # start from these weights (RUN | CHECKPOINT | HF_DIR): architecture and tokenizer come
    # from there, the optimizer starts fresh (fine-tuning, continued pretraining)
    init_from: str | None = None
    nan_policy: Literal["stop", "skip"] = "stop"
    # an evaluation metric of the recipe (val_loss, ...): stop when it stops improving
    early_stopping_metric: str | None = None
    early_stopping_patience: PositiveInt = 3
    # seconds between system samples (system.jsonl); 0 = off
    monitor_interval: NonNegativeFloat = 5.0

    @field_validator("device")
    @classmethod
    def _check_device_name(cls, v: str) -> str:
        if not is_device_name(v):
            raise ValueError(f"train.device={v!r} is not a device; use {DEVICE_NAMES}")
        return v

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        if self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"train.micro_batch_size={self.micro_batch_size} exceeds train.batch_size="
                f"{self.batch_size} (the global batch per step); lower train.micro_batch_size "
                "or raise train.batch_size"
            )
        return self


class OptimConfig(Section):
    lr: NonNegativeFloat = 3e-4  # peak learning rate
    min_lr_ratio: Fraction = 0.1  # final lr = lr · min_lr_ratio
    weight_decay: NonNegativeFloat = 0.1
    betas: tuple[Probability, Probability] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 10
    decay_fraction: Fraction = 0.2  # WSD: final fraction of steps spent decaying


class DistConfig(Section):
    strategy: Literal["ddp", "zero1", "fsdp2"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class TrackConfig(Section):
    mlflow: bool = False
    mlflow_uri: str | None = None  # None: sqlite:///<out_dir>/mlflow.db
    tensorboard: bool = False
    wandb: bool = False
    experiment: str = "stoker"


class MoRConfig(Section):
    """Mixture-of-Recursions (Bae et al. 2025; docs/mor.md): the `model.n_layer` applied
    layers share weights over `recursions`; `router` picks each token's depth (`none`: the
    recursive baseline). See models/mor.py."""

    recursions: PositiveInt = 2
    sharing: Literal["cycle", "sequence", "middle_cycle", "middle_sequence"] = "middle_cycle"
    router: Literal["expert", "token", "none"] = "expert"
    kv_cache: Literal["recursion", "shared"] = "recursion"  # recursion-wise | recursive sharing
    # 0: Linear(d, out) routers; h > 0: the paper's MLP router, Linear(d, h) → GELU → Linear(h, out)
    router_hidden: NonNegativeInt = 0
    alpha: PositiveFloat = 0.1  # expert-choice gate α·sigmoid(logit)
    # router none only: each recursion's update h + c·F(h) instead of F(h) — the routers'
    # gated update with a fixed gate, an ablation control (docs/log.md); None = plain F(h)
    baseline_gate: PositiveFloat | None = None
    aux_loss_coeff: NonNegativeFloat = 0.001  # expert-choice BCE
    balance_coeff: NonNegativeFloat = 0.1  # token-choice Switch-style balancing loss
    z_loss_coeff: NonNegativeFloat = 1e-5  # token-choice router z-loss
    # token-choice loss-free bias balancing step (0 = off)
    bias_balance_rate: NonNegativeFloat = 0.0
    init: Literal["random", "stepwise", "average", "lower", "upper"] = "random"
    init_from: str | None = None  # decoder checkpoint to uptrain from (init != random)

    @field_validator("router", mode="before")
    @classmethod
    def _none_is_no_router(cls, v: Any) -> Any:
        return "none" if v is None else v  # `--mor.router=none` arrives as None

    @model_validator(mode="after")
    def _check_mor(self) -> MoRConfig:
        if self.baseline_gate is not None and self.router != "none":
            raise ValueError(
                "mor.baseline_gate applies to the recursive baseline only "
                "(mor.router=none); routers learn their own gates"
            )
        if (self.init == "random") != (self.init_from is None):
            raise ValueError(
                "mor.init=random takes no mor.init_from; stepwise/average/lower/"
                "upper need mor.init_from=CHECKPOINT (e.g. from stoker import-hf)"
            )
        cyclic = self.sharing in ("cycle", "middle_cycle")
        if (
            not cyclic
            and self.recursions > 1
            and (self.router != "none" or self.kv_cache == "shared")
        ):
            raise ValueError(
                f"mor.sharing={self.sharing} supports only the recursive baseline "
                "(mor.router=none, mor.kv_cache=recursion); routing and KV sharing "
                "need a recursion block: use cycle or middle_cycle"
            )
        return self


# fine-tuning sections (config_finetune.py; imported here, the one place configs come from)
from stoker.config_finetune import EncoderConfig, LoRAConfig, SFTDataConfig  # noqa: E402


class RecipeConfig(Section):
    """The sections every recipe has; `recipe` names which one (a discriminated union: each
    recipe is a subclass with its own sections, chosen by `recipe_class`). This class itself
    is the pretraining recipe."""

    recipe: Literal["pretrain"] = "pretrain"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    dist: DistConfig = DistConfig()
    track: TrackConfig = TrackConfig()

    @model_validator(mode="after")
    def _check_seq_len(self) -> RecipeConfig:
        seq, most = self.train.seq_len, self.model.max_seq_len
        if seq is not None and seq > most and self.train.init_from is None:
            # GPT-2 has no position past it; RoPE is untrained (with init_from the source's
            # max_seq_len decides, checked when it is read)
            raise ValueError(
                f"train.seq_len={seq} exceeds model.max_seq_len={most}; lower "
                "train.seq_len or raise model.max_seq_len"
            )
        return self


class MoRRecipeConfig(RecipeConfig):
    """Mixture-of-Recursions pretraining (uptraining from a decoder: `mor.init_from`)."""

    recipe: Literal["mor"] = "mor"  # type: ignore[assignment]
    mor: MoRConfig = MoRConfig()

    @model_validator(mode="after")
    def _check_sharing(self) -> MoRRecipeConfig:
        n, r, middle = self.model.n_layer, self.mor.recursions, "middle" in self.mor.sharing
        shared = n - 2 if middle else n
        if shared <= 0 or shared % r:
            name = "model.n_layer-2" if middle else "model.n_layer"
            raise ValueError(
                f"mor.sharing={self.mor.sharing} needs {name}={shared} "
                f"divisible by mor.recursions={r}"
            )
        if self.train.init_from is not None:
            raise ValueError(
                "a MoR recipe uptrains from a decoder with mor.init_from (and mor.init); "
                "train.init_from is for decoder recipes"
            )
        return self


class FinetuneRecipeConfig(RecipeConfig):
    """Supervised fine-tuning of a decoder from `train.init_from`: full (no `lora` section) or
    LoRA adapters on a frozen base (`lora`); loss on assistant tokens only."""

    recipe: Literal["finetune"] = "finetune"  # type: ignore[assignment]
    data: SFTDataConfig = SFTDataConfig()  # type: ignore[assignment]
    lora: LoRAConfig | None = None  # None: full fine-tuning


from stoker.config_dynamo import DynamoRecipeConfig  # noqa: E402
from stoker.config_multimodal import MultimodalRecipeConfig  # noqa: E402

RECIPES: dict[str, type[RecipeConfig]] = {
    "pretrain": RecipeConfig,
    "mor": MoRRecipeConfig,
    "finetune": FinetuneRecipeConfig,
    "dynamo": DynamoRecipeConfig,
    "multimodal": MultimodalRecipeConfig,
}


def recipe_class(data: Any) -> type[RecipeConfig]:
    """The recipe class `data["recipe"]` names; without one, `mor` if a MoR section is there,
    else `pretrain`."""
    from stoker.errors import StokerError

    name = data.get("recipe") if isinstance(data, dict) else None
    if name is None:
        name = "mor" if isinstance(data, dict) and data.get("mor") is not None else "pretrain"
    if not isinstance(name, str) or name not in RECIPES:
        raise StokerError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


# ------------------------------------------------------------------------------- loading
# YAML, overrides and one-line errors live in config_load.py; re-exported here, the one place
# callers import configs from.
from stoker.config_load import (  # noqa: E402
    dump_config,
    load_config,
    parse_override_value,
    parse_overrides,
    valid_keys,
    validate_config,
)

__all__ = [
    "RECIPES",
    "DataConfig",
    "DistConfig",
    "DynamoRecipeConfig",
    "MultimodalRecipeConfig",
    "EncoderConfig",
    "FinetuneRecipeConfig",
    "LoRAConfig",
    "ModelConfig",
    "MoRConfig",
    "MoRRecipeConfig",
    "OptimConfig",
    "RecipeConfig",
    "SFTDataConfig",
    "TokenizerConfig",
    "TrackConfig",
    "TrainConfig",
    "dump_config",
    "load_config",
    "parse_override_value",
    "parse_overrides",
    "recipe_class",
    "valid_keys",
    "validate_config",
]
