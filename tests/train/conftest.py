"""Training fixtures: one small prepared corpus (real stdlib source) shared by the session."""

import json
from pathlib import Path

import pytest

from stoker.config import load_config

BASE = [
    "--model.preset=tiny-llama",
    "--model.n_layer=2",
    "--model.d_model=32",
    "--model.n_head=4",
    "--model.n_kv_head=2",
    "--model.d_ff=64",
    "--model.vocab_size=320",
    "--model.max_seq_len=32",
    "--data.sources=python-stdlib",
    "--data.max_documents=40",
    "--data.tokenizer.vocab_size=320",
    "--train.batch_size=8",
    "--train.micro_batch_size=8",
    "--train.max_steps=12",
    "--train.log_interval=1",
    "--train.eval_interval=6",
    "--train.eval_steps=2",
    "--train.save_interval=6",
    "--train.precision=fp32",
    "--optim.lr=3e-3",
    "--optim.warmup_steps=2",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    from stoker.data.prepare import prepare

    d = tmp_path_factory.mktemp("shards")
    prepare(load_config(None, [*BASE, f"--data.dir={d}"]))
    return d


@pytest.fixture
def recipe(tmp_path) -> Path:
    """A minimal recipe file; the tests pass everything else as overrides."""
    path = tmp_path / "r.yaml"
    path.write_text("recipe: pretrain\n")
    return path


@pytest.fixture
def make_args(tmp_path, data_dir):
    """Override list for a tiny run writing to tmp_path/run (extra overrides appended)."""

    def make(*extra: str, out: Path | None = None) -> list[str]:
        out = out or tmp_path / "run"
        return [*BASE, f"--data.dir={data_dir}", f"--train.out_dir={out}", *extra]

    return make


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, data_dir) -> Path:
    """A finished 12-step run of BASE (checkpoints at 6 and 12); copy it before changing it."""
    from stoker.train.loop import train

    out = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(None, [*BASE, f"--data.dir={data_dir}", f"--train.out_dir={out}"]))
    return out
