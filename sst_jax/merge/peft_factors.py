"""Reproduction modes of PEFT's non-SVD `add_weighted_adapter` combinations (factor space).

PEFT (`LoraModel.add_weighted_adapter`, combination_type "linear", "ties", "dare_linear",
"dare_ties", "magnitude_prune") merges the A matrices and the B matrices *separately*, with
weights √|wᵢsᵢ|·sign(wᵢsᵢ) on A and √|wᵢsᵢ| on B, and returns A', B' at the common rank r
with scale 1. ΔW' = B'A' then contains cross terms BᵢAⱼ, so these are *not* merges of ΔW;
they exist only to reproduce PEFT (DESIGN §4). Sign election is PEFT's ("total", the
unweighted sum) unless stated. All adapters (and S) must share one rank per module.
DARE masks are keyed as in `dare.py`, with one more fold_in: 0 for A, 1 for B.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sst_jax.errors import AdapterMismatchError
from sst_jax.merge.api import MergeInputs, MergeResult, make_result, module_seed, register
from sst_jax.merge.dare import drop_and_rescale, keep_mask
from sst_jax.merge.ties import SignMethod, disjoint_merge, elect_sign, magnitude_prune_tensors, ties_tensors
from sst_jax.models.branches import LowRank, hf_module_path


def factor_weights(weights: list[float], scales: list[float]) -> tuple[jax.Array, jax.Array]:
    """(weights on A, weights on B) as PEFT: √|ws|·sign(ws) and √|ws|."""
    ws = [w * s for w, s in zip(weights, scales)]
    wa = [math.sqrt(abs(x)) * (1.0 if x >= 0 else -1.0) for x in ws]
    wb = [math.sqrt(abs(x)) for x in ws]
    return jnp.asarray(wa, jnp.float32), jnp.asarray(wb, jnp.float32)


def _factor_merge(inputs: MergeInputs, mode: str, combine) -> dict:
    adapters, weights, names = inputs.task_vectors()
    factors = {}
    for key in inputs.keys:
        present = [(a[key], w, nm) for a, w, nm in zip(adapters, weights, names) if key in a]
        ranks = {int(lr.a.shape[0]) for lr, _, _ in present}
        if len(ranks) != 1 or any(lr.core is not None for lr, _, _ in present):
            raise AdapterMismatchError(
                f"{mode}: PEFT's factor-space merge needs one rank per module and plain LoRA factors; "
                f"{hf_module_path(key)} has ranks {sorted(ranks)} ({[nm for _, _, nm in present]})")
        wa, wb = factor_weights([w for _, w, _ in present], [float(lr.scale) for lr, _, _ in present])
        a_stack = jnp.stack([jnp.asarray(lr.a, jnp.float32) for lr, _, _ in present])
        b_stack = jnp.stack([jnp.asarray(lr.b, jnp.float32) for lr, _, _ in present])
        factors[key] = (LowRank(a=combine(a_stack, wa, key, 0), b=combine(b_stack, wb, key, 1), scale=1.0),)
    return factors


def _linear(t, w, key, side):
    return jnp.tensordot(w, t, axes=1)


@register("peft_linear_factors", exact=True)
def peft_linear_factors(inputs: MergeInputs) -> MergeResult:
    """PEFT combination_type="linear": A' = Σ √|wᵢsᵢ|sign·Aᵢ, B' = Σ √|wᵢsᵢ|·Bᵢ."""
    return make_result("peft_linear_factors", inputs, factors=_factor_merge(inputs, "peft_linear_factors", _linear))


@register("peft_ties_factors", exact=True)
def peft_ties_factors(inputs: MergeInputs, *, density: float = 0.2, majority_sign: SignMethod = "total") -> MergeResult:
    """PEFT combination_type="ties" on A and B separately. Defaults: density 0.2, majority_sign "total"."""
    fn = lambda t, w, key, side: ties_tensors(t, w, density=density, majority_sign=majority_sign)  # noqa: E731
    return make_result("peft_ties_factors", inputs, factors=_factor_merge(inputs, "peft_ties_factors", fn),
                       hparams=dict(density=density, majority_sign=majority_sign))


@register("peft_magnitude_prune_factors", exact=True)
def peft_magnitude_prune_factors(inputs: MergeInputs, *, density: float = 0.2) -> MergeResult:
    """PEFT combination_type="magnitude_prune" on A and B separately. Default density 0.2."""
    fn = lambda t, w, key, side: magnitude_prune_tensors(t, w, density=density)  # noqa: E731
    return make_result("peft_magnitude_prune_factors", inputs,
                       factors=_factor_merge(inputs, "peft_magnitude_prune_factors", fn), hparams=dict(density=density))


def factor_masks(base: jax.Array, key, side: int, shape, n: int, density: float) -> jax.Array:
    """(n, *shape) keep masks of side 0 (A) or 1 (B) at module `key`."""
    return jnp.stack([keep_mask(module_seed(base, key, i, side), shape, density) for i in range(n)])


def _dare_fn(inputs: MergeInputs, density: float, seed: int, combine):
    base = inputs.key if inputs.key is not None else jax.random.PRNGKey(seed)

    def fn(t, w, key, side):
        masks = factor_masks(base, key, side, t.shape[1:], t.shape[0], density)
        return combine(drop_and_rescale(t, masks, density), w)

    return fn


@register("peft_dare_linear_factors", exact=True)
def peft_dare_linear_factors(inputs: MergeInputs, *, density: float = 0.5, seed: int = 0) -> MergeResult:
    """PEFT combination_type="dare_linear" on A and B separately. Defaults: density 0.5, seed 0."""
    fn = _dare_fn(inputs, density, seed, lambda t, w: jnp.tensordot(w, t, axes=1))
    return make_result("peft_dare_linear_factors", inputs, factors=_factor_merge(inputs, "peft_dare_linear_factors", fn),
                       hparams=dict(density=density, seed=seed))


@register("peft_dare_ties_factors", exact=True)
def peft_dare_ties_factors(inputs: MergeInputs, *, density: float = 0.5, seed: int = 0,
                           majority_sign: SignMethod = "total") -> MergeResult:
    """PEFT combination_type="dare_ties" on A and B separately. Defaults: density 0.5, seed 0, "total"."""
    fn = _dare_fn(inputs, density, seed, lambda t, w: disjoint_merge(t, w, elect_sign(t, w, majority_sign)))
    return make_result("peft_dare_ties_factors", inputs, factors=_factor_merge(inputs, "peft_dare_ties_factors", fn),
                       hparams=dict(density=density, seed=seed, majority_sign=majority_sign))
