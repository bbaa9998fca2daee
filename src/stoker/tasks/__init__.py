"""Recipes as tasks on the one training loop (tasks/base.py has the interface).

`recipe` in a config picks the task: pretrain and mor are language modelling on token shards
(tasks/lm.py), finetune is supervised fine-tuning from `train.init_from` (tasks/finetune.py),
dynamo the multi-task adapter/router recipe in phases (tasks/dynamo/), multimodal the frozen
encoders and their contrastive aligner (tasks/multimodal/).
"""

from __future__ import annotations

from typing import Any

from stoker.config import RecipeConfig
from stoker.tasks.base import Task
from stoker.train.distributed import DistInfo


def task_class(cfg: RecipeConfig) -> type[Task]:
    from stoker.tasks.dynamo.task import DynamoTask
    from stoker.tasks.finetune import FinetuneTask
    from stoker.tasks.lm import LanguageModelTask, MoRTask
    from stoker.tasks.multimodal.task import MultimodalTask

    tasks = {"pretrain": LanguageModelTask, "mor": MoRTask, "finetune": FinetuneTask,
             "dynamo": DynamoTask, "multimodal": MultimodalTask}  # fmt: skip
    return tasks[cfg.recipe]


def make_task(cfg: RecipeConfig, info: DistInfo | None = None) -> Task:
    """The task of `cfg` (one CPU process when `info` is None)."""
    return task_class(cfg)(cfg, info or DistInfo())


def prepare_command(args: Any) -> int:
    """`stoker prepare RECIPE [--data.key=value ...]`: tokenize a recipe's data once."""
    from stoker.config import load_config

    make_task(load_config(args.recipe, getattr(args, "overrides", None))).prepare()
    return 0


__all__ = ["Task", "make_task", "prepare_command", "task_class"]
