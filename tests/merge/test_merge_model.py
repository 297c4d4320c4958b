"""Merges on the tiny decoder: Fisher passes against an explicit per-sample loop, the SST
merge computed from data, and PEFT export whose logits equal the dense merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sst_jax.merge import core_space, merge, sst_fishers, sst_multi_fishers, validate_inputs
from sst_jax.merge.fisher_merge import task_fishers
from sst_jax.fisher import core_fisher, weight_diag_fisher
from sst_jax.models import LowRank, forward, load_model, response_nll

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", seed=0, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)


def _adapter(model, rng, r, std=0.3):
    out = {}
    for layer in range(model.config.n_layers):
        for m in TARGETS:
            o, i = model.config.module_shape(m)
            out[(layer, m)] = LowRank(a=jnp.asarray(rng.normal(size=(r, i)) / np.sqrt(i), jnp.float32),
                                      b=jnp.asarray(rng.normal(size=(o, r)) * std, jnp.float32), scale=2.0)
    return out


def _batch(model, rng, n, t=12):
    """Random token sequences, left-padded, loss on the second half (the 'response')."""
    ids = rng.integers(3, model.config.vocab_size, size=(n, t)).astype(np.int32)
    attn = np.ones((n, t), np.int32)
    attn[0, :3] = 0
    ids[0, :3] = model.config.pad_token_id
    loss = np.zeros((n, t), np.int32)
    loss[:, t // 2:] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def test_core_fisher_equals_mean_outer_product_of_per_sample_gradients(model, rng):
    u, s = _adapter(model, rng, 3), _adapter(model, rng, 2)
    data = _batch(model, rng, 5)
    spaces = {k: core_space(lr) for k, lr in s.items()}
    at = {k: jnp.zeros((2, 2)) for k in spaces}
    base = {k: (lr,) for k, lr in u.items()}
    stats = core_fisher(model, base, spaces, [data], at=at, chunk=2, progress=False)
    got = stats.dense
    assert stats.n_samples == 5

    @jax.jit
    @jax.grad
    def grad(ms, ids, attn, lmask):
        br = {k: (u[k], LowRank(a=spaces[k].q.T, b=spaces[k].p, core=ms[k])) for k in spaces}
        logits = forward(model.config, model.params, ids, attn, branches=br)
        return response_nll(logits, ids, lmask)[0]

    grads = [grad(at, *(data[f][i:i + 1] for f in ("input_ids", "attention_mask", "loss_mask"))) for i in range(5)]
    for k in spaces:
        g = np.stack([np.asarray(gr[k], np.float64).reshape(-1) for gr in grads])
        np.testing.assert_allclose(got[k], g.T @ g / 5, rtol=1e-4, atol=1e-9)


def test_diagonal_weight_fisher_equals_mean_squared_weight_gradient(model, rng):
    data = _batch(model, rng, 3)
    key = (0, "v_proj")
    shape = model.config.module_shape("v_proj")
    got = weight_diag_fisher(model, {}, [key], [data], chunk=1, progress=False).diag
    assert got[key].shape == shape

    @jax.jit
    @jax.grad
    def grad(params, ids, attn, lmask):
        return response_nll(forward(model.config, params, ids, attn), ids, lmask)[0]

    sq = [np.asarray(grad(model.params, *(data[f][i:i + 1] for f in ("input_ids", "attention_mask", "loss_mask")))
                     ["layers"][0]["v_proj"]["weight"], np.float64) ** 2 for i in range(3)]
    np.testing.assert_allclose(got[key], np.mean(sq, axis=0), rtol=1e-4, atol=1e-12)


@pytest.fixture(scope="module")
def sst_setup(model):
    rng = np.random.default_rng(3)
    u, s = _adapter(model, rng, 3), _adapter(model, rng, 2)
    data = {"harmful": _batch(model, rng, 6), "benign": _batch(model, rng, 6)}
    return u, s, data


def test_sst_from_data_equals_sst_from_cached_fishers(model, sst_setup):
    u, s, data = sst_setup
    direct = merge("sst", [u], safety=s, alpha=1.5, model=model, data=data, k=2)
    fishers = sst_fishers(validate_inputs([u], safety=s, model=model), data["harmful"], data["benign"])
    cached = merge("sst", [u], safety=s, alpha=1.5, fishers=fishers, k=2)
    for key in u:
        np.testing.assert_allclose(direct.delta(key), cached.delta(key), rtol=1e-5, atol=1e-6)
    assert direct.report["hparams"]["n_harmful"] == 6


def test_exported_sst_adapter_has_rank_ru_plus_rs_and_logits_of_the_dense_merge(model, sst_setup, tmp_path, rng):
    from sst_jax.lora.peft_io import load_peft

    u, s, data = sst_setup
    res = merge("sst", [u], safety=s, alpha=1.0, model=model, data=data, k=3)
    res.to_peft(str(tmp_path / "merged"))
    adapter = load_peft(str(tmp_path / "merged"))
    assert {adapter.rank(k) for k in adapter.keys} == {3 + 2}
    batch = _batch(model, rng, 3)
    with_adapter = forward(model.config, model.params, batch["input_ids"], batch["attention_mask"],
                           branches=adapter.to_branches())
    folded = forward(model.config, res.to_merged_params(model), batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(with_adapter, folded, atol=2e-4)
    base = forward(model.config, model.params, batch["input_ids"], batch["attention_mask"])
    assert float(jnp.max(jnp.abs(folded - base))) > 1e-3  # the merge does change the model


def test_dense_merge_exports_svd_truncated_adapter_with_reported_error(model, sst_setup, tmp_path):
    from sst_jax.lora.peft_io import load_peft

    u, s, _ = sst_setup
    res = merge("ties", [u], safety=s, density=0.5)
    full = max(min(model.config.module_shape(m)) for m in TARGETS)
    errors = res.to_peft(str(tmp_path / "full"), rank=full)
    assert max(errors.values()) < 1e-5  # full rank: exact
    errors = res.to_peft(str(tmp_path / "r2"), rank=2)
    adapter = load_peft(str(tmp_path / "r2"))
    for key in adapter.keys:
        d, approx = np.asarray(res.delta(key), np.float64), np.asarray(adapter.delta(key), np.float64)
        sv = np.linalg.svd(d, compute_uv=False)
        want = np.sqrt(np.sum(sv[2:] ** 2)) / np.sqrt(np.sum(sv**2))
        assert errors[f"model.layers.{key[0]}.self_attn.{key[1]}"] == pytest.approx(want, rel=1e-3)
        assert np.linalg.norm(d - approx) / np.linalg.norm(d) == pytest.approx(want, rel=1e-3)


def test_kfac_sst_from_data_with_all_pairs_equals_task_arithmetic(model, sst_setup):
    u, s, data = sst_setup
    u1 = {k: v for k, v in u.items() if k[0] == 0}
    s1 = {k: v for k, v in s.items() if k[0] == 0}
    res = merge("sst", [u1], safety=s1, alpha=0.5, model=model, data=data, fisher="kfac", k=32 * 32, damping=0.1)
    ta = merge("task_arithmetic", [u1], safety=s1, alpha=0.5)
    for key in u1:
        np.testing.assert_allclose(res.delta(key), ta.delta(key), rtol=1e-3, atol=1e-4)


def test_model_labels_need_a_key_and_are_reproducible_with_one(model, sst_setup):
    import jax

    u, s, data = sst_setup
    with pytest.raises(ValueError, match="PRNG key"):
        merge("sst", [u], safety=s, model=model, data=data, labels="model")
    a, b = (merge("sst", [u], safety=s, model=model, data=data, labels="model", key=jax.random.key(4), k=2)
            for _ in range(2))
    emp = merge("sst", [u], safety=s, model=model, data=data, k=2)
    key = (0, "q_proj")
    np.testing.assert_array_equal(a.delta(key), b.delta(key))
    assert float(jnp.max(jnp.abs(a.delta(key) - emp.delta(key)))) > 1e-6


def test_sst_multi_from_data_with_full_k_equals_task_arithmetic(model, rng):
    experts = [_adapter(model, rng, 2) for _ in range(3)]
    data = {"experts": [_batch(model, rng, 3) for _ in range(3)]}
    res = merge("sst_multi", experts, [0.5, 1.0, 1.5], model=model, data=data, k=4)
    fewer = merge("sst_multi", experts, [0.5, 1.0, 1.5], model=model, data=data, k=1)
    ta = merge("task_arithmetic", experts, [0.5, 1.0, 1.5])
    key = (0, "v_proj")
    np.testing.assert_allclose(res.delta(key), ta.delta(key), rtol=1e-3, atol=1e-4)
    assert float(jnp.linalg.norm(fewer.delta(key) - ta.delta(key))) > 1e-3


def test_fisher_merge_from_data_of_an_adapter_with_itself_returns_it(model, rng):
    u = _adapter(model, rng, 2)
    data = _batch(model, rng, 3)
    res = merge("fisher", [u, u], [0.3, 0.7], model=model, data={"tasks": [data, data]})
    for key in u:
        np.testing.assert_allclose(res.delta(key), u[key].delta(), rtol=1e-4, atol=1e-6)


def _per_sample(fn, data, n):
    return [fn(*(data[f][i:i + 1] for f in ("input_ids", "attention_mask", "loss_mask"))) for i in range(n)]


def test_sst_multi_fishers_are_per_expert_core_fishers_at_the_weighted_sum(model, rng):
    experts, weights = [_adapter(model, rng, 2) for _ in range(2)], [0.5, 1.5]
    data = [_batch(model, rng, 3), _batch(model, rng, 3)]
    got = sst_multi_fishers(validate_inputs(experts, weights, model=model), data, chunk=2)
    assert got.n_samples == (3, 3)
    spaces = {k + (i,): core_space(lr) for i, e in enumerate(experts) for k, lr in e.items()}
    at = {t: w * jnp.diag(spaces[t].sigma) for t in spaces for i, w in enumerate(weights) if t[2] == i}

    @jax.jit
    @jax.grad
    def grad(ms, ids, attn, lmask):
        br = {}
        for t, m in ms.items():
            br[t[:2]] = br.get(t[:2], ()) + (spaces[t].branch(m),)
        return response_nll(forward(model.config, model.params, ids, attn, branches=br), ids, lmask)[0]

    for j in range(2):
        grads = _per_sample(lambda *x: grad(at, *x), data[j], 3)
        for t in spaces:
            g = np.stack([np.asarray(gr[t], np.float64).reshape(-1) for gr in grads])
            np.testing.assert_allclose(got.fishers[j][t], g.T @ g / 3, rtol=1e-4, atol=1e-10)


def test_task_fishers_are_squared_weight_gradients_at_each_task_vector(model, rng):
    u, s = _adapter(model, rng, 2), _adapter(model, rng, 2)
    data = [_batch(model, rng, 3), _batch(model, rng, 3)]
    got = task_fishers(validate_inputs([u], safety=s, alpha=0.5, model=model), data, chunk=2)
    assert len(got) == 2
    for adapter, f, d in zip((u, s), got, data):
        br = {k: (lr,) for k, lr in adapter.items()}

        @jax.jit
        @jax.grad
        def grad(params, ids, attn, lmask):
            return response_nll(forward(model.config, params, ids, attn, branches=br), ids, lmask)[0]

        grads = _per_sample(lambda *x: grad(model.params, *x), d, 3)
        for key in (0, "q_proj"), (0, "v_proj"):
            want = np.mean([np.asarray(g["layers"][0][key[1]]["weight"], np.float64) ** 2 for g in grads], axis=0)
            np.testing.assert_allclose(f[key], want, rtol=1e-4, atol=1e-12)
