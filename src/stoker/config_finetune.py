"""Recipe sections of fine-tuning: supervised data and LoRA adapters (schema rules as in
config.py, which imports this module once its base sections exist and re-exports both)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from stoker.config import (
    LoaderConfig,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Section,
    Seed,
)


class SFTDataConfig(LoaderConfig):
    """Supervised samples -> token ids + target masks in `dir` (stoker.data.sft): JSONL
    (`messages`, `prompt`/`response`, Alpaca `instruction`/`input`/`output`), parquet, or a
    built-in set (python-stdlib-docstrings). Loss only on assistant tokens + the end token."""

    sources: list[str] = ["python-stdlib-docstrings"]
    dir: str = "data/sft-tiny"
    tokenizer: str | None = None  # None: train.init_from's own tokenizer
    template: str = "auto"  # auto (the tokenizer's chat template, else plain) | plain | FILE
    eos_token: str | None = None  # None: the tokenizer's own
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    seed: Seed = 1234
    max_samples: PositiveInt | None = None  # keep the first N samples of the sources
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    # bucket: rows of similar length padded to the longest (fastest, docs/log.md); pack: whole
    # samples packed per row, attention kept inside each; pad: pad every row to seq_len
    batching: Literal["bucket", "pack", "pad"] = "bucket"
    pad_multiple: PositiveInt = 8  # bucket: pad each micro-batch to a multiple of this
    # a sample whose targets all lie past seq_len: error (naming its file and record) | skip
    too_long: Literal["error", "skip"] = "error"

    @field_validator("sources", mode="before")
    @classmethod
    def _one_source_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_sources(self) -> SFTDataConfig:
        if not self.sources:
            raise ValueError("data.sources is empty; name at least one JSONL/parquet file or set")
        return self


class LoRAConfig(Section):
    """Low-rank adapters (Hu et al. 2021) on the linear layers `targets` names: W x + s·B A x,
    s = alpha/r, or alpha/sqrt(r) with `rslora` (Kalajdzievski 2023). See models/lora.py."""

    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Probability = 0.0  # on the adapter's input only
    # fnmatch patterns on a module's dotted name or a dotted suffix of it (q_proj, self_attn.*,
    # layers.0.*), comma-separated on the command line; all-linear: every linear but the LM head
    targets: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]
    rslora: bool = False
    ranks: dict[str, PositiveInt] | None = None  # pattern -> r; the first matching pattern wins

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all-linear":  # `--lora.targets=q_proj,v_proj`
            return [t.strip() for t in v.split(",")]
        return v

    @model_validator(mode="after")
    def _check_targets(self) -> LoRAConfig:
        if isinstance(self.targets, list) and (not self.targets or not all(self.targets)):
            raise ValueError(
                "lora.targets needs non-empty module patterns (e.g. q_proj,v_proj) or all-linear"
            )
        return self


class EncoderConfig(Section):
    """Encoder shape. `arch` picks the position scheme: `bert` (0..T-1) or `roberta`
    (from `pad_token_id + 1`, skipping pads). `max_seq_len` is the number of position rows
    (HF's `max_position_embeddings`); RoBERTa can use `max_seq_len - pad_token_id - 1` of them."""

    arch: Literal["bert", "roberta"] = "bert"
    n_layer: PositiveInt = 2
    n_head: PositiveInt = 4
    d_model: PositiveInt = 64
    d_ff: PositiveInt | None = None  # None: 4·d_model
    vocab_size: PositiveInt = 512
    max_seq_len: PositiveInt = 128
    type_vocab_size: PositiveInt = 2
    norm_eps: PositiveFloat = 1e-12
    dropout: Probability = 0.0  # embeddings, attention probabilities, residual branches
    pad_token_id: NonNegativeInt | None = 0
    use_pooler: bool = False
    init_std: PositiveFloat = 0.02

    @model_validator(mode="after")
    def _check_shape(self) -> EncoderConfig:
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"encoder.d_model={self.d_model} is not divisible by encoder.n_head={self.n_head}"
            )
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"encoder.pad_token_id={self.pad_token_id} is outside the vocabulary "
                f"(vocab_size={self.vocab_size})"
            )
        if self.arch == "roberta" and self.pad_token_id is None:
            raise ValueError("encoder.arch=roberta needs pad_token_id (its positions skip pads)")
        if self.arch == "roberta" and self.max_seq_len <= self.pad_token_id + 1:
            raise ValueError(
                f"encoder.max_seq_len={self.max_seq_len} leaves no RoBERTa positions after "
                f"pad_token_id + 1 = {self.pad_token_id + 1}"
            )
        return self

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def dim_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table covers."""
        if self.arch == "roberta":
            return self.max_seq_len - self.pad_token_id - 1
        return self.max_seq_len
