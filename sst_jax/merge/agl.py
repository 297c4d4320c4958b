"""AlignGuard-LoRA-style merge (labelled re-implementation, DESIGN §5; arXiv 2508.02079).

The paper is a fine-tuning regularizer and its released code does not implement it; this is
our merge-time reading of it, named as such. A single Fisher — the safety Fisher F_h in S's
core space (the one `sst_fishers` computes) — defines the safety-critical directions: its
top-k eigenvectors E_k (ordinary, orthonormal eigenvectors of F_h). Per module:

    φ_U = vec(Pᵀ ΔW_U Q),   ΔW_U' = ΔW_U − β·P mat(E_k E_kᵀ φ_U) Qᵀ,   ΔW = ΔW_U' + α·ΔW_S

β ∈ [0, 1] is the avoidance strength: β = 0 is Task Arithmetic, β = 1 removes U's component
along the k directions entirely. Kept exactly as factors (rank r_U + r + r).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sst_jax.fisher import core_space
from sst_jax.merge.api import MergeInputs, MergeResult, make_result, register
from sst_jax.merge.sst import (SstFishers, default_k, require_safety, sst_fishers, sst_statistics, training_data,
                               utility_parts)
from sst_jax.models.branches import LowRank, hf_module_path


# The front door's hook is SST's own (core-space F_h and F_b at its defaults; only F_h is used
# here), so an SST and an AGL merge of the same inputs share one cached Fisher pass.
@register("agl", exact=True, data_aware=True, needs=("safety", "harmful", "benign"), statistics=sst_statistics)
def agl(inputs: MergeInputs, *, fishers: SstFishers | None = None, beta: float = 1.0, k: int | None = None,
        utility: MergeResult | None = None, chunk: int | None = None) -> MergeResult:
    """AlignGuard-LoRA-style merge. Defaults: beta 1.0, k = ⌈r²/2⌉ (as SST), chunk =
    `default_chunk()` (4 on CPU, 16 on GPU/TPU). Needs fishers= (only .harmful is used, kind "core")
    or model= and data={"harmful": ..., "benign": ...}. utility: as in `sst` (default Σ wᵢΔW_Uᵢ)."""
    safety = require_safety(inputs, "agl")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"agl: avoidance strength beta must be in [0, 1], got {beta}")
    if fishers is None:
        fishers = sst_fishers(inputs, training_data(inputs, "harmful"), training_data(inputs, "benign"), utility=utility, chunk=chunk)
    if fishers.kind != "core":
        raise ValueError(f"agl needs dense core-space Fishers, got kind {fishers.kind!r}")
    util = utility_parts(inputs, utility)
    factors, stats = {}, {}
    for key in inputs.keys:
        parts, st = [], {}
        if key in util:
            parts.append(util[key])
        if key in safety:
            s = core_space(safety[key])
            n = s.r * s.r
            kk = min(default_k(n) if k is None else int(k), n)
            if key in util and beta > 0 and kk > 0:
                w, e = jnp.linalg.eigh(jnp.asarray(fishers.harmful[key], jnp.float32))
                e_k = e[:, ::-1][:, :kk]
                phi_u = s.coords(util[key]).reshape(-1)
                removed = e_k @ (e_k.T @ phi_u)
                parts.append(s.branch(removed.reshape(s.r, s.r), scale=-beta))
                st = {"k": kk, "eigvals": [float(x) for x in np.asarray(w[::-1])[:32]],
                      "removed_norm": float(beta * jnp.linalg.norm(removed)),
                      "utility_in_core_norm": float(jnp.linalg.norm(phi_u))}
            lr = safety[key]
            parts.append(LowRank(a=lr.a, b=lr.b, core=lr.core, scale=jnp.asarray(lr.scale, jnp.float32) * inputs.alpha))
        factors[key] = tuple(parts)
        stats[hf_module_path(key)] = st
    return make_result("agl", inputs, factors=factors, hparams=dict(beta=beta, k=k, n_harmful=fishers.n_harmful),
                       stats=stats)
