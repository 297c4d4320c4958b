"""sst-jax: Safety Subspace Task-Merge (SST-Merge) and baselines for LoRA adapters, in JAX.

    import sst_jax
    result = sst_jax.merge_adapters("smollm2-135m", utility=["./math"], safety="./safety", method="sst")
    sst_jax.write_merge(result, "./merged")          # PEFT adapter + merge_report.json/.md

The same from the shell: `sst-merge` / `python -m sst_jax` (sst_jax/cli.py).

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

from sst_jax.merge import MergeResult, list_methods  # noqa: E402
from sst_jax.pipeline import merge_adapters, write_merge  # noqa: E402

__all__ = ["MergeResult", "list_methods", "merge_adapters", "write_merge", "__version__"]
