"""The digits task's files (held-out images, unseen voices, conversations whose answers follow
from the files they name) and the image/WAV readers' one-line errors."""

from __future__ import annotations

import json
import re
import wave
from pathlib import Path

import numpy as np
import pytest

from stoker.errors import StokerError
from stoker.tasks.multimodal.sources import (
    SAMPLE_RATE,
    TEST_VOICES,
    TRAIN_VOICES,
    WORDS,
    fit_length,
    read_image,
    read_wav,
    write_wav,
)


def rows(d: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (d / name).read_text().splitlines()]


def audio_label(path: str) -> int:
    return WORDS.index(re.search(r"-(\w+)\.wav$", path)[1])


def image_labels() -> list[int]:
    from sklearn.datasets import load_digits

    return load_digits().target.tolist()


def test_images_are_the_sklearn_digits_as_png(digits_data):
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in (0, 17, 1796):
        img = read_image(digits_data / "images" / f"{i:04d}.png")
        assert img.shape == (8, 8)
        np.testing.assert_allclose(img * 16, d.images[i], atol=16 / 255 * 0.51)
    man = json.loads((digits_data / "manifest.json").read_text())
    assert sum(man["images"].values()) == 1797 and 0.15 < man["images"]["test"] / 1797 < 0.25


def test_speech_clips_hold_one_spoken_digit_and_test_voices_are_unseen(digits_data):
    man = json.loads((digits_data / "manifest.json").read_text())
    clips = sorted((digits_data / "audio").glob("*.wav"))
    assert len(clips) == sum(man["audio"].values()) >= 1000
    x, rate = read_wav(clips[0])
    assert rate == SAMPLE_RATE and 0.3 < len(x) / rate < 2.0 and np.abs(x).max() > 0.05
    train = {r["audio"] for r in rows(digits_data, "align-train.jsonl")}
    test = {r["audio"] for r in rows(digits_data, "align-test.jsonl")}
    voice = lambda p: Path(p).name.split("+")[0].split("-s")[0]  # noqa: E731
    assert {voice(p) for p in train} <= set(TRAIN_VOICES)
    assert {voice(p) for p in test} == set(TEST_VOICES)


def test_pairs_and_conversations_agree_with_their_files(digits_data):
    labels = image_labels()
    for split in ("train", "test"):
        pairs = rows(digits_data, f"align-{split}.jsonl")
        for r in pairs:
            assert labels[int(Path(r["image"]).stem)] == r["label"] == audio_label(r["audio"])
        chats = rows(digits_data, f"chat-{split}.jsonl")
        assert {c["type"] for c in chats} == {"image", "audio", "same", "sum"}
        same = [c for c in chats if c["type"] == "same"]
        yes = sum(c["messages"][1]["content"] == "yes" for c in same)
        assert 0.4 < yes / len(same) < 0.65  # balanced, not "always yes"
        for c in chats:
            user, answer = c["messages"][0]["content"], c["messages"][1]["content"]
            assert ("<image>" in user) == ("image" in c) and ("<audio>" in user) == ("audio" in c)
            a = labels[int(Path(c["image"]).stem)] if "image" in c else None
            b = audio_label(c["audio"]) if "audio" in c else None
            want = {"image": str(a), "audio": str(b), "same": "yes" if a == b else "no",
                    "sum": str((a or 0) + (b or 0))}[c["type"]]  # fmt: skip
            assert answer == want, c
            for key in ("image", "audio"):
                assert key not in c or (digits_data / c[key]).is_file()
    train_imgs = {r["image"] for r in rows(digits_data, "chat-train.jsonl") if "image" in r}
    test_imgs = {r["image"] for r in rows(digits_data, "chat-test.jsonl") if "image" in r}
    assert not train_imgs & test_imgs  # held-out images


def test_wav_round_trip_and_reader_errors(tmp_path):
    x = np.sin(np.linspace(0, 60, 1000)).astype(np.float32) * 0.5
    write_wav(tmp_path / "a.wav", x, 8000)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and np.abs(y - x).max() < 1e-4
    with wave.open(str(tmp_path / "st.wav"), "wb") as w:  # stereo 8-bit: averaged channels
        w.setnchannels(2), w.setsampwidth(1), w.setframerate(8000)
        w.writeframes(bytes([128, 255] * 10))
    y, _ = read_wav(tmp_path / "st.wav")
    assert y.shape == (10,) and np.allclose(y, (0 + 127 / 128) / 2)
    (tmp_path / "bad.wav").write_bytes(b"RIFF....not a wave")
    with pytest.raises(StokerError, match=r"cannot read the WAV file .*bad\.wav"):
        read_wav(tmp_path / "bad.wav")
    with pytest.raises(StokerError, match=r"audio file not found: .*gone\.wav"):
        read_wav(tmp_path / "gone.wav")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(StokerError, match=r"cannot read the image .*bad\.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(StokerError, match=r"image file not found: .*gone\.png"):
        read_image(tmp_path / "gone.png")


def test_fit_length_keeps_the_loud_part_or_pads_in_the_middle():
    x = np.zeros(100, dtype=np.float32)
    x[70:80] = 1.0
    assert fit_length(x, 20).sum() == 10  # the 10 loud samples are kept
    y = fit_length(np.ones(4, dtype=np.float32), 10)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
