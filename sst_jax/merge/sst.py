"""SST-Merge (DESIGN §5): project the safety adapter S onto the directions that change refusal
behaviour most per unit of utility cost, then add it to the utility part.

Per module, in S's core space ΔW_S = P Σ Qᵀ (rank r, coordinates φ = vec(M), row-major):

    F_h v = λ F_b,δ v,   F_b,δ = F_b + δ·(tr F_b / r²)·I         (generalized_eigh)
    c = Vᵀ F_b,δ φ_S,    topk: φ' = V_k c_k   (F_b-orthogonal projector)
                         shrinkage: φ' = Σ λ_j/(λ_j+μ) c_j v_j
    ΔW = ΔW_U + α·ν·P mat(φ') Qᵀ,    ν = ‖Σ‖_F/‖mat(φ')‖_F if norm_matched else 1

ΔW_U = Σ wᵢΔW_Uᵢ (exact concatenated factors); the result is kept exactly as factors of rank
r_U + r. F_h: Fisher of the refusal loss on harmful prompts, F_b: of the utility loss on benign
data, both linearized at θ₀ + ΔW_U (M = 0), or at θ₀ + ΔW_U + ΔW_S with safety_at="sigma".

Fisher variants (`fisher=`):
  core      dense r²×r² Fishers in the core space (the method as designed);
  kfac      K-FAC factors F ≈ G⊗A of the full ΔW (no core space): Kronecker eigenpairs
            λ_ij = α_iγ_j, top-k pairs kept, exact low-rank result (`project_kfac`);
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
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from sst_jax import fisher as fsh
from sst_jax.errors import NumericalError
from sst_jax.linalg import generalized_eigh, project_topk, select_k, shrinkage
from sst_jax.merge.api import MergeInputs, MergeResult, concat_lowrank, make_result, register
from sst_jax.merge.fishers import as_batches, n_samples
from sst_jax.models.branches import LowRank, ModuleKey, hf_module_path

FisherKind = Literal["core", "diagonal", "kfac"]
Labels = Literal["empirical", "model"]


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


def utility_parts(inputs: MergeInputs, utility: MergeResult | None = None) -> dict[ModuleKey, LowRank]:
    """ΔW_U per module as one LowRank: Σ wᵢΔW_Uᵢ (exact factors) by default, or the given
    utility merge (any method; a dense ΔW becomes a full-rank LowRank)."""
    if utility is None:
        return {k: lr for k in inputs.keys if (lr := inputs.utility_lowrank(k)) is not None}
    return {k: concat_lowrank([(lr, 1.0) for lr in br]) for k, br in utility.to_branches().items()}


def require_safety(inputs: MergeInputs, method: str) -> dict[ModuleKey, LowRank]:
    if inputs.safety is None:
        raise ValueError(f"{method} needs a safety adapter (merge(..., safety=S))")
    return inputs.safety


def training_data(inputs: MergeInputs, name: str):
    data = inputs.data or {}
    if inputs.model is None or name not in data:
        raise ValueError(f"no precomputed fishers= given, so this method needs model= and data={{{name!r}: batches, ...}}")
    return data[name]


def sst_fishers(inputs: MergeInputs, harmful, benign, *, fisher: FisherKind = "core", two_sided: bool = False,
                safety_at: Literal["zero", "sigma"] = "zero", labels: str = "empirical", key: jax.Array | None = None,
                utility: MergeResult | None = None, chunk: int | None = None) -> SstFishers:
    """F_h (on `harmful`) and F_b (on `benign`) per module, computed by `sst_jax.fisher`.

    core/diagonal: in S's core space, at θ₀ + ΔW_U (safety_at="zero", M = 0) or at
    θ₀ + ΔW_U + ΔW_S ("sigma"); kfac: K-FAC factors (A, G) of the full ΔW at θ₀ + ΔW_U.
    labels: "empirical" (dataset responses) or "model" (targets sampled from the model; needs
    `key`). two_sided: also both Fishers in U's core space, at θ₀ + ΔW_U. utility: a utility
    merge result to use as ΔW_U instead of Σ wᵢΔW_Uᵢ (pass the same one to `sst`).
    """
    safety = require_safety(inputs, "sst_fishers")
    if fisher not in ("core", "diagonal", "kfac"):
        raise ValueError(f"fisher must be 'core', 'diagonal' or 'kfac', got {fisher!r}")
    if labels == "model" and key is None:
        raise ValueError("labels='model' needs a PRNG key (merge(..., key=...))")
    model = inputs.model
    util = utility_parts(inputs, utility)
    base = {k: (lr,) for k, lr in util.items()}
    hb, bb = as_batches(harmful, "harmful"), as_batches(benign, "benign")
    keys = (None, None) if key is None else (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1))
    if fisher == "kfac":
        fh = fsh.kfac_factors(model, base, sorted(safety), hb, labels=labels, key=keys[0], chunk=chunk, desc="K-FAC (harmful)")
        fb = fsh.kfac_factors(model, base, sorted(safety), bb, labels=labels, key=keys[1], chunk=chunk, desc="K-FAC (benign)")
        return SstFishers(kind="kfac", harmful={k: (fh.a[k], fh.g[k]) for k in fh.a},
                          benign={k: (fb.a[k], fb.g[k]) for k in fb.a}, n_harmful=fh.n_samples,
                          n_benign=fb.n_samples, labels=labels)
    spaces = {k: fsh.core_space(safety[k]) for k in sorted(safety)}
    common = dict(labels=labels, at=safety_at, chunk=chunk)
    fh = fsh.core_fisher(model, base, spaces, hb, key=keys[0], total=n_samples(hb), desc="F_h (harmful)", **common)
    fb = fsh.core_fisher(model, base, spaces, bb, key=keys[1], total=n_samples(bb), desc="F_b (benign)", **common)
    pick = (lambda d: dict(d)) if fisher == "core" else (lambda d: {k: jnp.diagonal(v) for k, v in d.items()})
    uh = ub = None
    if two_sided:
        uspaces = {k: fsh.core_space(lr) for k, lr in util.items()}
        common["at"] = "sigma"
        uh = pick(fsh.core_fisher(model, {}, uspaces, hb, key=keys[0], desc="F_h (U space)", **common).dense)
        ub = pick(fsh.core_fisher(model, {}, uspaces, bb, key=keys[1], desc="F_b (U space)", **common).dense)
    return SstFishers(kind=fisher, harmful=pick(fh.dense), benign=pick(fb.dense), n_harmful=fh.n_samples,
                      n_benign=fb.n_samples, labels=labels, utility_harmful=uh, utility_benign=ub)


def sst_statistics(inputs: MergeInputs, data, *, fisher: FisherKind = "core", two_sided: bool = False,
                   safety_at: Literal["zero", "sigma"] = "zero", labels: Labels = "empirical", chunk: int | None = None) -> SstFishers:
    """The front door's hook: `sst_fishers` on data["harmful"] and data["benign"]."""
    return sst_fishers(inputs, data["harmful"], data["benign"], fisher=fisher, two_sided=two_sided,
                       safety_at=safety_at, labels=labels, key=inputs.key, chunk=chunk)


def multi_statistics(inputs: MergeInputs, data, *, chunk: int | None = None) -> "MultiFishers":
    """The front door's hook: `sst_multi_fishers` on one dataset per expert (data["utility"])."""
    return sst_multi_fishers(inputs, data["utility"], chunk=chunk)


def default_k(n: int) -> int:
    """Default kept dimension: half the core space (⌈n/2⌉)."""
    return int(math.ceil(n / 2))


def project_core(phi: jax.Array, fa: jax.Array, fb: jax.Array, *, damping: float, projector: str = "topk",
                 k: int | None = None, lambda_threshold: float | None = None, energy: float | None = None,
                 mu: float = 1.0, kind: str = "core",
                 eig: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, dict]:
    """φ' and stats for one module: GEVP fa v = λ fb_δ v, then top-k or shrinkage on φ.

    kind "diagonal": fa, fb are diagonals (n,): λ_j = fa_j / fb_δ,j and v_j = e_j/√fb_δ,j.
    eig: the GEVP's (eigvals, eigvecs) when already solved (e.g. batched over modules).
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
        w, v = generalized_eigh(fa, fb, damping=damping) if eig is None else eig
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


def project_kfac(delta: jax.Array, harmful: tuple, benign: tuple, *, damping: float, k: int | None = None,
                 lambda_threshold: float | None = None, energy: float | None = None) -> tuple[LowRank, dict]:
    """K-FAC SST for one module: F ≈ G ⊗ A (row-major vec ΔW). GEVPs (A_h, A_b) → (α_i, a_i),
    (G_h, G_b) → (γ_j, g_j); pairs λ_ij = α_iγ_j with v_ij = g_j a_iᵀ and coefficients
    c_ij = g_jᵀ G_b,δ ΔW A_b,δ a_i. Keeping the top-k pairs gives the exact low-rank
    ΔW' = Σ_kept c_ij g_j a_iᵀ, returned as LowRank(a=[a_i]ᵀ, b=[g_j], core=c masked)."""
    (a_h, g_h), (a_b, g_b) = harmful, benign
    al, av = generalized_eigh(a_h, a_b, damping=damping)
    gl, gv = generalized_eigh(g_h, g_b, damping=damping)
    a_bd = a_b + damping * (jnp.trace(a_b) / a_b.shape[0]) * jnp.eye(a_b.shape[0])
    g_bd = g_b + damping * (jnp.trace(g_b) / g_b.shape[0]) * jnp.eye(g_b.shape[0])
    coef = gv.T @ g_bd @ delta @ a_bd @ av  # (n_out, n_in): c[j, i]
    lam = gl[:, None] * al[None, :]
    order = jnp.argsort(-lam.reshape(-1))
    lam_sorted = lam.reshape(-1)[order]
    rules = {"k": k, "threshold": lambda_threshold, "energy": energy}
    if all(x is None for x in rules.values()):
        rules["k"] = default_k(int(min(delta.shape)) ** 2)
    kk = int(select_k(lam_sorted, coords=coef.reshape(-1)[order] if energy is not None else None, **rules))
    mask = jnp.zeros(lam.size, bool).at[order[:kk]].set(True).reshape(lam.shape)
    rows = np.flatnonzero(np.asarray(mask.any(axis=1)))  # g_j used
    cols = np.flatnonzero(np.asarray(mask.any(axis=0)))  # a_i used
    core = jnp.where(mask, coef, 0.0)[rows][:, cols]
    lr = LowRank(a=av[:, cols].T, b=gv[:, rows], core=core, scale=1.0)
    return lr, {"k": kk, "dim": int(lam.size), "eigvals": [float(x) for x in np.asarray(lam_sorted)[:32]]}


def _fisher_for(fishers: SstFishers, key: ModuleKey, which: str) -> tuple[jax.Array, jax.Array]:
    def arr(x):
        return tuple(jnp.asarray(y, jnp.float32) for y in x) if isinstance(x, tuple) else jnp.asarray(x, jnp.float32)

    try:
        if which == "safety":
            return arr(fishers.harmful[key]), arr(fishers.benign[key])
        return arr(fishers.utility_harmful[key]), arr(fishers.utility_benign[key])
    except (KeyError, TypeError) as e:
        raise ValueError(f"fishers has no {which}-space Fisher for {hf_module_path(key)} "
                         "(were they computed for other adapters, or without two_sided?)") from e


@register("sst", exact=True, data_aware=True, needs=("safety", "harmful", "benign"), statistics=sst_statistics,
          statistics_params=("fisher", "two_sided", "safety_at", "labels"))
def sst(inputs: MergeInputs, *, fishers: SstFishers | None = None, fisher: FisherKind = "core",
        projector: Literal["topk", "shrinkage"] = "topk", k: int | None = None,
        lambda_threshold: float | None = None, energy: float | None = None, mu: float = 1.0,
        damping: float = 0.1, norm_matched: bool = False, two_sided: bool = False,
        k_utility: int | None = None, safety_at: Literal["zero", "sigma"] = "zero", labels: Labels = "empirical",
        utility: MergeResult | None = None, chunk: int | None = None) -> MergeResult:
    """SST-Merge. Defaults: fisher "core", projector "topk" keeping k = ⌈r²/2⌉ (or the count
    from `lambda_threshold` / `energy`, exactly one rule), mu 1.0 (shrinkage), damping δ = 0.1,
    norm_matched False, two_sided False (k_utility default ⌈r_U²/2⌉), safety_at "zero" (Fishers
    at θ₀ + ΔW_U), labels "empirical" ("model" samples targets, keyed by merge(key=...)),
    chunk samples per vmapped gradient (default `sst_jax.fisher.default_chunk()`: 4 on CPU, 16
    on GPU/TPU). α is `merge(alpha=...)`. fisher="kfac" keeps the top k (default
    ⌈min(out,in)²/2⌉) Kronecker eigenpairs of the full ΔW (see `project_kfac`).
    utility: the utility part from any other merge (e.g. merge("ties", us)); default None is
    Σ wᵢΔW_Uᵢ. The Fishers must then be computed with the same `utility`."""
    safety = require_safety(inputs, "sst")
    if fishers is None:
        fishers = sst_fishers(inputs, training_data(inputs, "harmful"), training_data(inputs, "benign"), fisher=fisher,
                              two_sided=two_sided, safety_at=safety_at, labels=labels, key=inputs.key,
                              utility=utility, chunk=chunk)
    kind = fishers.kind
    util = utility_parts(inputs, utility)
    # Safety-space GEVPs of all modules at once (one batched solve per core-space size).
    core_keys = [key for key in inputs.keys if key in safety] if kind == "core" else []
    eigs = dict(zip(core_keys, _batched_eigh([_fisher_for(fishers, key, "safety") for key in core_keys], damping)))
    factors, stats = {}, {}
    for key in inputs.keys:
        parts: list[LowRank] = []
        mstats: dict[str, Any] = {}
        if key in util:
            if two_sided:
                if kind == "kfac":
                    raise ValueError("two_sided SST works in core spaces; use fisher='core' or 'diagonal'")
                us = fsh.core_space(util[key])
                fh_u, fb_u = _fisher_for(fishers, key, "utility")
                # Reversed problem: utility curvature per unit of safety curvature.
                phi_u, st = project_core(us.phi, fb_u, fh_u, damping=damping, k=k_utility, kind=kind)
                parts.append(us.branch(phi_u.reshape(us.r, us.r)))
                mstats["utility"] = st
            else:
                parts.append(util[key])
        if key in safety and kind == "kfac":
            fh, fb = _fisher_for(fishers, key, "safety")
            d_s = safety[key].delta()
            patch, st = project_kfac(d_s, fh, fb, damping=damping, k=k, lambda_threshold=lambda_threshold,
                                     energy=energy)
            norm_s, norm_p = float(jnp.linalg.norm(d_s)), float(jnp.linalg.norm(patch.delta()))
            nu = (norm_s / norm_p if norm_p > 0 else 0.0) if norm_matched else 1.0
            parts.append(dataclasses.replace(patch, scale=inputs.alpha * nu))
            st.update(patch_norm_ratio=norm_p / norm_s if norm_s > 0 else 0.0, norm_scale=nu)
            mstats["safety"] = st
        elif key in safety:
            s = fsh.core_space(safety[key])
            fh, fb = _fisher_for(fishers, key, "safety")
            phi, st = project_core(s.phi, fh, fb, damping=damping, projector=projector, k=k,
                                   lambda_threshold=lambda_threshold, energy=energy, mu=mu, kind=kind,
                                   eig=eigs.get(key))
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
              safety_at=safety_at, utility_method=None if utility is None else utility.method, n_harmful=fishers.n_harmful, n_benign=fishers.n_benign, labels=fishers.labels)
    return make_result("sst", inputs, factors=factors, hparams=hp, stats=stats)


# ----------------------------------------------------------------------------- N experts


@dataclasses.dataclass(frozen=True)
class MultiFishers:
    """fishers[j][(layer, module, i)]: Fisher of dataset j in expert i's core space (r_i², r_i²)."""

    fishers: tuple[dict, ...]
    n_samples: tuple[int, ...]


def sst_multi_fishers(inputs: MergeInputs, datasets, *, chunk: int | None = None) -> MultiFishers:
    """One pass per expert dataset, all experts' core spaces differentiated at once, at
    θ₀ + Σ wⱼΔWⱼ."""
    if len(datasets) != len(inputs.utility):
        raise ValueError(f"sst_multi needs one dataset per expert: {len(datasets)} datasets, "
                         f"{len(inputs.utility)} experts")
    spaces, at = {}, {}
    for i, (adapter, w) in enumerate(zip(inputs.utility, inputs.weights)):
        for key, lr in adapter.items():
            spaces[key + (i,)] = s = fsh.core_space(lr)
            at[key + (i,)] = w * jnp.diag(s.sigma)
    out, ns = [], []
    for j, data in enumerate(datasets):
        batches = as_batches(data, f"expert {inputs.names[j]}")
        f = fsh.core_fisher(inputs.model, {}, spaces, batches, at=at, chunk=chunk, total=n_samples(batches),
                            desc=f"F_{j} ({inputs.names[j]})")
        out.append(dict(f.dense))
        ns.append(f.n_samples)
    return MultiFishers(fishers=tuple(out), n_samples=tuple(ns))


@register("sst_multi", exact=True, data_aware=True, needs=("utility",), statistics=multi_statistics)
def sst_multi(inputs: MergeInputs, *, fishers: MultiFishers | None = None, k: int | None = None,
              lambda_threshold: float | None = None, energy: float | None = None, damping: float = 0.1,
              chunk: int | None = None) -> MergeResult:
    """Σᵢ wᵢ P_i mat(φᵢ') Q_iᵀ, φᵢ' = top-k of F_i v = λ (Σ_{j≠i} F_j) v. Defaults: k = ⌈r_i²/2⌉,
    damping 0.1, chunk = `default_chunk()` (4 on CPU, 16 on GPU/TPU). A safety adapter is not used
    (pass it as one more expert). Data: data={"experts": [batches of expert 0, ...]} or
    fishers=sst_multi_fishers(...)."""
    if inputs.safety is not None:
        raise ValueError("sst_multi merges experts without a safety adapter; pass S as one more expert")
    if len(inputs.utility) < 2:
        raise ValueError("sst_multi needs at least two experts")
    if fishers is None:
        fishers = sst_multi_fishers(inputs, training_data(inputs, "experts"), chunk=chunk)
    problems = []  # (key, expert, core space, F_i, Σ_{j≠i} F_j)
    for key in inputs.keys:
        for i, adapter in enumerate(inputs.utility):
            if key in adapter:
                tkey = key + (i,)
                own = jnp.asarray(fishers.fishers[i][tkey], jnp.float32)
                others = sum(jnp.asarray(fishers.fishers[j][tkey], jnp.float32)
                             for j in range(len(inputs.utility)) if j != i)
                problems.append((key, i, fsh.core_space(adapter[key]), own, others))
    eigs = _batched_eigh([(p[3], p[4]) for p in problems], damping)
    factors = {key: [] for key in inputs.keys}
    stats = {hf_module_path(key): {"experts": {}} for key in inputs.keys}
    for (key, i, s, own, others), eig in zip(problems, eigs):
        phi, st = project_core(s.phi, own, others, damping=damping, k=k, lambda_threshold=lambda_threshold,
                               energy=energy, eig=eig)
        factors[key].append(s.branch(phi.reshape(s.r, s.r), scale=inputs.weights[i]))
        stats[hf_module_path(key)]["experts"][inputs.names[i]] = st
    factors = {key: tuple(parts) for key, parts in factors.items()}
    hp = dict(k=k, lambda_threshold=lambda_threshold, energy=energy, damping=damping,
              n_samples=list(fishers.n_samples))
    return make_result("sst_multi", inputs, factors=factors, hparams=hp, stats=stats)


def _batched_eigh(problems: list[tuple[jax.Array, jax.Array]], damping: float) -> list[tuple[jax.Array, jax.Array]]:
    """generalized_eigh(fa, fb) of every problem, one batched call per matrix size. If a batch
    fails its checks, the problems are solved one by one so the error is the unbatched one."""
    out: list = [None] * len(problems)
    by_size: dict[int, list[int]] = {}
    for idx, (fa, _) in enumerate(problems):
        by_size.setdefault(int(fa.shape[-1]), []).append(idx)
    for idxs in by_size.values():
        fa = jnp.stack([problems[i][0] for i in idxs])
        fb = jnp.stack([problems[i][1] for i in idxs])
        try:
            w, v = generalized_eigh(fa, fb, damping=damping)
        except NumericalError:
            for i in idxs:
                generalized_eigh(*problems[i], damping=damping)
            raise
        for j, i in enumerate(idxs):
            out[i] = (w[j], v[j])
    return out


__all__ = ["MultiFishers", "SstFishers", "default_k", "project_core", "project_kfac", "sst", "sst_fishers", "sst_multi",
           "sst_multi_fishers", "sst_statistics", "multi_statistics"]
