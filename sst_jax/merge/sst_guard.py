"""SST-Guard (DESIGN §5): shield the safety adapter S from the task updates, input side.

Per target module with input x, second moments (the K-FAC A factors of `kfac_factors`, over
the positions that predict response tokens):

    K_h = E[x xᵀ] on harmful prompts with refusal targets, at θ₀ + ΔW_S  (behaviour to keep)
    K_b = E[x xᵀ] on benign prompts / utility data,        at θ₀ + ΔW_U
    K_b,δ = K_b + δ·(tr K_b / n)·I                          (damping as for F_b)

    K_h u = μ K_b,δ u,   Uᵀ K_b,δ U = I,   μ₁ ≥ μ₂ ≥ …      (`generalized_eigh`)

U is complete, so K_h = K_b,δ U M Uᵀ K_b,δ (M = diag μ), and a task update ΔT = s·B·A changes the
outputs on harmful inputs by E‖ΔT x_h‖² = tr(ΔT K_h ΔTᵀ) = Σᵢ μᵢ ‖ΔT K_b,δ uᵢ‖². The guard is

    ΔT' = ΔT (I − K_b,δ U_k U_kᵀ),   i.e.  A ← A (I − K_b,δ U_k U_kᵀ)

It solves  min_D tr(D K_b,δ Dᵀ)  s.t. (ΔT + D) K_b,δ uᵢ = 0, i ≤ k  (D = ΔT' − ΔT): per row d of
D the Lagrange condition gives d ∈ span(U_k), and U_kᵀK_b,δU_k = I fixes it. Consequences,
all exact: ΔT' K_b,δ uᵢ = 0 for i ≤ k and = ΔT K_b,δ uᵢ for i > k; the harmful-input energy
loses exactly its top-k terms, tr(ΔT' K_h ΔT'ᵀ) = Σ_{i>k} μᵢ‖ΔT K_b,δ uᵢ‖²; the benign cost is
tr(D K_b Dᵀ) ≤ tr(D K_b,δ Dᵀ) = Σ_{i≤k} ‖ΔT K_b,δ uᵢ‖² (reported per module as
"benign_bound"). The rank of every factor is unchanged (the result stays exact factors), and
the map is linear, so guarding Σ wⱼΔTⱼ guards every expert j = 1…N with the same projector. A
dense utility ΔW (TIES, DARE, `utility=`) is guarded the same way: ΔW' = ΔW (I − K_b,δ U_k U_kᵀ).
Then the safety part is added: α·ΔW_S (`safety_part="plain"`) or SST's projected S
(`safety_part="sst"`, computed by the `sst` method itself, its Fishers in `GuardMoments.sst`).

Choosing k (exactly one rule): `k` (default min(64, in/4): §11's prototype found k = 64 good
for r = 8 adapters at d = 576, i.e. ≈ in/9; the in/4 cap keeps narrow modules from losing most
of their input space, since k = in annihilates the update), `lambda_threshold` (μᵢ > t), or
`energy` (smallest k removing that share of the update's harmful-input energy μᵢ‖ΔT K_b,δ uᵢ‖²).

Sample-matrix form (wide inputs, e.g. down_proj at 7B: in = 14336). With X_h (n_h × in),
X_b (n_b × in) the token inputs scaled so K = XᵀX, and c = δ·‖X_b‖²_F / in, every direction
with μ > 0 lies in the row space of [X_h; X_b]: with Q (in × m, m ≤ n_h + n_b) an orthonormal
basis of it, K_b,δ maps span(Q) to itself and K_h vanishes outside it, so the GEVP is the
m × m problem (QᵀK_hQ) ũ = μ (QᵀK_bQ + cI) ũ, u = Qũ, K_b,δ u = Q(QᵀK_bQ + cI)ũ. Memory
O((n_h + n_b)·in) per module instead of O(in²) (dense K_h and K_b: 2·in² floats, 1.6 GB in
float32 at in = 14336; the projector itself is two in × k matrices). `form="auto"` uses it
where in > n_h + n_b tokens.

sequential=True (DESIGN §11: K_h at θ₀ + ΔW_S under-predicts, since upstream edits shift
downstream inputs): K_h of layer ℓ is measured, bottom-up, at the partly guarded merge —
layers < ℓ carry their final guarded utility + safety part, layers ≥ ℓ carry ΔW_S — one
harmful pass per layer. Within a layer all modules share that point (o_proj and the MLP see
S's attention of the same layer, not the merged one). K_b stays at θ₀ + ΔW_U.

Statistics: `guard_moments(inputs, harmful, benign, ...)` returns a cacheable `GuardMoments`,
passed as `fishers=` (the registry's statistics hook is `guard_statistics`). Dense K come from
`input_moments` (one forward per batch with captured inputs: the A factor of
`sst_jax.fisher.kfac_factors` without its per-sample backward for the G factor, which the guard
does not use; ≈ 3× faster), sample matrices from `input_samples` (the same forward, rows kept). Directions with μ = 0 (k > rank K_h) are arbitrary within
K_h's null space: past the rank, k only removes benign-costly directions.

Not done: the output side (K-FAC G factors, the two-sided Kronecker guard), and the
core-space curvature form δ_j' = (I − V_k V_kᵀ F_b) δ_j.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sst_jax.linalg import default_rcond, generalized_eigh, select_k
from sst_jax.merge.api import MergeInputs, MergeResult, make_result, register
from sst_jax.merge.fishers import as_batches, n_samples
from sst_jax.merge.sst import FisherKind, SstFishers, require_safety, sst, sst_fishers, training_data, utility_parts
from sst_jax.models import forward
from sst_jax.models.branches import LowRank, ModuleKey, hf_module_path
from sst_jax.models.sharding import model_mesh, pad_batch, put_batch, to_host

Form = Literal["auto", "dense", "samples"]
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GuardMoments:
    """Cacheable statistics of one (model, U, S, datasets): input second moments per module,
    harmful[key], benign[key] = K (in, in), or for keys in `samples` sample matrices
    X (n_tokens, in) with K = XᵀX; plus SST's Fishers when the safety part is SST's."""

    harmful: dict
    benign: dict
    samples: tuple = ()
    n_harmful: int = 0
    n_benign: int = 0
    sst: SstFishers | None = None  # SST's Fishers, for safety_part="sst"

    def pair(self, key: ModuleKey) -> tuple[str, jax.Array, jax.Array]:
        if key not in self.harmful or key not in self.benign:
            raise ValueError(f"moments have no K_h/K_b for {hf_module_path(key)} (computed for other adapters?)")
        return ("samples" if key in self.samples else "dense"), self.harmful[key], self.benign[key]


# ----------------------------------------------------------------------------- the guard algebra


@dataclasses.dataclass(frozen=True)
class Guard:
    """The GEVP of one module: eigvals μ (m,) descending, u (in, m) with Uᵀ K_b,δ U = I and
    ku = K_b,δ U (in, m). m = in (dense form) or the row-space dimension (sample form)."""

    eigvals: jax.Array
    u: jax.Array
    ku: jax.Array


def dense_guard(kh: jax.Array, kb: jax.Array, *, damping: float = 0.1) -> Guard:
    """K_h u = μ K_b,δ u with K_b,δ = K_b + δ·(tr K_b/n)·I, from dense second moments."""
    w, u = generalized_eigh(kh, kb, damping=damping, name="K_b")
    n = kb.shape[-1]
    kbd = kb + damping * (jnp.trace(kb) / n) * jnp.eye(n, dtype=kb.dtype)
    return Guard(eigvals=w, u=u, ku=jnp.matmul(kbd, u, precision=_HI))


def sample_guard(xh: jax.Array, xb: jax.Array, *, damping: float = 0.1) -> Guard:
    """The same GEVP from sample matrices (K = XᵀX), solved in the row space of [X_h; X_b]
    (see the module docstring): memory O((n_h + n_b)·in), never an in × in matrix."""
    in_dim = xh.shape[-1]
    c = damping * jnp.sum(jnp.square(xb)) / in_dim
    q, _ = jnp.linalg.qr(jnp.concatenate([xh, xb], axis=0).T)  # (in, m), orthonormal columns
    with jax.default_matmul_precision("highest"):
        xhq, xbq = xh @ q, xb @ q
        kh_t, kb_t = xhq.T @ xhq, xbq.T @ xbq + c * jnp.eye(q.shape[1], dtype=q.dtype)
        # c is folded in above (relative to tr K_b / in, not / m), so the damped floor is the in-dim one.
        rcond = default_rcond(q.shape[1], kb_t.dtype, damping, damped_dim=in_dim)
        w, ut = generalized_eigh(kh_t, kb_t, damping=0.0, rcond=rcond, name=f"K_b (row space, damping {damping} folded in)")
        return Guard(eigvals=w, u=q @ ut, ku=q @ (kb_t @ ut))


def guard_of(form: str, kh: jax.Array, kb: jax.Array, damping: float) -> Guard:
    return sample_guard(kh, kb, damping=damping) if form == "samples" else dense_guard(kh, kb, damping=damping)


def default_k(in_dim: int) -> int:
    """min(64, in/4): §11's k = 64 at d = 576, capped for narrow modules."""
    return int(min(64, max(1, in_dim // 4)))


def guard_matrix(mat: jax.Array, guard: Guard, k: int) -> jax.Array:
    """mat (I − K_b,δ U_k U_kᵀ) for any mat (·, in): a LoRA A or a dense ΔW."""
    with jax.default_matmul_precision("highest"):
        mat = jnp.asarray(mat, guard.u.dtype)
        return mat - (mat @ guard.ku[:, :k]) @ guard.u[:, :k].T


def guard_lowrank(lr: LowRank, guard: Guard, k: int) -> LowRank:
    """A ← A (I − K_b,δ U_k U_kᵀ); B, core, scale untouched (rank unchanged, exact)."""
    return dataclasses.replace(lr, a=guard_matrix(lr.a, guard, k))


def output_coords(parts: list, guard: Guard) -> jax.Array:
    """‖ΔT K_b,δ uᵢ‖ for every i, ΔT = Σ parts (LowRank or dense), from the factors."""
    y = 0.0
    with jax.default_matmul_precision("highest"):
        for p in parts:
            if isinstance(p, LowRank):
                bu, a = p.factors()
                y = y + bu.astype(guard.ku.dtype) @ (a.astype(guard.ku.dtype) @ guard.ku)
            else:
                y = y + jnp.asarray(p, guard.ku.dtype) @ guard.ku
    return jnp.sqrt(jnp.sum(jnp.square(y), axis=0))


def choose_k(guard: Guard, coords: jax.Array, in_dim: int, *, k: int | None, lambda_threshold: float | None,
             energy: float | None) -> int:
    rules = {"k": k, "threshold": lambda_threshold, "energy": energy}
    if all(v is None for v in rules.values()):
        rules["k"] = default_k(in_dim)
    return int(select_k(guard.eigvals, coords=coords if energy is not None else None, **rules))


# ----------------------------------------------------------------------------- second moments


def _positions(batch: Mapping[str, Any]) -> np.ndarray:
    """The positions `kfac_factors` averages over: those that predict a response token."""
    lm = np.asarray(batch["loss_mask"])
    return np.concatenate([lm[:, 1:], np.zeros_like(lm[:, :1])], axis=1).astype(bool)


def n_tokens(batches: list[dict]) -> int:
    return int(sum(_positions(b).sum() for b in batches))


@functools.partial(jax.jit, static_argnames=("config",))
def _captured(config, params, branches, input_ids, attention_mask):
    _, x = forward(config, params, input_ids, attention_mask, branches=branches, capture_inputs=True)
    return x


def _placed(mesh, batches: list[dict]):
    """Per batch: (its input_ids, attention_mask and response-position weights w (1 where
    `_positions`), rows padded to split over the mesh's batch axes, padding rows at w = 0;
    the real row count; the boolean positions)."""
    for b in batches:
        pos = _positions(b)
        padded, n = pad_batch({"input_ids": np.asarray(b["input_ids"]), "attention_mask": np.asarray(b["attention_mask"]),
                               "weight": pos.astype(np.float32)}, mesh)
        padded["weight"][n:] = 0.0
        yield put_batch(mesh, padded), n, pos


def input_samples(model, base_branches, modules, batches: list[dict]) -> dict[ModuleKey, jax.Array]:
    """X (n_tokens, in) per module at θ₀ + base_branches, scaled by 1/√n_tokens so XᵀX is the
    K-FAC A factor of `kfac_factors` (same positions). Rows are gathered per batch."""
    rows: dict[ModuleKey, list[np.ndarray]] = {k: [] for k in modules}
    for placed, n, pos in _placed(model_mesh(model), batches):
        x = _captured(model.config, model.params, dict(base_branches), placed["input_ids"], placed["attention_mask"])
        for k in modules:
            rows[k].append(to_host(x[k])[:n].astype(np.float32)[pos])
    total = n_tokens(batches)
    if total == 0:
        raise ValueError("no response tokens (loss_mask is all zero)")
    return {k: jnp.asarray(np.concatenate(v, axis=0) / np.sqrt(total)) for k, v in rows.items()}


@functools.partial(jax.jit, static_argnames=("config", "modules"))
def _captured_moments(config, params, branches, input_ids, attention_mask, weight, *, modules):
    """Σ_b,t w x xᵀ per module, w = 1 at the positions that predict a response token (float32
    sums at HIGHEST precision, as `kfac_factors` accumulates its A factor)."""
    _, x = forward(config, params, input_ids, attention_mask, branches=branches, capture_inputs=True)
    return {k: jnp.einsum("bti,btj->ij", x[k] * weight[..., None], x[k], precision=_HI) for k in modules}


def input_moments(model, base_branches, modules, batches: list[dict], *, desc: str = "K") -> dict[ModuleKey, jax.Array]:
    """K = E[x xᵀ] (in, in) per module over the positions that predict response tokens, at θ₀ +
    base_branches: the K-FAC A factor of `kfac_factors`, from one forward pass per batch (no
    per-sample gradients: the guard never uses K-FAC's G factor). Batches split over the mesh."""
    modules = tuple(sorted(modules))
    sums, start = None, time.perf_counter()
    for placed, _, _ in _placed(model_mesh(model), batches):
        part = _captured_moments(model.config, model.params, dict(base_branches), placed["input_ids"],
                                 placed["attention_mask"], placed["weight"], modules=modules)
        sums = part if sums is None else {k: sums[k] + part[k] for k in modules}
    total = n_tokens(batches)
    if sums is None or total == 0:
        raise ValueError(f"{desc}: no response tokens (loss_mask is all zero)")
    logging.info("%s: %d samples, %d response positions in %.1f s", desc, n_samples(batches), total,
                 time.perf_counter() - start)
    return {k: jnp.asarray(to_host(v)) / total for k, v in sums.items()}


def _moments(model, base, modules, batches, forms, *, desc: str) -> dict:
    """K (dense) or X (samples) per module, as forms[key] says; one forward pass per batch."""
    dense = [k for k in modules if forms[k] == "dense"]
    wide = [k for k in modules if forms[k] == "samples"]
    out = {}
    if dense:
        out.update(input_moments(model, base, dense, batches, desc=desc))
    if wide:
        out.update(input_samples(model, base, wide, batches))
    return out


def _forms(model, keys, form: Form, tokens: int) -> dict[ModuleKey, str]:
    if form not in ("auto", "dense", "samples"):
        raise ValueError(f"form must be 'auto', 'dense' or 'samples', got {form!r}")
    in_dims = {k: int(model.config.module_shape(k[1])[1]) for k in keys}
    return {k: (("samples" if in_dims[k] > tokens else "dense") if form == "auto" else form) for k in keys}


def guard_moments(inputs: MergeInputs, harmful, benign, *, utility: MergeResult | None = None,
                  form: Form = "auto", safety_part: str = "plain", sst_fisher: FisherKind = "core",
                  chunk: int | None = None) -> GuardMoments:
    """K_h at θ₀ + ΔW_S on `harmful`, K_b at θ₀ + ΔW_U on `benign` (ΔW_U: Σ wᵢΔW_Uᵢ, or the
    given utility merge; pass the same one to `sst_guard`), for every module ΔW_U touches; with
    safety_part="sst" also `sst_fishers(..., fisher=sst_fisher)` on the same data."""
    safety = require_safety(inputs, "guard_moments")
    util = utility_parts(inputs, utility)
    hb, bb = as_batches(harmful, "harmful"), as_batches(benign, "benign")
    keys = sorted(util)
    forms = _forms(inputs.model, keys, form, n_tokens(hb) + n_tokens(bb))
    kh = _moments(inputs.model, {k: (lr,) for k, lr in safety.items()}, keys, hb, forms, desc="K_h (harmful)")
    kb = _moments(inputs.model, {k: (lr,) for k, lr in util.items()}, keys, bb, forms, desc="K_b (benign)")
    fishers = (sst_fishers(inputs, hb, bb, fisher=sst_fisher, utility=utility, chunk=chunk)
               if safety_part == "sst" else None)
    return GuardMoments(harmful=kh, benign=kb, samples=tuple(k for k in keys if forms[k] == "samples"),
                        n_harmful=n_samples(hb), n_benign=n_samples(bb), sst=fishers)


def guard_statistics(inputs: MergeInputs, data, *, form: Form = "auto", safety_part: str = "plain",
                     sst_fisher: FisherKind = "core", chunk: int | None = None) -> GuardMoments:
    """The front door's hook: `guard_moments` on data["harmful"] and data["benign"]."""
    return guard_moments(inputs, data["harmful"], data["benign"], form=form, safety_part=safety_part,
                         sst_fisher=sst_fisher, chunk=chunk)


# ----------------------------------------------------------------------------- the method


def _utility_branches(inputs: MergeInputs, utility: MergeResult | None) -> dict[ModuleKey, list]:
    """Per module the utility parts to guard: LowRank branches (A guarded) or dense ΔW."""
    if utility is None:
        return {k: [lr] for k, lr in utility_parts(inputs).items()}
    out: dict[ModuleKey, list] = {}
    for k, br in utility.factors.items():
        out.setdefault(k, []).extend(br)
    for k, d in utility.dense.items():
        out.setdefault(k, []).append(jnp.asarray(d, jnp.float32))
    return out


def _as_branch(p) -> LowRank:
    """A LowRank as is; a dense ΔW (out, in) as the exact LowRank(a=ΔW, b=I)."""
    return p if isinstance(p, LowRank) else LowRank(a=p, b=jnp.eye(p.shape[0], dtype=p.dtype), scale=1.0)


def _safety_parts(inputs: MergeInputs, which: str, fishers: SstFishers | None, utility, *, sst_k, sst_fisher,
                  damping, chunk) -> dict[ModuleKey, LowRank]:
    safety = require_safety(inputs, "sst_guard")
    if which == "plain":
        return {k: dataclasses.replace(lr, scale=jnp.asarray(lr.scale, jnp.float32) * inputs.alpha)
                for k, lr in safety.items()}
    if which != "sst":
        raise ValueError(f"safety_part must be 'plain' or 'sst', got {which!r}")
    res = sst(inputs, fishers=fishers, fisher=sst_fisher, k=sst_k, damping=damping, utility=utility, chunk=chunk)
    return {k: res.factors[k][-1] for k in safety}  # sst appends S's projected patch last


@register("sst_guard", exact=True, data_aware=True, needs=("safety", "harmful", "benign"), statistics=guard_statistics,
          statistics_params=("form", "safety_part", "sst_fisher"))
def sst_guard(inputs: MergeInputs, *, fishers: GuardMoments | None = None, k: int | None = None,
              lambda_threshold: float | None = None, energy: float | None = None, damping: float = 0.1,
              safety_part: Literal["plain", "sst"] = "plain", sst_k: int | None = None,
              sst_fisher: FisherKind = "core", sequential: bool = False, form: Form = "auto",
              utility: MergeResult | None = None, chunk: int | None = None) -> MergeResult:
    """SST-Guard: ΔW = ΔT (I − K_b,δ U_k U_kᵀ) + safety part, per module (module docstring).
    Defaults: k = min(64, in/4) per module (or `lambda_threshold` / `energy`, one rule), damping
    δ = 0.1 (also SST's, for safety_part "sst"), safety_part "plain" (α·ΔW_S; "sst": SST's
    projected S with sst_k (SST's default ⌈r²/2⌉) and sst_fisher "core"), sequential False,
    form "auto" (sample-matrix form where in > harmful + benign tokens), utility None
    (Σ wᵢΔW_Uᵢ; or any merge result, factors or dense), chunk = `default_chunk()` (4 on CPU, 16
    on GPU/TPU). Statistics: fishers= guard_moments(...) (cacheable) or model= and
    data={"harmful": ..., "benign": ...};
    sequential=True always measures K_h from model= and data["harmful"] (fishers gives K_b)."""
    if fishers is None:
        hb = as_batches(training_data(inputs, "harmful"), "harmful")
        bb = as_batches(training_data(inputs, "benign"), "benign")
        if sequential:  # K_h is measured below, layer by layer; only K_b (and SST's Fishers) here
            util_lr = utility_parts(inputs, utility)
            keys = sorted(util_lr)
            forms = _forms(inputs.model, keys, form, n_tokens(hb) + n_tokens(bb))
            kb = _moments(inputs.model, {kk: (lr,) for kk, lr in util_lr.items()}, keys, bb, forms, desc="K_b (benign)")
            fishers = GuardMoments(harmful={}, benign=kb, samples=tuple(kk for kk in keys if forms[kk] == "samples"),
                                   n_harmful=n_samples(hb), n_benign=n_samples(bb),
                                   sst=sst_fishers(inputs, hb, bb, fisher=sst_fisher, utility=utility, chunk=chunk)
                                   if safety_part == "sst" else None)
        else:
            fishers = guard_moments(inputs, hb, bb, utility=utility, form=form, safety_part=safety_part,
                                    sst_fisher=sst_fisher, chunk=chunk)
    moments = fishers
    if safety_part == "sst" and moments.sst is None:
        raise ValueError("safety_part='sst' needs SST's Fishers: guard_moments(..., safety_part='sst')")
    safety_parts = _safety_parts(inputs, safety_part, moments.sst, utility, sst_k=sst_k, sst_fisher=sst_fisher,
                                 damping=damping, chunk=chunk)
    util = _utility_branches(inputs, utility)
    keys = sorted(util)
    guarded: dict[ModuleKey, list] = {}
    stats: dict[str, dict] = {}

    def guard_module(key, kh):
        form_k = "samples" if key in moments.samples else "dense"
        kb = moments.benign.get(key)
        if kb is None:
            raise ValueError(f"fishers have no K_b for {hf_module_path(key)} (computed for other adapters?)")
        g = guard_of(form_k, jnp.asarray(kh, jnp.float32), jnp.asarray(kb, jnp.float32), damping)
        coords = output_coords(util[key], g)
        kk = choose_k(g, coords, int(inputs.shapes[key][1]), k=k, lambda_threshold=lambda_threshold, energy=energy)
        guarded[key] = [guard_lowrank(p, g, kk) if isinstance(p, LowRank) else guard_matrix(p, g, kk)
                        for p in util[key]]
        c2 = np.asarray(coords, np.float64) ** 2
        e = np.maximum(np.asarray(g.eigvals, np.float64), 0.0) * c2  # μ < 0 is rounding (K_h is PSD)
        stats[hf_module_path(key)] = {"guard": {
            "k": kk, "dim": int(g.eigvals.shape[0]), "form": form_k,
            "eigvals": [float(x) for x in np.asarray(g.eigvals)[:32]],
            "harmful_energy": float(e.sum()), "harmful_energy_after": float(e[kk:].sum()),
            "benign_bound": float(c2[:kk].sum())}}

    if sequential:
        if inputs.model is None:
            raise ValueError("sequential=True measures K_h layer by layer and needs model= and data['harmful']")
        hb = as_batches(training_data(inputs, "harmful"), "harmful")
        safety = inputs.safety
        for layer in sorted({kk[0] for kk in keys}):
            here = [kk for kk in keys if kk[0] == layer]
            point: dict[ModuleKey, tuple] = {}
            for kk in sorted(set(safety) | set(guarded)):
                if kk[0] < layer:  # final merge below: guarded utility + safety part
                    parts = [_as_branch(p) for p in guarded.get(kk, [])]
                    point[kk] = tuple(parts + ([safety_parts[kk]] if kk in safety_parts else []))
                elif kk in safety:  # S alone from this layer up
                    point[kk] = (safety[kk],)
            forms = {kk: ("samples" if kk in moments.samples else "dense") for kk in here}
            kh = _moments(inputs.model, point, here, hb, forms, desc=f"K_h (harmful, layer {layer})")
            for kk in here:
                guard_module(kk, kh[kk])
    else:
        for key in keys:
            guard_module(key, moments.pair(key)[1])

    factors, dense = {}, {}
    for key in sorted(set(guarded) | set(safety_parts)):
        parts = [p for p in guarded.get(key, []) if isinstance(p, LowRank)]
        mats = [p for p in guarded.get(key, []) if not isinstance(p, LowRank)]
        if key in safety_parts:
            parts.append(safety_parts[key])
        if parts:
            factors[key] = tuple(parts)
        if mats:
            dense[key] = sum(mats[1:], mats[0])
    hp = dict(k=k, lambda_threshold=lambda_threshold, energy=energy, damping=damping, safety_part=safety_part,
              sst_k=sst_k, sst_fisher=sst_fisher, sequential=sequential, form=form,
              utility_method=None if utility is None else utility.method, n_harmful=moments.n_harmful,
              n_benign=moments.n_benign)
    return make_result("sst_guard", inputs, factors=factors, dense=dense, hparams=hp, stats=stats)


__all__ = ["Guard", "GuardMoments", "choose_k", "default_k", "dense_guard", "guard_lowrank", "guard_matrix",
           "guard_moments", "guard_statistics", "input_moments", "input_samples", "output_coords", "sample_guard", "sst_guard"]
