"""Generalized symmetric eigenproblem A v = λ B v (B SPD) by Cholesky reduction.

`jax.scipy.linalg.eigh(a, b)` is not implemented in JAX, so we reduce to a standard problem:

    B_δ = B + δ·(tr B / n)·I,   L = chol(B_δ),   C = L⁻¹ A L⁻ᵀ (two triangular solves),
    C ← (C + Cᵀ)/2,   C Y = Y Λ (eigh),   V = L⁻ᵀ Y,

so that A V = B_δ V Λ and Vᵀ B_δ V = I. Eigenvalues are returned in descending order and each
eigenvector column is signed so that its largest-magnitude entry is positive (deterministic
across runs and backends, up to exact ties).

Ill-conditioned and rank-deficient B. The reduction is as accurate as the Cholesky factor:
eigenvalue errors grow like cond(B_δ)·eps. `damping` δ adds δ times the mean eigenvalue of B
to its diagonal, which bounds cond(B_δ) ≤ 1 + n/δ for any positive semi-definite B, so a
rank-deficient B (e.g. a Fisher from fewer samples than dimensions) becomes positive definite
and solvable. Without enough damping, B is rejected with `NumericalError` (never NaNs) when
its Cholesky factor fails (non-finite) or when it is numerically singular: the smallest pivot
squared is ≤ `rcond` times the largest (default rcond = n·eps of the dtype), since then the
reduced matrix C is dominated by rounding error. The error names the batch index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sst_jax.errors import NumericalError


def _sym(x: jax.Array) -> jax.Array:
    return 0.5 * (x + jnp.swapaxes(x, -1, -2))


def _damped(b: jax.Array, damping: float | jax.Array) -> jax.Array:
    n = b.shape[-1]
    mean_eig = jnp.trace(b, axis1=-2, axis2=-1) / n
    eye = jnp.eye(n, dtype=b.dtype)
    return b + (jnp.asarray(damping, b.dtype) * mean_eig)[..., None, None] * eye


@functools.partial(jax.jit, static_argnames=("top_k",))
def _reduce_and_solve(a: jax.Array, b: jax.Array, damping: jax.Array, top_k: int | None):
    with jax.default_matmul_precision("highest"):
        a, b = _sym(a), _sym(b)
        chol = jnp.linalg.cholesky(_damped(b, damping))
        # C = L⁻¹ A L⁻ᵀ: X = L⁻¹ A, then C = L⁻¹ Xᵀ (= L⁻¹ A L⁻ᵀ since A is symmetric).
        x = jax.lax.linalg.triangular_solve(chol, a, left_side=True, lower=True)
        c = jax.lax.linalg.triangular_solve(chol, jnp.swapaxes(x, -1, -2), left_side=True, lower=True)
        w, y = jnp.linalg.eigh(_sym(c))
        w, y = w[..., ::-1], y[..., ::-1]
        if top_k is not None:
            w, y = w[..., :top_k], y[..., :top_k]
        v = jax.lax.linalg.triangular_solve(chol, y, left_side=True, lower=True, transpose_a=True)
        # Deterministic sign: the largest-|.| entry of each column is positive.
        idx = jnp.argmax(jnp.abs(v), axis=-2)
        pivot = jnp.take_along_axis(v, idx[..., None, :], axis=-2)[..., 0, :]
        v = v * jnp.where(pivot < 0, -1.0, 1.0).astype(v.dtype)[..., None, :]
        piv2 = jnp.square(jnp.diagonal(chol, axis1=-2, axis2=-1))
        finite = jnp.all(jnp.isfinite(chol), axis=(-2, -1)) & jnp.all(jnp.isfinite(piv2), axis=-1)
        ratio = jnp.min(piv2, axis=-1) / jnp.max(piv2, axis=-1)
        a_ok = jnp.all(jnp.isfinite(a), axis=(-2, -1))
        b_ok = jnp.all(jnp.isfinite(b), axis=(-2, -1))
    return w, v, finite, ratio, a_ok, b_ok


def generalized_eigh(a: jax.Array, b: jax.Array, *, damping: float = 0.0,
                     top_k: int | None = None, rcond: float | None = None,
                     name: str = "B") -> tuple[jax.Array, jax.Array]:
    """Solve A v = λ B_δ v for symmetric A and SPD B, batched over leading axes.

    Args:
      a, b: (..., n, n) symmetric matrices (only their symmetric parts are used).
      damping: δ; B_δ = B + δ·(tr B / n)·I (trace-relative, so δ is scale-free).
      top_k: keep only the k largest eigenpairs.
      rcond: reject B_δ whose smallest Cholesky pivot² ≤ rcond × largest (default n·eps).
      name: what B is, for error messages (e.g. "F_b").
    Returns:
      (eigvals (..., k) descending, eigvecs (..., n, k)) with Vᵀ B_δ V = I, A V = B_δ V Λ.
    Raises:
      NumericalError: non-finite inputs, or B_δ not positive definite at working precision.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"generalized_eigh needs square A and B of equal shape; got {a.shape}, {b.shape}")
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    n = a.shape[-1]
    if top_k is not None and not 0 < top_k <= n:
        raise ValueError(f"top_k={top_k} must be in 1..{n}")
    # One dispatch and one host transfer: the input checks run inside the jitted solve.
    w, v, finite, ratio, a_ok, b_ok = _reduce_and_solve(a, b, jnp.asarray(damping, dtype), top_k)
    finite, ratio, a_ok, b_ok = jax.device_get((finite, ratio, a_ok, b_ok))
    for label, ok in (("A", a_ok), (name, b_ok)):
        bad = ~np.asarray(ok)
        if bad.any():
            raise NumericalError(f"{label} has NaN/Inf entries at batch index {_first(bad)}")
    tol = n * float(jnp.finfo(dtype).eps) if rcond is None else rcond
    bad = ~(np.asarray(finite) & (np.asarray(ratio) > tol))
    if bad.any():
        i = _first(bad)
        r = np.asarray(ratio)[i]
        raise NumericalError(
            f"{name} (+ damping {damping}·tr/n·I) is not positive definite at working precision "
            f"{'at batch index ' + str(i) if i else '(unbatched)'} (Cholesky {'failed' if not np.asarray(finite)[i] else 'succeeded'}, "
            f"min/max pivot² = {float(r):.3g} ≤ rcond {tol:.3g}); increase damping or use float64")
    return w, v


def generalized_eigh_traced(a: jax.Array, b: jax.Array, *, damping: float | jax.Array = 0.0,
                            top_k: int | None = None, rcond: float | None = None):
    """`generalized_eigh` usable inside jit: returns (eigvals, eigvecs, ok) where ok (...) is
    False where B_δ is not PD at working precision (those entries are NaN or meaningless)."""
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    n = a.shape[-1]
    w, v, finite, ratio, _, _ = _reduce_and_solve(a.astype(dtype), b.astype(dtype), jnp.asarray(damping, dtype), top_k)
    tol = n * float(jnp.finfo(dtype).eps) if rcond is None else rcond
    return w, v, finite & (ratio > tol)


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """Index of the first True entry of a (possibly 0-d) mask, as a tuple."""
    if mask.ndim == 0:
        return ()
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_positive_definite(b: jax.Array, *, damping: float = 0.0, rcond: float | None = None,
                            name: str = "B") -> None:
    """Raise NumericalError (naming the batch index) unless B + δ·tr/n·I is PD at working precision."""
    b = jnp.asarray(b)
    generalized_eigh(jnp.zeros_like(b), b, damping=damping, top_k=1, rcond=rcond, name=name)
