"""L2-penalised logistic regression, fitted by Newton's method, and its penalty chosen by k-fold CV.

Convention: for features X (n, d), labels y ∈ {0, 1}, weights w and an intercept b,

    loss(w, b) = (1/n) Σᵢ [log(1 + exp(zᵢ)) − yᵢ zᵢ] + (l2 / 2) ‖w‖²,   zᵢ = xᵢ·w + b,

the mean negative log-likelihood plus a ridge penalty on w (never on b), so `l2` does not
scale with n. The loss is strictly convex for l2 > 0, so Newton's method with a backtracking
line search converges to the one minimiser in a few steps, to machine precision: the fit does
not depend on a solver's tolerance, and a refit on the same features gives the same weights.
scikit-learn's C is 1 / (n · l2) in this convention.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy.special import expit, log_expit


@dataclasses.dataclass(frozen=True)
class LogisticFit:
    weights: np.ndarray  # (d,) float64
    bias: float
    l2: float
    iterations: int

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.weights + self.bias

    def proba(self, x: np.ndarray) -> np.ndarray:
        return expit(self.logits(x))


def penalised_loss(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray, l2: float) -> float:
    """The loss of the module docstring (log1p(exp(z)) − y z computed without overflow)."""
    z = x @ w + b
    return float(np.mean(-log_expit(-z) - y * z) + 0.5 * l2 * (w @ w))


def fit_logistic(x: np.ndarray, y: Sequence[float] | np.ndarray, l2: float, *, max_iter: int = 100,
                 tol: float = 1e-24) -> LogisticFit:
    """The minimiser of `penalised_loss` (Newton steps on (w, b), backtracking line search).

    Stops when the Newton decrement ½ gᵀH⁻¹g falls below `tol` (≈ machine precision in the
    parameters; near the optimum the full Newton step is taken without a line search, where
    loss differences are below rounding). Raises ValueError for l2 ≤ 0
    (an unpenalised fit on separable data has no minimiser) or labels outside {0, 1}.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (n, d) and y (n,); got {x.shape} and {y.shape}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])  # the intercept is the last coordinate
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    theta = np.zeros(d + 1)

    def loss(t):
        return penalised_loss(t[:-1], t[-1], x, y, l2)

    current = loss(theta)
    for it in range(1, max_iter + 1):
        p = expit(xa @ theta)
        grad = xa.T @ (p - y) / n + penalty * theta
        hess = (xa.T * (p * (1 - p))) @ xa / n + np.diag(penalty)
        hess[-1, -1] += 1e-12  # keeps the intercept's row invertible when every p is 0 or 1
        step = np.linalg.solve(hess, grad)
        decrement = 0.5 * float(grad @ step)
        if decrement < tol:
            return LogisticFit(theta[:-1].copy(), float(theta[-1]), float(l2), it - 1)
        t = 1.0
        while True:  # Armijo backtracking, until the quadratic phase where full steps converge
            candidate = theta - t * step
            value = loss(candidate)
            if decrement < 1e-8 or value <= current - 0.5 * t * decrement or t < 1e-10:
                break
            t *= 0.5
        theta, current = candidate, value
    return LogisticFit(theta[:-1].copy(), float(theta[-1]), float(l2), max_iter)


def stratified_folds(y: Sequence[float] | np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint index sets covering range(n), each with about the same share of 1s (seeded)."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == label))
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(int(i))
        offset += len(idx)
    return [np.sort(np.asarray(f, int)) for f in folds]


def cross_validate(x: np.ndarray, y: Sequence[float] | np.ndarray, l2_grid: Sequence[float], *,
                   k: int = 5, seed: int = 0) -> dict:
    """Mean held-out log-loss and accuracy (threshold 0.5) of each l2 over stratified k folds.

    Returns {"l2": chosen, "grid": [...], "log_loss": [...], "accuracy": [...], "k", "seed"}; the
    chosen l2 has the lowest mean held-out log-loss (ties: the larger l2, the simpler model).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    folds = stratified_folds(y, k, seed)
    losses, accuracies = [], []
    for l2 in l2_grid:
        fold_loss, fold_acc = [], []
        for held in folds:
            train = np.setdiff1d(np.arange(len(y)), held)
            fit = fit_logistic(x[train], y[train], l2)
            z = fit.logits(x[held])
            fold_loss.append(float(np.mean(-log_expit(-z) - y[held] * z)))
            fold_acc.append(float(np.mean((z > 0) == (y[held] == 1))))
        losses.append(float(np.mean(fold_loss)))
        accuracies.append(float(np.mean(fold_acc)))
    best = min(range(len(l2_grid)), key=lambda i: (round(losses[i], 12), -l2_grid[i]))
    return {"l2": float(l2_grid[best]), "grid": [float(v) for v in l2_grid], "log_loss": losses,
            "accuracy": accuracies, "k": k, "seed": seed}
