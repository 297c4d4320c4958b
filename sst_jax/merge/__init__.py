"""Merge methods on per-module ΔW behind one registry: task arithmetic, TIES, magnitude
pruning, DARE, Fisher merging, AlignGuard-LoRA (re-implementation) and SST-Merge."""
