"""Fisher estimators on the tiny decoder and on hand-built models, against explicit jax.grad
loops, numpy SVD, and the closed-form Fisher of a linear softmax layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from sst_jax.data.chat import collate, encode_chat
from sst_jax.fisher import (core_fisher, core_space, core_spaces, diagonal_fisher, kfac_accumulate,
                            kfac_factors, sample_model_labels, with_targets)
from sst_jax.fisher.per_sample import accumulate
from sst_jax.models import LowRank, forward, load_model, response_nll

PAIRS = [("What is 2+2?", "It is 4."), ("Name a color.", "Blue is a color."),
         ("Say hi.", "Hi there!"), ("Count to three.", "One, two, three."),
         ("Is ice cold?", "Yes, ice is cold."), ("Spell cat.", "C-A-T.")]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0)


@pytest.fixture(scope="module")
def batch(tiny):
    enc = [encode_chat(tiny.tokenizer, p, r) for p, r in PAIRS]
    return collate([e[0] for e in enc], tiny.config.pad_token_id, loss_masks=[e[1] for e in enc])


def lora(rng, config, key, r=2, scale=0.5):
    out, inp = config.module_shape(key[1])
    return LowRank(a=jnp.asarray(rng.standard_normal((r, inp)) * 0.3, jnp.float32),
                   b=jnp.asarray(rng.standard_normal((out, r)) * 0.3, jnp.float32), scale=scale)


def test_model_labels_follow_the_given_distribution():
    # Known logits: position 0 predicts from p0, position 1 from p1 (uniform-ish and peaked).
    p0 = np.array([0.1, 0.2, 0.3, 0.4, 0.0]) + 1e-12
    p1 = np.array([0.7, 0.1, 0.1, 0.05, 0.05])
    n = 4000
    logits = jnp.asarray(np.broadcast_to(np.log(np.stack([p0, p1, p1])), (n, 3, 5)), jnp.float32)
    ids = jnp.full((n, 3), 4, jnp.int32)
    mask = jnp.asarray(np.broadcast_to([0, 1, 1], (n, 3)), jnp.int32)
    y = np.asarray(sample_model_labels(logits, ids, mask, jax.random.key(0)))
    assert np.all(y[:, 0] == 4)  # prompt positions keep the dataset token
    assert np.all(y[:, 1] != 4)  # a zero-probability token is never drawn
    for t, p in ((1, p0), (2, p1)):
        counts = np.bincount(y[:, t], minlength=5)
        keep = p > 1e-6
        assert scipy.stats.chisquare(counts[keep], n * p[keep] / p[keep].sum()).pvalue > 1e-3


def test_model_labels_on_tiny_are_drawn_from_its_next_token_distribution(tiny, batch):
    key = jax.random.key(3)
    out = with_targets(tiny.config, tiny.params, batch, labels="model", key=key)
    logits = forward(tiny.config, tiny.params, batch["input_ids"], batch["attention_mask"])
    want = sample_model_labels(logits, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["loss_mask"]), key)
    np.testing.assert_array_equal(out["targets"], want)
    resp = batch["loss_mask"] == 1
    np.testing.assert_array_equal(out["targets"][~resp], batch["input_ids"][~resp])
    assert np.mean(out["targets"][resp] != batch["input_ids"][resp]) > 0.5  # random-init model


def test_core_space_is_the_compact_svd_of_delta_w(rng):
    br = LowRank(a=jnp.asarray(rng.standard_normal((3, 10)), jnp.float32),
                 b=jnp.asarray(rng.standard_normal((7, 3)), jnp.float32), scale=0.7)
    cs = core_space(br)
    dw = np.asarray(br.delta())
    np.testing.assert_allclose(cs.sigma, np.linalg.svd(dw, compute_uv=False)[:3], rtol=1e-5)
    np.testing.assert_allclose(cs.delta(jnp.diag(cs.sigma)), dw, atol=1e-5)
    np.testing.assert_allclose(cs.p.T @ cs.p, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(cs.q.T @ cs.q, np.eye(3), atol=1e-5)


@pytest.mark.parametrize("at", ["zero", "sigma"])
def test_core_fisher_equals_explicit_per_sample_outer_products(tiny, batch, rng, at):
    cfg = tiny.config
    safety = {(1, "q_proj"): (lora(rng, cfg, (1, "q_proj")),), (0, "down_proj"): (lora(rng, cfg, (0, "down_proj")),)}
    utility = {(0, "v_proj"): (lora(rng, cfg, (0, "v_proj")),)}
    spaces = core_spaces(safety)
    got = core_fisher(tiny, utility, spaces, [batch], at=at, chunk=4, progress=False)
    assert got.n_samples == len(PAIRS)

    def loss(cores, i):
        br = dict(utility)
        for k, m in cores.items():
            br[k] = (LowRank(a=spaces[k].q.T, b=spaces[k].p, core=m),)
        sl = slice(i, i + 1)
        logits = forward(cfg, tiny.params, batch["input_ids"][sl], batch["attention_mask"][sl], branches=br)
        return response_nll(logits, batch["input_ids"][sl], batch["loss_mask"][sl])[0]

    cores = {k: jnp.zeros((2, 2)) if at == "zero" else jnp.diag(s.sigma) for k, s in spaces.items()}
    gs = [jax.grad(loss)(cores, i) for i in range(len(PAIRS))]
    for k in spaces:
        flat = np.stack([np.asarray(g[k]).reshape(-1) for g in gs])
        want = flat.T @ flat / len(PAIRS)
        assert got.dense[k].shape == (4, 4)
        np.testing.assert_allclose(got.dense[k], want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_diagonal_fisher_of_lora_factors_equals_explicit(tiny, batch, rng):
    cfg = tiny.config
    key = (1, "v_proj")
    adapter = {key: (lora(rng, cfg, key),)}
    diag = diagonal_fisher(tiny, {}, adapter, [batch], chunk=4, progress=False)

    def loss(a, b, i):
        sl = slice(i, i + 1)
        br = {key: (LowRank(a=a, b=b, scale=adapter[key][0].scale),)}
        logits = forward(cfg, tiny.params, batch["input_ids"][sl], batch["attention_mask"][sl], branches=br)
        return response_nll(logits, batch["input_ids"][sl], batch["loss_mask"][sl])[0]

    gs = [jax.grad(loss, argnums=(0, 1))(adapter[key][0].a, adapter[key][0].b, i) for i in range(len(PAIRS))]
    want_a = np.mean([np.asarray(g[0]) ** 2 for g in gs], axis=0)
    want_b = np.mean([np.asarray(g[1]) ** 2 for g in gs], axis=0)
    np.testing.assert_allclose(diag[key][0].a, want_a, rtol=1e-4, atol=1e-6 * want_a.max())
    np.testing.assert_allclose(diag[key][0].b, want_b, rtol=1e-4, atol=1e-6 * want_b.max())


def linear_tap_loss(taps, fixed, sub):
    """One linear softmax layer y = x Wᵀ + tap, one token per sample, label sub['y']."""
    w = fixed
    logits = sub["x"] @ w.T + taps["lin"]
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), sub["y"][..., None], axis=-1)[..., 0, 0]
    return losses, {"lin": sub["x"]}, jnp.ones(sub["y"].shape, jnp.float32)


def test_kfac_equals_exact_fisher_for_a_single_linear_layer(rng):
    out, inp, n = 4, 3, 64
    w = jnp.asarray(rng.standard_normal((out, inp)), jnp.float32)
    x = np.broadcast_to(rng.standard_normal((1, 1, inp)), (n, 1, inp)).astype(np.float32)  # one input
    logits = np.asarray(x[0, 0] @ np.asarray(w).T)
    p = np.exp(logits - logits.max()); p /= p.sum()
    y = rng.choice(out, size=(n, 1), p=p).astype(np.int32)  # model labels: the true Fisher
    batch = {"x": x, "y": y}
    f = kfac_accumulate(linear_tap_loss, w, [batch], {"lin": out}, {"lin": inp}, chunk=16, progress=False)
    assert f.n_tokens == n and f.n_samples == n

    def loss(wt, fixed, ex):
        return linear_tap_loss({"lin": jnp.zeros((1, 1, out))}, wt["w"], jax.tree.map(lambda a: a[None], ex))[0][0]

    exact = accumulate(loss, {"w": w}, [batch], stats=("dense",), chunk=16, progress=False).dense["w"]
    np.testing.assert_allclose(np.kron(f.g["lin"], f.a["lin"]), exact, rtol=1e-5, atol=1e-7)


def test_kfac_factors_reproduce_weight_gradients_on_tiny(tiny, rng):
    # Last layer's down_proj (position-wise) with one response token: dL/dW = g xᵀ exactly, so
    # (dL/dW)(dL/dW)ᵀ = tr(A)·G and (dL/dW)ᵀ(dL/dW) = tr(G)·A.
    cfg = tiny.config
    ids, mask = encode_chat(tiny.tokenizer, "Hello?", "Hi")
    mask = [0] * (len(mask) - 1) + [1]
    b = collate([ids], cfg.pad_token_id, loss_masks=[mask])
    key = (cfg.n_layers - 1, "down_proj")
    f = kfac_factors(tiny, {}, [key], [b], chunk=1, progress=False)
    assert f.n_tokens == 1

    def loss(w):
        params = jax.tree.map(lambda v: v, tiny.params)
        params["layers"][key[0]]["down_proj"] = {"weight": w}
        logits = forward(cfg, params, b["input_ids"], b["attention_mask"])
        return response_nll(logits, b["input_ids"], b["loss_mask"])[0]

    gw = np.asarray(jax.grad(loss)(tiny.params["layers"][key[0]]["down_proj"]["weight"]), np.float64)
    a, g = np.asarray(f.a[key], np.float64), np.asarray(f.g[key], np.float64)
    np.testing.assert_allclose(gw @ gw.T, np.trace(a) * g, rtol=1e-4, atol=1e-6 * np.abs(gw @ gw.T).max())
    np.testing.assert_allclose(gw.T @ gw, np.trace(g) * a, rtol=1e-4, atol=1e-6 * np.abs(gw.T @ gw).max())
