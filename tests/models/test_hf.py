"""Parity of `stoker.models.hf` with `transformers`, through the production converter.

Tiny random HF models (every parameter, norms and biases included, perturbed with noise so a
dropped bias or a wrong transpose cannot pass) are imported and must give the same logits, loss
and gradients; exported checkpoints must load in `transformers` with identical weights; state
dicts round-trip ours -> HF -> ours bit for bit. Every documented bad input exits 2 with one line.
Tolerances (float32, CPU): logits, loss and gradients atol = rtol = 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

try:
    import transformers
except ImportError as e:  # the dev extra installs it: a broken install fails, never skips
    pytest.fail(f"parity needs transformers (pip install -e '.[dev]'): {e}", pytrace=False)

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models, pre_tokenizers  # noqa: E402

from stoker.api import load_model, load_tokenizer  # noqa: E402
from stoker.cli import main  # noqa: E402
from stoker.config import ModelConfig, RecipeConfig  # noqa: E402
from stoker.data.tokenizer import Tokenizer  # noqa: E402
from stoker.errors import StokerError  # noqa: E402
from stoker.hf_dirs import import_hf  # noqa: E402
from stoker.models.gpt import build_model, lm_loss  # noqa: E402
from stoker.models.hf import (  # noqa: E402
    config_from_hf,
    hf_config_from,
    load_hf_model,
    state_dict_from_hf,
    state_dict_to_hf,
)
from stoker.train.checkpoint import save_model_checkpoint  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
V, B, T = 96, 2, 16
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, V)]

# name -> (config class, kwargs): the four HF layouts stoker imports.
CASES = {
    "llama-gqa-untied": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            tie_word_embeddings=False,
        ),
    ),
    "llama-tied-headdim": (
        "LlamaConfig",
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2-qkv-bias": (
        "Qwen2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "gpt2-bias": (
        "GPT2Config",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
        ),
    ),
}


def tiny_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter: biases and norm weights move off their 0/1 init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def build_hf(name: str) -> torch.nn.Module:
    cls, kwargs = CASES[name]
    cfg = getattr(transformers, cls)(vocab_size=V, bos_token_id=1, eos_token_id=2, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    perturb(model, seed=len(name))
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A perturbed tiny HF model and its save_pretrained directory (with a tokenizer)."""
    model = build_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer(), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    return model, path


def one_line(text: str) -> bool:
    return text.strip() != "" and "\n" not in text.strip() and "Traceback" not in text


# ------------------------------------------------------------------------------ parity
def test_import_matches_transformers_logits_loss_and_every_gradient(hf_case):
    hf, path = hf_case
    ours = load_hf_model(path)
    ids = batch()
    hf_out = hf(ids, labels=ids)  # HF shifts labels inside
    logits = ours(ids)
    assert_close(logits, hf_out.logits, **TOL)
    loss = lm_loss(logits[:, :-1], ids[:, 1:])
    assert_close(loss, hf_out.loss, **TOL)

    hf.zero_grad()
    hf_out.loss.backward()
    loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    mapped = state_dict_to_hf(ours_grads, ours.config)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert mapped.keys() == hf_grads.keys()
    for name, g in hf_grads.items():
        assert_close(mapped[name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_state_dicts_round_trip_bit_for_bit(hf_case):
    hf, path = hf_case
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    hf_sd = dict(hf.state_dict())
    if cfg.tie_embeddings:  # save_pretrained leaves the tied head out; so does our export
        hf_sd.pop("lm_head.weight")
    back = state_dict_to_hf(state_dict_from_hf(hf_sd, cfg), cfg)
    assert back.keys() == hf_sd.keys()
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)

    ours = build_model(cfg).state_dict()
    again = state_dict_from_hf(state_dict_to_hf(ours, cfg), cfg)
    assert again.keys() == ours.keys()
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    assert hf_config_from(config_from_hf(hf_config_from(cfg))) == hf_config_from(cfg)


def test_cli_import_then_export_loads_in_transformers_identically(hf_case, tmp_path, capsys):
    hf, path = hf_case
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    assert main(["import-hf", str(path), str(ckpt)]) == 0
    assert one_line(capsys.readouterr().out)
    ids = batch(1)
    with torch.no_grad():
        want = hf(ids).logits
        assert_close(load_model(ckpt)(ids), want, **TOL)
    assert load_tokenizer(ckpt).encode("w5 w17 w3") == [5, 17, 3]

    assert main(["export-hf", str(ckpt), str(out)]) == 0
    assert one_line(capsys.readouterr().out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(back) is type(hf)
    assert back.state_dict().keys() == hf.state_dict().keys()
    assert all(
        torch.equal(t, hf.state_dict()[k])
        for k, t in back.state_dict().items()
        if "rotary" not in k
    )
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, want)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # carried verbatim
        assert (out / name).read_bytes() == (path / name).read_bytes()
    text = "w5 w17 w3"
    tok, ref = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, path))
    assert tok(text).input_ids == ref(text).input_ids
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_prefixless_keys_and_stale_buffers_convert_the_same(hf_case):
    """Checkpoints saved from the base model (`h.0...`, `layers.0...`) and older ones that
    still carry causal-mask / RoPE buffers convert to the same weights."""
    hf, path = hf_case
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    want = state_dict_from_hf(dict(hf.state_dict()), cfg)
    base = "transformer." if cfg.arch == "gpt2" else "model."
    legacy = {k.removeprefix(base): t for k, t in hf.state_dict().items()}
    legacy.update(
        {
            "h.0.attn.bias": torch.ones(1, 1, 32, 32),
            "h.0.attn.masked_bias": torch.tensor(-1e4),
            "rotary_emb.inv_freq": torch.ones(8),
        }
    )
    got = state_dict_from_hf(legacy, cfg)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_gpt2_vocab_and_merges_without_tokenizer_json_import_with_transformers_ids(tmp_path):
    src = tmp_path / "hf"
    build_hf("gpt2-bias").save_pretrained(src)
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    vocab.update({"Ġ": 94, "he": 95, "<|endoftext|>": 96})
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\nh e\n")
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"})
    )
    ckpt = import_hf(src, tmp_path / "ckpt")
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    ours = load_tokenizer(ckpt)
    ref = transformers.AutoTokenizer.from_pretrained(src)
    assert ours.encode("hello he") == ref("hello he").input_ids == [95, 75, 75, 78, 94, 95]
    assert ours.eos_id == 96


def test_tied_config_with_a_different_stored_head_is_refused():
    cfg = ModelConfig(arch="llama", n_layer=1, n_head=4, d_model=32, vocab_size=V)
    hf_sd = state_dict_to_hf(build_model(cfg).state_dict(), cfg)
    assert "lm_head.weight" not in hf_sd
    with pytest.raises(StokerError, match="lm_head.weight differs"):
        state_dict_from_hf({**hf_sd, "lm_head.weight": torch.zeros(V, 32)}, cfg)


def test_sharded_safetensors_load_like_a_single_file_and_pickle_is_refused(hf_case, tmp_path):
    hf, path = hf_case
    want = load_hf_model(path).state_dict()
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    got = load_hf_model(sharded).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    binary.mkdir()  # pickle weights only: refused (unpickling can run code), with the fix
    (binary / "config.json").write_text((path / "config.json").read_text())
    torch.save(load_file(path / "model.safetensors"), binary / "pytorch_model.bin")
    with pytest.raises(StokerError, match="holds only pickle weights"):
        load_hf_model(binary)


def test_bias_free_gpt2_exports_with_zero_biases_and_equal_logits(tmp_path, capsys):
    cfg = ModelConfig(
        arch="gpt2",
        n_layer=2,
        n_head=4,
        d_model=64,
        vocab_size=V,
        max_seq_len=32,
        bias=False,
        tie_embeddings=True,
    )  # tiny gpt2-1.36b
    model = build_model(cfg).eval()
    perturb(model, seed=7)
    tok_dir = tmp_path / "tok"
    Tokenizer(tiny_tokenizer(), eos_token="</s>", bos_token="<s>").save(tok_dir)
    ckpt = save_model_checkpoint(
        tmp_path / "ckpt",
        model,
        config=RecipeConfig(model=cfg).model_dump(mode="json"),
        tokenizer_dir=tok_dir,
    )
    assert main(["export-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert one_line(capsys.readouterr().out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    ids = batch(2)
    with torch.no_grad():
        assert_close(hf(ids).logits, model(ids), **TOL)
    biases = [t for k, t in hf.state_dict().items() if k.endswith(".bias")]
    assert len(biases) == 2 * 6 + 1 and not any(t.any() for t in biases)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("w9").input_ids == [9]
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    # Zero biases fold back into the bias-free config exactly.
    hf_sd = state_dict_to_hf(model.state_dict(), cfg)
    again = state_dict_from_hf(hf_sd, cfg)
    assert all(torch.equal(again[k], t) for k, t in model.state_dict().items())


# ------------------------------------------------------------------------------ config
LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=V,
)


def test_config_reads_rope_theta_top_level_or_in_rope_parameters():
    assert config_from_hf({**LLAMA, "rope_theta": 123.0}).rope_theta == 123.0
    params = {"rope_type": "default", "rope_theta": 77.0}
    assert config_from_hf({**LLAMA, "rope_parameters": params}).rope_theta == 77.0
    cfg = config_from_hf({**LLAMA, "model_type": "llama", "architectures": None})
    assert (cfg.arch, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (
        "llama",
        10000.0,
        1e-6,
        False,
    )


def test_gpt2_null_n_inner_means_four_times_width():
    hf = dict(
        architectures=["GPT2LMHeadModel"],
        n_embd=32,
        n_layer=1,
        n_head=4,
        n_inner=None,
        vocab_size=V,
    )
    cfg = config_from_hf(hf)
    assert (cfg.ffn_dim, cfg.bias, cfg.tie_embeddings, cfg.max_seq_len) == (128, True, True, 1024)


@pytest.mark.parametrize(
    "change, words",
    [
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
            "RoPE scaling 'llama3'",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
        ({"architectures": ["BertForMaskedLM"]}, "unsupported architecture BertForMaskedLM"),
        (
            {
                "architectures": ["GPT2LMHeadModel"],
                "n_embd": 32,
                "n_layer": 1,
                "n_head": 4,
                "activation_function": "relu",
            },
            "activation_function='relu'",
        ),
    ],
)
def test_config_refuses_what_the_decoder_cannot_reproduce(change, words):
    with pytest.raises(StokerError, match=words.replace("(", r"\(")) as err:
        config_from_hf({**LLAMA, **change})
    if "unsupported" in words:
        assert "LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel" in str(err.value)


# ------------------------------------------------------------------------------ bad input
def _write(d: Path, config: str | None) -> Path:
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config)
    return d


def _dropped_bias(d: Path) -> Path:
    model = build_hf("qwen2-qkv-bias")
    model.save_pretrained(d)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.bias"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


BAD_IMPORTS = {
    "missing-dir": (lambda d: d / "nope", "no such directory"),
    "no-config": (lambda d: _write(d / "x", None), "has no config.json"),
    "invalid-json": (lambda d: _write(d / "x", "{not json"), "is not valid JSON"),
    "unsupported-arch": (
        lambda d: _write(d / "x", json.dumps({"architectures": ["T5ForConditionalGeneration"]})),
        "unsupported architecture",
    ),
    "missing-weights": (lambda d: _write(d / "x", json.dumps(LLAMA)), "has no weights"),
    "dropped-bias": (lambda d: _dropped_bias(d / "x"), "layers.1.self_attn.k_proj.bias"),
}


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_import_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    make, words = BAD_IMPORTS[case]
    src = make(tmp_path)
    capsys.readouterr()  # drop save_pretrained's progress bar
    assert main(["import-hf", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and err.startswith("stoker: error:") and words in err
    assert not (tmp_path / "out").exists()


def test_import_refuses_to_overwrite_a_non_checkpoint_dir(hf_case, tmp_path, capsys):
    _, path = hf_case
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["import-hf", str(path), str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_export_of_a_non_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    for src in (tmp_path / "nope", tmp_path):
        assert main(["export-hf", str(src), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert one_line(err) and "checkpoint" in err
