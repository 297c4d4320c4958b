"""Model-facing Fisher estimators: SST core space, diagonal, K-FAC factors, and the diagonal
Fisher of dense weights (Fisher merging).

Per-sample loss = mean NLL over the response tokens (`sst_jax.models.loss.response_nll`) of
`sst_jax.models.forward` with side branches, on the chat-formatted batches of
`sst_jax.data.chat.collate` ({input_ids, attention_mask, loss_mask}).

Labels:
  empirical  the dataset's response tokens are the targets.
  model      the "true" Fisher: at every response position t the target is drawn from the
             model's own distribution p(· | x_<t) under teacher forcing (the context stays the
             dataset's tokens; prompt and padding are untouched). The samples come from one
             forward pass at the linearization point, keyed by `key` folded with the batch
             index, before any gradient is taken. This is the Fisher of the teacher-forced
             conditionals (E_y ∇log p ∇log pᵀ per position), and needs no generation.

The core space of S per module (DESIGN.md §5): ΔW_S = P Σ Qᵀ (compact SVD), and the
differentiated variable is M (r×r) in LowRank(a=Qᵀ, b=P, core=M): ΔW(M) = P M Qᵀ. The Fisher
is taken at M = 0 (the linearization point θ₀ + ΔW_U, given as `base_branches`) by default,
or at M = Σ (θ₀ + ΔW_U + ΔW_S), or at any given M₀. Coordinates of M are row-major: φ_S =
vec(diag Σ) = `CoreSpace.phi`. Several cores on one module (one per expert, `sst_multi`) are
keyed (layer, module, i) and added side by side.

Every pass splits its samples over the `data` axis of `mesh`, by default the model's own
(`LoadedModel.mesh`, set by `sharding.place_model`; a model without one: its default device).

K-FAC and the dense-weight diagonal share one pass: zero `OutputTap`s on the module outputs
give g_t = ∂Lᵢ/∂y_t, and `forward(capture_inputs=True)` gives the inputs x_t; K-FAC sums
x xᵀ and g gᵀ, the diagonal squares the per-sample weight gradient Σ_t g_t x_tᵀ.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec
from tqdm.auto import tqdm

from sst_jax.fisher.per_sample import FisherStats, accumulate, local_result, pad_block, place_block, resolve_chunk
from sst_jax.models import forward
from sst_jax.models.branches import Branches, LowRank, ModuleKey, OutputTap, add_branches
from sst_jax.models.loss import response_nll
from sst_jax.models.sharding import model_mesh, shard_map, to_host

Labels = Literal["empirical", "model"]
_HI = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Labels


def sample_model_labels(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                        key: jax.Array) -> jax.Array:
    """Targets (B, T): input_ids, except response positions t (loss_mask[:, t] = 1, t ≥ 1),
    which are drawn from softmax(logits[:, t-1]) — the model's next-token distribution."""
    drawn = jax.random.categorical(key, logits[:, :-1].astype(jnp.float32), axis=-1)
    drawn = jnp.concatenate([input_ids[:, :1], drawn.astype(input_ids.dtype)], axis=1)
    return jnp.where(loss_mask.astype(bool), drawn, input_ids)


@functools.partial(jax.jit, static_argnames=("config",))
def _sampled_targets(config, params, branches, input_ids, attention_mask, loss_mask, key):
    logits = forward(config, params, input_ids, attention_mask, branches=branches)
    return sample_model_labels(logits, input_ids, loss_mask, key)


def with_targets(config, params, batch: Mapping[str, Any], *, labels: Labels = "empirical",
                 key: jax.Array | None = None, branches: Branches | None = None) -> dict[str, Any]:
    """The batch plus "targets" for the chosen label kind (see module docstring)."""
    out = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
    if labels == "empirical":
        out["targets"] = out["input_ids"]
    elif labels == "model":
        if key is None:
            raise ValueError("labels='model' needs a PRNG key")
        out["targets"] = to_host(_sampled_targets(config, params, branches or {}, out["input_ids"],
                                                     out["attention_mask"], out["loss_mask"], key))
    else:
        raise ValueError(f"labels must be 'empirical' or 'model', got {labels!r}")
    return out


def _labelled(config, params, batches, labels, key, branches):
    for i, batch in enumerate(batches):
        k = None if key is None else jax.random.fold_in(key, i)
        yield with_targets(config, params, batch, labels=labels, key=k, branches=branches)


# ---------------------------------------------------------------------------------------------
# Per-sample LM loss over a branch pytree


def lm_loss_fn(config, branches_fn):
    """loss_fn(trainable, fixed, example) for `accumulate`: fixed = (params, extra), branches =
    branches_fn(trainable, extra); example = one row of a `with_targets` batch."""
    return _lm_loss_fn(config, branches_fn)


@functools.lru_cache(maxsize=32)
def _lm_loss_fn(config, branches_fn):
    def loss(trainable, fixed, ex):
        params, extra = fixed
        logits = forward(config, params, ex["input_ids"][None], ex["attention_mask"][None],
                         branches=branches_fn(trainable, extra))
        return response_nll(logits, ex["targets"][None], ex["loss_mask"][None])[0]

    return loss


def _added_branches(trainable, base):
    """The trainable pytree is itself a branch pytree, added beside the fixed base branches."""
    return add_branches(base, trainable)


def _core_branches(cores, extra):
    """base + P·M·Qᵀ per core; a core key is a ModuleKey (layer, module) or (layer, module, i),
    the latter for several cores on one module (e.g. one per expert), kept side by side."""
    base, spaces = extra
    return add_branches(base, *({k[:2]: (LowRank(a=spaces[k][1].T, b=spaces[k][0], core=m),)}
                               for k, m in cores.items()))


# ---------------------------------------------------------------------------------------------
# Core space of S


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CoreSpace:
    """Compact SVD ΔW_S = P diag(σ) Qᵀ of one module: p (out, r), sigma (r,), q (in, r), P and Q
    with orthonormal columns. A delta in this space is P M Qᵀ, M ∈ ℝ^{r×r}, vec(M) row-major."""

    p: jax.Array
    sigma: jax.Array
    q: jax.Array

    @property
    def rank(self) -> int:
        return int(self.sigma.shape[0])

    @property
    def r(self) -> int:
        return self.rank

    @property
    def phi(self) -> jax.Array:
        """φ_S = vec(diag σ), row-major: S's coordinates in its own core space."""
        return jnp.diag(self.sigma).reshape(-1)

    def delta(self, core: jax.Array) -> jax.Array:
        """ΔW(M) = P M Qᵀ (out, in)."""
        return self.p @ core @ self.q.T

    def branch(self, core: jax.Array, scale: float | jax.Array = 1.0) -> LowRank:
        """P·core·Qᵀ·scale as a side branch (never forms the dense ΔW)."""
        return LowRank(a=self.q.T, b=self.p, core=core, scale=scale)

    def coords(self, lr: LowRank) -> jax.Array:
        """Pᵀ ΔW Q (r, r) of another low-rank ΔW, without forming ΔW."""
        u, v = lr.factors()
        return (self.p.T @ u) @ (v @ self.q)


@jax.jit
def _factor_svd(a: jax.Array, b: jax.Array):
    """SVD of B·A from its factors: QR of both, SVD of the small middle R_B R_Aᵀ."""
    qb, rb = jnp.linalg.qr(b)
    qa, ra = jnp.linalg.qr(a.T)
    u, s, wt = jnp.linalg.svd(jnp.matmul(rb, ra.T, precision=_HI))
    return qb @ u, s, qa @ wt.T


def core_space(delta: LowRank | Sequence[LowRank] | jax.Array, *, rank: int | None = None) -> CoreSpace:
    """Compact SVD of a module's ΔW, from LowRank factors (summed when several; never forms the
    dense ΔW) or a dense (out, in) matrix; `rank` truncates (default: the factor rank, capped
    by the module's dimensions)."""
    if isinstance(delta, LowRank):
        delta = (delta,)
    if isinstance(delta, (tuple, list)):
        bs = [jnp.asarray(br.b, jnp.float32) @ (jnp.eye(br.b.shape[1]) if br.core is None
                                                  else jnp.asarray(br.core, jnp.float32))
              * jnp.asarray(br.scale, jnp.float32) for br in delta]
        p, s, q = _factor_svd(jnp.concatenate([jnp.asarray(br.a, jnp.float32) for br in delta], axis=0),
                              jnp.concatenate(bs, axis=1))
    else:
        u, s, wt = jnp.linalg.svd(jnp.asarray(delta, jnp.float32), full_matrices=False)
        p, q = u, wt.T
    r = min(rank or s.shape[0], s.shape[0])
    return CoreSpace(p=p[:, :r], sigma=s[:r], q=q[:, :r])


def core_spaces(adapter: Branches, *, rank: int | None = None) -> dict[ModuleKey, CoreSpace]:
    """core_space of every module of a branch pytree (e.g. the safety LoRA S)."""
    return {k: core_space(tuple(v), rank=rank) for k, v in sorted(adapter.items())}


# ---------------------------------------------------------------------------------------------
# Estimators


def core_fisher(model, base_branches: Branches, spaces: Mapping[Any, CoreSpace],
                batches: Iterable[Mapping[str, Any]], *, labels: Labels = "empirical",
                key: jax.Array | None = None, at: str | Mapping[Any, jax.Array] = "zero",
                stats: Sequence[str] = ("dense",), chunk: int | None = None, remat: bool = False,
                mesh: Mesh | None = None, total: int | None = None, desc: str = "core fisher",
                progress: bool = True) -> FisherStats:
    """Fisher of every core M (FisherStats.dense[key]: r²×r²; .diag[key]: r×r), one vmapped
    grad over all cores at once. Keys of `spaces` are ModuleKeys or (layer, module, i) when
    several cores sit on one module. Linearization point θ₀ + base_branches + Σ P·M₀·Qᵀ with
    M₀ from `at`: "zero" (M₀ = 0, DESIGN §5), "sigma" (M₀ = diag σ, i.e. + ΔW_S), or a
    mapping {key: M₀ (r, r)}."""
    keys = sorted(spaces, key=repr)
    if isinstance(at, str):
        if at not in ("zero", "sigma"):
            raise ValueError(f"at must be 'zero', 'sigma' or a mapping of cores, got {at!r}")
        cores = {k: (jnp.zeros((spaces[k].rank,) * 2, jnp.float32) if at == "zero" else jnp.diag(spaces[k].sigma))
                 for k in keys}
    else:
        missing = [k for k in keys if k not in at]
        if missing:
            raise ValueError(f"at has no core for {missing[:3]} (one (r, r) matrix per space)")
        cores = {k: jnp.asarray(at[k], jnp.float32) for k in keys}
    extra = (dict(base_branches), {k: (spaces[k].p, spaces[k].q) for k in keys})
    point = _core_branches(cores, extra)
    loss = lm_loss_fn(model.config, _core_branches)
    data = _labelled(model.config, model.params, batches, labels, key, point)
    return accumulate(loss, cores, data, fixed=(model.params, extra), stats=stats, chunk=chunk,
                      remat=remat, mesh=mesh if mesh is not None else model_mesh(model), total=total,
                      desc=desc, progress=progress)


def branch_fisher(model, base_branches: Branches, trainable: Branches,
                  batches: Iterable[Mapping[str, Any]], *, stats: Sequence[str] = ("diag",),
                  labels: Labels = "empirical", key: jax.Array | None = None, chunk: int | None = None,
                  remat: bool = False, mesh: Mesh | None = None, total: int | None = None,
                  desc: str = "fisher", progress: bool = True) -> FisherStats:
    """Fisher statistics of any branch pytree (e.g. LoRA factors), added beside base_branches."""
    point = add_branches(base_branches, trainable)
    loss = lm_loss_fn(model.config, _added_branches)
    data = _labelled(model.config, model.params, batches, labels, key, point)
    return accumulate(loss, dict(trainable), data, fixed=(model.params, dict(base_branches)),
                      stats=stats, chunk=chunk, remat=remat, mesh=mesh if mesh is not None else model_mesh(model),
                      total=total, desc=desc, progress=progress)


def diagonal_fisher(model, base_branches: Branches, trainable: Branches,
                    batches: Iterable[Mapping[str, Any]], **kwargs) -> Any:
    """Diagonal Fisher E[g²] over a branch pytree, same structure as `trainable`."""
    return branch_fisher(model, base_branches, trainable, batches, stats=("diag",), **kwargs).diag


# ---------------------------------------------------------------------------------------------
# K-FAC


@dataclasses.dataclass(frozen=True)
class KfacFactors:
    """Per module: a = E_tokens[x xᵀ] (in, in), g = E_samples[Σ_t g_t g_tᵀ] (out, out), so the
    Fisher of vec_row-major(W) is ≈ kron(g, a). n_tokens / n_samples: what was averaged over."""

    a: dict
    g: dict
    n_tokens: float
    n_samples: int


def _tap_scan(update, tap_loss_fn, out_dims: Mapping[Any, int], chunk: int, acc0, fixed, block, mask):
    """Scan one block in chunks of `chunk` samples, folding every chunk into acc0 with
    update(acc, grads, inputs, pos, m).

    tap_loss_fn(taps, fixed, sub_batch) -> (per-sample losses (b,), inputs {key: (b, T, in)},
    position mask (b, T)); taps {key: zeros (b, T, out)} are added to the module outputs, so
    grads[k][i, t] = ∂(mᵢLᵢ)/∂y[i, t] (samples are independent; padding samples have m = 0)."""
    n = mask.shape[0]
    xs = jax.tree.map(lambda x: x.reshape((n // chunk, chunk) + x.shape[1:]), (block, mask))

    def body(acc, inp):
        sub, m = inp
        t = jax.tree.leaves(sub)[0].shape[1]
        taps = {k: jnp.zeros((chunk, t, d), jnp.float32) for k, d in out_dims.items()}

        def total(tp):
            losses, inputs, pos = tap_loss_fn(tp, fixed, sub)
            return jnp.sum(losses * m), (inputs, pos)

        grads, (inputs, pos) = jax.grad(total, has_aux=True)(taps)
        inputs = {k: x.astype(jnp.float32) for k, x in inputs.items()}
        return update(acc, grads, inputs, pos, m), None

    acc, _ = jax.lax.scan(body, acc0, xs)
    return acc


def _kfac_update(acc, grads, inputs, pos, m):
    """A_sum += Σ w x xᵀ, G_sum += Σ w g gᵀ over the positions that predict response tokens."""
    w = pos.astype(jnp.float32) * m[:, None]
    a_sum, g_sum, tokens = acc
    a_sum = {k: a_sum[k] + jnp.einsum("bti,btj->ij", inputs[k] * w[..., None], inputs[k], precision=_HI)
             for k in a_sum}
    g_sum = {k: g_sum[k] + jnp.einsum("bto,btp->op", grads[k] * w[..., None], grads[k], precision=_HI)
             for k in g_sum}
    return a_sum, g_sum, tokens + jnp.sum(w)


def _weight_diag_update(acc, grads, inputs, pos, m):
    """Σ_samples G∘G, G = Σ_t g_t x_tᵀ = ∂Lᵢ/∂W (out, in) over all positions (a prompt
    position's output reaches later response predictions through attention). Only one
    chunk of G is alive at a time."""
    del pos, m  # every position counts; padding samples already have g = 0
    out = {}
    for k in acc:
        g = jnp.einsum("bto,bti->boi", grads[k], inputs[k], precision=_HI)
        out[k] = acc[k] + jnp.sum(g * g, axis=0)
    return out


@functools.lru_cache(maxsize=32)
def _compiled_taps(update, tap_loss_fn, out_items, acc_leaves, acc_def, chunk, mesh, axis):
    """jit(step(fixed, block, mask) -> sums), psum-reduced over `axis` with a mesh. The
    accumulator starts as zeros of the shapes acc_leaves in the structure acc_def."""
    out_dims = dict(out_items)

    def step(fixed, block, mask):
        acc0 = jax.tree.unflatten(acc_def, [jnp.zeros(s, jnp.float32) for s in acc_leaves])
        return _tap_scan(update, tap_loss_fn, out_dims, chunk, acc0, fixed, block, mask)

    if mesh is None:
        return jax.jit(step)
    rep, shard = PartitionSpec(), PartitionSpec(axis)
    return jax.jit(shard_map(lambda f, b, m: jax.lax.psum(step(f, b, m), axis), mesh=mesh,
                             in_specs=(rep, shard, shard), out_specs=rep, axis=axis))


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _tap_pass(update, tap_loss_fn, fixed, batches: Iterable[Any], out_dims: Mapping[Any, int], acc_shapes,
              *, chunk: int | None, mesh: Mesh | None, axis: str, total: int | None, desc: str,
              progress: bool) -> tuple[Any, int, float]:
    """(sums, n_samples, seconds) of `update` over all batches, one jitted step per block."""
    leaves, treedef = jax.tree.flatten(acc_shapes, is_leaf=_is_shape)
    chunk = resolve_chunk(chunk, mesh)
    step = _compiled_taps(update, tap_loss_fn, tuple(sorted(out_dims.items(), key=repr)), tuple(leaves), treedef,
                          chunk, mesh, axis)
    n_dev = 1 if mesh is None else int(mesh.shape[axis])
    acc, n_samples = None, 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    for block in batches:
        block, mask, n = pad_block(block, chunk * n_dev)
        sums = step(fixed, *place_block(block, mask, mesh, axis))
        acc = sums if acc is None else jax.tree.map(jnp.add, acc, sums)
        jax.block_until_ready(acc)
        n_samples += n
        bar.update(n)
    bar.close()
    if acc is None:
        raise ValueError(f"{desc}: no samples in batches")
    return local_result(acc), n_samples, time.perf_counter() - start


def kfac_accumulate(tap_loss_fn, fixed, batches: Iterable[Any], out_dims: Mapping[Any, int],
                    in_dims: Mapping[Any, int], *, chunk: int | None = None, mesh: Mesh | None = None,
                    axis: str = "data", total: int | None = None, desc: str = "kfac",
                    progress: bool = True) -> KfacFactors:
    """K-FAC factors from zero-perturbation taps (see `_tap_scan`); A averaged over the masked
    positions of all samples, G summed over positions and averaged over samples."""
    shapes = ({k: (d, d) for k, d in in_dims.items()}, {k: (d, d) for k, d in out_dims.items()}, ())
    (a_sum, g_sum, tokens), n_samples, _ = _tap_pass(
        _kfac_update, tap_loss_fn, fixed, batches, out_dims, shapes, chunk=chunk, mesh=mesh, axis=axis,
        total=total, desc=desc, progress=progress)
    tokens = float(tokens)
    if tokens == 0:
        raise ValueError(f"{desc}: no response tokens (loss_mask is all zero)")
    logging.info("%s: %d samples, %d response positions", desc, n_samples, int(tokens))
    return KfacFactors(a={k: v / tokens for k, v in a_sum.items()},
                       g={k: v / n_samples for k, v in g_sum.items()}, n_tokens=tokens, n_samples=n_samples)


def _lm_tap_loss(config):
    return _lm_tap_loss_cached(config)


@functools.lru_cache(maxsize=32)
def _lm_tap_loss_cached(config):
    def tap_loss(taps, fixed, sub):
        params, base = fixed
        branches = add_branches(base, {k: (OutputTap(delta=v),) for k, v in taps.items()})
        logits, inputs = forward(config, params, sub["input_ids"], sub["attention_mask"],
                                 branches=branches, capture_inputs=True)
        losses = response_nll(logits, sub["targets"], sub["loss_mask"])
        # Positions whose next-token prediction is a response target (the loss's own positions).
        lm = sub["loss_mask"]
        pos = jnp.concatenate([lm[:, 1:], jnp.zeros_like(lm[:, :1])], axis=1)
        return losses, {k: inputs[k] for k in taps}, pos

    return tap_loss


def kfac_factors(model, base_branches: Branches, modules: Sequence[ModuleKey],
                 batches: Iterable[Mapping[str, Any]], *, labels: Labels = "empirical",
                 key: jax.Array | None = None, chunk: int | None = None, mesh: Mesh | None = None,
                 total: int | None = None, desc: str = "kfac", progress: bool = True) -> KfacFactors:
    """K-FAC factors of `modules` at θ₀ + base_branches: A = E[x xᵀ] over the positions that
    predict response tokens, G = E_samples[Σ_t g gᵀ] with g = ∂Lᵢ/∂y_t from zero taps."""
    config = model.config
    out_dims = {k: config.module_shape(k[1])[0] for k in modules}
    in_dims = {k: config.module_shape(k[1])[1] for k in modules}
    data = _labelled(config, model.params, batches, labels, key, dict(base_branches))
    return kfac_accumulate(_lm_tap_loss(config), (model.params, dict(base_branches)), data,
                           out_dims, in_dims, chunk=chunk, mesh=mesh if mesh is not None else model_mesh(model),
                           total=total, desc=desc, progress=progress)


# ---------------------------------------------------------------------------------------------
# Diagonal Fisher of dense weights


def weight_diag_fisher(model, base_branches: Branches, modules: Sequence[ModuleKey],
                       batches: Iterable[Mapping[str, Any]], *, labels: Labels = "empirical",
                       key: jax.Array | None = None, chunk: int | None = None, mesh: Mesh | None = None,
                       axis: str = "data", total: int | None = None, desc: str = "diag fisher",
                       progress: bool = True) -> FisherStats:
    """Diagonal Fisher E_i[(∂Lᵢ/∂W)²] of the dense weight W (out, in) of each of `modules`, at
    θ₀ + base_branches (FisherStats.diag[key]). The per-sample gradient is Σ_t g_t x_tᵀ with
    g_t = ∂Lᵢ/∂y_t from zero output taps and x_t the module inputs, so no dense perturbation
    of W is ever added to the forward pass."""
    config = model.config
    shapes = {k: tuple(config.module_shape(k[1])) for k in modules}
    data = _labelled(config, model.params, batches, labels, key, dict(base_branches))
    acc, n_samples, seconds = _tap_pass(
        _weight_diag_update, _lm_tap_loss(config), (model.params, dict(base_branches)), data,
        {k: s[0] for k, s in shapes.items()}, shapes, chunk=chunk,
        mesh=mesh if mesh is not None else model_mesh(model), axis=axis, total=total,
        desc=desc, progress=progress)
    logging.info("%s: %d samples in %.1f s", desc, n_samples, seconds)
    return FisherStats(n_samples=n_samples, diag={k: v / n_samples for k, v in acc.items()}, seconds=seconds)
