"""The single core-space implementation (CoreSpace methods, several cores per module, an
explicit linearization point) and the tap-based diagonal Fisher of dense weights, against
numpy algebra and explicit per-sample jax.grad loops on the tiny decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sst_jax.data.chat import collate, encode_chat
from sst_jax.fisher import core_fisher, core_space, weight_diag_fisher
from sst_jax.models import LowRank, forward, load_model, response_nll

PAIRS = [("What is 2+2?", "It is 4."), ("Name a color.", "Blue is a color."),
         ("Say hi.", "Hi there!"), ("Count to three.", "One, two, three."),
         ("Is ice cold?", "Yes, ice is cold.")]
FIELDS = ("input_ids", "attention_mask", "loss_mask")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.fixture(scope="module")
def batch(tiny):
    enc = [encode_chat(tiny.tokenizer, p, r) for p, r in PAIRS]
    return collate([e[0] for e in enc], tiny.config.pad_token_id, loss_masks=[e[1] for e in enc])


def lora(rng, config, module, r, scale=0.5):
    out, inp = config.module_shape(module)
    return LowRank(a=jnp.asarray(rng.standard_normal((r, inp)) * 0.3, jnp.float32),
                   b=jnp.asarray(rng.standard_normal((out, r)) * 0.3, jnp.float32), scale=scale)


def _rows(batch, i):
    return tuple(jnp.asarray(batch[f][i:i + 1]) for f in FIELDS)


def test_core_space_branch_and_coords_invert_each_other(rng):
    s = lora(rng, load_model("tiny", seed=0).config, "q_proj", 3)
    cs = core_space(s)
    m = jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)
    np.testing.assert_allclose(cs.branch(m, scale=2.0).delta(), 2.0 * np.asarray(cs.delta(m)), atol=1e-5)
    np.testing.assert_allclose(cs.coords(cs.branch(m)), m, atol=1e-5)
    np.testing.assert_allclose(cs.coords(s), np.diag(cs.sigma), atol=1e-5)  # S itself is diag σ
    assert cs.r == cs.rank == 3


def test_core_fisher_with_several_cores_per_module_at_a_given_point(tiny, batch, rng):
    # Two experts on the same modules, keys (layer, module, i); linearized at w_i·diag σ_i.
    spaces, at = {}, {}
    for i, w in enumerate((0.5, 1.5)):
        for key in ((1, "q_proj"), (0, "down_proj")):
            spaces[key + (i,)] = s = core_space(lora(rng, tiny.config, key[1], 2))
            at[key + (i,)] = w * jnp.diag(s.sigma)
    got = core_fisher(tiny, {}, spaces, [batch], at=at, chunk=2, progress=False)
    assert got.n_samples == len(PAIRS)

    @jax.jit
    @jax.grad
    def grad(ms, ids, attn, lmask):
        br = {}
        for k, m in ms.items():
            br[k[:2]] = br.get(k[:2], ()) + (LowRank(a=spaces[k].q.T, b=spaces[k].p, core=m),)
        return response_nll(forward(tiny.config, tiny.params, ids, attn, branches=br), ids, lmask)[0]

    grads = [grad(at, *_rows(batch, i)) for i in range(len(PAIRS))]
    for k in spaces:
        g = np.stack([np.asarray(gr[k], np.float64).reshape(-1) for gr in grads])
        np.testing.assert_allclose(got.dense[k], g.T @ g / len(PAIRS), rtol=1e-4, atol=1e-9)


def test_core_fisher_at_sigma_equals_explicit_point(tiny, batch, rng):
    spaces = {(0, "v_proj"): core_space(lora(rng, tiny.config, "v_proj", 2))}
    by_name = core_fisher(tiny, {}, spaces, [batch], at="sigma", chunk=5, progress=False).dense
    explicit = core_fisher(tiny, {}, spaces, [batch], at={k: jnp.diag(s.sigma) for k, s in spaces.items()},
                           chunk=5, progress=False).dense
    np.testing.assert_allclose(by_name[(0, "v_proj")], explicit[(0, "v_proj")], rtol=1e-6, atol=1e-12)


def test_weight_diag_fisher_equals_squared_gradient_of_an_additive_dense_delta(tiny, batch, rng):
    # Reference: the previous definition, a dense D = 0 added as LowRank(a=I, b=D), at θ₀ + base.
    modules = [(0, "q_proj"), (1, "v_proj"), (1, "down_proj"), (1, "gate_proj")]
    base = {(1, "v_proj"): (lora(rng, tiny.config, "v_proj", 2),)}
    got = weight_diag_fisher(tiny, base, modules, [batch], chunk=2, progress=False)
    assert got.n_samples == len(PAIRS)

    @jax.jit
    @jax.grad
    def grad(ds, ids, attn, lmask):
        br = dict(base)
        for k, d in ds.items():
            br[k] = br.get(k, ()) + (LowRank(a=jnp.eye(d.shape[1]), b=d),)
        return response_nll(forward(tiny.config, tiny.params, ids, attn, branches=br), ids, lmask)[0]

    zeros = {k: jnp.zeros(tiny.config.module_shape(k[1]), jnp.float32) for k in modules}
    sq = [jax.tree.map(lambda x: np.asarray(x, np.float64) ** 2, grad(zeros, *_rows(batch, i)))
          for i in range(len(PAIRS))]
    for k in modules:
        want = np.mean([s[k] for s in sq], axis=0)
        assert np.max(want) > 1e-10  # a non-trivial comparison
        np.testing.assert_allclose(got.diag[k], want, rtol=1e-5, atol=1e-7 * np.max(want))


def test_weight_diag_fisher_does_not_depend_on_chunking(tiny, batch):
    modules = [(1, "o_proj")]
    one = weight_diag_fisher(tiny, {}, modules, [batch], chunk=1, progress=False).diag[(1, "o_proj")]
    four = weight_diag_fisher(tiny, {}, modules, [batch], chunk=4, progress=False).diag[(1, "o_proj")]
    np.testing.assert_allclose(one, four, rtol=1e-5, atol=1e-12)
