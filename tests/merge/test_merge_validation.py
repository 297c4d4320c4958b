"""Bad input gives clear errors naming the adapter and module; different ranks are fine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merge_helpers import random_adapter
from sst_jax.errors import AdapterMismatchError, NumericalError
from sst_jax.lora.adapter import init_lora
from sst_jax.lora.check import base_fingerprint, with_fingerprint
from sst_jax.merge import get_method, list_methods, merge
from sst_jax.models.branches import LowRank
from sst_jax.models.config import DecoderConfig

CFG = DecoderConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=16)


def _lora(base, seed=0):
    return init_lora(jax.random.key(seed), CFG, targets=["q_proj", "v_proj"], r=2, alpha=4, base_model=base)


def test_adapters_naming_different_bases_merge_with_a_warning_when_shapes_agree(caplog):
    # A name is not an identity (HF-cache snapshot folders, renamed copies): shapes decide.
    with caplog.at_level("WARNING"):
        res = merge("task_arithmetic", [_lora("model-a")], safety=_lora("model-b", 1))
    assert "model-a" in caplog.text and "model-b" in caplog.text and res.keys


def test_adapters_with_different_recorded_architectures_are_rejected():
    bigger = dataclasses.replace(CFG, n_layers=4)
    a = _lora("model-a")
    b = _lora("model-b", 1)
    a = dataclasses.replace(a, meta=with_fingerprint(a.meta, base_fingerprint(CFG)))
    b = dataclasses.replace(b, meta=with_fingerprint(b.meta, base_fingerprint(bigger)))
    with pytest.raises(AdapterMismatchError, match="different base models.*n_layers \\(2 vs 4\\)"):
        merge("task_arithmetic", [a], safety=b)


def test_mismatched_target_modules_are_rejected_unless_union(rng):
    u1 = random_adapter(rng, 2)
    u2 = {k: v for k, v in random_adapter(rng, 2).items() if k[1] != "v_proj"}
    with pytest.raises(AdapterMismatchError, match="targets different modules.*v_proj.*modules='union'"):
        merge("task_arithmetic", [u1, u2])
    res = merge("task_arithmetic", [u1, u2], modules="union")
    np.testing.assert_allclose(res.delta((0, "v_proj")), u1[(0, "v_proj")].delta(), rtol=1e-6)


def test_shape_mismatch_between_adapters_names_the_module(rng):
    u1 = random_adapter(rng, 2, modules=("q_proj",))
    u2 = dict(u1)
    u2[(1, "q_proj")] = LowRank(a=jnp.ones((2, 5)), b=jnp.ones((8, 2)), scale=1.0)
    with pytest.raises(AdapterMismatchError, match=r"model\.layers\.1\.self_attn\.q_proj.*\(8, 5\)"):
        merge("task_arithmetic", [u1, u2])


def test_shape_mismatch_with_the_base_model_is_rejected(rng):
    with pytest.raises(AdapterMismatchError, match="q_proj with ΔW of shape \\(8, 6\\).*has \\(8, 8\\)"):
        merge("task_arithmetic", [random_adapter(rng, 2, modules=("q_proj",))], model=CFG)


def test_empty_adapter_list_is_rejected():
    with pytest.raises(AdapterMismatchError, match="at least one utility adapter"):
        merge("task_arithmetic", [])


def test_nan_in_an_adapter_names_adapter_and_module(rng):
    u = random_adapter(rng, 2)
    key = (1, "down_proj")
    u[key] = dataclasses.replace(u[key], b=u[key].b.at[0, 0].set(jnp.nan))
    with pytest.raises(NumericalError, match=r"'utility\[1\]'.*layers\.1\.mlp\.down_proj.*b has NaN"):
        merge("ties", [random_adapter(rng, 2), u])


def test_wrong_number_of_weights_is_rejected(rng):
    with pytest.raises(ValueError, match="2 weights for 1 utility adapters"):
        merge("task_arithmetic", [random_adapter(rng, 2)], [1.0, 2.0])


def test_different_ranks_merge_with_task_arithmetic_ties_and_dare(rng):
    u1, u2 = random_adapter(rng, 1), random_adapter(rng, 4)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        assert set(merge(method, [u1, u2]).keys) == set(u1)


def test_peft_factor_modes_reject_different_ranks_as_peft_does(rng):
    with pytest.raises(AdapterMismatchError, match="one rank per module"):
        merge("peft_ties_factors", [random_adapter(rng, 1), random_adapter(rng, 4)])


def test_registry_lists_every_method_with_its_flags():
    assert {"task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties", "fisher", "agl", "sst",
            "sst_multi", "peft_ties_factors", "peft_dare_linear_factors", "peft_dare_ties_factors"} <= set(list_methods())
    assert get_method("task_arithmetic").exact and not get_method("ties").exact
    assert get_method("sst").data_aware and not get_method("dare_ties").data_aware
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        get_method("nope")


def test_data_aware_method_without_fishers_or_data_says_what_it_needs(rng):
    with pytest.raises(ValueError, match="model= and data="):
        merge("sst", [random_adapter(rng, 2)], safety=random_adapter(rng, 2))


@pytest.mark.parametrize("with_dense", [False, True])
def test_module_report_norm_matches_dense_norm(with_dense):
    """‖ΔW‖_F from Gram matrices equals numpy's norm of the materialised sum (float64)."""
    from sst_jax.merge.api import module_report

    rng = np.random.default_rng(3)
    out_dim, in_dim = 37, 23
    branches, total = [], np.zeros((out_dim, in_dim))
    for r, with_core in ((3, False), (5, True), (2, False)):
        a, b = rng.normal(size=(r, in_dim)), rng.normal(size=(out_dim, r))
        core = rng.normal(size=(r, r)) if with_core else None
        s = float(rng.uniform(0.5, 2.0))
        branches.append(LowRank(a=jnp.asarray(a, jnp.float32), b=jnp.asarray(b, jnp.float32), scale=s,
                                core=None if core is None else jnp.asarray(core, jnp.float32)))
        total += s * (b @ (np.eye(r) if core is None else core) @ a)
    dense = {}
    if with_dense:
        d = rng.normal(size=(out_dim, in_dim))
        dense[(0, "q_proj")] = jnp.asarray(d, jnp.float32)
        total += d
    rep = module_report({(0, "q_proj"): tuple(branches)}, dense)
    np.testing.assert_allclose(rep["model.layers.0.self_attn.q_proj"]["norm"], np.linalg.norm(total), rtol=1e-5)
