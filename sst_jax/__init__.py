"""sst-jax: Safety Subspace Task-Merge (SST-Merge) and baselines for LoRA adapters, in JAX.

Subpackages, one concern each:
  models/  Flax NNX decoders (Llama, Mistral, Qwen2), HF/GGUF loading, generation, sharding
  lora/    LoRA adapters as pytrees, PEFT import/export, ΔW algebra, optax trainer
  fisher/  per-sample gradients and Fisher estimators (core, K-FAC, diagonal)
  linalg/  generalized symmetric eigensolver (Cholesky reduction), projectors
  merge/   merge methods (one module each) behind one registry
  data/    dataset loaders, chat formatting, embedded offline data
  eval/    MC log-likelihood scoring, generation + refusal judge, safety tax, reports
"""

__version__ = "0.1.0"
