"""The two eigensolver paths agree with each other and with scipy, raise the same errors, and
flag ill-conditioned B and silently downcast float64 inputs."""

import jax
import numpy as np
import pytest
import scipy.linalg
from absl import logging

from sst_jax.errors import NumericalError
from sst_jax.linalg import generalized_eigh, generalized_eigh_traced
from sst_jax.linalg.gevp import (BACKEND_ENV, ILL_CONDITIONED_THRESHOLD, THREADS_ENV, IllConditionedError,
                                 _row_signs, _sign_fix, condition_estimate, resolve_backend)

BACKENDS = ("lapack", "reduction")


def spd(rng, n, *, samples=None):
    x = rng.standard_normal((n, samples or 2 * n))
    return x @ x.T / x.shape[1]


def with_cond(rng, n, cond):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ np.diag(np.logspace(0, -np.log10(cond), n)) @ q.T


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def global_x64():
    """x64 for every thread (the pure_callback of the traced LAPACK path runs in another one)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def warnings_seen(monkeypatch):
    seen = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: seen.append(msg % args))
    return seen


def test_auto_backend_is_lapack_on_cpu_and_the_env_forces_either(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend() == ("lapack" if jax.default_backend() == "cpu" else "reduction")
    monkeypatch.setenv(BACKEND_ENV, "reduction")
    assert resolve_backend() == "reduction"
    assert resolve_backend("lapack") == "lapack"  # the argument wins over the environment
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cusolver")


def test_both_paths_agree_batched_float64(x64, rng):
    a = np.stack([spd(rng, 16) for _ in range(6)]).reshape(2, 3, 16, 16)
    b = np.stack([spd(rng, 16) + 0.1 * np.eye(16) for _ in range(6)]).reshape(2, 3, 16, 16)
    (wl, vl), (wr, vr) = (generalized_eigh(a, b, damping=1e-3, backend=k) for k in BACKENDS)
    np.testing.assert_allclose(wl, wr, rtol=1e-11)
    np.testing.assert_allclose(vl, vr, atol=1e-9)  # same order, same sign convention
    for i in np.ndindex(2, 3):
        w_ref = scipy.linalg.eigh(a[i], b[i] + 1e-3 * np.trace(b[i]) / 16 * np.eye(16), eigvals_only=True)[::-1]
        np.testing.assert_allclose(wl[i], w_ref, rtol=1e-10)


# 160: the LAPACK path probes symmetry instead of symmetrizing; 272: it also hands Vᵀ to XLA to transpose.
@pytest.mark.parametrize("n", [16, 160, 272])
def test_lapack_equals_reduction_to_1e10_float64_eager_and_jitted(global_x64, rng, n):
    a = np.stack([spd(rng, n) for _ in range(3)])
    b = np.stack([spd(rng, n) + 0.1 * np.eye(n) for _ in range(3)])
    (wl, vl), (wr, vr) = (generalized_eigh(a, b, damping=1e-3, backend=k) for k in BACKENDS)
    assert wl.dtype == vl.dtype == np.float64
    np.testing.assert_allclose(wl, wr, rtol=1e-10, atol=0)
    np.testing.assert_allclose(vl, vr, rtol=0, atol=1e-10 * np.abs(vr).max())
    (wlt, vlt, okl), (wrt, vrt, okr) = (jax.jit(lambda x, y, k=k: generalized_eigh_traced(x, y, damping=1e-3, backend=k))(a, b)
                                        for k in BACKENDS)
    assert np.all(okl) and np.all(okr)
    np.testing.assert_array_equal(wlt, wl)  # the callback runs the same LAPACK code as the eager call
    np.testing.assert_array_equal(vlt, vl)
    np.testing.assert_allclose(wrt, wr, rtol=1e-12)


@pytest.mark.parametrize("n", [7, 9, 130])
def test_a_float32_batch_of_odd_size_equals_each_problem_alone(rng, n):
    """LAPACK works in place on the batch's work copies, whose matrices are padded to 64-byte
    boundaries (the second of a packed 9×9 float32 stack is not aligned): same bits as alone."""
    a = np.stack([spd(rng, n) for _ in range(4)]).astype(np.float32)
    b = np.stack([spd(rng, n) + 0.1 * np.eye(n) for _ in range(4)]).astype(np.float32)
    w, v = generalized_eigh(a, b, damping=0.1, backend="lapack")
    cond = condition_estimate(b, damping=0.1, backend="lapack")
    for i in range(4):
        wi, vi = generalized_eigh(a[i], b[i], damping=0.1, backend="lapack")
        np.testing.assert_array_equal(w[i], wi)
        np.testing.assert_array_equal(v[i], vi)
        assert cond[i] == condition_estimate(b[i], damping=0.1, backend="lapack")


@pytest.mark.parametrize("n", [12, 144])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_only_the_symmetric_parts_are_used_on_both_paths(x64, rng, n, dtype):
    """A and B with a large antisymmetric part (the LAPACK path must notice it and symmetrize) or
    one at rounding level (it may copy them as they are): both paths equal scipy on (X + Xᵀ)/2."""
    a, b = spd(rng, n), spd(rng, n) + 0.1 * np.eye(n)
    for scale in (1e-1, 1e-17):
        k = rng.standard_normal((2, n, n))
        ax, bx = a + scale * (k[0] - k[0].T), b + scale * (k[1] - k[1].T)
        w_ref = scipy.linalg.eigh(a, b, eigvals_only=True)[::-1]
        for backend in BACKENDS:
            w, v = generalized_eigh(ax.astype(dtype), bx.astype(dtype), backend=backend)
            tol = 1e-4 if dtype == np.float32 else 1e-10
            np.testing.assert_allclose(w, w_ref, rtol=tol, atol=tol * w_ref[0])
        (w1, v1), (w2, v2) = (generalized_eigh(ax.astype(dtype), bx.astype(dtype), backend=k) for k in BACKENDS)
        np.testing.assert_allclose(v1, v2, atol=(1e-3 if dtype == np.float32 else 1e-9) * np.abs(v2).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lapack_workers_give_the_same_bits_as_one_and_match_scipy(monkeypatch, global_x64, rng, dtype):
    """A batch spread over 1, 2 or 3 LAPACK workers (uneven shares, several chunks each) is
    bit-identical, and in float64 it is scipy's sygvd to rounding."""
    n, m = 40, 11
    a = np.stack([spd(rng, n) for _ in range(m)]).astype(dtype)
    b = np.stack([spd(rng, n) + 0.1 * np.eye(n) for _ in range(m)]).astype(dtype)
    monkeypatch.setattr("sst_jax.linalg.gevp._CHUNK_BYTES", 2 * n * n * 8)  # 2 problems per chunk
    results = {}
    for threads in (1, 2, 3):
        monkeypatch.setenv(THREADS_ENV, str(threads))
        w, v = generalized_eigh(a, b, backend="lapack")
        results[threads] = (np.asarray(w), np.asarray(v), condition_estimate(b, backend="lapack"))
    for threads in (2, 3):
        for got, want in zip(results[threads], results[1]):
            np.testing.assert_array_equal(got, want)
    if dtype == np.float64:
        for i in range(m):
            ref = scipy.linalg.eigh(a[i], b[i], eigvals_only=True)[::-1]
            np.testing.assert_allclose(results[1][0][i], ref, rtol=0, atol=1e-12 * ref[0])


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_thread_count_is_a_one_line_error(monkeypatch, rng, value):
    monkeypatch.setenv(THREADS_ENV, value)
    a = np.stack([spd(rng, 6)] * 3).astype(np.float32)
    with pytest.raises(ValueError, match=f"{THREADS_ENV}=.*positive number of threads"):
        generalized_eigh(a, a + np.eye(6, dtype=np.float32), backend="lapack")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lapack_row_signs_follow_the_reduction_paths_rule_including_ties(rng, dtype):
    """The LAPACK path's signs (from each row's max and min) equal `_sign_fix`'s argmax-|v| rule
    (first occurrence), also where +m and −m tie in magnitude, in either order."""
    rows = rng.standard_normal((3, 6, 9)).astype(dtype)
    rows[0, 1, [2, 5]] = [-4.0, 4.0]  # tie, negative first → −1
    rows[0, 2, [2, 5]] = [4.0, -4.0]  # tie, positive first → +1
    rows[1, 0, :] = -rows[1, 0, :]
    rows[1, 0, 0], rows[1, 0, 8] = 7.0, -7.0
    rows[2, 3, 4] = -9.0  # an unambiguous negative pivot
    expected = np.asarray(_sign_fix(np.swapaxes(rows, -1, -2), np))
    signs = _row_signs(rows)
    assert signs.shape == (3, 6, 1) and signs.dtype == dtype
    np.testing.assert_array_equal(rows * signs, np.swapaxes(expected, -1, -2))
    assert signs[0, 1, 0] == -1 and signs[0, 2, 0] == 1 and signs[1, 0, 0] == 1 and signs[2, 3, 0] == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_scipy_within_1e4(rng, backend):
    a, b = spd(rng, 64), spd(rng, 64) + 0.1 * np.eye(64)
    w, v = generalized_eigh(a.astype(np.float32), b.astype(np.float32), backend=backend)
    w_ref = scipy.linalg.eigh(a, b, eigvals_only=True)[::-1]
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-4 * w_ref[0])
    v = np.asarray(v, np.float64)
    assert np.abs(v.T @ b @ v - np.eye(64)).max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_on_both_paths(x64, rng, backend):
    a, b = spd(rng, 12), spd(rng, 12) + 0.1 * np.eye(12)
    wk, vk = generalized_eigh(a, b, top_k=3, backend=backend)
    w_ref = scipy.linalg.eigh(a, b, eigvals_only=True)[::-1][:3]
    assert vk.shape == (12, 3)
    np.testing.assert_allclose(wk, w_ref, rtol=1e-10)


def _error(fn):
    with pytest.raises(NumericalError) as err:
        fn()
    return type(err.value), str(err.value)


@pytest.mark.parametrize("n", [6, 130])
def test_non_positive_definite_b_raises_the_same_error_on_both_paths(rng, n):
    b = np.stack([spd(rng, n) for _ in range(3)]).astype(np.float32)
    b[1] = np.diag([1.0] * (n - 1) + [-2.0 * n])
    errors = [_error(lambda k=k: generalized_eigh(b, b, damping=0.1, name="F_b", backend=k)) for k in BACKENDS]
    assert errors[0] == errors[1]
    assert errors[0][0] is NumericalError and "F_b" in errors[0][1] and "batch index (1,)" in errors[0][1]


def test_rank_deficient_b_raises_the_same_error_on_both_paths(x64, rng):
    b = spd(rng, 24, samples=8)
    errors = [_error(lambda k=k: generalized_eigh(spd(rng, 24), b, backend=k)) for k in BACKENDS]
    assert errors[0][0] is errors[1][0] is NumericalError
    assert all("not positive definite" in e[1] for e in errors)


@pytest.mark.parametrize("n", [5, 130])
def test_nan_input_raises_the_same_error_on_both_paths(rng, n):
    a, b = np.stack([spd(rng, n)] * 2), np.stack([spd(rng, n) + np.eye(n)] * 2)
    for x, label, value in ((b, "F_b", np.inf), (a, "A", np.nan)):
        x = x.copy()
        x[1, 0, 3] = value
        args = (x, b) if label == "A" else (a, x)
        errors = [_error(lambda k=k: generalized_eigh(*args, name="F_b", backend=k)) for k in BACKENDS]
        assert errors[0] == errors[1] and f"{label} has NaN/Inf entries at batch index (1,)" in errors[0][1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_variant_inside_jit_and_vmap(rng, backend):
    a = np.stack([spd(rng, 6), spd(rng, 6)]).astype(np.float32)
    b = a + 0.1 * np.eye(6, dtype=np.float32)
    b[1] = np.diag([1.0, 1.0, 1.0, 1.0, 1.0, -2.0])
    fn = lambda x, y: generalized_eigh_traced(x, y, damping=0.1, backend=backend)  # noqa: E731
    w, v, ok = jax.jit(fn)(a, b)
    np.testing.assert_array_equal(ok, [True, False])
    np.testing.assert_allclose(w[0], generalized_eigh(a[0], b[0], damping=0.1)[0], rtol=1e-5)
    wv, _, okv = jax.vmap(fn)(a, b)
    np.testing.assert_array_equal(okv, ok)
    np.testing.assert_allclose(wv[0], w[0], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_condition_estimate_is_the_1_norm_condition_number(x64, rng, backend):
    b = np.stack([with_cond(rng, 32, c) for c in (1e2, 1e5, 1e7)])
    est = condition_estimate(b, backend=backend)
    kappa1 = np.linalg.cond(b, 1)
    assert np.all(est <= kappa1 * 1.0001) and np.all(est >= kappa1 / 3)  # ?pocon: a lower-bound estimate
    assert np.all(est >= np.linalg.cond(b))  # κ₁ ≥ κ₂ for symmetric B


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_ill_conditioned_b_warns_once_with_x64_advice(rng, warnings_seen, backend):
    a, b = spd(rng, 32), with_cond(rng, 32, 1e6)  # cond·eps(f32) ≈ 0.12 > threshold
    generalized_eigh(np.stack([a, a]).astype(np.float32), np.stack([b, b]).astype(np.float32), backend=backend)
    assert len(warnings_seen) == 1
    msg = warnings_seen[0]
    assert "ill-conditioned" in msg and "2 of 2" in msg
    assert 'jax.config.update("jax_enable_x64", True)' in msg and "JAX_ENABLE_X64=1" in msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_ill_conditioned_raise_and_ignore(rng, warnings_seen, backend):
    a, b = (m.astype(np.float32) for m in (spd(rng, 32), with_cond(rng, 32, 1e6)))
    with pytest.raises(IllConditionedError, match="float64"):
        generalized_eigh(a, b, backend=backend, on_ill_conditioned="raise")
    generalized_eigh(a, b, backend=backend, on_ill_conditioned="ignore")
    assert warnings_seen == []


def test_well_conditioned_and_float64_are_quiet(x64, rng, warnings_seen):
    b = with_cond(rng, 32, 1e6)  # fine in float64: cond·eps ≈ 2e-10
    a = spd(rng, 32)
    w, _ = generalized_eigh(a, b)
    np.testing.assert_allclose(w, scipy.linalg.eigh(a, b, eigvals_only=True)[::-1], rtol=1e-7)
    generalized_eigh(spd(rng, 8), spd(rng, 8) + np.eye(8), on_ill_conditioned="raise")
    assert warnings_seen == []
    assert ILL_CONDITIONED_THRESHOLD / np.finfo(np.float64).eps > 1e12


def test_threshold_separates_accurate_from_inaccurate_float32(rng):
    """Below the threshold float32 eigenvalues stay within 1e-4 of float64 (relative to λmax);
    above it they need not (here: more than 1e-4 off)."""
    n = 64
    x = rng.standard_normal((n, 8))
    a = spd(rng, n)
    for damping, warned in ((1e-2, False), (1e-5, True)):
        b = x @ x.T / 8 + damping * np.eye(n)
        cond = np.linalg.cond(b, 1)
        assert (cond * np.finfo(np.float32).eps > ILL_CONDITIONED_THRESHOLD) == warned
        w = generalized_eigh(a.astype(np.float32), b.astype(np.float32), on_ill_conditioned="ignore", rcond=0.0)[0]
        w_ref = scipy.linalg.eigh(a, b, eigvals_only=True)[::-1]
        err = np.abs(np.asarray(w) - w_ref).max() / w_ref[0]
        assert (err < 1e-4) if not warned else (err > 1e-4)


def test_float64_input_without_x64_warns_that_it_runs_in_float32(rng, warnings_seen):
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on")
    a, b = spd(rng, 4), spd(rng, 4) + np.eye(4)
    w, _ = generalized_eigh(a, b)
    assert w.dtype == np.float32
    assert len(warnings_seen) == 1 and "float64 input is computed in float32" in warnings_seen[0]
    assert "JAX_ENABLE_X64=1" in warnings_seen[0]
