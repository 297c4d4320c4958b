"""The data-aware half of the merge methods: core spaces and Fisher passes.

Everything here is a function of (model, adapters, datasets) and returns plain arrays, so an
experiment computes the Fishers once, caches them, and sweeps α, k or β with the pure merge
functions (`sst.py`, `agl.py`, `fisher_merge.py`) at no further model cost.

Core space (DESIGN §5): ΔW = P Σ Qᵀ (compact SVD, rank r, computed from the factors by two
QRs and an r×r SVD); a delta in that space is P M Qᵀ, M ∈ ℝ^{r×r}, vec(M) row-major.

Per-sample loss: `response_nll` (mean NLL over response tokens) of one chat-formatted sample.
Batches are `sst_jax.data.chat.collate` dicts {input_ids, attention_mask, loss_mask}, or an
iterable of them. Fishers are uncentred second moments of per-sample gradients
(`sst_jax.fisher.accumulate`), labels as given in the batches ("empirical").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sst_jax.errors import DatasetError
from sst_jax.fisher.per_sample import accumulate
from sst_jax.models.branches import LowRank, ModuleKey, add_branches
from sst_jax.models.llama import forward
from sst_jax.models.loss import response_nll

Batch = Mapping[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CoreSpace:
    """ΔW = P diag(σ) Qᵀ: p (out, r), sigma (r,), q (in, r), P and Q orthonormal columns."""

    p: jax.Array
    sigma: jax.Array
    q: jax.Array

    @property
    def r(self) -> int:
        return int(self.sigma.shape[0])

    @property
    def rank(self) -> int:  # the name sst_jax.fisher.CoreSpace uses
        return self.r

    @property
    def phi(self) -> jax.Array:
        """Coordinates of ΔW itself: vec(diag σ), row-major, shape (r²,)."""
        return jnp.diag(self.sigma).reshape(-1)

    def branch(self, core: jax.Array, scale: float | jax.Array = 1.0) -> LowRank:
        """P·core·Qᵀ·scale as a side branch."""
        return LowRank(a=self.q.T, b=self.p, core=core, scale=scale)

    def coords(self, lr: LowRank) -> jax.Array:
        """Pᵀ ΔW Q of another low-rank ΔW (r, r), without forming ΔW."""
        b = jnp.asarray(lr.b, jnp.float32)
        if lr.core is not None:
            b = b @ jnp.asarray(lr.core, jnp.float32)
        return jnp.asarray(lr.scale, jnp.float32) * (self.p.T @ b) @ (jnp.asarray(lr.a, jnp.float32) @ self.q)


@jax.jit
def _core_space(a, b):
    qb, rb = jnp.linalg.qr(b)
    qa, ra = jnp.linalg.qr(a.T)
    u, s, vt = jnp.linalg.svd(rb @ ra.T)
    return qb @ u, s, qa @ vt.T


def core_space(lr: LowRank) -> CoreSpace:
    """Compact SVD of a low-rank ΔW from its factors (never forms the dense ΔW)."""
    b = jnp.asarray(lr.b, jnp.float32)
    if lr.core is not None:
        b = b @ jnp.asarray(lr.core, jnp.float32)
    b = b * jnp.asarray(lr.scale, jnp.float32)
    a = jnp.asarray(lr.a, jnp.float32)
    if a.shape[0] > min(a.shape[1], b.shape[0]):
        raise ValueError(f"rank {a.shape[0]} exceeds the module's dimensions {b.shape[0]}×{a.shape[1]}")
    p, s, q = _core_space(a, b)
    return CoreSpace(p=p, sigma=s, q=q)


def _as_batches(data: Batch | Iterable[Batch], name: str) -> list[dict]:
    if data is None:
        raise DatasetError(f"the Fisher pass needs the {name!r} dataset (collated batches)")
    blocks = [data] if isinstance(data, Mapping) else list(data)
    out = []
    for blk in blocks:
        missing = {"input_ids", "attention_mask", "loss_mask"} - set(blk)
        if missing:
            raise DatasetError(f"{name} batch lacks {sorted(missing)} (use sst_jax.data.chat.collate)")
        out.append({k: np.asarray(blk[k]) for k in ("input_ids", "attention_mask", "loss_mask")})
    if not out or sum(len(b["input_ids"]) for b in out) == 0:
        raise DatasetError(f"the {name!r} dataset is empty")
    return out


@functools.lru_cache(maxsize=16)
def core_loss(config) -> Any:
    """loss(trainable {tkey: M}, fixed, example) for one static config (a stable object, so
    `accumulate` compiles once per config). tkey is (layer, module) or (layer, module, i);
    fixed = {"params", "base": fixed branches, "spaces": {tkey: (P, Q)}}."""

    def loss(trainable, fixed, ex):
        extra: dict[ModuleKey, tuple] = {}
        for tkey, m in trainable.items():
            p, q = fixed["spaces"][tkey]
            mkey = (tkey[0], tkey[1])
            extra[mkey] = extra.get(mkey, ()) + (LowRank(a=q.T, b=p, core=m, scale=1.0),)
        branches = add_branches(fixed["base"], extra)
        logits = forward(config, fixed["params"], ex["input_ids"][None], ex["attention_mask"][None],
                         branches=branches)
        return response_nll(logits, ex["input_ids"][None], ex["loss_mask"][None])[0]

    return loss


def core_fishers(model, spaces: Mapping[Any, CoreSpace], at: Mapping[Any, jax.Array],
                 base: Mapping[ModuleKey, tuple], data: Batch | Iterable[Batch], *, stat: str = "dense",
                 chunk: int = 8, desc: str = "fisher") -> tuple[dict[Any, jax.Array], int]:
    """Fisher of the response loss on `data` w.r.t. each core matrix M (tkey -> (r², r²) for
    stat="dense", (r²,) for "diag"), linearized at θ₀ + base + Σ P·at[tkey]·Qᵀ."""
    batches = _as_batches(data, desc)
    trainable = {k: jnp.asarray(at[k], jnp.float32) for k in spaces}
    fixed = {"params": model.params, "base": dict(base),
             "spaces": {k: (s.p, s.q) for k, s in spaces.items()}}
    stats = accumulate(core_loss(model.config), trainable, batches, fixed=fixed, stats=(stat,), chunk=chunk,
                       total=sum(len(b["input_ids"]) for b in batches), desc=desc)
    if stat == "dense":
        return dict(stats.dense), stats.n_samples
    return {k: v.reshape(-1) for k, v in stats.diag.items()}, stats.n_samples


@functools.lru_cache(maxsize=16)
def dense_loss(config) -> Any:
    """loss(trainable {ModuleKey: D (out, in)}, fixed, example): gradients w.r.t. the dense
    weight of each module (D = 0 added as a full-rank branch at θ₀ + base)."""

    def loss(trainable, fixed, ex):
        extra = {k: (LowRank(a=jnp.eye(d.shape[1], dtype=d.dtype), b=d, scale=1.0),) for k, d in trainable.items()}
        logits = forward(config, fixed["params"], ex["input_ids"][None], ex["attention_mask"][None],
                         branches=add_branches(fixed["base"], extra))
        return response_nll(logits, ex["input_ids"][None], ex["loss_mask"][None])[0]

    return loss


def diagonal_weight_fishers(model, shapes: Mapping[ModuleKey, tuple[int, int]], base: Mapping[ModuleKey, tuple],
                            data: Batch | Iterable[Batch], *, chunk: int = 8,
                            desc: str = "fisher") -> tuple[dict[ModuleKey, jax.Array], int]:
    """Diagonal Fisher over the entries of each module's weight W (out, in), at θ₀ + base."""
    batches = _as_batches(data, desc)
    trainable = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    stats = accumulate(dense_loss(model.config), trainable, batches, fixed={"params": model.params, "base": dict(base)},
                       stats=("diag",), chunk=chunk, total=sum(len(b["input_ids"]) for b in batches), desc=desc)
    return dict(stats.diag), stats.n_samples
