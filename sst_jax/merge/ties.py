"""TIES-Merging (Yadav et al., 2023) and magnitude pruning on per-module ΔW (dense result).

Convention (ours):
- trim: each task vector keeps its entries with |value| ≥ its k-th largest |value|, counted per
  module (k = ⌊density·numel⌋, as PEFT; entries tied at the threshold are all kept, see
  `magnitude_trim`; the paper trims over the whole flattened model);
- elect: the sign of each entry is sign(Σᵢ wᵢ·trimᵢ) (`majority_sign="weighted"`; a zero sum
  elects +). "total" elects from the unweighted sum Σᵢ trimᵢ (PEFT's default), "frequency"
  from Σᵢ sign(trimᵢ);
- disjoint merge: Σᵢ wᵢ·trimᵢ over the adapters whose (non-zero) entry has the elected sign,
  divided by the number of such adapters (PEFT's divisor; mergekit divides by Σ wᵢ instead).
With equal positive weights, or with majority_sign="total", this is PEFT's `ties` exactly.

Magnitude pruning: Σᵢ wᵢ·trimᵢ (PEFT's `magnitude_prune`).
A safety adapter, when given, is one more task vector with weight α.
"""

from __future__ import annotations

from typing import Literal

import functools

import jax
import jax.numpy as jnp

from sst_jax.merge.api import MergeInputs, MergeResult, make_result, register

SignMethod = Literal["weighted", "total", "frequency"]


def _kth_largest_bits(bits: jax.Array, k: int) -> jax.Array:
    """The k-th largest of non-negative float32 bit patterns (uint32), exactly, by bisection:
    the largest t with #{bits ≥ t} ≥ k. Bit patterns of non-negative floats order like the
    floats, so 31 counting passes replace a sort (XLA's CPU top_k/sort is ~25× slower here)."""
    def step(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, step, (jnp.uint32(0), jnp.uint32(1 << 31)))
    return lo


def magnitude_trim(x: jax.Array, density: float) -> jax.Array:
    """Keep the entries with |x| ≥ the k-th largest |x|, k = ⌊density·numel⌋ (others zero);
    density ≥ 1 keeps all, k = 0 keeps none.

    This keeps exactly k entries unless the k-th and (k+1)-th largest |x| are equal: then all
    entries tied at that threshold are kept (more than k). PEFT's `magnitude_based_pruning`
    keeps exactly k (torch.topk indices, ties broken arbitrarily); the two agree whenever the
    threshold is not tied."""
    if density >= 1.0:
        return x
    if density < 0.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    k = int(density * x.size)
    if k == 0:
        return jnp.zeros_like(x)
    bits = jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)
    return jnp.where(bits >= _kth_largest_bits(bits, k), x, jnp.zeros_like(x))


def elect_sign(trimmed: jax.Array, weights: jax.Array, method: SignMethod = "weighted") -> jax.Array:
    """±1 per entry from the stacked (n, ...) task vectors; a zero score elects +1."""
    w = weights.reshape((-1,) + (1,) * (trimmed.ndim - 1))
    if method == "weighted":
        score = jnp.sum(w * trimmed, axis=0)
    elif method == "total":
        score = jnp.sum(trimmed, axis=0)
    elif method == "frequency":
        score = jnp.sum(jnp.sign(trimmed), axis=0)
    else:
        raise ValueError(f"majority_sign must be 'weighted', 'total' or 'frequency', got {method!r}")
    return jnp.where(score >= 0, 1.0, -1.0).astype(trimmed.dtype)


def disjoint_merge(tasks: jax.Array, weights: jax.Array, sign: jax.Array) -> jax.Array:
    """Σ wᵢtᵢ over entries whose sign agrees with `sign`, divided by the agreeing count (≥ 1)."""
    w = weights.reshape((-1,) + (1,) * (tasks.ndim - 1))
    agree = (jnp.sign(tasks) == sign[None]).astype(tasks.dtype)
    return jnp.sum(agree * w * tasks, axis=0) / jnp.maximum(jnp.sum(agree, axis=0), 1.0)


@functools.partial(jax.jit, static_argnames=("density", "majority_sign"))
def ties_tensors(tasks: jax.Array, weights: jax.Array, *, density: float = 0.2,
                 majority_sign: SignMethod = "weighted") -> jax.Array:
    """TIES of stacked task tensors (n, ...) -> (...)."""
    trimmed = jnp.stack([magnitude_trim(t, density) for t in tasks])
    return disjoint_merge(trimmed, weights, elect_sign(trimmed, weights, majority_sign))


@functools.partial(jax.jit, static_argnames=("density",))
def magnitude_prune_tensors(tasks: jax.Array, weights: jax.Array, *, density: float = 0.2) -> jax.Array:
    """Σ wᵢ·trim(tᵢ) of stacked task tensors (n, ...) -> (...)."""
    trimmed = jnp.stack([magnitude_trim(t, density) for t in tasks])
    return jnp.tensordot(weights, trimmed, axes=1)


@register("ties", exact=False)
def ties(inputs: MergeInputs, *, density: float = 0.2, majority_sign: SignMethod = "weighted") -> MergeResult:
    """TIES on dense ΔW per module. density: kept fraction per task vector (default 0.2, the
    paper's top-20%); majority_sign: "weighted" (default), "total" (PEFT) or "frequency"."""
    dense = {}
    for key in inputs.keys:
        tasks, w = inputs.stacked_deltas(key)
        dense[key] = ties_tensors(tasks, w, density=density, majority_sign=majority_sign)
    return make_result("ties", inputs, dense=dense, hparams=dict(density=density, majority_sign=majority_sign))


@register("magnitude_prune", exact=False)
def magnitude_prune(inputs: MergeInputs, *, density: float = 0.2) -> MergeResult:
    """Σ wᵢ·trim(ΔWᵢ) per module, trim keeping the top `density` |entries| (default 0.2)."""
    dense = {}
    for key in inputs.keys:
        tasks, w = inputs.stacked_deltas(key)
        dense[key] = magnitude_prune_tensors(tasks, w, density=density)
    return make_result("magnitude_prune", inputs, dense=dense, hparams=dict(density=density))
