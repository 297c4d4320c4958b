"""Generalized symmetric eigensolver A v = λ B v by Cholesky reduction (batched, jitted) and
the F_b-orthogonal top-k projector and spectral-shrinkage operator of SST-Merge."""

from sst_jax.linalg.gevp import check_positive_definite, generalized_eigh, generalized_eigh_traced
from sst_jax.linalg.projection import fb_coordinates, project_topk, select_k, shrinkage

__all__ = ["check_positive_definite", "generalized_eigh", "generalized_eigh_traced", "fb_coordinates", "project_topk",
           "select_k", "shrinkage"]
