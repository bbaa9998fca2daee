"""Typed recipe schema, YAML loading and `--section.key=value` overrides.

A recipe is data: a YAML file validated by the pydantic models below. Unknown keys and wrong
types are `StokerError`s whose one-line message names the key (and the nearest valid one), so
the CLI can exit 2 without a traceback. Model presets (REFERENCE.md §1) live here too, as plain
dictionaries merged under whatever the recipe sets explicitly.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from stoker.errors import StokerError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------- model
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, for tests and the demo.
    "tiny-llama": dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                       vocab_size=512, max_seq_len=128, tie_embeddings=True),
    "tiny-gpt2": dict(arch="gpt2", n_layer=2, n_head=4, d_model=64, vocab_size=512,
                      max_seq_len=128, bias=True, tie_embeddings=True),
    # The spine benchmark's model (issue 2).
    "bench-llama": dict(arch="llama", n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024,
                        vocab_size=8192, max_seq_len=256, tie_embeddings=False),
    # REFERENCE.md §1.
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


class ModelConfig(Section):
    """Decoder shape. `arch` picks the block family: `gpt2` (LayerNorm, GELU MLP, learned
    positions) or `llama` (RMSNorm, SwiGLU, RoPE, GQA; Qwen2 is llama with `qkv_bias`)."""

    preset: str | None = None
    arch: Literal["llama", "gpt2"] = "llama"
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (multi-head attention)
    d_model: int = 64
    head_dim: int | None = None  # None: d_model // n_head
    d_ff: int | None = None  # None: 4·d (gpt2) or the LLaMA rule (llama)
    vocab_size: int = 512
    max_seq_len: int = 128
    bias: bool = False  # biases on every linear layer and norm (GPT-2)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    dropout: float = 0.0
    init_std: float = 0.02

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
            data = {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        for key in ("n_layer", "n_head", "d_model", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive")
        if self.head_dim is None and self.d_model % self.n_head != 0:
            ok = [h for h in range(max(1, self.n_head - 4), self.n_head + 5)
                  if self.d_model % h == 0]
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                f"use a head count that divides it (e.g. {ok}) or set model.head_dim")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"model.n_head={self.n_head} is not divisible by "
                             f"model.n_kv_head={self.kv_heads}")
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
        """Hidden width of the MLP (REFERENCE.md §1 LLaMA rule when `d_ff` is unset)."""
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
    vocab_size: int = 512  # trained BPE only (special tokens included)
    special_tokens: list[str] = ["<|endoftext|>"]  # trained BPE only; they get the first ids
    # The token appended after every document. None: the tokenizer's own (tokenizer_config.json,
    # SentencePiece's </s>, GPT-2/tiktoken's <|endoftext|>); <|endoftext|> for a trained BPE.
    eos_token: str | None = None
    pattern: str | None = None  # pre-tokenization regex of a .tiktoken file of unknown size


class DataConfig(Section):
    """Corpus -> tokenizer -> token shards in `dir` (see stoker.data.prepare)."""

    # Paths/globs/dirs of .txt/.md/.rst/.py (a document per file), .jsonl and .parquet
    # (`text_field`), or built-in corpora: python-stdlib, wiki-en (see stoker.data.corpora).
    sources: list[str] = ["python-stdlib"]
    text_field: str = "text"
    tokenizer: TokenizerConfig = TokenizerConfig()
    dir: str = "data/tiny"
    val_fraction: float = 0.05  # share of documents held out, chosen with `seed`
    seed: int = 1234
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    max_documents: int | None = None  # keep the first N documents of the sources
    shard_tokens: int = 2**28  # tokens per shard file (the last one of a split is shorter)
    # Training batches (stoker.data.loader.loader_settings): "auto" = 0 workers on CPU,
    # min(4, cores per GPU process - 1) workers + pinned memory on CUDA; see docs/data.md.
    num_workers: int | Literal["auto"] = "auto"
    pin_memory: bool | Literal["auto"] = "auto"
    prefetch_factor: int = 2  # batches each worker builds ahead

    @field_validator("sources", mode="before")
    @classmethod
    def _one_source_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_data(self) -> DataConfig:
        if not self.sources:
            raise ValueError("data.sources is empty; name at least one path, glob or corpus "
                             "(e.g. python-stdlib)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_documents is not None and self.max_documents <= 0:
            raise ValueError(f"data.max_documents must be positive, got {self.max_documents}")
        if self.shard_tokens <= 0:
            raise ValueError(f"data.shard_tokens must be positive, got {self.shard_tokens}")
        if isinstance(self.num_workers, int) and self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 or auto, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        return self


# ----------------------------------------------------------------------------------- train
class TrainConfig(Section):
    out_dir: str = "runs/tiny"
    max_steps: int = 100
    seed: int = 1337
    batch_size: int = 8  # global sequences per optimizer step
    micro_batch_size: int = 8  # sequences per process per forward
    seq_len: int | None = None  # None: model.max_seq_len
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    grad_clip: float = 1.0
    log_interval: int = 10
    eval_interval: int = 50
    eval_steps: int = 10
    save_interval: int = 100
    keep_last: int = 2
    resume: str = "auto"  # auto | never | PATH
    nan_policy: Literal["stop", "skip"] = "stop"
    early_stopping_metric: Literal["val_loss"] | None = None  # stop when it stops improving
    early_stopping_patience: int = 3
    monitor_interval: float = 5.0  # seconds between system samples (system.jsonl); 0 = off


class OptimConfig(Section):
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # WSD: final fraction of steps spent decaying


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
    """Mixture-of-Recursions (Bae et al. 2025; REFERENCE.md §4): the `model.n_layer` applied
    layers share weights over `recursions`; `router` picks each token's depth (`none`: the
    recursive baseline). See models/mor.py."""

    recursions: int = 2
    sharing: Literal["cycle", "sequence", "middle_cycle", "middle_sequence"] = "middle_cycle"
    router: Literal["expert", "token", "none"] = "expert"
    kv_cache: Literal["recursion", "shared"] = "recursion"  # recursion-wise | recursive sharing
    # 0: Linear(d, out) routers; h > 0: the paper's MLP router, Linear(d, h) → GELU → Linear(h, out)
    router_hidden: int = 0
    alpha: float = 0.1  # expert-choice gate α·sigmoid(logit)
    # router none only: each recursion's update h + c·F(h) instead of F(h) — the routers'
    # gated update with a fixed gate, an ablation control (docs/log.md); None = plain F(h)
    baseline_gate: float | None = None
    aux_loss_coeff: float = 0.001  # expert-choice BCE
    balance_coeff: float = 0.1  # token-choice Switch-style balancing loss
    z_loss_coeff: float = 1e-5  # token-choice router z-loss
    bias_balance_rate: float = 0.0  # token-choice loss-free bias balancing step (0 = off)
    init: Literal["random", "stepwise", "average", "lower", "upper"] = "random"
    init_from: str | None = None  # decoder checkpoint to uptrain from (init != random)

    @field_validator("router", mode="before")
    @classmethod
    def _none_is_no_router(cls, v: Any) -> Any:
        return "none" if v is None else v  # `--mor.router=none` arrives as None

    @model_validator(mode="after")
    def _check_mor(self) -> MoRConfig:
        if self.recursions < 1:
            raise ValueError(f"mor.recursions must be >= 1, got {self.recursions}")
        if self.baseline_gate is not None and self.router != "none":
            raise ValueError("mor.baseline_gate applies to the recursive baseline only "
                             "(mor.router=none); routers learn their own gates")
        if self.router_hidden < 0:
            raise ValueError(f"mor.router_hidden must be >= 0 (0 = linear router), got "
                             f"{self.router_hidden}")
        if (self.init == "random") != (self.init_from is None):
            raise ValueError("mor.init=random takes no mor.init_from; stepwise/average/lower/"
                             "upper need mor.init_from=CHECKPOINT (e.g. from stoker import-hf)")
        cyclic = self.sharing in ("cycle", "middle_cycle")
        if not cyclic and self.recursions > 1 and (self.router != "none"
                                                   or self.kv_cache == "shared"):
            raise ValueError(f"mor.sharing={self.sharing} supports only the recursive baseline "
                             "(mor.router=none, mor.kv_cache=recursion); routing and KV sharing "
                             "need a recursion block: use cycle or middle_cycle")
        return self


class RecipeConfig(Section):
    recipe: str = "pretrain"
    model: ModelConfig = ModelConfig()
    mor: MoRConfig | None = None  # set: a Mixture-of-Recursions model (models/mor.py)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    dist: DistConfig = DistConfig()
    track: TrackConfig = TrackConfig()

    @model_validator(mode="after")
    def _check_sharing(self) -> RecipeConfig:
        if self.mor is not None:
            n, r, middle = self.model.n_layer, self.mor.recursions, "middle" in self.mor.sharing
            shared = n - 2 if middle else n
            if shared <= 0 or shared % r:
                name = "model.n_layer-2" if middle else "model.n_layer"
                raise ValueError(f"mor.sharing={self.mor.sharing} needs {name}={shared} "
                                 f"divisible by mor.recursions={r}")
        return self


# ------------------------------------------------------------------------------- loading
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_override_value(text: str) -> Any:
    """`--a.b=VALUE`: lists/maps/null/bools via YAML; numbers (incl. `3e-4`) and strings as-is
    for pydantic to coerce against the field's type."""
    if text.strip().startswith(("[", "{")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise StokerError(f"cannot parse override value {text!r}: {e}") from None
    if text.lower() in ("null", "none", "~"):
        return None
    return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--train.max_steps=30", "--optim.lr", "3e-4"]` -> {"train.max_steps": "30", ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise StokerError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise StokerError(f"override --{key} has no value; write --{key}=VALUE")
            value, i = args[i + 1], i + 1
        out[key] = parse_override_value(value)
        i += 1
    return out


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a recipe may set."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        ann = next((a for a in get_args(ann) if a is not type(None)), ann)  # X | None -> X
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {} if child is None else child
            node[p] = child
        node = child
    node[parts[-1]] = value


def _format_error(err: ValidationError, schema: type[BaseModel], data: dict[str, Any]) -> str:
    e = err.errors()[0]
    # union members (`int | Literal["auto"]`) add their tags to the location: leave them out
    loc = [p for p in e["loc"] if not (isinstance(p, str) and (p in ("int", "bool", "float", "str")
                                                               or p.startswith("literal[")))]
    key = ".".join(str(p) for p in loc)
    if len(err.errors()) > 1 and all(x["loc"][: len(loc)] == e["loc"][: len(loc)]
                                     for x in err.errors()):
        e = {**e, "msg": " or ".join(x["msg"] for x in err.errors())}
    if e["type"] == "extra_forbidden":
        near = difflib.get_close_matches(key, valid_keys(schema), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"unknown config key {key!r}{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if not key:
        return f"invalid config: {msg}"
    if e["type"] == "value_error":  # our validators name their keys themselves
        return f"invalid config: {msg}"
    return f"invalid value for {key}: {e.get('input')!r} ({msg})"


def validate_config(data: dict[str, Any], schema: type[BaseModel] = RecipeConfig) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise StokerError(_format_error(err, schema, data)) from None


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None,
                schema: type[BaseModel] = RecipeConfig) -> Any:
    """Read a YAML recipe (or start from defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise StokerError(f"recipe file not found: {p} (pass a path to a .yaml recipe)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise StokerError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise StokerError(f"{p}: a recipe must be a YAML mapping of sections")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return validate_config(data, schema)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (printed at start, saved with every checkpoint)."""
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)
