"""Multimodal building blocks: log-mel spectrograms, small image and audio encoders (a
registry keyed by kind), freezing, and the contrastive aligner with its loss.

- `LogMel`: |STFT|² (`torch.stft`, periodic Hann window, centred with reflect padding) through
  a triangular mel filter bank on the HTK mel scale, mel(f) = 2595 log10(1 + f / 700)
  (Young et al., the HTK Book; torchaudio's `melscale_fbanks(mel_scale="htk", norm=None)`),
  then log(max(x, 1e-10)). No torchaudio needed.
- Encoders (`ENCODERS`): `image_cnn` (conv–BatchNorm–ReLU–max-pool blocks on (B, C, H, W)
  pixels) and `audio_cnn` (the same blocks on a (B, 1, mels, frames) log-mel image of a
  waveform). Each gives pooled features (B, D) or a sequence (B, N, D) — an image's grid
  cells as patches, an audio clip's frames (mean over the mel axis) — and has a classifier
  head, so it can be pretrained on labels before it is frozen.
- `freeze(module)`: no gradients and eval mode that stays: `module.train()` is a no-op
  afterwards, so BatchNorm keeps its running statistics and dropout stays off when the model
  around it trains.
- `Aligner` (phase 1): per modality LayerNorm + Linear into a shared D, L2-normalised
  (ImageBind, Girdhar et al. 2023), with one learnable logit scale (CLIP, Radford et al. 2021:
  initialised to ln(1/0.07), clamped to ln 100).
- `contrastive_loss`: symmetric InfoNCE for every pair of modalities, each over the samples
  in which both are present (per-sample presence masks), averaged over pairs; optional groups
  of samples with the same content, which are each other's positives (multi-positive InfoNCE);
  and the pair's retrieval accuracy (each row's argmax lands in its group), both directions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.errors import StokerError

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the scale at 100


# ------------------------------------------------------------------------------ log-mel
def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters: filter m rises from mel point m to m+1 and falls
    to m+2, over n_mels + 2 points equally spaced in mel between f_min and f_max (Nyquist)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise StokerError(f"mel filter bank: need 0 <= f_min < f_max <= {sample_rate / 2:g} Hz "
                          f"(sample_rate / 2), got f_min={f_min:g}, f_max={f_max:g}")  # fmt: skip
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    points = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)),
                                      n_mels + 2, dtype=torch.float64))  # fmt: skip
    lo, mid, hi = points[:-2], points[1:-1], points[2:]
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class LogMel(nn.Module):
    """(B, samples) waveforms -> (B, n_mels, frames) log-mel power spectrogram, frames =
    1 + samples // hop_length."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160,
                 n_mels: int = 40, f_min: float = 0.0, f_max: float | None = None):  # fmt: skip
        super().__init__()
        if n_fft < 2 or hop_length < 1 or n_mels < 1:
            raise StokerError(f"log-mel: need n_fft >= 2, hop_length >= 1, n_mels >= 1, got "
                              f"{n_fft}, {hop_length}, {n_mels}")  # fmt: skip
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        fb = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max)
        self.register_buffer("filters", fb, persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 2:
            raise ValueError(f"LogMel expects (batch, samples), got {tuple(wave.shape)}")
        frames = 1 + wave.shape[1] // self.hop_length
        if wave.shape[1] <= self.n_fft // 2:  # reflect padding needs more than n_fft/2 samples
            wave = F.pad(wave, (0, self.n_fft // 2 + 1 - wave.shape[1]))
        spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)  # fmt: skip
        power = (spec.real**2 + spec.imag**2)[..., :frames]  # (B, n_freqs, frames)
        mel = torch.einsum("bft,fm->bmt", power, self.filters)
        return torch.log(mel.clamp_min(1e-10))


# ------------------------------------------------------------------------------ encoders
class ConvNet(nn.Module):
    """Blocks of conv 3×3 – BatchNorm – ReLU – max-pool 2×2 on (B, C, H, W); `features`
    pools them to (B, D) or returns the last grid as a sequence; `forward` classifies."""

    def __init__(self, in_channels: int, widths: Sequence[int], n_classes: int):
        super().__init__()
        if not widths:
            raise StokerError("a CNN encoder needs at least one block (widths)")
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]  # fmt: skip
            c = w
        self.blocks = nn.Sequential(*layers)
        self.dim = c
        self.classifier = nn.Linear(c, n_classes)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, D, H', W')

    def features(self, x: torch.Tensor, sequence: bool = False) -> torch.Tensor:
        g = self.grid(x)
        return g.flatten(2).transpose(1, 2) if sequence else g.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ImageCNN(ConvNet):
    """Images (B, C, H, W), pixel values as given (normalize outside)."""

    kind = "image_cnn"
    modality = "image"

    def __init__(self, channels: int = 1, widths: Sequence[int] = (16, 32, 64),
                 n_classes: int = 10):  # fmt: skip
        super().__init__(channels, widths, n_classes)


class AudioCNN(ConvNet):
    """Waveforms (B, samples) -> log-mel (B, 1, mels, frames) -> the conv blocks; a sequence
    is one vector per remaining frame (mean over the mel axis)."""

    kind = "audio_cnn"
    modality = "audio"

    def __init__(self, sample_rate: int = 16000, n_mels: int = 40, n_fft: int = 400,
                 hop_length: int = 160, widths: Sequence[int] = (16, 32, 64),
                 n_classes: int = 10):  # fmt: skip
        super().__init__(1, widths, n_classes)
        self.logmel = LogMel(sample_rate, n_fft, hop_length, n_mels)
        self.norm = nn.BatchNorm2d(1)  # log-mel values span ~-23..+10: standardize them

    def grid(self, wave: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.norm(self.logmel(wave)[:, None]))

    def features(self, wave: torch.Tensor, sequence: bool = False) -> torch.Tensor:
        g = self.grid(wave)  # (B, D, mels', frames')
        return g.mean(2).transpose(1, 2) if sequence else g.mean((2, 3))


ENCODERS: dict[str, Callable[..., ConvNet]] = {ImageCNN.kind: ImageCNN, AudioCNN.kind: AudioCNN}


def build_modality_encoder(kind: str, **options) -> ConvNet:
    if kind not in ENCODERS:
        raise StokerError(f"unknown encoder kind {kind!r}; known: {', '.join(sorted(ENCODERS))}")
    try:
        return ENCODERS[kind](**options)
    except TypeError as e:
        raise StokerError(f"encoder {kind}: {e}") from None


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients for `module`'s parameters, and eval mode for good: a later `.train()` on
    it or on a model holding it leaves it in eval (BatchNorm statistics, dropout)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        m.train = _stay_in_eval.__get__(m)  # bound per instance
        nn.Module.train(m, False)
    return module


# ------------------------------------------------------------------------------ aligner
class Aligner(nn.Module):
    """Per modality LayerNorm + Linear (feature dim -> `dim`), L2-normalised, and the shared
    learnable logit scale."""

    def __init__(self, dims: dict[str, int], dim: int = 128):
        super().__init__()
        if len(dims) < 2:
            raise StokerError(f"the aligner needs two or more modalities, got {sorted(dims)}")
        self.dims, self.dim = dict(dims), dim
        self.proj = nn.ModuleDict(
            {m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, dim)) for m, d in dims.items()}
        )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def embed(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """(B, D_m) or (B, N, D_m) (mean-pooled over N) -> (B, dim), unit length."""
        if features.dim() == 3:
            features = features.mean(1)
        return F.normalize(self.proj[modality](features), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.embed(m, f) for m, f in features.items()}


def _one_way(s: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(Σ_positives e^s / Σ_all e^s)."""
    return (s.logsumexp(1) - s.masked_fill(~positive, float("-inf")).logsumexp(1)).mean()


def contrastive_loss(
    embeddings: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor] | None,
    scale: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean symmetric InfoNCE over the modality pairs, {"<a>-><b>": retrieval accuracy, ...}).

    `present[m]` (B,) bool marks the samples that have modality m (None: all); a pair uses
    the samples having both, and a pair with fewer than two such samples is left out (there is
    nothing to contrast). With no usable pair the loss is a zero that keeps the graph.
    `groups` (B,): samples with one group id show the same content (e.g. the same digit), so
    each is a positive of the others: row i's loss is -log(Σ_{j∈P(i)} e^{s_ij} / Σ_j e^{s_ij})
    (the multi-positive InfoNCE; with no groups P(i) = {i}, CLIP's loss), and a retrieval is
    right when it lands in the row's group."""
    losses, acc = [], {}
    for a, b in combinations(sorted(embeddings), 2):
        ea, eb = embeddings[a], embeddings[b]
        both = torch.ones(len(ea), dtype=torch.bool, device=ea.device)
        if present is not None:
            both = both & present.get(a, both) & present.get(b, both)
        if int(both.sum()) < 2:
            continue
        ea, eb = ea[both], eb[both]
        g = torch.arange(len(ea), device=ea.device) if groups is None else groups[both]
        positive = g[:, None] == g[None, :]  # (n, n), symmetric
        logits = scale * ea @ eb.T  # (n, n): rows a, columns b

        losses.append((_one_way(logits, positive) + _one_way(logits.T, positive)) / 2)
        with torch.no_grad():
            acc[f"{a}->{b}"] = float((g[logits.argmax(1)] == g).double().mean())
            acc[f"{b}->{a}"] = float((g[logits.argmax(0)] == g).double().mean())
    if not losses:  # zero, joined to every input so that backward still reaches them
        return sum(e.sum() for e in embeddings.values()) * 0.0 + scale * 0.0, acc
    return torch.stack(losses).mean(), acc


# ------------------------------------------------------------------------------ files
FILE_FORMAT, FILE_VERSION = "stoker-multimodal", 1


def save_module(path: Path, module: nn.Module, what: str, describe: dict) -> None:
    """One safetensors file that rebuilds itself: the tensors, and in its metadata the format,
    version, what it is (`encoder` | `aligner`) and what builds it (`describe`: the encoder's
    kind and options, or the aligner's dims, dim and encoder kinds). Written atomically."""
    from safetensors.torch import save_file

    meta = {"format": FILE_FORMAT, "version": str(FILE_VERSION), "what": what,
            "describe": json.dumps(describe, sort_keys=True)}  # fmt: skip
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_module(path: Path) -> tuple[nn.Module, dict]:
    """(the module `save_module` wrote, its description), in eval mode; one-line errors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as e:
        raise StokerError(f"cannot read {path}: {e}") from None
    if meta.get("format") != FILE_FORMAT:
        raise StokerError(f"{path} is not a stoker multimodal file (format "
                          f"{meta.get('format')!r}); write it with save_module")  # fmt: skip
    if meta.get("version") != str(FILE_VERSION):
        raise StokerError(f"{path} has format version {meta.get('version')}; this stoker "
                          f"reads version {FILE_VERSION}")  # fmt: skip
    describe = json.loads(meta.get("describe", "{}"))
    if meta.get("what") == "encoder":
        module: nn.Module = build_modality_encoder(describe["kind"], **describe["options"])
    elif meta.get("what") == "aligner":
        module = Aligner(describe["dims"], describe["dim"])
    else:
        raise StokerError(f"{path} holds a {meta.get('what')!r}; known: encoder, aligner")
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        raise StokerError(f"{path}: tensors do not fit its description ({str(e)[:200]})") from None
    return module.eval(), describe
