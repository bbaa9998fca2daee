"""Multimodal fixtures: the digits task (scripts/multimodal_data.py: scikit-learn digits as
PNG, espeak-ng speech as WAV, alignment pairs and conversations as JSONL), built once per
version of its code into `$STOKER_TEST_DATA` or `~/.cache/stoker-test-data/` (tests/data/
conftest.py's cache). A failed build FAILS with the reason (e.g. espeak-ng missing)."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[3]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_data = _load("data_conftest", ROOT / "tests" / "data" / "conftest.py")
SCRIPT = ROOT / "scripts" / "multimodal_data.py"
SOURCES = ROOT / "src" / "stoker" / "tasks" / "multimodal" / "sources.py"


@pytest.fixture(scope="session")
def digits_data() -> Path:
    """images/, audio/, align-*.jsonl, chat-*.jsonl and manifest.json."""
    code = hashlib.sha256(SCRIPT.read_bytes() + SOURCES.read_bytes()).hexdigest()[:12]
    script = _load("multimodal_data_script", SCRIPT)

    def build(tmp: Path) -> None:
        (tmp / "manifest.json").write_text(json.dumps(script.build_digits(tmp)))

    return _data.cached(f"digits-{code}", build, "the digits task")
