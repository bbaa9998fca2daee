"""`stoker validate --quick` on recipes/multimodal/digits.yaml: every check of every stage
passes, and the phase-2 parameter table names projectors, LoRA and missing embeddings."""

from pathlib import Path

import pytest

from stoker.validate import run_validation

ROOT = Path(__file__).parents[3]


@pytest.mark.slow
def test_every_check_of_every_stage_passes_on_digits(digits_data, monkeypatch):
    monkeypatch.chdir(ROOT)
    results, _ = run_validation("recipes/multimodal/digits.yaml",
                                [f"--data.dir={digits_data}"], True, None)  # fmt: skip
    bad = [(r.unit, r.check, r.detail) for r in results if r.status != "PASS"]
    assert not bad, bad
    init = next(r for r in results if r.unit == "phase2" and r.check == "init")
    for part in ("projectors", "lora", "missing"):
        assert part in init.detail
    assert [r.unit for r in results if r.check == "train"] == [
        "encoder:image", "encoder:audio", "phase1", "lm"]  # fmt: skip
