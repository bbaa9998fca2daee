"""Hugging Face interop for encoders: `transformers` BERT/RoBERTa config keys and weight names.

- `encoder_config_from_hf` / `hf_config_from_encoder`: a `config.json` dict <-> `EncoderConfig`
  for `BertModel` and `RobertaModel` and the bodies of their task models (SUPPORTED). Anything
  the encoder cannot reproduce exactly is refused with a one-line `StokerError` naming the key
  and value: relative position embeddings, activations other than exact `gelu`, decoders and
  cross-attention. `chunk_size_feed_forward` is accepted: it only splits the MLP over
  positions, which gives the same numbers.
- `encoder_state_dict_from_hf` / `encoder_state_dict_to_hf`: weights. `embeddings.*` and
  `pooler.dense` keep their names; per layer, `attention.self.{query,key,value}`,
  `attention.output.dense`, `intermediate.dense` and `output.dense` become
  `self_attn.{q,k,v,o}_proj` and `mlp.{up,down}_proj`, and the two post-LN `LayerNorm`s become
  `post_attention_layernorm` / `post_mlp_layernorm`. A task model's `bert.` / `roberta.` prefix
  is stripped; its task head (`classifier.*`, `qa_outputs.*`, `cls.*`, `lm_head.*`) is not part
  of the encoder and is returned separately, under its HF names, by `load_encoder_with_heads`.
- `load_encoder`, `load_encoder_with_heads`, `export_hf_encoder`: local directories only, no
  network, no `transformers` import; weights from safetensors only (`models/hf.py`'s reader:
  pickle is refused, never unpickled). Imported encoders get `dropout=0.0`, as decoders do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from stoker.config import validate_config
from stoker.errors import StokerError, file_errors
from stoker.models.encoder import Encoder, EncoderConfig, build_encoder
from stoker.models.hf import read_hf_config, read_hf_weights

_TASKS = ("Model", "ForSequenceClassification", "ForQuestionAnswering",
          "ForTokenClassification", "ForMaskedLM")  # fmt: skip
_FAMILIES = {"bert": "Bert", "roberta": "Roberta"}
_KIND = {f"{family}{task}": kind for kind, family in _FAMILIES.items() for task in _TASKS}
SUPPORTED = tuple(_KIND)
# transformers' BertConfig / RobertaConfig defaults for keys a config.json may leave out.
_COMMON = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
               layer_norm_eps=1e-12, initializer_range=0.02, hidden_act="gelu")  # fmt: skip
_DEFAULTS = {
    "bert": {**_COMMON, "vocab_size": 30522, "pad_token_id": 0},
    "roberta": {**_COMMON, "vocab_size": 50265, "pad_token_id": 1},
}
# Flags whose non-default value changes the computation; (key, value it must have).
_MUST = (("is_decoder", False), ("add_cross_attention", False))
_BODY = ("embeddings.", "encoder.", "pooler.")  # what of a checkpoint is the encoder
# Non-persistent buffers older checkpoints still carry.
_IGNORED = re.compile(r"^embeddings\.(position_ids|token_type_ids)$")
_LAYER = {  # HF per-layer module -> ours
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.o_proj",
    "attention.output.LayerNorm": "post_attention_layernorm",
    "intermediate.dense": "mlp.up_proj",
    "output.dense": "mlp.down_proj",
    "output.LayerNorm": "post_mlp_layernorm",
}
_LAYER_BACK = {ours: hf for hf, ours in _LAYER.items()}


# ---------------------------------------------------------------------------------- config
def _model_type(hf: dict[str, Any]) -> str:
    """`bert` or `roberta`, from `architectures[0]` (or `model_type` when there is none)."""
    archs = hf.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    if archs:
        if archs[0] not in _KIND:
            raise StokerError(
                f"unsupported encoder architecture {archs[0]!r}; stoker imports "
                f"{', '.join(SUPPORTED)}"
            )
        return _KIND[archs[0]]
    kind = hf.get("model_type")
    if kind not in _FAMILIES:
        raise StokerError(
            f"unsupported encoder model_type {kind!r} in config.json; stoker imports "
            f"{', '.join(_FAMILIES)}"
        )
    return kind


def _get(hf: dict[str, Any], kind: str, key: str) -> Any:
    return hf[key] if hf.get(key) is not None else _DEFAULTS[kind][key]


def _refuse_unsupported(hf: dict[str, Any], kind: str) -> None:
    """One-line StokerError for every config value the encoder would compute differently."""
    pos = hf.get("position_embedding_type") or "absolute"
    if pos != "absolute":
        raise StokerError(
            f"config.json has position_embedding_type={pos!r}; stoker's encoder supports "
            "only 'absolute' (learned) positions"
        )
    act = _get(hf, kind, "hidden_act")
    if act != "gelu":
        raise StokerError(
            f"config.json has hidden_act={act!r}; stoker's encoder MLP uses the exact erf "
            "GELU, hidden_act='gelu'"
        )
    for key, value in _MUST:
        if hf.get(key, value) != value:
            raise StokerError(
                f"config.json has {key}={hf[key]!r}; stoker's encoder is bidirectional "
                f"and self-attention only (needs {key}={value!r})"
            )
    if hf.get("embedding_size") not in (None, _get(hf, kind, "hidden_size")):
        raise StokerError(
            f"config.json has embedding_size={hf['embedding_size']!r} != hidden_size; "
            "factorized embeddings are not supported"
        )


def encoder_config_from_hf(hf_cfg: dict[str, Any]) -> EncoderConfig:
    """The `EncoderConfig` of a BERT/RoBERTa `config.json` dict (StokerError if unsupported).
    `use_pooler` is False here; `load_encoder` sets it from the weights."""
    kind = _model_type(hf_cfg)
    _refuse_unsupported(hf_cfg, kind)
    get = lambda key: _get(hf_cfg, kind, key)
    fields = dict(
        arch=kind,
        n_layer=get("num_hidden_layers"),
        n_head=get("num_attention_heads"),
        d_model=get("hidden_size"),
        d_ff=get("intermediate_size"),
        vocab_size=get("vocab_size"),
        max_seq_len=get("max_position_embeddings"),
        type_vocab_size=get("type_vocab_size"),
        norm_eps=get("layer_norm_eps"),
        pad_token_id=hf_cfg.get("pad_token_id", _DEFAULTS[kind]["pad_token_id"]),
        init_std=get("initializer_range"),
        dropout=0.0,
    )
    return validate_config(fields, EncoderConfig)


def hf_config_from_encoder(cfg: EncoderConfig) -> dict[str, Any]:
    """A transformers `config.json` dict (`BertModel` / `RobertaModel`) for `cfg`."""
    family = _FAMILIES[cfg.arch]
    return dict(
        architectures=[f"{family}Model"],
        model_type=cfg.arch,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps,
        pad_token_id=cfg.pad_token_id,
        initializer_range=cfg.init_std,
        hidden_act="gelu",
        position_embedding_type="absolute",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        is_decoder=False,
        add_cross_attention=False,
        dtype="float32",
    )


# --------------------------------------------------------------------------------- weights
def _rename_from_hf(key: str) -> str:
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)  # TF-era names
    key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    if m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key):
        i, module, kind = m.groups()
        if module not in _LAYER:
            raise StokerError(f"unexpected encoder weight {key}; is this a BERT/RoBERTa body?")
        return f"layers.{i}.{_LAYER[module]}.{kind}"
    return key  # embeddings.*, pooler.dense.* keep HF's names


def split_hf_encoder_weights(
    sd: dict[str, torch.Tensor], kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(body, heads): HF body weights without the `bert.`/`roberta.` prefix, and every other
    tensor (a task head) under its HF name."""
    prefix = f"{kind}."
    body: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name.startswith(_BODY):
            if not _IGNORED.match(name):
                body[name] = t
        else:
            heads[key] = t
    return body, heads


def encoder_state_dict_from_hf(
    body: dict[str, torch.Tensor], cfg: EncoderConfig
) -> dict[str, torch.Tensor]:
    """HF body weights (no prefix) -> stoker names, checked against the model `cfg` builds."""
    out = {_rename_from_hf(k): t.contiguous() for k, t in body.items()}
    expected = build_encoder(cfg, device="meta").state_dict()
    missing = [k for k in expected if k not in out]
    unexpected = [k for k in out if k not in expected]
    if missing or unexpected:
        raise StokerError(
            f"encoder weights do not match config.json: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    for k, t in out.items():
        if t.shape != expected[k].shape:
            raise StokerError(
                f"weight {k} has shape {tuple(t.shape)}, config.json needs "
                f"{tuple(expected[k].shape)}"
            )
    return out


def encoder_state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stoker names -> `BertModel` / `RobertaModel` names (no prefix), contiguous."""
    out = {}
    for key, t in sd.items():
        if m := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key):
            i, module, kind = m.groups()
            key = f"encoder.layer.{i}.{_LAYER_BACK[module]}.{kind}"
        out[key] = t.contiguous()
    return out


# ------------------------------------------------------------------------------ directories
def load_encoder_with_heads(hf_dir: str | Path) -> tuple[Encoder, dict[str, torch.Tensor]]:
    """A stoker `Encoder` (float32, eval mode) with a local HF directory's body weights,
    exactly, and the checkpoint's task-head tensors under their HF names (e.g.
    `classifier.weight`, `qa_outputs.bias`; empty for a `BertModel`)."""
    hf_cfg = read_hf_config(hf_dir)
    cfg = encoder_config_from_hf(hf_cfg)
    body, heads = split_hf_encoder_weights(read_hf_weights(hf_dir), cfg.arch)
    if "pooler.dense.weight" in body:
        cfg = cfg.model_copy(update={"use_pooler": True})
    model = build_encoder(cfg)
    model.load_state_dict(encoder_state_dict_from_hf(body, cfg), strict=True)
    return model.eval(), heads


def load_encoder(hf_dir: str | Path) -> Encoder:
    """A stoker `Encoder` of a local HF BERT/RoBERTa directory (task heads are dropped)."""
    return load_encoder_with_heads(hf_dir)[0]


def export_hf_encoder(model: Encoder, out: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` that `transformers.AutoModel` loads as a
    `BertModel` / `RobertaModel` (with a pooler only if `model` has one)."""
    dst = Path(out)
    sd = encoder_state_dict_to_hf({k: t.detach() for k, t in model.state_dict().items()})
    fix = "free space or fix permissions there, or choose another output dir"
    with file_errors(dst, "cannot write the export", fix):
        dst.mkdir(parents=True, exist_ok=True)
        config = hf_config_from_encoder(model.config)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
