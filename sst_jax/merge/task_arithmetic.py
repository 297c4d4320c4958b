"""Task Arithmetic (Ilharco et al., 2023) on per-module ΔW, kept exactly as LoRA factors.

Convention: ΔW = Σᵢ wᵢ·ΔW_Uᵢ + α·ΔW_S. The sum is the concatenation
[w₁s₁B₁ … wₙsₙBₙ, αs_S B_S]·[A₁; …; Aₙ; A_S] (rank Σrᵢ + r_S, PEFT's `cat`), so it is exact:
no SVD, no truncation. Weights are not normalized (mergekit's `normalize` is not applied).
"""

from __future__ import annotations

from sst_jax.merge.api import MergeInputs, MergeResult, concat_lowrank, make_result, register


@register("task_arithmetic", exact=True)
def task_arithmetic(inputs: MergeInputs) -> MergeResult:
    """ΔW = Σ wᵢΔW_Uᵢ (+ α ΔW_S) as exact concatenated factors. No hyper-parameters."""
    adapters, weights, _ = inputs.task_vectors()
    factors = {}
    for key in inputs.keys:
        parts = [(a[key], w) for a, w in zip(adapters, weights) if key in a]
        factors[key] = (concat_lowrank(parts),)
    return make_result("task_arithmetic", inputs, factors=factors)
