"""A pretrained audio encoder, frozen in the multimodal recipe: Whisper's, and its log-mel front end.

- `WhisperEncoder` (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak
  Supervision", §2.2; `transformers.WhisperModel.encoder`): two conv1d layers with GELU (the
  second with stride 2, halving 2N mel frames to N), fixed sinusoidal positions (stored in the
  checkpoint as `embed_positions`, loaded as given), pre-LN blocks (`vision_encoders.Block`;
  the key projection has no bias), a final LayerNorm. Input: `input_features` (B, n_mels, 2N)
  with N = `max_source_positions` (1500 for every released Whisper: 30 s of audio); output
  (B, N, C). `features` mean-pools over the N frames (all of them: Whisper was trained on
  padded 30 s windows, so the padding frames carry what the model makes of silence), or
  returns the sequence.
- `WhisperLogMel`: `WhisperFeatureExtractor`, in torch: the waveform (16 kHz) padded with zeros
  or cut to `n_samples` (30 s), |STFT|² (`torch.stft`, n_fft 400, hop 160, periodic Hann,
  centred with reflect padding, the last frame dropped), a Slaney mel filter bank (`mel_filters`:
  the Slaney mel scale — linear below 1 kHz, logarithmic above — and Slaney area
  normalisation, 2 / (f_{m+2} - f_m), as librosa's `mel(htk=False, norm="slaney")` and
  transformers' `mel_filter_bank(norm="slaney", mel_scale="slaney")`), 0..8 kHz, 80 or 128
  mels; then log10(max(x, 1e-10)), clamped from below at each example's max - 8, and
  (x + 4) / 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.errors import StokerError
from stoker.models.vision_encoders import Block

_MIN_LOG_HZ, _MIN_LOG_MEL, _LOG_STEP = 1000.0, 15.0, 27.0 / math.log(6.4)  # Slaney's scale


def hz_to_mel_slaney(f: torch.Tensor) -> torch.Tensor:
    """3f/200 below 1 kHz, 15 + 27 ln(f / 1000) / ln 6.4 above."""
    f = torch.as_tensor(f, dtype=torch.float64)
    log = _MIN_LOG_MEL + torch.log(f.clamp_min(_MIN_LOG_HZ) / _MIN_LOG_HZ) * _LOG_STEP
    return torch.where(f >= _MIN_LOG_HZ, log, 3.0 * f / 200.0)


def mel_to_hz_slaney(m: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(m, dtype=torch.float64)
    log = _MIN_LOG_HZ * torch.exp((m.clamp_min(_MIN_LOG_MEL) - _MIN_LOG_MEL) / _LOG_STEP)
    return torch.where(m >= _MIN_LOG_MEL, log, 200.0 * m / 3.0)


def mel_filters(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                f_max: float | None = None) -> torch.Tensor:  # fmt: skip
    """(n_freqs, n_mels) float64 Slaney-normalised triangles on the Slaney mel scale."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise StokerError(f"mel filter bank: need 0 <= f_min < f_max <= {sample_rate / 2:g} Hz, "
                          f"got f_min={f_min:g}, f_max={f_max:g}")  # fmt: skip
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    mels = torch.linspace(float(hz_to_mel_slaney(f_min)), float(hz_to_mel_slaney(f_max)),
                          n_mels + 2, dtype=torch.float64)  # fmt: skip
    points = mel_to_hz_slaney(mels)  # (n_mels + 2,) filter edges and centres in Hz
    lo, mid, hi = points[:-2], points[1:-1], points[2:]
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0) * (2.0 / (hi - lo))


class WhisperLogMel(nn.Module):
    """(B, samples) waveforms at `sample_rate` -> (B, n_mels, n_samples // hop_length)."""

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000, n_fft: int = 400,
                 hop_length: int = 160, n_samples: int = 480000):  # fmt: skip
        super().__init__()
        if n_fft < 2 or hop_length < 1 or n_mels < 1 or n_samples < hop_length:
            raise StokerError(f"Whisper log-mel: need n_fft >= 2, hop_length >= 1, n_mels >= 1, "
                              f"n_samples >= hop_length, got {n_fft}, {hop_length}, {n_mels}, "
                              f"{n_samples}")  # fmt: skip
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.n_samples = n_samples
        fb = mel_filters(n_fft // 2 + 1, n_mels, sample_rate, 0.0, min(8000.0, sample_rate / 2))
        # Plain float32 tensors, not buffers: `.to(bfloat16)` of the model must not round them.
        self._consts = {
            "cpu": (torch.hann_window(n_fft), fb.float())
        }  # (n_fft,), (n_freqs, n_mels)

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(window, filters) float32 on `device`, copied there once."""
        key = str(device)
        if key not in self._consts:
            self._consts[key] = tuple(t.to(device) for t in self._consts["cpu"])
        return self._consts[key]

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 2:
            raise StokerError(f"Whisper log-mel takes waveforms (B, samples), got "
                              f"{tuple(wave.shape)}")  # fmt: skip
        short = max(0, self.n_samples - wave.shape[1])  # zeros (silence) pad, longer is cut
        wave = F.pad(wave.float(), (0, short))[:, : self.n_samples]  # (B, n_samples)
        window, filters = self.constants(wave.device)
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=window, center=True,
                          pad_mode="reflect", return_complex=True)  # fmt: skip
        power = spec[..., :-1].abs() ** 2  # (B, n_freqs, frames): the last frame is dropped
        mel = torch.einsum("bft,fm->bmt", power, filters)  # (B, n_mels, frames)
        log = mel.clamp_min(1e-10).log10()
        log = torch.maximum(log, log.amax((1, 2), keepdim=True) - 8.0)
        return (log + 4.0) / 4.0


@dataclass(frozen=True)
class WhisperConfig:
    """Whisper's encoder, in the project's field names; `n_positions` = max_source_positions."""

    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    act: str
    n_mels: int
    n_positions: int
    norm_eps: float = 1e-5  # Whisper's LayerNorms use torch's default


@dataclass(frozen=True)
class AudioSpec:
    """`WhisperFeatureExtractor`'s settings (preprocessor_config.json)."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder: log-mel (B, n_mels, 2N) -> hidden states (B, N, C)."""

    kind = "hf_whisper"
    modality = "audio"

    def __init__(self, cfg: WhisperConfig, spec: AudioSpec | None = None, sequence: bool = False):
        super().__init__()
        spec = spec or AudioSpec()
        self.config, self.spec, self.sequence = cfg, spec, sequence
        C = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.n_mels, C, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(C, C, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.n_positions, C)
        self.layers = nn.ModuleList(
            Block(C, cfg.n_head, cfg.d_ff, cfg.act, cfg.norm_eps, key_bias=False)
            for _ in range(cfg.n_layer)
        )
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        n_samples = 2 * cfg.n_positions * spec.hop_length  # 480000 = 30 s for real Whisper
        self.logmel = WhisperLogMel(cfg.n_mels, spec.sample_rate, spec.n_fft, spec.hop_length,
                                    n_samples)  # fmt: skip

    @property
    def out_dim(self) -> int:
        return self.config.d_model

    dim = out_dim  # the name the recipe's CNN encoders use

    def preprocess(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, samples) at `spec.sample_rate` -> `input_features` (B, n_mels, 2N)."""
        return self.logmel(wave)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        cfg, shape = self.config, tuple(input_features.shape)
        if input_features.dim() != 3 or shape[1:] != (cfg.n_mels, 2 * cfg.n_positions):
            raise StokerError(f"Whisper's encoder takes input_features (B, {cfg.n_mels}, "
                              f"{2 * cfg.n_positions}), got {shape}; use its preprocess(wave)")  # fmt: skip
        x = F.gelu(self.conv1(input_features.to(self.norm.weight.dtype)))  # (B, C, 2N)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, N, C)
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)  # (B, N, C)

    def features(self, input_features: torch.Tensor, sequence: bool | None = None) -> torch.Tensor:
        """The frame mean (B, C), or the frames (B, N, C) when built with (or called with)
        `sequence=True`."""
        hidden = self(input_features)
        return hidden if (self.sequence if sequence is None else sequence) else hidden.mean(1)
