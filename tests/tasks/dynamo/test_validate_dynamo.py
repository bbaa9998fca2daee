"""`stoker validate --quick` on the shipped DYNAMO recipes (on the fixture's real data): every
check of every phase passes on each, and a broken router stage fails."""

from pathlib import Path

import pytest

from stoker.validate import run_validation

ROOT = Path(__file__).parents[3]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes" / "dynamo").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_check_of_every_phase_passes_on_each_shipped_recipe(recipe, dynamo_data,
                                                                  monkeypatch):  # fmt: skip
    monkeypatch.chdir(ROOT)
    results, said = run_validation(recipe, [f"--data.dir={dynamo_data}"], True, None)
    bad = [(r.unit, r.check, r.detail) for r in results if r.status != "PASS"]
    assert not bad, bad
    units = {r.unit for r in results}
    assert {"phase1:sentiment", "phase1:code", "phase2", "phase3"} <= units
    if "roberta" in recipe:  # a GPU recipe naming the user's roberta-base
        assert any("init_from" in s for s in said)
