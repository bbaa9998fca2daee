"""Pretrained encoders from local Hugging Face directories in the multimodal recipe (tiny
random CLIP vision and Whisper models saved by transformers): no encoder stage trains them,
phase 1 aligns their frozen features through the loop, and `stoker validate` passes."""

from pathlib import Path

import pytest
import torch
import transformers

from stoker.config import load_config
from stoker.errors import StokerError
from stoker.train.loop import train
from stoker.validate import run_validation

ROOT = Path(__file__).parents[3]
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
              image_size=32, patch_size=8)  # fmt: skip
WHISPER = dict(d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=37,
               decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=37, num_mel_bins=80,
               max_source_positions=16, max_target_positions=16, vocab_size=60, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # fmt: skip


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf-media")
    models = {"clip": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
              "whisper": transformers.WhisperModel(transformers.WhisperConfig(**WHISPER))}  # fmt: skip
    for name, m in models.items():
        m.save_pretrained(root / name, safe_serialization=True)
    return {k: root / k for k in models}


def _overrides(digits_data, hf_dirs, tmp_path) -> list[str]:
    return [f"--data.dir={digits_data}", f"--train.out_dir={tmp_path / 'run'}",
            "--multimodal.image.kind=hf_clip", f"--multimodal.image.path={hf_dirs['clip']}",
            "--multimodal.audio.kind=hf_whisper", f"--multimodal.audio.path={hf_dirs['whisper']}",
            "--multimodal.phases=[1]", "--multimodal.aligner.max_steps=3",
            "--data.eval_examples=16", "--train.batch_size=8", "--train.micro_batch_size=8"]  # fmt: skip


@pytest.mark.slow
def test_phase1_aligns_frozen_pretrained_encoders_without_encoder_stages(digits_data, hf_dirs,
                                                                        tmp_path):  # fmt: skip
    cfg = load_config(ROOT / "recipes/multimodal/digits.yaml",
                      _overrides(digits_data, hf_dirs, tmp_path))  # fmt: skip
    summary = train(cfg)
    assert list(summary["stages"]) == ["phase1"]  # nothing pretrains the HF encoders
    from stoker.tasks.multimodal.task import build_align_model

    model = build_align_model(cfg)
    assert not any(p.requires_grad for p in model.encoders.parameters())
    assert model.aligner.dims == {"image": 32, "audio": 32}
    results, _ = run_validation(str(ROOT / "recipes/multimodal/digits.yaml"),
                                _overrides(digits_data, hf_dirs, tmp_path / "v"), False,
                                ["freezing", "checkpoint"])  # fmt: skip
    bad = [(r.unit, r.check, r.detail) for r in results if r.status != "PASS"]
    assert not bad, bad


def test_an_hf_kind_needs_its_directory_and_the_right_modality():
    with pytest.raises(StokerError, match="needs path"):
        load_config(ROOT / "recipes/multimodal/digits.yaml", ["--multimodal.image.kind=hf_clip"])
    with pytest.raises(StokerError, match="encodes another modality"):
        load_config(ROOT / "recipes/multimodal/digits.yaml",
                    ["--multimodal.audio.kind=hf_clip", "--multimodal.audio.path=/x"])  # fmt: skip
