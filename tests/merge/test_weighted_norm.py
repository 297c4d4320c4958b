"""weighted_norm: ‖D + Σ wᵢΔWᵢ‖_F from factors equals the dense computation."""

import jax
import numpy as np

from sst_jax.merge import weighted_norm
from sst_jax.models.branches import LowRank


def test_weighted_norm_equals_the_dense_norm(rng):
    out, inp = 24, 16
    parts = [(LowRank(a=rng.normal(size=(3, inp)).astype(np.float32), b=rng.normal(size=(out, 3)).astype(np.float32),
                      scale=0.7), 1.0),
             (LowRank(a=rng.normal(size=(2, inp)).astype(np.float32), b=rng.normal(size=(out, 4)).astype(np.float32),
                      core=rng.normal(size=(4, 2)).astype(np.float32)), -0.5)]
    dense = rng.normal(size=(out, inp)).astype(np.float32)
    expected = dense.astype(np.float64) + sum(w * np.asarray(lr.delta(), np.float64) for lr, w in parts)
    np.testing.assert_allclose(weighted_norm(parts, dense), np.linalg.norm(expected), rtol=1e-5)
    np.testing.assert_allclose(weighted_norm(parts), np.linalg.norm(expected - dense), rtol=1e-5)
