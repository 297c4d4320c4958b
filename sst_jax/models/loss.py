"""Per-sample language-model loss on response tokens (prompt and padding masked).

Shared by the LoRA trainer, the Fisher estimators and the teacher-forced evaluations, so the
loss that trains an adapter is exactly the one whose Fisher SST-Merge uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """log p(input_ids[:, t] | tokens < t) for t ≥ 1; shape (batch, seq-1), float32."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


def response_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean NLL over the tokens where loss_mask == 1, per sample; shape (batch,).

    loss_mask[b, t] = 1 marks token t as a response target (predicted from position t-1).
    A sample with no response tokens gets loss 0 (and so no gradient), never NaN.
    """
    mask = loss_mask[:, 1:].astype(jnp.float32)
    nll = -token_log_probs(logits, input_ids) * mask
    return nll.sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1.0)


def response_log_likelihood(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Summed log-likelihood of the masked tokens per sample (MC scoring); shape (batch,)."""
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return (token_log_probs(logits, input_ids) * mask).sum(axis=-1)
