"""DARE (Yu et al., 2024: drop and rescale) on per-module ΔW (dense result).

Convention: every entry of each task vector is kept with probability `density` = 1 − p and
the kept entries are rescaled by 1/density (the paper's rescale; mergekit can instead match
L1 norms), so E[dropped] = ΔW. `dare_linear` sums Σ wᵢ·dropᵢ; `dare_ties` applies TIES sign
election and disjoint merge (see `ties.py`, default majority_sign="weighted") to the dropped,
rescaled vectors, with no magnitude trim (as PEFT's `dare_ties`).

Randomness: the keep mask of an adapter at module m is keyed by the adapter's identity, not
its position: `module_seed(key, m, *words(digest))`, where digest = `expert_digest` (BLAKE2b
of the float32 bytes of that adapter's A, B, core and scale at m) and key = PRNGKey(seed)
unless an explicit key is passed to `merge`. So the same seed gives the same merge whatever
order the adapters are listed in, whatever order modules are visited in and whichever other
modules exist; another seed gives another merge. (Two adapters with identical factors at a
module are the same expert there and get the same mask.) The adapters of a module are also
summed in canonical (digest) order, so reordering them is bitwise invisible.

Streaming: per module, one expert at a time is formed from its factors, masked and
accumulated (dare_linear: one pass; dare_ties: a pass for the sign election and a second,
redrawing the same masks, for the disjoint merge). No n × out × in stack is ever held, and the
result merges a module only when it is read (`DenseModules`), so exports go one module at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sst_jax.merge.api import DenseModules, MergeInputs, MergeResult, make_result, module_hash, module_seed, register
from sst_jax.merge.ties import SignMethod, accumulate_weighted, expert_digest, module_experts, streaming_ties
from sst_jax.models.branches import LowRank, ModuleKey


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


def digest_words(digest: bytes) -> tuple[int, ...]:
    """The first 124 bits of a digest as four 31-bit integers (fold_in data)."""
    x = int.from_bytes(digest, "big")
    return tuple((x >> (31 * j)) & 0x7FFFFFFF for j in range(4))


def expert_key(key: jax.Array, module: ModuleKey, digest: bytes) -> jax.Array:
    """PRNG key of one expert's mask at `module`: module_seed(key, module, *digest_words(digest))."""
    return module_seed(key, module, *digest_words(digest))


def expert_mask(key: jax.Array, module: ModuleKey, lr: LowRank, density: float) -> jax.Array:
    """The keep mask DARE uses for adapter factors `lr` at `module` under base key `key`."""
    shape = (int(lr.b.shape[0]), int(lr.a.shape[1]))
    return keep_mask(expert_key(key, module, expert_digest(lr)), shape, density)


def module_masks(key: jax.Array, module: ModuleKey, shape: tuple[int, ...], n: int, density: float) -> jax.Array:
    """(n, *shape) positional masks (mask i from module_seed(key, module, i)); used by the
    factor-space PEFT reproduction modes, not by `dare_linear`/`dare_ties` (see expert_mask)."""
    return _masks(key, jnp.uint32(module_hash(module)), tuple(shape), n, float(density))


@functools.partial(jax.jit, static_argnames=("shape", "n", "density"))
def _masks(key, mhash, shape, n, density):
    mkey = jax.random.fold_in(key, mhash)
    return jnp.stack([keep_mask(jax.random.fold_in(mkey, i), shape, density) for i in range(n)])


def _base_key(inputs: MergeInputs, seed: int) -> jax.Array:
    return inputs.key if inputs.key is not None else jax.random.PRNGKey(seed)


@functools.partial(jax.jit, static_argnames=("density",))
def _dropped(lr: LowRank, key: jax.Array, density: float) -> jax.Array:
    """drop_and_rescale(ΔW, mask) for one expert, the mask drawn from its key (fused)."""
    delta = lr.delta()
    if density <= 0.0:
        return jnp.zeros_like(delta)
    return delta * keep_mask(key, delta.shape, density) / density


def _task_fn(base: jax.Array, module: ModuleKey, experts, density: float):
    keys = [expert_key(base, module, digest) for digest, _, _ in experts]
    return lambda i, _pass: _dropped(experts[i][1], keys[i], float(density))


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")


@register("dare_linear", exact=False)
def dare_linear(inputs: MergeInputs, *, density: float = 0.5, seed: int = 0) -> MergeResult:
    """Σ wᵢ·mᵢ⊙ΔWᵢ/density, mᵢ ~ Bernoulli(density). density default 0.5 (drop p = 0.5);
    seed default 0 (ignored when `merge(key=...)` is given)."""
    _check_density(density)
    base = _base_key(inputs, seed)

    def module(key: ModuleKey) -> jax.Array:
        experts = module_experts(inputs, key)
        task = _task_fn(base, key, experts, density)
        acc = jnp.zeros(inputs.shapes[key], jnp.float32)
        for i, (_, _, w) in enumerate(experts):
            acc = accumulate_weighted(acc, task(i, 0), jnp.float32(w))
        return acc

    return make_result("dare_linear", inputs, dense=DenseModules(inputs.keys, module),
                       hparams=dict(density=density, seed=seed))


@register("dare_ties", exact=False)
def dare_ties(inputs: MergeInputs, *, density: float = 0.5, seed: int = 0,
              majority_sign: SignMethod = "weighted") -> MergeResult:
    """DARE drop/rescale, then TIES sign election + disjoint merge. Defaults: density 0.5,
    seed 0, majority_sign "weighted" ("total" is PEFT's)."""
    _check_density(density)
    if majority_sign not in ("weighted", "total", "frequency"):
        raise ValueError(f"majority_sign must be 'weighted', 'total' or 'frequency', got {majority_sign!r}")
    base = _base_key(inputs, seed)

    def module(key: ModuleKey) -> jax.Array:
        experts = module_experts(inputs, key)
        return streaming_ties(inputs.shapes[key], experts, _task_fn(base, key, experts, density), majority_sign)

    return make_result("dare_ties", inputs, dense=DenseModules(inputs.keys, module),
                       hparams=dict(density=density, seed=seed, majority_sign=majority_sign))
