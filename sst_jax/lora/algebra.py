"""Per-module ΔW algebra: dense deltas, exact weighted sums as factors, SVD truncation,
folding into base weights, and export of a merged model as HF safetensors.

Exact results stay low-rank: Σ wᵢ sᵢ Bᵢ Aᵢ = [w₁s₁B₁ … wₙsₙBₙ]·[A₁; …; Aₙ] (rank Σ rᵢ, PEFT's
`cat`). Dense results (TIES, DARE) are exported as merged weights or SVD-truncated adapters
with the truncation error reported (DESIGN.md §4).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors.numpy import save_file

from sst_jax.errors import AdapterError, AdapterMismatchError
from sst_jax.lora.adapter import LoraAdapter, module_shapes
from sst_jax.lora.peft_io import write_dir_atomically
from sst_jax.models.branches import LowRank, ModuleKey, concat_lowrank, hf_module_path
from sst_jax.models.sharding import placed_like

LowRankDict = Mapping[ModuleKey, LowRank]
AdapterLike = Union[LoraAdapter, LowRankDict]
DeltaLike = Union[AdapterLike, Mapping[ModuleKey, jax.Array]]


def as_low_rank(adapter: AdapterLike) -> dict[ModuleKey, LowRank]:
    """{key: LowRank} of a LoraAdapter (scale attached) or of a LowRank mapping (unchanged)."""
    if isinstance(adapter, LoraAdapter):
        return adapter.low_rank()
    out = {}
    for key, lr in adapter.items():
        if isinstance(lr, tuple):  # a branches pytree entry
            if len(lr) != 1 or not isinstance(lr[0], LowRank):
                raise AdapterError(f"module {key}: expected one LowRank branch, got {lr!r}")
            lr = lr[0]
        if not isinstance(lr, LowRank):
            raise AdapterError(f"module {key}: expected a LowRank, got {type(lr).__name__}")
        out[key] = lr
    return out


def weighted_sum(adapters: Sequence[AdapterLike], weights: Sequence[float] | jax.Array) -> dict[ModuleKey, LowRank]:
    """Σᵢ wᵢ ΔWᵢ per module, exactly, as LowRank(a=[A₁;…;Aₙ], b=[w₁s₁B₁ … wₙsₙBₙ], scale=1).

    Modules are the union over adapters (an adapter without a module contributes 0 there);
    ranks may differ; weights may be negative or traced (the sum is differentiable in w).
    """
    if len(adapters) != len(weights):
        raise AdapterError(f"{len(adapters)} adapters but {len(weights)} weights")
    if not adapters:
        raise AdapterError("weighted_sum needs at least one adapter")
    lows = [as_low_rank(a) for a in adapters]
    out = {}
    for key in sorted(set().union(*lows)):
        parts = [(weights[i], low[key]) for i, low in enumerate(lows) if key in low]
        in_dims = {int(lr.a.shape[1]) for _, lr in parts}
        out_dims = {int(lr.b.shape[0]) for _, lr in parts}
        if len(in_dims) > 1 or len(out_dims) > 1:
            raise AdapterMismatchError(f"{hf_module_path(key)}: adapters disagree on the shape "
                                       f"(in {sorted(in_dims)}, out {sorted(out_dims)}); "
                                       "were they trained on different base models?")
        out[key] = concat_lowrank([(lr, w) for w, lr in parts])
    return out


def dense_deltas(deltas: DeltaLike) -> dict[ModuleKey, jax.Array]:
    """{key: ΔW (out, in) float32} of an adapter, a LowRank mapping or a dense mapping."""
    if isinstance(deltas, LoraAdapter):
        return {k: deltas.delta(k) for k in deltas.keys}
    out = {}
    for key in sorted(deltas):
        value = deltas[key]
        if isinstance(value, (LowRank, tuple)):
            out[key] = as_low_rank({key: value})[key].delta()
        else:
            out[key] = jnp.asarray(value, jnp.float32)
    return out


def svd_truncate(delta: jax.Array, rank: int) -> tuple[LowRank, jax.Array]:
    """Best rank-`rank` approximation of ΔW (Eckart–Young) and its relative Frobenius error.

    The singular values are split evenly, B = U√Σ, A = √Σ Vᵀ, so neither factor dominates.
    A zero ΔW has relative error 0.
    """
    if rank <= 0:
        raise AdapterError(f"truncation rank must be positive, got {rank}")
    delta = jnp.asarray(delta, jnp.float32)
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    root = jnp.sqrt(s[:k])
    low = LowRank(a=root[:, None] * vt[:k], b=u[:, :k] * root[None, :], scale=1.0)
    total = jnp.sum(s**2)
    err = jnp.where(total > 0, jnp.sqrt(jnp.sum(s[k:] ** 2) / jnp.where(total > 0, total, 1.0)), 0.0)
    return low, err


def fold(params: Any, deltas: DeltaLike, config) -> Any:
    """A copy of the frozen params with W ← W + ΔW for every module of `deltas`.

    The sum is done in float32 and cast back to each weight's dtype. `params` is not modified.
    """
    shapes = module_shapes(config)
    dense = dense_deltas(deltas)
    layers = list(params["layers"])
    for (layer, module), d in dense.items():
        if not 0 <= layer < len(layers):
            raise AdapterMismatchError(f"ΔW for {hf_module_path((layer, module))} but the base model "
                                       f"has {len(layers)} layers")
        if tuple(d.shape) != shapes[module]:
            raise AdapterMismatchError(f"ΔW for {hf_module_path((layer, module))} has shape "
                                       f"{tuple(d.shape)}; the base weight is {shapes[module]}")
        lp = dict(layers[layer])
        mp = dict(lp[module])
        w = mp["weight"]
        d = placed_like(d, w)  # ΔW goes where the weight is (e.g. split over a mesh)
        mp["weight"] = (jnp.asarray(w, jnp.float32) + d).astype(w.dtype)
        lp[module] = mp
        layers[layer] = lp
    out = dict(params)
    out["layers"] = layers
    return out


_HF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config_dict(config) -> dict[str, Any]:
    """A transformers config.json for a DecoderConfig (Llama, Mistral or Qwen2)."""
    arch = config.architecture
    rope: dict[str, Any] = {"rope_type": config.rope_type, "rope_theta": float(config.rope_theta)}
    if config.rope_type == "llama3":
        rope.update(factor=config.rope_factor, low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_position)
    out: dict[str, Any] = {
        "architectures": [_HF_ARCH[arch]], "model_type": arch,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_eps,
        "rope_theta": float(config.rope_theta), "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) != 1 else config.eos_token_ids[0],
        "pad_token_id": config.pad_token_id, "dtype": config.dtype,
    }
    if arch == "llama":
        out["attention_bias"] = bool(config.bias_modules)
        out["mlp_bias"] = False
    if arch == "mistral":
        out["sliding_window"] = config.sliding_window
    if arch == "qwen2":
        out["use_sliding_window"] = config.sliding_window is not None
        out["sliding_window"] = config.sliding_window
        if config.sliding_layers is not None:
            out["layer_types"] = ["sliding_attention" if i in config.sliding_layers else "full_attention"
                                  for i in range(config.n_layers)]
    return out


def hf_state_dict(params: Any, config) -> dict[str, np.ndarray]:
    """HF transformers key -> numpy array of a params pytree (inverse of the HF loader)."""
    t = {"model.embed_tokens.weight": params["embed_tokens"], "model.norm.weight": params["norm"]}
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = params["lm_head"]
    for i, lp in enumerate(params["layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{i}.{norm}.weight"] = lp[norm]
        for module in module_shapes(config):
            for field, value in lp[module].items():
                t[f"{hf_module_path((i, module))}.{field}"] = value
    out = {}
    for k, v in t.items():
        a = np.ascontiguousarray(np.asarray(v))
        if not np.all(np.isfinite(a.astype(np.float32))):
            raise AdapterError(f"merged weight {k} contains NaN or Inf; refusing to export")
        out[k] = a
    return out


def export_merged_hf(model, params: Any, out_dir: str | os.PathLike) -> Path:
    """Writes `params` (e.g. `fold(...)` output) as an HF model directory transformers loads:
    model.safetensors, config.json and the model's tokenizer files; atomically.
    """
    out_dir = Path(out_dir)
    config = model.config
    tensors = hf_state_dict(params, config)
    hf_cfg = hf_config_dict(config)
    writers = [
        lambda tmp: save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"}),
        lambda tmp: (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n"),
    ]
    if getattr(model, "tokenizer", None) is not None:
        writers.append(lambda tmp: model.tokenizer.save_pretrained(str(tmp)))
    write_dir_atomically(out_dir, *writers)
    logging.info("exported merged model (%d tensors) to %s", len(tensors), out_dir)
    return out_dir
