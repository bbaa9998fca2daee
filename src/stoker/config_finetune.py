"""Recipe sections of fine-tuning: supervised data and LoRA adapters (schema rules as in
config.py, which imports this module once its base sections exist and re-exports both)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from stoker.config import LoaderConfig, PositiveFloat, PositiveInt, Probability, Section, Seed


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
