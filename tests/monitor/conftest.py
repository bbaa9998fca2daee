"""Reuse the training fixtures (a small prepared corpus, tiny-run overrides) from tests/train."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "train_conftest", Path(__file__).parents[1] / "train" / "conftest.py"
)
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)

data_dir = _train.data_dir
make_args = _train.make_args
