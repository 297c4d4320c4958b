"""generalized_eigh against scipy.linalg.eigh(a, b) (LAPACK sygvd), which we did not write,
on both backends (LAPACK on CPU, the XLA Cholesky reduction of accelerators)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from sst_jax.errors import NumericalError
from sst_jax.linalg import check_positive_definite, default_rcond, generalized_eigh, generalized_eigh_traced
from sst_jax.linalg.gevp import BACKEND_ENV

BACKENDS = ("lapack", "reduction")


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request, monkeypatch):
    """Every test runs on both paths, forced through the environment variable."""
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


def spd(rng, n, *, samples=None, scale=1.0):
    x = rng.standard_normal((n, samples or 2 * n))
    return scale * x @ x.T / x.shape[1]


def spd_pair(rng, n):
    return spd(rng, n), spd(rng, n) + 0.1 * np.eye(n)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("n", [4, 64, 1024])
def test_eigenvalues_match_scipy_float64(x64, rng, n):
    a, b = spd_pair(rng, n)
    w, v = generalized_eigh(a, b)
    w_ref = scipy.linalg.eigh(a, b, eigvals_only=True)[::-1]
    assert w.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-10, atol=1e-10 * w_ref[0])


@pytest.mark.parametrize("n", [16, 256])
def test_residual_and_b_orthonormality_float64(x64, rng, n):
    a, b = spd_pair(rng, n)
    w, v = (np.asarray(t) for t in generalized_eigh(a, b))
    assert np.linalg.norm(a @ v - b @ v * w) / np.linalg.norm(a) < 1e-12
    assert np.abs(v.T @ b @ v - np.eye(n)).max() < 1e-11


@pytest.mark.parametrize("n", [8, 128])
def test_float32_within_1e4_relative(rng, n):
    a, b = spd_pair(rng, n)
    w, v = generalized_eigh(a.astype(np.float32), b.astype(np.float32))
    w_ref = scipy.linalg.eigh(a, b, eigvals_only=True)[::-1]
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-4, atol=1e-4 * w_ref[0])
    v = np.asarray(v, np.float64)
    assert np.abs(v.T @ b @ v - np.eye(n)).max() < 1e-4
    assert np.linalg.norm(a @ v - b @ v * np.asarray(w)) / np.linalg.norm(a) < 1e-4


def test_batched_equals_each_problem_alone(x64, rng):
    pairs = [spd_pair(rng, 12) for _ in range(6)]
    a = np.stack([p[0] for p in pairs]).reshape(2, 3, 12, 12)
    b = np.stack([p[1] for p in pairs]).reshape(2, 3, 12, 12)
    w, v = generalized_eigh(a, b)
    assert w.shape == (2, 3, 12) and v.shape == (2, 3, 12, 12)
    for i, (ai, bi) in enumerate(pairs):
        w_ref = scipy.linalg.eigh(ai, bi, eigvals_only=True)[::-1]
        np.testing.assert_allclose(np.asarray(w).reshape(6, 12)[i], w_ref, rtol=1e-10)


def test_eigenvalues_descending_and_sign_deterministic(x64, rng):
    a, b = spd_pair(rng, 32)
    w, v = (np.asarray(t) for t in generalized_eigh(a, b))
    assert np.all(np.diff(w) <= 0)
    rows = np.argmax(np.abs(v), axis=0)
    assert np.all(v[rows, np.arange(32)] > 0)
    # Same eigenvectors as scipy up to the per-column sign (distinct eigenvalues).
    _, v_ref = scipy.linalg.eigh(a, b)
    v_ref = v_ref[:, ::-1]
    v_ref = v_ref * np.sign(v_ref[rows, np.arange(32)])
    np.testing.assert_allclose(v, v_ref, atol=1e-8)


def test_top_k_is_the_leading_part_of_the_full_solution(x64, rng):
    a, b = spd_pair(rng, 20)
    w, v = generalized_eigh(a, b)
    wk, vk = generalized_eigh(a, b, top_k=5)
    assert wk.shape == (5,) and vk.shape == (20, 5)
    np.testing.assert_allclose(wk, w[:5], rtol=1e-12)
    np.testing.assert_allclose(vk, v[:, :5], atol=1e-10)


def test_damping_is_trace_relative(x64, rng):
    a, b = spd_pair(rng, 16)
    delta = 0.05
    w, _ = generalized_eigh(a, b, damping=delta)
    b_damped = b + delta * np.trace(b) / 16 * np.eye(16)
    np.testing.assert_allclose(w, scipy.linalg.eigh(a, b_damped, eigvals_only=True)[::-1], rtol=1e-10)


def test_ill_conditioned_b_float64_matches_scipy(x64, rng):
    n = 32
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    b = q @ np.diag(np.logspace(0, -8, n)) @ q.T  # cond(B) = 1e8
    a = spd(rng, n)
    w, v = (np.asarray(t) for t in generalized_eigh(a, b))
    w_ref = scipy.linalg.eigh(a, b, eigvals_only=True)[::-1]
    np.testing.assert_allclose(w, w_ref, rtol=1e-6)
    assert np.linalg.norm(a @ v - b @ v * w) / (np.linalg.norm(a) * np.linalg.norm(v) ** 2) < 1e-12


def test_rank_deficient_b_raises_named_error_without_damping(x64, rng):
    b = spd(rng, 24, samples=8)  # rank 8: a Fisher from fewer samples than dimensions
    with pytest.raises(NumericalError, match="not positive definite"):
        generalized_eigh(spd(rng, 24), b)


def test_rank_deficient_b_with_damping_solves_the_damped_problem(x64, rng):
    a, b = spd(rng, 24), spd(rng, 24, samples=8)
    w, v = (np.asarray(t) for t in generalized_eigh(a, b, damping=1e-3))
    b_damped = b + 1e-3 * np.trace(b) / 24 * np.eye(24)
    np.testing.assert_allclose(w, scipy.linalg.eigh(a, b_damped, eigvals_only=True)[::-1], rtol=1e-9)
    np.testing.assert_allclose(v.T @ b_damped @ v, np.eye(24), atol=1e-9)


def test_rank_deficient_b_float32_with_damping_is_finite(rng):
    a, b = spd(rng, 64), spd(rng, 64, samples=16)
    w, v = generalized_eigh(a.astype(np.float32), b.astype(np.float32), damping=1e-2)
    b_damped = b + 1e-2 * np.trace(b) / 64 * np.eye(64)
    w_ref = scipy.linalg.eigh(a, b_damped, eigvals_only=True)[::-1]
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-4 * w_ref[0])


def test_default_rcond_is_n_eps_relaxed_to_half_the_damped_floor():
    eps32, eps64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)
    assert default_rcond(24, np.float32) == 24 * eps32  # undamped: n·eps
    assert default_rcond(24, np.float32, 0.1) == 24 * eps32  # floor 0.1/24.1 = 4e-3 is far above n·eps
    assert default_rcond(1024, np.float32, 0.1) == pytest.approx(0.5 * 0.1 / 1024.1)  # 4.9e-5 < 1.2e-4
    assert default_rcond(1000, np.float32, 0.1, damped_dim=1536) == pytest.approx(0.5 * 0.1 / 1536.1)
    assert default_rcond(1024, np.float32, 1e-9) == pytest.approx(32 * eps32)  # floor lost in rounding: √n·eps
    assert default_rcond(1024, np.float64, 0.1) == 1024 * eps64


def test_damped_spiky_b_float32_is_solved_not_rejected(rng):
    """An activation-like B: one channel carries nearly all of the trace. With δ = 0.1 its pivot²
    ratio is δ/(n+δ) ≈ 9.8e-5, exactly what damping guarantees, yet below n·eps = 1.2e-4 (the
    old threshold, which rejected SST-Guard's K_b at N = 4 experts). It is solved, as scipy does in
    float64, to float32 accuracy."""
    n = 1024
    b = np.diag(1e-4 * rng.uniform(size=n))
    b[3, 3] = 1e3
    a = spd(rng, n, samples=n)
    with pytest.raises(NumericalError, match=r"min/max pivot² = 9.77e-05 ≤ rcond 0.000122"):
        generalized_eigh(a.astype(np.float32), b.astype(np.float32), damping=0.1, rcond=n * np.finfo(np.float32).eps)
    w, v = (np.asarray(t, np.float64) for t in
            generalized_eigh(a.astype(np.float32), b.astype(np.float32), damping=0.1, on_ill_conditioned="raise"))
    b_damped = b + 0.1 * np.trace(b) / n * np.eye(n)
    w_ref = scipy.linalg.eigh(a, b_damped, eigvals_only=True)[::-1]
    np.testing.assert_allclose(w, w_ref, atol=3e-6 * w_ref[0])  # measured 3e-7
    np.testing.assert_allclose(v.T @ b_damped @ v, np.eye(n), atol=2e-5)  # measured 2e-6


def test_damping_lost_in_rounding_is_still_rejected(rng):
    b = spd(rng, 1024, samples=8)  # rank 8; δ = 1e-12 is below float32 rounding
    with pytest.raises(NumericalError, match="not positive definite"):
        generalized_eigh(spd(rng, 1024).astype(np.float32), b.astype(np.float32), damping=1e-12)


def test_indefinite_b_error_names_the_batch_index(rng):
    b = np.stack([spd(rng, 6) for _ in range(3)]).astype(np.float32)
    b[2] = np.diag([1.0, 1.0, 1.0, 1.0, 1.0, -2.0])  # not PD even after small damping
    with pytest.raises(NumericalError, match=r"batch index \(2,\)"):
        generalized_eigh(b, b, damping=0.1, name="F_b")
    with pytest.raises(NumericalError, match="F_b"):
        check_positive_definite(b, damping=0.1, name="F_b")


def test_nan_input_is_an_error_not_nans(rng):
    a, b = spd_pair(rng, 5)
    a[1, 2] = np.nan
    with pytest.raises(NumericalError, match="NaN"):
        generalized_eigh(a, b)


def test_traced_variant_flags_bad_batch_entries_inside_jit(rng):
    a = np.stack([spd(rng, 6), spd(rng, 6)]).astype(np.float32)
    b = a.copy()
    b[1] = np.diag([1.0, 1.0, 1.0, 1.0, 1.0, -2.0])
    w, v, ok = jax.jit(lambda x, y: generalized_eigh_traced(x, y, damping=0.1))(a, b)
    np.testing.assert_array_equal(ok, [True, False])
    np.testing.assert_allclose(w[0], generalized_eigh(a[0], b[0], damping=0.1)[0], rtol=1e-6)
