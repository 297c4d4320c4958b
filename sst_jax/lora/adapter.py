"""A LoRA adapter as a pytree: per-module factors (leaves) plus static metadata.

Layout is PEFT's (DESIGN.md §4): A = lora_A.weight (r, in), B = lora_B.weight (out, r),
ΔW = s·B·A with s = α/r, or α/√r under rsLoRA. Per-module r and α come from PEFT's
`rank_pattern` / `alpha_pattern`, matched against the module path exactly as PEFT does
(a pattern key k matches path p when p fully matches the regex `(.*\\.)?(k)`; first key wins).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from sst_jax.errors import AdapterError
from sst_jax.models.branches import MODULE_NAMES, LowRank, ModuleKey, hf_module_path


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One module's factors in PEFT layout: a = lora_A (r, in), b = lora_B (out, r)."""

    a: jax.Array
    b: jax.Array


def freeze_pattern(pattern: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> tuple:
    if pattern is None:
        return ()
    items = pattern.items() if isinstance(pattern, Mapping) else pattern
    return tuple((str(k), v) for k, v in items)


def pattern_value(pattern: Sequence[tuple[str, Any]], path: str, default: Any) -> Any:
    """PEFT's pattern lookup: the value of the first key k with `(.*\\.)?(k)$` matching `path`."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
    """Static (hashable) metadata that travels with the factors.

    rank_pattern / alpha_pattern are ordered (pattern, value) tuples, PEFT semantics.
    layers is None when every layer of the base model is targeted (PEFT layers_to_transform).
    """

    base_model: str | None
    targets: tuple[str, ...]
    r: int
    alpha: float
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False
    dtype: str = "float32"
    name: str = "adapter"
    layers: tuple[int, ...] | None = None

    def rank_for(self, key: ModuleKey) -> int:
        return int(pattern_value(self.rank_pattern, hf_module_path(key), self.r))

    def alpha_for(self, key: ModuleKey) -> float:
        return float(pattern_value(self.alpha_pattern, hf_module_path(key), self.alpha))

    def scale_for(self, key: ModuleKey, rank: int | None = None) -> float:
        """α/r (α/√r with rsLoRA), with per-module r and α from the patterns."""
        r = self.rank_for(key) if rank is None else rank
        alpha = self.alpha_for(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _sorted_factors(factors: Mapping[ModuleKey, LoraFactors]) -> dict[ModuleKey, LoraFactors]:
    return {k: factors[k] for k in sorted(factors)}


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """factors: {(layer, module): LoraFactors}, canonically sorted; meta: static metadata."""

    factors: dict[ModuleKey, LoraFactors]
    meta: AdapterMeta

    def __post_init__(self):
        object.__setattr__(self, "factors", _sorted_factors(self.factors))

    @property
    def keys(self) -> tuple[ModuleKey, ...]:
        return tuple(self.factors)

    def rank(self, key: ModuleKey) -> int:
        return int(self.factors[key].a.shape[0])

    def scale(self, key: ModuleKey) -> float:
        """Scale s of module `key` (a Python float: metadata, never differentiated)."""
        return self.meta.scale_for(key, self.rank(key))

    def to_branches(self) -> dict[ModuleKey, tuple[LowRank]]:
        """Side branches for `sst_jax.models.forward` (one LowRank per module)."""
        return {k: (LowRank(a=f.a, b=f.b, scale=self.scale(k)),) for k, f in self.factors.items()}

    def low_rank(self) -> dict[ModuleKey, LowRank]:
        return {k: LowRank(a=f.a, b=f.b, scale=self.scale(k)) for k, f in self.factors.items()}

    def delta(self, key: ModuleKey) -> jax.Array:
        """Dense ΔW = s·B·A of module `key`, shape (out, in), float32."""
        f = self.factors[key]
        return self.scale(key) * (jnp.asarray(f.b, jnp.float32) @ jnp.asarray(f.a, jnp.float32))

    def replace_factors(self, factors: Mapping[ModuleKey, LoraFactors]) -> "LoraAdapter":
        return LoraAdapter(factors=dict(factors), meta=self.meta)

    def astype(self, dtype: str) -> "LoraAdapter":
        f = {k: LoraFactors(jnp.asarray(v.a, dtype), jnp.asarray(v.b, dtype)) for k, v in self.factors.items()}
        return LoraAdapter(factors=f, meta=dataclasses.replace(self.meta, dtype=str(jnp.dtype(dtype))))


jax.tree_util.register_dataclass(LoraAdapter, data_fields=["factors"], meta_fields=["meta"])


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of the target linear layers of a decoder config (HF layout)."""
    d, hd = int(config.d_model), int(config.head_dim)
    q, kv, ff = int(config.n_heads) * hd, int(config.n_kv_heads) * hd, int(config.d_ff)
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    unknown = [t for t in targets if t not in MODULE_NAMES]
    if unknown or not targets:
        raise AdapterError(f"unknown LoRA target modules {unknown or list(targets)}; "
                           f"sst-jax targets the decoder's linear layers {list(MODULE_NAMES)}")
    return tuple(sorted(set(targets), key=MODULE_NAMES.index))


def init_lora(key: jax.Array, config, *, targets: Sequence[str], r: int, alpha: float,
              rank_pattern: Mapping[str, int] | None = None,
              alpha_pattern: Mapping[str, float] | None = None, use_rslora: bool = False,
              layers: Sequence[int] | None = None, dtype: str = "float32",
              base_model: str | None = None, name: str = "adapter") -> LoraAdapter:
    """A fresh adapter initialised as PEFT does: A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0.

    Each module draws from `fold_in(key, index)` over the canonical module order, so the
    draw of one module does not depend on which other modules are targeted.
    """
    targets = _check_targets(targets)
    if r <= 0:
        raise AdapterError(f"LoRA rank r must be positive, got {r}")
    n_layers = int(config.n_layers)
    layer_list = tuple(range(n_layers)) if layers is None else tuple(sorted(set(int(i) for i in layers)))
    bad = [i for i in layer_list if not 0 <= i < n_layers]
    if bad:
        raise AdapterError(f"layers {bad} out of range for a base model with {n_layers} layers")
    meta = AdapterMeta(base_model=base_model, targets=targets, r=int(r), alpha=float(alpha),
                       rank_pattern=freeze_pattern(rank_pattern), alpha_pattern=freeze_pattern(alpha_pattern),
                       use_rslora=bool(use_rslora), dtype=str(jnp.dtype(dtype)), name=name,
                       layers=None if layers is None else layer_list)
    shapes = module_shapes(config)
    factors = {}
    for layer in layer_list:
        for module in targets:
            mkey = (layer, module)
            rank = meta.rank_for(mkey)
            out_dim, in_dim = shapes[module]
            sub = jax.random.fold_in(key, layer * len(MODULE_NAMES) + MODULE_NAMES.index(module))
            bound = 1.0 / math.sqrt(in_dim)
            a = jax.random.uniform(sub, (rank, in_dim), jnp.float32, -bound, bound)
            factors[mkey] = LoraFactors(a=a.astype(dtype), b=jnp.zeros((out_dim, rank), dtype))
    return LoraAdapter(factors=factors, meta=meta)


def from_low_rank(deltas: Mapping[ModuleKey, LowRank], *, base_model: str | None = None,
                  name: str = "merged", dtype: str = "float32") -> LoraAdapter:
    """An exportable adapter holding exactly the given low-rank ΔWs.

    The scale and any core matrix are folded into B, and every module gets its own rank and
    α = rank in the patterns (so s = 1), which PEFT reproduces exactly.
    """
    factors, rank_pattern, alpha_pattern = {}, [], []
    for key in sorted(deltas):
        lr = deltas[key]
        b, a = lr.factors()
        factors[key] = LoraFactors(a=a.astype(dtype), b=b.astype(dtype))
        path = hf_module_path(key)
        rank_pattern.append((path, int(a.shape[0])))
        alpha_pattern.append((path, float(a.shape[0])))
    if not factors:
        raise AdapterError("cannot build an adapter from an empty set of modules")
    targets = _check_targets(sorted({k[1] for k in factors}))
    r = max(v for _, v in rank_pattern)
    meta = AdapterMeta(base_model=base_model, targets=targets, r=r, alpha=float(r),
                       rank_pattern=tuple(rank_pattern), alpha_pattern=tuple(alpha_pattern),
                       use_rslora=False, dtype=str(jnp.dtype(dtype)), name=name,
                       layers=tuple(sorted({k[0] for k in factors})))
    return LoraAdapter(factors=factors, meta=meta)
