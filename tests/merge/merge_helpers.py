"""Fixtures for merge tests: random LoRA adapters as {ModuleKey: LowRank}, built in code."""

import jax.numpy as jnp
import numpy as np

from sst_jax.models.branches import LowRank

SHAPES = {"q_proj": (8, 6), "v_proj": (4, 6), "down_proj": (6, 10)}  # as the tiny PEFT Llama in test_merge_peft


def random_adapter(rng: np.random.Generator, r: int, *, layers=(0, 1), modules=tuple(SHAPES), scale=2.0):
    """{(layer, module): LowRank} with A, B ~ N(0, 1) (B non-zero, as after training)."""
    out = {}
    for layer in layers:
        for m in modules:
            o, i = SHAPES[m]
            out[(layer, m)] = LowRank(a=jnp.asarray(rng.normal(size=(r, i)), jnp.float32),
                                      b=jnp.asarray(rng.normal(size=(o, r)), jnp.float32), scale=scale)
    return out


def dense_adapter(mats: dict):
    """{key: LowRank} whose ΔW is exactly the given matrix (A = I, B = ΔW, scale 1)."""
    return {k: LowRank(a=jnp.eye(np.shape(m)[1], dtype=jnp.float32), b=jnp.asarray(m, jnp.float32), scale=1.0)
            for k, m in mats.items()}


def np_delta(lr) -> np.ndarray:
    """ΔW in float64 numpy, computed independently of LowRank.delta."""
    b = np.asarray(lr.b, np.float64)
    if lr.core is not None:
        b = b @ np.asarray(lr.core, np.float64)
    return float(lr.scale) * b @ np.asarray(lr.a, np.float64)
