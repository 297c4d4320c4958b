"""SST-Merge (DESIGN §5): project the safety adapter S onto the directions that change refusal
behaviour most per unit of utility cost, then add it to the utility part.

Per module, in S's core space ΔW_S = P Σ Qᵀ (rank r, coordinates φ = vec(M), row-major):

    F_h v = λ F_b,δ v,   F_b,δ = F_b + δ·(tr F_b / r²)·I         (generalized_eigh)
    c = Vᵀ F_b,δ φ_S,    topk: φ' = V_k c_k   (F_b-orthogonal projector)
                         shrinkage: φ' = Σ λ_j/(λ_j+μ) c_j v_j
    ΔW = ΔW_U + α·ν·P mat(φ') Qᵀ,    ν = ‖Σ‖_F/‖mat(φ')‖_F if norm_matched else 1

ΔW_U = Σ wᵢΔW_Uᵢ (exact concatenated factors); the result is kept exactly as factors of rank
r_U + r. F_h: Fisher of the refusal loss on harmful prompts, F_b: of the utility loss on benign
data, both linearized at θ₀ + ΔW_U (M = 0) unless `safety_at` moves the point along S.

Fisher variants (`fisher=`):
  core      dense r²×r² Fishers in the core space (the method as designed);
  diagonal  only their diagonals: the GEVP degenerates to keeping the k core coordinates with
            the largest ratio F_h/F_b (the original's coordinate-wise ratio mask, an ablation;
            here in core coordinates rather than raw A/B entries).
two_sided: also project U in its own core space with the reversed problem F_b v = λ F_h v,
keeping U's components with the most utility per unit of safety cost (top `k_utility`).

The Fishers are computed by `sst_fishers(...)` (cacheable) and passed as `fishers=`; without
them the method computes them from `model` and `data={"harmful": ..., "benign": ...}`.

`sst_multi`: N experts, no safety adapter. Expert i is projected in its own core space against
the others' Fisher: F_i v = λ (Σ_{j≠i} F_j) v, all Fishers linearized at θ₀ + Σ wⱼΔWⱼ.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sst_jax.errors import NumericalError
from sst_jax.linalg import generalized_eigh, project_topk, select_k, shrinkage
from sst_jax.merge.api import MergeInputs, MergeResult, concat_lowrank, make_result, register
from sst_jax.merge.fishers import CoreSpace, core_fishers, core_space
from sst_jax.models.branches import LowRank, ModuleKey, hf_module_path

FisherKind = Literal["core", "diagonal"]


@dataclasses.dataclass(frozen=True)
class SstFishers:
    """Cacheable Fishers of one (model, U, S, datasets): per module, in S's core space.

    harmful/benign: {key: (r², r²)} for kind "core", {key: (r²,)} for "diagonal".
    utility_harmful/utility_benign: the same in U's core space (two-sided only).
    """

    kind: str
    harmful: dict
    benign: dict
    n_harmful: int
    n_benign: int
    labels: str = "empirical"
    utility_harmful: dict | None = None
    utility_benign: dict | None = None


def _utility_parts(inputs: MergeInputs) -> dict[ModuleKey, LowRank]:
    return {k: lr for k in inputs.keys if (lr := inputs.utility_lowrank(k)) is not None}


def _require_safety(inputs: MergeInputs, method: str) -> dict[ModuleKey, LowRank]:
    if inputs.safety is None:
        raise ValueError(f"{method} needs a safety adapter (merge(..., safety=S))")
    return inputs.safety


def _data(inputs: MergeInputs, name: str):
    data = inputs.data or {}
    if inputs.model is None or name not in data:
        raise ValueError(f"no precomputed fishers= given, so this method needs model= and data={{{name!r}: batches, ...}}")
    return data[name]


def sst_fishers(inputs: MergeInputs, harmful, benign, *, fisher: FisherKind = "core", two_sided: bool = False,
                safety_at: float = 0.0, chunk: int = 8) -> SstFishers:
    """F_h (on `harmful`) and F_b (on `benign`) in S's core space at θ₀ + ΔW_U + safety_at·ΔW_S;
    with two_sided, also both in U's core space (at θ₀ + ΔW_U)."""
    safety = _require_safety(inputs, "sst_fishers")
    model = inputs.model
    stat = "dense" if fisher == "core" else "diag"
    if fisher not in ("core", "diagonal"):
        raise ValueError(f"fisher must be 'core' or 'diagonal', got {fisher!r}")
    util = _utility_parts(inputs)
    base = {k: (lr,) for k, lr in util.items()}
    spaces = {k: core_space(safety[k]) for k in sorted(safety)}
    at = {k: safety_at * jnp.diag(s.sigma) for k, s in spaces.items()}
    fh, nh = core_fishers(model, spaces, at, base, harmful, stat=stat, chunk=chunk, desc="F_h (harmful)")
    fb, nb = core_fishers(model, spaces, at, base, benign, stat=stat, chunk=chunk, desc="F_b (benign)")
    uh = ub = None
    if two_sided:
        uspaces = {k: core_space(lr) for k, lr in util.items()}
        uat = {k: jnp.diag(s.sigma) for k, s in uspaces.items()}
        uh, _ = core_fishers(model, uspaces, uat, {}, harmful, stat=stat, chunk=chunk, desc="F_h (U space)")
        ub, _ = core_fishers(model, uspaces, uat, {}, benign, stat=stat, chunk=chunk, desc="F_b (U space)")
    return SstFishers(kind=fisher, harmful=fh, benign=fb, n_harmful=nh, n_benign=nb,
                      utility_harmful=uh, utility_benign=ub)


def default_k(n: int) -> int:
    """Default kept dimension: half the core space (⌈n/2⌉)."""
    return int(math.ceil(n / 2))


def project_core(phi: jax.Array, fa: jax.Array, fb: jax.Array, *, damping: float, projector: str = "topk",
                 k: int | None = None, lambda_threshold: float | None = None, energy: float | None = None,
                 mu: float = 1.0, kind: str = "core") -> tuple[jax.Array, dict]:
    """φ' and stats for one module: GEVP fa v = λ fb_δ v, then top-k or shrinkage on φ.

    kind "diagonal": fa, fb are diagonals (n,): λ_j = fa_j / fb_δ,j and v_j = e_j/√fb_δ,j.
    """
    n = int(phi.shape[0])
    if kind == "diagonal":
        fb_d = fb + damping * jnp.mean(fb)
        if not bool(jnp.all(fb_d > 0)):
            raise NumericalError("diagonal F_b has non-positive entries after damping; increase damping")
        lam = fa / fb_d
        order = jnp.argsort(-lam)
        w = lam[order]
        v = jnp.zeros((n, n), jnp.float32).at[order, jnp.arange(n)].set(1.0 / jnp.sqrt(fb_d[order]))
        fb_m = jnp.diag(fb_d)
    else:
        w, v = generalized_eigh(fa, fb, damping=damping)
        fb_m = fb + damping * (jnp.trace(fb) / n) * jnp.eye(n, dtype=fb.dtype)
    c = v.T @ (fb_m @ phi)
    if projector == "topk":
        rules = {"k": k, "threshold": lambda_threshold, "energy": energy}
        if all(x is None for x in rules.values()):
            rules["k"] = default_k(n)
        kk = select_k(w, coords=c if energy is not None else None, **rules)
        out = project_topk(v, fb_m, phi, kk)
        kept = int(kk)
    elif projector == "shrinkage":
        if mu <= 0:
            raise ValueError(f"shrinkage needs mu > 0, got {mu}")
        out = shrinkage(w, v, fb_m, phi, mu)
        kept = n
    else:
        raise ValueError(f"projector must be 'topk' or 'shrinkage', got {projector!r}")
    stats = {"k": kept, "dim": n, "eigvals": [float(x) for x in np.asarray(w)[: min(n, 32)]],
             "coeffs": [float(x) for x in np.asarray(c)[: min(n, 32)]]}
    return out, stats


def _fisher_for(fishers: SstFishers, key: ModuleKey, which: str) -> tuple[jax.Array, jax.Array]:
    try:
        if which == "safety":
            return jnp.asarray(fishers.harmful[key]), jnp.asarray(fishers.benign[key])
        return jnp.asarray(fishers.utility_harmful[key]), jnp.asarray(fishers.utility_benign[key])
    except (KeyError, TypeError) as e:
        raise ValueError(f"fishers has no {which}-space Fisher for {hf_module_path(key)} "
                         "(were they computed for other adapters, or without two_sided?)") from e


@register("sst", exact=True, data_aware=True)
def sst(inputs: MergeInputs, *, fishers: SstFishers | None = None, fisher: FisherKind = "core",
        projector: Literal["topk", "shrinkage"] = "topk", k: int | None = None,
        lambda_threshold: float | None = None, energy: float | None = None, mu: float = 1.0,
        damping: float = 0.1, norm_matched: bool = False, two_sided: bool = False,
        k_utility: int | None = None, safety_at: float = 0.0, chunk: int = 8) -> MergeResult:
    """SST-Merge. Defaults: fisher "core", projector "topk" keeping k = ⌈r²/2⌉ (or the count
    from `lambda_threshold` / `energy`, exactly one rule), mu 1.0 (shrinkage), damping δ = 0.1,
    norm_matched False, two_sided False (k_utility default ⌈r_U²/2⌉), safety_at 0.0 (Fishers
    at θ₀ + ΔW_U), chunk 8 samples per vmapped gradient. α is `merge(alpha=...)`."""
    safety = _require_safety(inputs, "sst")
    if fishers is None:
        fishers = sst_fishers(inputs, _data(inputs, "harmful"), _data(inputs, "benign"), fisher=fisher,
                              two_sided=two_sided, safety_at=safety_at, chunk=chunk)
    kind = fishers.kind
    util = _utility_parts(inputs)
    factors, stats = {}, {}
    for key in inputs.keys:
        parts: list[LowRank] = []
        mstats: dict[str, Any] = {}
        if key in util:
            if two_sided:
                us = core_space(util[key])
                fh_u, fb_u = _fisher_for(fishers, key, "utility")
                # Reversed problem: utility curvature per unit of safety curvature.
                phi_u, st = project_core(us.phi, fb_u, fh_u, damping=damping, k=k_utility, kind=kind)
                parts.append(us.branch(phi_u.reshape(us.r, us.r)))
                mstats["utility"] = st
            else:
                parts.append(util[key])
        if key in safety:
            s = core_space(safety[key])
            fh, fb = _fisher_for(fishers, key, "safety")
            phi, st = project_core(s.phi, fh, fb, damping=damping, projector=projector, k=k,
                                   lambda_threshold=lambda_threshold, energy=energy, mu=mu, kind=kind)
            m = phi.reshape(s.r, s.r)
            norm_s, norm_p = float(jnp.linalg.norm(s.sigma)), float(jnp.linalg.norm(m))
            nu = (norm_s / norm_p if norm_p > 0 else 0.0) if norm_matched else 1.0
            parts.append(s.branch(m, scale=inputs.alpha * nu))
            st.update(patch_norm_ratio=norm_p / norm_s if norm_s > 0 else 0.0, norm_scale=nu)
            mstats["safety"] = st
        factors[key] = tuple(parts)
        stats[hf_module_path(key)] = mstats
    hp = dict(fisher=kind, projector=projector, k=k, lambda_threshold=lambda_threshold, energy=energy, mu=mu,
              damping=damping, norm_matched=norm_matched, two_sided=two_sided, k_utility=k_utility,
              safety_at=safety_at, n_harmful=fishers.n_harmful, n_benign=fishers.n_benign, labels=fishers.labels)
    return make_result("sst", inputs, factors=factors, hparams=hp, stats=stats)


# ----------------------------------------------------------------------------- N experts


@dataclasses.dataclass(frozen=True)
class MultiFishers:
    """fishers[j][(layer, module, i)]: Fisher of dataset j in expert i's core space (r_i², r_i²)."""

    fishers: tuple[dict, ...]
    n_samples: tuple[int, ...]


def sst_multi_fishers(inputs: MergeInputs, datasets, *, chunk: int = 8) -> MultiFishers:
    """One pass per expert dataset, all experts' core spaces differentiated at once, at
    θ₀ + Σ wⱼΔWⱼ."""
    if len(datasets) != len(inputs.utility):
        raise ValueError(f"sst_multi needs one dataset per expert: {len(datasets)} datasets, "
                         f"{len(inputs.utility)} experts")
    spaces, at = {}, {}
    for i, (adapter, w) in enumerate(zip(inputs.utility, inputs.weights)):
        for key, lr in adapter.items():
            spaces[key + (i,)] = s = core_space(lr)
            at[key + (i,)] = w * jnp.diag(s.sigma)
    out, ns = [], []
    for j, data in enumerate(datasets):
        f, n = core_fishers(inputs.model, spaces, at, {}, data, chunk=chunk, desc=f"F_{j} ({inputs.names[j]})")
        out.append(f)
        ns.append(n)
    return MultiFishers(fishers=tuple(out), n_samples=tuple(ns))


@register("sst_multi", exact=True, data_aware=True)
def sst_multi(inputs: MergeInputs, *, fishers: MultiFishers | None = None, k: int | None = None,
              lambda_threshold: float | None = None, energy: float | None = None, damping: float = 0.1,
              chunk: int = 8) -> MergeResult:
    """Σᵢ wᵢ P_i mat(φᵢ') Q_iᵀ, φᵢ' = top-k of F_i v = λ (Σ_{j≠i} F_j) v. Defaults: k = ⌈r_i²/2⌉,
    damping 0.1, chunk 8. A safety adapter is not used (pass it as one more expert). Data:
    data={"experts": [batches of expert 0, ...]} or fishers=sst_multi_fishers(...)."""
    if inputs.safety is not None:
        raise ValueError("sst_multi merges experts without a safety adapter; pass S as one more expert")
    if len(inputs.utility) < 2:
        raise ValueError("sst_multi needs at least two experts")
    if fishers is None:
        fishers = sst_multi_fishers(inputs, _data(inputs, "experts"), chunk=chunk)
    factors, stats = {}, {}
    for key in inputs.keys:
        parts, mstats = [], {}
        for i, (adapter, w) in enumerate(zip(inputs.utility, inputs.weights)):
            if key not in adapter:
                continue
            s = core_space(adapter[key])
            tkey = key + (i,)
            own = jnp.asarray(fishers.fishers[i][tkey])
            others = sum(jnp.asarray(fishers.fishers[j][tkey]) for j in range(len(inputs.utility)) if j != i)
            phi, st = project_core(s.phi, own, others, damping=damping, k=k, lambda_threshold=lambda_threshold,
                                   energy=energy)
            parts.append(s.branch(phi.reshape(s.r, s.r), scale=w))
            mstats[inputs.names[i]] = st
        factors[key] = tuple(parts)
        stats[hf_module_path(key)] = {"experts": mstats}
    hp = dict(k=k, lambda_threshold=lambda_threshold, energy=energy, damping=damping,
              n_samples=list(fishers.n_samples))
    return make_result("sst_multi", inputs, factors=factors, hparams=hp, stats=stats)


def utility_part(inputs: MergeInputs) -> dict[ModuleKey, LowRank]:
    """Σ wᵢΔW_Uᵢ per module as exact factors (what α = 0 returns)."""
    return _utility_parts(inputs)


__all__ = ["SstFishers", "MultiFishers", "sst", "sst_fishers", "sst_multi", "sst_multi_fishers", "project_core",
           "core_space", "CoreSpace", "concat_lowrank", "default_k"]
