"""SST-Merge's projections in generalized-eigenvector coordinates (DESIGN.md §5 step 4).

With V from `generalized_eigh(F_h, F_b)` (Vᵀ F_b V = I, Vᵀ F_h V = Λ), a vector φ has the
coordinates c = Vᵀ F_b φ (φ = V c when V is complete). Keeping the top-k components,
φ' = V_k c_k, is the F_b-orthogonal projector onto span(V_k): it is idempotent and self-adjoint
in the F_b inner product, but oblique in Euclidean terms (the Euclidean V_k V_kᵀ φ of the
original is wrong for non-orthonormal V). Spectral shrinkage keeps every component, damped:
φ* = Σ_j λ_j/(λ_j+μ) c_j v_j = (F_h + μ F_b)⁻¹ F_h φ.

All functions are batched over leading axes: v (..., n, m), fb (..., n, n), phi (..., n),
eigvals (..., m).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


@jax.jit
def fb_coordinates(v: jax.Array, fb: jax.Array, phi: jax.Array) -> jax.Array:
    """c = Vᵀ F_b φ, shape (..., m)."""
    fb_phi = jnp.einsum("...ij,...j->...i", fb, phi, precision=_HI)
    return jnp.einsum("...im,...i->...m", v, fb_phi, precision=_HI)


@jax.jit
def _combine(v: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.einsum("...im,...m->...i", v, weights, precision=_HI)


def project_topk(v: jax.Array, fb: jax.Array, phi: jax.Array, k: int | jax.Array) -> jax.Array:
    """φ' = V_k V_kᵀ F_b φ: keep the first k columns of V (eigenvalues in descending order).

    k is an int or an integer array of shape (...) (one k per batch element, e.g. from
    `select_k`); k = 0 gives zeros.
    """
    c = fb_coordinates(v, fb, phi)
    keep = jnp.arange(c.shape[-1]) < jnp.asarray(k)[..., None]
    return _combine(v, jnp.where(keep, c, 0.0))


def shrinkage(eigvals: jax.Array, v: jax.Array, fb: jax.Array, phi: jax.Array,
              mu: float | jax.Array) -> jax.Array:
    """φ* = Σ_j λ_j/(λ_j+μ) c_j v_j = (F_h + μF_b)⁻¹ F_h φ  (μ > 0; negative λ clipped to 0)."""
    lam = jnp.maximum(eigvals, 0.0)
    mu = jnp.asarray(mu, lam.dtype)
    c = fb_coordinates(v, fb, phi)
    return _combine(v, lam / (lam + mu) * c)


def select_k(eigvals: jax.Array, *, k: int | None = None, threshold: float | None = None,
             energy: float | None = None, coords: jax.Array | None = None) -> jax.Array:
    """Number of leading components to keep, shape eigvals.shape[:-1] (int32).

    Exactly one rule:
      k:         a fixed count (clipped to the number of eigenvalues);
      threshold: count of λ_j > threshold (λ descending, so these are the leading ones);
      energy:    smallest k whose leading components carry ≥ `energy` of the total weight,
                 weight_j = λ_j·c_j² when `coords` c are given (the share of φᵀF_hφ = Σλc²,
                 the safety curvature φ carries), else weight_j = λ_j (share of tr Λ).
                 Negative λ count as 0.
    """
    if sum(x is not None for x in (k, threshold, energy)) != 1:
        raise ValueError("select_k needs exactly one of k, threshold, energy")
    eigvals = jnp.asarray(eigvals)
    m = eigvals.shape[-1]
    batch = eigvals.shape[:-1]
    if k is not None:
        return jnp.full(batch, min(max(int(k), 0), m), jnp.int32)
    if threshold is not None:
        return jnp.sum(eigvals > threshold, axis=-1).astype(jnp.int32)
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy={energy} must be in (0, 1]")
    weight = jnp.maximum(eigvals, 0.0)
    if coords is not None:
        weight = weight * jnp.square(jnp.asarray(coords))
    cum = jnp.cumsum(weight, axis=-1)
    total = cum[..., -1:]
    # Count components strictly needed: those whose preceding cumulative share is < energy.
    before = cum - weight
    need = jnp.sum(before < energy * total * (1 - 1e-6), axis=-1)
    return jnp.where(total[..., 0] > 0, need, 0).astype(jnp.int32)
