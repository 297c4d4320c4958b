"""ΔW algebra against float64 numpy, PEFT's `cat` weighted adapter, and numpy's SVD;
compatibility checks against a base model config."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import peft
from lora_fixtures import lora_layers, peft_lora, randomize_lora_b

from sst_jax.errors import AdapterMismatchError
from sst_jax.lora.adapter import AdapterMeta, LoraAdapter, LoraFactors
from sst_jax.lora.algebra import dense_deltas, fold, svd_truncate, weighted_sum
from sst_jax.lora.check import check_compatible
from sst_jax.models.branches import LowRank
from sst_jax.models.config import DecoderConfig

CFG = DecoderConfig(vocab_size=50, d_model=24, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=40)


def _adapter(rng, modules, r, alpha, name, rslora=False):
    shapes = {"q_proj": (24, 24), "v_proj": (12, 24), "down_proj": (24, 40)}
    factors = {k: LoraFactors(a=rng.normal(size=(r, shapes[k[1]][1])).astype(np.float32),
                              b=rng.normal(size=(shapes[k[1]][0], r)).astype(np.float32)) for k in modules}
    meta = AdapterMeta(base_model="tiny", targets=tuple(sorted({k[1] for k in modules})), r=r,
                       alpha=alpha, use_rslora=rslora, name=name)
    return LoraAdapter(factors=factors, meta=meta)


def _np_delta(adapter, key):
    f = adapter.factors[key]
    return adapter.scale(key) * np.asarray(f.b, np.float64) @ np.asarray(f.a, np.float64)


def test_weighted_sum_equals_sum_of_weighted_deltas_over_union_of_modules(rng):
    a1 = _adapter(rng, [(0, "q_proj"), (1, "v_proj")], r=2, alpha=4, name="a1")
    a2 = _adapter(rng, [(0, "q_proj"), (2, "down_proj")], r=5, alpha=3, name="a2", rslora=True)
    a3 = _adapter(rng, [(1, "v_proj")], r=3, alpha=1, name="a3")
    weights = [0.7, -1.3, 2.0]
    merged = weighted_sum([a1, a2, a3], weights)
    assert sorted(merged) == [(0, "q_proj"), (1, "v_proj"), (2, "down_proj")]
    assert merged[(0, "q_proj")].a.shape == (7, 24) and merged[(1, "v_proj")].a.shape == (5, 24)
    for key, lr in merged.items():
        ref = sum(w * _np_delta(a, key) for w, a in zip(weights, [a1, a2, a3]) if key in a.factors)
        np.testing.assert_allclose(np.asarray(lr.delta()), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_weighted_sum_matches_peft_cat_combination():
    model = peft_lora(seed=0, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"]))
    randomize_lora_b(model, seed=9)
    weights = [1.5, -0.5]
    model.add_weighted_adapter(["default", "second"], weights, "cat_merge", combination_type="cat")
    layers = lora_layers(model)
    ours = {}
    for name in ("default", "second"):
        factors = {k: LoraFactors(a=m.lora_A[name].weight.detach().numpy(),
                                  b=m.lora_B[name].weight.detach().numpy()) for k, m in layers.items()}
        r = 4 if name == "default" else 2
        ours[name] = LoraAdapter(factors, AdapterMeta(None, ("q_proj", "down_proj"), r, 8 if r == 4 else 6))
    merged = weighted_sum([ours["default"], ours["second"]], weights)
    for key, m in layers.items():
        ref = m.get_delta_weight("cat_merge").detach().numpy()
        np.testing.assert_allclose(np.asarray(merged[key].delta()), ref, rtol=1e-5, atol=1e-6)


def test_weighted_sum_is_differentiable_in_the_weights(rng):
    a1 = _adapter(rng, [(0, "q_proj")], r=2, alpha=2, name="a1")
    a2 = _adapter(rng, [(0, "q_proj")], r=3, alpha=3, name="a2")
    grad = jax.grad(lambda w: weighted_sum([a1, a2], w)[(0, "q_proj")].delta().sum())(np.array([0.3, 0.4]))
    np.testing.assert_allclose(grad, [_np_delta(a1, (0, "q_proj")).sum(), _np_delta(a2, (0, "q_proj")).sum()],
                               rtol=1e-5)


def test_svd_truncate_is_the_eckart_young_approximation(rng):
    delta = rng.normal(size=(24, 40))
    low, err = svd_truncate(delta, 5)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    best = (u[:, :5] * s[:5]) @ vt[:5]
    np.testing.assert_allclose(np.asarray(low.delta()), best, atol=1e-4)
    assert float(err) == pytest.approx(np.sqrt((s[5:] ** 2).sum() / (s**2).sum()), rel=1e-5)
    assert float(np.linalg.norm(np.asarray(low.delta()) - delta) / np.linalg.norm(delta)) == pytest.approx(float(err), rel=1e-4)


def test_svd_truncate_of_a_low_rank_delta_is_exact_and_zero_has_no_error(rng):
    delta = rng.normal(size=(24, 3)) @ rng.normal(size=(3, 24))
    low, err = svd_truncate(delta, 3)
    assert float(err) < 1e-6
    np.testing.assert_allclose(np.asarray(low.delta()), delta, atol=1e-4)
    assert float(svd_truncate(np.zeros((4, 6)), 2)[1]) == 0.0


def test_fold_adds_delta_to_a_copy_of_the_weights(rng):
    from sst_jax.models import init_params

    params = init_params(CFG, jax.random.key(0))
    a1 = _adapter(rng, [(1, "v_proj"), (2, "down_proj")], r=2, alpha=4, name="a1")
    folded = fold(params, a1, CFG)
    for layer in range(3):
        for module in ("q_proj", "v_proj", "down_proj"):
            w0 = np.asarray(params["layers"][layer][module]["weight"], np.float64)
            expected = w0 + (_np_delta(a1, (layer, module)) if (layer, module) in a1.factors else 0)
            np.testing.assert_allclose(np.asarray(folded["layers"][layer][module]["weight"]), expected, atol=1e-5)


def test_dense_deltas_of_low_rank_core_branch(rng):
    a, b, c = rng.normal(size=(3, 24)), rng.normal(size=(12, 2)), rng.normal(size=(2, 3))
    d = dense_deltas({(0, "v_proj"): LowRank(a=a, b=b, core=c, scale=0.5)})
    np.testing.assert_allclose(np.asarray(d[(0, "v_proj")]), 0.5 * b @ c @ a, rtol=1e-5)


# ------------------------------------------------------------------------------- checks


def test_check_compatible_names_module_and_shapes_on_input_mismatch(rng):
    adapter = _adapter(rng, [(0, "q_proj")], r=2, alpha=2, name="safety")
    other = CFG.replace(d_model=32, n_heads=4)
    with pytest.raises(AdapterMismatchError, match=r"'safety' targets layers.0.self_attn.q_proj with A of "
                                                   r"shape \(2, 24\) .* q_proj input size 32.*base_model_name_or_path='tiny'"):
        check_compatible(adapter, other, base_model_name="other")


def test_check_compatible_rejects_missing_layer_and_warns_on_another_base_id(rng, caplog):
    adapter = _adapter(rng, [(2, "down_proj")], r=2, alpha=2, name="u")
    with pytest.raises(AdapterMismatchError, match="layers.2.mlp.down_proj .* has 2 layers"):
        check_compatible(adapter, CFG.replace(n_layers=2))
    # Names are not identities (HF-cache snapshots, renamed folders): shapes fit, so only a warning.
    with caplog.at_level("WARNING"):
        check_compatible(adapter, CFG, base_model_name="smollm2-135m")
    assert "trained on 'tiny' but is applied to 'smollm2-135m'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_compatible(adapter, CFG, base_model_name="some/path/tiny")  # same id by suffix: no warning
    assert "trained on" not in caplog.text


def test_check_compatible_accepts_a_preset_name_for_its_hub_id(rng, caplog):
    adapter = _adapter(rng, [(0, "q_proj")], r=2, alpha=2, name="s")
    from dataclasses import replace

    adapter = LoraAdapter(adapter.factors, replace(adapter.meta, base_model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    with caplog.at_level("WARNING"):
        check_compatible(adapter, CFG, base_model_name="smollm2-135m")
    assert "trained on" not in caplog.text
    with caplog.at_level("WARNING"):
        check_compatible(adapter, CFG, base_model_name="mistral-7b")
    assert "trained on 'HuggingFaceTB/SmolLM2-135M-Instruct' but is applied to 'mistral-7b'" in caplog.text
