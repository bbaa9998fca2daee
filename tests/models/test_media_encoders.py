"""Parity of `stoker.models.media_encoders` (CLIP, SigLIP, Whisper) with `transformers`.

- Tiny random `CLIPVisionModel` (quick_gelu and gelu), `CLIPModel`, `SiglipModel`,
  `SiglipVisionModel` (with and without its attention-pooling head), `WhisperModel` and `WhisperForConditionalGeneration`, every
  parameter perturbed with noise (a dropped bias or a swapped norm cannot pass), saved with
  `save_pretrained` (safetensors) and loaded by `load_media_encoder`: the hidden states equal
  transformers' `last_hidden_state` and the pooled vector its `pooler_output` (Whisper: the
  frame mean of its encoder's output). Tolerance (float32, CPU): atol = rtol = 1e-5.
- The log-mel front end equals `WhisperFeatureExtractor` (80 and 128 mels, 30 s windows, a
  clip shorter and one longer than 30 s): max abs diff 0 against its torch path, < 1e-4
  against its NumPy path; the Slaney filter bank equals `mel_filter_bank(norm="slaney",
  mel_scale="slaney")` to 1e-12.
- Image preprocessing is close to `CLIPImageProcessor` / `SiglipImageProcessor` (PIL resizes
  uint8 images; we resize floats with torch's bicubic): within 0.05 in normalised units.
- Loaded encoders are frozen: no parameter needs a gradient, `.train()` leaves them in eval.
- Bad input: one-line StokerError for every documented error path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

try:
    import transformers
except ImportError as e:  # the dev extra installs it: a broken install fails, never skips
    pytest.fail(f"parity needs transformers (pip install -e '.[dev]'): {e}", pytrace=False)

from stoker.errors import StokerError  # noqa: E402
from stoker.models.audio_encoders import WhisperLogMel, mel_filters  # noqa: E402
from stoker.models.media_encoders import (  # noqa: E402
    HF_ENCODERS,
    image_spec,
    load_media_encoder,
)
from stoker.models.vision_encoders import preprocess_images  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)  # fmt: skip
WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=37,
               decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=37, num_mel_bins=80,
               max_source_positions=16, max_target_positions=16, vocab_size=60, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # fmt: skip


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter: zero biases and unit norms would hide mapping mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            parts = name.split(".")
            norm = len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight"
            p.copy_(1.0 + noise if norm else noise)
    return model.eval()


def save(model: torch.nn.Module, d: Path) -> Path:
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each family's tiny random transformers model, saved; (dir, the model in eval)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("media")
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=4, vocab_size=99, bos_token_id=0, eos_token_id=1)  # fmt: skip
    models = {
        "clip_vision": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
        "clip_gelu": transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**VISION, hidden_act="gelu")
        ),
        "clip": transformers.CLIPModel(
            transformers.CLIPConfig(vision_config=VISION, text_config=text, projection_dim=16)
        ),
        "siglip": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),
        "siglip_full": transformers.SiglipModel(
            transformers.SiglipConfig(vision_config=VISION, text_config=text)
        ),
        "siglip_nohead": transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(**VISION, vision_use_head=False)
        ),
        "whisper": transformers.WhisperModel(transformers.WhisperConfig(**WHISPER)),
        "whisper_asr": transformers.WhisperForConditionalGeneration(
            transformers.WhisperConfig(**WHISPER)
        ),
    }
    return {k: (save(randomize(m, i), root / k), m) for i, (k, m) in enumerate(models.items())}


def pixels(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def vision_reference(name: str, model: torch.nn.Module, x: torch.Tensor):
    tower = model.vision_model if name in ("clip", "siglip_full") else model
    with torch.no_grad():
        return tower(pixel_values=x)


@pytest.mark.parametrize("name", ["clip_vision", "clip_gelu", "clip", "siglip", "siglip_full"])
def test_vision_tower_matches_transformers(dirs, name):
    d, ref_model = dirs[name]
    ours, x = load_media_encoder(d), pixels()
    ref = vision_reference(name, ref_model, x)
    with torch.no_grad():
        assert_close(ours(x), ref.last_hidden_state, **TOL)
        assert_close(ours.features(x), ref.pooler_output, **TOL)
        seq = ours.features(x, sequence=True)
    cls_first = name.startswith("clip")  # CLIP's sequence is the patches, without the class token
    assert_close(seq, ref.last_hidden_state[:, 1:] if cls_first else ref.last_hidden_state)
    assert seq.shape == (3, 16, 32) and ours.out_dim == ours.dim == 32
    assert ours.kind == ("hf_clip" if cls_first else "hf_siglip") and ours.modality == "image"


def test_siglip_without_head_pools_by_token_mean(dirs):
    d, ref_model = dirs["siglip_nohead"]
    ours, x = load_media_encoder(d), pixels()
    ref = vision_reference("siglip_nohead", ref_model, x)
    assert ours.head is None and ref.pooler_output is None
    with torch.no_grad():
        assert_close(ours(x), ref.last_hidden_state, **TOL)
        assert_close(ours.features(x), ref.last_hidden_state.mean(1), **TOL)


@pytest.mark.parametrize("name", ["whisper", "whisper_asr"])
def test_whisper_encoder_matches_transformers(dirs, name):
    d, ref_model = dirs[name]
    ours = load_media_encoder(d)
    ref_encoder = ref_model.get_encoder()
    x = torch.randn(2, 80, 32, generator=torch.Generator().manual_seed(2))  # 2 * 16 positions
    with torch.no_grad():
        ref = ref_encoder(x).last_hidden_state
        assert_close(ours(x), ref, **TOL)
        assert_close(ours.features(x), ref.mean(1), **TOL)
    assert ours.out_dim == 32 and ours.kind == "hf_whisper" and ours.modality == "audio"
    seq = load_media_encoder(d, kind="hf_whisper", sequence=True)
    with torch.no_grad():
        assert_close(seq.features(x), ref, **TOL)


def test_whisper_preprocess_feeds_the_encoder(dirs):
    ours = load_media_encoder(dirs["whisper"][0])
    wave = torch.randn(2, 3000, generator=torch.Generator().manual_seed(3)) * 0.1
    feats = ours.preprocess(wave)  # padded to 2 * 16 frames * hop 160 samples
    assert feats.shape == (2, 80, 32)
    assert ours.features(feats).shape == (2, 32)


def test_whisper_full_30_second_window_matches_transformers(tmp_path):
    """Every released Whisper: 1500 positions, 3000 mel frames (30 s); here 1 layer, width 32."""
    cfg = transformers.WhisperConfig(**{**WHISPER, "max_source_positions": 1500,
                                        "encoder_layers": 1})  # fmt: skip
    ref_model = randomize(transformers.WhisperModel(cfg), seed=7)
    ours = load_media_encoder(save(ref_model, tmp_path / "w"))
    wave = torch.randn(2, 16000, generator=torch.Generator().manual_seed(4)) * 0.1  # 1 s
    feats = ours.preprocess(wave)
    assert feats.shape == (2, 80, 3000)
    with torch.no_grad():
        ref = ref_model.get_encoder()(feats).last_hidden_state
        assert ref.shape == (2, 1500, 32)
        assert_close(ours(feats), ref, **TOL)
    half = ours.to(torch.bfloat16)  # the front end stays float32 inside a bf16 module
    assert_close(half.preprocess(wave), feats, atol=0, rtol=0)
    assert half(feats).dtype == torch.bfloat16


def synthetic_waves(seconds: tuple[float, ...]) -> list[np.ndarray]:
    """A 440 Hz tone in noise, a chirp, white noise (one longer than 30 s)."""
    g = np.random.default_rng(0)
    out = []
    for i, s in enumerate(seconds):
        t = np.arange(int(16000 * s)) / 16000
        wave = [0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * (100 + 900 * t) * t),
                np.zeros_like(t)][i % 3]  # fmt: skip
        out.append((wave + 0.05 * g.standard_normal(len(t))).astype(np.float32))
    return out


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    waves = synthetic_waves((2.5, 1.0, 31.0))
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    ref = fe(waves, sampling_rate=16000, return_tensors="np").input_features
    batch = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True)
    ours = WhisperLogMel(n_mels)(batch).numpy()
    assert ours.shape == ref.shape == (3, n_mels, 3000)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)  # torch path: measured 0
    padded = np.stack([np.pad(w, (0, 480000 - len(w))) if len(w) < 480000 else w[:480000]
                       for w in waves])  # fmt: skip
    np.testing.assert_allclose(ours, fe._np_extract_fbank_features(padded, "cpu"), atol=1e-4)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_slaney_mel_filters_match_transformers(n_mels):
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                          max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                          mel_scale="slaney")  # fmt: skip
    np.testing.assert_allclose(mel_filters(201, n_mels, 16000, 0.0, 8000.0).numpy(), ref,
                               atol=1e-12, rtol=0)  # fmt: skip


def smooth_image() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:64]
    wave = np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None] * np.array([1, 0.5, -0.7])
    return (127 + 100 * wave).clip(0, 255).astype(np.uint8)  # (H, W, 3)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_preprocess_is_close_to_the_image_processor(family):
    if family == "clip":
        proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                               crop_size={"height": 32, "width": 32})  # fmt: skip
    else:
        proc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    img = smooth_image()
    ref = proc(images=[img], return_tensors="pt").pixel_values
    ours = preprocess_images(torch.from_numpy(img).permute(2, 0, 1)[None],
                             image_spec(proc.to_dict(), family, 32))  # fmt: skip
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert_close(ours, ref, atol=0.05, rtol=0)


def test_preprocess_reads_preprocessor_config_and_greys_become_rgb(dirs, tmp_path):
    d, _ = dirs["siglip"]
    local = tmp_path / "siglip"
    local.mkdir()
    for f in d.iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    pre = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5],
           "size": {"height": 32, "width": 32}}  # fmt: skip
    (local / "preprocessor_config.json").write_text(json.dumps(pre))
    enc = load_media_encoder(local)
    grey = torch.full((2, 40, 50), 0.5)
    x = enc.preprocess(grey)
    assert x.shape == (2, 3, 32, 32)
    assert_close(x[:, :, 5, 5], torch.tensor([[0.8, 0.6, 0.4]] * 2), atol=1e-5, rtol=0)
    assert_close(enc.preprocess((grey * 255).to(torch.uint8)), x, atol=2 / 255 / 0.5, rtol=0)
    assert enc.features(x).shape == (2, 32)


def test_loaded_encoders_are_frozen_and_stay_in_eval(dirs):
    for name in ("clip_vision", "siglip", "whisper"):
        enc = load_media_encoder(dirs[name][0])
        assert not any(p.requires_grad for p in enc.parameters())
        wrapper = torch.nn.Sequential(enc).train()
        assert wrapper.training and not any(m.training for m in enc.modules())


def test_registry_names_each_family_and_modality():
    assert {k: e.modality for k, e in HF_ENCODERS.items()} == {
        "clip": "image", "siglip": "image", "whisper": "audio"}  # fmt: skip
    assert {e.module.kind for e in HF_ENCODERS.values()} == {"hf_clip", "hf_siglip", "hf_whisper"}


# ------------------------------------------------------------------------------ bad input
def copy_dir(src: Path, dst: Path, config: dict | None = None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(StokerError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_dir_config_and_weights_are_one_line_errors(dirs, tmp_path):
    one_line_error("no such directory", load_media_encoder, tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error("has no config.json", load_media_encoder, empty)
    d = copy_dir(dirs["clip_vision"][0], tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    one_line_error("has no weights: expected model.safetensors", load_media_encoder, d)
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    one_line_error("holds only pickle weights", load_media_encoder, d)


def test_unsupported_configs_are_one_line_errors(dirs, tmp_path):
    src = dirs["clip_vision"][0]
    config = json.loads((src / "config.json").read_text())
    for i, (change, match) in enumerate([
        ({"model_type": "siglip2_vision_model"}, "unsupported media encoder model_type"),
        ({"model_type": "clip_text_model"}, "unsupported media encoder model_type"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"hidden_size": 64}, "weights do not match config.json|has shape"),
    ]):  # fmt: skip
        d = copy_dir(src, tmp_path / f"bad{i}", {**config, **change})
        one_line_error(match, load_media_encoder, d)
    one_line_error("holds a clip model", load_media_encoder, src, kind="hf_whisper")
    one_line_error("unknown media encoder kind", load_media_encoder, src, kind="resnet")
    d = copy_dir(dirs["whisper"][0], tmp_path / "mels")
    (d / "preprocessor_config.json").write_text(json.dumps({"feature_size": 128}))
    one_line_error("feature_size=128", load_media_encoder, d)


def test_wrong_input_shapes_are_one_line_errors(dirs):
    clip, whisper = load_media_encoder(dirs["clip"][0]), load_media_encoder(dirs["whisper"][0])
    one_line_error(
        r"takes pixel_values \(B, 3, 32, 32\).*preprocess", clip, torch.zeros(1, 3, 64, 64)
    )
    one_line_error(r"input_features \(B, 80, 32\)", whisper, torch.zeros(1, 80, 3000))
    one_line_error("images must be", clip.preprocess, torch.zeros(1, 2, 8, 8))
    one_line_error("waveforms", whisper.preprocess, torch.zeros(8))
