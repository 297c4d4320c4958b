"""PEFT import/export against PEFT itself (tensors, scales, files) and bad-input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from lora_fixtures import TARGETS, lora_layers, peft_lora, tiny_llama
from peft import PeftModel

from sst_jax.errors import AdapterError
from sst_jax.lora.adapter import LoraAdapter, LoraFactors, from_low_rank, init_lora
from sst_jax.lora.peft_io import load_peft, save_peft
from sst_jax.models.branches import LowRank

RANK_PATTERN = {"layers.1.self_attn.q_proj": 2, "down_proj": 6}
ALPHA_PATTERN = {"v_proj": 3, "model.layers.0.mlp.up_proj": 5}


@pytest.fixture(scope="module")
def patterned(tmp_path_factory):
    """A PEFT LoRA with rank_pattern + alpha_pattern, saved by PEFT."""
    model = peft_lora(rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    path = tmp_path_factory.mktemp("peft_patterned")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def rslora(tmp_path_factory):
    model = peft_lora(use_rslora=True, r=8, lora_alpha=4, rank_pattern={"o_proj": 3})
    path = tmp_path_factory.mktemp("peft_rslora")
    model.save_pretrained(path)
    return model, path


def _assert_matches_peft(adapter: LoraAdapter, peft_model):
    layers = lora_layers(peft_model)
    assert set(adapter.factors) == set(layers)
    for key, mod in layers.items():
        f = adapter.factors[key]
        np.testing.assert_array_equal(np.asarray(f.a), mod.lora_A["default"].weight.detach().numpy())
        np.testing.assert_array_equal(np.asarray(f.b), mod.lora_B["default"].weight.detach().numpy())
        assert adapter.scale(key) == pytest.approx(mod.scaling["default"], rel=1e-12), key


def test_load_peft_rank_and_alpha_patterns_match_peft(patterned):
    model, path = patterned
    adapter = load_peft(path)
    _assert_matches_peft(adapter, model)
    assert adapter.rank((1, "q_proj")) == 2 and adapter.rank((0, "q_proj")) == 4
    assert adapter.scale((1, "down_proj")) == pytest.approx(8 / 6)


def test_load_peft_rslora_scale_is_alpha_over_sqrt_r(rslora):
    model, path = rslora
    adapter = load_peft(path)
    _assert_matches_peft(adapter, model)
    assert adapter.scale((0, "o_proj")) == pytest.approx(4 / math.sqrt(3))


def test_delta_equals_peft_get_delta_weight(patterned):
    model, path = patterned
    adapter = load_peft(path)
    for key, mod in lora_layers(model).items():
        ref = mod.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(np.asarray(adapter.delta(key)), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["patterned", "rslora"])
def test_exported_adapter_loads_in_peft_with_same_factors_and_scales(which, request, tmp_path):
    model, path = request.getfixturevalue(which)
    adapter = load_peft(path)
    save_peft(adapter, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "ours").eval()
    _assert_matches_peft(adapter, reloaded)
    ids = torch.tensor([[5, 17, 3, 44, 9, 60]])
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), model(ids).logits.numpy())


def test_second_round_trip_is_bit_identical(patterned, tmp_path):
    _, path = patterned
    save_peft(load_peft(path), tmp_path / "one")
    save_peft(load_peft(tmp_path / "one"), tmp_path / "two")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_from_low_rank_exports_exact_per_module_ranks_to_peft(tmp_path, rng):
    """A union of modules with different ranks (a merge result) round-trips through PEFT."""
    lows = {(0, "q_proj"): LowRank(a=rng.normal(size=(3, 32)).astype(np.float32),
                                   b=rng.normal(size=(32, 3)).astype(np.float32), scale=0.7),
            (1, "down_proj"): LowRank(a=rng.normal(size=(5, 48)).astype(np.float32),
                                      b=rng.normal(size=(32, 5)).astype(np.float32), scale=-2.0)}
    save_peft(from_low_rank(lows, base_model="tiny"), tmp_path / "merged")
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "merged").eval()
    layers = lora_layers(reloaded)
    assert set(layers) == set(lows)
    for key, lr in lows.items():
        ref = lr.scale * lr.b @ lr.a
        np.testing.assert_allclose(layers[key].get_delta_weight("default").detach().numpy(), ref,
                                   rtol=1e-5, atol=1e-5)


def test_init_lora_matches_peft_shapes_scales_and_kaiming_bound():
    model = peft_lora(rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    from sst_jax.models.config import DecoderConfig

    cfg = DecoderConfig.from_hf(model.base_model.model.config)
    import jax

    adapter = init_lora(jax.random.key(0), cfg, targets=TARGETS, r=4, alpha=8,
                        rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    for key, mod in lora_layers(model).items():
        a_ref = mod.lora_A["default"].weight
        f = adapter.factors[key]
        assert f.a.shape == tuple(a_ref.shape) and f.b.shape == tuple(mod.lora_B["default"].weight.shape)
        assert adapter.scale(key) == pytest.approx(mod.scaling["default"])
        # torch's kaiming_uniform_(a=√5) bound for this fan-in
        bound = torch.nn.init._calculate_correct_fan(a_ref, "fan_in") ** -0.5
        assert float(np.abs(f.a).max()) <= bound and float(np.abs(f.a).max()) > 0.8 * bound
        assert not np.any(np.asarray(f.b))


# ----------------------------------------------------------------------------- bad inputs


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture
def saved(patterned, tmp_path):
    save_peft(load_peft(patterned[1]), tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize("field,value,needle", [
    ("use_dora", True, "DoRA"),
    ("lora_bias", True, "lora_bias"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("target_modules", ["q_proj", "lm_head"], "lm_head"),
    ("peft_type", "IA3", "LoRA adapters only"),
])
def test_unsupported_peft_features_are_refused(saved, field, value, needle):
    _edit_config(saved, **{field: value})
    with pytest.raises(AdapterError, match=needle):
        load_peft(saved)


def test_pickled_bin_is_refused_with_advice(saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(AdapterError, match="safe_serialization=True"):
        load_peft(saved)


def test_missing_config_is_a_clear_error(saved):
    (saved / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="missing .*adapter_config.json"):
        load_peft(saved)


def test_corrupt_safetensors_is_a_clear_error(saved):
    data = (saved / "adapter_model.safetensors").read_bytes()
    (saved / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_peft(saved)


def test_rank_disagreeing_with_config_is_refused(saved):
    _edit_config(saved, rank_pattern={})
    with pytest.raises(AdapterError, match="down_proj has rank 6 but adapter_config.json says r=4"):
        load_peft(saved)


def test_embedding_lora_tensor_is_refused(saved):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(saved / "adapter_model.safetensors"))
    t["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_file(t, str(saved / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lm_head"):
        load_peft(saved)


def test_nan_in_saved_adapter_is_detected_on_load(saved):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(saved / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    t[key][3, 1] = np.nan
    save_file(t, str(saved / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="layers.1.mlp.up_proj.lora_B.weight.*NaN"):
        load_peft(saved)


def test_saving_nan_adapter_writes_nothing(patterned, tmp_path):
    adapter = load_peft(patterned[1])
    key = (0, "k_proj")
    bad_a = np.asarray(adapter.factors[key].a).copy()
    bad_a[0, 0] = np.inf
    bad = adapter.replace_factors({**adapter.factors, key: LoraFactors(a=bad_a, b=adapter.factors[key].b)})
    with pytest.raises(AdapterError, match="layers.0.self_attn.k_proj contains NaN or Inf"):
        save_peft(bad, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    # an existing adapter directory is left exactly as it was
    save_peft(adapter, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(AdapterError):
        save_peft(bad, tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_adapter_on_some_layers_exports_layers_to_transform_that_peft_honours(tmp_path):
    import jax

    from sst_jax.models.config import DecoderConfig

    cfg = DecoderConfig.from_hf(tiny_llama(0).config)
    adapter = init_lora(jax.random.key(0), cfg, targets=["v_proj", "up_proj"], r=2, alpha=2, layers=[1])
    save_peft(adapter, tmp_path / "l1")
    assert json.loads((tmp_path / "l1" / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "l1")
    assert set(lora_layers(reloaded)) == {(1, "v_proj"), (1, "up_proj")}
    assert load_peft(tmp_path / "l1").meta.layers == (1,)


def test_init_lora_a_follows_torch_kaiming_uniform_sqrt5():
    """Same distribution as torch.nn.init.kaiming_uniform_(a=√5) (what PEFT uses for lora_A)."""
    import jax

    from sst_jax.models.config import DecoderConfig

    cfg = DecoderConfig(vocab_size=8, d_model=48, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=80)
    ours = np.asarray(init_lora(jax.random.key(0), cfg, targets=["down_proj"], r=1024, alpha=1).factors[(0, "down_proj")].a)
    ref = torch.nn.init.kaiming_uniform_(torch.empty(1024, 80), a=math.sqrt(5)).numpy()
    assert np.abs(ours).max() == pytest.approx(np.abs(ref).max(), rel=1e-3)
    assert ours.std() == pytest.approx(ref.std(), rel=2e-2) and abs(ours.mean()) < 3e-3
