"""Hugging Face interop: the one module that knows `transformers` config keys and weight names.

- `config_from_hf` / `hf_config_from`: a transformers `config.json` dict <-> `ModelConfig`, for
  `LlamaForCausalLM` (LLaMA, SmolLM), `Qwen2ForCausalLM` (LLaMA with q/k/v biases) and
  `GPT2LMHeadModel`. Anything these decoders cannot reproduce exactly (RoPE scaling, sliding
  windows, other activations) is refused with a `StokerError`, never approximated.
- `state_dict_from_hf` / `state_dict_to_hf`: weights. LLaMA/Qwen2 is a prefix rename (our
  submodule names are HF LLaMA's). GPT-2 stores linear weights as `Conv1D` (in, out), fuses
  q/k/v into `c_attn`, and always has biases: here they are transposed, split and fused, and a
  bias-free stoker GPT-2 (e.g. `gpt2-1.36b`) is exported with zero biases (exactly equivalent).
- `read_hf_config`, `read_hf_weights`, `load_hf_model`: local directories only, no network,
  and no `transformers` import (json + safetensors suffice). Imported models get
  `dropout=0.0`; set `--model.dropout` to fine-tune with dropout. Checkpoint directories and
  the `import-hf` / `export-hf` commands are in stoker/hf_dirs.py (models/ imports no train/).
- Weights load from safetensors only: pickle (`pytorch_model.bin`, `.pt`, pickle bytes named
  `.safetensors`) is refused with a conversion hint, never unpickled (downloaded data). A
  corrupt config.json, index or weight file is one StokerError naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from stoker.config import ModelConfig, validate_config
from stoker.errors import StokerError, file_error, file_errors
from stoker.models.gpt import Decoder, build_model

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")
_BY_MODEL_TYPE = dict(zip(("llama", "qwen2", "gpt2"), SUPPORTED, strict=True))
# transformers' defaults for keys a config.json may leave out, per architecture.
_LLAMA = dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
_DEFAULTS = {
    "LlamaForCausalLM": {**_LLAMA, "max_position_embeddings": 2048},
    "Qwen2ForCausalLM": {**_LLAMA, "max_position_embeddings": 32768},
    "GPT2LMHeadModel": dict(n_positions=1024, layer_norm_epsilon=1e-5, tie_word_embeddings=True),
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all 0.5x(1+tanh(√(2/π)(x+.044715x³)))
# Non-persistent buffers older checkpoints may still carry: causal masks, RoPE frequencies.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.\w*inv_freq)$")
# GPT-2 per-layer modules -> ours; the four Conv1D ones store weights transposed (in, out).
_GPT2_LAYER = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
_GPT2_TOP = {"wte": "embed_tokens", "wpe": "embed_positions", "ln_f": "norm"}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ---------------------------------------------------------------------------------- config
def _architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    name = archs[0] if archs else _BY_MODEL_TYPE.get(hf.get("model_type"))
    if name not in SUPPORTED:
        shown = name or f"model_type {hf.get('model_type')!r}"
        raise StokerError(
            f"unsupported architecture {shown}; stoker imports {', '.join(SUPPORTED)}"
        )
    return name


def _get(hf: dict[str, Any], arch: str, key: str) -> Any:
    if hf.get(key) is not None:
        return hf[key]
    if key in _DEFAULTS[arch]:
        return _DEFAULTS[arch][key]
    raise StokerError(
        f"config.json of this {arch} lacks {key!r}; is it a complete transformers config?"
    )


def _rope_theta(hf: dict[str, Any], arch: str) -> float:
    """θ from transformers-5 `rope_parameters` or the older top-level `rope_theta`; any RoPE
    scaling (linear, dynamic, yarn, llama3, ...) is refused, not approximated."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise StokerError(
            "per-layer-type rope_parameters are not supported; stoker's LLaMA "
            "uses one plain RoPE for every layer"
        )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise StokerError(
            f"RoPE scaling {kind!r} is not supported (only plain RoPE); use a "
            "model without rope_scaling or remove it from config.json knowingly"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise StokerError("partial_rotary_factor != 1 is not supported")
    return float(params.get("rope_theta", _get(hf, arch, "rope_theta")))


def _llama_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    act = _get(hf, arch, "hidden_act")
    if act not in ("silu", "swish"):
        raise StokerError(
            f"{arch} with hidden_act={act!r} is not supported (stoker's SwiGLU uses silu)"
        )
    if hf.get("use_sliding_window"):
        raise StokerError(
            "sliding-window attention (use_sliding_window=true) is not "
            "supported; stoker attends over the full context"
        )
    attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    if attn_bias != mlp_bias:
        raise StokerError(
            f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not "
            "supported; stoker's LLaMA has biases on all linears or on none"
        )
    d, h = _get(hf, arch, "hidden_size"), _get(hf, arch, "num_attention_heads")
    kv = hf.get("num_key_value_heads") or h
    head_dim = hf.get("head_dim")
    return dict(
        arch="llama",
        n_layer=_get(hf, arch, "num_hidden_layers"),
        n_head=h,
        n_kv_head=None if kv == h else kv,
        d_model=d,
        head_dim=None if head_dim is None or head_dim * h == d else head_dim,
        d_ff=_get(hf, arch, "intermediate_size"),
        max_seq_len=_get(hf, arch, "max_position_embeddings"),
        norm_eps=_get(hf, arch, "rms_norm_eps"),
        rope_theta=_rope_theta(hf, arch),
        bias=attn_bias,
        qkv_bias=arch == "Qwen2ForCausalLM",
    )


def _gpt2_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    act = hf.get("activation_function") or "gelu_new"
    if act not in _GELU_TANH:
        raise StokerError(
            f"GPT-2 with activation_function={act!r} is not supported; stoker's "
            f"GPT-2 MLP uses the tanh GELU ({', '.join(_GELU_TANH)})"
        )
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise StokerError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    if hf.get("add_cross_attention"):
        raise StokerError("GPT-2 with cross-attention is not a decoder-only LM; not supported")
    return dict(
        arch="gpt2",
        n_layer=_get(hf, arch, "n_layer"),
        n_head=_get(hf, arch, "n_head"),
        d_model=_get(hf, arch, "n_embd"),
        d_ff=hf.get("n_inner"),
        max_seq_len=_get(hf, arch, "n_positions"),
        norm_eps=_get(hf, arch, "layer_norm_epsilon"),
        bias=True,
    )


def config_from_hf(hf_cfg: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a transformers `config.json` dict (StokerError if unsupported)."""
    arch = _architecture(hf_cfg)
    fields = (
        _gpt2_fields(hf_cfg, arch) if arch == "GPT2LMHeadModel" else _llama_fields(hf_cfg, arch)
    )
    fields.update(
        vocab_size=_get(hf_cfg, arch, "vocab_size"),
        tie_embeddings=bool(_get(hf_cfg, arch, "tie_word_embeddings")),
        dropout=0.0,
    )
    if hf_cfg.get("initializer_range") is not None:
        fields["init_std"] = hf_cfg["initializer_range"]
    return validate_config(fields, ModelConfig)


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dict for `cfg`."""
    if cfg.arch == "gpt2":
        if cfg.kv_heads != cfg.n_head or cfg.dim_head * cfg.n_head != cfg.d_model:
            raise StokerError(
                "GPT-2 in transformers has no grouped-query attention and no head_dim option; "
                "export a gpt2 config with n_kv_head=n_head and head_dim=d_model/n_head"
            )
        out = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_layer=cfg.n_layer)
        out.update(n_head=cfg.n_head, n_embd=cfg.d_model, n_inner=cfg.ffn_dim)
        out.update(n_positions=cfg.max_seq_len, n_ctx=cfg.max_seq_len, scale_attn_weights=True)
        out.update(activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps)
        out.update(resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    else:
        qwen2 = cfg.qkv_bias and not cfg.bias
        arch = "Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"
        out = dict(architectures=[arch], model_type="qwen2" if qwen2 else "llama")
        out.update(num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head)
        out.update(num_key_value_heads=cfg.kv_heads, hidden_size=cfg.d_model)
        out.update(head_dim=cfg.dim_head, intermediate_size=cfg.ffn_dim, hidden_act="silu")
        out.update(max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps)
        out.update(rope_theta=cfg.rope_theta)  # what transformers 4.x reads
        out.update(rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        out.update(attention_dropout=cfg.dropout)
        if qwen2:
            out.update(use_sliding_window=False, max_window_layers=cfg.n_layer)
        else:
            out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    out.update(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    out.update(initializer_range=cfg.init_std, use_cache=True, dtype="float32")
    return out


# --------------------------------------------------------------------------------- weights
def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def _gpt2_from_hf(key: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    if m := re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", key):
        i, module, kind = m.groups()
        if kind == "weight" and module in _CONV1D:
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        if module == "attn.c_attn":  # fused (3·C, ...) -> q, k, v (C, ...) each
            for name, part in zip(("q", "k", "v"), t.chunk(3, dim=0), strict=True):
                out[f"layers.{i}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            return
        key = f"layers.{i}.{_GPT2_LAYER.get(module, module)}.{kind}"
    elif m := re.fullmatch(r"(wte|wpe|ln_f)\.(weight|bias)", key):
        key = f"{_GPT2_TOP[m[1]]}.{m[2]}"
    out[key] = t.contiguous()


def _finish_from_hf(out: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Tie the head, drop all-zero biases a bias-free config has no slot for, check keys and
    shapes against the model `cfg` builds (a dropped bias or a wrong shape is an error)."""
    if cfg.tie_embeddings and "embed_tokens.weight" in out:
        head = out.get("lm_head.weight")
        if head is not None and not torch.equal(head, out["embed_tokens.weight"]):
            raise StokerError(
                "config says tie_word_embeddings=true but lm_head.weight differs "
                "from the token embeddings; set it to false in config.json"
            )
        out["lm_head.weight"] = out["embed_tokens.weight"]
    expected = build_model(cfg, device="meta").state_dict()
    for key in [k for k in out if k not in expected and k.endswith(".bias")]:
        if out[key].any():
            raise StokerError(
                f"weight {key} is a nonzero bias but the config has none; set model.bias=true"
            )
        del out[key]
    missing = [k for k in expected if k not in out]
    unexpected = [k for k in out if k not in expected]
    if missing or unexpected:
        raise StokerError(
            f"weights do not match the config: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, t in out.items():
        if t.shape != expected[k].shape:
            raise StokerError(
                f"weight {k} has shape {tuple(t.shape)}, the config needs "
                f"{tuple(expected[k].shape)}"
            )
    return out


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF weights (with or without the `model.`/`transformer.` prefix) -> stoker names."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if _IGNORED.search(key):
            continue
        if cfg.arch == "gpt2":
            _gpt2_from_hf(_strip(key, "transformer."), t, out)
        else:
            out[_strip(key, "model.")] = t
    return _finish_from_hf(out, cfg)


def _gpt2_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    ref = sd["embed_tokens.weight"]

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:  # absent biases are zeros
        return sd[key] if key in sd else torch.zeros(shape, dtype=ref.dtype, device=ref.device)

    C, F = cfg.d_model, cfg.ffn_dim
    out = {
        "transformer.wte.weight": ref,
        "transformer.wpe.weight": sd["embed_positions.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": get("norm.bias", (C,)),
    }
    for i in range(cfg.n_layer):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        qkv = [f"{p}self_attn.{n}_proj" for n in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[k + ".weight"] for k in qkv]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([get(k + ".bias", (C,)) for k in qkv])
        for hf, ours in _GPT2_LAYER.items():
            width = F if hf == "mlp.c_fc" else C
            w = sd[f"{p}{ours}.weight"]
            out[f"{h}{hf}.weight"] = w.t() if hf in _CONV1D else w  # Linear -> Conv1D (in, out)
            out[f"{h}{hf}.bias"] = get(f"{p}{ours}.bias", (width,))
    if "lm_head.weight" in sd and not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Stoker names -> HF names (contiguous tensors). A tied head is left out, as
    `save_pretrained` does; GPT-2 biases the config lacks are written as zeros."""
    if cfg.arch == "gpt2":
        out = _gpt2_to_hf(sd, cfg)
    else:
        out = {(k if k == "lm_head.weight" else f"model.{k}"): t for k, t in sd.items()}
        if cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
    return {k: t.contiguous() for k, t in out.items()}


# ------------------------------------------------------------------------------ directories
def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """`config.json` of a local HF model directory, with one-line errors for what is wrong."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise StokerError(f"no such directory: {d} (pass a local Hugging Face model directory)")
    path = d / "config.json"
    if not path.is_file():
        raise StokerError(
            f"{d} has no config.json; point at a directory written by "
            "transformers' save_pretrained (config.json + model.safetensors)"
        )
    with file_errors(path, "cannot read", "check its permissions"):
        raw = path.read_bytes()
    with file_errors(path, "is not valid JSON", "restore it from the model's source"):
        hf = json.loads(raw)
    if not isinstance(hf, dict):
        raise StokerError(f"{path} must hold a JSON object, not {type(hf).__name__}")
    return hf


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PICKLE_HEADS = (b"PK", *(bytes([0x80, v]) for v in range(2, 6)))  # zip (torch.save), pickle
_REFETCH = "re-download or re-export it (transformers' save_pretrained writes safetensors)"
_CONVERT = (
    "stoker loads only safetensors, because unpickling can run code; convert once where you "
    'trust the file: cd {d} && python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('.').save_pretrained('.')\" (writes model.safetensors)"
)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file; a missing, corrupt or pickle file is one line."""
    if not path.is_file():
        raise file_error(path, "is missing", _REFETCH)
    try:
        with file_errors(path, "is not a readable safetensors file", _REFETCH):
            return load_file(path)
    except StokerError as e:
        with file_errors(path, "cannot read", _REFETCH), open(path, "rb") as fh:
            if fh.read(2) not in _PICKLE_HEADS:
                raise
        what = "is not a safetensors file but pickle bytes (torch.save's format)"
        fix = "if it is a pytorch_model.bin, name it so; " + _CONVERT.format(d=path.parent)
        raise file_error(path, what, fix) from e.__cause__


def _index_shards(index: Path) -> list[str]:
    """The shard file names a `model.safetensors.index.json` lists (plain names in its dir)."""
    what = "is not a readable safetensors index"
    with file_errors(index, what, _REFETCH, also=(AttributeError,)):  # a list has no .get
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not names or not all(
        isinstance(n, str) and n.endswith(".safetensors") and Path(n).name == n for n in names
    ):
        raise file_error(index, "has no weight_map of .safetensors files in its dir", _REFETCH)
    return names


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or a sharded safetensors index. Pickle weights
    (`pytorch_model.bin`, `.pt`, ...) are refused: unpickling an untrusted file can run code."""
    d = Path(hf_dir)
    if (d / "model.safetensors").is_file():
        return _load_safetensors(d / "model.safetensors")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return {k: t for s in _index_shards(index) for k, t in _load_safetensors(d / s).items()}
    pickles = sorted(f.name for f in d.iterdir() if f.suffix in _PICKLE_SUFFIXES and f.is_file())
    if pickles:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        raise file_error(d, f"holds only pickle weights ({shown})", _CONVERT.format(d=d))
    raise StokerError(
        f"{d} has no weights: expected model.safetensors or model.safetensors.index.json"
    )


def load_hf_model(hf_dir: str | Path) -> Decoder:
    """A stoker `Decoder` (float32, eval mode) holding a local HF model's weights, exactly."""
    cfg = config_from_hf(read_hf_config(hf_dir))
    sd = state_dict_from_hf(read_hf_weights(hf_dir), cfg)
    model = build_model(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()
