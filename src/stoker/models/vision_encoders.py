"""Pretrained vision towers, frozen image encoders of the multimodal recipe: CLIP and SigLIP.

- `CLIPVision` (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
  Supervision", §2.4 and appendix; `transformers.CLIPVisionModel`, the vision half of
  `CLIPModel`): non-overlapping P×P patches by a bias-free conv, a learned class token in front,
  learned positions for 1 + P tokens, a pre-transformer LayerNorm (HF `pre_layrnorm`), pre-LN
  blocks (`quick_gelu` x·σ(1.702x) in OpenAI's checkpoints, `gelu` in some others), and
  `post_layernorm` applied to the class token only: that is the pooled vector (the image
  embedding before CLIP's `visual_projection`, which is not applied here).
- `SiglipVision` (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training";
  `transformers.SiglipVisionModel`): patches by a conv with bias, no class token, learned
  positions, pre-LN blocks with the tanh GELU, `post_layernorm` on every token, and the
  attention-pooling head (`head`, a multihead attention pooling "MAP" head: one learned probe
  query attends over the tokens, then LayerNorm + MLP with a residual) giving the pooled
  vector. Without a head (`vision_use_head=false`) the pooled vector is the token mean.
- `Block`, `Attention`, `MLP`: the pre-LN transformer block these towers and Whisper's encoder
  share, x = x + attn(LN(x)); x = x + mlp(LN(x)), with the project's LLaMA module names
  (`input_layernorm self_attn.{q,k,v,o}_proj post_attention_layernorm mlp.{up,down}_proj`);
  attention is `F.scaled_dot_product_attention` (flash/efficient kernels on GPU).
- `ImageSpec` + `preprocess`: what `CLIPImageProcessor` / `SiglipImageProcessor` do, in torch:
  uint8 (0..255) or float (0..1) images (B, H, W), (B, 1, H, W) or (B, 3, H, W); grey becomes
  three channels; bicubic resize (antialiased, `F.interpolate`) of the shortest edge then a
  centre crop (CLIP), or straight to height×width (SigLIP); clamp to 0..1; (x - mean) / std.
  Close to, not bit-equal with, the processors' PIL resize.

Input to `forward` / `features`: `pixel_values` (B, 3, image_size, image_size), already
normalised (use `preprocess`). Config parsing, weight names and loading: `media_encoders.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.errors import StokerError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# transformers `hidden_act` / `activation_function` names -> the function (the tanh ones agree).
ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_pytorch_tanh": tanh_gelu,
               "gelu_new": tanh_gelu, "gelu_fast": tanh_gelu}  # fmt: skip


@dataclass(frozen=True)
class VisionConfig:
    """One vision tower, in the project's field names."""

    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    act: str
    norm_eps: float
    image_size: int
    patch_size: int
    channels: int = 3
    use_head: bool = True  # SigLIP's attention-pooling head

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ------------------------------------------------------------------------------ blocks
class Attention(nn.Module):
    """Multi-head attention, no mask; `kv` (B, S, C) attends from x to other tokens."""

    def __init__(self, d_model: int, n_head: int, key_bias: bool = True):
        super().__init__()
        if d_model % n_head:
            raise StokerError(f"d_model={d_model} is not a multiple of n_head={n_head}")
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=key_bias)  # Whisper's keys have none
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        src = x if kv is None else kv
        S, H = src.shape[1], self.n_head
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(src).view(B, S, H, C // H).transpose(1, 2)  # (B, H, S, D)
        v = self.v_proj(src).view(B, S, H, C // H).transpose(1, 2)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, act: str):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff)
        self.down_proj = nn.Linear(d_ff, d_model)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, act: str, eps: float,
                 key_bias: bool = True):  # fmt: skip
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = Attention(d_model, n_head, key_bias)
        self.post_attention_layernorm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, d_ff, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


def blocks(cfg: VisionConfig) -> nn.ModuleList:
    return nn.ModuleList(
        Block(cfg.d_model, cfg.n_head, cfg.d_ff, cfg.act, cfg.norm_eps) for _ in range(cfg.n_layer)
    )


# ------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class ImageSpec:
    """What an HF image processor's `preprocessor_config.json` says, resolved: `shortest_edge`
    (resize it to this, keeping the aspect) then a centre `crop`, or a resize to `size`."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: tuple[int, int] | None = None  # (height, width)
    shortest_edge: int | None = None
    crop: tuple[int, int] | None = None


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def preprocess_images(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """uint8 0..255 or float 0..1 images (B, H, W), (B, 1, H, W) or (B, 3, H, W) -> normalised
    `pixel_values` (B, 3, h, w) float32."""
    x = images[:, None] if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise StokerError(f"images must be (B, H, W), (B, 1, H, W) or (B, 3, H, W), got "
                          f"{tuple(images.shape)}")  # fmt: skip
    x = x.float() / 255.0 if images.dtype == torch.uint8 else x.float()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey -> RGB
    if spec.shortest_edge is not None:
        H, W = x.shape[-2:]
        s = spec.shortest_edge
        x = _resize(x, (s, max(s, int(W * s / H))) if H <= W else (max(s, int(H * s / W)), s))
    elif spec.size is not None:
        x = _resize(x, spec.size)
    if spec.crop is not None:
        (H, W), (h, w) = x.shape[-2:], spec.crop
        top, left = max(0, (H - h) // 2), max(0, (W - w) // 2)
        x = x[..., top : top + h, left : left + w]
    mean = torch.tensor(spec.mean, device=x.device)[:, None, None]
    std = torch.tensor(spec.std, device=x.device)[:, None, None]
    return (x.clamp(0.0, 1.0) - mean) / std


# ------------------------------------------------------------------------------ towers
class VisionTower(nn.Module):
    """What CLIP and SigLIP share: config, sequence flag, input check, `preprocess`."""

    modality = "image"

    def __init__(self, cfg: VisionConfig, spec: ImageSpec, sequence: bool = False):
        super().__init__()
        self.config, self.spec, self.sequence = cfg, spec, sequence

    @property
    def out_dim(self) -> int:
        return self.config.d_model

    dim = out_dim  # the name the recipe's CNN encoders use

    def check(self, pixel_values: torch.Tensor) -> None:
        cfg, shape = self.config, tuple(pixel_values.shape)
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or shape[1:] != want:
            raise StokerError(f"{type(self).__name__} takes pixel_values (B, {want[0]}, "
                              f"{want[1]}, {want[2]}), got {shape}; use its preprocess(images)")  # fmt: skip

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_images(images, self.spec)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def patches(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def features(self, pixel_values: torch.Tensor, sequence: bool | None = None) -> torch.Tensor:
        """The pooled vector (B, C), or the patch features (B, P, C) when built with (or
        called with) `sequence=True`."""
        hidden = self(pixel_values)
        seq = self.sequence if sequence is None else sequence
        return self.patches(hidden) if seq else self.pool(hidden)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.d_model
        self.class_embedding = nn.Parameter(torch.randn(C) * C**-0.5)
        self.patch_embedding = nn.Conv2d(cfg.channels, C, cfg.patch_size, cfg.patch_size,
                                         bias=False)  # fmt: skip
        self.position_embedding = nn.Embedding(cfg.n_patches + 1, C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, P, C)
        B, P, C = x.shape
        cls = self.class_embedding.expand(B, 1, C)  # (B, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + P, C)


class CLIPVision(VisionTower):
    """CLIP's vision transformer. `forward` gives the last layer's hidden states (B, 1 + P, C),
    class token first, as `CLIPVisionModel`'s `last_hidden_state`; the pooled vector is
    `post_layernorm` of the class token (its `pooler_output`); the sequence is the P patch
    tokens (B, P, C) of the last layer (LLaVA's choice of tokens, from its last layer)."""

    kind = "hf_clip"

    def __init__(self, cfg: VisionConfig, spec: ImageSpec, sequence: bool = False):
        super().__init__(cfg, spec, sequence)
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.layers = blocks(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check(pixel_values)
        x = self.pre_layernorm(self.embeddings(pixel_values.to(self.post_layernorm.weight.dtype)))
        for layer in self.layers:
            x = layer(x)
        return x  # (B, 1 + P, C)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(hidden[:, 0])  # (B, C)

    def patches(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 1:]  # (B, P, C)


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.d_model, cfg.patch_size,
                                         cfg.patch_size)  # fmt: skip
        self.position_embedding = nn.Embedding(cfg.n_patches, cfg.d_model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, P, C)
        return x + self.position_embedding.weight  # (B, P, C)


class AttentionPool(nn.Module):
    """SigLIP's MAP head: a learned probe attends over the tokens, then + MLP(LN(.))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.d_model))
        self.attention = Attention(cfg.d_model, cfg.n_head)
        self.layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, C = x.shape
        h = self.attention(self.probe.expand(B, 1, C), kv=x)  # (B, 1, C)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]  # (B, C)


class SiglipVision(VisionTower):
    """SigLIP's vision transformer. `forward` gives `post_layernorm`ed hidden states (B, P, C),
    as `SiglipVisionModel`'s `last_hidden_state`; the pooled vector is the attention-pooling
    head's output (its `pooler_output`), or the token mean for a model without a head."""

    kind = "hf_siglip"

    def __init__(self, cfg: VisionConfig, spec: ImageSpec, sequence: bool = False):
        super().__init__(cfg, spec, sequence)
        self.embeddings = SiglipEmbeddings(cfg)
        self.layers = blocks(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = AttentionPool(cfg) if cfg.use_head else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check(pixel_values)
        x = self.embeddings(pixel_values.to(self.post_layernorm.weight.dtype))
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)  # (B, P, C)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.mean(1) if self.head is None else self.head(hidden)  # (B, C)
