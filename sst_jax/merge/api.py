"""One interface for every merge method: registry, input validation, result and export.

    result = merge("ties", [u1, u2], [0.5, 0.5], safety=s, alpha=1.0, density=0.2)
    result.to_branches()            # {ModuleKey: (LowRank, ...)} for sst_jax.models.forward
    result.to_dense()               # {ModuleKey: ΔW (out, in)}
    result.to_peft(dir, rank=None)  # exact when low-rank, SVD-truncated (error reported) otherwise

Inputs are validated once here (same base model, matching target modules, shapes, finite
values, weights); methods receive a `MergeInputs` and return a `MergeResult`. Adapters may
have different ranks. An adapter is a `sst_jax.lora.LoraAdapter` or a plain
{ModuleKey: LowRank | tuple[LowRank, ...]} mapping.

With a safety adapter S and weight α, methods that know nothing about safety (TA, TIES, DARE,
magnitude pruning, Fisher merging) treat α·ΔW_S as one more task vector.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import typing
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sst_jax.errors import AdapterMismatchError, HyperParameterError, NumericalError, SstJaxError
from sst_jax.io_utils import stable_hash
from sst_jax.lora.adapter import LoraAdapter, from_low_rank
from sst_jax.lora.algebra import export_merged_hf, fold, svd_truncate
from sst_jax.lora.check import adapter_fingerprint, fingerprint_differences
from sst_jax.lora.peft_io import save_peft
from sst_jax.models.branches import LowRank, ModuleKey, concat_lowrank, hf_module_path

# ----------------------------------------------------------------------------- registry


# Keyword arguments a method takes that are not hyper-parameters: precomputed statistics and a
# utility merge result are passed by the front door, never written in a config.
_INTERNAL_PARAMS = ("fishers", "utility")
# Hyper-parameters that change speed or memory, never the result: kept out of cache keys.
PERFORMANCE_PARAMS = ("chunk",)


@dataclasses.dataclass(frozen=True)
class Param:
    """One declared hyper-parameter of a merge method, read from its signature."""

    name: str
    annotation: str
    default: Any
    choices: tuple | None = None

    def parse(self, text: Any, method: str) -> Any:
        """The value of `--set name=text` (a string) or of a config/library entry (any type),
        checked against this parameter's annotation and choices."""
        ann = self.annotation
        optional = "None" in ann
        if text is None or (isinstance(text, str) and text.lower() in ("none", "null") and optional):
            if optional:
                return None
            raise HyperParameterError(f"method {method!r}: {self.name} cannot be None ({ann})")
        if self.choices is not None:
            if text not in self.choices:
                raise HyperParameterError(f"method {method!r}: {self.name} must be one of {list(self.choices)}, "
                                          f"got {text!r}")
            return text
        kinds = [k for k in ("bool", "int", "float", "str") if re.search(rf"\b{k}\b", ann)]
        for kind in kinds:
            value = _coerce(text, kind)
            if value is not _INVALID:
                return value
        if not kinds:  # an annotation we cannot check (e.g. a structured value): passed as given
            return text
        words = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text"}
        kind = " or ".join(words[k] for k in kinds) + (" (or None)" if optional else "")
        raise HyperParameterError(f"method {method!r}: {self.name} must be {kind}, got {text!r}")

    def describe(self) -> str:
        kind = f"one of {list(self.choices)}" if self.choices else self.annotation
        return f"{self.name}: {kind} = {self.default!r}"


_INVALID = object()


def _coerce(value: Any, kind: str) -> Any:
    """value as `kind` (bool/int/float/str), from its string form or its own type; _INVALID if not."""
    if isinstance(value, str):
        text = value.strip()
        if kind == "bool":
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
                text.lower(), _INVALID)
        if kind == "int":
            return int(text) if re.fullmatch(r"[+-]?\d+", text) else _INVALID
        if kind == "float":
            try:
                return float(text)
            except ValueError:
                return _INVALID
        return value
    if kind == "bool":
        return value if isinstance(value, bool) else _INVALID
    if isinstance(value, bool):
        return _INVALID
    if kind == "int":
        return value if isinstance(value, int) else _INVALID
    if kind == "float":
        return float(value) if isinstance(value, (int, float)) else _INVALID
    return _INVALID


def _declared_params(fn: Callable) -> tuple[Param, ...]:
    """Every keyword-only parameter of fn (after `inputs`) except the internal ones."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in _INTERNAL_PARAMS:
            continue
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        choices = None
        lit = re.search(r"Literal\[([^\]]*)\]", ann)
        if lit:
            choices = tuple(x.strip().strip("'\"") for x in lit.group(1).split(","))
        elif typing.get_origin(alias := fn.__globals__.get(ann)) is typing.Literal:
            choices = tuple(typing.get_args(alias))  # a type alias of a Literal, e.g. FisherKind
        out.append(Param(p.name, ann, p.default, choices))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered merge method.

    exact: the result is kept as exact low-rank factors. params: its hyper-parameters (from
    its signature). needs: what it cannot run without — "safety" (a safety adapter) and the
    datasets its statistics use ("harmful", "benign", "utility" = one per utility adapter).
    statistics(inputs, data, **stat_hparams) computes what the method takes as `fishers=`
    (cacheable); statistics_params are the hyper-parameters that change it.
    """

    name: str
    fn: Callable[..., "MergeResult"]
    exact: bool
    data_aware: bool
    doc: str
    params: tuple[Param, ...] = ()
    needs: tuple[str, ...] = ()
    statistics: Callable | None = None
    statistics_params: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """The first sentence of the method's docstring."""
        first = self.doc.split("\n\n")[0].replace("\n", " ").strip()
        return first.split(". ")[0].rstrip(".") + "." if first else ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        close = difflib.get_close_matches(name, [p.name for p in self.params], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HyperParameterError(f"method {self.name!r} has no hyper-parameter {name!r}{hint}; its parameters: {known}")

    def parse_hparams(self, hparams: Mapping[str, Any] | None) -> dict[str, Any]:
        """Checked and typed hyper-parameters: unknown names and bad values fail here, before
        any work."""
        return {name: self.param(name).parse(value, self.name) for name, value in (hparams or {}).items()}


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, exact: bool, data_aware: bool = False, needs: Sequence[str] = (),
             statistics: Callable | None = None, statistics_params: Sequence[str] = ()):
    """Decorator: `fn(inputs: MergeInputs, **hparams) -> MergeResult` becomes method `name`;
    its keyword-only parameters are its declared hyper-parameters."""

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"merge method {name!r} is registered twice")
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, exact=exact, data_aware=data_aware,
                                     doc=(fn.__doc__ or "").strip(), params=_declared_params(fn),
                                     needs=tuple(needs), statistics=statistics,
                                     statistics_params=tuple(statistics_params))
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HyperParameterError(f"unknown merge method {name!r}{hint}; available: {', '.join(list_methods())}")
    return _REGISTRY[name]


def list_methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class MergeInputs:
    """Validated inputs. utility[i] and safety map every key in `keys` to one LowRank
    (a module an adapter does not target is absent from its dict: zero ΔW)."""

    utility: tuple[dict[ModuleKey, LowRank], ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]
    keys: tuple[ModuleKey, ...]
    shapes: dict[ModuleKey, tuple[int, int]]
    safety: dict[ModuleKey, LowRank] | None = None
    alpha: float = 1.0
    base_model: str | None = None
    model: Any = None
    data: Any = None
    key: jax.Array | None = None

    def task_vectors(self, include_safety: bool = True) -> tuple[list[dict[ModuleKey, LowRank]], list[float], list[str]]:
        """(adapters, weights, names), with (S, α, 'safety') appended when present."""
        adapters, weights, names = list(self.utility), list(self.weights), list(self.names)
        if include_safety and self.safety is not None:
            adapters.append(self.safety)
            weights.append(self.alpha)
            names.append("safety")
        return adapters, weights, names

    def stacked_deltas(self, key: ModuleKey, include_safety: bool = True) -> tuple[jax.Array, jax.Array]:
        """(ΔW stack (n, out, in) float32 with zeros for untargeted modules, weights (n,))."""
        adapters, weights, _ = self.task_vectors(include_safety)
        shape = self.shapes[key]
        stack = [a[key].delta() if key in a else jnp.zeros(shape, jnp.float32) for a in adapters]
        return jnp.stack(stack), jnp.asarray(weights, jnp.float32)

    def utility_lowrank(self, key: ModuleKey) -> LowRank | None:
        """Σ wᵢ ΔW_Uᵢ at `key` as exact concatenated factors (None if no utility targets it)."""
        parts = [(a[key], w) for a, w in zip(self.utility, self.weights) if key in a]
        return concat_lowrank(parts) if parts else None


def _lowrank_shape(lr: LowRank) -> tuple[int, int]:
    return int(lr.b.shape[0]), int(lr.a.shape[1])


def _as_lowrank_map(adapter: Any, name: str) -> tuple[dict[ModuleKey, LowRank], str | None]:
    """{ModuleKey: LowRank} and the base model id (None if unknown) of one adapter."""
    if hasattr(adapter, "low_rank") and hasattr(adapter, "meta"):
        return dict(adapter.low_rank()), getattr(adapter.meta, "base_model", None)
    if isinstance(adapter, MergeResult):
        return {k: concat_lowrank([(lr, 1.0) for lr in v]) for k, v in adapter.to_branches().items()}, \
            adapter.report.get("base_model")
    if isinstance(adapter, Mapping):
        out = {}
        for k, v in adapter.items():
            if not (isinstance(k, tuple) and len(k) == 2):
                raise AdapterMismatchError(f"adapter {name!r}: module key {k!r} is not a (layer, module) pair")
            if isinstance(v, LowRank):
                out[(int(k[0]), str(k[1]))] = v
            elif isinstance(v, (tuple, list)) and v and all(isinstance(x, LowRank) for x in v):
                out[(int(k[0]), str(k[1]))] = v[0] if len(v) == 1 else concat_lowrank([(x, 1.0) for x in v])
            else:
                raise AdapterMismatchError(f"adapter {name!r}, module {hf_module_path(k)}: expected LowRank "
                                           f"branches, got {type(v).__name__}")
        return out, None
    raise AdapterMismatchError(f"adapter {name!r}: expected a LoraAdapter or a {{ModuleKey: LowRank}} mapping, "
                               f"got {type(adapter).__name__}")


def _adapter_name(adapter: Any, default: str) -> str:
    meta = getattr(adapter, "meta", None)
    return str(getattr(meta, "name", default)) if meta is not None else default


def _check_finite(lrmap: Mapping[ModuleKey, LowRank], name: str) -> None:
    for key, lr in lrmap.items():
        for field in ("a", "b", "core", "scale"):
            x = getattr(lr, field)
            if x is not None and not bool(np.all(np.isfinite(np.asarray(x, np.float64)))):
                raise NumericalError(f"adapter {name!r}, module {hf_module_path(key)}: {field} has NaN/Inf entries")


def validate_inputs(utility_adapters: Sequence[Any], weights: Sequence[float] | None = None, *,
                    safety: Any = None, alpha: float = 1.0, model: Any = None, modules: str = "strict",
                    names: Sequence[str] | None = None, data: Any = None,
                    key: jax.Array | None = None) -> MergeInputs:
    """Normalize and check merge inputs; raise AdapterMismatchError / NumericalError on bad input.

    modules: "strict" (every adapter must target the same modules) or "union" (a module an
    adapter does not target counts as ΔW = 0 for it).
    """
    if isinstance(utility_adapters, Mapping) or hasattr(utility_adapters, "low_rank"):
        utility_adapters = [utility_adapters]
    utility_adapters = list(utility_adapters)
    if not utility_adapters:
        raise AdapterMismatchError("merge needs at least one utility adapter; got an empty list")
    n = len(utility_adapters)
    if names is None:
        names = [_adapter_name(a, f"utility[{i}]") for i, a in enumerate(utility_adapters)]
    names = [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"got {len(names)} names for {n} utility adapters")
    weights = [1.0] * n if weights is None else [float(w) for w in np.asarray(weights, np.float64).reshape(-1)]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} utility adapters ({names})")
    if not all(math.isfinite(w) for w in weights) or not math.isfinite(float(alpha)):
        raise NumericalError(f"merge weights must be finite; got weights={weights}, alpha={alpha}")
    if modules not in ("strict", "union"):
        raise ValueError(f"modules must be 'strict' or 'union', got {modules!r}")

    maps, bases = [], []
    for a, nm in zip(utility_adapters, names):
        m, base = _as_lowrank_map(a, nm)
        maps.append(m)
        bases.append((nm, base))
    safety_map = None
    if safety is not None:
        safety_map, sbase = _as_lowrank_map(safety, "safety")
        bases.append(("safety", sbase))
    all_maps = maps + ([safety_map] if safety_map is not None else [])
    all_names = names + (["safety"] if safety_map is not None else [])

    known = {b for _, b in bases if b}
    fingerprints = [(nm, fp) for a, nm in zip(utility_adapters + ([safety] if safety is not None else []), all_names)
                    if isinstance(a, LoraAdapter) and (fp := adapter_fingerprint(a))]
    for nm, fp in fingerprints[1:]:
        diff = fingerprint_differences(fingerprints[0][1], fp)
        if diff:
            raise AdapterMismatchError(f"adapters were trained on different base models: {fingerprints[0][0]!r} vs "
                                       f"{nm!r} differ in {', '.join(diff)}; merging them is meaningless")
    if len(known) > 1:
        # A name is not an identity (a snapshot folder, a renamed copy, a hub id): recorded
        # architecture fingerprints (above) and shapes (below) decide; differing names warn.
        listing = ", ".join(f"{nm}: {b!r}" for nm, b in bases if b)
        logging.warning("adapters name different base models (%s); merging since their architectures agree", listing)
    for m, nm in zip(all_maps, all_names):
        if not m:
            raise AdapterMismatchError(f"adapter {nm!r} targets no modules")
        _check_finite(m, nm)

    key_sets = [set(m) for m in all_maps]
    union = set().union(*key_sets)
    if modules == "strict":
        for m, nm in zip(all_maps, all_names):
            missing, extra = sorted(union - set(m)), sorted(set(m) - key_sets[0])
            if missing or extra:
                diff = [hf_module_path(k) for k in (missing or extra)][:4]
                raise AdapterMismatchError(
                    f"adapter {nm!r} targets different modules than {all_names[0]!r} "
                    f"(e.g. {'missing' if missing else 'extra'}: {diff}); pass modules='union' to treat an "
                    "untargeted module as ΔW = 0")
        if not set.intersection(*key_sets):
            raise AdapterMismatchError(f"adapters {all_names} target disjoint module sets")

    shapes: dict[ModuleKey, tuple[int, int]] = {}
    for m, nm in zip(all_maps, all_names):
        for k, lr in m.items():
            if lr.a.ndim != 2 or lr.b.ndim != 2:
                raise AdapterMismatchError(f"adapter {nm!r}, module {hf_module_path(k)}: A and B must be matrices, "
                                           f"got shapes {lr.a.shape}, {lr.b.shape}")
            r_in = lr.a.shape[0] if lr.core is None else lr.core.shape[1]
            r_out = lr.b.shape[1] if lr.core is None else lr.core.shape[0]
            if lr.a.shape[0] != r_in or lr.b.shape[1] != r_out:
                raise AdapterMismatchError(f"adapter {nm!r}, module {hf_module_path(k)}: inconsistent factor "
                                           f"shapes A {lr.a.shape}, B {lr.b.shape}, core "
                                           f"{None if lr.core is None else lr.core.shape}")
            shape = _lowrank_shape(lr)
            if k in shapes and shapes[k] != shape:
                raise AdapterMismatchError(f"adapter {nm!r}, module {hf_module_path(k)}: ΔW shape {shape} differs "
                                           f"from another adapter's {shapes[k]}")
            shapes[k] = shape
    if model is not None:
        config = getattr(model, "config", model)
        for k, shape in shapes.items():
            if not 0 <= k[0] < int(config.n_layers):
                raise AdapterMismatchError(f"module {hf_module_path(k)} is beyond the base model's "
                                           f"{config.n_layers} layers")
            want = tuple(int(x) for x in config.module_shape(k[1]))
            if want != shape:
                who = [nm for m, nm in zip(all_maps, all_names) if k in m]
                raise AdapterMismatchError(
                    f"adapter {who[0]!r} targets {hf_module_path(k)} with ΔW of shape {shape} but the base model "
                    f"{getattr(model, 'name', '')!r} has {want}. Was it trained on another base model?")
    return MergeInputs(utility=tuple(maps), weights=tuple(weights), names=tuple(names),
                       keys=tuple(sorted(union)), shapes=shapes, safety=safety_map, alpha=float(alpha),
                       base_model=sorted(known)[0] if known else None, model=model, data=data, key=key)


# ----------------------------------------------------------------------------- result


def _dense_to_lowrank(delta: jax.Array) -> LowRank:
    """A full-rank LowRank holding ΔW exactly (identity on the smaller side)."""
    out_dim, in_dim = delta.shape
    if out_dim <= in_dim:
        return LowRank(a=delta, b=jnp.eye(out_dim, dtype=delta.dtype), scale=1.0)
    return LowRank(a=jnp.eye(in_dim, dtype=delta.dtype), b=delta, scale=1.0)


class DenseModules(Mapping):
    """Dense ΔW per module produced on demand by `produce(key)` (a dense method's merge of that
    module), so that no more than the modules asked for are ever held.

    Indexing (`dense[key]`, `.items()`, `to_dense`, `to_branches`) produces a module once and
    keeps it, like a dict; `stream(key)` produces it without keeping it (exports: produce,
    truncate or fold, drop), so an export holds one module at a time. Listeners added with
    `on_produce(fn)` see every production, `fn(key, delta)` (the report's norms)."""

    def __init__(self, keys: Sequence[ModuleKey], produce: Callable[[ModuleKey], jax.Array]):
        self._keys = tuple(sorted(keys))
        self._known = frozenset(self._keys)
        self._produce = produce
        self._kept: dict[ModuleKey, jax.Array] = {}
        self._listeners: list[Callable[[ModuleKey, jax.Array], None]] = []

    def on_produce(self, fn: Callable[[ModuleKey, jax.Array], None]) -> None:
        self._listeners.append(fn)

    def stream(self, key: ModuleKey) -> jax.Array:
        """The module's ΔW without keeping it (the kept one when it was already produced)."""
        if key in self._kept:
            return self._kept[key]
        if key not in self._known:
            raise KeyError(key)
        delta = self._produce(key)
        for fn in self._listeners:
            fn(key, delta)
        return delta

    def __getitem__(self, key: ModuleKey) -> jax.Array:
        if key not in self._kept:
            self._kept[key] = self.stream(key)
        return self._kept[key]

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"DenseModules({len(self._keys)} modules, {len(self._kept)} kept)"


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """A merged ΔW per module: exact low-rank `factors` (several branches may share a module,
    they add up) and/or `dense` ΔW (out, in): a dict, or `DenseModules` produced module by module
    (TIES, DARE, magnitude pruning, Fisher merging). `report` is JSON-able."""

    method: str
    factors: dict[ModuleKey, tuple[LowRank, ...]]
    dense: Mapping[ModuleKey, jax.Array]
    report: dict

    @property
    def keys(self) -> tuple[ModuleKey, ...]:
        return tuple(sorted(set(self.factors) | set(self.dense)))

    @property
    def exact(self) -> bool:
        return not self.dense

    def to_branches(self) -> dict[ModuleKey, tuple[LowRank, ...]]:
        """Side branches for `forward`; a dense ΔW becomes one full-rank LowRank (exact)."""
        out = {k: tuple(v) for k, v in self.factors.items()}
        for k, d in self.dense.items():
            out[k] = out.get(k, ()) + (_dense_to_lowrank(d),)
        return {k: out[k] for k in sorted(out)}

    def delta(self, key: ModuleKey, *, keep: bool = True) -> jax.Array:
        """The module's ΔW (out, in) in float32. keep=False: a DenseModules module is produced
        without being kept (one module at a time; the same values)."""
        total = None
        for lr in self.factors.get(key, ()):
            total = lr.delta() if total is None else total + lr.delta()
        if key in self.dense:
            stream = not keep and isinstance(self.dense, DenseModules)
            d = jnp.asarray(self.dense.stream(key) if stream else self.dense[key], jnp.float32)
            total = d if total is None else total + d
        return total

    def to_dense(self) -> dict[ModuleKey, jax.Array]:
        return {k: self.delta(k) for k in self.keys}

    def rank(self, key: ModuleKey) -> int | None:
        """Rank of the exact factor form (Σ branch ranks); None for a dense module."""
        if key in self.dense:
            return None
        return int(sum(lr.a.shape[0] for lr in self.factors[key]))

    def to_lowrank(self, rank: int | None = None) -> tuple[dict[ModuleKey, LowRank], dict[str, float]]:
        """One LowRank per module: exact for factor modules (branches concatenated);
        dense modules SVD-truncated at `rank` (required then). Returns (modules, rel. errors)."""
        out, errors = {}, {}
        for k in self.keys:
            if k in self.dense:
                if rank is None:
                    raise SstJaxError(f"merge {self.method!r} produced a dense ΔW at {hf_module_path(k)}; "
                                      "exporting it as LoRA needs a stated rank (to_peft(dir, rank=...))")
                low, err = svd_truncate(self.delta(k, keep=False), rank)  # one dense module at a time
                out[k], errors[hf_module_path(k)] = low, float(err)
            else:
                out[k] = concat_lowrank([(lr, 1.0) for lr in self.factors[k]])
        return out, errors

    def to_adapter(self, rank: int | None = None, *, name: str | None = None):
        """A `sst_jax.lora.LoraAdapter` (per-module rank and α = rank, so s = 1) and the
        relative truncation error of each SVD-truncated module."""
        modules, errors = self.to_lowrank(rank)
        adapter = from_low_rank(modules, base_model=self.report.get("base_model"), name=name or self.method)
        return adapter, errors

    def to_peft(self, directory: str, rank: int | None = None, *, name: str | None = None,
                base_config: Any = None, base_hub_id: str | None = None) -> dict[str, float]:
        """Write a PEFT adapter directory; returns {module path: relative truncation error}.
        With base_config (the model's DecoderConfig) the adapter records the base's
        architecture fingerprint, which later loads check."""
        adapter, errors = self.to_adapter(rank, name=name)
        save_peft(adapter, directory, base_config=base_config, base_hub_id=base_hub_id)
        self.report["export"] = {"directory": str(directory), "rank": rank, "truncation_error": dict(errors)}
        if errors:
            logging.info("exported %s at rank %d; max relative truncation error %.3g", self.method, rank,
                         max(errors.values()))
        return errors


    def to_merged_params(self, model) -> Any:
        """The base model's params with W ← W + ΔW folded in (exact, dense), one module at a
        time: each module's ΔW is formed, folded and dropped (the merged weights are the output)."""
        params = model.params
        for k in self.keys:
            params = fold(params, {k: self.delta(k, keep=False)}, model.config)
        return params

    def to_merged_hf(self, model, directory: str) -> None:
        """Write the merged full weights as an HF model directory (exact for every method)."""
        export_merged_hf(model, self.to_merged_params(model), directory)


@jax.jit
def _frobenius_norm(us: tuple[jax.Array, ...], vs: tuple[jax.Array, ...], dense: jax.Array | None) -> jax.Array:
    """‖D + Σᵢ UᵢVᵢ‖_F without forming Σ UᵢVᵢ: with U = [Uᵢ] (out, R), V = [Vᵢ] (R, in),
    ‖UV‖² = Σ (UᵀU) ⊙ (VVᵀ) (R×R Grams), ‖D + UV‖² = ‖D‖² + 2 Σ (UᵀD) ⊙ V + ‖UV‖²."""
    with jax.default_matmul_precision("highest"):
        total = jnp.zeros((), jnp.float32)
        if us:
            u, v = jnp.concatenate(us, axis=1), jnp.concatenate(vs, axis=0)
            total = total + jnp.sum((u.T @ u) * (v @ v.T))
        if dense is not None:
            d = dense.astype(jnp.float32)
            total = total + jnp.sum(jnp.square(d))
            if us:
                total = total + 2.0 * jnp.sum((u.T @ d) * v)
    return jnp.sqrt(jnp.maximum(total, 0.0))


def weighted_norm(parts: Sequence[tuple[LowRank, float]], dense: jax.Array | None = None) -> float:
    """‖D + Σ wᵢ·ΔWᵢ‖_F for low-rank ΔWᵢ, exactly, from Gram matrices (no dense ΔWᵢ)."""
    pairs = [lr.factors() for lr, _ in parts]
    us = tuple(u * jnp.float32(w) for (u, _), (_, w) in zip(pairs, parts))
    return float(_frobenius_norm(us, tuple(v for _, v in pairs), dense))


def _module_norm(factors: Sequence[LowRank], dense: jax.Array | None) -> float:
    pairs = [lr.factors() for lr in factors]
    return float(_frobenius_norm(tuple(u for u, _ in pairs), tuple(v for _, v in pairs), dense))


def module_report(result_factors: Mapping[ModuleKey, tuple[LowRank, ...]],
                  dense: Mapping[ModuleKey, jax.Array]) -> dict[str, dict]:
    """Per-module rank (None when dense) and ‖ΔW‖_F (from r×r Gram matrices: no dense ΔW is
    formed for factor-only modules). A `DenseModules` module is not produced here: its norm is
    None until the module is produced (by any read or export; `make_result` fills it in then)."""
    out = {}
    lazy = isinstance(dense, DenseModules)
    for k in sorted(set(result_factors) | set(dense)):
        out[hf_module_path(k)] = {
            "rank": None if k in dense else int(sum(lr.a.shape[0] for lr in result_factors[k])),
            "norm": None if lazy and k in dense else _module_norm(result_factors.get(k, ()), dense.get(k)),
        }
    return out


def make_result(method: str, inputs: MergeInputs, *, factors: Mapping[ModuleKey, tuple[LowRank, ...]] | None = None,
                dense: Mapping[ModuleKey, jax.Array] | None = None, hparams: Mapping[str, Any] | None = None,
                stats: Mapping[str, Mapping[str, Any]] | None = None) -> MergeResult:
    """MergeResult with the common report (ranks, norms, weights) plus method stats per module."""
    factors = {k: tuple(v) for k, v in sorted((factors or {}).items())}
    if not isinstance(dense, DenseModules):
        dense = {k: v for k, v in sorted((dense or {}).items())}
    modules = module_report(factors, dense)
    if isinstance(dense, DenseModules):  # norms as the modules are produced (the same float as eagerly)
        dense.on_produce(lambda k, d: modules[hf_module_path(k)].update(norm=_module_norm(factors.get(k, ()), d)))
    for path, extra in (stats or {}).items():
        modules.setdefault(path, {}).update(extra)
    report = {
        "method": method,
        "hparams": {k: v for k, v in (hparams or {}).items() if _jsonable(v)},
        "adapters": list(inputs.names) + (["safety"] if inputs.safety is not None else []),
        "weights": list(inputs.weights),
        "alpha": inputs.alpha if inputs.safety is not None else None,
        "base_model": inputs.base_model,
        "exact": not dense,
        "modules": modules,
    }
    return MergeResult(method=method, factors=factors, dense=dense, report=report)


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v))


def module_hash(module: ModuleKey) -> int:
    """A stable 28-bit integer of the module path (same across runs and machines)."""
    return int(stable_hash(hf_module_path(module), length=7), 16)


def module_seed(key: jax.Array, module: ModuleKey, *extra: int) -> jax.Array:
    """PRNG key for one module: fold_in(key, hash(module path), *extra). Independent of the
    order modules are visited in, and of which other modules exist."""
    k = jax.random.fold_in(key, module_hash(module))
    for e in extra:
        k = jax.random.fold_in(k, int(e))
    return k


# ----------------------------------------------------------------------------- entry point


def merge(method: str, utility_adapters: Sequence[Any] | Any, weights: Sequence[float] | None = None, *,
          safety: Any = None, alpha: float = 1.0, model: Any = None, data: Any = None,
          key: jax.Array | None = None, modules: str = "strict", names: Sequence[str] | None = None,
          **hparams) -> MergeResult:
    """Merge utility adapters (weights default to 1) and an optional safety adapter (weight α).

    method: a name from `list_methods()`; hparams go to the method (see its docstring).
    model/data: the base model and datasets a data-aware method needs, unless its Fishers are
    passed precomputed (e.g. `fishers=` for sst/agl/fisher): see each method.
    key: PRNG key for random methods (DARE); they default to `seed=0` otherwise.
    """
    spec = get_method(method)
    inputs = validate_inputs(utility_adapters, weights, safety=safety, alpha=alpha, model=model,
                             modules=modules, names=names, data=data, key=key)
    result = spec.fn(inputs, **hparams)
    logging.info("merged %d adapter(s)%s with %s over %d modules", len(inputs.utility),
                 " + safety" if inputs.safety is not None else "", method, len(result.keys))
    return result
