"""Flax NNX decoders (Llama, Mistral, Qwen2), configs from HF config.json, HF safetensors and
GGUF loading, tokenizers, presets, KV-cache generation and sharding.

Shared contracts defined here: `branches` (low-rank side branches passed at call time) and
`loss` (per-sample response NLL).
"""

from sst_jax.models.api import HUB_PRESETS, PRESETS, LoadedModel, load_model, smollm2_gguf_path
from sst_jax.models.branches import (MODULE_NAMES, Branch, Branches, LowRank, ModuleKey, OutputTap,
                                     add_branches, hf_module_path, parse_module_path)
from sst_jax.models.config import DecoderConfig
from sst_jax.models.generate import generate
from sst_jax.models.llama import Decoder, forward, init_params, last_token_logits, param_shapes
from sst_jax.models.loss import response_log_likelihood, response_nll, token_log_probs

__all__ = [
    "Branch", "Branches", "Decoder", "DecoderConfig", "HUB_PRESETS", "LoadedModel", "LowRank",
    "MODULE_NAMES", "ModuleKey", "OutputTap", "PRESETS", "add_branches", "forward", "generate",
    "hf_module_path", "init_params", "last_token_logits", "load_model", "param_shapes", "parse_module_path",
    "response_log_likelihood", "response_nll", "smollm2_gguf_path", "token_log_probs",
]
