"""Per-sample gradients (vmap of grad, chunked by lax.map) and Fisher estimators: dense per
module (core space), diagonal, low-rank Gram, and K-FAC factors from zero-perturbation taps."""
