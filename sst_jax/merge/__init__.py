"""Merge methods on per-module ΔW behind one registry: task arithmetic, TIES, magnitude
pruning, DARE, Fisher merging, AlignGuard-LoRA (re-implementation) and SST-Merge.

    from sst_jax.merge import merge, list_methods
    result = merge("sst", [utility], safety=safety, alpha=1.0, fishers=cached, k=32)
"""

from sst_jax.merge.api import (MergeInputs, MergeResult, MethodSpec, concat_lowrank, get_method, list_methods,
                               merge, register, validate_inputs)
from sst_jax.merge import dare, peft_factors, task_arithmetic, ties  # noqa: F401  (registers methods)

__all__ = ["MergeInputs", "MergeResult", "MethodSpec", "concat_lowrank", "get_method", "list_methods", "merge",
           "register", "validate_inputs"]
