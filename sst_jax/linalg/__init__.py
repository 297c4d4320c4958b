"""Generalized symmetric eigensolver A v = λ B v (LAPACK on CPU, batched jitted Cholesky reduction on
accelerators; ill-conditioning checks) and the F_b-orthogonal top-k projector and spectral-shrinkage
operator of SST-Merge."""

from sst_jax.linalg.gevp import (ILL_CONDITIONED_THRESHOLD, IllConditionedError, check_positive_definite,
                                 condition_estimate, default_rcond, generalized_eigh, generalized_eigh_traced, resolve_backend)
from sst_jax.linalg.projection import fb_coordinates, project_topk, select_k, shrinkage

__all__ = ["ILL_CONDITIONED_THRESHOLD", "IllConditionedError", "check_positive_definite", "condition_estimate", "default_rcond",
           "generalized_eigh", "generalized_eigh_traced", "resolve_backend", "fb_coordinates", "project_topk",
           "select_k", "shrinkage"]
