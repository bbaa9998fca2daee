"""Chinchilla scaling laws: predicted loss, compute-optimal N/D, and fitting the law to your
own runs.

L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2; N parameters, D training tokens).
Constants: Hoffmann et al. 2022 approach 3 (rounded) and the Besiroglu et al. 2024 refit of
the same data. Both were fitted on MassiveText with its tokenizer: a loss predicted for any
other corpus or tokenizer is arithmetic on someone else's data, and callers must say so.

Compute-optimal under C ≈ 6ND (Hoffmann et al. 2022, appendix D.2): minimizing L along
D = C/(6N) gives N_opt = G·(C/6)^a, D_opt = (C/6)^b / G with G = (αA/(βB))^(1/(α+β)),
a = β/(α+β), b = α/(α+β).

Fitting (Hoffmann et al. 2022 §3.3, approach 3): minimize the Huber loss (δ = 1e-3) between
LSE(a − α·log N, b − β·log D, e) and log L over θ = (a, b, e, α, β) with A = eᵃ, B = eᵇ,
E = eᵉ, by L-BFGS from a grid of initializations (their grid; we run L-BFGS from its best
points). Implemented in numpy, without scipy.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from numpy.typing import ArrayLike

from stoker.errors import StokerError

DATA_CAVEAT = (
    "hoffmann and besiroglu were fitted on MassiveText with its tokenizer, not your data or "
    "tokenizer: arithmetic, not a promise for your corpus"
)

# Hoffmann et al. 2022 trained 70M to 16B parameters on 5B to 500B tokens (§3).
FITTED_RANGE = {"params": (7e7, 1.6e10), "tokens": (5e9, 5e11)}


def in_fitted_range(n_params: float, tokens: float) -> bool:
    """Whether (N, D) lies inside the range the published laws were fitted on."""
    (n_lo, n_hi), (d_lo, d_hi) = FITTED_RANGE["params"], FITTED_RANGE["tokens"]
    return n_lo <= n_params <= n_hi and d_lo <= tokens <= d_hi


@dataclass(frozen=True)
class Chinchilla:
    """L(N, D) = E + A/N^alpha + B/D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = "custom"
    source: str = "user constants"

    def loss(self, n_params: float, tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / tokens**self.beta

    def optimal(self, budget_flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimizing the loss at C = 6·N·D FLOPs (closed form)."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        c6 = budget_flops / 6
        return g * c6 ** (b / (a + b)), c6 ** (a / (a + b)) / g

    def tokens_for_loss(self, n_params: float, target: float) -> float:
        """Tokens D at which an N-parameter model reaches `target`; inf when the target is at or
        below the model's floor E + A/N^α."""
        gap = target - self.E - self.A / n_params**self.alpha
        return math.inf if gap <= 0 else (self.B / gap) ** (1 / self.beta)


HOFFMANN = Chinchilla(
    1.69, 406.4, 410.7, 0.34, 0.28, "hoffmann", "Hoffmann et al. 2022, approach 3 (rounded)"
)
BESIROGLU = Chinchilla(
    1.8172,
    482.01,
    2085.43,
    0.3478,
    0.3658,
    "besiroglu",
    "Besiroglu et al. 2024, refit of Hoffmann's data",
)
LAWS = {law.name: law for law in (HOFFMANN, BESIROGLU)}


def parse_law(text: str) -> Chinchilla:
    """`"E,A,B,alpha,beta"` -> a user law."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if (
        len(values) != 5
        or not all(map(math.isfinite, values))
        or values[0] < 0
        or min(values[1:]) <= 0
        or max(values[3:]) > 10
    ):
        raise StokerError(
            f"--law takes five numbers E,A,B,alpha,beta (E >= 0; A, B > 0; "
            f"0 < alpha, beta <= 10), got {text!r}"
        )
    return Chinchilla(*values)


# -------------------------------------------------------------------------------- fitting
def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _residuals(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray
) -> np.ndarray:
    """Predicted minus observed log-loss for one θ (5,) or a batch (k, 5) -> (n,) or (k, n)."""
    a, b, e, alpha, beta = (np.asarray(theta)[..., i, None] for i in range(5))
    return np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e) - log_l


def _objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Mean Huber loss of log-space residuals and its gradient in θ = (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    u1, u2 = a - alpha * log_n, b - beta * log_d
    pred = np.logaddexp(np.logaddexp(u1, u2), e)
    r = pred - log_l
    h = np.clip(r, -delta, delta) / len(r)  # d mean-Huber / d r
    w1, w2, w3 = np.exp(u1 - pred), np.exp(u2 - pred), np.exp(e - pred)  # d LSE / d u
    grad = np.array([h @ w1, h @ w2, h @ w3, -(h * w1) @ log_n, -(h * w2) @ log_d])
    return float(_huber(r, delta).mean()), grad


def minimize_lbfgs(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    max_iter: int = 1000,
    memory: int = 10,
    gtol: float = 1e-14,
    ftol: float = 1e-10,
) -> tuple[np.ndarray, float]:
    """Limited-memory BFGS (Nocedal & Wright 2006, alg. 7.4/7.5) with Armijo backtracking, for
    a non-negative `fun(x)` -> (value, gradient). Stops when the gradient vanishes or a step
    lowers the value by less than `ftol` of itself. Returns (x, value)."""
    x = np.asarray(x0, dtype=float).copy()
    f, g = fun(x)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1/(y·s))
    for _ in range(max_iter):
        if np.max(np.abs(g)) < gtol:
            break
        q, coeffs = g.copy(), []
        for s, y, rho in reversed(pairs):  # two-loop recursion
            c = rho * (s @ q)
            q -= c * y
            coeffs.append(c)
        q *= (pairs[-1][0] @ pairs[-1][1]) / (pairs[-1][1] @ pairs[-1][1]) if pairs else 1.0
        for (s, y, rho), c in zip(pairs, reversed(coeffs), strict=True):
            q += s * (c - rho * (y @ q))
        d = -q
        if g @ d >= 0:  # not a descent direction: restart from steepest descent
            d, pairs = -g, []
        t, slope = 1.0, g @ d
        while True:
            f_new, g_new = fun(x + t * d)
            if f_new <= f + 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        if not f_new < f:  # the line search found no decrease
            break
        s, y = t * d, g_new - g
        if s @ y > 1e-30:
            pairs = [*pairs[-(memory - 1) :], (s, y, 1.0 / (s @ y))]
        converged = f - f_new <= ftol * f
        x, f, g = x + s, f_new, g_new
        if converged:
            break
    return x, f


# Hoffmann et al.'s grid of initializations (§D.2): α, β, e, a, b.
HOFFMANN_GRID = (
    np.arange(0, 2.01, 0.5),
    np.arange(0, 2.01, 0.5),
    np.arange(-1, 1.01, 0.5),
    np.arange(0, 25.1, 5),
    np.arange(0, 25.1, 5),
)


@dataclass(frozen=True)
class Fit:
    law: Chinchilla
    objective: float  # mean Huber loss at the optimum
    n_points: int
    n_sizes: int  # distinct N


def fit_law(
    n_params: ArrayLike, tokens: ArrayLike, losses: ArrayLike, delta: float = 1e-3, starts: int = 16
) -> Fit:
    """Fit (E, A, B, α, β) to observed losses as Hoffmann et al. did (module docstring):
    the objective is evaluated on their whole grid, L-BFGS runs from the `starts` best."""
    arrays = [np.asarray(v, dtype=float) for v in (n_params, tokens, losses)]
    if len({len(v) for v in arrays}) != 1:
        raise StokerError("fit_law needs equally many N, D and loss values")
    if not all(np.all(np.isfinite(v) & (v > 0)) for v in arrays):
        raise StokerError("fit_law needs positive, finite N, D and losses")
    log_n, log_d, log_l = (np.log(v) for v in arrays)
    n_sizes = len(np.unique(np.round(log_n, 6)))
    if len(log_l) < 5 or n_sizes < 2:
        raise StokerError(
            f"fitting 5 constants needs >= 5 points from >= 2 model sizes; got "
            f"{len(log_l)} points, {n_sizes} size(s)"
        )
    grid = np.array(  # rows θ = (a, b, e, α, β)
        [(a, b, e, al, be) for al, be, e, a, b in itertools.product(*HOFFMANN_GRID)]
    )
    scores = np.concatenate(
        [
            _huber(_residuals(chunk, log_n, log_d, log_l), delta).mean(axis=1)
            for chunk in np.array_split(grid, max(1, len(grid) * len(log_l) // 1_000_000))
        ]
    )
    best_x, best_f = grid[0], math.inf
    for i in np.argsort(scores)[:starts]:
        x, f = minimize_lbfgs(lambda t: _objective(t, log_n, log_d, log_l, delta), grid[i])
        if f < best_f:
            best_x, best_f = x, f
    a, b, e, alpha, beta = best_x
    law = Chinchilla(
        math.exp(e),
        math.exp(a),
        math.exp(b),
        float(alpha),
        float(beta),
        "fitted",
        f"fitted to your {len(log_l)} points from {n_sizes} model sizes; "
        "beyond their range of N and D it extrapolates",
    )
    return Fit(law, best_f, len(log_l), n_sizes)


# ----------------------------------------------------------------------------- your runs
@dataclass(frozen=True)
class RunPoints:
    """(N, D, L) observations from one run's metrics.jsonl."""

    source: str
    n_params: float
    tokens: np.ndarray
    losses: np.ndarray
    key: str  # which loss field was used


def _run_config(run_dir: Path) -> dict | None:
    """The run's resolved recipe: config.yaml beside metrics.jsonl, else its newest checkpoint's
    stoker.json."""
    for name in ("config.yaml", "config.yml"):
        if (run_dir / name).is_file():
            data = yaml.safe_load((run_dir / name).read_text())
            return data if isinstance(data, dict) else None
    metas = sorted((run_dir / "checkpoints").glob("step-*/stoker.json"))
    return json.loads(metas[-1].read_text()).get("config") if metas else None


def load_run_points(path: str | Path, final_only: bool = False) -> RunPoints:
    """Loss observations of one run (`path`: its metrics.jsonl or the run dir holding it).

    Reads what train/loop.py writes: rows with `step` and `loss` or `val_loss`, and the
    resolved `config.yaml` beside them. Loss: `val_loss` where the run logs it, else the
    training `loss`. Tokens: `step` × train.batch_size × seq_len, else a row's `tokens`.
    N: a row's `params`, else the exact count of the config's model (`count_params`).
    """
    from stoker.config import ModelConfig, TrainConfig, validate_config
    from stoker.scaling.flops import count_params

    p = Path(path)
    metrics = p / "metrics.jsonl" if p.is_dir() else p
    if not metrics.is_file():
        raise StokerError(f"no metrics.jsonl at {p} (pass a run dir or its metrics.jsonl)")
    from stoker.jsonl import read_jsonl

    records = read_jsonl(metrics)[0]  # a partial last line (a killed run) is skipped
    key = "val_loss" if any("val_loss" in r for r in records) else "loss"
    rows = [r for r in records if isinstance(r.get(key), (int, float)) and r[key] > 0]
    config = _run_config(metrics.parent)
    model = validate_config(config.get("model", {}), ModelConfig) if config else None
    train = validate_config(config.get("train", {}), TrainConfig) if config else None
    n = next((r["params"] for r in records if "params" in r), None)
    n = n or (count_params(model).total if model else None)
    per_step = train.batch_size * (train.seq_len or model.max_seq_len) if config else None
    tokens = [r["step"] * per_step if per_step and "step" in r else r.get("tokens") for r in rows]
    points = [(t, r[key]) for t, r in zip(tokens, rows, strict=True) if t and t > 0]
    if n is None or not points:
        raise StokerError(
            f"{metrics}: cannot read (N, D, loss): needs {key} with tokens (or "
            "step) in records and the run's config.yaml or checkpoint beside it"
        )
    points = points[-1:] if final_only else points
    return RunPoints(
        str(metrics),
        float(n),
        np.array([t for t, _ in points], dtype=float),
        np.array([v for _, v in points], dtype=float),
        key,
    )


def fit_runs(paths: Sequence[str | Path], final_only: bool = False) -> tuple[Fit, list[RunPoints]]:
    """`fit_law` on the points of several runs."""
    runs = [load_run_points(p, final_only) for p in paths]
    n = np.concatenate([np.full(len(r.tokens), r.n_params) for r in runs])
    d = np.concatenate([r.tokens for r in runs])
    loss = np.concatenate([r.losses for r in runs])
    return fit_law(n, d, loss), runs
