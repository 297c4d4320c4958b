"""Checkpoint loading: sharded safetensors, GGUF (mapping, q/k permutation, dequantization),
and errors that name the file and key."""

import json
import os
import shutil

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from sst_jax.errors import CheckpointError
from sst_jax.models import load_model
from sst_jax.models.checkpoint import load_gguf
from sst_jax.models.tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved with save_pretrained (single safetensors file)."""
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_sharded_index_loads_same_params(hf_dir, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    a, b = load_model(hf_dir), load_model(str(tmp_path))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def test_missing_shard_names_index_and_shard(hf_dir, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json.*{shard}"):
        load_model(str(tmp_path))


def test_missing_key_names_file_and_key(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing.*layers\.1\.up_proj\.weight"):
        load_model(d)


def test_shape_mismatch_names_file_key_and_shapes(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    _edit_config(d, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                              r"has shape \(\d+, \d+\), expected"):
        load_model(d)


def test_unknown_tensor_names_file_and_key(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*q_norm\.weight"):
        load_model(d)


def test_unsupported_architecture_names_config(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match=r"config\.json.*'gpt2'.*not supported"):
        load_model(d)


def test_quantized_checkpoint_is_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    _edit_config(d, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(CheckpointError, match=r"config\.json.*bitsandbytes.*not supported"):
        load_model(d)


def test_directory_without_safetensors(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        load_model(d)


def test_unknown_name_and_offline_hub_id():
    with pytest.raises(CheckpointError, match=r"unknown model 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(CheckpointError, match=r"nobody-xyz/not-a-model.*HF_HUB_OFFLINE"):
        load_model("nobody-xyz/not-a-model")


# ---------------------------------------------------------------------------------------------
# GGUF


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf q/k row order (interleaved RoPE pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def write_gguf(hf_dir, path, qtype="F32", arch="llama"):
    """Write the HF checkpoint as a GGUF; 2-D layer weights stored as `qtype`; llama.cpp
    permutes q/k rows for llama only."""
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for key, t in sd.items():
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            layer, rest = key[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"
        t = np.asarray(t, np.float32)
        if arch == "llama" and name.endswith("attn_q.weight"):
            t = _permute(t, cfg["num_attention_heads"])
        elif arch == "llama" and name.endswith("attn_k.weight"):
            t = _permute(t, cfg["num_key_value_heads"])
        if t.ndim == 2 and name.startswith("blk.") and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(t, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_f32_equals_safetensors_after_unpermuting_qk(hf_dir, tmp_path):
    write_gguf(hf_dir, tmp_path / "m.gguf")
    config, params = load_gguf(str(tmp_path / "m.gguf"))
    ref = load_model(hf_dir)
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.d_ff) == (2, 4, 2, 128)
    assert not config.tie_word_embeddings
    for lp, rp in zip(params["layers"], ref.params["layers"]):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(lp[m]["weight"], rp[m]["weight"])
    np.testing.assert_array_equal(params["lm_head"], ref.params["lm_head"])


def test_qwen2_gguf_keeps_qkv_bias_and_row_order(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    write_gguf(str(tmp_path / "hf"), tmp_path / "q.gguf", arch="qwen2")
    config, params = load_gguf(str(tmp_path / "q.gguf"))
    ref = load_model(str(tmp_path / "hf"))
    assert config.architecture == "qwen2" and config.bias_modules == ("q_proj", "k_proj", "v_proj")
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(x, y)


def _ref_dequant(raw: np.ndarray, qtype: str) -> np.ndarray:
    """ggml block formats (32 values per block), written from the ggml spec."""
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]  # bytes per block
    blocks = raw.reshape(raw.shape[0], raw.shape[1] // size, size)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    if qtype == "Q8_0":
        vals = d * blocks[..., 2:].copy().view(np.int8).astype(np.float32)
    else:
        off = 2 if qtype == "Q4_0" else 4
        q = blocks[..., off:]
        nib = np.concatenate([q & 0x0F, q >> 4], axis=-1).astype(np.float32)
        if qtype == "Q4_0":
            vals = d * (nib - 8)
        else:
            vals = d * nib + blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    return vals.reshape(raw.shape[0], -1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_dequantization_matches_block_format(hf_dir, tmp_path, qtype):
    path = tmp_path / f"m-{qtype}.gguf"
    write_gguf(hf_dir, path, qtype)
    _, params = load_gguf(str(path))
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert t.tensor_type.name == qtype
    np.testing.assert_allclose(params["layers"][1]["down_proj"]["weight"], _ref_dequant(np.asarray(t.data), qtype),
                               rtol=0, atol=1e-7)
    exact = load_model(hf_dir).params["layers"][1]["down_proj"]["weight"]
    assert np.abs(np.asarray(params["layers"][1]["down_proj"]["weight"]) - exact).max() < 0.05


def test_gguf_unsupported_quantization_names_file_tensor_and_type(hf_dir, tmp_path):
    write_gguf(hf_dir, tmp_path / "q5.gguf", "Q5_0")
    with pytest.raises(CheckpointError, match=r"q5\.gguf: tensor 'blk\.0\.\w+\.weight' has quantization Q5_0"):
        load_gguf(str(tmp_path / "q5.gguf"))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
        load_model(str(bad))


def test_bfloat16_load_keeps_float32_logits_close_to_hf_float32(hf_dir):
    import jax.numpy as jnp

    from sst_jax.models import forward

    m = load_model(hf_dir, dtype="bfloat16")
    assert m.params["layers"][0]["q_proj"]["weight"].dtype == jnp.bfloat16
    ids = np.random.default_rng(0).integers(3, 512, size=(2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    ours = np.asarray(forward(m.config, m.params, ids, mask))
    assert ours.dtype == np.float32
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    scale = np.abs(ref).max()
    print("bf16 vs fp32 max abs diff", np.abs(ours - ref).max(), "logit scale", scale)
    assert np.abs(ours - ref).max() < 0.02 * scale  # bf16 has an 8-bit mantissa
