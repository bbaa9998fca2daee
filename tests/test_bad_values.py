"""Out-of-range numbers are refused: one stderr line naming the key and the value, exit 2.

Config cases go through `stoker count RECIPE` on a recipe written in tmp_path (validation
only, no training); CLI options of `generate` and `eval` are refused before any checkpoint or
data is read. Each case was a traceback or a silently wrong run before the ranges existed.
"""

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stoker.cli import main
from stoker.config import RecipeConfig, load_config
from stoker.errors import StokerError
from stoker.train.distributed import pick_device

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, **sections: dict) -> Path:
    path = tmp_path / "r.yaml"
    recipe = "mor" if "mor" in sections else "pretrain"  # the recipe that has the section
    path.write_text(yaml.safe_dump({"recipe": recipe, **sections}))
    return path


def _one_line_error(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit 2 and exactly one `stoker: error:` line; return that line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("stoker: error: ") and captured.err.count("\n") == 1
    return captured.err


# (section, key, bad value, text the one line must contain)
OUT_OF_RANGE = [
    # were tracebacks
    ("optim", "lr", -1.0, "optim.lr: -1.0 (Input should be greater than or equal to 0)"),
    ("optim", "betas", [1.5, 0.9], "optim.betas[0]: 1.5 (Input should be less than 1)"),
    ("optim", "betas", [0.9, -0.1], "optim.betas[1]: -0.1"),
    ("model", "dropout", 1.5, "model.dropout: 1.5 (Input should be less than 1)"),
    ("train", "micro_batch_size", 0, "train.micro_batch_size: 0"),
    ("train", "log_interval", 0, "train.log_interval: 0"),
    ("train", "save_interval", 0, "train.save_interval: 0"),
    # were silently wrong
    ("train", "eval_steps", 0, "train.eval_steps: 0"),
    ("optim", "min_lr_ratio", -2.0, "optim.min_lr_ratio: -2.0"),
    ("optim", "min_lr_ratio", 1.5, "optim.min_lr_ratio: 1.5"),
    ("optim", "warmup_steps", -1, "optim.warmup_steps: -1"),
    ("train", "eval_interval", -1, "train.eval_interval: -1"),
    ("train", "max_steps", 0, "train.max_steps: 0"),
    ("train", "max_steps", -5, "train.max_steps: -5"),
    ("train", "keep_last", 0, "train.keep_last: 0 (Input should be greater than or equal to 1)"),
    ("train", "keep_last", -1, "train.keep_last: -1"),
    # the rest of the ranges
    ("optim", "lr", math.nan, "optim.lr: nan (Input should be a finite number)"),
    ("optim", "eps", math.inf, "optim.eps: inf (Input should be a finite number)"),
    ("optim", "eps", 0.0, "optim.eps: 0.0 (Input should be greater than 0)"),
    ("optim", "weight_decay", -0.1, "optim.weight_decay: -0.1"),
    ("optim", "decay_fraction", 1.5, "optim.decay_fraction: 1.5"),
    ("model", "dropout", -0.1, "model.dropout: -0.1"),
    ("model", "init_std", 0.0, "model.init_std: 0.0"),
    ("model", "norm_eps", -1e-5, "model.norm_eps: -1e-05"),
    ("model", "rope_theta", 0.0, "model.rope_theta: 0.0"),
    ("model", "n_layer", 0, "model.n_layer: 0"),
    ("model", "n_kv_head", 0, "model.n_kv_head: 0"),
    ("model", "d_ff", -64, "model.d_ff: -64"),
    ("model", "max_seq_len", 0, "model.max_seq_len: 0"),
    ("model", "ffn_dim_multiplier", -1.0, "model.ffn_dim_multiplier: -1.0"),
    ("data", "val_fraction", 1.0, "data.val_fraction: 1.0 (Input should be less than 1)"),
    ("data", "seed", -1, "data.seed: -1"),
    ("data", "shard_tokens", 0, "data.shard_tokens: 0"),
    (
        "data",
        "num_workers",
        -1,
        "data.num_workers: -1 (Input should be greater than or equal to"
        " 0 or Input should be 'auto')",
    ),
    ("data", "prefetch_factor", 0, "data.prefetch_factor: 0"),
    ("data", "max_documents", 0, "data.max_documents: 0"),
    ("train", "seed", -1, "train.seed: -1"),
    ("train", "batch_size", 0, "train.batch_size: 0"),
    ("train", "seq_len", 0, "train.seq_len: 0"),
    ("train", "grad_clip", -1.0, "train.grad_clip: -1.0"),
    ("train", "monitor_interval", -5.0, "train.monitor_interval: -5.0"),
    ("train", "early_stopping_patience", 0, "train.early_stopping_patience: 0"),
    ("mor", "recursions", 0, "mor.recursions: 0"),
    ("mor", "alpha", 0.0, "mor.alpha: 0.0"),
    ("mor", "router_hidden", -1, "mor.router_hidden: -1"),
    ("mor", "aux_loss_coeff", -0.1, "mor.aux_loss_coeff: -0.1"),
    ("mor", "bias_balance_rate", math.nan, "mor.bias_balance_rate: nan"),
]


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    OUT_OF_RANGE,
    ids=[f"{s}.{k}={v}" for s, k, v, _ in OUT_OF_RANGE],
)
def test_out_of_range_recipe_value_is_one_line_exit_2(
    section, key, value, expected, tmp_path, capsys
):
    err = _one_line_error(["count", str(_recipe(tmp_path, **{section: {key: value}}))], capsys)
    assert f"invalid value for {expected}" in err


def test_tokenizer_vocab_size_must_be_positive(tmp_path, capsys):
    recipe = _recipe(tmp_path, data={"tokenizer": {"vocab_size": 0}})
    assert "data.tokenizer.vocab_size: 0" in _one_line_error(["count", str(recipe)], capsys)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_seq_len_longer_than_max_seq_len_is_refused_for_every_arch(preset, tmp_path, capsys):
    recipe = _recipe(tmp_path, model={"preset": preset}, train={"seq_len": 256})
    err = _one_line_error(["count", str(recipe)], capsys)
    assert "train.seq_len=256 exceeds model.max_seq_len=128" in err
    assert "lower train.seq_len or raise model.max_seq_len" in err


def test_micro_batch_larger_than_batch_is_refused(tmp_path, capsys):
    recipe = _recipe(tmp_path, train={"batch_size": 8, "micro_batch_size": 16})
    err = _one_line_error(["count", str(recipe)], capsys)
    assert "train.micro_batch_size=16 exceeds train.batch_size=8" in err


@pytest.mark.parametrize(
    "device",
    # torch reads cuda:128 as cuda:-128 (an int8), refuses cuda:00, and raises on a huge N
    ["gpu", "cuda:x", "cuda:-1", "CPU", "", "cuda:00", "cuda:128", "cuda:99999999999999999999"],
)
def test_device_that_is_not_a_device_name_is_refused_at_load(device, tmp_path, capsys):
    err = _one_line_error(["count", str(_recipe(tmp_path, train={"device": device}))], capsys)
    assert f"train.device={device!r} is not a device; use auto, cpu, cuda, cuda:N or mps" in err


def test_cli_overrides_arrive_as_text_and_are_range_checked(tmp_path, capsys, monkeypatch):
    """`--key=value` values are strings coerced by the schema: the same ranges apply."""
    monkeypatch.chdir(tmp_path)  # nothing may train, but if it did it would stay in tmp_path
    recipe = _recipe(tmp_path)
    for override, expected in [
        ("--optim.lr=-1", "optim.lr: '-1'"),
        ("--optim.betas=[1.5, 0.9]", "optim.betas[0]: 1.5"),
        ("--train.eval_steps=0", "train.eval_steps: '0'"),
        ("--model.dropout=nan", "model.dropout: 'nan' (Input should be a finite number)"),
    ]:
        err = _one_line_error(["train", str(recipe), override], capsys)
        assert f"invalid value for {expected}" in err


def test_unparseable_list_override_is_one_line(tmp_path, capsys):
    err = _one_line_error(["train", str(_recipe(tmp_path)), "--optim.betas=[0.9,"], capsys)
    assert "cannot parse override value '[0.9,': expected the node content" in err


@pytest.mark.parametrize(
    "override",
    [
        "--train.eval_interval=0",
        "--train.monitor_interval=0",
        "--train.grad_clip=0",
        "--optim.warmup_steps=0",
        "--optim.lr=0",
        "--optim.min_lr_ratio=0",
        "--optim.min_lr_ratio=1",
        "--optim.betas=[0,0.999]",
        "--data.val_fraction=0",
        "--data.num_workers=0",
        "--mor.router_hidden=0 --model.n_layer=4",
        "--mor.bias_balance_rate=0 --model.n_layer=4",
        "--train.keep_last=1",
        "--train.seq_len=128",
        "--train.micro_batch_size=8",
        "--train.device=cuda:3",
    ],
)
def test_documented_edge_values_are_accepted(override):
    load_config(None, override.split())


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "recipes").glob("*/*.yaml"))
    assert recipes
    for path in recipes:
        load_config(path)
    RecipeConfig()


# ------------------------------------------------------------------------------- devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_device_cuda_without_cuda_names_torch_build_and_fix(tmp_path, capsys):
    out = tmp_path / "run"
    err = _one_line_error(
        ["train", str(_recipe(tmp_path)), "--train.device=cuda", f"--train.out_dir={out}"], capsys
    )
    assert (
        f"train.device=cuda but torch sees no CUDA device (torch {torch.__version__}); "
        "use --train.device=auto or cpu"
    ) in err
    assert not out.exists()  # refused before anything was written


def test_train_device_index_past_the_last_gpu_is_refused(tmp_path, capsys):
    n = torch.cuda.device_count()
    out = tmp_path / "run"
    err = _one_line_error(
        ["train", str(_recipe(tmp_path)), f"--train.device=cuda:{n}", f"--train.out_dir={out}"],
        capsys,
    )
    assert f"train.device=cuda:{n} but torch sees" in err and "--train.device=auto or cpu" in err
    assert not out.exists()


@pytest.mark.skipif(
    bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    reason="needs no MPS",
)
def test_pick_device_mps_without_mps_is_refused():
    with pytest.raises(StokerError, match=r"^train.device=mps but torch sees no MPS"):
        pick_device("mps")


def test_pick_device_auto_and_cpu_are_always_available():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(StokerError, match=r"^--device tpu is not a device"):
        pick_device("tpu", "--device")


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_device_option_of_generate_and_eval_must_exist(command, tmp_path, capsys):
    n = torch.cuda.device_count()
    err = _one_line_error([command, str(tmp_path), "--device", f"cuda:{n}"], capsys)
    assert f"--device cuda:{n} but torch sees" in err and "use --device auto or cpu" in err
    if not torch.cuda.is_available():
        err = _one_line_error([command, str(tmp_path), "--device", "cuda"], capsys)
        assert "--device cuda but torch sees no CUDA device" in err


# ------------------------------------------------------------------- generate and eval
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_dir):
    """An untrained tiny-llama checkpoint with a tokenizer (written, not trained)."""
    from stoker.config import ModelConfig
    from stoker.models.gpt import build_model
    from stoker.train.checkpoint import save_model_checkpoint

    torch.manual_seed(0)
    cfg = RecipeConfig(model=ModelConfig(preset="tiny-llama", vocab_size=384))
    return save_model_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "ckpt",
        build_model(cfg.model),
        cfg.model_dump(mode="json"),
        tokenizer_dir=tokenizer_dir,
    )


BAD_SAMPLING = [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, got -3"),
    (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (1 = off), got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1] (1 = off), got 1.5"),
    (["--top-p", "nan"], "--top-p must be in (0, 1] (1 = off), got nan"),
    (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
]


@pytest.mark.parametrize(
    ("argv", "expected"), BAD_SAMPLING, ids=[" ".join(a) for a, _ in BAD_SAMPLING]
)
def test_generate_refuses_out_of_range_sampling_options(argv, expected, tiny_ckpt, capsys):
    err = _one_line_error(["generate", str(tiny_ckpt), "--prompt", "def", *argv], capsys)
    assert err == f"stoker: error: {expected}\n"


def test_generate_accepts_temperature_zero_and_top_p_one(tiny_ckpt, capsys):
    assert (
        main(
            [
                "generate",
                str(tiny_ckpt),
                "--prompt",
                "def",
                "--max-new-tokens",
                "2",
                "--temperature",
                "0",
                "--top-p",
                "1",
                "--seed",
                "0",
                "--no-stream",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("def")


@pytest.mark.parametrize("batches", ["0", "-1"])
def test_eval_batches_must_be_at_least_one(batches, tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run's relative data.dir must not resolve to real shards
    err = _one_line_error(["eval", str(tiny_ckpt), "--batches", batches], capsys)
    assert err == (
        f"stoker: error: --batches must be at least 1, got {batches} (omit it for "
        "the run's train.eval_steps)\n"
    )


# ------------------------------------------------------------------------ closed stdout
def test_closed_stdout_pipe_ends_quietly_with_141(tmp_path):
    """`stoker count --json | head`: the reader is gone before stoker writes. Exit 141 (what
    a tool killed by SIGPIPE reports) and nothing on stderr, no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # every write to `write` now fails with EPIPE
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "stoker",
                "count",
                str(ROOT / "recipes/pretrain/tiny.yaml"),
                "--json",
            ],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == ""


# ------------------------------------------------- found by tests/test_fuzz.py (were tracebacks)
@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("model: 5\n", ["--model.n_layer=2"], "cannot set model.n_layer: model is 5, not a"),
        ("", ["--train=x", "--train.max_steps=2"], "cannot set train.max_steps: train is 'x'"),
        ("", ["--model.preset=[1]"], "invalid config: unknown preset [1]; known: tiny-llama"),
        ("\x1f", [], "not valid YAML (unacceptable character #x001f: special characters"),
        ("[]\n", [], "a recipe must be a YAML mapping of sections"),
        ("0\n", [], "a recipe must be a YAML mapping of sections"),
    ],
)
def test_recipe_or_override_that_cannot_be_merged_is_one_line(
    text, overrides, expected, tmp_path, capsys
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert expected in _one_line_error(["train", str(recipe), *overrides], capsys)


def test_recipe_that_is_not_utf8_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xff\xfe recipe")
    err = _one_line_error(["count", str(recipe)], capsys)
    assert err == (
        f"stoker: error: {recipe}: cannot read the recipe (byte 0xff at offset 0 is not "
        "UTF-8); save it as UTF-8 YAML\n"
    )


def test_empty_recipe_file_is_the_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("")
    assert load_config(recipe) == RecipeConfig()


def test_device_index_torch_cannot_parse_is_refused_by_generate(tiny_ckpt, capsys):
    big = "cuda:99999999999999999999"
    err = _one_line_error(["generate", str(tiny_ckpt), "--device", big], capsys)
    assert f"--device {big} is not a device" in err


def _greedy_text(tiny_ckpt, capsys, *options: str) -> str:
    argv = ["generate", str(tiny_ckpt), "--prompt", "def", "--max-new-tokens", "4"]
    assert main([*argv, "--seed", "0", "--no-stream", *options]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "options", [["--temperature", "1e-300"], ["--temperature", "5e-324"], ["--top-p", "1e-300"]]
)
def test_tiny_temperature_or_top_p_samples_the_most_likely_token(options, tiny_ckpt, capsys):
    """Were `probability tensor contains inf, nan` errors: logits / 1e-300 overflowed, and a
    top_p that float32 rounds to 0 dropped every token. Both now mean greedy decoding."""
    assert _greedy_text(tiny_ckpt, capsys, *options) == _greedy_text(
        tiny_ckpt, capsys, "--temperature", "0"
    )


@pytest.mark.parametrize("n", [2**50, 2**63])  # torch: can't allocate; past int64
def test_max_new_tokens_too_large_for_memory_is_one_line(n, tiny_ckpt, capsys):
    err = _one_line_error(["generate", str(tiny_ckpt), "--max-new-tokens", str(n)], capsys)
    assert f"no memory for a KV cache of {n + 1:,} positions" in err
    assert err.endswith("; lower --max-new-tokens\n")


def test_prompt_that_is_not_utf8_is_one_line(tiny_ckpt, capsys):
    """A non-UTF-8 byte in argv arrives as a lone surrogate (os.fsdecode)."""
    err = _one_line_error(["generate", str(tiny_ckpt), "--prompt", "\udcff"], capsys)
    assert err == "stoker: error: --prompt is not UTF-8 text (byte 0xff at character 0)\n"


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [
        (io.StringIO("ok\n\udcff\n"), "the prompt is not UTF-8 text (byte 0xff at character 0)"),
        (io.TextIOWrapper(io.BytesIO(b"\xff\n"), encoding="utf-8"), "stdin is not UTF-8 text"),
    ],
)
def test_interactive_prompt_that_is_not_utf8_is_one_line(
    stdin, expected, tiny_ckpt, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "stdin", stdin)
    argv = ["generate", str(tiny_ckpt), "--interactive", "--max-new-tokens", "2", "--seed", "0"]
    assert expected in _one_line_error(argv, capsys)


def test_error_quoting_a_newline_is_still_one_line(tmp_path, capsys):
    """A path or override key may hold a newline (both are bytes from argv)."""
    missing = tmp_path / "a\nb.yaml"
    err = _one_line_error(["count", str(missing)], capsys)
    assert (
        err
        == f"stoker: error: recipe file not found: {tmp_path}/a\\nb.yaml (pass a path to a .yaml recipe)\n"
    )
    err = _one_line_error(["train", str(_recipe(tmp_path)), "--tra\nin"], capsys)
    assert err == "stoker: error: override --tra\\nin has no value; write --tra\\nin=VALUE\n"
