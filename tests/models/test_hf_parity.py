"""Our decoder against HF transformers PyTorch: tiny random Llama / Mistral / Qwen2 built in
torch, saved with save_pretrained, loaded by `load_model(dir)`; fp32 eager attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sst_jax.models import LowRank, forward, generate, load_model
from sst_jax.models import llama
from sst_jax.models.tokenizer import tiny_tokenizer

TOL = 1e-4
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, attn_implementation="eager")

VARIANTS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    # Llama-3.1 RoPE scaling with a short original context so every frequency band is exercised.
    "llama3-rope-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral-nowindow": (transformers.MistralConfig, transformers.MistralForCausalLM,
                         dict(sliding_window=None)),
    "mistral-window4": (transformers.MistralConfig, transformers.MistralForCausalLM,
                        dict(sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
}


def _build(name, directory):
    cfg_cls, model_cls, extra = VARIANTS[name]
    torch.manual_seed(0)
    kwargs = {**SMALL, **extra}
    if "rope_parameters" in extra:
        kwargs["max_position_embeddings"] = 1024
    hf = model_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norms and biases, peaky enough logits for stable argmax
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    hf.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(HF torch model, our LoadedModel) with identical weights, one per variant."""
    d = tmp_path_factory.mktemp(request.param)
    hf = _build(request.param, d)
    return request.param, hf, load_model(str(d))


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-only")
    hf = _build("llama", d)
    return "llama", hf, load_model(str(d))


def _batch(seed=0, b=3, t=12, pad=(0, 5, 2)):
    r = np.random.default_rng(seed)
    ids = r.integers(3, 512, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i, p in enumerate(pad[:b]):
        mask[i, :p] = 0
        ids[i, :p] = 0
    return ids, mask


def _hf_logits(hf, ids, mask, **kw):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos, dtype=torch.long), **kw)
    return out.logits.numpy()


def test_config_read_from_hf(pair):
    name, hf, m = pair
    c = m.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim) == (2, 64, 4, 2, 16)
    assert c.sliding_window == (4 if name == "mistral-window4" else None)
    assert c.bias_modules == (("q_proj", "k_proj", "v_proj") if name == "qwen2" else ())
    assert c.tie_word_embeddings == (name == "llama3-rope-tied")
    assert c.rope_type == ("llama3" if name == "llama3-rope-tied" else "default")


def test_full_model_logits_match_hf_with_left_padding(pair):
    _, hf, m = pair
    ids, mask = _batch()
    ours = np.asarray(jax.jit(forward, static_argnums=0)(m.config, m.params, ids, mask))
    ref = _hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)


def test_long_positions_match_hf(pair):
    """64 tokens: past the sliding window of 4 and past llama3's original context of 64."""
    _, hf, m = pair
    ids, mask = _batch(seed=1, b=2, t=80, pad=(0, 9))
    ours = np.asarray(jax.jit(forward, static_argnums=0)(m.config, m.params, ids, mask))
    ref = _hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)


def _hook_io(hf, module, ids, mask):
    """(input hidden_states, output) of an HF submodule during a full forward."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().numpy()
        seen["y"] = (out[0] if isinstance(out, tuple) else out).detach().numpy()

    h = module.register_forward_hook(hook, with_kwargs=True)
    try:
        _hf_logits(hf, ids, mask)
    finally:
        h.remove()
    return seen["x"], seen["y"]


def test_embedding_matches_hf(pair):
    _, hf, m = pair
    ids, _ = _batch()
    with torch.no_grad():
        ref = hf.model.embed_tokens(torch.tensor(ids, dtype=torch.long)).numpy()
    np.testing.assert_allclose(np.asarray(m.params["embed_tokens"])[ids], ref, atol=0, rtol=0)


def test_attention_matches_hf(pair):
    _, hf, m = pair
    ids, mask = _batch()
    x, ref = _hook_io(hf, hf.model.layers[1].self_attn, ids, mask)
    cos, sin, allowed = llama.layer_inputs(m.config, jnp.asarray(mask), 1)
    ctx = llama.CallContext(None, False, 0.0, None)
    ours, _ = llama.attention(m.config, m.params["layers"][1], 1, jnp.asarray(x), cos, sin, allowed, ctx)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=TOL, rtol=0)


def test_mlp_matches_hf(pair):
    _, hf, m = pair
    ids, mask = _batch()
    x, ref = _hook_io(hf, hf.model.layers[0].mlp, ids, mask)
    ctx = llama.CallContext(None, False, 0.0, None)
    ours = llama.mlp(m.params["layers"][0], 0, jnp.asarray(x), ctx)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_one_decoder_layer_matches_hf(pair):
    _, hf, m = pair
    ids, mask = _batch()
    x, ref = _hook_io(hf, hf.model.layers[1], ids, mask)
    cos, sin, allowed = llama.layer_inputs(m.config, jnp.asarray(mask), 1)
    ctx = llama.CallContext(None, False, 0.0, None)
    ours, _ = llama.decoder_layer(m.config, m.params["layers"][1], 1, jnp.asarray(x), cos, sin, allowed, ctx)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=TOL, rtol=0)


def test_captured_inputs_are_hf_module_inputs(pair):
    _, hf, m = pair
    ids, mask = _batch()
    x, _ = _hook_io(hf, hf.model.layers[1].mlp.down_proj, ids, mask)
    _, captured = forward(m.config, m.params, ids, mask, capture_inputs=True)
    assert len(captured) == 7 * m.config.n_layers
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(captured[(1, "down_proj")])[valid], x[valid], atol=TOL, rtol=0)


def test_greedy_generation_matches_hf_generate(pair):
    _, hf, m = pair
    ids, mask = _batch(seed=2, b=2, t=6, pad=(0, 2))
    n = 16
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, ids.shape[1]:].numpy()
    ours = np.asarray(generate(m, m.params, ids, mask, max_new_tokens=n, eos_token_ids=()))
    np.testing.assert_array_equal(ours, ref)


def test_lora_branches_match_peft(pair):
    """LowRank(a=lora_A, b=lora_B, scale=alpha/r) on q/v/down equals PEFT's LoRA model."""
    import peft

    _, hf, m = pair
    torch.manual_seed(1)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           lora_dropout=0.0, init_lora_weights=False)
    import copy

    pm = peft.get_peft_model(copy.deepcopy(hf), lcfg).eval()
    branches = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            from sst_jax.models import parse_module_path

            a = mod.lora_A["default"].weight.detach().numpy()
            b = mod.lora_B["default"].weight.detach().numpy()
            branches[parse_module_path(name)] = (LowRank(a=jnp.asarray(a), b=jnp.asarray(b), scale=2.0),)
    assert len(branches) == 3 * m.config.n_layers
    ids, mask = _batch()
    ref = _hf_logits(pm, ids, mask)
    ours = np.asarray(forward(m.config, m.params, ids, mask, branches=branches))
    base = np.asarray(forward(m.config, m.params, ids, mask))
    valid = mask.astype(bool)
    assert np.abs(ref - base)[valid].max() > 1e-2  # the adapter really changes the logits
    np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)


def test_nnx_decoder_module_matches_hf(pair):
    from flax import nnx

    _, hf, m = pair
    module = llama.Decoder.from_params(m.config, m.params)
    n_weights = len(jax.tree.leaves(nnx.state(module, nnx.Param)))
    assert n_weights == len(jax.tree.leaves(m.params))
    ids, mask = _batch()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(module(ids, mask))[valid], _hf_logits(hf, ids, mask)[valid],
                               atol=TOL, rtol=0)


def test_zero_output_tap_gradient_is_torch_output_gradient(llama_pair):
    """∂L/∂(zero OutputTap on v_proj of layer 1) equals torch autograd's grad of that output."""
    from sst_jax.models import OutputTap

    _, hf, m = llama_pair
    ids, mask = _batch()
    w = np.random.default_rng(5).standard_normal((*ids.shape, 512)).astype(np.float32) * mask[..., None]
    kept = {}

    def hook(mod, args, out):
        out.retain_grad()
        kept["y"] = out

    h = hf.model.layers[1].self_attn.v_proj.register_forward_hook(hook)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos, dtype=torch.long)).logits
    (logits * torch.tensor(w)).sum().backward()
    h.remove()
    ref = kept["y"].grad.numpy()
    hf.zero_grad()

    def loss(delta):
        out = forward(m.config, m.params, ids, mask, branches={(1, "v_proj"): (OutputTap(delta),)})
        return (out * w).sum()

    got = jax.grad(loss)(jnp.zeros((*ids.shape, m.config.kv_dim)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_dropout_touches_branch_inputs_only(llama_pair):
    _, _, m = llama_pair
    ids, mask = _batch()
    r = np.random.default_rng(3)
    br = {(0, "up_proj"): (LowRank(a=jnp.asarray(r.standard_normal((4, 64)), jnp.float32) * 0.1,
                                   b=jnp.asarray(r.standard_normal((128, 4)), jnp.float32) * 0.1, scale=2.0),)}
    base = forward(m.config, m.params, ids, mask)
    k = jax.random.key(0)
    # Without branches dropout has nothing to act on.
    np.testing.assert_array_equal(forward(m.config, m.params, ids, mask, dropout_rate=0.5, dropout_key=k), base)
    full = forward(m.config, m.params, ids, mask, branches=br)
    d1 = forward(m.config, m.params, ids, mask, branches=br, dropout_rate=0.5, dropout_key=k)
    d1b = forward(m.config, m.params, ids, mask, branches=br, dropout_rate=0.5, dropout_key=k)
    d2 = forward(m.config, m.params, ids, mask, branches=br, dropout_rate=0.5, dropout_key=jax.random.key(1))
    np.testing.assert_array_equal(d1, d1b)  # keyed
    assert np.abs(np.asarray(d1 - d2)).max() > 1e-4 and np.abs(np.asarray(d1 - full)).max() > 1e-4
    # Dropping every input of the branch leaves exactly the base model.
    np.testing.assert_allclose(forward(m.config, m.params, ids, mask, branches=br, dropout_rate=1.0 - 1e-9,
                                       dropout_key=k), base, atol=1e-6)


def test_last_token_logits_match_hf_last_position(pair):
    _, hf, m = pair
    ids, mask = _batch()
    ours = np.asarray(llama.last_token_logits(m.config, m.params, ids, mask))
    np.testing.assert_allclose(ours, _hf_logits(hf, ids, mask)[:, -1], atol=TOL, rtol=0)
