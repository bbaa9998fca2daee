"""`stoker validate --quick` on every shipped multimodal recipe (on the digits data): every
check of every stage passes, and the phase-2 parameter table names projectors, LoRA and
missing embeddings — for the Qwen2.5-0.5B recipe also its real shapes' counts."""

from pathlib import Path

import pytest

from stoker.validate import run_validation

ROOT = Path(__file__).parents[3]


RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes" / "multimodal").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_check_of_every_stage_passes(recipe, digits_data, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = [f"--data.dir={digits_data}", "--data.sample_rate=22050", "--data.audio_seconds=1.0"]
    results, said = run_validation(recipe, data, True, None)
    bad = [(r.unit, r.check, r.detail) for r in results if r.status != "PASS"]
    assert not bad, bad
    init = next(r for r in results if r.unit == "phase2" and r.check == "init")
    for part in ("projectors", "lora", "missing"):
        assert part in init.detail
    assert [r.unit for r in results if r.check == "train"] == [
        "encoder:image", "encoder:audio", "phase1", "lm"]  # fmt: skip
    if "qwen" in recipe:  # stand-ins for its three model directories; its own counts shown
        assert len(said) == 3, said
        assert "projectors 8,397,824, lora 2,162,688" in init.detail, init.detail


@pytest.mark.slow
def test_sequence_features_run_through_phase2(digits_data, monkeypatch):
    """features: sequence — every slot holds its encoder's grid (image) or frames (audio)."""
    monkeypatch.chdir(ROOT)
    results, _ = run_validation("recipes/multimodal/digits.yaml",
                                [f"--data.dir={digits_data}",
                                 "--multimodal.phase2.features=sequence"], True, None)  # fmt: skip
    bad = [(r.unit, r.check, r.detail) for r in results if r.status != "PASS"]
    assert not bad, bad
    init = next(r for r in results if r.unit == "phase2" and r.check == "init")
    from stoker.config import load_config
    from stoker.tasks.multimodal.lm import slot_lengths

    cfg = load_config(ROOT / "recipes/multimodal/digits.yaml",
                      [f"--data.dir={digits_data}", "--multimodal.phase2.features=sequence"])  # fmt: skip
    slots = slot_lengths(cfg)  # digits 8x8 after two 2x2 pools: 2x2; a 1 s clip: its frames
    assert slots["image"] == 4 and slots["audio"] > 4, slots
    assert "missing" in init.detail
