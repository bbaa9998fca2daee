"""Frozen pretrained image and audio encoders from local Hugging Face directories: CLIP, SigLIP
and Whisper, in stoker's own modules, for the multimodal recipe.

What is supported (`HF_ENCODERS`, keyed by family, each with its modality):
- `clip` (image; Radford et al. 2021): `config.json` `model_type` `clip` (a `CLIPModel`: its
  `vision_config` and `vision_model.*` weights; the text tower and projections are ignored) or
  `clip_vision_model` (`CLIPVisionModel`, `CLIPVisionModelWithProjection`). `hidden_act`
  `quick_gelu` or `gelu`. The module: `vision_encoders.CLIPVision`.
- `siglip` (image; Zhai et al. 2023): `siglip` (a `SiglipModel`'s vision tower) or
  `siglip_vision_model` (`SiglipVisionModel`), with or without the attention-pooling head.
  The module: `vision_encoders.SiglipVision`. SigLIP 2 (`siglip2`, variable resolution) is not.
- `whisper` (audio; Radford et al. 2022): `whisper` (`WhisperModel`,
  `WhisperForConditionalGeneration`, `WhisperForAudioClassification`: the `encoder.*` weights;
  the decoder and heads are ignored). The module: `audio_encoders.WhisperEncoder`.
Every module has `forward(inputs) -> (B, N, C)` hidden states equal to `transformers`'
`last_hidden_state`, `features(inputs)` -> the pooled (B, C) (CLIP: post-LN class token;
SigLIP: attention-pooling head; Whisper: frame mean) or, built with `sequence=True`, the
sequence (B, N, C); `out_dim` (= `dim`) = C; `kind` (`hf_clip` ...), `modality`; and
`preprocess(raw)`: images (B, H, W) / (B, 1|3, H, W), uint8 or 0..1 floats -> normalised
`pixel_values` (B, 3, S, S) (mean, std and sizes from `preprocessor_config.json` when the
directory has one, else the family's released values); waveforms (B, samples) at 16 kHz ->
Whisper's log-mel `input_features` (B, n_mels, 3000), as `WhisperFeatureExtractor`.

`load_media_encoder(path)` reads `config.json`, refuses what the modules would compute
differently (one-line `StokerError` naming the key: other activations, unknown model types),
maps the weight names (`media_state_dict_from_hf`: HF's `layer_norm1`/`self_attn_layer_norm`,
`self_attn.out_proj`, `mlp.fc1`/`fc1`, ... become the project's `input_layernorm`,
`self_attn.o_proj`, `mlp.up_proj`, ...; SigLIP's fused `in_proj` is split into q/k/v), checks
every tensor's name and shape, loads float32, and returns the module frozen (no gradients,
eval mode that a later `.train()` keeps: `multimodal.freeze`). Local directories only, no
network, no `transformers` import; weights from safetensors only (`models/hf.py`'s reader:
pickle is refused, never unpickled).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.errors import StokerError, file_errors
from stoker.models.audio_encoders import AudioSpec, WhisperConfig, WhisperEncoder
from stoker.models.hf import read_hf_config, read_hf_weights
from stoker.models.vision_encoders import (
    ACTIVATIONS,
    CLIPVision,
    ImageSpec,
    SiglipVision,
    VisionConfig,
)


@dataclass(frozen=True)
class HFEncoder:
    """One supported family: its modality, the `model_type`s that hold it, its module."""

    modality: str
    model_types: tuple[str, ...]
    module: type[nn.Module]


HF_ENCODERS = {
    "clip": HFEncoder("image", ("clip", "clip_vision_model"), CLIPVision),
    "siglip": HFEncoder("image", ("siglip", "siglip_vision_model"), SiglipVision),
    "whisper": HFEncoder("audio", ("whisper",), WhisperEncoder),
}
_FAMILY = {t: family for family, e in HF_ENCODERS.items() for t in e.model_types}
# transformers' CLIPVisionConfig / SiglipVisionConfig / WhisperConfig defaults.
_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, num_channels=3, image_size=224)  # fmt: skip
_DEFAULTS = {
    "clip": {**_VISION, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "siglip": {
        **_VISION,
        "patch_size": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "vision_use_head": True,
    },  # fmt: skip
    "whisper": dict(
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=1536,
        num_mel_bins=80,
        max_source_positions=1500,
        activation_function="gelu",
    ),  # fmt: skip
}
# The released image processors' normalisation (OpenAI CLIP's; SigLIP's 0.5 / 0.5).
_MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
_IGNORED = re.compile(r"(^|\.)position_ids$")  # a non-persistent buffer old checkpoints carry
_LAYER = {  # HF per-layer module -> ours (CLIP/SigLIP names, then Whisper's)
    "layer_norm1": "input_layernorm",
    "layer_norm2": "post_attention_layernorm",
    "mlp.fc1": "mlp.up_proj",
    "mlp.fc2": "mlp.down_proj",
    "self_attn_layer_norm": "input_layernorm",
    "final_layer_norm": "post_attention_layernorm",
    "fc1": "mlp.up_proj",
    "fc2": "mlp.down_proj",
    "self_attn.out_proj": "self_attn.o_proj",
    **{f"self_attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkv"},
}
_TOP = {  # HF top-level module -> ours
    "pre_layrnorm": "pre_layernorm",  # sic, in transformers' CLIP
    "layer_norm": "norm",  # Whisper's final norm
    "head.attention.out_proj": "head.attention.o_proj",
    "head.mlp.fc1": "head.mlp.up_proj",
    "head.mlp.fc2": "head.mlp.down_proj",
}


# ---------------------------------------------------------------------------------- config
def media_family(hf: dict[str, Any]) -> str:
    """`clip`, `siglip` or `whisper`, from `config.json`'s `model_type`."""
    kind = hf.get("model_type")
    if kind not in _FAMILY:
        raise StokerError(f"unsupported media encoder model_type {kind!r} in config.json; "
                          f"stoker loads {', '.join(_FAMILY)}")  # fmt: skip
    return _FAMILY[kind]


def _section(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The dict holding the tower's keys: a CLIPModel/SiglipModel's `vision_config`."""
    if family != "whisper" and hf.get("model_type") in ("clip", "siglip"):
        section = hf.get("vision_config") or {}
        if not isinstance(section, dict):
            raise StokerError("config.json's vision_config must be a JSON object")
        return section
    return hf


def _get(hf: dict[str, Any], family: str, key: str) -> Any:
    return hf[key] if hf.get(key) is not None else _DEFAULTS[family][key]


def _activation(hf: dict[str, Any], family: str, key: str) -> str:
    act = _get(hf, family, key)
    if act not in ACTIVATIONS:
        raise StokerError(f"config.json has {key}={act!r}; stoker's {family} encoder supports "
                          f"{', '.join(ACTIVATIONS)}")  # fmt: skip
    return act


def media_config_from_hf(hf_cfg: dict[str, Any]) -> VisionConfig | WhisperConfig:
    """The module config of a CLIP/SigLIP/Whisper `config.json` dict (StokerError if not)."""
    family = media_family(hf_cfg)
    hf = _section(hf_cfg, family)
    get = lambda key: _get(hf, family, key)
    if family == "whisper":
        return WhisperConfig(
            n_layer=get("encoder_layers"), n_head=get("encoder_attention_heads"),
            d_model=get("d_model"), d_ff=get("encoder_ffn_dim"),
            act=_activation(hf, family, "activation_function"),
            n_mels=get("num_mel_bins"), n_positions=get("max_source_positions"),
        )  # fmt: skip
    return VisionConfig(
        n_layer=get("num_hidden_layers"), n_head=get("num_attention_heads"),
        d_model=get("hidden_size"), d_ff=get("intermediate_size"),
        act=_activation(hf, family, "hidden_act"), norm_eps=get("layer_norm_eps"),
        image_size=get("image_size"), patch_size=get("patch_size"), channels=get("num_channels"),
        use_head=bool(get("vision_use_head")) if family == "siglip" else False,
    )  # fmt: skip


def _read_preprocessor(d: Path) -> dict[str, Any]:
    path = d / "preprocessor_config.json"
    if not path.is_file():
        return {}
    with file_errors(path, "is not valid JSON", "restore it from the model's source"):
        pre = json.loads(path.read_bytes())
    if not isinstance(pre, dict):
        raise StokerError(f"{path} must hold a JSON object, not {type(pre).__name__}")
    return pre


def _hw(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return int(value["height"]), int(value["width"])
    raise StokerError(f"preprocessor_config.json has {what}={value!r}; expected an int or "
                      "{'height': H, 'width': W}")  # fmt: skip


def image_spec(pre: dict[str, Any], family: str, image_size: int) -> ImageSpec:
    """The preprocessing of `preprocessor_config.json` (or the family's released one)."""
    mean, std = _MEAN_STD[family]
    mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    if len(mean) != 3 or len(std) != 3:
        raise StokerError(f"preprocessor_config.json: image_mean/image_std need 3 values, got "
                          f"{list(mean)} / {list(std)}")  # fmt: skip
    size = pre.get("size", {"shortest_edge": image_size} if family == "clip" else image_size)
    crop = pre.get("crop_size", image_size) if pre.get("do_center_crop", family == "clip") else None
    crop = None if crop is None else _hw(crop, "crop_size")
    if isinstance(size, dict) and "shortest_edge" in size:
        return ImageSpec(mean, std, shortest_edge=int(size["shortest_edge"]), crop=crop)
    return ImageSpec(mean, std, size=_hw(size, "size"), crop=crop)


def audio_spec(pre: dict[str, Any], cfg: WhisperConfig) -> AudioSpec:
    """`WhisperFeatureExtractor`'s settings, checked against the encoder."""
    if pre.get("feature_size", cfg.n_mels) != cfg.n_mels:
        raise StokerError(f"preprocessor_config.json has feature_size={pre['feature_size']} but "
                          f"config.json has num_mel_bins={cfg.n_mels}; they must agree")  # fmt: skip
    return AudioSpec(int(pre.get("sampling_rate", 16000)), int(pre.get("n_fft", 400)),
                     int(pre.get("hop_length", 160)))  # fmt: skip


# --------------------------------------------------------------------------------- weights
def _tower(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The tower's tensors, without the model prefix (`vision_model.`, `model.encoder.`)."""
    if family == "whisper":
        sd = {k.removeprefix("model."): t for k, t in sd.items()}
        return {k.removeprefix("encoder."): t for k, t in sd.items() if k.startswith("encoder.")}
    if any(k.startswith("vision_model.") for k in sd):
        return {
            k[len("vision_model.") :]: t for k, t in sd.items() if k.startswith("vision_model.")
        }
    return {k: t for k, t in sd.items() if k != "visual_projection.weight"}


def _rename(key: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    if m := re.fullmatch(r"(?:encoder\.)?layers\.(\d+)\.(.+)\.(weight|bias)", key):
        i, module, kind = m.groups()
        if module not in _LAYER:
            raise StokerError(f"unexpected encoder weight {key}; is this a CLIP/SigLIP/Whisper "
                              "tower?")  # fmt: skip
        out[f"layers.{i}.{_LAYER[module]}.{kind}"] = t
    elif m := re.fullmatch(r"head\.attention\.in_proj_(weight|bias)", key):
        for name, part in zip("qkv", t.chunk(3, dim=0), strict=True):  # fused (3C, ...) -> C each
            out[f"head.attention.{name}_proj.{m[1]}"] = part
    elif (m := re.fullmatch(r"(.+)\.(weight|bias)", key)) and m[1] in _TOP:
        out[f"{_TOP[m[1]]}.{m[2]}"] = t
    else:
        out[key] = t  # embeddings.*, post_layernorm.*, conv1/2, embed_positions, head.probe


def media_state_dict_from_hf(
    sd: dict[str, torch.Tensor], family: str, expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """HF weights (a whole checkpoint) -> the tower's tensors under stoker names, checked
    against `expected` (the state dict of the module the config builds)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in _tower(sd, family).items():
        if not _IGNORED.search(key):
            _rename(key, t, out)
    missing = [k for k in expected if k not in out]
    unexpected = [k for k in out if k not in expected]
    if missing or unexpected:
        raise StokerError(f"{family} weights do not match config.json: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")  # fmt: skip
    for k, t in out.items():
        if t.shape != expected[k].shape:
            raise StokerError(f"weight {k} has shape {tuple(t.shape)}, config.json needs "
                              f"{tuple(expected[k].shape)}")  # fmt: skip
    return {k: t.contiguous() for k, t in out.items()}


# ------------------------------------------------------------------------------ directories
def build_media_encoder(hf_dir: str | Path, sequence: bool = False) -> nn.Module:
    """The module a local HF directory's config describes, randomly initialised (float32)."""
    d = Path(hf_dir)
    hf = read_hf_config(d)
    family = media_family(hf)
    cfg = media_config_from_hf(hf)
    pre = _read_preprocessor(d)
    if isinstance(cfg, WhisperConfig):
        return WhisperEncoder(cfg, audio_spec(pre, cfg), sequence)
    return HF_ENCODERS[family].module(cfg, image_spec(pre, family, cfg.image_size), sequence)


def load_media_encoder(
    hf_dir: str | Path, kind: str | None = None, sequence: bool = False
) -> nn.Module:
    """A frozen stoker CLIP/SigLIP/Whisper encoder (float32, eval, no gradients) holding a
    local HF directory's weights, exactly. `kind` (`clip`, `siglip`, `whisper`, or with the
    `hf_` prefix) checks that the directory holds that family; `sequence=True` makes
    `features` return the sequence instead of the pooled vector."""
    from stoker.models.multimodal import freeze  # late: multimodal.py may register these kinds

    d = Path(hf_dir)
    family = media_family(read_hf_config(d))
    want = None if kind is None else kind.removeprefix("hf_")
    if want is not None and want not in HF_ENCODERS:
        raise StokerError(f"unknown media encoder kind {kind!r}; known: {', '.join(HF_ENCODERS)}")
    if want is not None and want != family:
        raise StokerError(f"{d} holds a {family} model ({HF_ENCODERS[family].modality}), not "
                          f"{want}; point at a {want} directory or use kind {family}")  # fmt: skip
    model = build_media_encoder(d, sequence)
    sd = media_state_dict_from_hf(read_hf_weights(d), family, model.state_dict())
    model.load_state_dict(sd, strict=True)
    return freeze(model.float())


class MediaFeatures(nn.Module):
    """A frozen pretrained encoder on a recipe's raw inputs: images (B, 1|3, H, W) in 0..1,
    or waveforms (B, samples) at `sample_rate`, linearly resampled to the encoder's rate
    (Whisper: 16 kHz). `dim` and `features` as the small encoders of models/multimodal.py."""

    def __init__(self, encoder: nn.Module, sample_rate: int | None = None):
        super().__init__()
        self.encoder, self.rate = encoder, sample_rate
        self.dim = encoder.out_dim

    def features(self, x: torch.Tensor, sequence: bool = False) -> torch.Tensor:
        if (
            self.encoder.modality == "audio"
            and self.rate
            and self.rate != self.encoder.spec.sample_rate
        ):
            n = round(x.shape[-1] * self.encoder.spec.sample_rate / self.rate)
            x = F.interpolate(x[:, None].float(), size=n, mode="linear", align_corners=False)[:, 0]
        return self.encoder.features(self.encoder.preprocess(x), sequence=sequence)
