"""Fisher merging (Matena & Raffel, 2022) with a diagonal per-sample Fisher, on per-module ΔW.

Convention: ΔW = Σᵢ wᵢ(Fᵢ+ε)⊙ΔWᵢ / Σᵢ wᵢ(Fᵢ+ε), entrywise, where Fᵢ is the diagonal of the
true per-sample Fisher (mean of squared per-sample gradients of the response NLL w.r.t. the
weight entries) of task vector i on its own data, at θ₀ + ΔWᵢ; ε = eps·mean(ΣᵢFᵢ) keeps
entries no task has curvature on at the weighted mean. The base θ₀ cancels (all models share
it), so merging ΔW equals merging θ₀ + ΔWᵢ. Dense result. With a safety adapter, S is one more
task (weight α) whose Fisher comes from the harmful (refusal) data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sst_jax.fisher import weight_diag_fisher
from sst_jax.merge.api import DenseModules, MergeInputs, MergeResult, make_result, register
from sst_jax.merge.fishers import as_batches, n_samples


def task_fishers(inputs: MergeInputs, datasets, *, chunk: int | None = None) -> list[dict]:
    """[ {key: diag Fisher (out, in)} ] for every task vector (utilities, then safety), each on
    its dataset, at θ₀ + that task's ΔW."""
    adapters, _, names = inputs.task_vectors()
    if len(datasets) != len(adapters):
        raise ValueError(f"fisher merging needs one dataset per task vector ({names}); got {len(datasets)}")
    out = []
    for adapter, data, name in zip(adapters, datasets, names):
        base = {k: (lr,) for k, lr in adapter.items()}
        batches = as_batches(data, name)
        f = weight_diag_fisher(inputs.model, base, list(inputs.keys), batches, chunk=chunk,
                               total=n_samples(batches), desc=f"diag F ({name})")
        out.append(dict(f.diag))
    return out


def fisher_statistics(inputs: MergeInputs, data, *, chunk: int | None = None) -> list[dict]:
    """The front door's hook: each utility adapter on its own dataset (data["utility"]), the
    safety adapter on data["harmful"]."""
    datasets = list(data["utility"]) + ([data["harmful"]] if inputs.safety is not None else [])
    return task_fishers(inputs, datasets, chunk=chunk)


@jax.jit
def fisher_weighted_average(tasks: jax.Array, fishers: jax.Array, weights: jax.Array, eps: float) -> jax.Array:
    """Σ wᵢ(Fᵢ+ε)tᵢ / Σ wᵢ(Fᵢ+ε) over stacked (n, ...) arrays, ε = eps·mean(Σ Fᵢ)."""
    f = fishers + eps * jnp.mean(jnp.sum(fishers, axis=0))
    w = weights.reshape((-1,) + (1,) * (tasks.ndim - 1)) * f
    return jnp.sum(w * tasks, axis=0) / jnp.sum(w, axis=0)


@register("fisher", exact=False, data_aware=True, needs=("utility",), statistics=fisher_statistics)
def fisher(inputs: MergeInputs, *, fishers: list | None = None, eps: float = 1e-6, chunk: int | None = None) -> MergeResult:
    """Diagonal Fisher merging. Defaults: eps 1e-6 (relative), chunk = `default_chunk()` (4 on CPU,
    16 on GPU/TPU). Needs fishers= task_fishers(...) or model= and data={"tasks": [batches per task
    vector]} (utilities, then S)."""
    if fishers is None:
        data = inputs.data or {}
        if inputs.model is None or "tasks" not in data:
            raise ValueError("fisher merging needs fishers= or model= and data={'tasks': [...]}")
        fishers = task_fishers(inputs, data["tasks"], chunk=chunk)
    adapters, _, names = inputs.task_vectors()
    if len(fishers) != len(adapters):
        raise ValueError(f"got {len(fishers)} Fishers for {len(adapters)} task vectors ({names})")
    def module(key):  # merged when read (DenseModules): exports hold one module at a time
        tasks, w = inputs.stacked_deltas(key)
        fs = jnp.stack([jnp.asarray(f[key], jnp.float32) if key in f else jnp.zeros(inputs.shapes[key])
                        for f in fishers])
        return fisher_weighted_average(tasks, fs, w, eps)

    return make_result("fisher", inputs, dense=DenseModules(inputs.keys, module), hparams=dict(eps=eps))
