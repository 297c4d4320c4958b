"""Batched, left-padded generation: jitted prefill, then a `lax.while_loop` decode over a KV
cache, greedy or seeded temperature / top-p sampling, stopping at EOS.

A prefix every row shares (a chat template's system prompt: about half of each prompt for the
embedded chat model) can be passed apart: it is prefilled once, with batch 1, and its keys and
values are copied into every row's cache, so the batch prefill runs only over the rows' own
suffixes. The rows are then [prefix][left padding][suffix]: padding in the middle is masked like
any padding, and positions count valid tokens only, so the model sees the same sequence."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sst_jax.models.branches import Branches, OutputTap
from sst_jax.models.config import DecoderConfig
from sst_jax.models.llama import Params, CallContext, dtype_of, lm_head, positions_from_mask, run_layers


def _choose(logits: jax.Array, key: jax.Array, temperature, top_p, sample: bool) -> jax.Array:
    """Next token (B,) from logits (B, V): argmax, or sampling from the top-p nucleus."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _empty_caches(config: DecoderConfig, rows: int, length: int):
    shape = (rows, length, config.n_kv_heads, config.head_dim)
    dtype = dtype_of(config)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers)]


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sample"))
def _generate(config: DecoderConfig, params: Params, input_ids, attention_mask, branches, temperature,
              top_p, key, eos_ids, prefix, *, max_new_tokens: int, sample: bool):
    b, t = input_ids.shape
    p = prefix.shape[0]  # shared prefix tokens (0: none)
    total = p + t + max_new_tokens
    ctx = CallContext(branches, False, 0.0, None)
    mask = attention_mask.astype(jnp.int32)
    key_valid = jnp.concatenate([jnp.ones((b, p), jnp.int32), mask, jnp.zeros((b, max_new_tokens), jnp.int32)],
                                axis=1)
    caches = _empty_caches(config, b, total)
    if p:
        _, shared = run_layers(config, params, prefix[None], jnp.arange(p)[None], jnp.arange(p), key_valid[:1],
                               ctx, _empty_caches(config, 1, total), 0)
        caches = [tuple(jnp.broadcast_to(x, (b,) + x.shape[1:]) for x in kv) for kv in shared]
    h, caches = run_layers(config, params, input_ids, p + positions_from_mask(mask), p + jnp.arange(t),
                           key_valid, ctx, caches, p)
    logits = lm_head(config, params, h[:, -1])
    next_pos = p + mask.sum(axis=1)  # position of the first generated token, per row

    out = jnp.full((b, max_new_tokens), config.pad_token_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(state):
        i, _, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, logits, caches, key_valid, done, out, key = state
        key, sub = jax.random.split(key)
        tok = _choose(logits, sub, temperature, top_p, sample)
        tok = jnp.where(done, config.pad_token_id, tok)
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, eos_ids)
        idx = p + t + i
        key_valid = key_valid.at[:, idx].set(1)
        h, caches = run_layers(config, params, tok[:, None], (next_pos + i)[:, None], idx[None],
                               key_valid, ctx, caches, idx)
        return i + 1, lm_head(config, params, h[:, -1]), caches, key_valid, done, out, key

    state = (jnp.asarray(0), logits, caches, key_valid, done, out, key)
    return jax.lax.while_loop(cond, body, state)[5]


def supports_shared_prefix(config: DecoderConfig, cache_length: int) -> bool:
    """Whether `generate(prefix_ids=...)` is exact for a KV cache of `cache_length` slots
    (prefix + padded rows + new tokens): a sliding window counts slots, so the padding between
    prefix and suffix would shift it, unless no window is shorter than the whole cache."""
    return all(w is None or w >= cache_length for w in map(config.window_of, range(config.n_layers)))


def generate(model_or_config: Any, params: Params, input_ids, attention_mask, *, max_new_tokens: int,
             branches: Branches | None = None, temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None, eos_token_ids: Sequence[int] | None = None,
             prefix_ids: Sequence[int] | None = None) -> jax.Array:
    """(B, max_new_tokens) int32 new tokens; after a row's EOS the rest is pad_token_id.

    `prefix_ids` (P,): tokens that precede every row's `input_ids` (each row's sequence is the
    prefix, then its unpadded tokens); prefilled once instead of once per row.

    temperature == 0 is greedy; otherwise sampling from softmax(logits / temperature) restricted
    to the top-p nucleus, keyed by `key` (required). EOS ids default to the config's (which
    `load_model` fills from the tokenizer and generation_config.json).
    """
    config: DecoderConfig = getattr(model_or_config, "config", model_or_config)
    if branches and any(isinstance(b, OutputTap) for bs in branches.values() for b in bs):
        raise ValueError("generate() takes LowRank branches only; OutputTap deltas have a fixed sequence shape")
    cache_length = (0 if prefix_ids is None else len(prefix_ids)) + np.shape(input_ids)[1] + max_new_tokens
    if prefix_ids is not None and len(prefix_ids) and not supports_shared_prefix(config, cache_length):
        raise ValueError(f"prefix_ids with a sliding window shorter than the {cache_length}-slot cache: the window "
                         "counts cache slots, and the padding between prefix and suffix would shift it; pass whole "
                         "rows instead")
    sample = temperature > 0.0
    if sample and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key")
    if key is None:
        key = jax.random.key(0)  # unused by greedy decoding
    eos = config.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    return _generate(config, params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                     branches, jnp.asarray(temperature if sample else 1.0, jnp.float32),
                     jnp.asarray(top_p, jnp.float32), key, eos_arr,
                     jnp.asarray(() if prefix_ids is None else prefix_ids, jnp.int32).reshape(-1),
                     max_new_tokens=max_new_tokens,
                     sample=sample)
