"""Preset configs (shape only) read through transformers.AutoConfig, and preset resolution."""

import jax
import numpy as np
import pytest
from transformers import AutoConfig

from sst_jax.errors import CheckpointError
from sst_jax.models import DecoderConfig, HUB_PRESETS, load_model, param_shapes

# Fields of the published config.json files.
MISTRAL_7B = dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=4096,
                  intermediate_size=14336, max_position_embeddings=32768, num_attention_heads=32,
                  num_hidden_layers=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                  sliding_window=None, tie_word_embeddings=False, vocab_size=32000, eos_token_id=2)
LLAMA31_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                  intermediate_size=14336, max_position_embeddings=131072, num_attention_heads=32,
                  num_hidden_layers=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192, rope_type="llama3"),
                  tie_word_embeddings=False, vocab_size=128256, eos_token_id=[128001, 128008, 128009])
QWEN25_14B = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=5120,
                  intermediate_size=13824, max_position_embeddings=32768, num_attention_heads=40,
                  num_hidden_layers=48, num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1e6,
                  sliding_window=131072, use_sliding_window=False, max_window_layers=70,
                  tie_word_embeddings=False, vocab_size=152064, eos_token_id=151645)


def _config(d):
    d = dict(d)
    return DecoderConfig.from_hf(AutoConfig.for_model(d.pop("model_type"), **d))


def _n_params(config):
    return int(sum(np.prod(s.shape) for s in jax.tree.leaves(param_shapes(config))))


@pytest.mark.parametrize("fields,n_params", [(MISTRAL_7B, 7_241_732_096), (LLAMA31_8B, 8_030_261_248),
                                             (QWEN25_14B, 14_770_033_664)])
def test_preset_parameter_counts_match_published(fields, n_params):
    assert _n_params(_config(fields)) == n_params


def test_llama31_rope_and_eos_read_from_config():
    c = _config(LLAMA31_8B)
    assert (c.rope_type, c.rope_factor, c.rope_original_max_position, c.rope_theta) == ("llama3", 8.0, 8192, 500000.0)
    assert c.eos_token_ids == (128001, 128008, 128009)


def test_qwen25_window_off_and_qkv_bias():
    c = _config(QWEN25_14B)
    assert c.sliding_window is None and c.bias_modules == ("q_proj", "k_proj", "v_proj")
    assert c.window_of(47) is None


def test_mistral_null_window_is_full_attention():
    c = _config(MISTRAL_7B)
    assert c.sliding_window is None and (c.n_kv_heads, c.head_dim) == (8, 128)


@pytest.mark.parametrize("preset", sorted(HUB_PRESETS))
def test_hub_presets_fail_offline_naming_the_repo(preset):
    with pytest.raises(CheckpointError, match=HUB_PRESETS[preset].replace(".", r"\.")):
        load_model(preset)
