"""Generalized symmetric eigensolver A v = λ B v by Cholesky reduction (batched, jitted) and
the F_b-orthogonal top-k projector and spectral-shrinkage operator of SST-Merge."""
