"""Recipe sections of DYNAMO (tasks/dynamo/): one frozen encoder, one LoRA adapter + head per
task, a router that mixes the adapters per input, trained in phases 1 (adapters), 2 (router)
and 3 (joint). Schema rules as in config.py, which re-exports these."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from stoker.config import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Probability,
    RecipeConfig,
    Section,
    Seed,
)
from stoker.config_finetune import EncoderConfig, LoRAConfig

TaskKind = Literal["classify", "qa", "seq2seq"]
METRICS = {  # kind -> metrics its evaluation reports (all 0..100, higher is better)
    "classify": ("accuracy",),
    "qa": ("f1", "exact_match"),
    "seq2seq": ("rougeL", "rouge1", "rouge2", "bleu", "exact_match", "parse_rate"),
}


class DynamoTaskConfig(Section):
    """One task: its data file, what kind of head it has and the metric it is judged by."""

    name: str
    kind: TaskKind
    file: str  # JSONL/JSON/parquet records, relative to data.dir (or absolute)
    # which columns the file's records have (our JSONL, or SST-2 / SQuAD / XSum / CNN-DM / WMT /
    # MBPP, local copies): auto = by kind (classify: sentiment, qa: qa, seq2seq: code if `code`
    # else summarization's source/target, document/summary, article/highlights)
    format: Literal["auto", "sentiment", "qa", "summarization", "translation", "code"] = "auto"
    metric: str | None = None  # None: the kind's first metric (accuracy, f1, rougeL)
    max_examples: PositiveInt | None = None  # a cap on the training records (sst2_size, …)
    n_labels: PositiveInt = 2  # classify
    code: bool = False  # seq2seq targets are Python code (newline/indent tokens)
    max_source: PositiveInt = 96  # seq2seq: source tokens (specials included)
    max_target: PositiveInt = 32  # seq2seq: target tokens (end token included)
    doc_stride: PositiveInt = 32  # qa: overlap of the windows of long contexts
    max_answer_length: PositiveInt = 30  # qa: tokens
    steps: PositiveInt | None = None  # phase 1 steps of this task (None: dynamo.phase1.max_steps)
    # held-out files (same format as `file`), every record scored as an extra row of
    # `stoker eval` (e.g. qa_real.jsonl: real SQuAD-style examples beside the templated ones)
    extra_eval: list[str] = []
    source_lang: str | None = None  # translation format: the keys of WMT's `translation`
    target_lang: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DynamoTaskConfig:
        metric = self.metric or METRICS[self.kind][0]
        if metric not in METRICS[self.kind]:
            raise ValueError(
                f"dynamo task {self.name}: metric {metric} is not one of a {self.kind} task's "
                f"({', '.join(METRICS[self.kind])})"
            )
        return self

    @property
    def main_metric(self) -> str:
        return self.metric or METRICS[self.kind][0]


class DynamoDataConfig(Section):
    """Where the tasks' records are (`scripts/dynamo_data.py DIR` writes the offline set) and
    how they are tokenized."""

    dir: str = "data/dynamo"
    tokenizer: str | None = None  # None: train.init_from's; `pkg:PACKAGE/sub/dir` resolves
    max_length: PositiveInt = 128  # classify and qa windows (tokens, specials included)
    seed: Seed = 1234
    eval_examples: PositiveInt = 64  # held-out records per task for each evaluation
    num_workers: int | Literal["auto"] = 0  # the loop's loader (batches are built in memory)
    pin_memory: bool | Literal["auto"] = "auto"
    prefetch_factor: PositiveInt = 2


class PhaseConfig(Section):
    max_steps: PositiveInt = 100
    lr: PositiveFloat = 1e-3
    eval_interval: PositiveInt = 50
    early_stopping_patience: PositiveInt | None = None  # evals without improvement; None: off


class RouterConfig(Section):
    """MLP on the frozen encoder's masked mean-pooled encoding -> one logit per adapter."""

    hidden: PositiveInt = 256
    dropout: Probability = 0.1
    # segments: pool the first segment and the second (a QA context) apart, concatenated; mean:
    # one pool over the whole input (a QA pair then looks like the passage it holds)
    pool: Literal["mean", "segments"] = "segments"
    n_adapters: PositiveInt | None = None  # must equal the number of tasks when given
    tau_start: PositiveFloat = 1.0  # softmax temperature, scheduled linearly over phase 2
    tau_end: PositiveFloat = 0.3
    straight_through: bool = False  # hard top-1 forward, soft gradients
    task_id_weight: NonNegativeFloat = 1.0  # supervised task-id loss, fading to 0 over phase 2
    balance_weight: NonNegativeFloat = 0.01  # load balancing (Switch Transformer's f·P)
    sampling_temperature: PositiveFloat = 2.0  # tasks sampled ∝ n_t^(1/T)


class JointConfig(PhaseConfig):
    adapter_lr_scale: PositiveFloat = 0.1  # adapters + heads, × phase3.lr
    router_lr_scale: PositiveFloat = 1.0
    oracle_start: Probability = 0.8  # share of examples run with oracle gates, scheduled
    oracle_end: Probability = 0.2
    distill_weight: NonNegativeFloat = 0.5  # KL to the phase-1 outputs (against forgetting)


class GenerationConfig(Section):
    num_beams: PositiveInt = 1
    max_new_tokens: PositiveInt = 32
    length_penalty: float = 1.0


class DynamoConfig(Section):
    tasks: Annotated[list[DynamoTaskConfig], Field(min_length=1)]
    phases: list[Literal[1, 2, 3]] = [1, 2, 3]
    phase1: PhaseConfig = PhaseConfig()
    phase2: PhaseConfig = PhaseConfig(max_steps=100, lr=1e-3)
    phase3: JointConfig = JointConfig(max_steps=50, lr=1e-3)
    router: RouterConfig = RouterConfig()
    generation: GenerationConfig = GenerationConfig()
    pooling: Literal["mean", "cls"] = "mean"  # classification heads' input
    # the stage one `stoker train` runs (set by the recipe itself for each phase's run):
    # None = all of `phases` in order; phase1:<task>, phase2, phase3
    stage: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DynamoConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"dynamo.tasks names must be unique, got {names}")
        k = self.router.n_adapters
        if k is not None and k != len(names):
            raise ValueError(
                f"dynamo.router.n_adapters={k} but there are {len(names)} tasks (one adapter "
                f"each: {', '.join(names)}); drop n_adapters or make them equal"
            )
        if sorted(set(self.phases)) != self.phases:
            raise ValueError(f"dynamo.phases must be increasing and unique, got {self.phases}")
        valid = {f"phase1:{n}" for n in names} | {"phase2", "phase3", None}
        if self.stage not in valid:
            raise ValueError(
                f"dynamo.stage={self.stage} is not a stage of this recipe; use one of "
                f"{', '.join(sorted(s for s in valid if s))}"
            )
        return self

    def task(self, name: str) -> DynamoTaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


class DynamoRecipeConfig(RecipeConfig):
    """DYNAMO: `train.init_from` is the encoder (an HF BERT/RoBERTa directory), or with none a
    randomly initialized one of the `encoder` shape (tests, the tiny recipe). `train.*` are the
    loop's settings shared by every phase; each phase has its own steps, LR and eval cadence."""

    recipe: Literal["dynamo"] = "dynamo"  # type: ignore[assignment]
    encoder: EncoderConfig = EncoderConfig()
    data: DynamoDataConfig = DynamoDataConfig()  # type: ignore[assignment]
    lora: LoRAConfig = LoRAConfig(targets=["q_proj", "v_proj"])
    dynamo: DynamoConfig


__all__ = [
    "DynamoRecipeConfig",
    "METRICS",
    "DynamoConfig",
    "DynamoDataConfig",
    "DynamoTaskConfig",
    "GenerationConfig",
    "JointConfig",
    "PhaseConfig",
    "RouterConfig",
]
