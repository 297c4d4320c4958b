"""Per-sample gradients and accumulators against explicit single-sample jax.grad loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sst_jax.fisher.per_sample import accumulate, module_vector, per_sample_grads


def mlp_loss(trainable, fixed, ex):
    """A small nonlinear per-sample loss over a two-module pytree (softmax cross-entropy)."""
    h = jnp.tanh(ex["x"] @ (fixed["w0"] + trainable["a"]["w"]).T + trainable["a"]["b"])
    logits = h @ trainable["b"].T
    return -jax.nn.log_softmax(logits)[ex["y"]]


def make(rng, n=20):
    trainable = {"a": {"w": jnp.asarray(rng.standard_normal((5, 4)) * 0.5, jnp.float32),
                       "b": jnp.asarray(rng.standard_normal(5) * 0.1, jnp.float32)},
                 "b": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)}
    fixed = {"w0": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.standard_normal((n, 4)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 3, n), jnp.int32)}
    return trainable, fixed, batch


def loop_grads(trainable, fixed, batch):
    n = batch["y"].shape[0]
    gs = [jax.grad(mlp_loss)(trainable, fixed, jax.tree.map(lambda x: x[i], batch)) for i in range(n)]
    return jax.tree.map(lambda *xs: np.stack(xs), *gs)


def test_per_sample_grads_equal_python_loop(rng):
    trainable, fixed, batch = make(rng)
    got = per_sample_grads(mlp_loss, trainable, batch, fixed=fixed, chunk=6)
    want = loop_grads(trainable, fixed, batch)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), got, want)


def test_mean_of_per_sample_grads_is_grad_of_batch_mean_loss(rng):
    trainable, fixed, batch = make(rng)
    got = per_sample_grads(mlp_loss, trainable, batch, fixed=fixed)
    batch_loss = lambda t: jnp.mean(jax.vmap(mlp_loss, (None, None, 0))(t, fixed, batch))  # noqa: E731
    want = jax.grad(batch_loss)(trainable)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g.mean(0), w, atol=1e-6), got, want)
    stats = accumulate(mlp_loss, trainable, [batch], fixed=fixed, stats=("mean",), progress=False)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), stats.mean, want)


@pytest.mark.parametrize("chunk", [1, 3, 7, 20])
def test_chunk_size_does_not_change_results(rng, chunk):
    trainable, fixed, batch = make(rng)
    ref = per_sample_grads(mlp_loss, trainable, batch, fixed=fixed, chunk=20)
    got = per_sample_grads(mlp_loss, trainable, batch, fixed=fixed, chunk=chunk, remat=chunk == 3)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), got, ref)
    s_ref = accumulate(mlp_loss, trainable, [batch], fixed=fixed, chunk=20, progress=False)
    s = accumulate(mlp_loss, trainable, [batch], fixed=fixed, chunk=chunk, progress=False)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7),
                 (s.diag, s.dense), (s_ref.diag, s_ref.dense))


def test_diag_and_dense_equal_explicit_second_moments(rng):
    trainable, fixed, batch = make(rng, n=23)
    g = loop_grads(trainable, fixed, batch)
    # Two blocks of different sizes (padding to the chunk is masked out).
    blocks = [jax.tree.map(lambda x: x[:15], batch), jax.tree.map(lambda x: x[15:], batch)]
    s = accumulate(mlp_loss, trainable, blocks, fixed=fixed, stats=("diag", "dense", "gram"),
                   chunk=4, progress=False)
    assert s.n_samples == 23
    jax.tree.map(lambda d, x: np.testing.assert_allclose(d, (x ** 2).mean(0), rtol=1e-5, atol=1e-8),
                 s.diag, g)
    for key in ("a", "b"):
        flat = np.stack([np.asarray(module_vector(jax.tree.map(lambda x: x[i], g[key])))
                         for i in range(23)])
        np.testing.assert_allclose(s.dense[key], flat.T @ flat / 23, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.gram[key], flat / np.sqrt(23), rtol=1e-5, atol=1e-7)
    assert s.dense["a"].shape == (25, 25) and s.dense["b"].shape == (15, 15)


def test_dense_batches_equal_size_modules_without_mixing_them(rng):
    mods = {(i, "q_proj"): jnp.asarray(rng.standard_normal((3, 3)), jnp.float32) for i in range(3)}
    x = jnp.asarray(rng.standard_normal((10, 3)), jnp.float32)

    def loss(t, fixed, ex):
        return sum(jnp.sin(ex @ t[k] @ ex) * (k[0] + 1) for k in t)

    g = per_sample_grads(loss, mods, x)
    s = accumulate(loss, mods, [x], stats=("dense",), chunk=4, progress=False)
    for k in mods:
        flat = np.asarray(g[k]).reshape(10, 9)
        np.testing.assert_allclose(s.dense[k], flat.T @ flat / 10, rtol=1e-5, atol=1e-7)


def test_unknown_statistic_is_rejected(rng):
    trainable, fixed, batch = make(rng)
    with pytest.raises(ValueError, match="unknown statistics"):
        accumulate(mlp_loss, trainable, [batch], fixed=fixed, stats=("kfac",), progress=False)
