"""Fine-tuning fixtures: a finished tiny pretraining run (the base) from tests/train, and the
overrides of a tiny fine-tuning run on real instruction pairs (stdlib signature -> docstring)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "train_conftest", Path(__file__).parents[1] / "train" / "conftest.py"
)
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)

data_dir = _train.data_dir
finished_run = _train.finished_run
losses = _train.losses
ROOT = Path(__file__).parents[2]
TEMPLATE = ROOT / "recipes" / "finetune" / "stdlib-docstring.jinja"


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory) -> Path:
    """Where the fine-tuning runs' samples are prepared (once: later runs find them current)."""
    return tmp_path_factory.mktemp("sft") / "data"


@pytest.fixture
def ft_args(tmp_path, finished_run, sft_dir):
    """Overrides of a 12-step LoRA run on the base's tokenizer (extra ones appended)."""

    def make(*extra: str, out: Path | None = None, lora: bool = True) -> list[str]:
        out = out or tmp_path / "ft"
        return [
            f"--train.init_from={finished_run}",
            f"--train.out_dir={out}",
            "--data.sources=python-stdlib-docstrings",
            f"--data.dir={sft_dir}",
            f"--data.template={TEMPLATE}",
            "--data.max_samples=300",
            "--data.val_fraction=0.1",
            "--data.too_long=skip",
            "--train.seq_len=32",
            "--train.batch_size=8",
            "--train.micro_batch_size=8",
            "--train.max_steps=12",
            "--train.log_interval=1",
            "--train.eval_interval=6",
            "--train.eval_steps=2",
            "--train.save_interval=6",
            "--train.precision=fp32",
            "--optim.lr=1e-2",
            "--optim.warmup_steps=0",
            *(["--lora.r=4", "--lora.alpha=8", "--lora.targets=all-linear"] if lora else []),
            *extra,
        ]

    return make


@pytest.fixture
def ft_recipe(tmp_path) -> Path:
    path = tmp_path / "ft.yaml"
    path.write_text("recipe: finetune\n")
    return path
