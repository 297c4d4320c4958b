"""Logits of our decoder + adapters against PEFT / transformers PyTorch on a tiny Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from lora_fixtures import TARGETS, peft_lora, tiny_llama
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sst_jax.lora.adapter import LoraFactors, from_low_rank, init_lora
from sst_jax.lora.algebra import export_merged_hf, fold, weighted_sum
from sst_jax.lora.peft_io import load_peft, save_peft
from sst_jax.models import LoadedModel, forward, load_model
from sst_jax.models.checkpoint import load_safetensors, safetensors_files
from sst_jax.models.config import DecoderConfig

IDS = np.array([[0, 0, 5, 17, 3, 44, 9, 60], [7, 8, 9, 10, 11, 12, 13, 14]], np.int32)
MASK = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], np.int32)


def torch_logits(model) -> np.ndarray:
    """HF logits with the same left padding (positions from the mask, like ours)."""
    ids, mask = torch.tensor(IDS, dtype=torch.long), torch.tensor(MASK, dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()


def assert_close_on_tokens(ours, ref, atol):
    valid = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def base(hf_dir):
    cfg = DecoderConfig.from_hf(tiny_llama(0).config)
    return cfg, load_safetensors(cfg, safetensors_files(str(hf_dir)))


@pytest.mark.parametrize("kind", ["patterned", "rslora"])
def test_peft_adapter_in_sst_jax_matches_peft_logits(kind, base, tmp_path):
    cfg, params = base
    kwargs = (dict(rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3})
              if kind == "patterned" else dict(use_rslora=True, r=8, lora_alpha=4, rank_pattern={"o_proj": 3}))
    model = peft_lora(**kwargs)
    model.save_pretrained(tmp_path)
    adapter = load_peft(tmp_path)
    ours = forward(cfg, params, IDS, MASK, branches=adapter.to_branches())
    ref = torch_logits(model)
    with model.disable_adapter():
        assert np.abs(ref - torch_logits(model)).max() > 1e-2  # the adapter matters
    assert_close_on_tokens(ours, ref, 1e-4)


def _random_adapter(cfg, seed=3):
    adapter = init_lora(jax.random.key(seed), cfg, targets=TARGETS, r=4, alpha=16,
                        rank_pattern={"gate_proj": 2}, use_rslora=True, base_model="tiny-llama")
    k = jax.random.key(seed + 1)
    return adapter.replace_factors({
        key: LoraFactors(a=f.a, b=0.3 * jax.random.normal(jax.random.fold_in(k, i), f.b.shape))
        for i, (key, f) in enumerate(adapter.factors.items())})


def test_sst_jax_adapter_exported_to_peft_matches_our_logits(base, tmp_path):
    cfg, params = base
    adapter = _random_adapter(cfg)
    save_peft(adapter, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "ours").eval()
    ours = forward(cfg, params, IDS, MASK, branches=adapter.to_branches())
    assert_close_on_tokens(ours, torch_logits(peft_model), 1e-4)


def test_folded_weights_give_the_same_logits_as_side_branches(base):
    cfg, params = base
    a1, a2 = _random_adapter(cfg, 3), _random_adapter(cfg, 7)
    merged = weighted_sum([a1, a2], [0.8, -0.5])
    side = forward(cfg, params, IDS, MASK, branches={k: (v,) for k, v in merged.items()})
    folded = forward(cfg, fold(params, merged, cfg), IDS, MASK)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(side), atol=2e-5, rtol=0)
    assert float(jnp.abs(side - forward(cfg, params, IDS, MASK)).max()) > 1e-2


def test_exported_merged_model_loads_in_transformers_with_same_logits(base, tmp_path):
    cfg, params = base
    folded = fold(params, _random_adapter(cfg), cfg)
    export_merged_hf(LoadedModel(cfg, folded, None, "tiny-llama", "test"), folded, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close_on_tokens(forward(cfg, folded, IDS, MASK), torch_logits(hf), 1e-4)


def test_exported_tiny_preset_loads_back_with_tokenizer(tmp_path):
    model = load_model("tiny", seed=0)
    export_merged_hf(model, model.params, tmp_path / "tiny")
    back = load_model(str(tmp_path / "tiny"))
    assert back.config.replace(eos_token_ids=model.config.eos_token_ids) == model.config
    ids = np.asarray(model.tokenizer("hello world")["input_ids"], np.int32)[None]
    np.testing.assert_array_equal(np.asarray(back.tokenizer("hello world")["input_ids"]), ids[0])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model.config, model.params, ids, np.ones_like(ids))),
                               ref, atol=1e-4, rtol=0)


def test_low_rank_merge_exported_as_peft_reproduces_the_merge_in_peft(base, tmp_path):
    cfg, params = base
    merged = weighted_sum([_random_adapter(cfg, 3), _random_adapter(cfg, 5)], [1.0, 0.5])
    save_peft(from_low_rank(merged, base_model="tiny-llama"), tmp_path / "m")
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "m").eval()
    ours = forward(cfg, params, IDS, MASK, branches={k: (v,) for k, v in merged.items()})
    assert_close_on_tokens(ours, torch_logits(peft_model), 1e-4)
