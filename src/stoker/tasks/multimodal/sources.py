"""The offline task "digits you see and digits you hear", and the readers of the files users
bring (PNG/JPEG images, WAV audio).

- Images: scikit-learn's bundled `load_digits` (1,797 real 8×8 handwritten digits, 16 grey
  levels; UCI Optical Recognition of Handwritten Digits), written as 8-bit greyscale PNGs; a
  fixed 20% of them (by a hash of the index) is held out for testing.
- Speech: espeak-ng speaks "zero" … "nine" (22,050 Hz, 16-bit mono WAV) in several voices,
  voice variants, speeds and pitches; two voices are held out: every test clip is a voice the
  training set never heard.
- Alignment pairs (phase 1): an image and a clip of the same digit, each from its own split.
- Conversations (phase 2), JSONL with paths relative to the file (the format users bring):
  {"messages": [{"role": "user", "content": "<image>\\nWhich digit is shown?"},
                {"role": "assistant", "content": "7"}], "image": "images/0012.png"}
  Instruction types: which digit is shown (image), which is spoken (audio), are they the same
  (both; yes/no, balanced), and their sum (both).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np

from stoker.errors import StokerError

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                "en-gb-x-gbcwmd"]  # fmt: skip
TEST_VOICES = ["en-029", "en-us-nyc"]  # never heard in training
VARIANTS = ["", "+f2", "+m3", "+f4"]
SPEEDS = [130, 175]
PITCHES = [35, 65]
QUESTIONS = {
    "image": ["Which digit is shown?", "What digit is in the picture?"],
    "audio": ["Which digit is spoken?", "What number do you hear?"],
    "same": ["Is the digit shown the same as the digit spoken?"],
    "sum": ["What is the sum of the digit shown and the digit spoken?"],
}
SAMPLE_RATE = 22050


def held_out(key: str, fraction: float = 0.2) -> bool:
    """A fixed split by hash (independent of order and of Python's hash seed)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


# ------------------------------------------------------------------------------ readers
def read_image(path: Path) -> np.ndarray:
    """(H, W) float32 in 0..1 (greyscale) of a PNG/JPEG/... file; one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise StokerError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        raise StokerError(f"cannot read the image {path}: not a format Pillow reads (PNG, "
                          "JPEG, ...)") from None  # fmt: skip
    except (OSError, ValueError) as e:
        raise StokerError(f"cannot read the image {path}: {e}") from None


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(samples float32 in -1..1, sample rate) of a PCM WAV file (8/16/32-bit, channels
    averaged); one-line error naming the file."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise StokerError(f"audio file not found: {path}") from None
    except (wave.Error, EOFError, OSError) as e:
        raise StokerError(f"cannot read the WAV file {path}: {e} (PCM WAV is supported)") from None
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise StokerError(f"{path}: {8 * width}-bit samples are not supported (8, 16 or 32)")
    x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(2 ** (8 * width - 1))
    if channels > 1:
        x = x[: len(x) // channels * channels].reshape(-1, channels).mean(1)
    return x, rate


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """`x` cropped around its loudest region or zero-padded (centred) to n samples."""
    if len(x) >= n:
        energy = np.convolve(x**2, np.ones(n, dtype=np.float32), mode="valid")
        start = int(energy.argmax())
        return x[start : start + n]
    left = (n - len(x)) // 2
    return np.pad(x, (left, n - len(x) - left))


# ------------------------------------------------------------------------------ building
def write_digit_images(out: Path) -> list[dict[str, Any]]:
    """images/NNNN.png for every scikit-learn digit: [{"path", "label", "split"}]."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        rel = f"images/{i:04d}.png"
        Image.fromarray((img * (255 / 16)).round().astype(np.uint8), mode="L").save(out / rel)
        rows.append({"path": rel, "label": int(label),
                     "split": "test" if held_out(f"image-{i}") else "train"})  # fmt: skip
    return rows


def espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise StokerError("espeak-ng is not installed; it speaks the digits: apt-get install "
                          "espeak-ng (make test does this where apt-get runs as root)")  # fmt: skip
    return exe


def write_digit_speech(out: Path) -> list[dict[str, Any]]:
    """audio/<voice><variant>-s<speed>-p<pitch>-<word>.wav: [{"path", "label", "split",
    "voice"}], training voices × variants × speeds × pitches, the test voices likewise."""
    exe = espeak()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, voices in (("train", TRAIN_VOICES), ("test", TEST_VOICES)):
        for voice in voices:
            for variant in VARIANTS:
                for speed in SPEEDS:
                    for pitch in PITCHES:
                        for label, word in enumerate(WORDS):
                            rel = f"audio/{voice}{variant}-s{speed}-p{pitch}-{word}.wav"
                            cmd = [exe, "-v", voice + variant, "-s", str(speed), "-p",
                                   str(pitch), "-w", str(out / rel), word]  # fmt: skip
                            proc = subprocess.run(cmd, capture_output=True, text=True)
                            if proc.returncode != 0 or not (out / rel).is_file():
                                raise StokerError(f"espeak-ng failed for {' '.join(cmd[1:])}: "
                                                  f"{proc.stderr.strip()[:200]}")  # fmt: skip
                            rows.append({"path": rel, "label": label, "split": split,
                                         "voice": voice + variant})  # fmt: skip
    return rows


def _by_label(rows: list[dict], split: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {d: [] for d in range(10)}
    for r in rows:
        if r["split"] == split:
            out[r["label"]].append(r)
    return out


def alignment_pairs(images: list[dict], clips: list[dict], split: str, n: int,
                    seed: int) -> list[dict]:  # fmt: skip
    """n {"image", "audio", "label"} pairs of one digit, cycling through the digits."""
    rng = random.Random(f"{seed}-align-{split}")
    imgs, auds = _by_label(images, split), _by_label(clips, split)
    return [{"image": rng.choice(imgs[i % 10])["path"], "audio": rng.choice(auds[i % 10])["path"],
             "label": i % 10} for i in range(n)]  # fmt: skip


def conversations(images: list[dict], clips: list[dict], split: str, n: int,
                  seed: int) -> list[dict]:  # fmt: skip
    """n conversations, the four instruction types in turn."""
    rng = random.Random(f"{seed}-chat-{split}")
    imgs, auds = _by_label(images, split), _by_label(clips, split)
    out = []
    for i in range(n):
        kind = ("image", "audio", "same", "sum")[i % 4]
        a, b = rng.randrange(10), rng.randrange(10)
        if kind == "same" and (i // 4) % 2 == 0:
            b = a  # half the "same?" questions are yes
        q = rng.choice(QUESTIONS[kind])
        rec: dict[str, Any] = {"type": kind}
        if kind in ("image", "same", "sum"):
            rec["image"] = rng.choice(imgs[a])["path"]
        if kind in ("audio", "same", "sum"):
            rec["audio"] = rng.choice(auds[b if kind != "audio" else a])["path"]
        tags = "".join(f"<{m}>\n" for m in ("image", "audio") if m in rec)
        answer = {"image": str(a), "audio": str(a), "same": "yes" if a == b else "no",
                  "sum": str(a + b)}[kind]  # fmt: skip
        rec["messages"] = [{"role": "user", "content": tags + q},
                           {"role": "assistant", "content": answer}]  # fmt: skip
        out.append(rec)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_digits(out: Path, seed: int = 1234, n_align: int = 4000, n_chat: int = 6000,
                 n_test: int = 400) -> dict[str, Any]:  # fmt: skip
    """Writes images/, audio/, images.jsonl and audio.jsonl (every file with its label and
    split), align-{train,test}.jsonl and chat-{train,test}.jsonl under
    `out`; returns the counts (manifest)."""
    out.mkdir(parents=True, exist_ok=True)
    images, clips = write_digit_images(out), write_digit_speech(out)
    counts: dict[str, Any] = {
        "images": {s: sum(r["split"] == s for r in images) for s in ("train", "test")},
        "audio": {s: sum(r["split"] == s for r in clips) for s in ("train", "test")},
    }
    write_jsonl(out / "images.jsonl", images)
    write_jsonl(out / "audio.jsonl", clips)
    for split, n_a, n_c in (("train", n_align, n_chat), ("test", n_test, n_test)):
        write_jsonl(out / f"align-{split}.jsonl", alignment_pairs(images, clips, split, n_a, seed))
        write_jsonl(out / f"chat-{split}.jsonl", conversations(images, clips, split, n_c, seed))
        counts[f"align-{split}"], counts[f"chat-{split}"] = n_a, n_c
    return counts
