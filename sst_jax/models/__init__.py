"""Flax NNX decoders (Llama, Mistral, Qwen2), configs from HF config.json, HF safetensors and
GGUF loading, tokenizers, presets, KV-cache generation and sharding.

Shared contracts defined here: `branches` (low-rank side branches passed at call time) and
`loss` (per-sample response NLL).
"""
