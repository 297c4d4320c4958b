"""DARE (Yu et al., 2024: drop and rescale) on per-module ΔW (dense result).

Convention: every entry of each task vector is kept with probability `density` = 1 − p and
the kept entries are rescaled by 1/density (the paper's rescale; mergekit can instead match
L1 norms), so E[dropped] = ΔW. `dare_linear` sums Σ wᵢ·dropᵢ; `dare_ties` applies TIES sign
election and disjoint merge (see `ties.py`, default majority_sign="weighted") to the dropped,
rescaled vectors, with no magnitude trim (as PEFT's `dare_ties`).

Randomness: the keep mask of adapter i at module m comes from
`fold_in(fold_in(key, hash(module path of m)), i)`, key = PRNGKey(seed) unless an explicit
key is passed to `merge`: the same seed gives the same merge whatever order modules are
visited in or which other modules exist; adapter i is its position (utilities, then safety).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sst_jax.merge.api import MergeInputs, MergeResult, make_result, module_hash, register
from sst_jax.merge.ties import SignMethod, disjoint_merge, elect_sign
from sst_jax.models.branches import ModuleKey


def keep_mask(key: jax.Array, shape: tuple[int, ...], density: float) -> jax.Array:
    """Bernoulli(density) keep mask, float32."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return jax.random.bernoulli(key, density, shape).astype(jnp.float32)


def drop_and_rescale(x: jax.Array, mask: jax.Array, density: float) -> jax.Array:
    """x·mask/density (all zeros when density = 0)."""
    if density <= 0.0:
        return jnp.zeros_like(x)
    return x * mask / density


def module_masks(key: jax.Array, module: ModuleKey, shape: tuple[int, ...], n: int, density: float) -> jax.Array:
    """(n, *shape) keep masks of the n task vectors at `module` (mask i from module_seed(key, module, i))."""
    return _masks(key, jnp.uint32(module_hash(module)), tuple(shape), n, float(density))


@functools.partial(jax.jit, static_argnames=("shape", "n", "density"))
def _masks(key, mhash, shape, n, density):
    mkey = jax.random.fold_in(key, mhash)
    return jnp.stack([keep_mask(jax.random.fold_in(mkey, i), shape, density) for i in range(n)])


def _base_key(inputs: MergeInputs, seed: int) -> jax.Array:
    return inputs.key if inputs.key is not None else jax.random.PRNGKey(seed)


def _dare(inputs: MergeInputs, density: float, seed: int, combine) -> dict:
    base = _base_key(inputs, seed)
    dense = {}
    for key in inputs.keys:
        tasks, w = inputs.stacked_deltas(key)
        masks = module_masks(base, key, tasks.shape[1:], tasks.shape[0], density)
        dense[key] = combine(drop_and_rescale(tasks, masks, density), w)
    return dense


@jax.jit
def _linear(tasks: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.tensordot(weights, tasks, axes=1)


@functools.partial(jax.jit, static_argnames=("majority_sign",))
def _ties(tasks: jax.Array, weights: jax.Array, majority_sign: SignMethod) -> jax.Array:
    return disjoint_merge(tasks, weights, elect_sign(tasks, weights, majority_sign))


@register("dare_linear", exact=False)
def dare_linear(inputs: MergeInputs, *, density: float = 0.5, seed: int = 0) -> MergeResult:
    """Σ wᵢ·mᵢ⊙ΔWᵢ/density, mᵢ ~ Bernoulli(density). density default 0.5 (drop p = 0.5);
    seed default 0 (ignored when `merge(key=...)` is given)."""
    dense = _dare(inputs, density, seed, _linear)
    return make_result("dare_linear", inputs, dense=dense, hparams=dict(density=density, seed=seed))


@register("dare_ties", exact=False)
def dare_ties(inputs: MergeInputs, *, density: float = 0.5, seed: int = 0,
              majority_sign: SignMethod = "weighted") -> MergeResult:
    """DARE drop/rescale, then TIES sign election + disjoint merge. Defaults: density 0.5,
    seed 0, majority_sign "weighted" ("total" is PEFT's)."""
    dense = _dare(inputs, density, seed, functools.partial(_ties, majority_sign=majority_sign))
    return make_result("dare_ties", inputs, dense=dense,
                       hparams=dict(density=density, seed=seed, majority_sign=majority_sign))
