"""Merge methods on per-module ΔW behind one registry: task arithmetic, TIES, magnitude
pruning, DARE, Fisher merging, AlignGuard-LoRA (re-implementation) and SST-Merge.

    from sst_jax.merge import merge, list_methods
    result = merge("sst", [utility], safety=safety, alpha=1.0, fishers=cached, k=32)
"""

from sst_jax.merge.api import (PERFORMANCE_PARAMS, DenseModules, MergeInputs, MergeResult, MethodSpec, Param, concat_lowrank, get_method, list_methods,
                               merge, register, validate_inputs, weighted_norm)
from sst_jax.merge import agl, dare, fisher_merge, peft_factors, sst, sst_guard, task_arithmetic, ties  # noqa: F401  (registers)
from sst_jax.fisher import CoreSpace, core_space
from sst_jax.merge.sst import MultiFishers, SstFishers, sst_fishers, sst_multi_fishers

__all__ = ["PERFORMANCE_PARAMS", "DenseModules", "Param", "CoreSpace", "MultiFishers", "SstFishers", "core_space", "sst_fishers", "sst_multi_fishers", "MergeInputs", "MergeResult", "MethodSpec", "concat_lowrank", "get_method", "list_methods", "merge",
           "register", "validate_inputs", "weighted_norm"]
