"""Projector and shrinkage properties, checked against direct numpy linear algebra."""

import jax
import numpy as np
import pytest

from sst_jax.linalg import fb_coordinates, generalized_eigh, project_topk, select_k, shrinkage


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def problem(rng, n, rank_a=None):
    x = rng.standard_normal((n, rank_a or 2 * n))
    fh = x @ x.T / x.shape[1]
    y = rng.standard_normal((n, 2 * n))
    fb = y @ y.T / (2 * n) + 0.1 * np.eye(n)
    w, v = generalized_eigh(fh, fb)
    return fh, fb, np.asarray(w), np.asarray(v), rng.standard_normal(n)


def test_full_k_returns_the_input(x64, rng):
    _, fb, _, v, phi = problem(rng, 16)
    np.testing.assert_allclose(project_topk(v, fb, phi, 16), phi, atol=1e-10)


def test_projection_is_idempotent(x64, rng):
    _, fb, _, v, phi = problem(rng, 16)
    once = project_topk(v, fb, phi, 5)
    np.testing.assert_allclose(project_topk(v, fb, once, 5), once, atol=1e-10)


def test_projection_is_fb_orthogonal_not_euclidean(x64, rng):
    _, fb, _, v, phi = problem(rng, 16)
    p = np.asarray(project_topk(v, fb, phi, 5))
    resid = phi - p
    # The residual is F_b-orthogonal to span(V_k) ...
    np.testing.assert_allclose(v[:, :5].T @ fb @ resid, np.zeros(5), atol=1e-10)
    # ... and the projector equals V_k V_kᵀ F_b, not the Euclidean projector onto span(V_k).
    np.testing.assert_allclose(p, v[:, :5] @ v[:, :5].T @ fb @ phi, atol=1e-10)
    q, _ = np.linalg.qr(v[:, :5])
    assert np.linalg.norm(p - q @ q.T @ phi) > 1e-3


def test_coordinates_reconstruct_phi(x64, rng):
    _, fb, _, v, phi = problem(rng, 10)
    c = np.asarray(fb_coordinates(v, fb, phi))
    np.testing.assert_allclose(v @ c, phi, atol=1e-10)


def test_per_batch_k(x64, rng):
    probs = [problem(rng, 8) for _ in range(3)]
    v = np.stack([p[3] for p in probs]); fb = np.stack([p[1] for p in probs])
    phi = np.stack([p[4] for p in probs])
    out = np.asarray(project_topk(v, fb, phi, np.array([0, 3, 8])))
    np.testing.assert_allclose(out[0], 0.0)
    np.testing.assert_allclose(out[1], project_topk(v[1], fb[1], phi[1], 3), atol=1e-12)
    np.testing.assert_allclose(out[2], phi[2], atol=1e-10)


def test_shrinkage_equals_regularized_solve(x64, rng):
    fh, fb, w, v, phi = problem(rng, 12)
    mu = 0.7
    expected = np.linalg.solve(fh + mu * fb, fh @ phi)
    np.testing.assert_allclose(shrinkage(w, v, fb, phi, mu), expected, rtol=1e-8, atol=1e-10)


def test_shrinkage_mu_to_zero_is_identity_on_range_of_a(x64, rng):
    n = 12
    fh, fb, w, v, _ = problem(rng, n, rank_a=5)
    # The generalized range of A: span of the eigenvectors with λ > 0, i.e. range(F_b⁻¹F_h).
    phi = np.linalg.solve(fb, fh @ rng.standard_normal(n))
    np.testing.assert_allclose(shrinkage(w, v, fb, phi, 1e-9), phi, rtol=1e-6, atol=1e-7)
    # Outside that range (a null direction of F_h) shrinkage removes everything.
    np.testing.assert_allclose(shrinkage(w, v, fb, v[:, -1], 1e-9), 0.0, atol=1e-6)


def test_select_k_rules(x64):
    lam = np.array([[4.0, 3.0, 2.0, 1.0], [10.0, 0.0, -1.0, -2.0]])
    np.testing.assert_array_equal(select_k(lam, k=2), [2, 2])
    np.testing.assert_array_equal(select_k(lam, threshold=1.5), [3, 1])
    np.testing.assert_array_equal(select_k(lam, energy=0.7), [2, 1])  # 4+3 = 7 of 10
    c = np.array([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(select_k(lam, energy=0.5, coords=c), [2, 1])
