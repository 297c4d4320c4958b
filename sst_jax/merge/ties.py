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

Streaming. Per module, the task vectors are formed one at a time from their factors and never
stacked: pass 1 trims each (its threshold is kept, a scalar) and accumulates the election
score; pass 2 re-forms each ΔWᵢ, applies its threshold and accumulates the agreeing entries
and their count. Peak memory is a few out × in float32 buffers whatever the number of
adapters. The adapters of a module are visited in a canonical order (sorted by a content hash
of their factors there, `expert_digest`), so the float sums, and hence the merge, are
bitwise identical whatever order the adapters are listed in. The result holds no module until
it is read: its `dense` is a `DenseModules` that merges a module when asked, so an export
(`to_peft(rank=...)`, `to_merged_hf`) forms, truncates or folds, and drops one module at a time.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from sst_jax.merge.api import DenseModules, MergeInputs, MergeResult, make_result, register
from sst_jax.models.branches import LowRank, ModuleKey

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


def trim_threshold(x: jax.Array, density: float) -> jax.Array | None:
    """The uint32 bit pattern of the k-th largest |x| (k = ⌊density·numel⌋): `magnitude_trim`
    keeps the entries at or above it. None when density ≥ 1 (keep all); 2³² − 1 when k = 0."""
    if density >= 1.0:
        return None
    if density < 0.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    k = int(density * x.size)
    if k == 0:
        return jnp.uint32(0xFFFFFFFF)
    return _kth_largest_bits(_abs_bits(x), k)


def _abs_bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def apply_threshold(x: jax.Array, threshold: jax.Array | None) -> jax.Array:
    """x where |x| ≥ the threshold from `trim_threshold` (bits), else 0."""
    if threshold is None:
        return x
    return jnp.where(_abs_bits(x) >= threshold, x, jnp.zeros_like(x))


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


# ----------------------------------------------------------------------------- streaming


def expert_digest(lr: LowRank) -> bytes:
    """Content hash of one adapter's factors at one module: BLAKE2b-128 over the float32 bytes
    (C order) of A, B, the core (if any) and the scale, with their shapes. Same factors ⇒ same
    digest on any machine; it identifies the expert independently of its list position."""
    h = hashlib.blake2b(digest_size=16)
    parts = [lr.a, lr.b] + ([lr.core] if lr.core is not None else []) + [lr.scale]
    for x in parts:
        arr = np.ascontiguousarray(np.asarray(x, np.float32))
        h.update(repr(arr.shape).encode())
        h.update(arr.tobytes())
    return h.digest()


def module_experts(inputs: MergeInputs, key: ModuleKey) -> list[tuple[bytes, LowRank, float]]:
    """(digest, factors, weight) of every task vector that targets `key` (the safety adapter,
    if any, with weight α), in canonical order: sorted by digest, then weight. Adapters that do
    not target the module are zero there and contribute nothing to any TIES/DARE sum."""
    adapters, weights, _ = inputs.task_vectors()
    experts = [(expert_digest(a[key]), a[key], float(w)) for a, w in zip(adapters, weights) if key in a]
    return sorted(experts, key=lambda e: (e[0], e[2]))


@jax.jit
def lowrank_delta(lr: LowRank) -> jax.Array:
    """ΔW = s·B·C·A in float32 (jitted `LowRank.delta`)."""
    return lr.delta()


@functools.partial(jax.jit, static_argnames=("density",))
def _trim_with_threshold(x: jax.Array, density: float):
    t = trim_threshold(x, density)
    return apply_threshold(x, t), t


def _score_term(t: jax.Array, w: jax.Array, method: SignMethod) -> jax.Array:
    if method == "weighted":
        return w * t
    if method == "total":
        return t
    if method == "frequency":
        return jnp.sign(t)
    raise ValueError(f"majority_sign must be 'weighted', 'total' or 'frequency', got {method!r}")


@functools.partial(jax.jit, static_argnames=("method",), donate_argnums=(0,))
def accumulate_score(score: jax.Array, t: jax.Array, w: jax.Array, method: SignMethod) -> jax.Array:
    """score + this task vector's election term."""
    return score + _score_term(t, w, method)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def accumulate_agreeing(num: jax.Array, cnt: jax.Array, t: jax.Array, w: jax.Array, sign: jax.Array):
    """(num + [sign(t) = sign]·w·t, cnt + [sign(t) = sign])."""
    agree = (jnp.sign(t) == sign).astype(t.dtype)
    return num + agree * w * t, cnt + agree


@jax.jit
def elected(score: jax.Array) -> jax.Array:
    """±1 from an accumulated election score (a zero score elects +1)."""
    return jnp.where(score >= 0, 1.0, -1.0).astype(score.dtype)


@jax.jit
def finish_disjoint(num: jax.Array, cnt: jax.Array) -> jax.Array:
    return num / jnp.maximum(cnt, 1.0)


@functools.partial(jax.jit, donate_argnums=(0,))
def accumulate_weighted(acc: jax.Array, t: jax.Array, w: jax.Array) -> jax.Array:
    return acc + w * t


def streaming_ties(shape: tuple[int, int], experts, task_fn, majority_sign: SignMethod) -> jax.Array:
    """Sign election and disjoint merge over task vectors produced one at a time.

    `task_fn(i, pass_no)` returns task vector i (already trimmed/dropped) for pass 0 or 1; it must
    return the same tensor both times. `experts[i][2]` is its weight."""
    score = jnp.zeros(shape, jnp.float32)
    for i, (_, _, w) in enumerate(experts):
        score = accumulate_score(score, task_fn(i, 0), jnp.float32(w), majority_sign)
    sign = elected(score)
    del score
    num, cnt = jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
    for i, (_, _, w) in enumerate(experts):
        num, cnt = accumulate_agreeing(num, cnt, task_fn(i, 1), jnp.float32(w), sign)
    return finish_disjoint(num, cnt)


def _trimmed_tasks(experts, density: float):
    """task_fn for `streaming_ties`: pass 0 trims and keeps each threshold; pass 1 reuses it."""
    thresholds: dict[int, jax.Array | None] = {}

    def task(i: int, pass_no: int) -> jax.Array:
        delta = lowrank_delta(experts[i][1])
        if pass_no == 0 or i not in thresholds:
            t, thresholds[i] = _trim_with_threshold(delta, density) if density < 1.0 else (delta, None)
            return t
        return _apply(delta, thresholds[i]) if thresholds[i] is not None else delta

    return task


@jax.jit
def _apply(x: jax.Array, threshold: jax.Array) -> jax.Array:
    return apply_threshold(x, threshold)


@register("ties", exact=False)
def ties(inputs: MergeInputs, *, density: float = 0.2, majority_sign: SignMethod = "weighted") -> MergeResult:
    """TIES on dense ΔW per module. density: kept fraction per task vector (default 0.2, the
    paper's top-20%); majority_sign: "weighted" (default), "total" (PEFT) or "frequency"."""
    if majority_sign not in ("weighted", "total", "frequency"):
        raise ValueError(f"majority_sign must be 'weighted', 'total' or 'frequency', got {majority_sign!r}")
    if density < 0.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    def module(key: ModuleKey) -> jax.Array:
        experts = module_experts(inputs, key)
        return streaming_ties(inputs.shapes[key], experts, _trimmed_tasks(experts, density), majority_sign)

    return make_result("ties", inputs, dense=DenseModules(inputs.keys, module),
                       hparams=dict(density=density, majority_sign=majority_sign))


@register("magnitude_prune", exact=False)
def magnitude_prune(inputs: MergeInputs, *, density: float = 0.2) -> MergeResult:
    """Σ wᵢ·trim(ΔWᵢ) per module, trim keeping the top `density` |entries| (default 0.2)."""
    if density < 0.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    def module(key: ModuleKey) -> jax.Array:
        experts = module_experts(inputs, key)
        task = _trimmed_tasks(experts, density)
        acc = jnp.zeros(inputs.shapes[key], jnp.float32)
        for i, (_, _, w) in enumerate(experts):
            acc = accumulate_weighted(acc, task(i, 0), jnp.float32(w))
        return acc

    return make_result("magnitude_prune", inputs, dense=DenseModules(inputs.keys, module),
                       hparams=dict(density=density))
