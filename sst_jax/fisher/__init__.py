"""Per-sample gradients (vmap of grad, chunked by lax.map) and Fisher estimators: dense per
module (core space), diagonal, low-rank Gram, K-FAC factors and diagonal Fishers of dense
weights from zero-perturbation taps."""

from sst_jax.fisher.estimators import (CoreSpace, KfacFactors, branch_fisher, core_fisher, core_space,
                                       core_spaces, diagonal_fisher, kfac_accumulate, kfac_factors,
                                       lm_loss_fn, sample_model_labels, weight_diag_fisher,
                                       with_targets)
from sst_jax.fisher.per_sample import (ACCELERATOR_CHUNK, CPU_CHUNK, FisherStats, accumulate, default_chunk,
                                       module_vector, per_sample_grads, resolve_chunk)

__all__ = ["ACCELERATOR_CHUNK", "CPU_CHUNK", "CoreSpace", "FisherStats", "KfacFactors", "accumulate",
           "branch_fisher", "core_fisher", "core_space", "core_spaces", "default_chunk", "diagonal_fisher",
           "kfac_accumulate", "kfac_factors", "lm_loss_fn", "module_vector", "per_sample_grads", "resolve_chunk",
           "sample_model_labels", "weight_diag_fisher", "with_targets"]
