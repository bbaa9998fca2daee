"""Property-based fuzzing of the CLI contract: exit 0, or exit 2 with one `stoker: error:` line.

Two families, each bounded for CI (derandomized, a fixed number of examples, no database):

A. Configs and arguments: override lists with valid keys, near-miss typos, unknown sections and
   garbage, values of every type (0, negative and huge ints, nan/inf/-0.0/1e308, bools,
   unicode, lists, nested YAML, null, broken YAML), recipe files (mappings, non-mappings,
   broken YAML, bytes that are not UTF-8) through `stoker train`; the options of `stoker
   count`/`plan`; and those of `stoker generate`/`eval` against tiny checkpoints.
B. Corrupted files: one file (or directory) of a tiny trained run's newest checkpoint, of its
   run dir or of its token-shard dir is truncated, bit-flipped, replaced, deleted, turned into
   a directory, emptied, or rewritten as JSON of the wrong shape; then `stoker train` (resume
   auto), `eval`, `generate` and `export-hf` must fall back to the intact checkpoint (exit 0)
   or refuse in one line (exit 2).

Never another exit code, never a traceback, never an exception out of `main`. Every example
runs in its own temporary directory (also the working directory), and a fuzzed path can only
name something inside it: `@TMP@` in a drawn value stands for that directory, and path values
are cleaned of `/`, `~` and `..` prefixes. Valid values that would make a run expensive (model
sizes, steps, shard counts, documents, torch.compile, trackers) are drawn from small ranges
only; invalid ones from everywhere. Set STOKER_FUZZ_EXAMPLES=500 for a longer, random run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, event, example, given, note, settings
from hypothesis import strategies as st

from stoker.cli import main
from stoker.config import PRESETS, RecipeConfig, load_config, valid_keys
from stoker.scaling import flops, hardware

TMP = "@TMP@"  # replaced by the example's own temporary directory
EXAMPLES = int(os.environ.get("STOKER_FUZZ_EXAMPLES", "0"))  # 0: the CI budget of each test

# The tiny run of tests/train/conftest.py (BASE), trained for 2 steps without eval or monitor.
TINY = [
    "--model.preset=tiny-llama", "--model.n_layer=2", "--model.d_model=32", "--model.n_head=4",
    "--model.n_kv_head=2", "--model.d_ff=64", "--model.vocab_size=320",
    "--model.max_seq_len=32", "--data.sources=python-stdlib", "--data.max_documents=40",
    "--data.tokenizer.vocab_size=320", "--train.batch_size=8", "--train.micro_batch_size=8",
    "--train.log_interval=1", "--train.eval_steps=2", "--train.precision=fp32",
    "--train.device=cpu", "--optim.lr=3e-3", "--optim.warmup_steps=2",
]  # fmt: skip
SHORT = [
    "--train.max_steps=2", "--train.eval_interval=0", "--train.save_interval=2",
    "--train.monitor_interval=0",
]  # fmt: skip


def fuzz_settings(examples: int):
    return settings(
        max_examples=EXAMPLES or examples,
        derandomize=not EXAMPLES,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # capsys: read and cleared per example
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )


# --------------------------------------------------------------------------- the contract
def run_cli(argv: list[str], capsys, stdin: str = "") -> tuple[int, str, str]:
    """`main(argv)` in-process: (exit code, stdout, stderr). Exceptions escape (a finding)."""
    note(f"argv: {argv!r}")
    old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's --help or --version
        code = e.code
    finally:
        sys.stdin = old_stdin
    out, err = capsys.readouterr()
    note(f"exit {code}\nstderr: {err[-2000:]!r}")
    event(f"{argv[0] if argv else ''} exit {code}")
    return code, out, err


def assert_contract(code: int, out: str, err: str) -> None:
    """Exit 0, or exit 2 whose stderr ends in the one `stoker: error:` line (earlier lines
    may only be stoker's own notices, e.g. a skipped damaged checkpoint, or progress bars)."""
    assert "Traceback" not in out + err
    assert code in (0, 2), f"exit {code}: {err[-2000:]}"
    lines = [x for x in re.split(r"[\r\n]", err) if x.strip()]  # what a terminal breaks on
    errors = [x for x in lines if x.startswith("stoker: error: ")]
    if code == 0:
        assert not errors, err
        return
    assert len(errors) == 1 and lines[-1] == errors[0], err
    bars = ("train:", "tokenize:", "prepare")  # tqdm progress bars (erased or not)
    others = [x for x in lines[:-1] if not x.startswith(("stoker: ", *bars))]
    assert not others, err


def in_tmp(text: str, tmp: Path) -> str:
    return text.replace(TMP, str(tmp))


@contextlib.contextmanager
def example_dir(root: Path):
    """A fresh temporary directory, also the working directory, removed afterwards."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(dir=root) as d:
        os.chdir(d)
        try:
            yield Path(d)
        finally:
            os.chdir(old)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def corpus(fuzz_root) -> Path:
    """The prepared tiny corpus of TINY (each example works on a copy)."""
    from stoker.data.prepare import prepare

    d = fuzz_root / "corpus"
    prepare(load_config(None, [*TINY, f"--data.dir={d}"]))
    return d


@pytest.fixture(scope="module")
def trained_run(fuzz_root, corpus) -> Path:
    """6 steps of TINY, checkpoints at 3 and 6 (each example works on a copy)."""
    out = fuzz_root / "trained"
    recipe = fuzz_root / "r.yaml"
    recipe.write_text("recipe: pretrain\n")
    args = [
        *TINY, f"--data.dir={corpus}", f"--train.out_dir={out}", "--train.max_steps=6",
        "--train.save_interval=3", "--train.eval_interval=0", "--train.monitor_interval=0",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", str(recipe), *args]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_ckpts(fuzz_root, tokenizer_dir) -> dict[str, Path]:
    """Untrained tiny-llama and tiny-gpt2 checkpoints with a tokenizer (written, not trained)."""
    from stoker.config import ModelConfig
    from stoker.models.gpt import build_model
    from stoker.train.checkpoint import save_model_checkpoint

    torch.manual_seed(0)
    out = {}
    for preset in ("tiny-llama", "tiny-gpt2"):
        cfg = RecipeConfig(model=ModelConfig(preset=preset, vocab_size=384))
        out[preset] = save_model_checkpoint(
            fuzz_root / preset,
            build_model(cfg.model),
            cfg.model_dump(mode="json"),
            tokenizer_dir=tokenizer_dir,
        )
    return out


# ---------------------------------------------------------------------------- strategies
KEYS = valid_keys(RecipeConfig)
PATH_KEYS = {
    "train.out_dir", "data.dir", "data.sources", "train.resume", "mor.init_from",
    "data.tokenizer.path", "track.mlflow_uri",
}  # fmt: skip


def _texts(*values: object) -> st.SearchStrategy[str]:
    return st.sampled_from([str(v) for v in values])


def _ints(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.integers(lo, hi).map(str)


def _floats(lo: float, hi: float) -> st.SearchStrategy[str]:
    return st.floats(lo, hi).map(repr)


_BOOL = _texts("true", "false")
_SOURCES = f"""python-stdlib [python-stdlib] {TMP}/docs {TMP}/docs/*.txt {TMP}/docs/a.jsonl
    {TMP}/docs/a.txt {TMP}/missing {TMP}/empty [] [{TMP}/docs/a.txt,{TMP}/docs/b.md]"""
_TOKENIZERS = f"""{TMP}/data/tokenizer {TMP}/data/tokenizer/tokenizer.json {TMP}/docs/a.txt
    {TMP}/missing {TMP}/empty null"""
# Valid values that keep a run tiny; everything else comes from `junk` below.
CHEAP: dict[str, st.SearchStrategy[str]] = {
    "recipe": _texts("pretrain", "sft", ""),
    "model.preset": _texts("tiny-llama", "tiny-gpt2", "null"),
    "model.arch": _texts("llama", "gpt2"),
    "model.n_layer": _ints(1, 4),
    "model.n_head": _ints(1, 8),
    "model.n_kv_head": _ints(1, 4) | _texts("null"),
    "model.d_model": _texts(16, 24, 32, 48, 64),
    "model.head_dim": _texts(4, 6, 8, 16, "null"),
    "model.d_ff": _ints(1, 128) | _texts("null"),
    "model.vocab_size": _texts(100, 319, 320, 384, 512),
    "model.max_seq_len": _texts(2, 8, 16, 32, 64),
    "model.bias": _BOOL,
    "model.qkv_bias": _BOOL,
    "model.tie_embeddings": _BOOL,
    "model.multiple_of": _ints(1, 64),
    "model.ffn_dim_multiplier": _floats(0.1, 2.0) | _texts("null"),
    "model.dropout": _floats(0.0, 0.9),
    "model.norm_eps": _floats(1e-12, 1.0),
    "model.rope_theta": _floats(1.0, 1e6),
    "model.init_std": _floats(1e-6, 1.0),
    "mor.recursions": _ints(1, 3),
    "mor.sharing": _texts("cycle", "sequence", "middle_cycle", "middle_sequence"),
    "mor.router": _texts("expert", "token", "none"),
    "mor.kv_cache": _texts("recursion", "shared"),
    "mor.router_hidden": _ints(0, 8),
    "mor.init": _texts("random", "stepwise", "average", "lower", "upper"),
    "mor.init_from": _texts(f"{TMP}/ckpt", f"{TMP}/missing", "null"),
    "mor.alpha": _floats(1e-3, 10.0),
    "mor.baseline_gate": _floats(1e-3, 2.0) | _texts("null"),
    "mor.aux_loss_coeff": _floats(0.0, 1.0),
    "mor.balance_coeff": _floats(0.0, 1.0),
    "mor.z_loss_coeff": _floats(0.0, 1.0),
    "mor.bias_balance_rate": _floats(0.0, 1.0),
    "data.sources": _texts(*_SOURCES.split()),
    "data.text_field": _texts("text", "body", ""),
    "data.tokenizer.path": _texts(*_TOKENIZERS.split()),
    "data.tokenizer.vocab_size": _ints(1, 600),
    "data.tokenizer.special_tokens": _texts("[]", "[<|endoftext|>]", "[a, b]", "['']"),
    "data.tokenizer.eos_token": _texts("<|endoftext|>", "x", "", "null"),
    "data.tokenizer.pattern": _texts(r"\w+", "[", "", "null"),
    "data.dir": _texts(f"{TMP}/data", f"{TMP}/data2", f"{TMP}/docs/a.txt", f"{TMP}/empty"),
    "data.val_fraction": _floats(0.0, 0.9),
    "data.seed": _ints(0, 2**63 - 1),
    "data.dtype": _texts("auto", "uint16", "uint32"),
    "data.pin_memory": _texts("true", "false", "auto"),
    "data.max_documents": _ints(1, 40),
    "data.shard_tokens": _texts(10_000, 100_000, 2**28),
    "data.num_workers": _texts(0, 1, "auto"),
    "data.prefetch_factor": _ints(1, 3),
    "train.out_dir": _texts(f"{TMP}/run", f"{TMP}/run2", f"{TMP}/docs/a.txt", f"{TMP}/run/x"),
    "train.max_steps": _ints(1, 3),
    "train.seed": _ints(0, 2**63 - 1),
    "train.nan_policy": _texts("stop", "skip"),
    "train.deterministic": _texts("true", "false", "auto"),
    "train.batch_size": _texts(1, 2, 4, 8, 16),
    "train.micro_batch_size": _texts(1, 2, 4, 8),
    "train.seq_len": _ints(1, 33) | _texts("null"),
    "train.precision": _texts("auto", "fp32", "bf16", "fp16"),
    "train.device": _texts("cpu", "auto", "cuda", "mps", "cuda:0", "cuda:1"),
    "train.compile": _texts("false"),
    "train.activation_checkpointing": _BOOL,
    "train.grad_clip": _texts(0, 1.0, 1e-3),
    "train.log_interval": _ints(1, 3),
    "train.eval_interval": _ints(0, 2),
    "train.eval_steps": _ints(1, 2),
    "train.save_interval": _ints(1, 3),
    "train.keep_last": _ints(1, 3),
    "train.resume": _texts(
        "auto", "never", f"{TMP}/run", f"{TMP}/ckpt", f"{TMP}/missing", f"{TMP}/docs/a.txt"
    ),
    "train.early_stopping_metric": _texts("val_loss", "null"),
    "train.early_stopping_patience": _ints(1, 3),
    "train.monitor_interval": _texts(0, 2.0),
    "optim.lr": _texts(0, 1e-3, 3e-3, 1e3),
    "optim.betas": _texts("[0.9, 0.95]", "[0, 0.999]", "[0.5, 0.5]"),
    "optim.schedule": _texts("cosine", "wsd", "constant"),
    "optim.min_lr_ratio": _floats(0.0, 1.0),
    "optim.weight_decay": _floats(0.0, 10.0),
    "optim.eps": _floats(1e-300, 1.0),
    "optim.decay_fraction": _floats(0.0, 1.0),
    "optim.warmup_steps": _ints(0, 5),
    "dist.strategy": _texts("ddp", "zero1", "fsdp2"),
    "dist.backend": _texts("auto", "nccl", "gloo"),
    "track.mlflow": _texts("false"),
    "track.tensorboard": _texts("false"),
    "track.wandb": _BOOL,
    "track.mlflow_uri": _texts("null", f"sqlite:///{TMP}/mlflow.db"),
    "track.experiment": st.text(max_size=8),
}

# Values of every type, as the text after `--key=`.
_SCALARS = st.one_of(
    st.integers(-3, 3),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
)
_NUMBER_TEXTS = _texts(
    0, -1, -0.0, 2**31, 2**63, 10**30, -(10**30), "1e308", "1e309", "-1e309", "1e-400", "nan",
    "NaN", "inf", "-inf", "Infinity", ".5", "1_000", "0x10", "1e3", "3e-4",
)  # fmt: skip
_YAML_TEXTS = _texts(
    "{a: 1}", "{}", "[]", "[[]]", "[1, [2]]", "{a: {b: null}}", "[.nan, .inf]", "[1,", "{a:",
    "[[]", "{]", "[a: b]", "{a: 1, a: 2}", "[!!binary aGk=]", "!!python/object:os.system {}",
    "null", "~", "None", "true", "yes", "on", "off", "", " ", "\x00", "é", "日本", "\U0001f600",
)  # fmt: skip


def _flow_yaml(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()


junk = st.one_of(
    _NUMBER_TEXTS,
    _YAML_TEXTS,
    st.integers().map(str),
    st.floats().map(repr),
    st.text(max_size=12),
    st.lists(_SCALARS, max_size=3).map(_flow_yaml),
    st.dictionaries(st.text(max_size=3), _SCALARS, max_size=2).map(_flow_yaml),
)


def clean_path(text: str) -> str:
    """A drawn path can only name something under the example's directory (the cwd)."""
    text = text.replace("..", "__")
    return text.lstrip("/~") if not text.startswith(TMP) else text


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each drawn with its weight (st.one_of draws them evenly)."""
    table = [s for w, s in choices for _ in range(w)]
    return st.integers(0, len(table) - 1).flatmap(table.__getitem__)


def _value(key: str) -> st.SearchStrategy[str]:
    cheap = CHEAP.get(key)
    values = weighted((3, cheap), (1, junk)) if cheap is not None else junk
    return values.map(clean_path) if key in PATH_KEYS else values


def _typo(key: str, i: int, kind: int, char: str) -> str:
    i %= len(key)
    return [
        key[:i] + key[i + 1 :],  # deleted
        key[:i] + char + key[i:],  # inserted
        key[:i] + key[i + 1 : i + 2] + key[i] + key[i + 2 :],  # swapped
        key.upper(),
        key.replace(".", "_"),
        key.replace("_", "-"),
        key + ".x",
    ][kind]


keys = weighted(
    (12, st.sampled_from(KEYS)),
    (1, st.builds(_typo, st.sampled_from(KEYS), st.integers(0, 40), st.integers(0, 6),
                  st.characters())),
    (1, st.from_regex(r"[a-z]{1,6}\.[a-z_]{1,8}", fullmatch=True)),  # unknown sections
    (1, st.sampled_from(["", ".", "train.", ".lr", "train..max_steps", "model.n_layer.x", "mor"])),
    (1, st.text(max_size=10)),
)  # fmt: skip


@st.composite
def overrides(draw) -> list[str]:
    """Override arguments: mostly `--key=value`, sometimes `--key value` or malformed."""
    argv: list[str] = []
    if draw(st.integers(0, 5)) == 0:  # a Mixture-of-Recursions model that validates
        argv += [
            "--recipe=mor",
            "--model.n_layer=4",
            f"--mor.recursions={draw(st.sampled_from([1, 2]))}",
        ]
    for _ in range(draw(st.integers(0, 4))):
        key = draw(keys)
        value = draw(_value(key))
        form = draw(st.sampled_from(["eq"] * 12 + ["space"] * 3 + ["bare", "nodash"]))
        if form == "space":
            argv += [f"--{key}", value]
        elif form == "bare":
            argv.append(f"--{key}")
        elif form == "nodash":
            argv.append(f"{key}={value}")
        else:
            argv.append(f"--{key}={value}")
    return argv


def _yaml_value(text: str) -> object:
    """A drawn override text as the YAML value it stands for (broken YAML stays a string)."""
    try:
        return yaml.safe_load(text) if text.strip().startswith(("[", "{")) else text
    except yaml.YAMLError:
        return text


@st.composite
def recipe_mappings(draw) -> str:
    """A recipe mapping: sections of drawn keys (or a whole section replaced by junk)."""
    tree: dict = {"recipe": "pretrain"}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=4)):
        *sections, name = key.split(".")
        node = tree
        for s in sections:
            node = node.setdefault(s, {}) if isinstance(node.get(s, {}), dict) else {}
        node[name] = _yaml_value(draw(_value(key)))
    if draw(st.booleans()):
        section = draw(st.sampled_from(["model", "train", "data", "optim", "mor", "x"]))
        tree[section] = _yaml_value(draw(junk))
    return yaml.safe_dump(tree, allow_unicode=True)


ODD_RECIPES = [
    "train: [1\n", "{", "a:\n- b\n c: d\n", "\t", "key: 'open", "%YAML 9.9\n---\n",
    "? [a]\n: b\n", "!!python/object:os.system {}\n", "a: &x [*x]\n", "- - -\n", "---\n---\n",
    "train: {max_steps: 2}\ntrain: {max_steps: 3}\n", "model: 5\n", "train: null\n",
    "data: []\n", "mor: {}\n", "1: 2\n", "null: x\n", "\x1f", "a: \x08\n",
]  # fmt: skip
recipes = st.one_of(
    st.just("recipe: pretrain\n"),
    st.just("recipe: pretrain\n"),
    st.just(""),
    recipe_mappings(),
    st.lists(_SCALARS, max_size=3).map(yaml.safe_dump),  # not a mapping
    _SCALARS.map(yaml.safe_dump),
    st.sampled_from(ODD_RECIPES),
    st.text(max_size=40),
    st.binary(max_size=40),  # not UTF-8, usually
)


def write_docs(tmp: Path) -> None:
    """What the `@TMP@/...` values of CHEAP name."""
    docs = tmp / "docs"
    docs.mkdir()
    text = "def add(a, b):\n    return a + b\n" * 40
    (docs / "a.txt").write_text(text)
    (docs / "b.md").write_text("# title\n" + text)
    (docs / "a.jsonl").write_text(json.dumps({"text": text}) + "\n{broken\n")
    (tmp / "empty").mkdir()


def costly(cfg: RecipeConfig) -> str | None:
    """Why a valid config would not be a tiny run (then the example is not run), or None."""
    m, t, d, mor = cfg.model, cfg.train, cfg.data, getattr(cfg, "mor", None)
    limits = {
        "model": m.n_layer * (mor.recursions if mor else 1) <= 8
        and m.d_model <= 128 and m.ffn_dim <= 512 and m.vocab_size <= 4096
        and m.max_seq_len <= 256 and m.n_head * m.dim_head <= 512 and m.n_head <= 64
        and (mor is None or mor.router_hidden <= 64),
        "train": t.max_steps <= 3 and t.batch_size <= 16 and not t.compile
        and (t.eval_interval == 0 or t.eval_steps <= 3)
        and (t.monitor_interval == 0 or t.monitor_interval >= 0.5),
        "data": d.max_documents is not None and d.max_documents <= 40
        and d.shard_tokens >= 10_000 and d.num_workers in (0, 1, "auto")
        and d.tokenizer.vocab_size <= 4096,
        "track": not (cfg.track.mlflow or cfg.track.tensorboard),
    }  # fmt: skip
    return next((k for k, ok in limits.items() if not ok), None)


def outside(cfg: RecipeConfig, tmp: Path) -> list[str]:
    """Paths of a valid config that leave the example's directory (a strategy bug)."""
    paths = [cfg.train.out_dir, cfg.data.dir, cfg.data.tokenizer.path]
    paths += [s for s in cfg.data.sources if s != "python-stdlib"]
    paths += [cfg.train.resume] if cfg.train.resume not in ("auto", "never") else []
    mor = getattr(cfg, "mor", None)
    paths += [mor.init_from] if mor and mor.init_from else []
    paths += [cfg.train.init_from] if cfg.train.init_from else []
    root = tmp.resolve()
    bad = []
    for p in filter(None, paths):
        full = (root / Path(p).expanduser()).resolve()
        if full != root and root not in full.parents:
            bad.append(p)
    return bad


# ------------------------------------------------------------------- A: train overrides
@fuzz_settings(examples=50)
@given(argv=overrides(), recipe=recipes)
@example(argv=["--model=5", "--model.n_layer=2"], recipe="recipe: pretrain\n")
@example(argv=[], recipe="model: 5\n")
@example(argv=["--model.preset=[1]"], recipe="recipe: pretrain\n")
@example(argv=[], recipe=b"\xff\xfe recipe")
def test_fuzzed_train_overrides_and_recipes_train_or_refuse_in_one_line(
    argv, recipe, fuzz_root, corpus, tiny_ckpts, capsys
):
    with example_dir(fuzz_root) as tmp:
        shutil.copytree(corpus, tmp / "data")
        shutil.copytree(tiny_ckpts["tiny-llama"], tmp / "ckpt")
        write_docs(tmp)
        path = tmp / "r.yaml"
        path.write_bytes(recipe if isinstance(recipe, bytes) else in_tmp(recipe, tmp).encode())
        argv = [in_tmp(a, tmp) for a in argv]
        base = [*TINY, *SHORT, f"--data.dir={tmp / 'data'}", f"--train.out_dir={tmp / 'run'}"]
        try:
            cfg = load_config(path, [*base, *argv])
        except Exception:  # a bad config (or a bug): the CLI's to report
            cfg = None
        if cfg is not None:
            assert not outside(cfg, tmp), f"strategy bug: paths outside {tmp}"
            assume(costly(cfg) is None)
        assert_contract(*run_cli(["train", str(path), *base, *argv], capsys))


# ------------------------------------------------------------------ A: count and plan
_GPUS = [*hardware.known_devices(), "h100", "a100", "b200", ""]
_AMOUNTS = _texts("85B", "1.2T", "6.6e20", "1e999", "0", "-1", "nan", "inf", "lots", "1e3k", "")


@st.composite
def count_plan_args(draw) -> list[str]:
    command = draw(st.sampled_from(["count", "plan"]))
    argv = [command]
    source = draw(st.sampled_from(["preset", "recipe", "both", "none", "shipped"]))
    if source in ("recipe", "both"):
        argv.append(f"{TMP}/r.yaml")
    if source == "shipped":
        argv.append("@ROOT@/recipes/pretrain/tiny.yaml")
    if source in ("preset", "both"):
        argv += ["--preset", draw(st.sampled_from([*PRESETS, "llama-9b", ""]))]
    number = st.one_of(_ints(-2, 4096), _NUMBER_TEXTS, st.text(max_size=5))
    fraction = st.one_of(_floats(0.0, 1.0), _NUMBER_TEXTS)
    options = {
        "--seq-len": number,
        "--micro-batch-size": number,
        "--num-gpus": number,
        "--json": None,
    }
    if command == "plan":
        options |= {
            "--gpu": st.sampled_from(_GPUS),
            "--mfu": fraction,
            "--dtype": _texts("bf16", "fp16", "fp32", "int8"),
            "--convention": st.sampled_from([*flops.CONVENTIONS, "x"]),
            "--strategy": st.sampled_from([*flops.STRATEGIES, "x"]),
            "--price-per-gpu-hour": st.one_of(_floats(0, 10), _NUMBER_TEXTS),
            "--law": st.lists(st.one_of(_floats(-1, 1000), _NUMBER_TEXTS), max_size=6).map(
                ",".join
            ),
            "--target-loss": st.one_of(_floats(0, 10), _NUMBER_TEXTS),
            "--fit": _texts(f"{TMP}/missing", f"{TMP}/r.yaml", f"{TMP}/fit"),
            "--fit-final-only": None,
            draw(st.sampled_from(["--tokens", "--budget-flops", "--hours"])): st.one_of(
                _AMOUNTS, _NUMBER_TEXTS
            ),
        }
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=5, unique=True)):
        argv.append(name)
        if options[name] is not None:
            argv.append(draw(options[name]))
    return argv


ROOT = Path(__file__).resolve().parents[1]


@fuzz_settings(examples=60)
@example(argv=["plan", "--preset", "tiny-llama", "--law", "1,1,1,0,0"], recipe="")
@example(argv=["plan", "--preset", "tiny-llama", "--law", "1,1,1,1000,0.5"], recipe="")
@given(argv=count_plan_args(), recipe=recipes)
@example(argv=["plan", "--preset", "tiny-llama", "--gpu", "H100 SXM", "--hours", "nan"], recipe="")
@example(argv=["plan", "--preset", "tiny-llama", "--tokens", "1e999"], recipe="")
@example(argv=["plan", "--preset", "tiny-llama", "--price-per-gpu-hour", "inf"], recipe="")
@example(argv=["plan", "--preset", "tiny-llama", "--target-loss", "nan"], recipe="")
@example(argv=["plan", "--preset", "tiny-llama", "--num-gpus", str(2**1100)], recipe="")
def test_fuzzed_count_and_plan_arguments_answer_or_refuse_in_one_line(
    argv, recipe, fuzz_root, capsys
):
    with example_dir(fuzz_root) as tmp:
        (tmp / "r.yaml").write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
        fit = tmp / "fit"
        fit.mkdir()
        (fit / "metrics.jsonl").write_text('{"step": 1, "val_loss": 3.0}\n{"step": 2}\n')
        argv = [in_tmp(a, tmp).replace("@ROOT@", str(ROOT)) for a in argv]
        code, out, err = run_cli(argv, capsys)
        assert_contract(code, out, err)
        assert not re.search(r"\b(nan|inf|infinity)\b", out, re.IGNORECASE), out


# -------------------------------------------------------------- A: generate and eval
_DEVICES = _texts("cpu", "auto", "cuda", "cuda:0", "cuda:7", "cuda:128", "cuda:00", "gpu", "",
                  "cuda:99999999999999999999", "mps", "cpu:0")  # fmt: skip


@st.composite
def generate_eval_args(draw) -> tuple[list[str], str]:
    """(argv, stdin) of `stoker generate` or `stoker eval` on a fuzzed path and options:
    each option mostly valid, sometimes junk; huge valid counts are left out (they run on)."""
    command = draw(st.sampled_from(["generate", "eval"]))
    where = draw(st.sampled_from(["tiny-llama", "tiny-gpt2", "run"] * 2
                                 + ["missing", "file", "empty", "data"]))  # fmt: skip
    argv = [command, f"{TMP}/{where}"]
    real = st.one_of(st.floats().map(repr), _NUMBER_TEXTS, _texts(1e-300, 5e-324, 1e300))

    def mostly(valid: st.SearchStrategy[str], junk: st.SearchStrategy[str]):
        return st.one_of(valid, valid, junk)

    device = mostly(_texts("cpu", "auto"), _DEVICES)
    if command == "generate":
        options = {
            "--prompt": st.text(max_size=12) | _texts("\udcff", "<|endoftext|>", "\x00", " "),
            "--max-new-tokens": mostly(_ints(1, 3), _texts(0, -1, 2**50, 2**63, "1e3", "", "x")),
            "--temperature": mostly(_floats(0, 2), real),
            "--top-k": mostly(_ints(1, 500), _texts(0, -1, 2**63, "x")),
            "--top-p": mostly(_floats(1e-6, 1), real),
            "--seed": mostly(_ints(0, 5), _texts(-1, 2**63 - 1, 2**63, "x")),
            "--device": device,
            "--dtype": _texts("auto", "fp32", "bf16", "fp16"),
            "--no-stream": None,
            "--interactive": None,
        }
        argv += ["--max-new-tokens", "2"]  # unless drawn below (argparse: the last one wins)
    else:
        options = {
            "--data-dir": mostly(_texts(f"{TMP}/data"),
                                 _texts(f"{TMP}/missing", f"{TMP}/empty", f"{TMP}/file")),
            "--split": mostly(_texts("val", "train"), _texts("test", "", "../val", "val-00000")),
            "--batches": mostly(_ints(1, 2), _texts(0, -1, "1e3", "", "x", "٣")),
            "--device": device,
            "--json": None,
        }  # fmt: skip
        argv += ["--data-dir", f"{TMP}/data", "--batches", "1"]  # unless drawn below
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        argv.append(name)
        if options[name] is not None:
            argv.append(draw(options[name]))
    stdin = draw(st.text(max_size=20)) if "--interactive" in argv else ""
    return argv, stdin


@fuzz_settings(examples=60)
@given(case=generate_eval_args())
@example(case=(["generate", f"{TMP}/tiny-llama", "--max-new-tokens", str(2**50)], ""))
@example(case=(["generate", f"{TMP}/tiny-llama", "--max-new-tokens", str(2**63)], ""))
@example(case=(["generate", f"{TMP}/tiny-llama", "--temperature", "1e-300"], ""))
@example(case=(["generate", f"{TMP}/tiny-llama", "--top-p", "1e-300"], ""))
@example(case=(["generate", f"{TMP}/tiny-llama", "--prompt", "\udcff"], ""))
@example(case=(["generate", f"{TMP}/tiny-llama", "--device", "cuda:99999999999999999999"], ""))
def test_fuzzed_generate_and_eval_options_answer_or_refuse_in_one_line(
    case, fuzz_root, corpus, trained_run, tiny_ckpts, capsys
):
    argv, stdin = case
    with example_dir(fuzz_root) as tmp:
        for name, ckpt in tiny_ckpts.items():
            os.symlink(ckpt, tmp / name)  # read only: nothing writes into a checkpoint
        os.symlink(trained_run, tmp / "run")
        os.symlink(corpus, tmp / "data")
        (tmp / "file").write_text("not a checkpoint\n")
        (tmp / "empty").mkdir()
        argv = [in_tmp(a, tmp) for a in argv]
        assert_contract(*run_cli(argv, capsys, stdin))


# ------------------------------------------------------------------- B: corrupted files
TARGETS = [
    *(("ckpt", f) for f in (".", "stoker.json", "model.safetensors", "optimizer.pt",
                            "trainer_state.json", "tokenizer", "tokenizer/tokenizer.json",
                            "tokenizer/tokenizer_config.json")),
    *(("data", f) for f in (".", "meta.json", "train-00000.bin", "val-00000.bin",
                            "verified.json", "tokenizer", "tokenizer/tokenizer.json",
                            "tokenizer/tokenizer_config.json")),
    ("run", "metrics.jsonl"),
    ("run", "config.yaml"),
    ("run", "summary.json"),
    ("run", ".lock"),
]  # fmt: skip
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6,
)  # fmt: skip


@st.composite
def corruptions(draw) -> tuple:
    kind = draw(st.sampled_from(["truncate", "flip", "random", "delete", "directory", "empty",
                                 "json", "json-field"]))  # fmt: skip
    if kind == "truncate":
        return kind, draw(st.floats(0, 1))
    if kind == "flip":
        return kind, draw(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                   min_size=1, max_size=4))  # fmt: skip
    if kind == "random":
        return kind, draw(st.binary(max_size=64))
    if kind == "json":
        return kind, draw(_JSON)
    if kind == "json-field":
        return kind, (draw(st.integers(0, 50)), draw(_JSON))
    return (kind, None)


def _replace_field(tree: object, index: int, value: object) -> object:
    """`tree` with its index-th node replaced by `value`, counting breadth first from the
    root's children (so small indices, which hypothesis favours, are the top-level keys)."""
    slots: list[tuple[object, object]] = []
    queue = [tree]
    while queue and len(slots) <= index:
        node = queue.pop(0)
        keys = (
            node if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
        )
        for k in keys:
            slots.append((node, k))
            queue.append(node[k])  # type: ignore[index]
    if slots:
        node, k = slots[index % len(slots)]
        node[k] = value  # type: ignore[index]
    return tree


def corrupt(path: Path, corruption: tuple) -> None:
    kind, arg = corruption
    if kind in ("delete", "directory"):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if kind == "directory":
            path.mkdir()
        return
    if path.is_dir():  # a whole directory: becomes a file
        shutil.rmtree(path)
        path.write_bytes(b"" if kind == "empty" else b"{}")
        return
    data = path.read_bytes() if path.exists() else b""
    if kind == "truncate":
        data = data[: int(arg * len(data))]
    elif kind == "flip":
        buf = bytearray(data or b"\0")
        for where, mask in arg:
            buf[min(int(where * len(buf)), len(buf) - 1)] ^= mask
        data = bytes(buf)
    elif kind == "random":
        data = arg
    elif kind == "empty":
        data = b""
    elif kind == "json":
        data = json.dumps(arg).encode()
    else:  # json-field: keep the file's shape, change one value
        try:
            tree = json.loads(data)
        except ValueError:
            tree = {}
        data = json.dumps(_replace_field(tree, *arg)).encode()
    path.write_bytes(data)


COMMANDS = ["train", "eval", "generate", "export-hf"]


DIRECTORY = ("directory", None)
MARKER_CONFIG, MARKER_FILES = 3, 4  # stoker.json: format, version, step, config, files
META_DTYPE = 3  # meta.json: format, version, vocab_size, dtype, ...


@fuzz_settings(examples=30)
@given(
    target=st.sampled_from(TARGETS),
    corruption=corruptions(),
    both=st.booleans(),
    command=st.sampled_from(COMMANDS),
)
@example(target=("run", ".lock"), corruption=DIRECTORY, both=False, command="train")
@example(target=("run", "metrics.jsonl"), corruption=DIRECTORY, both=False, command="train")
@example(
    target=("ckpt", "stoker.json"),
    corruption=("json-field", (MARKER_FILES, 5)),
    both=False,
    command="eval",
)
@example(
    target=("ckpt", "stoker.json"),
    corruption=("json-field", (MARKER_CONFIG, None)),
    both=False,
    command="generate",
)
@example(
    target=("ckpt", "stoker.json"),
    corruption=("json-field", (MARKER_CONFIG, None)),
    both=False,
    command="export-hf",
)
@example(
    target=("data", "meta.json"),
    corruption=("json-field", (META_DTYPE, {"a": 1})),
    both=False,
    command="eval",
)
def test_corrupted_run_or_data_file_falls_back_or_is_refused_in_one_line(
    target, corruption, both, command, fuzz_root, corpus, trained_run, capsys
):
    with example_dir(fuzz_root) as tmp:
        run, data = tmp / "run", tmp / "data"
        shutil.copytree(trained_run, run)
        shutil.copytree(corpus, data)
        where, rel = target
        ckpts = sorted((run / "checkpoints").iterdir())
        roots = {"ckpt": ckpts[-1:] + (ckpts[:-1] if both else []), "data": [data], "run": [run]}
        for root in roots[where]:
            corrupt(root / rel, corruption)
        recipe = tmp / "r.yaml"
        recipe.write_text("recipe: pretrain\n")
        argv = {
            "train": ["train", str(recipe), *TINY, f"--data.dir={data}", f"--train.out_dir={run}",
                      "--train.max_steps=7", "--train.save_interval=3", "--train.eval_interval=0",
                      "--train.monitor_interval=0"],
            "eval": ["eval", str(run), "--data-dir", str(data), "--batches", "1", "--device",
                     "cpu"],
            "generate": ["generate", str(run), "--prompt", "def", "--max-new-tokens", "2",
                         "--seed", "0", "--device", "cpu", "--no-stream"],
            "export-hf": ["export-hf", str(run), str(tmp / "hf")],
        }[command]  # fmt: skip
        assert_contract(*run_cli(argv, capsys))


def test_fuzz_helpers_reject_what_breaks_the_contract():
    """The contract check itself can fail: a traceback, exit 1, two lines, a stray line."""
    for code, err in [
        (1, "stoker: error: x\n"),
        (2, "Traceback (most recent call last):\nstoker: error: x\n"),
        (2, "stoker: error: x\nstoker: error: y\n"),
        (2, "warning: something\nstoker: error: x\n"),
        (2, ""),
        (0, "stoker: error: x\n"),
    ]:
        with pytest.raises(AssertionError):
            assert_contract(code, "", err)
    assert_contract(2, "", "\rtrain:  50%|#####\r     \rstoker: error: x\n")
    assert_contract(0, "", "stoker: skipping damaged checkpoint c: x\n")
