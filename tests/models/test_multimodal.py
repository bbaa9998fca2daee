"""models/multimodal.py: the mel filter bank and log-mel spectrogram against a NumPy reference
written from the formulas (rfft of Hann-windowed frames), a pure tone landing in its own mel
band, the CNN encoders' shapes and registry, freezing that survives `.train()` (BatchNorm
statistics unchanged), and the aligner's InfoNCE against a per-row reference with presence
masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stoker.errors import StokerError
from stoker.models.multimodal import (
    ENCODERS,
    LOGIT_SCALE_MAX,
    Aligner,
    AudioCNN,
    ImageCNN,
    LogMel,
    build_modality_encoder,
    contrastive_loss,
    freeze,
    mel_filterbank,
)


def np_filterbank(n_freqs: int, n_mels: int, sr: int) -> np.ndarray:
    """HTK mel filters, loops over bins and bands (the textbook construction)."""
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    top = mel(sr / 2)
    edges = [hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    out = np.zeros((n_freqs, n_mels))
    for k in range(n_freqs):
        f = k * (sr / 2) / (n_freqs - 1)
        for m in range(n_mels):
            lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
            if lo <= f <= mid:
                out[k, m] = (f - lo) / (mid - lo)
            elif mid < f <= hi:
                out[k, m] = (hi - f) / (hi - mid)
    return out


def test_mel_filterbank_equals_the_textbook_construction():
    ours = mel_filterbank(201, 40, 16000).double().numpy()
    np.testing.assert_allclose(ours, np_filterbank(201, 40, 16000), atol=1e-9)
    assert ours.max() <= 1.0 and (ours.sum(0) > 0).all()  # no empty band at this resolution


def test_logmel_equals_numpy_stft_and_a_tone_lands_in_its_band():
    sr, n_fft, hop = 16000, 400, 160
    t = np.arange(4000) / sr
    wave = np.sin(2 * np.pi * 1000 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    ours = LogMel(sr, n_fft, hop, 40)(torch.tensor(wave, dtype=torch.float32)[None])[0]
    assert ours.shape == (40, 1 + 4000 // hop)
    # reference: reflect-pad by n_fft/2, periodic Hann, |rfft|^2, the textbook filters, log
    padded = np.pad(wave, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([padded[i * hop : i * hop + n_fft] * window for i in range(ours.shape[1])])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, 201)
    ref = np.log(np.maximum(power @ np_filterbank(201, 40, sr), 1e-10)).T
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-3, rtol=1e-4)
    # the loudest band is the one whose centre is nearest 1 kHz
    edges = 700 * (10 ** (np.linspace(0, 2595 * math.log10(1 + 8000 / 700), 42) / 2595) - 1)
    assert int(ours[:, 5:-5].mean(1).argmax()) == int(np.abs(edges[1:-1] - 1000).argmin())


def test_logmel_bad_shapes_and_ranges():
    with pytest.raises(ValueError, match="batch, samples"):
        LogMel()(torch.zeros(3))
    assert LogMel(n_fft=400)(torch.zeros(2, 50)).shape == (2, 40, 1)  # shorter than n_fft/2
    with pytest.raises(StokerError, match="f_max"):
        mel_filterbank(201, 40, 16000, f_max=9000)


def test_encoders_pool_or_give_sequences_and_classify():
    torch.manual_seed(0)
    img = ImageCNN(channels=1, widths=(8, 16), n_classes=10)
    x = torch.randn(3, 1, 28, 28)
    assert img.features(x).shape == (3, 16)
    assert img.features(x, sequence=True).shape == (3, 7 * 7, 16)  # 28 -> 14 -> 7 grid cells
    assert img(x).shape == (3, 10)
    aud = AudioCNN(sample_rate=16000, n_mels=32, widths=(8, 16), n_classes=10)
    w = torch.randn(2, 8000)
    frames = 1 + 8000 // 160  # 51 -> 26 -> 13
    assert aud.features(w).shape == (2, 16)
    assert aud.features(w, sequence=True).shape == (2, math.ceil(frames / 4), 16)
    assert aud(w).shape == (2, 10)
    assert set(ENCODERS) == {"image_cnn", "audio_cnn"}
    assert isinstance(build_modality_encoder("audio_cnn", n_mels=16), AudioCNN)
    with pytest.raises(StokerError, match="unknown encoder kind 'vit'; known: audio_cnn"):
        build_modality_encoder("vit")
    with pytest.raises(StokerError, match="encoder image_cnn: .*colour"):
        build_modality_encoder("image_cnn", colour=3)
    with pytest.raises(StokerError, match="at least one block"):
        ImageCNN(widths=())


def test_a_frozen_encoder_stays_in_eval_and_keeps_its_statistics():
    torch.manual_seed(0)
    enc = AudioCNN(n_mels=16, widths=(8,), n_classes=3)
    enc.train()
    enc(torch.randn(4, 4000))  # training-mode statistics move
    frozen = freeze(enc)
    stats = {k: v.clone() for k, v in frozen.state_dict().items()}
    outer = torch.nn.Sequential(frozen, torch.nn.Linear(3, 2))
    outer.train()
    assert outer.training and outer[1].training
    assert not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    x = torch.randn(4, 4000)
    y1 = outer(x)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, stats[k]), k  # BatchNorm's running mean/var and count unchanged
    torch.testing.assert_close(outer(x), y1)  # eval mode: the same input, the same output


def reference_infonce(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """Symmetric InfoNCE, one row at a time: -log softmax(scale * a_i . b_j)[i], both ways."""
    s = scale * a @ b.T
    rows = [-(s[i, i] - np.log(np.exp(s[i]).sum())) for i in range(len(a))]
    cols = [-(s[j, j] - np.log(np.exp(s[:, j]).sum())) for j in range(len(a))]
    return (np.mean(rows) + np.mean(cols)) / 2


def test_contrastive_loss_equals_the_reference_over_present_pairs():
    torch.manual_seed(0)
    emb = {m: F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
           for m in ("audio", "image", "text")}  # fmt: skip
    present = {"image": torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool),
               "audio": torch.tensor([1, 0, 1, 1, 1, 1], dtype=torch.bool)}  # fmt: skip
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss, acc = contrastive_loss(emb, present, scale)
    n = {m: e.numpy() for m, e in emb.items()}
    both_ai = [0, 2, 3]  # audio and image present
    ref = np.mean([
        reference_infonce(n["audio"][both_ai], n["image"][both_ai], 10.0),
        reference_infonce(n["audio"][[0, 2, 3, 4, 5]], n["text"][[0, 2, 3, 4, 5]], 10.0),
        reference_infonce(n["image"][:4], n["text"][:4], 10.0),
    ])  # fmt: skip
    assert float(loss) == pytest.approx(ref, rel=1e-10)
    assert set(acc) == {"audio->image", "image->audio", "audio->text", "text->audio",
                        "image->text", "text->image"}  # fmt: skip
    same = contrastive_loss({"a": emb["text"], "b": emb["text"].clone()}, None, scale)[1]
    assert same == {"a->b": 1.0, "b->a": 1.0}


def test_groups_make_equal_content_positives():
    torch.manual_seed(0)
    a, b = (F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1) for _ in range(2))
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    loss, acc = contrastive_loss({"a": a, "b": b}, None, torch.tensor(7.0, dtype=torch.float64),
                                 groups)  # fmt: skip
    s, g = 7.0 * (a @ b.T).numpy(), groups.numpy()

    def way(s):
        return np.mean([np.log(np.exp(s[i]).sum()) - np.log(np.exp(s[i][g == g[i]]).sum())
                        for i in range(6)])  # fmt: skip

    assert float(loss) == pytest.approx((way(s) + way(s.T)) / 2, rel=1e-10)
    hits = np.mean([g[s[i].argmax()] == g[i] for i in range(6)])
    assert acc["a->b"] == pytest.approx(hits)
    # distinct groups are the plain loss
    plain = contrastive_loss({"a": a, "b": b}, None, torch.tensor(7.0, dtype=torch.float64))[0]
    distinct = contrastive_loss({"a": a, "b": b}, None, torch.tensor(7.0, dtype=torch.float64),
                                torch.arange(6))[0]  # fmt: skip
    assert float(distinct) == pytest.approx(float(plain), rel=1e-12)


def test_contrastive_loss_leaves_out_pairs_with_fewer_than_two_samples():
    emb = {m: F.normalize(torch.randn(3, 4), dim=-1).requires_grad_() for m in ("a", "b")}
    only_one = {"a": torch.tensor([True, False, False])}
    loss, acc = contrastive_loss(emb, only_one, torch.tensor(5.0))
    assert loss.item() == 0.0 and acc == {}
    loss.backward()  # still a graph: a batch with nothing to contrast does not break the step


def test_aligner_embeds_unit_vectors_and_clamps_its_scale():
    torch.manual_seed(0)
    al = Aligner({"image": 16, "audio": 24}, dim=8)
    out = al({"image": torch.randn(5, 16), "audio": torch.randn(5, 7, 24)})  # pooled, sequence
    for e in out.values():
        assert e.shape == (5, 8)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))
    assert al.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        al.logit_scale.fill_(10.0)
    assert al.scale().item() == pytest.approx(math.exp(LOGIT_SCALE_MAX)) == pytest.approx(100)
    with pytest.raises(StokerError, match="two or more modalities"):
        Aligner({"image": 16})
