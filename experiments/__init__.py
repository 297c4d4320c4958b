"""Experiments on top of the sst_jax library: exp1 safety tax, exp2 multi-expert
interference, exp3 method comparison. `run_real_experiments.py` is the command line."""
