"""The decoder (Llama, Mistral, Qwen2 differ only by config flags), as functions over a params
pytree, plus a thin Flax NNX module over the same functions.

Params pytree (HF names, HF (out, in) weight layout):

    {"embed_tokens": (V, D), "norm": (D,), "lm_head": (V, D)  [absent when tied],
     "layers": [ {"input_layernorm": (D,), "post_attention_layernorm": (D,),
                  "q_proj": {"weight": (out, in), "bias": (out,) [bias_modules only]}, ...
                  k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj}, ... ]}

The layers are an unrolled Python loop rather than a `lax.scan` over stacked weights: branch
pytrees are keyed per (layer, module) and may differ between layers (LoRA on some layers or
modules only, different ranks, taps on one module), which a scan could not carry without
padding every layer to one branch structure. Measured on the shared 2-core CPU (load ≈ 9):
jit compile of the 30-layer SmolLM2 forward (8×128) 4.2 s, of its gradient w.r.t. rank-8
LoRA branches on all 210 modules 41 s; the tiny preset compiles in 2.7 s. A scan over stacked
layer weights compiled the same forward in 2.0 s (4.7 s unrolled in the same run) at equal run
time: too small a saving to force one branch structure on every layer.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sst_jax.models.branches import MODULE_NAMES, Branches, LowRank, ModuleKey, OutputTap
from sst_jax.models.config import DecoderConfig

Params = dict[str, Any]
_NEG = -1e30  # additive mask value; finite so fully-masked (padding) rows never give NaN


def dtype_of(config: DecoderConfig) -> jnp.dtype:
    return jnp.dtype(config.dtype)


# ---------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, scaled by `weight` in the input dtype (as HF does)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
    """Inverse RoPE frequencies (head_dim/2,), with Llama-3.1 "llama3" scaling if configured."""
    hd = config.head_dim
    # float32 throughout, as HF computes it, so long positions agree to rounding.
    f32 = np.float32
    inv = f32(1.0) / (f32(config.rope_theta) ** (np.arange(0, hd, 2).astype(f32) / f32(hd)))
    if config.rope_type == "llama3":
        factor, lo, hi = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old = config.rope_original_max_position
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(mid, blended, scaled)
    return inv.astype(np.float32)


def rope_tables(config: DecoderConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, H, hd); HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Left padding: the first real token has position 0; padding gets position 0 too."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_allowed(q_index: jax.Array, k_index: jax.Array, key_valid: jax.Array,
                      window: int | None) -> jax.Array:
    """(B, T, S) bool: causal, key not padding, within the sliding window if any."""
    rel = q_index[:, None] - k_index[None, :]
    ok = rel >= 0
    if window is not None:
        ok = ok & (rel < window)
    return ok[None] & key_valid[:, None, :].astype(bool)


class CallContext:
    """Per-call state threaded through the layers: branches, dropout and captured inputs."""

    def __init__(self, branches: Branches | None, capture: bool, dropout_rate: float,
                 dropout_key: jax.Array | None):
        self.branches = branches or {}
        self.capture = capture
        self.captured: dict[ModuleKey, jax.Array] = {}
        self.dropout_rate = dropout_rate
        self.dropout_key = dropout_key
        if dropout_rate > 0.0 and dropout_key is None and self.branches:
            raise ValueError("dropout_rate > 0 needs a dropout_key")

    def _drop(self, x: jax.Array, key: ModuleKey) -> jax.Array:
        if self.dropout_rate <= 0.0:
            return x
        k = jax.random.fold_in(jax.random.fold_in(self.dropout_key, key[0]), MODULE_NAMES.index(key[1]))
        keep = jax.random.bernoulli(k, 1.0 - self.dropout_rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout_rate), 0).astype(x.dtype)

    def linear(self, x: jax.Array, p: Params, key: ModuleKey) -> jax.Array:
        """y = x Wᵀ (+ b) + Σ branches(x); W in HF (out, in) layout."""
        if self.capture:
            self.captured[key] = x
        w = p["weight"]
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
        if "bias" in p:
            y = y + p["bias"].astype(y.dtype)
        attached = self.branches.get(key, ())
        if attached:
            xd = self._drop(x, key)
            for br in attached:
                y = y + br.apply(x if isinstance(br, OutputTap) else xd).astype(y.dtype)
        return y


def attention(config: DecoderConfig, p: Params, layer: int, x: jax.Array, cos: jax.Array,
              sin: jax.Array, allowed: jax.Array, ctx: CallContext,
              cache: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | int = 0):
    """Self-attention of one layer. With a cache (B, S, KV, hd) × 2 the new keys/values are
    written at `cache_index` and the queries attend over the whole cache (masked by `allowed`).
    Returns (output, updated cache or None)."""
    b, t, _ = x.shape
    hd, nkv = config.head_dim, config.n_kv_heads
    group = config.n_heads // nkv
    q = ctx.linear(x, p["q_proj"], (layer, "q_proj")).reshape(b, t, config.n_heads, hd)
    k = ctx.linear(x, p["k_proj"], (layer, "k_proj")).reshape(b, t, nkv, hd)
    v = ctx.linear(x, p["v_proj"], (layer, "v_proj")).reshape(b, t, nkv, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, cache_index, 0, 0))
        v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, cache_index, 0, 0))
        new_cache = (k, v)
    else:
        new_cache = None
    q = q.reshape(b, t, nkv, group, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores = jnp.where(allowed[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, config.q_dim).astype(x.dtype)
    return ctx.linear(out, p["o_proj"], (layer, "o_proj")), new_cache


def mlp(p: Params, layer: int, x: jax.Array, ctx: CallContext) -> jax.Array:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    g = ctx.linear(x, p["gate_proj"], (layer, "gate_proj"))
    u = ctx.linear(x, p["up_proj"], (layer, "up_proj"))
    return ctx.linear(jax.nn.silu(g) * u, p["down_proj"], (layer, "down_proj"))


def decoder_layer(config: DecoderConfig, p: Params, layer: int, x: jax.Array, cos, sin, allowed,
                  ctx: CallContext, cache=None, cache_index=0):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""
    h, new_cache = attention(config, p, layer, rms_norm(x, p["input_layernorm"], config.rms_eps),
                             cos, sin, allowed, ctx, cache, cache_index)
    x = x + h
    x = x + mlp(p, layer, rms_norm(x, p["post_attention_layernorm"], config.rms_eps), ctx)
    return x, new_cache


def lm_head(config: DecoderConfig, params: Params, h: jax.Array) -> jax.Array:
    """Final norm and output projection; logits in float32."""
    h = rms_norm(h, params["norm"], config.rms_eps)
    w = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def run_layers(config: DecoderConfig, params: Params, input_ids: jax.Array, positions: jax.Array,
               q_index: jax.Array, key_valid: jax.Array, ctx: CallContext, caches=None, cache_index=0):
    """Embedding and all layers (unrolled). Returns (hidden (B,T,D), updated caches)."""
    dtype = dtype_of(config)
    x = jnp.take(params["embed_tokens"], input_ids, axis=0).astype(dtype)
    cos, sin = rope_tables(config, positions, dtype)
    k_index = jnp.arange(key_valid.shape[1])
    masks: dict[int | None, jax.Array] = {}
    new_caches = []
    for i, lp in enumerate(params["layers"]):
        window = config.window_of(i)
        if window not in masks:
            masks[window] = attention_allowed(q_index, k_index, key_valid, window)
        x, c = decoder_layer(config, lp, i, x, cos, sin, masks[window], ctx,
                             None if caches is None else caches[i], cache_index)
        new_caches.append(c)
    return x, (None if caches is None else new_caches)


def layer_inputs(config: DecoderConfig, attention_mask: jax.Array, layer: int):
    """(cos, sin, allowed) that `decoder_layer` / `attention` of `layer` get in a full forward."""
    t = attention_mask.shape[1]
    cos, sin = rope_tables(config, positions_from_mask(attention_mask), dtype_of(config))
    allowed = attention_allowed(jnp.arange(t), jnp.arange(t), attention_mask, config.window_of(layer))
    return cos, sin, allowed


def forward(config: DecoderConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array,
            *, branches: Branches | None = None, capture_inputs: bool = False,
            dropout_rate: float = 0.0, dropout_key: jax.Array | None = None):
    """Logits float32 (B, T, V); with capture_inputs also {ModuleKey: input (B, T, in)}.

    Jittable with `config` (and capture_inputs, dropout_rate) static. Positions come from the
    (left-padded) attention_mask; branches are added to the target linear layers; dropout
    applies to branch inputs only.
    """
    ctx = CallContext(branches, capture_inputs, dropout_rate, dropout_key)
    t = input_ids.shape[1]
    h, _ = run_layers(config, params, input_ids, positions_from_mask(attention_mask),
                      jnp.arange(t), attention_mask, ctx)
    logits = lm_head(config, params, h)
    return (logits, ctx.captured) if capture_inputs else logits


def last_token_logits(config: DecoderConfig, params: Params, input_ids: jax.Array,
                      attention_mask: jax.Array, *, branches: Branches | None = None) -> jax.Array:
    """Logits of the last position only, float32 (B, V), never materializing (B, T, V).

    With left padding the last position is every row's last real token (MC scoring, prefill).
    """
    ctx = CallContext(branches, False, 0.0, None)
    t = input_ids.shape[1]
    h, _ = run_layers(config, params, input_ids, positions_from_mask(attention_mask),
                      jnp.arange(t), attention_mask, ctx)
    return lm_head(config, params, h[:, -1])


def final_hidden(config: DecoderConfig, params: Params, input_ids: jax.Array,
                 attention_mask: jax.Array, *, branches: Branches | None = None) -> jax.Array:
    """Final-norm hidden states (B, T, D): what `lm_head` projects to logits (never computed here)."""
    ctx = CallContext(branches, False, 0.0, None)
    t = input_ids.shape[1]
    h, _ = run_layers(config, params, input_ids, positions_from_mask(attention_mask),
                      jnp.arange(t), attention_mask, ctx)
    return rms_norm(h, params["norm"], config.rms_eps)


# ---------------------------------------------------------------------------------------------
# Initialization


def init_params(config: DecoderConfig, key: jax.Array, *, std: float = 0.02) -> Params:
    """Random weights N(0, std²), unit norms, zero biases (the `tiny` preset, shape tests)."""
    dtype = dtype_of(config)
    keys = iter(jax.random.split(key, 2 + 7 * config.n_layers))

    def normal(shape):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    layers = []
    for _ in range(config.n_layers):
        lp: Params = {"input_layernorm": jnp.ones((config.d_model,), dtype),
                      "post_attention_layernorm": jnp.ones((config.d_model,), dtype)}
        for m in MODULE_NAMES:
            shape = config.module_shape(m)
            lp[m] = {"weight": normal(shape)}
            if m in config.bias_modules:
                lp[m]["bias"] = jnp.zeros((shape[0],), dtype)
        layers.append(lp)
    params: Params = {"embed_tokens": normal((config.vocab_size, config.d_model)),
                      "layers": layers, "norm": jnp.ones((config.d_model,), dtype)}
    lm = normal((config.vocab_size, config.d_model))
    if not config.tie_word_embeddings:
        params["lm_head"] = lm
    return params


def param_shapes(config: DecoderConfig) -> Params:
    """ShapeDtypeStructs of the params pytree, without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# Flax NNX module over the same functions


class Decoder(nnx.Module):
    """NNX view of a decoder: frozen weights as `nnx.Param`s, branches passed at call time.

    `Decoder.from_params(config, params)(ids, mask, branches=...)` equals
    `forward(config, params, ids, mask, branches=...)`; `decoder.params()` returns the plain
    pytree the functional API uses.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs | None = None,
                 params: Params | None = None):
        self.config = config
        if params is None:
            params = init_params(config, (rngs or nnx.Rngs(0)).params())
        self.weights = nnx.data(jax.tree.map(nnx.Param, params))

    @classmethod
    def from_params(cls, config: DecoderConfig, params: Params) -> "Decoder":
        return cls(config, params=params)

    def params(self) -> Params:
        return jax.tree.map(lambda p: p[...], self.weights, is_leaf=lambda v: isinstance(v, nnx.Param))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 branches: Branches | None = None, **kwargs):
        return forward(self.config, self.params(), input_ids, attention_mask, branches=branches, **kwargs)
