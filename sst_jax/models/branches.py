"""Side branches: low-rank updates passed to the decoder at call time.

The frozen weights and the branches are separate pytrees, so one loaded model serves LoRA
training, SST's r×r core matrices, per-sample gradients and every merge without copying it.

A target linear layer computes y = x Wᵀ (+ bias) and then, for every branch attached to its
module key,

    LowRank:    y += scale · x Aᵀ Cᵀ Bᵀ       (C = `core`, identity when None)
                ΔW = scale · B C A,  A: (r_in, in), C: (r_out, r_in), B: (out, r_out)
    OutputTap:  y += delta                    (delta: (batch, seq, out), zeros for K-FAC taps;
                                               ∂L/∂delta is the layer's output gradient)

LoRA in PEFT layout is LowRank(a=lora_A, b=lora_B, scale=α/r). SST's core space of S with
ΔW_S = P Σ Qᵀ is LowRank(a=Qᵀ, b=P, core=M, scale=1). Several branches on one module add up.

Branches pytree:  dict[ModuleKey, tuple[LowRank | OutputTap, ...]]
ModuleKey:        (layer index, module name), module name in MODULE_NAMES. Never dict order.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
MODULE_NAMES = ATTENTION_MODULES + MLP_MODULES

ModuleKey = tuple[int, str]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
    """ΔW = scale · B · C · A (C = identity when `core` is None). All fields are leaves."""

    a: jax.Array  # (r_in, in)
    b: jax.Array  # (out, r_out)
    scale: jax.Array | float = 1.0
    core: jax.Array | None = None  # (r_out, r_in)

    def apply(self, x: jax.Array) -> jax.Array:
        h = x @ self.a.T.astype(x.dtype)
        if self.core is not None:
            h = h @ self.core.T.astype(x.dtype)
        return (h @ self.b.T.astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """(U, V) in float32 with U·V = ΔW: U = scale·B·C (out, r_in), V = A (r_in, in).
        The one place the s·B·C product is formed; every other low-rank algebra uses it."""
        b = jnp.asarray(self.b, jnp.float32)
        if self.core is not None:
            b = b @ jnp.asarray(self.core, jnp.float32)
        return jnp.asarray(self.scale, jnp.float32) * b, jnp.asarray(self.a, jnp.float32)

    def delta(self) -> jax.Array:
        """The dense ΔW (out, in), in float32."""
        u, v = self.factors()
        return u @ v


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutputTap:
    """Adds `delta` to the layer output; a zero tap exposes ∂L/∂y (K-FAC's G factor)."""

    delta: jax.Array  # (batch, seq, out)

    def apply(self, x: jax.Array) -> jax.Array:
        return self.delta.astype(x.dtype)


def concat_lowrank(parts: Sequence[tuple[LowRank, float]]) -> LowRank:
    """Σ wᵢ·ΔWᵢ exactly as one LowRank: [w₁s₁B₁C₁ … wₙsₙBₙCₙ]·[A₁; …; Aₙ], scale 1 (rank Σrᵢ,
    PEFT's `cat`). Weights may be traced (the sum is differentiable in w)."""
    if not parts:
        raise ValueError("concat_lowrank needs at least one part")
    us, vs = zip(*[lr.factors() for lr, _ in parts])
    b = jnp.concatenate([u * jnp.asarray(w, jnp.float32) for u, (_, w) in zip(us, parts)], axis=1)
    return LowRank(a=jnp.concatenate(vs, axis=0), b=b, scale=1.0)


Branch = Union[LowRank, OutputTap]
Branches = Mapping[ModuleKey, tuple[Branch, ...]]


def module_group(module: str) -> str:
    """'self_attn' or 'mlp': the HF/PEFT submodule that holds `module`."""
    if module in ATTENTION_MODULES:
        return "self_attn"
    if module in MLP_MODULES:
        return "mlp"
    raise ValueError(f"unknown module {module!r}; expected one of {MODULE_NAMES}")


def hf_module_path(key: ModuleKey) -> str:
    """(3, 'q_proj') -> 'model.layers.3.self_attn.q_proj' (HF transformers / PEFT naming)."""
    layer, module = key
    return f"model.layers.{layer}.{module_group(module)}.{module}"


_PATH_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(MODULE_NAMES) + r")(?:\.|$)")


def parse_module_path(path: str) -> ModuleKey:
    """Canonical key of any HF/PEFT module path containing 'layers.N.(self_attn|mlp).NAME'."""
    m = _PATH_RE.search(path)
    if m is None:
        raise ValueError(f"cannot find 'layers.<i>.(self_attn|mlp).<module>' in {path!r}")
    return int(m.group(1)), m.group(2)


def add_branches(*trees: Branches) -> dict[ModuleKey, tuple[Branch, ...]]:
    """Union of branch pytrees; branches on the same module are kept side by side (summed)."""
    out: dict[ModuleKey, tuple[Branch, ...]] = {}
    for tree in trees:
        for key, branches in tree.items():
            out[key] = out.get(key, ()) + tuple(branches)
    return out
