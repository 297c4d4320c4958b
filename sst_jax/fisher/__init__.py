"""Per-sample gradients (vmap of grad, chunked by lax.map) and Fisher estimators: dense per
module (core space), diagonal, low-rank Gram, K-FAC factors and diagonal Fishers of dense
weights from zero-perturbation taps."""

from sst_jax.fisher.estimators import (CoreSpace, KfacFactors, branch_fisher, core_fisher, core_space,
                                       core_spaces, diagonal_fisher, kfac_accumulate, kfac_factors,
                                       lm_loss_fn, sample_model_labels, weight_diag_fisher,
                                       with_targets)
from sst_jax.fisher.per_sample import FisherStats, accumulate, module_vector, per_sample_grads

__all__ = ["CoreSpace", "FisherStats", "KfacFactors", "accumulate", "branch_fisher", "core_fisher",
           "core_space", "core_spaces", "diagonal_fisher", "kfac_accumulate", "kfac_factors",
           "lm_loss_fn", "module_vector", "per_sample_grads", "sample_model_labels", "weight_diag_fisher",
           "with_targets"]
