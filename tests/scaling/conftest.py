"""Fixtures for the scaling tests."""

import json

import pytest

from stoker.config import RecipeConfig, dump_config
from stoker.scaling.flops import count_params


def _write_run(root, n_layer: int, law, steps=(100, 200, 400, 800, 1600)):
    """A run dir as train/loop.py leaves it: config.yaml and metrics.jsonl rows."""
    cfg = RecipeConfig.model_validate(
        {
            "model": {
                "n_layer": n_layer,
                "d_model": 256,
                "n_head": 4,
                "vocab_size": 1000,
                "max_seq_len": 512,
            },
            "train": {"batch_size": 64, "seq_len": 512},
        }
    )
    root.mkdir()
    (root / "config.yaml").write_text(dump_config(cfg))
    n = count_params(cfg.model).total
    rows = []
    for s in steps:
        rows.append({"step": s, "loss": 9.9, "lr": 1e-3})  # training loss: ignored
        rows.append({"step": s, "val_loss": law.loss(n, s * 64 * 512)})
    rows.append({"event": "summary", "tokens": 123, "final_val_loss": 1.0})
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return n


@pytest.fixture
def write_run():
    """`write_run(dir, n_layer, law, steps)`: a fake finished run whose val losses follow `law`."""
    return _write_run
