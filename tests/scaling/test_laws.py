"""Chinchilla laws: reference values, closed-form optimum vs numeric minimization, fitting
recovers the constants that generated the losses, and reading runs the trainer wrote."""

import math

import numpy as np
import pytest

from stoker.errors import StokerError
from stoker.scaling.laws import (
    BESIROGLU,
    HOFFMANN,
    fit_law,
    fit_runs,
    load_run_points,
    parse_law,
)


def test_loss_matches_reference_section_3():
    assert HOFFMANN.loss(1.294e9, 8.472e10) == pytest.approx(2.3721, abs=5e-5)
    assert BESIROGLU.loss(1.294e9, 8.472e10) == pytest.approx(2.3535, abs=5e-5)
    assert HOFFMANN.loss(1.294e9, 6e9) == pytest.approx(2.765, abs=5e-4)
    assert BESIROGLU.loss(1.294e9, 6e9) == pytest.approx(2.696, abs=5e-4)


def golden_section(f, lo: float, hi: float, tol: float = 1e-10) -> float:
    ratio = (math.sqrt(5) - 1) / 2
    while hi - lo > tol:
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return (lo + hi) / 2


@pytest.mark.parametrize("law", [HOFFMANN, BESIROGLU])
@pytest.mark.parametrize("budget", [6.6e20, 5.76e23])
def test_closed_form_optimum_equals_numeric_minimization(law, budget):
    n_opt, d_opt = law.optimal(budget)
    assert 6 * n_opt * d_opt == pytest.approx(budget)
    log_n = golden_section(
        lambda x: law.loss(math.exp(x), budget / (6 * math.exp(x))), math.log(1e6), math.log(1e13)
    )
    assert math.exp(log_n) == pytest.approx(n_opt, rel=1e-4)


def test_tokens_for_loss_inverts_the_law():
    d = HOFFMANN.tokens_for_loss(1.294e9, 2.5)
    assert HOFFMANN.loss(1.294e9, d) == pytest.approx(2.5)
    assert HOFFMANN.tokens_for_loss(1.294e9, 1.8) == math.inf  # below E + A/N^α


def grid_points(law):
    n = np.repeat(np.logspace(7, 9.3, 5), 6)
    d = np.tile(np.logspace(8.5, 11, 6), 5)
    return n, d, np.array([law.loss(a, b) for a, b in zip(n, d, strict=True)])


@pytest.mark.parametrize("law", [HOFFMANN, BESIROGLU])
def test_fit_recovers_constants_of_the_generating_law(law):
    fitted = fit_law(*grid_points(law)).law
    for key in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fitted, key) == pytest.approx(getattr(law, key), rel=0.05), key


def test_fit_is_robust_to_a_few_outliers():
    n, d, loss = grid_points(BESIROGLU)
    loss[[3, 11, 22]] *= 1.3  # three diverged runs
    fitted = fit_law(n, d, loss).law
    for key in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fitted, key) == pytest.approx(getattr(BESIROGLU, key), rel=0.05), key


def test_fit_and_law_input_errors():
    with pytest.raises(StokerError, match="2 model sizes"):
        fit_law([1e8] * 6, np.logspace(9, 10, 6), [3.0] * 6)
    with pytest.raises(StokerError, match="E,A,B,alpha,beta"):
        parse_law("1.69,406.4")
    with pytest.raises(StokerError, match="positive, finite"):
        fit_law([1e8, 2e8, 4e8, 8e8, 1e9], np.logspace(9, 10, 5), [3.0, 2.9, -1, 2.7, 2.6])
    assert parse_law("1.69,406.4,410.7,0.34,0.28").loss(1.294e9, 8.472e10) == pytest.approx(
        HOFFMANN.loss(1.294e9, 8.472e10)
    )


def test_runs_are_read_from_config_and_metrics(tmp_path, write_run):
    n = write_run(tmp_path / "a", 4, HOFFMANN)
    run = load_run_points(tmp_path / "a")
    assert run.n_params == n and run.key == "val_loss"
    assert list(run.tokens) == [s * 64 * 512 for s in (100, 200, 400, 800, 1600)]
    assert len(load_run_points(tmp_path / "a" / "metrics.jsonl", final_only=True).tokens) == 1
    with pytest.raises(StokerError, match="no metrics.jsonl"):
        load_run_points(tmp_path / "missing")


def test_fit_runs_recovers_the_law_from_run_dirs(tmp_path, write_run):
    paths = []
    for i, layers in enumerate((1, 2, 4, 8, 16)):
        write_run(tmp_path / f"r{i}", layers, BESIROGLU, steps=(50, 100, 200, 400, 800, 1600))
        paths.append(str(tmp_path / f"r{i}"))
    fit, runs = fit_runs(paths)
    assert len(runs) == 5 and fit.n_points == 30
    assert fit.law.loss(1.3e9, 8e10) == pytest.approx(BESIROGLU.loss(1.3e9, 8e10), rel=0.01)
