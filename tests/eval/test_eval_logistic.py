"""The judge's logistic regression against scipy.optimize and hand-solvable cases."""

import numpy as np
import pytest
import scipy.optimize

from sst_jax.eval.logistic import cross_validate, fit_logistic, penalised_loss, stratified_folds


def reference_loss(theta, x, y, l2):
    """The penalised mean log-loss, written independently (logaddexp form), and its gradient."""
    w, b = theta[:-1], theta[-1]
    z = x @ w + b
    loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w @ w
    p = 1.0 / (1.0 + np.exp(-z))
    grad = np.append(x.T @ (p - y) / len(y) + l2 * w, np.mean(p - y))
    return loss, grad


def synthetic(rng, n=120, d=6):
    x = rng.normal(size=(n, d))
    true_w = rng.normal(size=d)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(x @ true_w - 0.3)))).astype(float)
    return x, y


@pytest.mark.parametrize("l2", [1e-3, 0.1, 2.0])
def test_fit_matches_scipy_minimize_on_the_same_loss(rng, l2):
    x, y = synthetic(rng)
    fit = fit_logistic(x, y, l2)
    ref = scipy.optimize.minimize(reference_loss, np.zeros(x.shape[1] + 1), args=(x, y, l2), jac=True,
                                  method="BFGS", options={"gtol": 1e-11, "maxiter": 10_000})
    np.testing.assert_allclose(fit.weights, ref.x[:-1], atol=1e-6)
    assert abs(fit.bias - ref.x[-1]) < 1e-6
    assert abs(penalised_loss(fit.weights, fit.bias, x, y, l2) - ref.fun) < 1e-12


def test_intercept_only_fit_is_the_log_odds():
    y = np.array([1.0] * 3 + [0.0] * 7)
    fit = fit_logistic(np.zeros((10, 1)), y, 0.5)
    assert abs(fit.bias - np.log(0.3 / 0.7)) < 1e-12
    assert fit.weights[0] == 0.0


def test_two_symmetric_points_solve_the_stationarity_equation():
    """x = ±1 labelled 1/0: by symmetry b = 0, and w solves l2·w = σ(−w)."""
    l2 = 0.25
    fit = fit_logistic(np.array([[1.0], [-1.0]]), np.array([1.0, 0.0]), l2)
    w = scipy.optimize.brentq(lambda v: l2 * v - 1.0 / (1.0 + np.exp(v)), 0.0, 10.0, xtol=1e-14)
    assert abs(fit.weights[0] - w) < 1e-10
    assert abs(fit.bias) < 1e-12


def test_probabilities_are_the_sigmoid_of_the_logits(rng):
    x, y = synthetic(rng)
    fit = fit_logistic(x, y, 0.1)
    np.testing.assert_allclose(fit.proba(x), 1.0 / (1.0 + np.exp(-(x @ fit.weights + fit.bias))), rtol=1e-12)


def test_stratified_folds_partition_the_rows_and_keep_the_label_share():
    y = np.array([1] * 30 + [0] * 70)
    folds = stratified_folds(y, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    assert [int(y[f].sum()) for f in folds] == [6] * 5
    assert [len(f) for f in folds] == [20] * 5


def test_cross_validation_on_pure_noise_chooses_a_strong_penalty(rng):
    """Noise features: a weak penalty overfits, so the held-out loss picks l2 ≥ 1 (≈ a constant)."""
    x = rng.normal(size=(100, 30))
    y = (rng.random(100) < 0.5).astype(float)
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    cv = cross_validate(x, y, grid, k=5, seed=0)
    assert cv["l2"] >= 1.0
    assert cv["log_loss"][grid.index(cv["l2"])] == min(cv["log_loss"])
    assert cv["log_loss"][0] > cv["log_loss"][-1] + 0.1
    assert len(cv["accuracy"]) == len(grid)


def test_cross_validation_held_out_loss_matches_a_manual_fold_loop(rng):
    x, y = synthetic(rng, n=60, d=3)
    cv = cross_validate(x, y, [0.05], k=3, seed=1)
    losses = []
    for held in stratified_folds(y, 3, seed=1):
        train = np.setdiff1d(np.arange(60), held)
        fit = fit_logistic(x[train], y[train], 0.05)
        p = fit.proba(x[held])
        losses.append(np.mean(-(y[held] * np.log(p) + (1 - y[held]) * np.log(1 - p))))
    assert abs(cv["log_loss"][0] - np.mean(losses)) < 1e-12


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fit_logistic(np.zeros((2, 1)), [0, 1], 0.0)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        fit_logistic(np.zeros((2, 1)), [0, 2], 1.0)
